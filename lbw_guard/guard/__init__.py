"""The control plane: adaptive statistics, regimes and bounded actions over fused telemetry.

>>> opt = FusedGuardedAdamW(model.parameters(), lr=3e-4, guard="default")
>>> opt.guard.events          # every decision, as Event records
>>> opt = FusedGuardedAdamW(model.parameters(), guard=GuardConfig(min_scale=0.2, trace_path="t.jsonl"))
"""

from .config import PRESETS, GuardConfig, preset
from .controller import REGIMES, Controller, HostRecord
from .events import INTERVENTIONS, Event, JsonlWriter, read_jsonl
from .guard import Guard, make_guard

__all__ = [
    "INTERVENTIONS",
    "PRESETS",
    "REGIMES",
    "Controller",
    "Event",
    "Guard",
    "GuardConfig",
    "HostRecord",
    "JsonlWriter",
    "make_guard",
    "preset",
    "read_jsonl",
]
