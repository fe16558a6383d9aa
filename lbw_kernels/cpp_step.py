"""Python entry points of the compiled C++ backends (contract version 2).

:func:`cpu_step` and :func:`cuda_step` have the signature of
:func:`lbw_kernels.reference.fused_adamw_reference`; each call is one custom op,
``torch.ops.lbw_guard_cpu.fused_step`` or ``torch.ops.lbw_guard_cuda.fused_step``, so a step
shows up as one op in ``torch.profiler`` and can be traced by ``torch.compile`` (the ops declare
what they mutate and have fake kernels). :func:`cpu_grad_norm_sq` is the CPU backend's
deterministic, parallel sum of squares of a list of gradients (the ``max_grad_norm`` pre-pass).

The extension is built (or imported) on first use by :func:`lbw_kernels.cpp_backend.load_cpp_module`;
loading it registers the ops. Failures surface as
:class:`lbw_kernels.backends.BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_OPS: dict[str, object] = {}


@torch.compiler.disable
def _load(kind: str):
    from .cpp_backend import load_cpp_module

    load_cpp_module(kind)  # registers torch.ops.lbw_guard_<kind>
    ns = getattr(torch.ops, f"lbw_guard_{kind}")
    _OPS[kind] = ns
    return ns


def ops(kind: str):
    """``torch.ops.lbw_guard_cpu`` or ``torch.ops.lbw_guard_cuda``, loading the extension first."""
    ns = _OPS.get(kind)
    return ns if ns is not None else _load(kind)


def _int_list(values) -> list[int]:
    if isinstance(values, Tensor):
        return [int(x) for x in values.tolist()]
    return values if isinstance(values, list) else [int(x) for x in values]


def _step(kind: str, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], group_ids: Sequence[int], kinds: Sequence[int],
          control: Tensor, tensor_out: Tensor, record_out: Tensor, *, loss: Tensor | None = None,
          found_inf: Tensor | None = None, grad_scale: Tensor | None = None, grad_norm: Tensor | None = None,
          accumulate: bool = False) -> None:
    if loss is not None and not isinstance(loss, Tensor):
        loss = torch.tensor(float(loss), dtype=torch.float64, device=control.device)
    ops(kind).fused_step.default(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps),
        _int_list(group_ids), _int_list(kinds), control, tensor_out, record_out,
        loss=loss, found_inf=found_inf, grad_scale=grad_scale, grad_norm=grad_norm,
        accumulate=bool(accumulate),
    )


def cpu_step(*args, **kwargs) -> None:
    """One bucket of CPU tensors, in place (signature of
    :func:`lbw_kernels.reference.fused_adamw_reference`)."""
    _step("cpu", *args, **kwargs)


def cuda_step(*args, **kwargs) -> None:
    """One bucket of tensors on one CUDA device, in place, with no host synchronisation
    (signature of :func:`lbw_kernels.reference.fused_adamw_reference`).

    The device tables are cached per bucket layout (data pointers, sizes, groups, kinds, step
    counters); a call whose layout is cached launches two kernels and nothing else, so it can be
    captured in a CUDA graph (warm up once outside the capture, as torch's optimizers need).
    """
    _step("cuda", *args, **kwargs)


def cpu_grad_norm_sq(grads: Sequence[Tensor]) -> Tensor:
    """Sum of squares of every element of ``grads`` (CPU tensors) as a 0-d float64 tensor.

    Parallel and deterministic (fixed chunks summed in order, independent of the thread count
    and the instruction set); NaN and inf propagate. ``sqrt`` of it is the global L2 norm.
    """
    grads = list(grads)
    if not grads:  # the op dispatches on its tensors: with none, there is nothing to sum
        return torch.zeros((), dtype=torch.float64)
    return ops("cpu").grad_norm_sq.default(grads)
