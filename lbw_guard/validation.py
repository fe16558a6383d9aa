"""Argument checks for FusedGuardedAdamW: every message names the argument and the fix.

Every check here runs before anything is modified, so a refused call leaves the optimizer,
its state and the model exactly as they were.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

# Integer tensor dtypes a loss or grad norm may have (read as a float).
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# The hyperparameters every param group holds (validated before every step).
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")

# torch.optim.AdamW keywords kept in every param group, with the values we support.
UNSUPPORTED_FLAGS = {
    "amsgrad": "amsgrad=True is not supported by FusedGuardedAdamW (use torch.optim.AdamW for AMSGrad)",
    "maximize": "maximize=True is not supported by FusedGuardedAdamW (negate the loss instead)",
    "differentiable": "differentiable=True is not supported: the fused step is not differentiable",
}


def as_float(name: str, value: Any) -> float:
    """A host float from a number or a one-element tensor (a device tensor is read once here,
    at construction or ``add_param_group``, never inside ``step()``)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad; pass {name}.detach()")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.device.type == "meta" or value.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor with a value, got one on {value.device} "
                             f"with layout {value.layout}")
        return float(value.detach().cpu())
    if not _is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (Python and NumPy ints and floats, fractions)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_lr_tensor(name: str, lr: Tensor) -> None:
    """A tensor lr stays a tensor (capturable schedules); only its shape and type are checked."""
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element; {name} has shape {tuple(lr.shape)}")
    if not lr.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {lr.dtype}")
    if lr.requires_grad:
        raise ValueError(f"{name} must not require grad; pass {name}.detach()")
    if lr.device.type == "meta" or lr.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor with a value, got one on {lr.device} "
                         f"with layout {lr.layout}")


def check_hyperparameters(group: dict, where: str, read_device_lr: bool = True, between_steps: bool = False) -> None:
    """Validate lr, betas, eps, weight_decay and the torch flags of one param group.

    ``between_steps``: the values a scheduler left before a step. torch checks that betas are
    both floats or both Tensors only when a group is made, and its OneCycleLR and CyclicLR
    (``cycle_momentum``) then write a float beta1 beside a Tensor beta2, so that pair is fine here."""
    missing = [key for key in HYPERPARAMETERS if key not in group]
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))} entry; every param group needs "
                         f"{', '.join(HYPERPARAMETERS)}")
    # Messages start as torch.optim.AdamW's ("Invalid learning rate: -1", ...), so code matching
    # on those keeps working, and go on to name the group and the rule. Unlike AdamW, an inf or
    # NaN value is refused too (it would turn every parameter NaN).
    lr = group["lr"]
    _check_one_element(where, "lr", lr)
    if isinstance(lr, Tensor) and (lr.device.type != "cpu" and not read_device_lr):
        check_lr_tensor(f"{where} lr", lr)
    else:
        _check_non_negative(where, "lr", lr, "Invalid learning rate")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)):
        try:  # a pair of another kind, as torch takes: a ListConfig (Hydra), a NumPy array, a 1-d tensor
            betas = tuple(betas)
        except TypeError:
            pass
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where} betas must be a pair (beta1, beta2), got {group['betas']!r} "
                         f"({type(group['betas']).__name__}); pass a tuple of two floats such as (0.9, 0.999)")
    if not between_steps and isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"{where} betas must be either both floats or both Tensors, got {betas!r}")
    for i, beta in enumerate(betas):
        _check_one_element(where, f"betas[{i}]", beta)
        b = as_float(f"{where} betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} ({where} betas[{i}] must be in [0, 1))")
    _check_non_negative(where, "eps", group["eps"], "Invalid epsilon value")
    _check_non_negative(where, "weight_decay", group["weight_decay"], "Invalid weight_decay value")
    for flag, message in UNSUPPORTED_FLAGS.items():
        if _flag(where, flag, group.get(flag, False)):
            raise ValueError(f"{where}: {message}")
    if not _flag(where, "decoupled_weight_decay", group.get("decoupled_weight_decay", True)):
        raise ValueError(f"{where}: decoupled_weight_decay=False (Adam's L2 penalty) is not supported; "
                         "FusedGuardedAdamW is AdamW (decoupled weight decay)")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_non_negative(where: str, name: str, given: Any, torch_wording: str) -> None:
    """lr, eps or weight_decay: finite, >= 0, and within float32, the precision the kernels
    take it in (a larger value would become inf there; torch's fused AdamW raises on it)."""
    value = as_float(f"{where} {name}", given)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{torch_wording}: {given} ({where} {name} must be finite and >= 0)")
    if value > _FLOAT32_MAX:
        raise ValueError(f"{where} {name}={value:g} overflows float32, the precision the fused step computes in; "
                         f"pass a value <= {_FLOAT32_MAX:.4g}")


def _check_one_element(where: str, name: str, value: Any) -> None:
    """A tensor hyperparameter has one element (torch.optim.AdamW's wording)."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element; {where} {name} has shape {tuple(value.shape)}")


def _flag(where: str, name: str, value: Any) -> bool:
    """A torch flag's truth value (a bool, None, 0/1 or a one-element tensor)."""
    if value is None:
        return False
    try:
        return bool(value)
    except Exception:  # noqa: BLE001 - e.g. a tensor of several elements, an object without __bool__
        raise TypeError(f"{where} {name} must be a bool, got {type(value).__name__} {value!r}") from None


def check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    norm = as_float("max_grad_norm", value)
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
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{where} params[{i}] has layout {p.layout}; only dense (strided) parameters are supported")
        if p.device.type == "meta":
            raise ValueError(f"{where} params[{i}] is on the meta device; materialise the model "
                             "(e.g. model.to_empty(device=...)) before building the optimizer")
        if id(p) in seen:
            raise ValueError(f"{where} lists params[{i}] more than once; pass each parameter once "
                             "(torch.optim only warns, but a fused step would update it twice)")
        seen.add(id(p))
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(
                f"{where} has parameters on {device} and {p.device}; put each device's "
                "parameters in their own param group"
            )


def check_each_once(param_groups: list[dict]) -> None:
    """No parameter in two places of the groups' lists (``check_params`` checks one group): a
    fused step would update it twice at once, where torch steps it twice in turn."""
    seen: dict[int, tuple[int, int]] = {}
    for gid, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(f"param group {gid} params[{i}] is also param group {seen[id(p)][0]} "
                                 f"params[{seen[id(p)][1]}]; pass each parameter once")
            seen[id(p)] = (gid, i)


def check_grad(p: Tensor, g: Tensor, where) -> None:
    """Called for every gradient before anything is modified, so a refused step changes nothing."""
    if g.is_sparse or g.layout != torch.strided:
        raise ValueError(
            f"{where} has a sparse gradient; FusedGuardedAdamW needs dense gradients "
            "(use torch.optim.SparseAdam for sparse embeddings)"
        )
    if g.shape != p.shape:
        raise ValueError(f"{where}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise ValueError(f"{where}: gradient dtype {g.dtype} != parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"{where}: gradient on {g.device} but parameter on {p.device}")


def check_scalar(name: str, value: Any) -> None:
    """A loss or grad norm: a real number or a one-element real dense tensor with a value.
    Non-finite values are fine: judging them is the guard's job."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (one element), got a tensor of shape {tuple(value.shape)}; "
                "pass loss.mean() or the value you optimise"
            )
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device and has no value; pass the real {name}")
        if value.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor, got layout {value.layout}")
        if not (value.is_floating_point() or value.dtype in INTEGER_DTYPES):
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
    elif not _is_real(value):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    else:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float ({str(value)[:20]}...); pass {name} as a float "
                             "or a floating tensor") from None


def loss_tensor(loss: Any, device: torch.device) -> Tensor:
    """The loss as a 0-d tensor on ``device`` (a host value travels through pinned memory so the
    copy never blocks)."""
    check_scalar("loss", loss)
    if isinstance(loss, Tensor):
        if not loss.is_floating_point():
            loss = loss.double()  # an integer loss: the kernels read a floating one
        if loss.device == device and loss.dim() == 0:
            return loss.detach()
        value = loss.detach().reshape(())
    else:
        value = torch.tensor(float(loss), dtype=torch.float64)
    if device.type == "cuda" and value.device.type == "cpu":
        value = value.pin_memory()
    return value.to(device, non_blocking=True)
