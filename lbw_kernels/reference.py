"""The fused guarded AdamW step in plain PyTorch, one tensor at a time: the oracle.

It follows :mod:`lbw_kernels.contract` literally, so it is slow but easy to check by eye. It
runs on any device and any floating dtype (float64 parameters included), and it is what
every other backend is tested against.
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
    steps: list[Tensor],
    group_ids: list[int],
    kinds: list[int],
    control: Tensor,
    tensor_out: Tensor,
    record_out: Tensor,
    *,
    loss: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    grad_norm: Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Update one bucket in place and write its telemetry.

    ``tensor_out`` ([T, NUM_TENSOR_FIELDS] float64) receives the per-tensor sums; what it held
    on entry (the previous step's sums of these tensors, or zeros) floors the spike bound;
    ``record_out`` (the flat record of ``control.shape[0] - 1`` groups) the group fields,
    applied gates, invalid flags and step-wide values. With ``accumulate`` the group fields
    are added to what ``record_out`` holds (a later bucket of the same step).
    """
    device = control.device
    f32 = torch.float32
    step_ok = C.step_checks(control, loss, found_inf, grad_norm)
    gate, invalid = C.group_gates(control, step_ok)
    row = control[-1]
    inv_scale = torch.ones((), dtype=f32, device=device)
    if grad_scale is not None:
        inv_scale = torch.ones((), dtype=f32, device=device) / grad_scale.to(device, f32).reshape(())
    mask_nonfinite = bool(row[C.MASK_NONFINITE] != 0)
    steps_before = torch.stack([s.detach().reshape(()).to(torch.float64) for s in steps]) if steps else \
        torch.zeros(0, dtype=torch.float64, device=device)
    sums = torch.zeros(len(params), C.NUM_TENSOR_FIELDS, dtype=torch.float64, device=device)
    tensor_in = tensor_out.detach().clone()  # the previous step's sums: the spike bound's floor

    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        gid = group_ids[i]
        c = C.coefficients(control[gid], steps[i], gate[gid], row[C.MAX_GRAD_NORM], grad_norm, g.dtype)
        clamp = bool(control[gid, C.CLAMP] != 0)
        compute = torch.float64 if p.dtype == torch.float64 else f32
        c = {k: x.to(compute) for k, x in c.items()}
        p_old = p.detach().to(compute)
        m_old, v_old = m.to(compute), v.to(compute)
        g_raw = g.to(compute) * inv_scale.to(compute)
        finite = torch.isfinite(g_raw)
        g_used = g_raw * c["clip"]
        sqrt_v = v_old.sqrt()
        bound = c["spike_scale"] * sqrt_v
        floor = C.spike_floor(c["spike_scale"].reshape(1), tensor_in[i:i + 1], compute)[0]
        spike = finite & (v_old > 0) & (g_used.abs() > bound) & (g_used.abs() > floor)
        g_m = g_used
        if clamp:
            g_m = torch.where(spike, torch.copysign(sqrt_v * c["prev_v"], g_used), g_used)

        # torch's lerp_, from the nearer end (beta1 = 0 gives m' = g_m exactly); spelled out, not
        # torch.lerp, whose fused multiply-add rounds differently from the kernels
        w = c["one_minus_beta1"]
        m_new = torch.where(w.abs() < 0.5, m_old + w * (g_m - m_old), g_m - (1.0 - w) * (g_m - m_old))
        v_new = v_old * c["beta2"] + c["one_minus_beta2"] * g_used * g_used
        if clamp:
            v_new = torch.where(spike, v_old * C.SPIKE_V_GROWTH, v_new)
        denom = v_new.sqrt() / c["bc2_sqrt"] + c["eps"]
        p_new = p_old * c["decay"] - c["step_size"] * (m_new / denom)
        d_prev = (m_old * c["prev_m"]) / (sqrt_v * c["prev_v"] + c["eps"])

        is_gated = gate[gid] != 0
        written = is_gated & (finite | (not mask_nonfinite))
        zero = torch.zeros_like(p_old)
        g_tel = torch.where(finite, g_raw, zero).double()
        u = torch.where(written & finite, p_new - p_old, zero).double()
        d = torch.where(finite, d_prev, zero).double()
        sums[i, C.T_GRAD_SQ] = (g_tel * g_tel).sum()
        sums[i, C.T_UPDATE_SQ] = (u * u).sum()
        sums[i, C.T_PARAM_SQ] = p_old.double().square().sum()
        sums[i, C.T_GRAD_DOT_UPDATE] = (g_tel * u).sum()
        sums[i, C.T_GRAD_DOT_PREV] = (g_tel * d).sum()
        sums[i, C.T_PREV_SQ] = d_prev.double().square().sum()
        sums[i, C.T_MOMENT1_SQ] = m_old.double().square().sum()
        sums[i, C.T_MOMENT2_SUM] = v_old.double().sum()
        sums[i, C.T_SPIKES] = spike.sum()
        sums[i, C.T_NONFINITE] = (~finite).sum()
        sums[i, C.T_NUMEL] = p.numel()

        with torch.no_grad():  # unwritten elements keep their exact bits (NaN payloads included)
            p.copy_(torch.where(written, p_new.to(p.dtype), p))
            m.copy_(torch.where(written, m_new.to(m.dtype), m))
            v.copy_(torch.where(written, v_new.to(v.dtype), v))

    gids = torch.tensor(group_ids, dtype=torch.long, device=device)
    kind_t = torch.tensor(kinds, dtype=torch.long, device=device)
    write_record(record_out, sums, gids, kind_t, steps_before, control, gate, invalid, step_ok,
                 loss, grad_norm, accumulate)
    tensor_out.copy_(sums)
    for s, gid in zip(steps, group_ids):
        s.add_(gate[gid].to(s.dtype))


def write_record(record_out: Tensor, sums: Tensor, gids: Tensor, kinds: Tensor, steps_before: Tensor,
                 control: Tensor, gate: Tensor, invalid: Tensor, step_ok: Tensor,
                 loss: Tensor | None, grad_norm: Tensor | None, accumulate: bool) -> None:
    """Fill a flat record from per-tensor sums (shared by the reference and the foreach path)."""
    G = control.shape[0] - 1
    layout = C.record_layout(G)
    fields = C.group_fields(sums, gids, kinds, steps_before, control, gate)
    group_view = record_out[layout.group_fields].view(G, C.NUM_GROUP_FIELDS)
    if accumulate:
        group_view.add_(fields)
    else:
        group_view.copy_(fields)
    record_out[layout.applied_gate] = gate
    record_out[layout.invalid] = invalid
    nan = torch.full((), float("nan"), dtype=torch.float64, device=record_out.device)
    glob = record_out[layout.globals]
    glob[C.R_LOSS] = loss.detach().to(record_out.device, torch.float64).reshape(()) if loss is not None else nan
    glob[C.R_GRAD_NORM] = grad_norm.to(record_out.device, torch.float64).reshape(()) if grad_norm is not None else nan
    glob[C.R_STEP_OK] = step_ok.to(torch.float64)
