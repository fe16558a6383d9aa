"""Signals derived from one telemetry record (host floats, TELEMETRY_FIELDS order)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lbw_kernels.contract import TELEMETRY_FIELDS

NUM_FIELDS = len(TELEMETRY_FIELDS)
GRAD_SQ, UPDATE_SQ, PARAM_SQ, GRAD_DOT_UPDATE, OUTLIERS, NONFINITE, NUMEL = range(NUM_FIELDS)


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _sqrt(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.sqrt(x) if x > 0 else 0.0


@dataclass
class GroupSignals:
    grad_norm: float
    update_ratio: float
    """||u|| / ||theta||: the update relative to the parameters."""
    outlier_ratio: float
    nonfinite: float
    param_rms: float
    update_rms: float
    grad_dot_update: float
    numel: float


@dataclass
class StepSignals:
    groups: list[GroupSignals]
    grad_norm: float
    update_ratio: float
    outlier_ratio: float
    nonfinite: float
    param_sq: float
    grad_dot_update: float
    numel: float
    loss: float | None = None
    curvature: float | None = None
    """loss_t+1 - loss_t - g.u: about 0.5 u^T H u along the update (minibatch noise included)."""
    trust_ratio: float | None = None
    """(loss_t+1 - loss_t) / g.u: 1 when the first-order model holds, < 0 when it fails."""
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The signals as a flat dict of floats (for events and traces)."""
        out = {
            "grad_norm": self.grad_norm,
            "update_ratio": self.update_ratio,
            "outlier_ratio": self.outlier_ratio,
            "nonfinite": self.nonfinite,
            "loss": self.loss,
            "curvature": self.curvature,
            "trust_ratio": self.trust_ratio,
        }
        out.update(self.extra)
        return out


def derive(rows: list[list[float]], loss: float | None) -> StepSignals:
    """Per-group and global signals from a [G][7] telemetry table."""
    groups = []
    for r in rows:
        groups.append(
            GroupSignals(
                grad_norm=_sqrt(r[GRAD_SQ]),
                update_ratio=_sqrt(_div(r[UPDATE_SQ], r[PARAM_SQ])) if math.isfinite(r[PARAM_SQ]) else math.inf,
                outlier_ratio=_div(r[OUTLIERS], r[NUMEL]),
                nonfinite=r[NONFINITE],
                param_rms=_sqrt(_div(r[PARAM_SQ], r[NUMEL])),
                update_rms=_sqrt(_div(r[UPDATE_SQ], r[NUMEL])),
                grad_dot_update=r[GRAD_DOT_UPDATE],
                numel=r[NUMEL],
            )
        )
    total = [sum(r[i] for r in rows) for i in range(len(TELEMETRY_FIELDS))]
    param_sq = total[PARAM_SQ]
    return StepSignals(
        groups=groups,
        grad_norm=_sqrt(total[GRAD_SQ]),
        update_ratio=_sqrt(_div(total[UPDATE_SQ], param_sq)) if math.isfinite(param_sq) else math.inf,
        outlier_ratio=_div(total[OUTLIERS], total[NUMEL]),
        nonfinite=total[NONFINITE],
        param_sq=param_sq,
        grad_dot_update=total[GRAD_DOT_UPDATE],
        numel=total[NUMEL],
        loss=loss,
    )
