"""The update kernel of the Triton backend: one pass over p, g, m, v (contract v2, per element).

One program per *chunk*: a run of whole ``BLOCK``-element tiles of one tensor (the tensor's
last chunk ends with a partial tile). A program

1. loads its row of the chunk table (data pointers already offset to the chunk's first
   element, the chunk's length, the tensor's step-counter pointer and group id: independent
   loads of one 64-byte row, no second table lookup);
2. derives the step-wide checks, its group's applied gate and every coefficient of the
   contract in float64 from the control table and the device scalars (``contract.power``'s
   exp2/log2 formulation), rounding each once to fp32;
3. updates its full tiles without bounds masks (16-byte vector accesses with ``ALIGNED``),
   then the partial tile, if any, with masks; the telemetry is accumulated per lane in fp32
   vectors (no cross-thread reduction per tile);
4. reduces the lanes once, in float64, into its row of ``partials`` (``PARTIAL_FIELDS``).

Arithmetic follows :func:`lbw_kernels.reference.fused_adamw_reference` operation by
operation; IEEE ``sqrt_rn``/``div_rn`` and no FMA contraction (``enable_fp_fusion=False`` at
launch) make p, m and v bit-identical to it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import contract as C
from .triton_common import (BETA1, BETA2, CLAMP, CLIP_EPS, EPS, HAS_GRAD_NORM, LR,
                            MASK_NONFINITE, MAX_GRAD_NORM, NUM_CONTROL, SCALE, SPIKE_K, SPIKE_V_GROWTH,
                            WEIGHT_DECAY, group_gate, isfinite, power, round_to, step_ok)

# Columns of a chunk-table row (int64).
CHUNK_P, CHUNK_G, CHUNK_M, CHUNK_V, CHUNK_NUMEL, CHUNK_STEP, CHUNK_GROUP, CHUNK_TENSOR = range(8)
CHUNK_COLS = 8
# Fields of a partial row (float64), in contract.TENSOR_FIELDS order up to ``nonfinite``.
PARTIAL_FIELDS = 10
PARTIAL_COLS = 16  # row stride: 128-byte rows
_PC = tl.constexpr(PARTIAL_COLS)
_CC = tl.constexpr(CHUNK_COLS)
_NT = tl.constexpr(C.NUM_TENSOR_FIELDS)
_CHUNK_TENSOR = tl.constexpr(CHUNK_TENSOR)
_T_MOMENT2_SUM = tl.constexpr(C.T_MOMENT2_SUM)
_T_NUMEL = tl.constexpr(C.T_NUMEL)


@triton.jit
def _tile(p_ptrs, g_ptrs, m_ptrs, v_ptrs, inb, gate_v, clamp_v, keep_nonfinite_v,
          inv_scale, clip, spike_scale, spike_floor, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
          decay, step_size, prev_m, prev_v,
          a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf,
          P_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Update one tile and add its telemetry to the per-lane accumulators."""
    if MASKED:
        p = tl.load(p_ptrs, mask=inb, other=0.0)
        g = tl.load(g_ptrs, mask=inb, other=0.0)
        m = tl.load(m_ptrs, mask=inb, other=0.0)
        v = tl.load(v_ptrs, mask=inb, other=0.0)
    else:
        p = tl.load(p_ptrs)
        g = tl.load(g_ptrs)
        m = tl.load(m_ptrs)
        v = tl.load(v_ptrs)

    p32 = p.to(tl.float32)
    g_raw = g.to(tl.float32) * inv_scale
    finite = isfinite(g_raw)
    if MASKED:
        nonfinite = inb & (finite == 0)
        finite = finite & inb
    else:
        nonfinite = finite == 0
    g_used = g_raw * clip
    sqrt_v = tl.sqrt_rn(v)
    bound = spike_scale * sqrt_v
    spike = finite & (v > 0.0) & (tl.abs(g_used) > bound) & (tl.abs(g_used) > spike_floor)
    # An outlier enters m at its typical size sqrt(v_hat) with its sign (copysign on the bits);
    # its v grows by SPIKE_V_GROWTH, so the bound still follows a gradient that really grew.
    clamped = spike & clamp_v
    typical = sqrt_v * prev_v
    signed = ((typical.to(tl.uint32, bitcast=True) & 0x7FFFFFFF)
              | (g_used.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)
    g_m = tl.where(clamped, signed, g_used)

    # torch's lerp_, from the nearer end: beta1 = 0 gives m' = g_m exactly
    m_new = tl.where(tl.abs(one_minus_beta1) < 0.5, m + one_minus_beta1 * (g_m - m),
                     g_m - (1.0 - one_minus_beta1) * (g_m - m))
    v_new = tl.where(clamped, v * SPIKE_V_GROWTH, v * beta2 + one_minus_beta2 * g_used * g_used)
    denom = tl.div_rn(tl.sqrt_rn(v_new), bc2_sqrt) + eps
    p_new = p32 * decay - step_size * tl.div_rn(m_new, denom)
    d_prev = tl.div_rn(m * prev_m, sqrt_v * prev_v + eps)

    written = gate_v & (finite | keep_nonfinite_v)
    u = tl.where(written & finite, p_new - p32, 0.0)
    g_tel = tl.where(finite, g_raw, 0.0)
    d_tel = tl.where(finite, d_prev, 0.0)
    if MASKED:
        d_prev = tl.where(inb, d_prev, 0.0)
        store_mask = inb & gate_v
    else:
        store_mask = gate_v
    # Unwritten elements get their loaded bits back (a select, no arithmetic); a group whose
    # gate is 0 stores nothing (the mask is uniform, so stores stay vectorised).
    tl.store(p_ptrs, tl.where(written, round_to(p_new, P_DTYPE), p), mask=store_mask)
    tl.store(m_ptrs, tl.where(written, m_new, m), mask=store_mask)
    tl.store(v_ptrs, tl.where(written, v_new, v), mask=store_mask)

    a_gsq += g_tel * g_tel
    a_usq += u * u
    a_psq += p32 * p32
    a_gdu += g_tel * u
    a_gdp += g_tel * d_tel
    a_dsq += d_prev * d_prev
    a_msq += m * m
    a_vsum += v
    a_spk += spike.to(tl.int32)
    a_nf += nonfinite.to(tl.int32)
    return a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf


@triton.jit(do_not_specialize=["num_groups", "flags"])
def update_kernel(chunks, control, tensor_out, partials, loss_ptr, found_inf_ptr, grad_scale_ptr,
                  grad_norm_ptr, num_groups, flags,
                  P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = chunks + pid * _CC
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4).to(tl.int32)  # a chunk holds fewer than 2**31 elements
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    gid = tl.load(row + 6)
    if ALIGNED:
        # The host checked that every chunk's pointers are 16-byte aligned (chunks start at
        # multiples of BLOCK): 16-byte vector loads and stores.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)

    # ---- scalars: contract.step_checks, group_gates and coefficients, in float64
    crow = control + gid * NUM_CONTROL
    srow = control + num_groups * NUM_CONTROL
    ok = step_ok(control, num_groups, loss_ptr, found_inf_ptr, grad_norm_ptr, flags)
    gate, _ = group_gate(crow, ok)
    lr_eff = tl.load(crow + LR) * tl.load(crow + SCALE)
    b1 = tl.load(crow + BETA1)
    b2 = tl.load(crow + BETA2)
    s = tl.load(step_ptr).to(tl.float64)
    s_new = tl.maximum(s + gate.to(tl.float64), 1.0)
    first = s < 1.0
    step_size = (lr_eff / (1.0 - power(b1, s_new))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - power(b2, s_new)).to(tl.float32)
    decay = (1.0 - lr_eff * tl.load(crow + WEIGHT_DECAY)).to(tl.float32)
    one_minus_beta1 = (1.0 - b1).to(tl.float32)
    beta2 = b2.to(tl.float32)
    one_minus_beta2 = (1.0 - b2).to(tl.float32)
    eps = tl.load(crow + EPS).to(tl.float32)
    bc1_prev = tl.where(first, 1.0, 1.0 - power(b1, s))
    bc2_prev = tl.where(first, 1.0, 1.0 - power(b2, s))
    prev_m = tl.where(first, 0.0, 1.0 / bc1_prev).to(tl.float32)
    prev_v64 = tl.where(first, 1.0, 1.0 / tl.sqrt(bc2_prev))
    prev_v = prev_v64.to(tl.float32)
    spike_scale = tl.where(s < 2.0, float("inf"), tl.load(crow + SPIKE_K) * prev_v64).to(tl.float32)
    # The bound's floor from the previous step's sums, which tensor_out still holds (the finish
    # kernel, launched after this one, overwrites them).
    t_row = tensor_out + tl.load(row + _CHUNK_TENSOR) * _NT
    numel_in = tl.load(t_row + _T_NUMEL)
    rms_in = tl.sqrt(tl.load(t_row + _T_MOMENT2_SUM) / tl.where(numel_in > 0.0, numel_in, 1.0))  # fp64: IEEE
    spike_floor = spike_scale * rms_in.to(tl.float32)
    spike_floor = tl.where(isfinite(spike_floor) & (numel_in > 0.0), spike_floor, 0.0)
    # clip_grad_norm_'s coefficient in fp32 (contract.clip_coefficient); 1 without a norm.
    max_norm = tl.load(srow + MAX_GRAD_NORM).to(tl.float32)
    norm = tl.load(grad_norm_ptr).to(tl.float32)
    coef = tl.div_rn(max_norm, norm + CLIP_EPS)
    coef = tl.where(coef > 1.0, 1.0, coef)  # clamp(max=1) keeps a NaN
    use_clip = (max_norm > 0.0) & ((flags & HAS_GRAD_NORM) != 0)
    clip = tl.where(use_clip, coef, 1.0)
    inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32), tl.load(grad_scale_ptr).to(tl.float32))
    clamp = tl.load(crow + CLAMP) != 0.0
    keep_nonfinite = tl.load(srow + MASK_NONFINITE) == 0.0

    # Per-lane flags as vectors (uniform: they keep masked stores vectorisable).
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    gate_v = (zero + gate.to(tl.float32)) != 0.0
    clamp_v = (zero + clamp.to(tl.float32)) != 0.0
    keep_nonfinite_v = (zero + keep_nonfinite.to(tl.float32)) != 0.0
    a_gsq = zero
    a_usq = zero
    a_psq = zero
    a_gdu = zero
    a_gdp = zero
    a_dsq = zero
    a_msq = zero
    a_vsum = zero
    a_spk = tl.zeros([BLOCK], dtype=tl.int32)
    a_nf = tl.zeros([BLOCK], dtype=tl.int32)

    full = n // BLOCK
    for i in range(0, full):  # full tiles: no bounds mask (``inb`` is unused: gate_v fills in)
        offs = i * BLOCK + lanes
        (a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf) = _tile(
            p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, gate_v, gate_v, clamp_v,
            keep_nonfinite_v, inv_scale, clip, spike_scale, spike_floor, one_minus_beta1, beta2,
            one_minus_beta2, bc2_sqrt, eps, decay, step_size, prev_m, prev_v,
            a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf,
            P_DTYPE, False)
    if full * BLOCK < n:
        offs = full * BLOCK + lanes
        inb = offs < n
        (a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf) = _tile(
            p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, inb, gate_v, clamp_v,
            keep_nonfinite_v, inv_scale, clip, spike_scale, spike_floor, one_minus_beta1, beta2,
            one_minus_beta2, bc2_sqrt, eps, decay, step_size, prev_m, prev_v,
            a_gsq, a_usq, a_psq, a_gdu, a_gdp, a_dsq, a_msq, a_vsum, a_spk, a_nf,
            P_DTYPE, True)

    # One float64 reduction of the lanes per chunk.
    out = partials + pid * _PC
    tl.store(out + 0, tl.sum(a_gsq.to(tl.float64), axis=0))
    tl.store(out + 1, tl.sum(a_usq.to(tl.float64), axis=0))
    tl.store(out + 2, tl.sum(a_psq.to(tl.float64), axis=0))
    tl.store(out + 3, tl.sum(a_gdu.to(tl.float64), axis=0))
    tl.store(out + 4, tl.sum(a_gdp.to(tl.float64), axis=0))
    tl.store(out + 5, tl.sum(a_dsq.to(tl.float64), axis=0))
    tl.store(out + 6, tl.sum(a_msq.to(tl.float64), axis=0))
    tl.store(out + 7, tl.sum(a_vsum.to(tl.float64), axis=0))
    tl.store(out + 8, tl.sum(a_spk, axis=0).to(tl.float64))
    tl.store(out + 9, tl.sum(a_nf, axis=0).to(tl.float64))


# Constexpr and launch options per compiled variant; shared with compile_check.
def update_signature(p_dtype: str, scalar_dtype: str = "fp32") -> dict[str, str]:
    """Triton signature (name -> type) of :func:`update_kernel` for a param dtype."""
    return {"chunks": "*i64", "control": "*fp64", "tensor_out": "*fp64", "partials": "*fp64",
            "loss_ptr": f"*{scalar_dtype}", "found_inf_ptr": f"*{scalar_dtype}",
            "grad_scale_ptr": f"*{scalar_dtype}", "grad_norm_ptr": f"*{scalar_dtype}",
            "num_groups": "i32", "flags": "i32"}
