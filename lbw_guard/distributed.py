"""torch.distributed support: local shards of DTensor parameters and rank-consistent telemetry.

Under DDP every rank holds the same gradients and parameters after the all-reduce, so the
fused telemetry is already identical on every rank; only the loss (each rank's own
micro-batch) must be averaged. Under FSDP2 (``fully_shard``) each rank holds a shard of
every parameter, so the telemetry partial sums and the gradient pre-pass must be summed over
the shard group. With both, every rank sees the same values and the guard takes the same
decision on the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor moved out of the private namespace in torch 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None
    Shard = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local storage of ``t`` (the tensor itself unless it is a DTensor)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def shard_group(params: list[Tensor]):
    """The process group over which the given parameters are sharded, or None if none is."""
    if DTensor is None:
        return None
    for p in params:
        if isinstance(p, DTensor):
            for mesh_dim, placement in enumerate(p.placements):
                if isinstance(placement, Shard):
                    return p.device_mesh.get_group(mesh_dim)
    return None


def sum_over_group(t: Tensor, group) -> Tensor:
    """All-reduce a small tensor (sum) in place; a no-op without a group."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def mean_over_ranks(t: Tensor) -> Tensor:
    """Average a scalar over all ranks (SUM then divide: gloo has no AVG)."""
    if not is_distributed():
        return t
    t = t.detach().to(torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
