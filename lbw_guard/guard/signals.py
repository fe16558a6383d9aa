"""Signals derived from one telemetry record, on the host (plain floats).

A :class:`HostRecord` is what the guard processes: the flat record the kernel wrote (see
``lbw_kernels.contract.record_layout``), copied to host memory, plus what the host knew when
it issued the step (scheduler lrs, the scale and gate it commanded, whether a loss was given,
the caller's pre-clip grad norm). :func:`derive` turns it into per-group and global signals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lbw_kernels import contract as C


@dataclass
class HostRecord:
    """One step's record on the host, as the controller (and replay) reads it."""

    step: int
    record: list[float]
    """The flat record (contract.record_layout) as floats."""
    num_groups: int
    lrs: list[float]
    scale: list[float]
    """The guard scale issued for this step."""
    gate: list[float]
    """The guard gate issued for this step."""
    has_loss: bool = False
    grad_norm: float | None = None
    """The caller's pre-clip global grad norm (``record_grad_norm``), if any."""
    now: int | None = None
    """The latest optimizer step when the record was processed (rollback distances)."""
    beta1: list[float] | None = None
    """Each group's Adam beta1 at this step (NaN where it is a tensor on a device)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HostRecord":
        return cls(**{k: d[k] for k in _RECORD_KEYS if k in d})


def per_group(name: str, values, num_groups: int) -> list:
    """A saved per-group list, checked to hold one entry per group (state dict loading)."""
    if not isinstance(values, (list, tuple)) or len(values) != num_groups:
        raise ValueError(f"guard state {name!r} must hold {num_groups} per-group values, got {values!r:.80}")
    return list(values)


def regrouped(values: list, sources, fill) -> list:
    """A per-group list for a new group layout: group i takes the old entry ``sources[i]`` (None,
    or an index past the old list: a group without history, ``fill``)."""
    return [values[s] if s is not None and 0 <= s < len(values) else fill for s in sources]


_RECORD_KEYS = ("step", "record", "num_groups", "lrs", "scale", "gate", "has_loss", "grad_norm", "now", "beta1")


@dataclass
class GroupSignals:
    fields: list[float]
    """The group's NUM_GROUP_FIELDS raw fields."""
    applied_gate: float
    invalid: float

    def __getattr__(self, name: str):
        index = _GROUP_INDEX.get(name)
        if index is None:
            raise AttributeError(name)
        return self.fields[index]

    @property
    def grad_norm(self) -> float:
        return _sqrt(self.fields[C.T_GRAD_SQ])

    @property
    def omega(self) -> float | None:
        """Geometric mean over the group's matrices of omega (None without a defined one)."""
        log = self.log_omega
        return math.exp(log) if log is not None else None

    @property
    def log_omega(self) -> float | None:
        n = self.fields[C.G_OMEGA_COUNT]
        if not n > 0 or not math.isfinite(self.fields[C.G_OMEGA_LOG_SUM]):
            return None
        return min(C.OMEGA_LOG_CLAMP, max(-C.OMEGA_LOG_CLAMP, self.fields[C.G_OMEGA_LOG_SUM] / n))

    @property
    def cos(self) -> float | None:
        """Mean over matrices of cos(g_t, d_{t-1}): < 0 means the last step overshot."""
        n = self.fields[C.G_COS_COUNT]
        return self.fields[C.G_COS_SUM] / n if n > 0 else None

    @property
    def update_ratio(self) -> float | None:
        """RMS over matrices of ||u|| / ||theta|| (each matrix on its own)."""
        n = self.fields[C.G_RATIO_COUNT]
        return math.sqrt(max(self.fields[C.G_RATIO_SQ_SUM] / n, 0.0)) if n > 0 else None

    @property
    def spike_fraction(self) -> float:
        numel = self.fields[C.T_NUMEL]
        return self.fields[C.T_SPIKES] / numel if numel > 0 else 0.0

    @property
    def written(self) -> bool:
        return self.applied_gate > 0


_GROUP_INDEX = {name: i for i, name in enumerate(C.GROUP_FIELDS)}


def _sqrt(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.sqrt(x) if x > 0 else 0.0


@dataclass
class StepSignals:
    step: int
    groups: list[GroupSignals]
    loss: float | None
    """The loss the step checked; None when no loss was given (NaN when a NaN was given)."""
    grad_norm: float
    """Global L2 grad norm: the caller's pre-clip norm when recorded, else the telemetry's."""
    telemetry_grad_norm: float
    spike_fraction: float
    nonfinite: float
    param_sq: float
    step_ok: bool
    grad_dot_update: float
    beta1: list[float] = field(default_factory=list)
    """Each group's beta1 (NaN: unknown)."""
    extra: dict = field(default_factory=dict)

    @property
    def params_finite(self) -> bool:
        return math.isfinite(self.param_sq)

    @property
    def usable_grad_norm(self) -> float | None:
        """The grad norm, or None where it says nothing (non-finite, or no gradient)."""
        return self.grad_norm if math.isfinite(self.grad_norm) and self.grad_norm > 0 else None

    @property
    def written_groups(self) -> list[int]:
        return [g for g, gs in enumerate(self.groups) if gs.written]

    def summary(self) -> dict:
        """The signals as a flat dict of floats (for events and traces)."""
        out = {
            "grad_norm": self.grad_norm,
            "loss": self.loss,
            "spike_fraction": self.spike_fraction,
            "nonfinite": self.nonfinite,
            "omega": [gs.omega for gs in self.groups],
            "cos": [gs.cos for gs in self.groups],
            "applied_gate": [gs.applied_gate for gs in self.groups],
        }
        out.update(self.extra)
        return out


def derive(rec: HostRecord) -> StepSignals:
    """Per-group and global signals of one host record."""
    G = rec.num_groups
    layout = C.record_layout(G)
    values = rec.record
    gates = values[layout.applied_gate]
    invalid = values[layout.invalid]
    glob = values[layout.globals]
    groups = []
    for g in range(G):
        start = g * C.NUM_GROUP_FIELDS
        groups.append(GroupSignals(list(values[start:start + C.NUM_GROUP_FIELDS]), gates[g], invalid[g]))
    total = [sum(gs.fields[i] for gs in groups) for i in range(C.NUM_TENSOR_FIELDS)]
    telemetry_norm = _sqrt(total[C.T_GRAD_SQ])
    grad_norm = telemetry_norm
    if rec.grad_norm is not None and not (isinstance(rec.grad_norm, float) and math.isnan(rec.grad_norm)):
        grad_norm = float(rec.grad_norm)
    loss = float(glob[C.R_LOSS]) if rec.has_loss else None
    numel = total[C.T_NUMEL]
    return StepSignals(
        step=rec.step,
        groups=groups,
        loss=loss,
        grad_norm=grad_norm,
        telemetry_grad_norm=telemetry_norm,
        spike_fraction=total[C.T_SPIKES] / numel if numel > 0 else 0.0,
        nonfinite=total[C.T_NONFINITE],
        param_sq=total[C.T_PARAM_SQ],
        step_ok=glob[C.R_STEP_OK] > 0,
        grad_dot_update=total[C.T_GRAD_DOT_UPDATE],
        beta1=[float(b) for b in rec.beta1][:G] if rec.beta1 is not None else [math.nan] * G,
    )
