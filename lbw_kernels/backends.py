"""Backend registry: name -> fused step function, with availability checks.

Every backend has the signature of :func:`lbw_kernels.reference.fused_adamw_reference`.
Compiled backends are imported lazily so that a missing compiler or GPU never breaks
``import lbw_guard``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (no GPU, no compiler, failed build); the message says why."""


@lru_cache(maxsize=None)
def auto_order(device_type: str) -> tuple[str, ...]:
    """Backends for ``backend="auto"``, fastest first, as measured by the committed
    benchmarks (``backend_ranking.json``, written by ``benchmarks/rank_backends.py``)."""
    ranking = json.loads((Path(__file__).parent / "backend_ranking.json").read_text())
    entry = ranking.get(device_type)
    return tuple(entry["order"]) if entry else ("torch",)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_backend(name: str, device: torch.device) -> Callable:
    """Return the step function of backend ``name`` for ``device`` or raise BackendUnavailable."""
    if name == "torch":
        from .reference import fused_adamw_reference

        return fused_adamw_reference
    if name == "triton":
        if device.type == "cpu" and not _triton_interpreting():
            raise BackendUnavailable(
                "backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before "
                "importing triton, to run the kernel slowly on the CPU)"
            )
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailable(f"backend='triton' does not support device {device}")
        try:
            from .triton_adamw import fused_adamw_triton
        except ImportError as exc:  # triton missing or too old
            raise BackendUnavailable(f"backend='triton' is unavailable: {exc}") from exc
        return fused_adamw_triton
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise BackendUnavailable(
                f"backend='{name}' runs on {name} tensors, but the parameters are on {device}"
            )
        from .cpp_backend import load_cpp_backend

        return load_cpp_backend(name)
    raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
