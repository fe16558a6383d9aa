"""Guard metrics for loggers, Python logging of guard events, and an optional TensorBoard writer.

The guard itself writes JSONL (``GuardConfig(trace_path=...)`` appends every processed record
and event; ``opt.guard.write_jsonl(path)`` dumps the kept ones). This module turns the same
information into what the usual logging stacks consume:

- :func:`guard_metrics`: a flat dict of floats, the shape the HF Trainer's ``logs`` and
  ``SummaryWriter.add_scalar`` expect. It reports the guard's honest accounting
  (:meth:`Guard.summary`): the fractions of steps capped, skipped and frozen, the mean
  effective lr scale, rollbacks, interventions and the regime, plus the last step's telemetry;
- :class:`EventLogger`: forwards new guard events to :mod:`logging` (regime changes and
  interventions), each once, even after the guard's bounded event ring wrapped around;
- :class:`TensorBoardLogger`: writes the metrics as scalars; TensorBoard is imported only
  when no writer is given, so it stays an optional dependency.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from lbw_kernels import contract as C

from . import unwrap_optimizer

logger = logging.getLogger("lbw_guard")

# Regimes as numbers, so that scalar loggers (TensorBoard drops strings) can plot them.
REGIME_CODES = {"warmup": 0, "stable": 1, "spiking": 2, "diverging": 3, "recovering": 4}
_TROUBLE = {"spiking", "diverging"}

# Guard.summary() entries reported as they are (fractions of processed steps, counts).
SUMMARY_KEYS = ("capped_fraction", "skipped_fraction", "partly_skipped_fraction", "frozen_fraction",
                "mean_scale", "rollbacks", "interventions", "steps")


def group_names(optimizer) -> list[str]:
    """A readable name per parameter group: its ``"name"`` key, else ``"group<i>"``."""
    opt = unwrap_optimizer(optimizer)
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(opt.param_groups)]


def telemetry_metrics(telemetry) -> dict[str, float]:
    """The last step's telemetry as floats (one host copy of its record: a device sync).

    ``grad_norm`` is the global gradient norm the step saw (unscaled, before the optimizer's
    own ``max_grad_norm``; after any clipping done before ``step()``), ``update_ratio``
    ||update|| / ||param||, ``spike_fraction`` the fraction of gradient elements over the
    guard's per-element bound, ``nonfinite`` the count of NaN/inf gradient elements and
    ``step_skipped`` 1.0 when the step changed nothing.
    """
    G = telemetry.num_groups
    layout = C.record_layout(G)
    host = telemetry.record.detach().double().cpu().tolist()
    fields = [sum(host[g * C.NUM_GROUP_FIELDS + i] for g in range(G)) for i in range(C.NUM_TENSOR_FIELDS)]
    gates = host[layout.applied_gate]
    grad_sq, param_sq = fields[C.T_GRAD_SQ], fields[C.T_PARAM_SQ]
    numel = fields[C.T_NUMEL]
    param = math.sqrt(param_sq) if param_sq > 0 else 0.0
    update = math.sqrt(fields[C.T_UPDATE_SQ]) if fields[C.T_UPDATE_SQ] > 0 else 0.0
    return {
        "grad_norm": math.sqrt(grad_sq) if grad_sq > 0 else (0.0 if grad_sq == 0 else math.nan),
        "update_ratio": update / param if param > 0 else 0.0,
        "spike_fraction": fields[C.T_SPIKES] / numel if numel > 0 else 0.0,
        "nonfinite": fields[C.T_NONFINITE],
        "step_skipped": 0.0 if any(g > 0 for g in gates) else 1.0,
    }


def guard_metrics(optimizer, prefix: str = "guard/") -> dict[str, float]:
    """The optimizer's telemetry and its guard's honest accounting as floats.

    Keys (after ``prefix``): ``regime`` (see :data:`REGIME_CODES`), ``scale`` (the lowest
    group's lr scale issued for the latest step), ``mean_scale`` (the mean effective scale
    over all steps so far), ``capped_fraction`` / ``skipped_fraction`` /
    ``partly_skipped_fraction`` / ``frozen_fraction`` (fractions of the steps the guard has
    processed), ``rollbacks``, ``interventions`` (count of applied interventions), ``steps``
    (records processed), ``actions/<name>`` (count of every action ever taken), and the last
    step's telemetry (:func:`telemetry_metrics`).

    Reading the telemetry synchronises with the device: call it when logging (the Trainer
    already synchronises there), not on every step.
    """
    opt = unwrap_optimizer(optimizer)
    out: dict[str, float] = {}
    telemetry = getattr(opt, "telemetry", None)
    if telemetry is not None:
        out.update(telemetry_metrics(telemetry))
    guard = getattr(opt, "guard", None)
    summary = guard.summary() if guard is not None else {}
    if summary:
        scale = summary.get("scale") or [1.0]
        out["scale"] = min(scale)
        out["regime"] = float(REGIME_CODES.get(summary.get("regime"), -1))
        for key in SUMMARY_KEYS:
            if key in summary:
                out[key] = summary[key]
        for action, count in sorted(summary.get("actions", {}).items()):
            out[f"actions/{action}"] = count
    return {prefix + k: float(v) for k, v in out.items()}


def _event_log(guard):
    controller = getattr(guard, "controller", None)
    return getattr(controller, "events", None)


class EventLogger:
    """Logs each new guard event once: regime changes and rollbacks at WARNING when they
    mean trouble, other transitions and interventions at INFO, observations at DEBUG.

    The guard keeps its last ``event_capacity`` events in a ring and counts every event; the
    logger follows the count, so it still logs each new event once after the ring wrapped
    (events that fell out of the ring between two updates are counted, not logged).
    """

    def __init__(self, optimizer=None, log: logging.Logger | None = None):
        self.optimizer = optimizer
        self.log = log or logger
        self.cursor = 0
        self.missed = 0

    def _guard(self):
        if self.optimizer is None:
            return None
        return getattr(unwrap_optimizer(self.optimizer), "guard", None)

    @staticmethod
    def _total(guard) -> tuple[int, list]:
        log = _event_log(guard)
        if log is None:
            return 0, []
        return sum(log.counts.values()), list(log.ring)

    def skip_existing(self) -> None:
        """Start after the events already there (e.g. loaded from a checkpoint)."""
        guard = self._guard()
        self.cursor = self._total(guard)[0] if guard is not None else 0

    def update(self) -> list:
        """Log the events raised since the last call; returns them."""
        guard = self._guard()
        if guard is None:
            return []
        total, ring = self._total(guard)
        if total < self.cursor:  # the guard's state was replaced (load_state_dict)
            self.cursor = total
        fresh = total - self.cursor
        self.cursor = total
        if fresh <= 0:  # most steps: nothing more to do
            return []
        new = ring[-min(fresh, len(ring)):] if ring else []
        self.missed += fresh - len(new)
        names = group_names(self.optimizer)
        for event in new:
            self.log.log(self._level(event), self._describe(event, names))
        return new

    @staticmethod
    def _level(event) -> int:
        if event.action == "transition":
            return logging.WARNING if event.regime in _TROUBLE else logging.INFO
        if event.action in ("rollback", "give_up", "rollback_failed"):
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
        if isinstance(groups, list):
            detail["group_names"] = [names[g] if isinstance(g, int) and 0 <= g < len(names) else str(g)
                                     for g in groups]
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


__all__ = ["REGIME_CODES", "SUMMARY_KEYS", "EventLogger", "TensorBoardLogger", "group_names", "guard_metrics",
           "telemetry_metrics"]
