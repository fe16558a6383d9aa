"""PEFT LoRA under the guard: LoRA modules form parameter groups the guard freezes one at a time."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lbw_guard import FusedGuardedAdamW  # noqa: E402
from lbw_guard.guard import GuardConfig  # noqa: E402
from lbw_guard.integrations.peft import group_names, lora_param_groups  # noqa: E402

VOCAB, SEQ = 128, 16


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    # PEFT starts lora_B at zero; give it values so every group has a non-trivial gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    return ids


def test_groups_by_module_layer_and_all():
    model = lora_model()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    by_module = lora_param_groups(model, by="module", lr=1e-3)
    names = [g["name"] for g in by_module]
    assert names == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert all(len(g["params"]) == 2 and g["lr"] == 1e-3 for g in by_module)  # lora_A and lora_B
    assert {id(p) for g in by_module for p in g["params"]} == trainable
    assert [g["name"] for g in lora_param_groups(model, by="layer")] == ["layers.0", "layers.1"]
    assert [g["name"] for g in lora_param_groups(model, by="all")] == ["lora"]
    # A trainable non-LoRA parameter goes to its own group.
    model.base_model.model.lm_head.weight.requires_grad_(True)
    groups = lora_param_groups(model, by="layer")
    assert groups[-1]["name"] == "other" and groups[-1]["params"] == [model.base_model.model.lm_head.weight]
    with pytest.raises(ValueError, match="by must be"):
        lora_param_groups(model, by="head")
    with pytest.raises(ValueError, match="no trainable LoRA"):
        lora_param_groups(torch.nn.Linear(2, 2))


def test_groups_by_layer_keep_an_encoders_and_a_decoders_blocks_apart():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2)
    model = get_peft_model(T5ForConditionalGeneration(config), LoraConfig(r=2, target_modules=["q", "v"]))
    groups = lora_param_groups(model, by="layer", lora_plus_ratio=4.0, lr=1e-3)
    expected = [f"{stack}.block.{i}" for stack in ("encoder", "decoder") for i in range(2)]
    assert [g["name"] for g in groups] == [n + suffix for n in expected for suffix in ("", ".lora_B")]
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:  # each group holds exactly its own block's A (or B) matrices
        stack_block = g["name"].removesuffix(".lora_B")
        kind = ".lora_B." if g["name"].endswith(".lora_B") else ".lora_A."
        expected_names = {n for n, p in model.named_parameters() if f".{stack_block}." in n and kind in n}
        assert {names[id(p)] for p in g["params"]} == expected_names != set()


def test_lora_trains_under_guard_and_a_spiking_adapter_is_frozen_alone():
    model = lora_model()
    config = GuardConfig(warmup_steps=3, spike_warmup=3, max_frozen_fraction=0.5, freeze_steps=4)
    opt = FusedGuardedAdamW(lora_param_groups(model, by="module"), lr=1e-3, backend="torch", guard=config)
    names = group_names(opt)
    hot = names.index("model.layers.1.self_attn.v_proj")
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    spikes = (8, 9)  # the guard freezes a group whose gradients alone spike in two records in a row

    def step(k: int) -> None:
        ids = batch(k)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if k in spikes:  # one adapter's gradient blows up
            for p in opt.param_groups[hot]["params"]:
                p.grad.mul_(1e4)
        opt.step(loss=loss)
        opt.zero_grad()

    for k in range(1, max(spikes) + 2):  # the last spike's record is processed one step later
        step(k)
    freezes = [e for e in opt.guard.events if e.action == "freeze"]
    assert len(freezes) == 1 and freezes[0].detail["groups"] == [hot]
    assert opt.guard.controller.recovery.freeze_until[hot] > opt.num_steps
    assert opt.guard.summary()["frozen_fraction"] == 0.0  # no step has run frozen yet

    before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    step(max(spikes) + 2)
    for gid, group in enumerate(opt.param_groups):
        changed = any(not torch.equal(a, p) for a, p in zip(before[gid], group["params"]))
        assert changed == (gid != hot), names[gid]
    # The frozen base model never moves.
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n


def test_lora_plus_gives_b_matrices_their_own_groups_at_ratio_times_lr():
    model = lora_model()
    groups = lora_param_groups(model, by="module", lr=1e-3, weight_decay=0.0, lora_plus_ratio=16)
    names = [g["name"] for g in groups]
    modules = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert names == [n for m in modules for n in (m, m + ".lora_B")]
    params = dict(model.named_parameters())
    for g in groups:
        (p,) = g["params"]
        name = next(n for n, q in params.items() if q is p)
        is_b = g["name"].endswith(".lora_B")
        assert ("lora_B" in name) == is_b and ("lora_A" in name) == (not is_b)
        assert g["lr"] == (1.6e-2 if is_b else 1e-3) and g["weight_decay"] == 0.0
    groups_all = lora_param_groups(model, by="all", lr=2e-4, lora_plus_ratio=4)
    assert [g["name"] for g in groups_all] == ["lora", "lora.lora_B"]
    with pytest.raises(ValueError, match="needs lr"):
        lora_param_groups(model, lora_plus_ratio=16)
    with pytest.raises(ValueError, match="positive"):
        lora_param_groups(model, lr=1e-3, lora_plus_ratio=0)
    # The optimizer takes the groups: B moves with 16 x the lr of A.
    opt = FusedGuardedAdamW(groups, lr=1e-3, backend="torch", guard=GuardConfig(warmup_steps=3))
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1.6e-2] * 4
