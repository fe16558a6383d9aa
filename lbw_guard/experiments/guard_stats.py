"""What the guard did during one run, from its own accounting (``opt.guard.summary()``).

The guard's ``summary()`` is the honest account: the fractions of steps it capped (lr scale held
below 1), skipped, partly skipped (gradient elements clamped or dropped) and froze, the mean
effective lr scale, rollbacks, every action's count and the regime. It covers the records the
guard has processed, which lag the steps by ``GuardConfig.lag`` (1): the last step of a run is
not in it. Besides it, the recorder keeps the issued LR-scale history per step (host floats the
controller already holds, for the timeline plot) and the applied interventions from the event log.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GuardStats:
    skipped_steps: int = 0  # steps whose every group was gated off (guard or device-side check)
    rollbacks: int = 0
    frozen_group_steps: int = 0  # (group, step) pairs gated off (frozen) by the guard
    frozen_steps: int = 0  # steps with at least one group frozen
    interventions: int = 0  # applied events that change training (skip, scale cuts, rollback, ...)
    actions: dict[str, int] = field(default_factory=dict)
    regimes: dict[str, int] = field(default_factory=dict)
    # (step, min LR scale over groups), only where it changes; starts at (0, 1.0)
    lr_scale_history: list[tuple[int, float]] = field(default_factory=list)
    min_lr_scale: float = 1.0
    mean_lr_scale: float = 1.0  # the guard's element-weighted mean effective scale (summary()["mean_scale"])
    intervention_steps: list[tuple[int, str]] = field(default_factory=list)
    final_regime: str = ""
    # summary() fractions of the processed steps
    steps_accounted: int = 0
    capped_fraction: float = 0.0
    skipped_fraction: float = 0.0
    partly_skipped_fraction: float = 0.0
    frozen_fraction: float = 0.0
    gave_up: int = 0  # GuardGaveUp raised and handed to the run's hook (the guard then restarted; train.py)

    def to_json(self) -> dict:
        return asdict(self)


class GuardRecorder:
    """Call :meth:`after_step` after every optimizer step, then :meth:`finish`."""

    def __init__(self, optimizer: Any, steps: int) -> None:
        self.optimizer = optimizer
        self.guard = getattr(optimizer, "guard", None)
        self.scale_min: list[float] = []

    def after_step(self, step_index: int) -> None:
        scale = self.guard.scale if self.guard is not None else []  # already a copy
        self.scale_min.append(min(scale) if scale else 1.0)

    def finish(self, steps_run: int) -> GuardStats:
        summary = self.guard.summary() if self.guard is not None else {}
        events = self.guard.events if self.guard is not None else []
        applied = self.guard.interventions if self.guard is not None else []  # monitor: none applied
        n = int(summary.get("steps", 0))
        # (group, step) pairs frozen: not in summary(), which counts steps with any group frozen
        accounting = getattr(getattr(self.guard, "controller", None), "accounting", None)
        actions = summary.get("actions") or dict(Counter(e.action for e in events))
        stats = GuardStats(
            skipped_steps=round(summary.get("skipped_fraction", 0.0) * n),
            rollbacks=int(summary.get("rollbacks", 0)),
            frozen_group_steps=int(getattr(accounting, "frozen_group_steps", 0)),
            frozen_steps=round(summary.get("frozen_fraction", 0.0) * n),
            actions={str(k): int(v) for k, v in actions.items()},
            regimes=dict(Counter(e.regime for e in events)),
            intervention_steps=[(int(e.step), e.action) for e in applied],
            final_regime=str(summary.get("regime", getattr(self.guard, "regime", ""))),
            steps_accounted=n,
            capped_fraction=float(summary.get("capped_fraction", 0.0)),
            skipped_fraction=float(summary.get("skipped_fraction", 0.0)),
            partly_skipped_fraction=float(summary.get("partly_skipped_fraction", 0.0)),
            frozen_fraction=float(summary.get("frozen_fraction", 0.0)),
            mean_lr_scale=float(summary.get("mean_scale", 1.0)),
        )
        interventions = summary.get("interventions")
        stats.interventions = int(interventions) if interventions is not None else len(stats.intervention_steps)
        history = [(0, 1.0)]
        for i, s in enumerate(self.scale_min[:steps_run]):
            if not math.isclose(s, history[-1][1], rel_tol=1e-9, abs_tol=1e-12):
                history.append((i + 1, s))
        stats.lr_scale_history = history
        stats.min_lr_scale = min(s for _, s in history)
        return stats
