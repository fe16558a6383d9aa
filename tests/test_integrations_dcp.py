"""torch.distributed.checkpoint in one process: the guard state and num_steps survive DCP's
get/set_optimizer_state_dict and dcp.save/load, and DCP's initialising step is no training step.
(Two processes with FSDP2: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig
from lbw_guard.integrations import dcp as lbw_dcp

STEPS = 12


@pytest.fixture(autouse=True)
def quiet_dcp():
    with warnings.catch_warnings():  # DCP without a process group warns on every call
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def make(lr: float = 1e-2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    return model, FusedGuardedAdamW(groups, lr=lr, backend="torch", guard=GuardConfig(warmup_steps=3))


def train(model, opt, steps: int = STEPS, start: int = 0) -> None:
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(4, 8, generator=g) for _ in range(start + steps)]
    for k, x in enumerate(batches[start:], start=start + 1):
        loss = (model(x) - 0.5).square().mean()
        loss.backward()
        if k == 7:  # a spike, so that there are events and a regime change to restore
            for p in model.parameters():
                p.grad.mul_(1e4)
        opt.step(loss=loss)
        opt.zero_grad()


def guard_json(opt) -> str:
    """The guard state less what refers to its snapshots and its start (per-rank tensors that
    DCP's copy leaves out: after a load the guard takes new snapshots, and holds no start)."""
    state = opt.guard.state_dict()
    state.pop("last_snapshot", None)
    state.pop("snapshots", None)
    state.pop("start", None)
    recovery = state["controller"]["recovery"]
    recovery.pop("verified_snapshots", None)
    recovery.pop("pending_snapshots", None)
    for key in ("start_held", "start_records", "start_above", "start_grads"):
        recovery.pop(key, None)
    return json.dumps(state, sort_keys=True)


def moments(opt) -> list[torch.Tensor]:
    return [t.clone() for g in opt.param_groups for p in g["params"]
            for t in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["step"])]


def test_initialising_step_is_not_a_step():
    model, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    sd = get_optimizer_state_dict(model, opt)  # runs _init_optim_state: a zero-lr step on zero grads
    assert opt.num_steps == 0
    assert opt.guard.controller.processed == 0 and opt.guard.regime == "warmup"
    assert opt.guard._pending == type(opt.guard._pending)()  # nothing recorded for later
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
        state = opt.state[p]
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert set(sd) == {"state", "param_groups"}
    # A real first step at lr 0 (a warm-up schedule) with real gradients still counts.
    model, opt = make(lr=0.0)
    loss = model(torch.ones(2, 8)).square().mean()
    loss.backward()
    opt.step(loss=loss)
    assert opt.num_steps == 1


def test_get_set_optimizer_state_dict_round_trip_keeps_guard_and_num_steps():
    model, opt = make()
    train(model, opt)
    assert opt.guard.regime != "warmup" and opt.num_steps == STEPS
    sd = get_optimizer_state_dict(model, opt)
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, sd)
    assert opt2.num_steps == STEPS
    assert guard_json(opt2) == guard_json(opt)
    for a, b in zip(moments(opt), moments(opt2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Both continue identically.
    train(model, opt, 4, start=STEPS)
    train(model2, opt2, 4, start=STEPS)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert guard_json(opt2) == guard_json(opt)


@pytest.mark.parametrize("flatten", [False, True])
def test_dcp_save_load_through_the_stateful(tmp_path, flatten):
    options = StateDictOptions(flatten_optimizer_state_dict=True) if flatten else None
    model, opt = make()
    train(model, opt)
    dcp.save({"optim": lbw_dcp.OptimizerState(model, opt, options)}, checkpoint_id=str(tmp_path))

    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    dcp.load({"optim": lbw_dcp.OptimizerState(model2, opt2, options)}, checkpoint_id=str(tmp_path))
    assert opt2.num_steps == STEPS
    assert guard_json(opt2) == guard_json(opt)
    for a, b in zip(moments(opt), moments(opt2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flattened_load_restores_the_guard_without_a_reset_first():
    """torch's setter calls load_state_dict without the section, which follows: the guard must
    not be reset in between (its kept trace and queued records would be lost)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=100))
    train(model, opt, 9)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    flat = lbw_dcp.get_optimizer_state_dict(model, opt, options=options)
    kept = len(opt.guard.records)
    assert kept > 0
    lbw_dcp.set_optimizer_state_dict(model, opt, flat, options=options)
    assert len(opt.guard.records) == kept and opt.num_steps == 9


def test_flattened_helpers_keep_one_copy():
    model, opt = make()
    train(model, opt, 9)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    raw = get_optimizer_state_dict(model, opt, options=options)
    # torch's flattening copies the packed section once per parameter of the first group...
    assert sum(k.endswith(".lbw_guard") for k in raw) == len(opt.param_groups[0]["params"])
    flat = lbw_dcp.get_optimizer_state_dict(model, opt, options=options)
    # ...the helper keeps a single one, at the top level.
    assert not any(k.endswith(".lbw_guard") for k in flat) and len(flat[lbw_dcp.SECTION]) == 1
    model2, opt2 = make()
    lbw_dcp.set_optimizer_state_dict(model2, opt2, flat, options=options)
    assert opt2.num_steps == 9 and guard_json(opt2) == guard_json(opt)


@pytest.mark.parametrize("section", [b"garbage", "a str"])
def test_a_bad_flattened_section_is_refused_before_torch_loads_the_moments(section):
    model, opt = make()
    train(model, opt, 9)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    flat = lbw_dcp.get_optimizer_state_dict(model, opt, options=options)
    flat[lbw_dcp.SECTION] = [section]
    model2, opt2 = make()
    train(model2, opt2, 3)
    before, guard_before = moments(opt2), guard_json(opt2)
    with pytest.raises((ValueError, TypeError)):
        lbw_dcp.set_optimizer_state_dict(model2, opt2, flat, options=options)
    assert opt2.num_steps == 3 and guard_json(opt2) == guard_before
    assert all(torch.equal(a, b) for a, b in zip(moments(opt2), before))


def test_plain_dcp_save_load_without_helpers(tmp_path):
    # What Accelerate's FSDP2 checkpointing does: torch's own functions and dcp.save/load.
    model, opt = make()
    train(model, opt)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    model2, opt2 = make()
    template = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(template, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model2, opt2, template["optim"])
    assert opt2.num_steps == STEPS and guard_json(opt2) == guard_json(opt)


def test_torch_save_state_dict_keeps_top_level_entries_and_loads_adamw():
    model, opt = make()
    train(model, opt, 5)
    sd = opt.state_dict()
    assert sd["num_steps"] == 5 and "guard" in sd and isinstance(sd["param_groups"][0]["lbw_guard"], bytes)
    model2, opt2 = make()
    opt2.load_state_dict(sd)
    assert "lbw_guard" not in opt2.param_groups[0]  # never a live group key
    assert opt2.num_steps == 5 and guard_json(opt2) == guard_json(opt)
    # torch.optim.AdamW loads it (the extra group key is carried, harmlessly) and ours loads AdamW's.
    model3, opt3 = make()
    adamw = torch.optim.AdamW([{"params": g["params"]} for g in opt3.param_groups])
    adamw.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    opt3.load_state_dict(adamw.state_dict())
    assert opt3.num_steps == 5
    with pytest.raises(ValueError, match="lbw_guard"):
        bad = opt.state_dict()
        bad.pop("guard"), bad.pop("num_steps")
        bad["param_groups"][0]["lbw_guard"] = b"not zlib"
        opt3.load_state_dict(bad)
