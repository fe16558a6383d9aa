"""The finish kernel of the Triton backend: telemetry, record and step counters, one launch.

``num_tensors + 1`` programs, all independent but for one counter per group:

- program ``t < num_tensors`` sums tensor ``t``'s contiguous partial rows (written by
  :mod:`.triton_update`) in a fixed order into its ``tensor_out`` row, computes the
  per-tensor signals of ``contract.tensor_signals`` (omega, cos, ratio_sq, matrix numel) into
  its scratch row, and advances the tensor's step counter by its group's applied gate (the
  update kernel has read the counter by then: launches run in stream order). It then counts
  itself in on its group's counter (``atomic_add``, acq_rel); the program that arrives
  last sums the group's scratch rows in bucket order (fixed, so deterministic whichever
  program that is), writes (or, with ``accumulate``, adds) the group's record row and resets
  the counter to 0 for the next launch (the counters are allocated once: CUDA-graph safe);
- program ``num_tensors`` writes every group's applied gate and invalid flag, the step-wide
  globals, and zero rows for groups without a tensor in the bucket (unless ``accumulate``).

There is no serial chain over chunks or tensors beyond one group's member rows, which are
summed ``MEMBERS`` at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import contract as C
from .triton_common import (BETA1, BETA2, HAS_GRAD_NORM, HAS_LOSS, NUM_CONTROL, group_gate,
                            isfinite, power, step_ok)
from .triton_update import PARTIAL_COLS, PARTIAL_FIELDS

# Columns of a tensor-table row (int64).
TT_ROW_LO, TT_ROW_HI, TT_GROUP, TT_KIND, TT_STEP, TT_NUMEL, TT_GROUP_SIZE = range(7)
TENSOR_COLS = 8
_TC = tl.constexpr(TENSOR_COLS)
SCRATCH_COLS = 32  # a per-tensor row of the NUM_GROUP_FIELDS group fields, padded

_NT = tl.constexpr(C.NUM_TENSOR_FIELDS)
_NG = tl.constexpr(C.NUM_GROUP_FIELDS)
_NP = tl.constexpr(PARTIAL_FIELDS)
_PC = tl.constexpr(PARTIAL_COLS)
_SC = tl.constexpr(SCRATCH_COLS)
_KIND_OTHER = tl.constexpr(C.KIND_OTHER)
_KIND_MATRIX = tl.constexpr(C.KIND_MATRIX)
_OMEGA_CLAMP = tl.constexpr(C.OMEGA_LOG_CLAMP)
_T_GRAD_SQ = tl.constexpr(C.T_GRAD_SQ)
_T_UPDATE_SQ = tl.constexpr(C.T_UPDATE_SQ)
_T_PARAM_SQ = tl.constexpr(C.T_PARAM_SQ)
_T_GRAD_DOT_PREV = tl.constexpr(C.T_GRAD_DOT_PREV)
_T_PREV_SQ = tl.constexpr(C.T_PREV_SQ)
_T_MOMENT1_SQ = tl.constexpr(C.T_MOMENT1_SQ)
_T_MOMENT2_SUM = tl.constexpr(C.T_MOMENT2_SUM)
_T_NUMEL = tl.constexpr(C.T_NUMEL)
_G_OMEGA_LOG_SUM = tl.constexpr(C.G_OMEGA_LOG_SUM)
_G_OMEGA_COUNT = tl.constexpr(C.G_OMEGA_COUNT)
_G_COS_SUM = tl.constexpr(C.G_COS_SUM)
_G_COS_COUNT = tl.constexpr(C.G_COS_COUNT)
_G_RATIO_SQ_SUM = tl.constexpr(C.G_RATIO_SQ_SUM)
_G_RATIO_COUNT = tl.constexpr(C.G_RATIO_COUNT)
_G_MATRIX_NUMEL = tl.constexpr(C.G_MATRIX_NUMEL)
_R_LOSS = tl.constexpr(C.R_LOSS)
_R_GRAD_NORM = tl.constexpr(C.R_GRAD_NORM)
_R_STEP_OK = tl.constexpr(C.R_STEP_OK)


@triton.jit
def _pick(row, cols, k):
    """Element ``k`` of a row vector (exact: the other terms are zeros)."""
    return tl.sum(tl.where(cols == k, row, 0.0), axis=0)


@triton.jit
def _finish_tensor(pid, tensors, group_offsets, members, partials, scratch, counters, control,
                   tensor_out, record_out, ok, accumulate,
                   ROWS: tl.constexpr, MEMBERS: tl.constexpr):
    row = tensors + pid * _TC
    lo = tl.load(row + 0)
    hi = tl.load(row + 1)
    gid = tl.load(row + 2)
    kind = tl.load(row + 3)
    step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 5).to(tl.float64)
    group_size = tl.load(row + 6)

    # ---- the tensor's sums: its partial rows, ROWS at a time, in a fixed order
    cols = tl.arange(0, _SC)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([_SC], dtype=tl.float64)
    for first in range(lo, hi, ROWS):
        r = first + rows
        x = tl.load(partials + r[:, None] * _PC + cols[None, :],
                    mask=(r < hi)[:, None] & (cols < _NP)[None, :], other=0.0)
        acc += tl.sum(x, axis=0)
    acc = tl.where(cols == _T_NUMEL, numel, acc)

    # ---- contract.tensor_signals (float64)
    crow = control + gid * NUM_CONTROL
    gate, _ = group_gate(crow, ok)
    b1 = tl.load(crow + BETA1)
    b2 = tl.load(crow + BETA2)
    s = tl.load(step_ptr)
    s64 = s.to(tl.float64)
    matrix = kind != _KIND_OTHER  # KIND_MATRIX and KIND_ZERO_INIT: omega, cos, numel
    m_sq = _pick(acc, cols, _T_MOMENT1_SQ)
    v_sum = _pick(acc, cols, _T_MOMENT2_SUM)
    has_history = s64 >= 1.0
    safe_s = tl.where(has_history, s64, 1.0)
    b1s = power(b1, safe_s)
    bc1 = 1.0 - b1s
    bc2 = 1.0 - power(b2, safe_s)
    omega_defined = matrix & has_history & (m_sq > 0.0) & (v_sum > 0.0)
    ratio = (m_sq / (bc1 * bc1)) / tl.where(v_sum > 0.0, v_sum / bc2, 1.0)
    white = (1.0 - b1) * (1.0 + b1s) / ((1.0 + b1) * (1.0 - b1s))
    omega = ratio / white
    log_omega = tl.log(tl.where(omega_defined, omega, 1.0))
    log_omega = tl.where(log_omega < -_OMEGA_CLAMP, -_OMEGA_CLAMP,
                         tl.where(log_omega > _OMEGA_CLAMP, _OMEGA_CLAMP, log_omega))
    log_omega = tl.where(omega_defined, log_omega, 0.0)

    g_sq = _pick(acc, cols, _T_GRAD_SQ)
    d_sq = _pick(acc, cols, _T_PREV_SQ)
    cos_defined = matrix & (g_sq > 0.0) & (d_sq > 0.0)
    denom = tl.sqrt(tl.where(cos_defined, g_sq * d_sq, 1.0))
    cos = tl.where(cos_defined, _pick(acc, cols, _T_GRAD_DOT_PREV) / denom, 0.0)

    p_sq = _pick(acc, cols, _T_PARAM_SQ)
    # The update/param ratio: KIND_MATRIX only (a zero-initialised matrix's is ~1/t).
    ratio_defined = (kind == _KIND_MATRIX) & gate & (p_sq > 0.0) & isfinite(p_sq)
    ratio_sq = tl.where(ratio_defined,
                        _pick(acc, cols, _T_UPDATE_SQ) / tl.where(ratio_defined, p_sq, 1.0), 0.0)

    tl.store(tensor_out + pid * _NT + cols, acc, mask=cols < _NT)
    fields = tl.where(cols == _G_OMEGA_LOG_SUM, log_omega, acc)
    fields = tl.where(cols == _G_OMEGA_COUNT, omega_defined.to(tl.float64), fields)
    fields = tl.where(cols == _G_COS_SUM, cos, fields)
    fields = tl.where(cols == _G_COS_COUNT, cos_defined.to(tl.float64), fields)
    fields = tl.where(cols == _G_RATIO_SQ_SUM, ratio_sq, fields)
    fields = tl.where(cols == _G_RATIO_COUNT, ratio_defined.to(tl.float64), fields)
    fields = tl.where(cols == _G_MATRIX_NUMEL, numel * matrix.to(tl.float64), fields)
    tl.store(scratch + pid * _SC + cols, fields, mask=cols < _NG)
    # The step counter advances by the applied gate (torch's state["step"], fp32).
    tl.store(step_ptr, s + gate.to(tl.float32))

    # ---- the group's last program to arrive writes the group's row
    tl.debug_barrier()  # every thread's scratch stores precede the release below
    arrived = tl.atomic_add(counters + gid, 1, sem="acq_rel")
    if arrived == group_size - 1:
        m_lo = tl.load(group_offsets + gid)
        m_hi = tl.load(group_offsets + gid + 1)
        idx = tl.arange(0, MEMBERS)
        total = tl.zeros([_SC], dtype=tl.float64)
        for first in range(m_lo, m_hi, MEMBERS):  # bucket order: deterministic
            k = first + idx
            in_group = k < m_hi
            t = tl.load(members + k, mask=in_group, other=0)
            x = tl.load(scratch + t[:, None] * _SC + cols[None, :],
                        mask=in_group[:, None] & (cols < _NG)[None, :], other=0.0,
                        cache_modifier=".cg")  # written by other programs: skip L1
            total += tl.sum(x, axis=0)
        out = record_out + gid * _NG + cols
        if accumulate != 0:
            total = tl.load(out, mask=cols < _NG, other=0.0) + total
        tl.store(out, total, mask=cols < _NG)
        tl.atomic_xchg(counters + gid, 0)  # ready for the next launch


@triton.jit
def _finish_globals(group_offsets, control, record_out, loss_ptr, grad_norm_ptr, ok,
                    num_groups, flags, accumulate, GROUPS: tl.constexpr):
    glob = record_out + num_groups * (_NG + 2)
    nan = float("nan")
    loss = tl.where((flags & HAS_LOSS) != 0, tl.load(loss_ptr).to(tl.float64), nan)
    norm = tl.where((flags & HAS_GRAD_NORM) != 0, tl.load(grad_norm_ptr).to(tl.float64), nan)
    tl.store(glob + _R_LOSS, loss)
    tl.store(glob + _R_GRAD_NORM, norm)
    tl.store(glob + _R_STEP_OK, ok.to(tl.float64))
    lanes = tl.arange(0, GROUPS)
    cols = tl.arange(0, _SC)
    # A vector of ``ok`` (the interpreter cannot '&' a scalar int1 with a vector).
    ok_v = (tl.zeros([GROUPS], dtype=tl.float32) + ok.to(tl.float32)) != 0.0
    for first in range(0, num_groups, GROUPS):
        g = first + lanes
        in_range = g < num_groups
        crow = control + tl.where(in_range, g, 0) * NUM_CONTROL
        gate, invalid = group_gate(crow, ok_v)
        tl.store(record_out + num_groups * _NG + g, gate.to(tl.float64), mask=in_range)
        tl.store(record_out + num_groups * (_NG + 1) + g, invalid.to(tl.float64), mask=in_range)
        if accumulate == 0:
            size = (tl.load(group_offsets + g + 1, mask=in_range, other=0)
                    - tl.load(group_offsets + g, mask=in_range, other=0))
            empty = in_range & (size == 0)
            zeros = tl.zeros([GROUPS, _SC], dtype=tl.float64)
            tl.store(record_out + g[:, None] * _NG + cols[None, :], zeros,
                     mask=empty[:, None] & (cols < _NG)[None, :])


@triton.jit(do_not_specialize=["num_tensors", "num_groups", "flags", "accumulate"])
def finish_kernel(tensors, group_offsets, members, partials, scratch, counters, control,
                  tensor_out, record_out, loss_ptr, found_inf_ptr, grad_norm_ptr,
                  num_tensors, num_groups, flags, accumulate,
                  ROWS: tl.constexpr, MEMBERS: tl.constexpr, GROUPS: tl.constexpr):
    pid = tl.program_id(0)
    ok = step_ok(control, num_groups, loss_ptr, found_inf_ptr, grad_norm_ptr, flags)
    if pid < num_tensors:
        _finish_tensor(pid, tensors, group_offsets, members, partials, scratch, counters,
                       control, tensor_out, record_out, ok, accumulate, ROWS, MEMBERS)
    else:
        _finish_globals(group_offsets, control, record_out, loss_ptr, grad_norm_ptr, ok,
                        num_groups, flags, accumulate, GROUPS)


def finish_signature(scalar_dtype: str = "fp32") -> dict[str, str]:
    """Triton signature (name -> type) of :func:`finish_kernel`."""
    return {"tensors": "*i64", "group_offsets": "*i64", "members": "*i64", "partials": "*fp64",
            "scratch": "*fp64", "counters": "*i32", "control": "*fp64", "tensor_out": "*fp64",
            "record_out": "*fp64", "loss_ptr": f"*{scalar_dtype}",
            "found_inf_ptr": f"*{scalar_dtype}", "grad_norm_ptr": f"*{scalar_dtype}",
            "num_tensors": "i32", "num_groups": "i32", "flags": "i32", "accumulate": "i32"}
