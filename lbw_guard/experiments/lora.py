"""LoRA fine-tuning under stress, the paper's main setting, through ``peft``.

A base model is first trained briefly with plain AdamW at a safe learning rate and cached on
disk (keyed on everything that determines its weights); each stress run then loads it, attaches
fresh LoRA adapters (initialised from the run's seed) and trains only those.

LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") trains
the B matrices at a higher learning rate than the A matrices: :func:`lora_plus_groups` puts the
``lora_B`` parameters (found by name) in groups of their own with ``lr_factor`` 16.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .arms import parse_arm
from .data import TokenData
from .models import build_model
from .train import RunSettings, train_run

# Attention and MLP projections of Qwen2 and Llama blocks.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ... and of the other architectures' blocks (GPT-2's are Conv1D: weights stored fan-in first).
ARCH_LORA_TARGETS = {
    "qwen2": LORA_TARGETS,
    "llama": LORA_TARGETS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# LoRA+'s ratio of the B matrices' learning rate to the A matrices' (the paper's recommended 16).
LORA_PLUS_RATIO = 16.0
# The base model's own seed and data order: fixed, so every stress seed fine-tunes the same base.
BASE_SEED = 1234


def base_model_key(arch: str, size: str, data_key: str, vocab_size: int, seq_len: int,
                   settings: RunSettings, base_lr: float) -> str:
    fields = [
        "lora-base-v1", arch, size, data_key, vocab_size, seq_len, settings.steps,
        settings.batch_size, base_lr, settings.weight_decay, list(settings.betas), settings.precision,
    ]
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:16]


def base_model_state(
    arch: str,
    size: str,
    data: TokenData,
    data_key: str,
    eval_windows: torch.Tensor,
    settings: RunSettings,
    base_lr: float,
    cache_dir: Path,
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict, dict]:
    """The cached base model's state dict and a summary of its training (trains it if needed)."""
    key = base_model_key(arch, size, data_key, data.vocab_size, data.seq_len, settings, base_lr)
    path = Path(cache_dir) / "lora-base" / f"{arch}-{size}-{key}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["state"], saved["summary"]
    model = build_model(arch, size, data.vocab_size, data.seq_len, BASE_SEED)
    result = train_run(model, parse_arm("adamw"), base_lr, BASE_SEED, data, eval_windows, settings,
                       size=size, mode="base", on_step=on_step)
    if result.diverged:
        raise RuntimeError(f"the LoRA base model diverged at base lr {base_lr:g}; lower --base-lr")
    summary = {"steps": result.steps_run, "lr": base_lr, "heldout_ppl": result.final_ppl,
               "train_seconds": result.train_seconds, "cache_key": key}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": state, "summary": summary}, tmp)
    tmp.replace(path)
    return state, summary


def lora_model(arch: str, size: str, base_state: dict, vocab_size: int, seq_len: int,
               rank: int, alpha: int, seed: int) -> torch.nn.Module:
    """The base model with fresh LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    model = build_model(arch, size, vocab_size, seq_len, seed)
    model.load_state_dict(base_state)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=ARCH_LORA_TARGETS[arch],
                        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_plus_groups(model: torch.nn.Module, groups: list[dict], ratio: float = LORA_PLUS_RATIO) -> list[dict]:
    """``groups`` with each group's ``lora_B`` parameters moved into a group of their own whose
    ``lr_factor`` is ``ratio`` (the trainer multiplies the run's lr by a group's ``lr_factor``)."""
    b_params = {id(p) for name, p in model.named_parameters() if "lora_B" in name}
    out: list[dict] = []
    for g in groups:
        a = [p for p in g["params"] if id(p) not in b_params]
        b = [p for p in g["params"] if id(p) in b_params]
        if a:
            out.append({**g, "params": a})
        if b:
            out.append({**g, "params": b, "name": f"{g.get('name', 'group')}.lora_B",
                        "lr_factor": g.get("lr_factor", 1.0) * ratio})
    if not any("lora_B" in str(g.get("name")) for g in out):
        raise ValueError("LoRA+ found no lora_B parameters to put in their own group")
    return out
