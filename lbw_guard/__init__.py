"""lbw-guard: a fused AdamW with training telemetry and a bounded training guard.

>>> opt = lbw_guard.FusedGuardedAdamW(model.parameters(), lr=3e-4)          # guarded
>>> opt = lbw_guard.FusedGuardedAdamW(model.parameters(), lr=3e-4, guard=None)  # AdamW alone
"""

from lbw_kernels.contract import GROUP_FIELDS, TENSOR_FIELDS

from .control import GuardCommand, StepRecord
from .optimizer import FusedGuardedAdamW
from .telemetry import Telemetry

__version__ = "0.2.0"

__all__ = [
    "GROUP_FIELDS",
    "TENSOR_FIELDS",
    "FusedGuardedAdamW",
    "GuardCommand",
    "StepRecord",
    "Telemetry",
    "__version__",
]


def __getattr__(name):
    # The control plane is imported on first use so that `import lbw_guard` stays light.
    if name in ("Guard", "GuardConfig", "GuardGaveUp", "make_guard"):
        from . import guard

        return getattr(guard, name)
    raise AttributeError(f"module 'lbw_guard' has no attribute {name!r}")
