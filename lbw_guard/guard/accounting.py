"""Bounded memory of what the guard did: an event ring, counters, and per-step accounting.

A long run in sustained trouble raises a few events per step; keeping them all (and saving
them in every checkpoint) grew memory and checkpoints without bound. The ring keeps the last
``capacity`` events; the counters keep the count of every action ever taken; the accounting
keeps running sums for the honest summary (fractions of steps capped, skipped and frozen, and
the mean effective lr scale).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict, dataclass

from .events import INTERVENTIONS, Event


class EventLog:
    """The last ``capacity`` events, plus counts of every action (applied or not)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ring: deque[Event] = deque(maxlen=capacity)
        self.counts: Counter = Counter()
        self.applied_interventions = 0

    def add(self, event: Event) -> None:
        self.ring.append(event)
        self.counts[event.action] += 1
        if event.intervention and event.applied:
            self.applied_interventions += 1

    def __iter__(self):
        return iter(self.ring)

    def __len__(self) -> int:
        return len(self.ring)

    @property
    def dropped(self) -> int:
        """Events no longer in the ring."""
        return sum(self.counts.values()) - len(self.ring)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "events": [asdict(e) for e in self.ring],
                "counts": dict(self.counts), "applied_interventions": self.applied_interventions}

    def load_state_dict(self, state: dict) -> None:
        self.ring = deque((Event.from_dict(e) for e in state["events"]), maxlen=self.capacity)
        self.counts = Counter({str(k): int(v) for k, v in state["counts"].items()})
        self.applied_interventions = int(state["applied_interventions"])


@dataclass
class Accounting:
    """Running per-step sums over processed records."""

    steps: int = 0
    capped_steps: int = 0
    """Steps whose issued lr scale was below 1 in some group (the governor held it down)."""
    skipped_steps: int = 0
    """Steps that changed nothing (every group's applied gate 0)."""
    partly_skipped_steps: int = 0
    """Steps that changed some of the model but not all of what was commanded: gradient elements
    over the bound or non-finite (clamped or not written), or a group skipped for an lr spike."""
    frozen_steps: int = 0
    """Steps with at least one group frozen by the guard."""
    frozen_group_steps: int = 0
    scale_sum: float = 0.0
    """Sum over steps of the element-weighted mean issued scale."""
    rollbacks: int = 0

    def add(self, scale: list[float], gate: list[float], applied: list[float], numel: list[float],
            elements_touched: bool) -> None:
        self.steps += 1
        if any(s < 1.0 - 1e-12 for s in scale):
            self.capped_steps += 1
        if not any(a > 0 for a in applied):
            self.skipped_steps += 1
        elif elements_touched:
            self.partly_skipped_steps += 1
        frozen = sum(1 for g in gate if not g > 0)
        self.frozen_group_steps += frozen
        if frozen:
            self.frozen_steps += 1
        total = sum(n for n in numel if n > 0)
        if total > 0:
            self.scale_sum += sum(s * n for s, n in zip(scale, numel) if n > 0) / total
        else:
            self.scale_sum += sum(scale) / max(len(scale), 1)

    def summary(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "capped_fraction": self.capped_steps / n,
            "skipped_fraction": self.skipped_steps / n,
            "partly_skipped_fraction": self.partly_skipped_steps / n,
            "frozen_fraction": self.frozen_steps / n,
            "mean_scale": self.scale_sum / n if self.steps else 1.0,
            "rollbacks": self.rollbacks,
        }

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


__all__ = ["INTERVENTIONS", "Accounting", "EventLog"]
