"""DDP and FSDP2 on CPU (gloo, 2 processes): every rank takes the same guard decisions on the
same steps, the result equals a single-process run of the same global batch, and a forced
rollback restores every rank's shard (parameters and AdamW state)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig

WORLD = 2
STEPS = 12
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
SPIKES = (7, 8)  # steps whose gradients are blown up on every rank: two trouble records -> rollback
SNAPSHOT_STEP = 4  # the last snapshot taken while stable before the spikes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def guard_config() -> GuardConfig:
    # Short warm-up so that the run is stable (and snapshotting) within a few steps.
    return GuardConfig(warmup_steps=3, snapshot_interval=SNAPSHOT_STEP, diverge_spikes=2, diverge_window=4,
                       keep_trace=True)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def param_groups(model: nn.Sequential) -> list[dict]:
    # Two groups so per-group telemetry and the per-group gate are exercised across ranks.
    return [{"params": list(model[0].parameters()) + list(model[2].parameters())},
            {"params": list(model[4].parameters()), "weight_decay": 0.0}]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)) for _ in range(STEPS)]


def events_json(opt) -> list[str]:
    return [json.dumps(e.to_dict(), sort_keys=True) for e in opt.guard.events]


def train(model, opt, rows: slice, on_step=None) -> None:
    """STEPS steps on ``rows`` of each global batch, blowing up the gradients at SPIKES."""
    for step, (x, y) in enumerate(batches(), start=1):
        loss = (model(x[rows]) - y[rows]).square().mean()
        loss.backward()
        if step in SPIKES:
            for p in model.parameters():
                p.grad.mul_(1e6)
        opt.step(loss=loss)
        opt.zero_grad()
        if on_step is not None:
            on_step(step)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def run_rank(model, opt) -> dict:
    """Train, checking that the rollback step brings back the snapshot step's shards."""
    saved, checks = {}, []

    def shards():
        return [(local(p).detach().clone(), local(opt.state[p]["exp_avg"]).clone())
                for g in opt.param_groups for p in g["params"]]

    def on_step(step):
        if step == SNAPSHOT_STEP:
            saved["at_snapshot"] = shards()
        rolled = any(e.action == "rollback" and e.detail["to_step"] == SNAPSHOT_STEP for e in opt.guard.events)
        if rolled and "rolled_back" not in saved:  # the restore ran inside this step
            saved["rolled_back"] = step
            checks.extend(torch.equal(a, b) and torch.equal(ma, mb)
                          for (a, ma), (b, mb) in zip(shards(), saved["at_snapshot"]))

    rank = dist.get_rank()
    train(model, opt, slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD), on_step)
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    return {"events": events_json(opt), "params": [t.detach().clone() for t in full],
            "rolled_back_at": saved.get("rolled_back"), "shards_restored": checks,
            "records": json.dumps(opt.guard.records, sort_keys=True)}


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = make_model()
        ddp = DDP(model)
        opt = FusedGuardedAdamW(param_groups(model), lr=1e-2, backend="torch", guard=guard_config())
        torch.save(run_rank(ddp, opt), os.path.join(out, f"ddp{rank}.pt"))

        from torch.distributed.fsdp import fully_shard

        model = make_model()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        opt = FusedGuardedAdamW(param_groups(model), lr=1e-2, backend="torch", guard=guard_config())
        assert type(next(model.parameters())).__name__ == "DTensor"
        torch.save(run_rank(model, opt), os.path.join(out, f"fsdp{rank}.pt"))
        dist.barrier()  # leave together: a rank tearing gloo down mid-collective aborts its peer
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    error = None
    try:
        mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    except Exception as exc:  # reported by the tests whose results are missing
        error = exc
    results = [{} for _ in range(WORLD)]
    for kind in ("ddp", "fsdp"):
        for r in range(WORLD):
            path = out / f"{kind}{r}.pt"
            if path.exists():
                results[r][kind] = torch.load(path, weights_only=False)
    return results, error


def results_of(ranks, kind: str) -> list[dict]:
    results, error = ranks
    if any(kind not in r for r in results):
        pytest.fail(f"the {kind} run failed: {error}")
    return [r[kind] for r in results]


@pytest.fixture(scope="module")
def single():
    """The same run in one process on the whole global batch."""
    model = make_model()
    opt = FusedGuardedAdamW(param_groups(model), lr=1e-2, backend="torch", guard=guard_config())
    train(model, opt, slice(0, BATCH))
    return {"events": events_json(opt), "params": [p.detach().clone() for p in model.parameters()],
            "actions": [(e.step, e.action) for e in opt.guard.events]}


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ranks_take_identical_decisions(ranks, kind):
    a, b = results_of(ranks, kind)
    assert a["events"] == b["events"]  # the same decisions, on the same steps, from the same values
    assert a["records"] == b["records"]
    actions = [json.loads(e)["action"] for e in a["events"]]
    assert "skip" in actions and "rollback" in actions


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_matches_single_process_run_of_the_global_batch(ranks, single, kind):
    per_rank = results_of(ranks, kind)
    for result in per_rank:
        for p, ref in zip(result["params"], single["params"]):
            torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    # Telemetry agrees to float rounding, so the decisions are the single-process ones.
    actions = [(json.loads(e)["step"], json.loads(e)["action"]) for e in per_rank[0]["events"]]
    assert actions == single["actions"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_forced_rollback_restores_every_shard(ranks, kind):
    for result in results_of(ranks, kind):
        assert result["rolled_back_at"] is not None and result["rolled_back_at"] > max(SPIKES)
        assert result["shards_restored"] and all(result["shards_restored"])
