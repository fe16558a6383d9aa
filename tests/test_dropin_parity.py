"""Drop-in behaviour that torch.optim.AdamW users rely on beyond the update itself, each checked
against torch on fresh random inputs (every element, fp32 tolerance of a few ulps):

- a closure may return anything without a guard (torch returns it unchanged);
- ``load_state_dict`` runs the user's pre- and post-hooks where torch does;
- OneCycleLR / CyclicLR with Tensor betas (they write a float beta1 beside a Tensor beta2);
- a parameter appended to a group's list is stepped; a group dict appended directly, or a
  parameter changed in place after it was stepped, is refused before anything changes;
- a state dict without the guard's section restarts the guard (its snapshots were of other
  weights), and a packed section that went through another optimizer is not trusted;
- a deep copy carries the snapshot ring and the ``on_give_up`` hook.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig

RTOL = 1e-6


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.detach().double() - expected.detach().double()).abs().max() / scale
    assert err <= RTOL, f"max relative error {float(err):.3g}"


def _pair(seed: int, shapes=((5, 4), (4,))):
    """The same fresh random parameters twice (ours, torch's)."""
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs


def _grads(seed: int, *param_lists) -> None:
    """The same fresh random gradients on each list of parameters."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)


@pytest.mark.parametrize("returned", ["tuple", "vector", "string"])
def test_without_a_guard_a_closure_may_return_anything_as_under_torch(returned):
    ours, theirs = _pair(1)
    opt = FusedGuardedAdamW(ours, lr=1e-2, guard=None, backend="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    value = {"tuple": (torch.tensor(1.0), {"aux": 2}), "vector": torch.rand(3), "string": "done"}[returned]
    for step in range(3):
        _grads(10 + step, ours, theirs)
        assert opt.step(lambda: value) is value
        assert ref.step(lambda: value) is value
    for a, b in zip(ours, theirs):
        _close(a, b)


def test_with_a_guard_a_closure_returning_no_scalar_says_how_to_give_the_loss():
    ours, _ = _pair(2)
    opt = FusedGuardedAdamW(ours, lr=1e-2, backend="torch")
    _grads(3, ours)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(TypeError, match=r"closure.*step\(closure, loss=\.\.\.\)"):
        opt.step(lambda: (torch.tensor(1.0), "aux"))
    assert opt.num_steps == 0 and all(torch.equal(p, b) for p, b in zip(ours, before))
    assert opt.step(lambda: (torch.tensor(1.0), "aux"), loss=1.0)[1] == "aux"


def _stepped(cls, params, steps=3, **kwargs):
    opt = cls(params, lr=1e-2, **kwargs)
    for step in range(steps):
        _grads(20 + step, params)
        opt.step()
    return opt


def test_load_state_dict_runs_the_pre_and_post_hooks_as_torch_does():
    results = []
    for cls, kwargs in ((torch.optim.AdamW, {}), (FusedGuardedAdamW, dict(backend="torch"))):
        params, _ = _pair(4)
        saved = _stepped(cls, params, **kwargs).state_dict()
        fresh, _ = _pair(4)
        opt = cls(fresh, lr=1e-2, **kwargs)

        def rename_and_set(optimizer, state_dict):  # a converter for a legacy checkpoint
            state_dict = copy.deepcopy(state_dict)
            for entry in state_dict["state"].values():
                entry["exp_avg"] = torch.full_like(entry.pop("legacy_exp_avg"), 7.0)
            return state_dict

        def zero_steps(optimizer):
            for state in optimizer.state.values():
                state["step"].zero_()

        opt.register_load_state_dict_pre_hook(rename_and_set)
        opt.register_load_state_dict_post_hook(zero_steps)
        legacy = copy.deepcopy(saved)
        for entry in legacy["state"].values():
            entry["legacy_exp_avg"] = entry.pop("exp_avg")
        opt.load_state_dict(legacy)
        results.append([(float(s["step"]), s["exp_avg"].clone()) for s in (opt.state[p] for p in fresh)])
    for (step_t, m_t), (step_o, m_o) in zip(*results):
        assert step_t == step_o == 0.0
        assert torch.equal(m_o, torch.full_like(m_o, 7.0)) and torch.equal(m_t, m_o)


@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_tensor_betas_under_a_momentum_cycling_scheduler_step_as_under_torch(scheduler):
    ours, theirs = _pair(5)
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    opt = FusedGuardedAdamW(ours, lr=1e-2, betas=betas, guard=None, backend="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=tuple(b.clone() for b in betas))

    def make(o):
        if scheduler == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=8)
        return torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3,
                                                 base_momentum=0.8, max_momentum=0.9)

    schedules = [make(opt), make(ref)]
    for step in range(6):
        _grads(30 + step, ours, theirs)
        opt.step()
        ref.step()
        for s in schedules:
            s.step()
    assert not isinstance(opt.param_groups[0]["betas"][0], torch.Tensor)  # the mixed pair was stepped
    for a, b in zip(ours, theirs):
        _close(a, b)
    opt.load_state_dict(opt.state_dict())  # and its own checkpoint loads back, as torch's does
    ref.load_state_dict(ref.state_dict())


def test_a_parameter_appended_to_a_group_is_stepped_as_under_torch():
    ours, theirs = _pair(6)
    extra_ours, extra_theirs = _pair(7, shapes=((3, 2),))
    opt = FusedGuardedAdamW(ours, lr=1e-2, guard=None, backend="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(5):
        if step == 2:
            opt.param_groups[0]["params"].append(extra_ours[0])
            ref.param_groups[0]["params"].append(extra_theirs[0])
        _grads(40 + step, ours + extra_ours[:1] * (step >= 2), theirs + extra_theirs[:1] * (step >= 2))
        opt.step()
        ref.step()
    for a, b in zip(ours + extra_ours, theirs + extra_theirs):
        _close(a, b)


def test_a_parameter_appended_to_a_second_group_is_refused_before_anything_changes():
    ours, _ = _pair(13)
    opt = FusedGuardedAdamW([{"params": ours[:1]}, {"params": ours[1:]}], lr=1e-2, guard=None, backend="torch")
    _grads(80, ours)
    opt.step()
    opt.param_groups[0]["params"].append(ours[1])  # torch would step it twice in turn; a fused step cannot
    _grads(81, ours)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(ValueError, match=r"param group 1 params\[0\] is also param group 0 params\[1\]"):
        opt.step()
    assert opt.num_steps == 1 and all(torch.equal(p, b) for p, b in zip(ours, before))


def test_a_checkpoint_taken_after_add_param_group_mid_run_loads_back():
    """The guard's queued record of the step before the new group has one group fewer."""
    ours, _ = _pair(14)
    extra, _ = _pair(15, shapes=((3,),))
    opt = _stepped(FusedGuardedAdamW, ours, steps=3, backend="torch")
    opt.add_param_group({"params": extra})
    saved = opt.state_dict()
    assert [r["num_groups"] for r in saved["guard"]["pending"]] == [1]
    opt.load_state_dict(saved)
    copy.deepcopy(opt)
    _grads(90, ours + extra)
    opt.step(loss=1.0)
    assert opt.num_steps == 4


def test_a_group_appended_to_param_groups_directly_is_refused_naming_add_param_group():
    ours, _ = _pair(8)
    extra, _ = _pair(9, shapes=((2,),))
    opt = _stepped(FusedGuardedAdamW, ours, steps=2, backend="torch")
    opt.param_groups.append({**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": extra})
    _grads(50, ours)
    extra[0].grad = torch.ones(2)
    before = [p.detach().clone() for p in ours + extra]
    with pytest.raises(ValueError, match=r"param group 1 .*add_param_group"):
        opt.step(loss=1.0)
    assert opt.num_steps == 2 and all(torch.equal(p, b) for p, b in zip(ours + extra, before))


def test_a_group_deleted_mid_run_leaves_the_others_stepping_as_under_torch():
    """The groups left keep their own guard state: the group that moves into the deleted one's
    place is not judged against the deleted group's lr (its 100x lr was skipped as a spike)."""
    ours, theirs = _pair(16, shapes=((4, 3), (3,), (5,)))
    lrs = (1e-4, 1e-2, 1e-2)
    opt = FusedGuardedAdamW([{"params": [p], "lr": lr} for p, lr in zip(ours, lrs)],
                            backend="torch")  # the default guard, whose queued record is of three groups
    ref = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(theirs, lrs)])
    for step in range(16):
        if step == 12:  # after the lr-spike rule's warm-up
            del opt.param_groups[0], ref.param_groups[0]
        _grads(100 + step, ours, theirs)
        opt.step(loss=1.0)
        ref.step()
    assert opt.num_steps == 16 and opt.guard.controller.num_groups == 2
    assert "skip" not in [e.action for e in opt.guard.events]
    for a, b in zip(ours, theirs):
        _close(a, b)
    # torch's state_dict raises KeyError on the deleted parameter's state; ours leaves it out
    resumed = [p.detach().clone().requires_grad_() for p in ours[1:]]
    fresh = FusedGuardedAdamW([{"params": [p], "lr": lr} for p, lr in zip(resumed, lrs[1:])], backend="torch")
    fresh.load_state_dict(opt.state_dict())
    assert ours[0] in opt.state  # kept, should the parameter be added back
    for step in range(2):
        _grads(200 + step, ours[1:], resumed)
        opt.step(loss=1.0)
        fresh.step(loss=1.0)
    for a, b in zip(ours[1:], resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["moved", "group deleted"])
def test_snapshots_follow_the_parameters_through_a_change_of_the_param_lists(change):
    """A rollback after a weight moved to another group, or after a group was deleted, restores
    every parameter left (value and moments) from its own values at the snapshot's step. A
    rollback restores by position, so the snapshots are put in the new order (before, they were
    dropped, and a NaN in the next steps left nothing to roll back to)."""
    ours, _ = _pair(17, shapes=((4, 3), (4, 3), (6,)))
    opt = FusedGuardedAdamW([{"params": ours[:1]}, {"params": ours[1:2]}, {"params": ours[2:]}], lr=1e-3,
                            backend="torch", guard=GuardConfig(snapshot_interval=1, warmup_steps=2))
    history = {}

    def step(seed):
        _grads(seed, ours)
        opt.step(loss=1.0)
        history[opt.num_steps] = [[p.detach().clone()] + [opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")]
                                  for p in ours]

    for n in range(12):
        step(120 + n)
    guard = opt.guard
    assert guard.controller.recovery.verified_snapshots and guard._ring.steps()
    if change == "moved":
        opt.param_groups[0]["params"][0], opt.param_groups[1]["params"][0] = ours[1], ours[0]
        first_left = 0
    else:
        del opt.param_groups[0]
        first_left = 1
    left = ours[first_left:]
    step(140)
    assert [s for s in guard.controller.recovery.verified_snapshots if s <= 12]  # kept through the change
    with torch.no_grad():
        left[0][0, 0] = float("nan")
    for n in range(3):
        step(150 + n)
        rollbacks = [e for e in guard.events if e.action == "rollback"]
        if rollbacks:
            break
    assert len(rollbacks) == 1
    target = rollbacks[0].detail["to_step"]
    for p, saved in zip(left, history[target][first_left:]):
        assert torch.equal(p.detach(), saved[0])
        assert torch.equal(opt.state[p]["exp_avg"], saved[1]) and torch.equal(opt.state[p]["exp_avg_sq"], saved[2])


def test_a_record_queued_before_add_param_group_keeps_its_own_values():
    ours, _ = _pair(18)
    extra, _ = _pair(19, shapes=((3,),))
    opt = FusedGuardedAdamW(ours, lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=10))
    losses = [1.5, 1.25, 1.125]
    for step, loss in enumerate(losses):
        _grads(150 + step, ours)
        opt.step(loss=loss)
    opt.add_param_group({"params": extra})  # the record of the last step is still queued
    _grads(160, ours + extra)
    opt.step(loss=1.0)
    assert [r["signals"]["loss"] for r in opt.guard.records if r["type"] == "record"] == losses


@pytest.mark.parametrize("kind", ["ndarray", "1-d tensor"])
def test_betas_given_as_another_kind_of_pair_step_as_under_torch(kind):
    import numpy as np

    betas = np.array([0.8, 0.95]) if kind == "ndarray" else torch.tensor([0.8, 0.95])
    ours, theirs = _pair(20)
    opt = FusedGuardedAdamW(ours, lr=1e-2, betas=betas, guard=None, backend="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95))
    for step in range(4):
        _grads(170 + step, ours, theirs)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        _close(a, b)


def test_a_loss_passed_as_the_closure_names_the_keyword_before_anything_changes():
    ours, _ = _pair(21)
    opt = FusedGuardedAdamW(ours, lr=1e-2, backend="torch")
    _grads(180, ours)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(TypeError, match=r"opt\.step\(loss=loss\)"):
        opt.step(torch.tensor(1.0))
    assert opt.num_steps == 0 and all(torch.equal(p, b) for p, b in zip(ours, before))


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_a_parameter_changed_in_place_after_stepping_is_refused_before_any_bucket_steps(change):
    ours, _ = _pair(10, shapes=((4, 3), (3,)))
    opt = _stepped(FusedGuardedAdamW, ours, steps=2, backend="torch")
    with torch.no_grad():
        ours[1].data = ours[1].data.double() if change == "dtype" else torch.randn(5)
    _grads(60, ours)
    before = [p.detach().clone() for p in ours]
    steps = [float(opt.state[p]["step"]) for p in ours]
    with pytest.raises(ValueError, match=r"param group 0 params\[1\] is now .*build the optimizer again"):
        opt.step(loss=1.0)
    assert opt.num_steps == 2 and [float(opt.state[p]["step"]) for p in ours] == steps
    assert all(torch.equal(p, b) for p, b in zip(ours, before))


def _train(opt, model, gen, steps):
    for _ in range(steps):
        loss = model(torch.randn(16, 4, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
        opt.zero_grad()


def test_a_state_dict_without_the_guards_section_restarts_the_guard():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    other = copy.deepcopy(model)
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(snapshot_interval=5))
    gen = torch.Generator().manual_seed(1)
    _train(opt, model, gen, 60)
    assert opt.guard._ring.steps(), "the first run must hold snapshots"
    abandoned = [s.buffers[0].clone() for s in opt.guard._ring.slots if s.step is not None]
    ref = torch.optim.AdamW(other.parameters(), lr=1e-2)  # another run's checkpoint, at step 10
    for _ in range(10):
        other(torch.randn(16, 4, generator=gen)).pow(2).mean().backward()
        ref.step()
        ref.zero_grad()
    model.load_state_dict(other.state_dict())
    opt.load_state_dict(ref.state_dict())
    guard = opt.guard
    assert opt.num_steps == 10 and guard._ring.steps() == [] and guard.controller.processed == 0
    assert not guard._pending and guard.summary()["steps"] == 0
    _train(opt, model, gen, 3)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    _train(opt, model, gen, 4)
    rollbacks = [e for e in guard.events if e.action == "rollback"]
    assert rollbacks and all(e.detail["to_step"] <= opt.num_steps for e in rollbacks)
    assert bool(torch.isfinite(model[0].weight).all())
    assert not any(torch.equal(model[0].weight.detach(), w) for w in abandoned)


def test_a_packed_section_that_went_through_another_optimizer_is_not_trusted():
    params, _ = _pair(11)
    saved = _stepped(FusedGuardedAdamW, params, steps=3, backend="torch").state_dict()
    saved.pop("guard"), saved.pop("num_steps"), saved.pop("spike_floor")  # only the packed copy rides on
    ref = torch.optim.AdamW(params, lr=1e-2)
    ref.load_state_dict(saved)  # torch keeps the section as an inert group option ...
    for step in range(5):  # ... and trains on
        _grads(70 + step, params)
        ref.step()
    fresh, _ = _pair(11)
    opt = FusedGuardedAdamW(fresh, lr=1e-2, backend="torch")
    with pytest.warns(UserWarning, match="packed lbw_guard section is of step 3.*stepped 8 times"):
        opt.load_state_dict(ref.state_dict())
    assert opt.num_steps == 8 and opt.guard.controller.processed == 0


def test_a_deep_copy_keeps_the_snapshots_and_the_give_up_hook():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    calls = []
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch",
                            guard=GuardConfig(snapshot_interval=5))
    opt.guard.on_give_up = calls.append
    _train(opt, model, torch.Generator().manual_seed(1), 40)
    model2, opt2 = copy.deepcopy((model, opt))
    assert sorted(opt2.guard._ring.steps()) == sorted(opt.guard._ring.steps()) != []
    assert opt2.guard.controller.recovery.verified_snapshots == opt.guard.controller.recovery.verified_snapshots
    assert opt2.guard.on_give_up == calls.append  # the same list's method
    for m, o in ((model, opt), (model2, opt2)):
        with torch.no_grad():
            m[0].weight[0, 0] = float("nan")
        _train(o, m, torch.Generator().manual_seed(2), 5)
    assert [(e.step, e.action) for e in opt2.guard.events] == [(e.step, e.action) for e in opt.guard.events]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_an_unwritable_trace_path_is_refused_when_the_guard_is_attached(tmp_path, where):
    path = tmp_path / "no" / "trace.jsonl" if where == "missing directory" else tmp_path
    params, _ = _pair(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="trace_path"):
            FusedGuardedAdamW(params, backend="torch", guard=GuardConfig(trace_path=str(path)))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write fails: disk full)")
def test_a_trace_that_cannot_be_written_stops_tracing_with_one_warning_and_training_goes_on():
    runs = []
    for trace_path in (None, "/dev/full"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch",
                                guard=GuardConfig(snapshot_interval=5, trace_path=trace_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(opt, model, torch.Generator().manual_seed(1), 30)
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")  # the guard must still roll back
            _train(opt, model, torch.Generator().manual_seed(2), 10)
            opt.guard.close()
        runs.append((model, opt, [str(w.message) for w in caught if "could not be written" in str(w.message)]))
    (clean, clean_opt, none), (traced, traced_opt, warned) = runs
    assert none == [] and len(warned) == 1 and "/dev/full" in warned[0]
    assert "rollback" in [e.action for e in traced_opt.guard.events]
    assert [(e.step, e.action) for e in traced_opt.guard.events] == [(e.step, e.action) for e in clean_opt.guard.events]
    for a, b in zip(clean.parameters(), traced.parameters()):
        assert torch.equal(a, b)
