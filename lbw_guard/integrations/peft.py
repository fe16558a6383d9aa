"""Parameter groups for PEFT LoRA models, so the guard can freeze LoRA adapters one by one.

The guard freezes whole parameter groups (a per-group gate of 0, never ``requires_grad``),
so what it can isolate is decided by how the groups are built. With one group for all
LoRA weights, a spike in one adapter can only be answered by scaling or skipping every
adapter; with :func:`lora_param_groups` each adapted module (or each transformer layer)
is its own group:

>>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> opt = FusedGuardedAdamW(lora_param_groups(model, by="layer"), lr=2e-4)
>>> group_names(opt)   # ['layers.0', 'layers.1', ..., 'other']

LoRA+ (Hayou et al., 2024: the B matrices learn ``ratio`` times faster than the A ones) is
one keyword: every group's B matrices get a group of their own at ``lr * lora_plus_ratio``:

>>> opt = FusedGuardedAdamW(lora_param_groups(model, lr=2e-4, lora_plus_ratio=16), lr=2e-4)
>>> group_names(opt)   # ['...q_proj', '...q_proj.lora_B', '...v_proj', '...v_proj.lora_B', ...]

Works on any ``nn.Module``; it only relies on PEFT's parameter names (``lora_A``,
``lora_B``, ``lora_embedding_A/B``, ``lora_magnitude_vector``), not on importing peft.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from torch import nn

from .logging import group_names

_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
_LORA_B = re.compile(r"\.lora_(B|embedding_B)(\.|$)")
_LAYER = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
BY = ("module", "layer", "all")


def _group_key(name: str, by: str) -> str | None:
    """The LoRA group a parameter belongs to, or None for a non-LoRA parameter. With
    ``by="layer"``: the path of its block (``model.layers.0``, ``encoder.block.0``)."""
    match = _LORA.search(name)
    if match is None:
        return None
    module = name[: match.start()]
    if by == "all":
        return "lora"
    for prefix in ("base_model.model.", "base_model."):  # PeftModel's wrapper prefixes
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    if by == "layer":
        layer = _LAYER.search(module)
        return module[: layer.end()].rstrip(".") if layer else module
    return module


def _short_layer_names(keys) -> dict[str, str]:
    """Each block path by its short name (``layers.0``) where no other stack has a block of
    that name; else by its path (an encoder's and a decoder's ``block.0`` stay apart)."""
    short = {}
    for key in keys:
        layer = _LAYER.search(key)
        short[key] = f"{layer.group(1)}.{layer.group(2)}" if layer else key
    uses = Counter(short.values())
    return {key: name if uses[name] == 1 else key for key, name in short.items()}


def lora_param_groups(model: nn.Module, by: str = "module", other: str = "other",
                      lora_plus_ratio: float | None = None, **options) -> list[dict]:
    """Trainable parameters of ``model`` as optimizer param groups.

    Args:
        by: ``"module"`` (one group per adapted module, e.g. ``...layers.0.self_attn.q_proj``),
            ``"layer"`` (one per transformer block) or ``"all"`` (one for every LoRA weight).
        other: name of the group of trainable non-LoRA parameters (``modules_to_save``,
            a classification head); left out when there are none.
        lora_plus_ratio: LoRA+: the B matrices (``lora_B``, ``lora_embedding_B``) of each group
            go to a group of their own, named ``<group>.lora_B``, right after it, with
            ``lr = options["lr"] * lora_plus_ratio`` (the paper's default ratio is 16).
            Needs ``lr``. None: A and B share their group.
        options: hyperparameters for every group (``lr``, ``weight_decay``, ...).

    Each group carries a ``"name"`` key (kept by the optimizer, shown by :func:`group_names`
    and in the guard's log lines). Frozen parameters (``requires_grad=False``) are left out.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if lora_plus_ratio is not None:
        if "lr" not in options:
            raise ValueError("lora_plus_ratio needs lr= (the A matrices' lr; the B ones get lr * ratio)")
        if isinstance(lora_plus_ratio, bool) or not isinstance(lora_plus_ratio, (int, float)) \
                or not math.isfinite(lora_plus_ratio) or lora_plus_ratio <= 0:
            raise ValueError(f"lora_plus_ratio must be a positive number, got {lora_plus_ratio!r}")
    groups: dict[str, list] = {}
    rest = []
    trainable = [(name, p, _group_key(name, by)) for name, p in model.named_parameters() if p.requires_grad]
    names = _short_layer_names({key for _, _, key in trainable if key is not None}) if by == "layer" else {}
    for name, p, key in trainable:
        if key is None:
            rest.append(p)
            continue
        key = names.get(key, key)
        if lora_plus_ratio is not None and _LORA_B.search(name):
            groups.setdefault(key, [])  # the A group comes first even if B is listed first
            key = f"{key}.lora_B"
        groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError("no trainable LoRA parameters found (is this a PEFT LoRA model?)")
    out = []
    for key, ps in groups.items():
        if not ps:
            continue
        group = {"params": ps, "name": key, **options}
        if lora_plus_ratio is not None and key.endswith(".lora_B"):
            group["lr"] = options["lr"] * lora_plus_ratio
        out.append(group)
    if rest:
        out.append({"params": rest, "name": other, **options})
    return out


__all__ = ["BY", "group_names", "lora_param_groups"]
