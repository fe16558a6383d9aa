"""Device helpers shared by the Triton kernels (:mod:`.triton_update`, :mod:`.triton_finish`).

Both kernels decode the same control table and device scalars, so they share one copy of the
step-wide checks, the group gates and the float64 power of :mod:`lbw_kernels.contract`: the
update kernel uses them to decide what to write, the finish kernel to record what was applied.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from . import contract as C

# Columns of the control table, as compile-time constants of the kernels.
LR = tl.constexpr(C.LR)
SCALE = tl.constexpr(C.SCALE)
GATE = tl.constexpr(C.GATE)
BETA1 = tl.constexpr(C.BETA1)
BETA2 = tl.constexpr(C.BETA2)
EPS = tl.constexpr(C.EPS)
WEIGHT_DECAY = tl.constexpr(C.WEIGHT_DECAY)
SPIKE_K = tl.constexpr(C.SPIKE_K)
CLAMP = tl.constexpr(C.CLAMP)
LOSS_LIMIT = tl.constexpr(C.LOSS_LIMIT)
CHECK_LOSS = tl.constexpr(C.CHECK_LOSS)
GRAD_NORM_LIMIT = tl.constexpr(C.GRAD_NORM_LIMIT)
MAX_GRAD_NORM = tl.constexpr(C.MAX_GRAD_NORM)
MASK_NONFINITE = tl.constexpr(C.MASK_NONFINITE)
NUM_CONTROL = tl.constexpr(C.NUM_CONTROL)
CLIP_EPS = tl.constexpr(C.CLIP_EPS)
SPIKE_V_GROWTH = tl.constexpr(C.SPIKE_V_GROWTH)

# Bits of the ``flags`` argument: which optional device scalars were given. Absent
# found_inf / grad_scale are replaced by device constants (0 and 1) with the same effect.
HAS_LOSS = tl.constexpr(1)
HAS_GRAD_NORM = tl.constexpr(2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def isfinite(x):
    return tl.abs(x) < float("inf")  # false for NaN and +-inf


@triton.jit
def power(base, exponent):
    """``contract.power`` in float64: exp2(exponent * log2(base)); 0 ** 0 = 1, 0 ** s = 0."""
    positive = tl.exp2(exponent * tl.log2(tl.where(base > 0.0, base, 1.0)))
    zero = tl.where(exponent == 0.0, 1.0, 0.0).to(tl.float64)
    return tl.where(base > 0.0, positive, zero)


@triton.jit
def step_ok(control, num_groups, loss_ptr, found_inf_ptr, grad_norm_ptr, flags):
    """``contract.step_checks``: the step-wide checks pass (scalar int1)."""
    row = control + num_groups * NUM_CONTROL
    ok = tl.load(found_inf_ptr).to(tl.float64) == 0.0
    norm = tl.load(grad_norm_ptr).to(tl.float64)
    norm_ok = isfinite(norm) & (norm <= tl.load(row + GRAD_NORM_LIMIT))
    ok = ok & (norm_ok | ((flags & HAS_GRAD_NORM) == 0))
    loss = tl.load(loss_ptr).to(tl.float64)
    checked = isfinite(loss) & (loss <= tl.load(row + LOSS_LIMIT))
    ok = ok & (checked | (tl.load(row + CHECK_LOSS) == 0.0) | ((flags & HAS_LOSS) == 0))
    return ok


@triton.jit
def group_valid(crow):
    """``contract.group_gates``' validity of a group's coefficients (``crow``: its row)."""
    lr_eff = tl.load(crow + LR) * tl.load(crow + SCALE)
    b1 = tl.load(crow + BETA1)
    b2 = tl.load(crow + BETA2)
    eps = tl.load(crow + EPS)
    wd = tl.load(crow + WEIGHT_DECAY)
    k = tl.load(crow + SPIKE_K)
    valid = isfinite(lr_eff) & (lr_eff >= 0.0)
    valid = valid & isfinite(b1) & isfinite(b2) & isfinite(eps) & isfinite(wd)
    valid = valid & (b1 >= 0.0) & (b1 < 1.0) & (b2 >= 0.0) & (b2 < 1.0)
    valid = valid & (eps >= 0.0) & (wd >= 0.0) & (k == k)
    return valid


@triton.jit
def group_gate(crow, ok):
    """The applied gate of a group (int1) and whether its coefficients were invalid."""
    valid = group_valid(crow)
    gate = (tl.load(crow + GATE) != 0.0) & valid & ok
    return gate, valid == 0


@triton.jit
def round_to(x, P_DTYPE: tl.constexpr):
    """fp32 -> P_DTYPE, round to nearest even like torch's ``.to(dtype)``.

    bf16 is rounded by hand: the interpreter's own fp32 -> bf16 cast truncates, and a NaN
    becomes torch's canonical bf16 NaN (0x7FC0) rather than the hardware's 0x7FFF; it costs
    a few integer ops in a memory-bound kernel.
    """
    if P_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = tl.full(bits.shape, 0x7FC0, tl.uint32)  # torch's canonical bf16 NaN
        out = tl.where(x != x, quiet_nan, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(P_DTYPE)
