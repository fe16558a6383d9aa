"""Backend registry: name -> fused step function, with availability checks.

Every backend has the signature of :func:`lbw_kernels.reference.fused_adamw_reference`.
Compiled backends are imported lazily so that a missing compiler or GPU never breaks
``import lbw_guard``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

BACKEND_NAMES = ("torch", "foreach", "triton", "cpu", "cuda")
# Backends that run any device and dtype: the fallbacks, fastest first.
FALLBACKS = ("foreach", "torch")
# Parameter dtypes the compiled backends have kernels for (float64 runs on the fallbacks).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (no GPU, no compiler, failed build); the message says why."""


@dataclass(frozen=True)
class Backend:
    """A loaded backend: its step and the sum of squares of a list of gradients (pre-pass)."""

    name: str
    step: Callable
    grad_norm_sq: Callable[[list[Tensor]], Tensor]


def torch_grad_norm_sq(grads: list[Tensor]) -> Tensor:
    """Sum of squares of every element as a float64 0-d tensor (NaN/inf propagate)."""
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64 if grads[0].dtype == torch.float64 else torch.float32)
    return torch.stack(norms).double().square().sum()


@lru_cache(maxsize=None)
def auto_order(device_type: str) -> tuple[str, ...]:
    """Backends for ``backend="auto"``, fastest first, as measured by the committed
    benchmarks (``backend_ranking.json``, written by ``benchmarks/rank_backends.py``); the
    fallbacks always close the list."""
    ranking = json.loads((Path(__file__).parent / "backend_ranking.json").read_text())
    entry = ranking.get(device_type)
    order = tuple(entry["order"]) if entry else ()
    return tuple(n for n in order if n not in FALLBACKS) + FALLBACKS


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_backend(name: str, device: torch.device) -> Backend:
    """The backend ``name`` for ``device``, or BackendUnavailable saying why it cannot run."""
    if name == "torch":
        from .reference import fused_adamw_reference

        return Backend(name, fused_adamw_reference, torch_grad_norm_sq)
    if name == "foreach":
        from .foreach_step import fused_adamw_foreach

        return Backend(name, fused_adamw_foreach, torch_grad_norm_sq)
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
            raise BackendUnavailable(
                f"backend='triton' is unavailable ({exc}); install it with "
                "`pip install 'lbw-guard-fused[triton]'`"
            ) from exc
        return Backend(name, fused_adamw_triton, torch_grad_norm_sq)
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise BackendUnavailable(
                f"backend='{name}' runs on {name} tensors, but the parameters are on {device}"
            )
        from . import cpp_step
        from .cpp_backend import load_cpp_module

        load_cpp_module(name)  # builds on first use; BackendUnavailable says why it cannot
        if name == "cpu":
            return Backend(name, cpp_step.cpu_step, cpp_step.cpu_grad_norm_sq)
        return Backend(name, cpp_step.cuda_step, torch_grad_norm_sq)
    raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
