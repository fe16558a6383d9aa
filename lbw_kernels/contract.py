"""The contract shared by every fused AdamW backend.

A backend receives one *bucket* (tensors on one device with one parameter dtype) and
per-tensor coefficients already reduced to fp32 scalars, updates ``params``, ``exp_avgs``
and ``exp_avg_sqs`` in place and returns per-group telemetry. Step counters are advanced
by the caller (see :func:`advance_steps`) before the backend runs, so every backend sees
the same bias corrections.

Per element (all arithmetic in fp32, ``c`` = the element's tensor row of the coefficient
table, ``gate`` = ``c[GATE]``)::

    g_raw    = float(grad) * inv_grad_scale          # GradScaler unscale
    finite   = isfinite(g_raw)
    g        = g_raw * clip_coef                     # fused max_grad_norm
    outlier  = finite and |g_raw| > c[OUTLIER_SCALE] * sqrt(v)      # v before the update
    m'       = m + c[ONE_MINUS_BETA1] * (g - m)                     # torch's lerp_
    v'       = c[BETA2] * v + c[ONE_MINUS_BETA2] * g * g
    denom    = sqrt(v') / c[BC2_SQRT] + c[EPS]
    p'       = (p * c[DECAY]) - c[STEP_SIZE] * (m' / denom)         # decoupled weight decay
    written  = gate != 0 and finite           # otherwise p, m, v are left exactly as they were
    u        = p' - float(p) if written else 0                       # before rounding to p.dtype

Telemetry, per parameter group, in float64 (``TELEMETRY_FIELDS`` order)::

    grad_sq          sum g_raw^2          over finite elements
    update_sq        sum u^2              over written elements
    param_sq         sum float(p)^2       over all elements, p before the step
    grad_dot_update  sum g_raw * u        over written elements
    outliers         count of outlier     over finite elements
    nonfinite        count of not finite
    numel            count of elements

Reductions are deterministic: the same inputs give the same telemetry bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

TELEMETRY_FIELDS = (
    "grad_sq",
    "update_sq",
    "param_sq",
    "grad_dot_update",
    "outliers",
    "nonfinite",
    "numel",
)
NUM_TELEMETRY_FIELDS = len(TELEMETRY_FIELDS)
# Fields a backend reduces itself; ``numel`` is static and filled in by the caller.
NUM_REDUCED_FIELDS = NUM_TELEMETRY_FIELDS - 1

# Columns of the per-tensor coefficient table (float32, shape [num_tensors, NUM_COEFFS]).
STEP_SIZE = 0  # lr_eff / (1 - beta1^step)
BC2_SQRT = 1  # sqrt(1 - beta2^step)
DECAY = 2  # 1 - lr_eff * weight_decay
ONE_MINUS_BETA1 = 3
BETA2 = 4
ONE_MINUS_BETA2 = 5
EPS = 6
OUTLIER_SCALE = 7  # k / sqrt(1 - beta2^(step-1)); +inf on a tensor's first step
GATE = 8  # 1.0: update; 0.0: leave p, m, v untouched
NUM_COEFFS = 9


def advance_steps(steps: list[Tensor], group_ids: list[int], gate: Tensor) -> None:
    """``steps[i] += gate[group_ids[i]]`` on device (a gated tensor keeps its count)."""
    by_group: dict[int, list[Tensor]] = {}
    for step, gid in zip(steps, group_ids):
        by_group.setdefault(gid, []).append(step)
    for gid, group_steps in by_group.items():
        torch._foreach_add_(group_steps, gate[gid].to(group_steps[0].dtype))


def coefficient_table(
    steps: list[Tensor],
    group_ids: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    gate: Tensor,
    outlier_factor: float,
) -> Tensor:
    """Per-tensor fp32 coefficients from already-advanced step counters.

    ``group_ids`` is a long tensor on the device giving each tensor's group.
    ``lr`` .. ``gate`` are per-group float64 device tensors of shape [G] (``lr`` is the
    effective learning rate, scheduler lr times guard scale). Everything is computed on
    device in float64 and rounded once to fp32, as torch's AdamW rounds its Python-double
    scalars, so no host synchronisation is needed and the step is CUDA-graph capturable.
    """
    gid = group_ids
    step = torch.stack([s.reshape(()) for s in steps]).to(torch.float64)
    b1, b2 = beta1[gid], beta2[gid]
    lr_t = lr[gid]
    bc1 = 1.0 - torch.pow(b1, step)
    bc2 = 1.0 - torch.pow(b2, step)
    bc2_prev = 1.0 - torch.pow(b2, step - 1.0)
    outlier_scale = torch.where(
        step > 1.0,
        outlier_factor / torch.sqrt(bc2_prev.clamp_min(1e-300)),
        torch.full_like(step, float("inf")),
    )
    cols = [
        lr_t / bc1,
        torch.sqrt(bc2),
        1.0 - lr_t * weight_decay[gid],
        1.0 - b1,
        b2,
        1.0 - b2,
        eps[gid],
        outlier_scale,
        gate[gid],
    ]
    return torch.stack(cols, dim=1).to(torch.float32)
