"""Argument checks for FusedGuardedAdamW: every message names the argument and the fix."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad; pass {name}.detach()")
        # A host copy of a device scalar only happens here, at construction or
        # add_param_group, never inside step().
        return float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_hyperparameters(group: dict, where: str) -> None:
    """Validate lr, betas, eps and weight_decay of one param group (or the defaults)."""
    lr = _as_float(f"{where} lr", group["lr"])
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"{where} lr must be finite and >= 0, got {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where} betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        b = _as_float(f"{where} betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where} betas[{i}] must be in [0, 1), got {b}")
    eps = _as_float(f"{where} eps", group["eps"])
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"{where} eps must be finite and >= 0, got {eps}")
    wd = _as_float(f"{where} weight_decay", group["weight_decay"])
    if not math.isfinite(wd) or wd < 0.0:
        raise ValueError(f"{where} weight_decay must be finite and >= 0, got {wd}")
    for flag in ("amsgrad", "maximize"):
        if group.get(flag, False):
            raise ValueError(f"{where} {flag}=True is not supported by FusedGuardedAdamW")


def check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    norm = _as_float("max_grad_norm", value)
    if not math.isfinite(norm) or norm <= 0.0:
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or None to disable), got {norm}")
    return norm


def check_params(params: list, where: str) -> None:
    """Parameters of one group: real floating tensors, listed once, on one device."""
    seen: set[int] = set()
    device = None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{where} params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.is_complex():
            raise TypeError(
                f"{where} params[{i}] is complex ({p.dtype}); FusedGuardedAdamW supports real "
                "floating parameters only (optimize torch.view_as_real(p) instead)"
            )
        if not p.is_floating_point():
            raise TypeError(f"{where} params[{i}] has dtype {p.dtype}; only floating parameters can be optimized")
        if id(p) in seen:
            raise ValueError(f"{where} lists params[{i}] more than once; pass each parameter once")
        seen.add(id(p))
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(
                f"{where} has parameters on {device} and {p.device}; put each device's "
                "parameters in their own param group"
            )


def check_grad(p: Tensor, index: int) -> None:
    """Called for every gradient before anything is modified, so a refused step changes nothing."""
    g = p.grad
    if g.is_sparse:
        raise ValueError(
            f"parameter {index} has a sparse gradient; FusedGuardedAdamW needs dense gradients "
            "(use torch.optim.SparseAdam for sparse embeddings)"
        )
    if g.shape != p.shape:
        raise ValueError(f"parameter {index}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise ValueError(f"parameter {index}: gradient dtype {g.dtype} != parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"parameter {index}: gradient on {g.device} but parameter on {p.device}")
