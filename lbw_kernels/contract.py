"""The contract shared by every fused AdamW backend (version 2).

A backend updates one *bucket* (tensors on one device with one parameter dtype) in one pass
over memory and reduces its telemetry. Everything the step depends on is read on the device,
so a step needs no host synchronisation and can be captured in a CUDA graph:

- ``control``: a ``[G + 1, NUM_CONTROL]`` float64 device tensor. Row ``g < G`` holds group
  ``g``'s commanded lr, the guard's scale and gate, betas, eps, weight decay and the spike
  bound; row ``G`` holds the step-wide checks (see the column constants below).
- per tensor: its ``step`` counter (a 0-d float32 device tensor, torch's ``state["step"]``),
  its group and its kind: :data:`KIND_MATRIX` for tensors with two or more dimensions, whose
  signals the guard's step-size governor reads; :data:`KIND_ZERO_INIT` for such a tensor that
  started at zero (LoRA's B): its omega and cos count, but not its update/param ratio, which
  is ~1/t while it grows from zero whatever the lr; :data:`KIND_OTHER` for norms and biases;
- optional device scalars: the loss (any floating 0-d tensor), GradScaler's ``found_inf``
  and ``grad_scale``, and the global gradient norm of the optional pre-pass.

Per tensor (all arithmetic in fp32 unless marked, ``c`` = its group's control row, ``s`` its
step counter *before* the step)::

    ok      = step-wide checks pass (below) and c[GATE] != 0
    lr_eff  = c[LR] * c[SCALE]                                 (fp64)
    valid   = lr_eff finite and >= 0, every coefficient finite  (else: the group is not written)
    gate    = ok and valid                                      -> the group's applied gate
    s'      = s + gate                                          (advanced after the pass)
    step_size = fp32(lr_eff / (1 - beta1^s'))     bc2_sqrt = fp32(sqrt(1 - beta2^s'))
    decay     = fp32(1 - lr_eff * weight_decay)   prev_m   = fp32(1 / (1 - beta1^s)) (0 if s = 0)
    prev_v    = fp32(1 / sqrt(1 - beta2^s)) (1 if s = 0)
    spike_scale = fp32(c[SPIKE_K] * prev_v) if s >= 2 else +inf   # (*)
    rms_in    = sqrt(tensor_out[T_MOMENT2_SUM] / tensor_out[T_NUMEL]) as the call finds them (fp64)
    spike_floor = fp32(spike_scale * fp32(rms_in)) if that is finite and T_NUMEL > 0, else 0
    clip      = min(1, fp32(max_grad_norm) / (fp32(grad_norm) + 1e-6)) when clipping, else 1

Per element::

    g_raw   = float(grad) * inv_grad_scale                      # GradScaler unscale
    finite  = isfinite(g_raw)
    g       = g_raw * clip                                      # fused max_grad_norm
    bound   = spike_scale * sqrt(v)                             # k * sqrt(v_hat), v before the step
    spike   = finite and v > 0 and |g| > bound and |g| > spike_floor  # SPAM-style bound
    clamped = spike and c[CLAMP]
    g_m     = copysign(sqrt(v) * prev_v, g) if clamped else g   # its typical size, sqrt(v_hat)
    m'      = lerp(m, g_m, 1 - beta1)                           # torch's lerp_ (from the nearer end)
    v'      = v * SPIKE_V_GROWTH if clamped else beta2 * v + (1 - beta2) * g * g
    p'      = (p * decay) - step_size * (m' / (sqrt(v') / bc2_sqrt + eps))
    d_prev  = (m * prev_m) / (sqrt(v) * prev_v + eps)           # the previous step's direction
    written = gate and (finite or not MASK_NONFINITE)           # else p, m, v keep their bits
    u       = p' - float(p) if written and finite else 0        # before rounding to p.dtype

``tensor_out`` is read before it is written: a caller that passes the same buffer every step
(the optimizer does, per bucket layout) gives each tensor's bound a floor of k times the
tensor's RMS sqrt(v) of the previous step; a zeroed buffer means no floor. Why a floor: a
tensor that wakes up early in training (GPT-2's attention weights grow 30-100x within a few
steps while attention leaves uniform) sends the gradients of its small-v elements far over
their own bound, and clamping that legitimate growth cost GPT-2 3.7% of its final loss under
warmup + cosine at its best lr. Those elements sit 10-30x below the tensor's RMS sqrt(v); a
x1e3 or larger spike still crosses the floored bound on 65-95% of all elements.

(*) Why no bound before a tensor's third step: after one step v holds a single gradient and
the sums before that step are 0, so the bound would be k times each element's first gradient
with no floor, and every element whose first gradient happened to be tiny would be clamped.
Counted per tensor, this holds at a run's start, after a rollback to it, and for a tensor
stepped for the first time mid-run.

An element over the bound is an outlier: it enters the momentum at its typical size with its
sign (a x1e4 spike becomes an ordinary step, not a kick that the momentum carries for ten
steps), and its second moment grows by SPIKE_V_GROWTH (a gradient that really grew thirtyfold
is accepted within ~70 steps, while a spike raises v by 10%; entering v at the bound instead
multiplied v by up to 16 early in a run, when v_hat is several times v, and stalled training).

``MASK_NONFINITE = 0`` (the guard is off) propagates a NaN/inf gradient element into p, m and
v exactly as ``torch.optim.AdamW`` does; ``1`` (the guard is on) never writes it.

Step-wide checks (row G): the step is skipped on the device (every group's applied gate 0,
nothing written, no step counter advanced) when ``found_inf != 0``; when the pre-pass ran
and the grad norm is not finite or exceeds ``GRAD_NORM_LIMIT``; or when a loss is given,
``CHECK_LOSS`` is 1, and the loss is not finite or exceeds ``LOSS_LIMIT``.

Telemetry, all float64, summation order fixed by each backend (deterministic run to run):

- per tensor, ``TENSOR_FIELDS`` (``tensor_out[T, NUM_TENSOR_FIELDS]``): sums over the
  tensor's elements, computed whether or not the tensor was written;
- per group, ``GROUP_FIELDS``: the per-tensor sums added over the group's tensors, and the
  per-matrix signals aggregated over the group's matrices (the governor reads omega and the
  ratio; the cosine is reported only) (kinds KIND_MATRIX and
  KIND_ZERO_INIT; the ratio over KIND_MATRIX only):

  - ``omega``: Adam's normalised momentum energy against its white-noise level,
    ``omega_t = (sum m_hat^2 / sum v_hat) / w(s)`` with ``w(s) = (1-b1)(1+b1^s) / ((1+b1)(1-b1^s))``,
    the value ``|m_hat|^2 / v_hat`` takes when successive gradients are uncorrelated.
    About 1: gradient noise; above 1: consistent gradients; well below 1: successive
    gradients cancel (the step overshoots and oscillates). Summed as ``ln omega_t`` clamped to
    [-OMEGA_LOG_CLAMP, OMEGA_LOG_CLAMP], over matrices with s >= 1 and both sums > 0.
  - ``cos``: cosine of this step's gradient with the previous step's direction d_prev (the
    normalised hypergradient of the loss w.r.t. the lr: < 0 means the last step overshot),
    over matrices with grad_sq > 0 and prev_sq > 0.
  - ``ratio_sq``: ``update_sq / param_sq`` per matrix (squared update/param ratio), over
    written matrices with param_sq > 0 (a zero-initialised matrix joins once it is not 0).

  Every group field is additive, so buckets, shards of a partitioned optimizer and ranks
  combine by summation.
- ``record`` (flat float64, :func:`record_layout`): ``[G, NUM_GROUP_FIELDS]`` group fields,
  then ``applied_gate[G]``, then ``invalid[G]`` (1: the group's coefficients were not valid
  and it was not written), then the ``GLOBAL_FIELDS`` (the loss as checked, the pre-pass grad
  norm, whether the step-wide checks passed).

The functions below are the oracle of that contract in plain PyTorch, one tensor at a time
where it matters; :mod:`lbw_kernels.reference` and the foreach fallback build on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------- control table
# Columns of a group row.
LR = 0  # the commanded (scheduler's) learning rate
SCALE = 1  # the guard's multiplier of LR, in [min_scale, 1]
GATE = 2  # 1: update the group; 0: leave its params, moments and steps untouched
BETA1 = 3
BETA2 = 4
EPS = 5
WEIGHT_DECAY = 6
SPIKE_K = 7  # k of the per-element bound |g| <= k * sqrt(v_hat); +inf: no bound
CLAMP = 8  # 1: clamp spikes to the bound; 0: only count them
# Columns of the step-wide row (row G).
LOSS_LIMIT = 0  # skip the step when the loss exceeds it (+inf: no limit)
CHECK_LOSS = 1  # 1: a given loss that is not finite (or over the limit) skips the step
GRAD_NORM_LIMIT = 2  # skip when the pre-pass grad norm exceeds it (+inf: no limit)
MAX_GRAD_NORM = 3  # clip to this global norm (0: no clipping)
MASK_NONFINITE = 4  # 1: never write a non-finite gradient element; 0: AdamW's propagation
NUM_CONTROL = 9

CONTROL_DEFAULTS = {SCALE: 1.0, GATE: 1.0, SPIKE_K: math.inf, CLAMP: 0.0}

# --------------------------------------------------------------------------- telemetry
TENSOR_FIELDS = (
    "grad_sq",  # sum g_raw^2 over finite elements (unscaled, before clipping and the bound)
    "update_sq",  # sum u^2 over written finite elements
    "param_sq",  # sum p^2, p before the step
    "grad_dot_update",  # sum g_raw * u: the first-order loss change of this step
    "grad_dot_prev",  # sum g_raw * d_prev over finite elements
    "prev_sq",  # sum d_prev^2
    "moment1_sq",  # sum m^2, m before the step (raw, not bias-corrected)
    "moment2_sum",  # sum v, v before the step (raw)
    "spikes",  # finite elements over the per-element bound (clamped when CLAMP)
    "nonfinite",  # elements whose g_raw is NaN or inf
    "numel",
)
NUM_TENSOR_FIELDS = len(TENSOR_FIELDS)
(T_GRAD_SQ, T_UPDATE_SQ, T_PARAM_SQ, T_GRAD_DOT_UPDATE, T_GRAD_DOT_PREV, T_PREV_SQ,
 T_MOMENT1_SQ, T_MOMENT2_SUM, T_SPIKES, T_NONFINITE, T_NUMEL) = range(NUM_TENSOR_FIELDS)

GROUP_FIELDS = TENSOR_FIELDS + (
    "omega_log_sum",
    "omega_count",
    "cos_sum",
    "cos_count",
    "ratio_sq_sum",
    "ratio_count",
    "matrix_numel",  # elements of the group's matrices (both matrix kinds)
)
NUM_GROUP_FIELDS = len(GROUP_FIELDS)
(G_OMEGA_LOG_SUM, G_OMEGA_COUNT, G_COS_SUM, G_COS_COUNT, G_RATIO_SQ_SUM, G_RATIO_COUNT,
 G_MATRIX_NUMEL) = range(NUM_TENSOR_FIELDS, NUM_GROUP_FIELDS)

GLOBAL_FIELDS = ("loss", "grad_norm", "step_ok")
NUM_GLOBAL_FIELDS = len(GLOBAL_FIELDS)
R_LOSS, R_GRAD_NORM, R_STEP_OK = range(NUM_GLOBAL_FIELDS)

OMEGA_LOG_CLAMP = 10.0
SPIKE_V_GROWTH = 1.1  # an outlier's second moment grows by 10% per step
CLIP_EPS = 1e-6  # clip_grad_norm_'s epsilon: coef = max_norm / (norm + 1e-6)

KIND_OTHER = 0
KIND_MATRIX = 1
KIND_ZERO_INIT = 2


def tensor_kind(p: Tensor, zero: bool = False) -> int:
    """Matrices (and conv kernels) carry the governor's signals; vectors (norms, biases) do not.
    ``zero``: the matrix started at zero (decided once, when the optimizer first sees it)."""
    if p.dim() < 2:
        return KIND_OTHER
    return KIND_ZERO_INIT if zero else KIND_MATRIX


@dataclass(frozen=True)
class RecordLayout:
    """Offsets into the flat float64 record of ``num_groups`` groups."""

    num_groups: int

    @property
    def group_fields(self) -> slice:
        return slice(0, self.num_groups * NUM_GROUP_FIELDS)

    @property
    def applied_gate(self) -> slice:
        start = self.num_groups * NUM_GROUP_FIELDS
        return slice(start, start + self.num_groups)

    @property
    def invalid(self) -> slice:
        start = self.num_groups * (NUM_GROUP_FIELDS + 1)
        return slice(start, start + self.num_groups)

    @property
    def globals(self) -> slice:
        start = self.num_groups * (NUM_GROUP_FIELDS + 2)
        return slice(start, start + NUM_GLOBAL_FIELDS)

    @property
    def size(self) -> int:
        return self.num_groups * (NUM_GROUP_FIELDS + 2) + NUM_GLOBAL_FIELDS


def record_layout(num_groups: int) -> RecordLayout:
    return RecordLayout(int(num_groups))


# --------------------------------------------------------------------------- the oracle
def step_checks(control: Tensor, loss: Tensor | None, found_inf: Tensor | None,
                grad_norm: Tensor | None) -> Tensor:
    """0-d bool device tensor: the step-wide checks pass."""
    row = control[-1]
    ok = torch.ones((), dtype=torch.bool, device=control.device)
    if found_inf is not None:
        ok = ok & (found_inf.to(control.device, torch.float64).reshape(()) == 0)
    if grad_norm is not None:
        norm = grad_norm.to(control.device, torch.float64).reshape(())
        ok = ok & torch.isfinite(norm) & (norm <= row[GRAD_NORM_LIMIT])
    if loss is not None:
        value = loss.detach().to(control.device, torch.float64).reshape(())
        checked = torch.isfinite(value) & (value <= row[LOSS_LIMIT])
        ok = ok & (checked | (row[CHECK_LOSS] == 0))
    return ok


def group_gates(control: Tensor, step_ok: Tensor) -> tuple[Tensor, Tensor]:
    """Per group: the applied gate (float64 0/1) and whether its coefficients were invalid."""
    rows = control[:-1]
    lr_eff = rows[:, LR] * rows[:, SCALE]
    valid = torch.isfinite(lr_eff) & (lr_eff >= 0)
    for col in (BETA1, BETA2, EPS, WEIGHT_DECAY):
        valid = valid & torch.isfinite(rows[:, col])
    valid = valid & (rows[:, BETA1] >= 0) & (rows[:, BETA1] < 1) & (rows[:, BETA2] >= 0) & (rows[:, BETA2] < 1)
    valid = valid & (rows[:, EPS] >= 0) & (rows[:, WEIGHT_DECAY] >= 0) & ~torch.isnan(rows[:, SPIKE_K])
    gate = (rows[:, GATE] != 0) & valid & step_ok
    return gate.to(torch.float64), (~valid).to(torch.float64)


def coefficients(rows: Tensor, step: Tensor, applied: Tensor, max_grad_norm: Tensor,
                 grad_norm: Tensor | None, grad_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The contract's per-tensor scalars in float64, for one control row ``[NUM_CONTROL]`` and
    its tensor's step, or batched (``rows [T, NUM_CONTROL]``, ``step`` and ``applied`` [T]).

    Backends round each once to fp32 (float64 parameters keep float64, as torch's AdamW keeps
    its Python doubles).
    """
    f64 = torch.float64
    s = step.to(f64).reshape(rows.shape[:-1])
    s_new = s + applied.to(f64).reshape(s.shape)
    b1, b2 = rows[..., BETA1], rows[..., BETA2]
    lr_eff = rows[..., LR] * rows[..., SCALE]
    first = s < 1
    one = torch.ones_like(s)
    bc1_prev = 1.0 - power(b1, s)
    bc2_prev = 1.0 - power(b2, s)
    prev_v = torch.where(first, one, 1.0 / torch.sqrt(torch.where(first, one, bc2_prev)))
    s_pos = torch.clamp(s_new, min=1.0)
    coef = {
        "step_size": lr_eff / (1.0 - power(b1, s_pos)),
        "bc2_sqrt": torch.sqrt(1.0 - power(b2, s_pos)),
        "decay": 1.0 - lr_eff * rows[..., WEIGHT_DECAY],
        "one_minus_beta1": 1.0 - b1,
        "beta2": b2,
        "one_minus_beta2": 1.0 - b2,
        "eps": rows[..., EPS],
        "prev_m": torch.where(first, torch.zeros_like(s), 1.0 / torch.where(first, one, bc1_prev)),
        "prev_v": prev_v,
        "spike_scale": torch.where(s < 2, torch.full_like(s, math.inf), rows[..., SPIKE_K] * prev_v),
        "clip": clip_coefficient(max_grad_norm, grad_norm, rows.device, grad_dtype).expand(s.shape),
    }
    return coef


def spike_floor(spike_scale: Tensor, tensor_in: Tensor, compute: torch.dtype) -> Tensor:
    """Per tensor: the floor of the spike bound (``contract`` above) from the sums ``tensor_out``
    held when the call began (``tensor_in [T, NUM_TENSOR_FIELDS]``); ``spike_scale`` [T] in the
    compute dtype."""
    numel = tensor_in[:, T_NUMEL]
    rms = torch.sqrt(tensor_in[:, T_MOMENT2_SUM] / torch.where(numel > 0, numel, torch.ones_like(numel)))
    floor = spike_scale.to(compute) * rms.to(compute)
    return torch.where(torch.isfinite(floor) & (numel > 0), floor, torch.zeros_like(floor))


def power(base: Tensor, exponent: Tensor) -> Tensor:
    """base ** exponent in float64 as every backend computes it: exp2(exponent * log2(base)),
    with 0 ** 0 = 1 and 0 ** s = 0 (beta = 0)."""
    base = base.to(torch.float64)
    exponent = exponent.to(torch.float64)
    positive = torch.exp2(exponent * torch.log2(torch.where(base > 0, base, torch.ones_like(base))))
    zero = torch.where(exponent == 0, torch.ones_like(base), torch.zeros_like(base))
    return torch.where(base > 0, positive, zero)


def clip_coefficient(max_grad_norm: Tensor, grad_norm: Tensor | None, device,
                     grad_dtype: torch.dtype = torch.float32) -> Tensor:
    """``clip_grad_norm_``'s coefficient, min(1, max_norm / (norm + 1e-6)), computed in the
    gradients' precision as torch computes it (fp32, or fp64 for fp64 gradients), returned as
    float64; 1 when off."""
    dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    one = torch.ones((), dtype=torch.float64, device=device)
    if grad_norm is None:
        return one
    max_norm = max_grad_norm.to(dtype)
    norm = grad_norm.to(device, dtype).reshape(())
    coef = torch.clamp(max_norm / (norm + torch.tensor(CLIP_EPS, dtype=dtype, device=device)), max=1.0)
    return torch.where(max_norm > 0, coef, torch.ones((), dtype=dtype, device=device)).to(torch.float64)


def white_noise_level(beta1: Tensor, step: Tensor) -> Tensor:
    """``|m_hat|^2 / v_hat`` for uncorrelated gradients after ``step`` updates (float64)."""
    b1s = power(beta1, step)
    return (1.0 - beta1) * (1.0 + b1s) / ((1.0 + beta1) * (1.0 - b1s))


def tensor_signals(sums: Tensor, kinds: Tensor, steps: Tensor, beta1: Tensor, beta2: Tensor,
                   written: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per tensor: (value, defined) of ln(omega) (clamped), cos and the squared ratio.

    ``sums`` is ``[T, NUM_TENSOR_FIELDS]`` float64; ``kinds``, ``steps`` (before the step),
    ``beta1``, ``beta2`` and ``written`` (0/1) are per tensor.
    """
    f64 = torch.float64
    s = steps.to(f64)
    matrix = kinds != KIND_OTHER
    m_sq, v_sum = sums[:, T_MOMENT1_SQ], sums[:, T_MOMENT2_SUM]
    has_history = s >= 1
    safe_s = torch.where(has_history, s, torch.ones_like(s))
    bc1 = 1.0 - power(beta1, safe_s)
    bc2 = 1.0 - power(beta2, safe_s)
    omega_defined = matrix & has_history & (m_sq > 0) & (v_sum > 0)
    ratio = (m_sq / bc1.square()) / torch.where(v_sum > 0, v_sum / bc2, torch.ones_like(v_sum))
    omega = ratio / white_noise_level(beta1, safe_s)
    log_omega = torch.log(torch.where(omega_defined, omega, torch.ones_like(omega)))
    log_omega = log_omega.clamp(-OMEGA_LOG_CLAMP, OMEGA_LOG_CLAMP)

    g_sq, d_sq = sums[:, T_GRAD_SQ], sums[:, T_PREV_SQ]
    cos_defined = matrix & (g_sq > 0) & (d_sq > 0)
    denom = torch.sqrt(torch.where(cos_defined, g_sq * d_sq, torch.ones_like(g_sq)))
    cos = torch.where(cos_defined, sums[:, T_GRAD_DOT_PREV] / denom, torch.zeros_like(g_sq))

    p_sq = sums[:, T_PARAM_SQ]
    ratio_defined = (kinds == KIND_MATRIX) & (written > 0) & (p_sq > 0) & torch.isfinite(p_sq)
    ratio_sq = torch.where(ratio_defined, sums[:, T_UPDATE_SQ] / torch.where(ratio_defined, p_sq, torch.ones_like(p_sq)),
                           torch.zeros_like(p_sq))
    return {"omega": (torch.where(omega_defined, log_omega, torch.zeros_like(log_omega)), omega_defined),
            "cos": (cos, cos_defined), "ratio_sq": (ratio_sq, ratio_defined)}


def group_fields(sums: Tensor, group_ids: Tensor, kinds: Tensor, steps: Tensor, control: Tensor,
                 applied_gate: Tensor) -> Tensor:
    """``[G, NUM_GROUP_FIELDS]`` float64 from per-tensor sums (the finish of every backend).

    ``steps`` are the counters before the step; ``applied_gate`` is per group.
    """
    G = control.shape[0] - 1
    if sums.shape[0] == 0:  # a rank whose share of a partitioned optimizer has no gradient
        return torch.zeros(G, NUM_GROUP_FIELDS, dtype=torch.float64, device=sums.device)
    gid = group_ids.to(sums.device, torch.long)
    beta1 = control[:-1, BETA1][gid]
    beta2 = control[:-1, BETA2][gid]
    written = applied_gate[gid]
    sig = tensor_signals(sums, kinds.to(sums.device), steps.to(sums.device), beta1, beta2, written)
    matrix = (kinds.to(sums.device) != KIND_OTHER).to(torch.float64)
    extra = torch.stack([
        sig["omega"][0], sig["omega"][1].to(torch.float64),
        sig["cos"][0], sig["cos"][1].to(torch.float64),
        sig["ratio_sq"][0], sig["ratio_sq"][1].to(torch.float64),
        sums[:, T_NUMEL] * matrix,
    ], dim=1)
    per_tensor = torch.cat([sums, extra], dim=1)
    out = torch.zeros(G, NUM_GROUP_FIELDS, dtype=torch.float64, device=sums.device)
    # Tensors in their given order, one after the other: the order every backend sums in.
    for t in range(per_tensor.shape[0]):
        out[int(gid[t])] += per_tensor[t]
    return out
