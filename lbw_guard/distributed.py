"""torch.distributed support: local shards of DTensor parameters and rank-consistent telemetry.

Under DDP every rank holds the same gradients and parameters after the all-reduce, so the
fused telemetry is already identical on every rank; only the loss (each rank's own
micro-batch) must be averaged. Under FSDP2 (``fully_shard``) each rank holds a shard of
every parameter, so the per-tensor telemetry and the gradient pre-pass are summed over the
shard group. A partitioned optimizer (``ZeroRedundancyOptimizer``) gives each rank different
parameters: its ``telemetry_group`` sums the group telemetry over the ranks. With each of
these, every rank sees the same values and the guard takes the same decision on the same step.
"""

from __future__ import annotations

import zlib

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


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


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


def group_device(group) -> torch.device:
    """Where ``group`` communicates: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_group(t: Tensor, group) -> Tensor:
    """All-reduce a small tensor (sum) in place; a no-op without a group."""
    if group is not None and is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def mean_over_ranks(t: Tensor, group=None) -> Tensor:
    """Average a scalar over the ranks of ``group`` (all ranks by default); SUM then divide,
    since gloo has no AVG."""
    if not is_distributed():
        return t
    t = t.detach().to(torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t / dist.get_world_size(group)


def check_replicated(params: list[Tensor], telemetry_group, settings: str = "") -> None:
    """Refuse, with the fix, an optimizer whose ranks hold different parameters without a
    ``telemetry_group``: each rank's guard would then judge only its own part and the ranks
    would decide differently; or whose ranks were built with different ``settings`` (the
    hyperparameters and the guard's config, as text): their steps and decisions would part.
    Runs once, at the first step (one small all-gather)."""
    if not is_distributed() or telemetry_group is not None or any(is_sharded(p) for p in params):
        return
    device = params[0].device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return
    shapes = hash(tuple(tuple(p.shape) for p in params)) % (2**31)
    mine = torch.tensor([len(params), sum(p.numel() for p in params), shapes, zlib.crc32(settings.encode())],
                        dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(mine[3:], other[3:]) for other in every):
        raise ValueError(
            "FusedGuardedAdamW: the ranks were built with different settings (lr, betas, eps, weight_decay, "
            "max_grad_norm or the GuardConfig), so their parameters and the guard's decisions would part. "
            f"Build the optimizer alike on every rank; this rank's: {settings[:300]}"
        )
    if any(not torch.equal(mine[:3], other[:3]) for other in every):
        raise ValueError(
            "FusedGuardedAdamW: the ranks hold different parameters (a partitioned optimizer such as "
            "ZeroRedundancyOptimizer), so each rank's guard would see only its own part and the ranks "
            "would decide differently. Pass telemetry_group=<the process group the parameters are "
            "partitioned over> (e.g. torch.distributed.group.WORLD), or guard=None."
        )
