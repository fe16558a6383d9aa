"""The fused guarded AdamW step in plain PyTorch: the oracle for every other backend.

It follows :mod:`lbw_kernels.contract` literally, one tensor at a time, so it is slow but
easy to check by eye. It runs on any device and any floating dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contract as C


def fused_adamw_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    coeffs: Tensor,
    group_ids: list[int],
    num_groups: int,
    inv_grad_scale: Tensor,
    clip_coef: Tensor,
) -> Tensor:
    """Update one bucket in place; return telemetry partials of shape [num_groups, 6].

    ``coeffs`` is :func:`lbw_kernels.contract.coefficient_table`'s output, one row per
    tensor. ``inv_grad_scale`` and ``clip_coef`` are fp32 0-d device tensors.
    """
    device = coeffs.device
    out = torch.zeros(num_groups, C.NUM_REDUCED_FIELDS, dtype=torch.float64, device=device)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        c = coeffs[i]
        p32 = p.detach().float()
        g_raw = g.float() * inv_grad_scale
        finite = torch.isfinite(g_raw)
        g_raw = torch.where(finite, g_raw, torch.zeros_like(g_raw))
        g_used = g_raw * clip_coef
        outlier = finite & (g_raw.abs() > c[C.OUTLIER_SCALE] * v.sqrt())

        m_new = m + c[C.ONE_MINUS_BETA1] * (g_used - m)
        v_new = v * c[C.BETA2] + c[C.ONE_MINUS_BETA2] * g_used * g_used
        denom = v_new.sqrt() / c[C.BC2_SQRT] + c[C.EPS]
        p_new = p32 * c[C.DECAY] - c[C.STEP_SIZE] * (m_new / denom)

        written = finite & (c[C.GATE] != 0)
        u = torch.where(written, p_new - p32, torch.zeros_like(p32))

        # Telemetry first: for fp32 params p32 aliases p, which the writes below change.
        gid = group_ids[i]
        out[gid, 0] += (g_raw.double() ** 2).sum()
        out[gid, 1] += (u.double() ** 2).sum()
        out[gid, 2] += (p32.double() ** 2).sum()
        out[gid, 3] += (g_raw.double() * u.double()).sum()
        out[gid, 4] += outlier.sum()
        out[gid, 5] += (~finite).sum()

        with torch.no_grad():
            p.copy_(torch.where(written, p_new, p32).to(p.dtype))
            m.copy_(torch.where(written, m_new, m))
            v.copy_(torch.where(written, v_new, v))
    return out
