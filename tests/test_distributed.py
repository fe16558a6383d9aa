"""DDP, FSDP2 and ZeroRedundancyOptimizer on CPU (gloo, 2 processes): every rank takes the same
guard decisions on the same steps, the result equals a single-process run of the same global
batch, and a forced rollback restores every rank's shard (parameters and AdamW state). ZeRO
without a telemetry_group is refused with a clear error. A torch.distributed.checkpoint of the
FSDP2 run restores the guard state and num_steps, and DCP's initialising step is no step.

All of it runs in one spawn of 2 processes (starting them costs more than the checks)."""

from __future__ import annotations

import copy
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
SPIKES = (7, 8)  # steps whose gradients are blown up on every rank: skipped, no rollback
CORRUPT_STEP = 8  # after this step a parameter turns NaN on every rank: a corroborated fault -> rollback
SNAPSHOT_STEP = 4  # the last snapshot taken while stable before the spikes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def guard_config() -> GuardConfig:
    # Short warm-up so that the run is stable (and snapshotting) within a few steps. The toy's
    # loss rises 90% on its second step at this lr, which would send it back to its start
    # (start_rise) before the snapshot this test is about: off here.
    return GuardConfig(warmup_steps=3, snapshot_interval=SNAPSHOT_STEP, keep_trace=True, start_rise=None)


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
    """STEPS steps on ``rows`` of each global batch, blowing up the gradients at SPIKES and
    corrupting a parameter (its first local element) after CORRUPT_STEP."""
    for step, (x, y) in enumerate(batches(), start=1):
        loss = (model(x[rows]) - y[rows]).square().mean()
        loss.backward()
        if step in SPIKES:
            for p in model.parameters():
                p.grad.mul_(1e6)
        opt.step(loss=loss)
        opt.zero_grad()
        if step == CORRUPT_STEP:
            with torch.no_grad():
                local(next(model.parameters())).view(-1)[0] = float("nan")
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
            "records": json.dumps(list(opt.guard.records), sort_keys=True)}


def guard_json(opt) -> str:
    """The guard state less what refers to its snapshots (per-rank tensors that a DCP checkpoint
    leaves out: after a load the guard takes new ones)."""
    state = opt.guard.state_dict()
    state.pop("last_snapshot", None)
    state.pop("snapshots", None)
    state["controller"]["recovery"].pop("verified_snapshots", None)
    state["controller"]["recovery"].pop("pending_snapshots", None)
    return json.dumps(state, sort_keys=True)


def fsdp_model() -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def dcp_round_trip(model, opt, out: str) -> dict:
    """Save the trained FSDP2 model and optimizer with DCP (torch's own functions, and the
    flattened Stateful), load each into a fresh sharded model, then train both 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from lbw_guard.integrations.dcp import OptimizerState

    result = {"num_steps": opt.num_steps, "guard": guard_json(opt)}
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(out, "dcp_plain"))
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    dcp.save({"optim": OptimizerState(model, opt, flat)}, checkpoint_id=os.path.join(out, "dcp_flat"))

    loaded = []
    for how in ("plain", "flat"):
        model2 = fsdp_model()
        opt2 = FusedGuardedAdamW(param_groups(model2), lr=1e-2, backend="torch", guard=guard_config())
        if how == "plain":
            state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
            result["after_init_step"] = (opt2.num_steps, opt2.guard.controller.processed,
                                         all(float(s["step"]) == 0 for s in opt2.state.values()))
            dcp.load(state, checkpoint_id=os.path.join(out, "dcp_plain"))
            set_model_state_dict(model2, state["model"])
            set_optimizer_state_dict(model2, opt2, state["optim"])
        else:
            model2.load_state_dict(model.state_dict())
            dcp.load({"optim": OptimizerState(model2, opt2, flat)}, checkpoint_id=os.path.join(out, "dcp_flat"))
        moments_equal = all(
            torch.equal(local(opt.state[p][k]), local(opt2.state[q][k]))
            for g, g2 in zip(opt.param_groups, opt2.param_groups) for p, q in zip(g["params"], g2["params"])
            for k in ("exp_avg", "exp_avg_sq", "step"))
        loaded.append((model2, opt2, how, opt2.num_steps, guard_json(opt2), moments_equal))

    rank = dist.get_rank()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for m, o in [(model, opt)] + [(m2, o2) for m2, o2, *_ in loaded]:
        for x, y in batches()[:3]:
            loss = (m(x[rows]) - y[rows]).square().mean()
            loss.backward()
            o.step(loss=loss)
            o.zero_grad()
    result["continued"] = guard_json(opt)
    # A checkpoint whose moment holds a NaN in rank 0's shard only: every rank refuses it (one
    # rank going on alone would hang the next collective), and nothing of the optimizer changes.
    bad = copy.deepcopy(opt.state_dict())
    first = next(iter(bad["state"].values()))["exp_avg"]
    if dist.get_rank() == 0:
        local(first).view(-1)[0] = float("nan")
    before = [local(opt.state[p]["exp_avg"]).clone() for g in opt.param_groups for p in g["params"]]
    try:
        opt.load_state_dict(bad)
        result["bad_shard"] = None
    except ValueError as exc:
        result["bad_shard"] = str(exc)
    result["bad_shard_unchanged"] = all(torch.equal(local(opt.state[p]["exp_avg"]), b) for p, b in
                                        zip([p for g in opt.param_groups for p in g["params"]], before))
    result["loaded"] = []
    for model2, opt2, how, num_steps, guard, moments_equal in loaded:
        same_params = all(torch.equal(local(p), local(q)) for p, q in zip(model.parameters(), model2.parameters()))
        result["loaded"].append({"how": how, "num_steps": num_steps, "guard": guard, "moments_equal": moments_equal,
                                 "continued": guard_json(opt2), "same_params": same_params})
    return result


def run_zero() -> dict:
    """ZeroRedundancyOptimizer over DDP: with telemetry_group the ranks (each holding a
    different part of the parameters) take the same decisions; without it, a clear error."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lbw_guard.integrations import unwrap_optimizer

    rank = dist.get_rank()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    result = {}
    model = make_model()
    zero = ZeroRedundancyOptimizer(param_groups(model), optimizer_class=FusedGuardedAdamW, lr=1e-2,
                                   backend="torch", guard=guard_config(), telemetry_group=dist.group.WORLD)
    local_opt = unwrap_optimizer(zero)
    result["local_params"] = sum(p.numel() for g in local_opt.param_groups for p in g["params"])
    ddp = DDP(model)
    scales = []
    train(ddp, zero, rows, on_step=lambda step: scales.append(list(local_opt.guard.scale)))
    import io

    # The README's route: each rank saves and loads its own local state dict (the telemetry_group
    # ZeRO copies into each group is left out, and kept by the live optimizer on load).
    buffer = io.BytesIO()
    torch.save(local_opt.state_dict(), buffer)
    saved = local_opt.state_dict()
    buffer.seek(0)
    local_opt.load_state_dict(torch.load(buffer, weights_only=False))
    again = local_opt.state_dict()
    result["reloaded_same"] = (again["num_steps"] == saved["num_steps"]
                               and again["guard"]["controller"]["processed"] == saved["guard"]["controller"]["processed"]
                               and all(torch.equal(again["state"][k]["exp_avg"], v["exp_avg"])
                                       for k, v in saved["state"].items())
                               and all(g["telemetry_group"] is dist.group.WORLD for g in local_opt.param_groups))
    result.update(events=events_json(local_opt), scales=scales,
                  records=json.dumps(list(local_opt.guard.records), sort_keys=True),
                  params=[p.detach().clone() for p in model.parameters()])

    # A rank whose share is all frozen (a frozen layer large enough to be a partition of its own)
    # still steps, with nothing, so the other rank's telemetry sums do not wait for it forever.
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    frozen[0].requires_grad_(False)
    zero = ZeroRedundancyOptimizer(frozen.parameters(), optimizer_class=FusedGuardedAdamW, lr=1e-2,
                                   backend="torch", guard=GuardConfig(keep_trace=True),
                                   telemetry_group=dist.group.WORLD)
    local_opt = unwrap_optimizer(zero)
    result["holds_a_gradient"] = any(p.requires_grad for g in local_opt.param_groups for p in g["params"])
    ddp = DDP(frozen)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(4):
        loss = ddp(torch.randn(4, 8, generator=gen)).square().mean()
        loss.backward()
        zero.step(loss=loss)
        zero.zero_grad()
    result["frozen_share_records"] = json.dumps(list(local_opt.guard.records), sort_keys=True)
    result["frozen_share_steps"] = local_opt.num_steps
    local_opt.load_state_dict(local_opt.state_dict())  # its empty steps leave nothing unloadable
    result["frozen_share_reloads"] = local_opt.num_steps == 4

    model = make_model()
    zero = ZeroRedundancyOptimizer(param_groups(model), optimizer_class=FusedGuardedAdamW, lr=1e-2,
                                   backend="torch", guard=guard_config())
    ddp = DDP(model)
    (ddp(batches()[0][0][rows]).square().mean()).backward()
    try:
        zero.step()
        result["error"] = None
    except ValueError as exc:
        result["error"] = str(exc)
    return result


def run_divergent(rank: int) -> dict:
    """DDP ranks whose optimizers differ (another lr on rank 1; then the same lr, with each rank
    tracing to its own file): the first is refused on every rank, the second runs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    result = {}
    for case, lr, config in (("lr", 1e-2 * (1 + rank), guard_config()),
                             ("trace files", 1e-2, GuardConfig(keep_trace=rank == 0,
                                                               trace_path=os.devnull if rank else None))):
        model = make_model()
        ddp = DDP(model)
        opt = FusedGuardedAdamW(param_groups(model), lr=lr, backend="torch", guard=config)
        ddp(batches()[0][0]).square().mean().backward()
        try:
            opt.step(loss=1.0)
            result[case] = None
        except ValueError as exc:
            result[case] = str(exc)
    return result


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = make_model()
        ddp = DDP(model)
        opt = FusedGuardedAdamW(param_groups(model), lr=1e-2, backend="torch", guard=guard_config())
        torch.save(run_rank(ddp, opt), os.path.join(out, f"ddp{rank}.pt"))

        model = fsdp_model()
        opt = FusedGuardedAdamW(param_groups(model), lr=1e-2, backend="torch", guard=guard_config())
        assert type(next(model.parameters())).__name__ == "DTensor"
        torch.save(run_rank(model, opt), os.path.join(out, f"fsdp{rank}.pt"))
        torch.save(dcp_round_trip(model, opt, out), os.path.join(out, f"dcp{rank}.pt"))
        torch.save(run_zero(), os.path.join(out, f"zero{rank}.pt"))
        torch.save(run_divergent(rank), os.path.join(out, f"divergent{rank}.pt"))
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
    for kind in ("ddp", "fsdp", "dcp", "zero", "divergent"):
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


def test_zero_with_telemetry_group_decides_like_one_process(ranks, single):
    a, b = results_of(ranks, "zero")
    assert a["local_params"] != b["local_params"]  # each rank steps its own part
    assert a["reloaded_same"] and b["reloaded_same"]  # each rank's own state dict loads back
    assert sorted([a["holds_a_gradient"], b["holds_a_gradient"]]) == [False, True]
    assert a["frozen_share_steps"] == b["frozen_share_steps"] == 4
    assert a["frozen_share_reloads"] and b["frozen_share_reloads"]
    assert a["frozen_share_records"] == b["frozen_share_records"]  # the same summed telemetry and loss
    assert a["events"] == b["events"] and a["records"] == b["records"] and a["scales"] == b["scales"]
    actions = [(json.loads(e)["step"], json.loads(e)["action"]) for e in a["events"]]
    assert actions == single["actions"]  # the summed telemetry is the whole model's
    for result in (a, b):
        for p, ref in zip(result["params"], single["params"]):
            torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)


def test_zero_without_telemetry_group_is_refused_clearly(ranks):
    for result in results_of(ranks, "zero"):
        assert result["error"] is not None and "telemetry_group" in result["error"]
        assert "ZeroRedundancyOptimizer" in result["error"]


def test_dcp_checkpoint_of_fsdp2_keeps_guard_and_num_steps(ranks):
    for result in results_of(ranks, "dcp"):
        assert result["after_init_step"] == (0, 0, True)  # DCP's initialising step is no step
        assert [r["how"] for r in result["loaded"]] == ["plain", "flat"]
        for loaded in result["loaded"]:
            assert loaded["num_steps"] == result["num_steps"] == STEPS
            assert loaded["guard"] == result["guard"], loaded["how"]  # not back in warm-up
            assert loaded["moments_equal"], loaded["how"]
            # Continued for 3 steps from the checkpoint: the same parameters and guard state.
            assert loaded["same_params"] and loaded["continued"] == result["continued"], loaded["how"]
    a, b = results_of(ranks, "dcp")
    assert a["guard"] == b["guard"]
    assert "NaN" in a["bad_shard"] and "another rank" in b["bad_shard"]
    assert a["bad_shard_unchanged"] and b["bad_shard_unchanged"]


def test_ranks_built_with_different_settings_are_refused_on_every_rank(ranks):
    for result in results_of(ranks, "divergent"):
        assert result["lr"] is not None and "different settings" in result["lr"]
        assert result["trace files"] is None  # per-rank by design: no refusal
