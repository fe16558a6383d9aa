"""The torch-only fallback backend (``backend="foreach"``): multi-tensor ``torch._foreach_*``
ops, used where no compiled backend can run (no compiler or ninja, other devices, float64).

It computes what :mod:`lbw_kernels.reference` computes, in the same order of operations as
torch's own foreach AdamW (a few passes over each tensor list, in place), so the fallback
costs about what ``torch.optim.AdamW(foreach=True)`` costs plus the telemetry. Per-element
masking (non-finite gradients, the spike bound) needs ``torch.where``, which has no foreach
form: those steps run per tensor, and only for the tensors that need them.

The per-tensor coefficients are read to the host once per step (free on the CPU; on an
accelerator this fallback synchronises once per step, which the compiled backends never do).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import contract as C
from .reference import write_record

_COEF_KEYS = ("step_size", "bc2_sqrt", "decay", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
              "prev_m", "prev_v", "spike_scale", "clip")


def fused_adamw_foreach(
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
    """Same signature and semantics as :func:`lbw_kernels.reference.fused_adamw_reference`."""
    device = control.device
    f64 = torch.float64
    T = len(params)
    step_ok = C.step_checks(control, loss, found_inf, grad_norm)
    gate, invalid = C.group_gates(control, step_ok)
    gids = torch.tensor(group_ids, dtype=torch.long, device=device)
    kind_t = torch.tensor(kinds, dtype=torch.long, device=device)
    steps_before = torch.stack([s.detach().reshape(()).to(f64) for s in steps]) if T else \
        torch.zeros(0, dtype=f64, device=device)
    if T == 0:
        write_record(record_out, torch.zeros(0, C.NUM_TENSOR_FIELDS, dtype=f64, device=device), gids, kind_t,
                     steps_before, control, gate, invalid, step_ok, loss, grad_norm, accumulate)
        return
    compute = f64 if params[0].dtype == f64 else torch.float32
    coef = _host_coefficients(control, gids, steps_before, gate, grad_norm, compute, tensor_out)
    tensor_gate = gate[gids]
    gated = [x != 0 for x in tensor_gate.tolist()]
    clamp = [x != 0 for x in control[:-1, C.CLAMP][gids].tolist()]
    mask = bool(control[-1, C.MASK_NONFINITE] != 0)
    inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale.to(torch.float32))
    low_precision = params[0].dtype != compute

    g_raw = [g.to(compute) for g in grads] if low_precision else list(grads)
    if inv_scale != 1.0:
        g_raw = torch._foreach_mul(g_raw, _as_compute(inv_scale, compute))
    finite_norm = [math.isfinite(x) for x in _norms(g_raw)]
    finite = [None if ok else torch.isfinite(g) for ok, g in zip(finite_norm, g_raw)]
    g_tel = [g if f is None else torch.where(f, g, torch.zeros_like(g)) for g, f in zip(g_raw, finite)]
    g_used = g_raw if all(c == 1.0 for c in coef["clip"]) else torch._foreach_mul(g_raw, coef["clip"])

    m_old = list(exp_avgs)
    v_old = list(exp_avg_sqs)
    sqrt_v = torch._foreach_sqrt(v_old)
    spikes = [0.0] * T
    g_m = list(g_used)  # what the momentum sees (an outlier at its typical size)
    grown: list = [None] * T  # outliers whose second moment grows by SPIKE_V_GROWTH instead
    if any(math.isfinite(x) for x in coef["spike_scale"]):
        bound = torch._foreach_mul(sqrt_v, coef["spike_scale"])
        for i, (g, b, v) in enumerate(zip(g_used, bound, v_old)):
            hit = (g.abs() > b) & (v > 0)
            if coef["spike_floor"][i] > 0:
                hit &= g.abs() > coef["spike_floor"][i]
            if finite[i] is not None:
                hit &= finite[i]
            spikes[i] = float(hit.sum())
            if clamp[i] and spikes[i]:
                g_m[i] = torch.where(hit, torch.copysign(sqrt_v[i] * coef["prev_v"][i], g), g)
                grown[i] = hit
    # the previous direction and the moments' energy, from the state before the update
    d_prev = torch._foreach_div(torch._foreach_mul(m_old, coef["prev_m"]),
                                torch._foreach_add(torch._foreach_mul(sqrt_v, coef["prev_v"]), coef["eps"]))
    d_tel = [d if f is None else torch.where(f, d, torch.zeros_like(d)) for d, f in zip(d_prev, finite)]
    sums_before = [
        _squares(g_tel), _squares(params), _dots(g_tel, d_tel), _squares(d_prev), _squares(m_old),
        torch.stack(torch._foreach_norm(v_old, 1)).to(f64),
    ]
    p_old = [p.detach().to(compute, copy=True) for p in params]

    written = [i for i in range(T) if gated[i]]
    updated = _update(written, params, p_old, g_m, g_used, grown, exp_avgs, exp_avg_sqs, coef, finite, mask,
                      low_precision)

    p_new = list(p_old)  # u = p' - p in the compute dtype, before rounding to the param dtype
    for j, i in enumerate(written):
        p_new[i] = updated[j]
    u = list(torch._foreach_sub(p_new, p_old))
    for i in range(T):
        if not gated[i]:
            u[i] = torch.zeros_like(u[i])
        elif finite[i] is not None:
            u[i] = torch.where(finite[i], u[i], torch.zeros_like(u[i]))
    g_sq, p_sq, g_dot_d, d_sq, m_sq, v_sum = sums_before
    sums = torch.stack([
        g_sq, _squares(u), p_sq, _dots(g_tel, u), g_dot_d, d_sq, m_sq, v_sum,
        torch.tensor(spikes, dtype=f64, device=device),
        torch.tensor([0.0 if f is None else float((~f).sum()) for f in finite], dtype=f64, device=device),
        torch.tensor([float(p.numel()) for p in params], dtype=f64, device=device),
    ], dim=1)
    write_record(record_out, sums, gids, kind_t, steps_before, control, gate, invalid, step_ok, loss,
                 grad_norm, accumulate)
    tensor_out.copy_(sums)
    torch._foreach_add_(steps, [float(x) for x in tensor_gate.tolist()])


def _update(written, params, p_old, g_m, g_v, grown, exp_avgs, exp_avg_sqs, coef, finite, mask,
            low_precision) -> list[Tensor]:
    """AdamW on the written tensors, in torch's foreach order; elements masked out (non-finite
    gradients while MASK_NONFINITE) keep their exact bits. Returns the new params of the written
    tensors in the compute dtype, before rounding."""
    if not written:
        return []
    masked = {i for i in written if mask and finite[i] is not None}
    saved = {i: (exp_avgs[i].clone(), exp_avg_sqs[i].clone(), params[i].detach().clone()) for i in masked}
    m = [exp_avgs[i] for i in written]
    v = [exp_avg_sqs[i] for i in written]
    # a masked NaN must not reach the arithmetic at all (its element is restored afterwards)
    gm = [torch.where(finite[i], g_m[i], 0.0) if i in masked else g_m[i] for i in written]
    gv = [torch.where(finite[i], g_v[i], 0.0) if i in masked else g_v[i] for i in written]
    pick = lambda key: [coef[key][i] for i in written]  # noqa: E731
    v_before = {i: exp_avg_sqs[i].clone() for i in written if grown[i] is not None}
    torch._foreach_lerp_(m, gm, pick("one_minus_beta1"))
    torch._foreach_mul_(v, pick("beta2"))
    torch._foreach_addcmul_(v, gv, gv, pick("one_minus_beta2"))
    for i, v0 in v_before.items():
        exp_avg_sqs[i].copy_(torch.where(grown[i], v0 * C.SPIKE_V_GROWTH, exp_avg_sqs[i]))
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, pick("bc2_sqrt"))
    torch._foreach_add_(denom, pick("eps"))
    p = [p_old[i].clone() for i in written] if low_precision else [params[i].detach() for i in written]
    torch._foreach_mul_(p, pick("decay"))
    torch._foreach_addcdiv_(p, m, denom, [-s for s in pick("step_size")])
    out = [x.clone() if not low_precision and i in masked else x for i, x in zip(written, p)]
    for j, i in enumerate(written):
        if low_precision:
            params[i].detach().copy_(p[j])
        if i in masked:
            m0, v0, p0 = saved[i]
            keep = ~finite[i]
            exp_avgs[i].copy_(torch.where(keep, m0, exp_avgs[i]))
            exp_avg_sqs[i].copy_(torch.where(keep, v0, exp_avg_sqs[i]))
            params[i].detach().copy_(torch.where(keep, p0, params[i].detach()))
    if not low_precision:  # fp32/fp64 params were updated in place: p aliases them
        out = [o if i in masked else params[i].detach().to(o.dtype, copy=True) for o, i in zip(out, written)]
    return out


def _host_coefficients(control, gids, steps_before, gate, grad_norm, compute, tensor_in) -> dict[str, list[float]]:
    """The contract's per-tensor scalars as host floats, rounded once to the compute dtype
    (``tensor_in``: the sums ``tensor_out`` held on entry, for the spike bound's floor)."""
    coef = C.coefficients(control[:-1][gids], steps_before, gate[gids], control[-1, C.MAX_GRAD_NORM], grad_norm,
                          compute)
    floor = C.spike_floor(coef["spike_scale"], tensor_in.to(coef["spike_scale"].device), compute)
    table = torch.stack([coef[k].to(compute) for k in _COEF_KEYS] + [floor]).tolist()  # one read
    return dict(zip(_COEF_KEYS + ("spike_floor",), table))


def _as_compute(x: float, compute: torch.dtype) -> float:
    return float(torch.tensor(x, dtype=compute))


def _norms(xs: list[Tensor]) -> list[float]:
    return [float(n) for n in torch._foreach_norm(xs, 2)]


def _squares(xs: list[Tensor]) -> Tensor:
    """Sums of squares per tensor, accumulated in the tensors' own precision (telemetry)."""
    return torch.stack(torch._foreach_norm(xs, 2)).to(torch.float64).square()


def _dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]).to(torch.float64)
