"""DDP (or FSDP2 with --fsdp, or ZeRO with --zero) under the guard, on CPU with gloo or on GPUs with nccl.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_ddp.py --steps 10

Each rank trains on its own slice of every global batch. The optimizer averages the loss
over ranks, (FSDP2) sums the telemetry over the shards and (ZeroRedundancyOptimizer, whose
ranks each step a different part of the parameters) sums it over its telemetry_group, so
every rank's guard takes the same decisions on the same steps: rank 0 checks that by
gathering every rank's event log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig
from lbw_guard.integrations.logging import EventLogger, guard_metrics


def build(fsdp: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--zero", action="store_true", help="DDP with ZeroRedundancyOptimizer")
    parser.add_argument("--spike-at", type=int, default=0, help="blow up the gradients at this step (0: never)")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")

    model = build(args.fsdp, device)
    guard = GuardConfig(warmup_steps=5)
    if args.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # Each rank's FusedGuardedAdamW holds a part of the parameters: telemetry_group sums
        # the guard's telemetry over the ranks (without it the first step raises ValueError).
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedGuardedAdamW, lr=1e-2,
                                      backend=args.backend, guard=guard, telemetry_group=dist.group.WORLD)
        guarded = opt.optim  # the local FusedGuardedAdamW
    else:
        opt = guarded = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend=args.backend, guard=guard)
    events = EventLogger(guarded)
    per_rank = args.global_batch // world
    g = torch.Generator().manual_seed(1)  # every rank draws the global batch, keeps its slice
    for step in range(1, args.steps + 1):
        x = torch.randn(args.global_batch, 32, generator=g)
        y = torch.randn(args.global_batch, 8, generator=g)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = nn.functional.mse_loss(model(x[rows].to(device)), y[rows].to(device))
        loss.backward()
        if step == args.spike_at:
            for p in model.parameters():
                p.grad.mul_(1e6)
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        events.update()

    log = [json.dumps(e.to_dict(), sort_keys=True) for e in guarded.guard.events]
    logs = [None] * world
    dist.all_gather_object(logs, log)
    metrics = guard_metrics(guarded)
    if rank == 0:
        same = all(other == logs[0] for other in logs)
        print(json.dumps({"world": world, "steps": guarded.num_steps, "events": len(log),
                          "identical_event_logs": same, **metrics}))
        if not same:
            raise SystemExit("ranks disagree on the guard's decisions")
    # Leave together: a rank tearing gloo down while its peer is still in a collective
    # aborts the peer at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
