"""Learning-rate schedules of the generalization matrix, built from torch's own schedulers.

Every schedule is a ``torch.optim.lr_scheduler`` object stepped once per optimizer step, so each
arm (AdamW, the baselines, the guard) sees the same per-group learning rates, and the guard reads
them from ``param_groups`` the way it would in a user's loop. Per-group base rates (LoRA+'s 16x
B group) are respected: every scheduler scales each group's own initial lr.

- ``constant``: the base lr throughout.
- ``cosine``: linear warm-up over ``warmup_fraction`` of the run, then cosine decay to zero
  (``SequentialLR(LinearLR, CosineAnnealingLR)``).
- ``restarts``: cosine with warm restarts (``CosineAnnealingWarmRestarts``), ``restart_cycles``
  equal cycles in the run, so ``restart_cycles - 1`` restarts back to the full lr.
- ``onecycle``: ``OneCycleLR`` with the base lr as ``max_lr`` (warm-up over ``onecycle_pct`` of
  the run from lr/25, annealing to lr/25e4). Its momentum cycling is off
  (``cycle_momentum=False``): every schedule here changes only the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler as S

SCHEDULES = ("constant", "cosine", "restarts", "onecycle")
LABELS = {
    "constant": "constant",
    "cosine": "warmup + cosine",
    "restarts": "cosine, warm restarts",
    "onecycle": "OneCycle",
}


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    steps: int
    warmup_fraction: float = 0.1
    restart_cycles: int = 4
    onecycle_pct: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose from {SCHEDULES}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps)) if self.steps > 1 else 0

    @property
    def cycle_steps(self) -> int:
        return max(1, self.steps // self.restart_cycles)

    def describe(self) -> str:
        if self.name == "cosine":
            return f"linear warm-up {self.warmup_steps} steps, cosine to 0"
        if self.name == "restarts":
            return f"cosine to 0 in cycles of {self.cycle_steps} steps ({self.restart_cycles} cycles)"
        if self.name == "onecycle":
            return f"OneCycle, peak at {self.onecycle_pct:.0%} of the run"
        return "constant"


def make_scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer) -> S.LRScheduler:
    """The torch scheduler of ``spec`` on ``optimizer`` (whose group lrs are the base rates)."""
    if spec.name == "constant":
        return S.LambdaLR(optimizer, lambda _step: 1.0)
    if spec.name == "cosine":
        warm = spec.warmup_steps
        if warm <= 0 or warm >= spec.steps:
            return S.CosineAnnealingLR(optimizer, T_max=spec.steps, eta_min=0.0)
        return S.SequentialLR(
            optimizer,
            [S.LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm),
             S.CosineAnnealingLR(optimizer, T_max=spec.steps - warm, eta_min=0.0)],
            milestones=[warm],
        )
    if spec.name == "restarts":
        return S.CosineAnnealingWarmRestarts(optimizer, T_0=spec.cycle_steps, T_mult=1, eta_min=0.0)
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    return S.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=max(spec.steps, 2), pct_start=spec.onecycle_pct,
                        cycle_momentum=False, anneal_strategy="cos")


def lr_trace(spec: ScheduleSpec, lr: float = 1.0) -> list[float]:
    """The lr each step would use (for tests and plots)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_scheduler(spec, opt)
    out = []
    for _ in range(spec.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out
