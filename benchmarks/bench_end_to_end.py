"""End-to-end training step of a transformer: torch fused AdamW vs FusedGuardedAdamW.

GPU: the Qwen2.5-0.5B shape (weights random, built from a transformers config, nothing is
downloaded) under bf16 autocast. CPU: a small model of the same family in fp32. A step is
zero_grad + forward + backward + optimizer step; the guard variant passes the loss in.
The render reports the guarded step's overhead over torch fused AdamW and over our own
unguarded step (goal: under 1% of step time).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks import common

transformers = pytest.importorskip("transformers")

# Qwen2.5-0.5B's published shape; CPU gets a scaled-down sibling.
MODELS = {
    "cuda": dict(name="qwen2.5-0.5b-shape", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1e6, batch=4, seq=1024),
    "cpu": dict(name="qwen2-tiny", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True,
                rope_theta=1e6, batch=4, seq=128),
}
VARIANTS = ("torch-fused", "lbw", "lbw+guard")


@pytest.fixture(scope="module")
def model_and_batch(device):
    spec = dict(MODELS["cuda" if device.type == "cuda" else "cpu"])
    name, batch, seq = spec.pop("name"), spec.pop("batch"), spec.pop("seq")
    cfg = transformers.Qwen2Config(max_position_embeddings=max(seq, 2048), **spec)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(device)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    yield name, model, tokens
    del model
    common.free_memory(device)


# pytest records every warning by default; transformers warns on each forward, and recording
# those made a CPU step 20x slower (4.5 s instead of 0.21 s). Ignored warnings cost nothing.
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant, model_and_batch, device):
    from lbw_guard import FusedGuardedAdamW

    name, model, tokens = model_and_batch
    benchmark.group = f"end-to-end {name}"
    if variant == "lbw+guard" and (why := common.guard_unavailable()):
        pytest.skip(why)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "torch-fused":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = FusedGuardedAdamW(params, lr=1e-4, weight_decay=0.01,
                                    guard="default" if variant == "lbw+guard" else None)
    cuda = device.type == "cuda"
    ours = variant != "torch-fused"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if ours:
            opt.step(loss=loss.detach())
        else:
            opt.step()

    spy = common.Spy(opt) if ours else None
    plan = common.E2E_GPU_PLAN if cuda else common.E2E_CPU_PLAN
    timing = common.time_steps(benchmark, step, device, plan)
    common.record(
        benchmark, "end-to-end", timing, case=name, dtype="bf16-autocast" if cuda else "fp32",
        variant=variant, backend=getattr(opt, "backend_name", "fused"), batch=tokens.shape[0], seq=tokens.shape[1],
        params_m=sum(p.numel() for p in params) / 1e6, **(spy.guard_fields() if spy else {}),
    )
    opt.zero_grad(set_to_none=True)
    del opt
    common.free_memory(device)
