"""The control plane: detectors, a step-size governor and recovery over fused telemetry.

>>> opt = FusedGuardedAdamW(model.parameters(), lr=3e-4, guard="default")
>>> opt.guard.summary()       # fractions of steps capped, skipped, frozen; mean lr scale
>>> opt.guard.events          # the most recent decisions, as Event records
>>> opt.guard.watch_buffers(model)  # BatchNorm statistics go with skips and rollbacks
>>> opt = FusedGuardedAdamW(model.parameters(), guard=GuardConfig(min_scale=0.2, trace_path="t.jsonl"))
"""

from .config import PRESETS, GuardConfig, preset
from .controller import REGIMES, Controller
from .events import INTERVENTIONS, Event, JsonlWriter, read_jsonl
from .guard import Guard, make_guard
from .recovery import GuardGaveUp
from .signals import HostRecord

__all__ = [
    "INTERVENTIONS",
    "PRESETS",
    "REGIMES",
    "Controller",
    "Event",
    "Guard",
    "GuardConfig",
    "GuardGaveUp",
    "HostRecord",
    "JsonlWriter",
    "make_guard",
    "preset",
    "read_jsonl",
]
