"""Guard metrics for loggers, Python logging of regime changes, and an optional TensorBoard writer.

The guard itself writes JSONL (``GuardConfig(trace_path=...)`` appends every processed record
and event; ``opt.guard.write_jsonl(path)`` dumps them at the end). This module turns the same
information into what the usual logging stacks consume:

- :func:`guard_metrics`: a flat dict of floats (``guard/scale``, ``guard/regime``, ...), the
  shape the HF Trainer's ``logs`` and ``SummaryWriter.add_scalar`` expect;
- :class:`EventLogger`: forwards new guard events to :mod:`logging` (regime changes and
  interventions), remembering where it stopped so each event is logged once;
- :class:`TensorBoardLogger`: writes the metrics as scalars; TensorBoard is imported only
  when no writer is given, so it stays an optional dependency.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from . import unwrap_optimizer

logger = logging.getLogger("lbw_guard")

# Regimes as numbers, so that scalar loggers (TensorBoard drops strings) can plot them.
REGIME_CODES = {"warmup": 0, "stable": 1, "spiking": 2, "diverging": 3, "recovering": 4}
_TROUBLE = {"spiking", "diverging"}


def group_names(optimizer) -> list[str]:
    """A readable name per parameter group: its ``"name"`` key, else ``"group<i>"``."""
    opt = unwrap_optimizer(optimizer)
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(opt.param_groups)]


def guard_metrics(optimizer, prefix: str = "guard/") -> dict[str, float]:
    """The optimizer's telemetry and guard state as floats.

    Reads the last step's telemetry on the host, which synchronises with the device: call
    it when logging (the Trainer already synchronises there), not on every step.
    """
    opt = unwrap_optimizer(optimizer)
    out: dict[str, float] = {}
    telemetry = getattr(opt, "telemetry", None)
    if telemetry is not None:
        total = telemetry.total().detach().cpu().tolist()
        from lbw_kernels.contract import TELEMETRY_FIELDS

        t = dict(zip(TELEMETRY_FIELDS, total))
        out["grad_norm"] = math.sqrt(max(t["grad_sq"], 0.0)) if math.isfinite(t["grad_sq"]) else t["grad_sq"]
        param = math.sqrt(max(t["param_sq"], 0.0))
        out["update_ratio"] = math.sqrt(max(t["update_sq"], 0.0)) / param if param > 0 else 0.0
        out["outlier_ratio"] = t["outliers"] / t["numel"] if t["numel"] > 0 else 0.0
        out["nonfinite"] = t["nonfinite"]
    guard = getattr(opt, "guard", None)
    if guard is not None:
        scale = guard.scale
        out["scale"] = min(scale) if scale else 1.0
        out["regime"] = float(REGIME_CODES.get(guard.regime, -1))
        applied = guard.interventions
        out["interventions"] = float(len(applied))
        out["skips"] = float(sum(e.action == "skip" for e in applied))
        out["rollbacks"] = float(sum(e.action == "rollback" for e in applied))
        out["freezes"] = float(sum(e.action == "freeze" for e in applied))
        gate = getattr(opt, "applied_gate", None)
        if gate is not None:
            out["gated_groups"] = float((gate.detach().cpu() == 0).sum())
    return {prefix + k: float(v) for k, v in out.items()}


class EventLogger:
    """Logs each new guard event once: regime changes and rollbacks at WARNING when they
    mean trouble, other transitions and interventions at INFO, observations at DEBUG."""

    def __init__(self, optimizer=None, log: logging.Logger | None = None):
        self.optimizer = optimizer
        self.log = log or logger
        self.cursor = 0

    def skip_existing(self) -> None:
        """Start after the events already there (e.g. loaded from a checkpoint)."""
        guard = self._guard()
        self.cursor = len(guard.events) if guard is not None else 0

    def _guard(self):
        if self.optimizer is None:
            return None
        return getattr(unwrap_optimizer(self.optimizer), "guard", None)

    def update(self) -> list:
        """Log the events raised since the last call; returns them."""
        guard = self._guard()
        if guard is None:
            return []
        events = guard.events
        if len(events) < self.cursor:  # the guard's state was replaced (load_state_dict)
            self.cursor = len(events)
        new = events[self.cursor:]
        self.cursor = len(events)
        if not new:  # most steps: no group-name lookup
            return new
        names = group_names(self.optimizer)
        for event in new:
            self.log.log(self._level(event), self._describe(event, names))
        return new

    @staticmethod
    def _level(event) -> int:
        if event.action == "transition":
            return logging.WARNING if event.regime in _TROUBLE else logging.INFO
        if event.action == "rollback":
            return logging.WARNING
        return logging.INFO if event.intervention else logging.DEBUG

    @staticmethod
    def _describe(event, names: list[str]) -> str:
        mode = "" if event.applied else " (monitor: not applied)"
        if event.action == "transition":
            d = event.detail
            return (f"lbw-guard step {event.step}: regime {d.get('from')} -> {d.get('to')}"
                    f" ({d.get('why')}){mode}")
        detail = dict(event.detail)
        groups = detail.get("groups", [detail["group"]] if "group" in detail else None)
        if groups is not None:
            detail["group_names"] = [names[g] if 0 <= g < len(names) else str(g) for g in groups]
        bound = f", bound {event.bound}" if event.bound else ""
        return f"lbw-guard step {event.step}: {event.action} [{event.regime}] {detail}{bound}{mode}"


class TensorBoardLogger:
    """Writes :func:`guard_metrics` as TensorBoard scalars.

    ``writer`` is anything with ``add_scalar(tag, value, step)`` (a ``SummaryWriter``, or a
    test double); without one, ``torch.utils.tensorboard.SummaryWriter(log_dir)`` is built,
    which needs the ``tensorboard`` package.
    """

    def __init__(self, optimizer, log_dir: str | None = None, writer: Any = None, prefix: str = "guard/"):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is optional
                raise ImportError(
                    "TensorBoardLogger needs the 'tensorboard' package (pip install tensorboard), "
                    "or pass writer= any object with add_scalar(tag, value, step)"
                ) from exc
            writer = SummaryWriter(log_dir=log_dir)
        self.optimizer = optimizer
        self.writer = writer
        self.prefix = prefix

    def log(self, step: int | None = None) -> dict[str, float]:
        """Write the current metrics at ``step`` (default: the optimizer's step count)."""
        if step is None:
            step = getattr(unwrap_optimizer(self.optimizer), "num_steps", 0)
        metrics = guard_metrics(self.optimizer, self.prefix)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        return metrics

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if close is not None:
            close()
