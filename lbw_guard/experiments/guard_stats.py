"""What the guard did during one run: counters, LR-scale history and interventions.

Per-step facts are recorded as the run goes: the gate each step really applied (a device
tensor, copied into a device log so a GPU loop never waits) and the LR scale the guard issued
(host floats the controller already holds). Rollbacks and interventions come from the guard's
event log.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

@dataclass
class GuardStats:
    skipped_steps: int = 0  # steps whose every group was gated off (guard or device-side check)
    rollbacks: int = 0
    frozen_group_steps: int = 0  # (group, step) pairs gated off on steps that were not skipped
    interventions: int = 0  # applied events that change training (skip, scale cuts, rollback, ...)
    actions: dict[str, int] = field(default_factory=dict)
    regimes: dict[str, int] = field(default_factory=dict)
    # (step, min LR scale over groups), only where it changes; starts at (0, 1.0)
    lr_scale_history: list[tuple[int, float]] = field(default_factory=list)
    min_lr_scale: float = 1.0
    mean_lr_scale: float = 1.0  # mean over steps of the mean over groups
    intervention_steps: list[tuple[int, str]] = field(default_factory=list)
    final_regime: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class GuardRecorder:
    """Call :meth:`after_step` after every optimizer step, then :meth:`finish`."""

    def __init__(self, optimizer: Any, steps: int) -> None:
        self.optimizer = optimizer
        self.guard = getattr(optimizer, "guard", None)
        groups = len(optimizer.param_groups)
        device = optimizer.param_groups[0]["params"][0].device
        self.gates = torch.ones(steps, groups, dtype=torch.float64, device=device)
        self.scale_min: list[float] = []
        self.scale_mean: list[float] = []

    def after_step(self, step_index: int) -> None:
        gate = getattr(self.optimizer, "applied_gate", None)
        if gate is not None:
            self.gates[step_index].copy_(gate.detach().reshape(-1), non_blocking=True)
        scale = self.guard.scale if self.guard is not None else []  # already a copy
        self.scale_min.append(min(scale) if scale else 1.0)
        self.scale_mean.append(sum(scale) / len(scale) if scale else 1.0)

    def finish(self, steps_run: int) -> GuardStats:
        gates = self.gates[:steps_run].cpu()
        off = gates == 0
        skipped = off.all(dim=1)
        events = self.guard.events if self.guard is not None else []
        applied = self.guard.interventions if self.guard is not None else []  # monitor: none applied
        stats = GuardStats(
            skipped_steps=int(skipped.sum()),
            frozen_group_steps=int(off[~skipped].sum()),
            rollbacks=sum(e.action == "rollback" for e in applied),
            actions=dict(Counter(e.action for e in events)),
            regimes=dict(Counter(e.regime for e in events)),
            intervention_steps=[(int(e.step), e.action) for e in applied],
            final_regime=str(getattr(self.guard, "regime", "")),
        )
        stats.interventions = len(stats.intervention_steps)
        history = [(0, 1.0)]
        for i, s in enumerate(self.scale_min[:steps_run]):
            if not math.isclose(s, history[-1][1], rel_tol=1e-9, abs_tol=1e-12):
                history.append((i + 1, s))
        stats.lr_scale_history = history
        stats.min_lr_scale = min(s for _, s in history)
        means = self.scale_mean[:steps_run]
        stats.mean_lr_scale = sum(means) / len(means) if means else 1.0
        return stats
