"""The guard's policy on synthetic telemetry (no model): configuration, statistics, detection,
recovery (skip, rebaseline, freeze, rollback, give-up), the step-size governor, per-group
independence, monitor mode, the bounded event log and the controller's state.

Every test spells its GuardConfig out (``explicit_config``) so that it checks the policy, not
the default tuning. Records are built from ``lbw_kernels.contract.record_layout`` by
``tests/guard_records.py``; ``Sim`` feeds them like the Guard does (command for step n, then
the record of step n - lag processed with now = n).
"""

import copy
import json
import math
import pickle
import random

import pytest
import torch

from guard_records import GuardDriver, Sim, actions, explicit_config, healthy, make_record, same
from lbw_guard.guard import PRESETS, Controller, GuardConfig, GuardGaveUp, make_guard
from lbw_guard.guard.accounting import EventLog
from lbw_guard.guard.events import Event
from lbw_guard.guard.stats import EmaStat
from lbw_kernels import contract as C

INTERVENING = ("decrease_scale", "cap_scale", "recap", "rollback", "freeze", "give_up")


def noisy(seed=0, **fixed):
    """A spec of healthy records with a little noise, plus ``fixed`` (or per-step overrides
    from ``faults``: {step: kwargs})."""
    rng = random.Random(seed)
    faults = fixed.pop("faults", {})

    def spec(n, cmd):
        kw = healthy(n, rng, **fixed)
        kw.update(faults.get(n, {}))
        return kw

    return spec


def decisions_at(sim, record_step):
    return [d for _, s, d in sim.decisions if s == record_step]


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(min_scale=0.0), "min_scale"),
        (dict(min_scale=1.5), "min_scale"),
        (dict(cut_factor=1.0), "cut_factor"),
        (dict(restart_cut=0.0), "restart_cut"),
        (dict(restart_cut=1.5), "restart_cut"),
        (dict(restart_cut=math.nan), "restart_cut"),
        (dict(omega_low=0.7, omega_high=0.6), "omega_low"),
        (dict(snapshot_interval=60, max_rollback_distance=50), "snapshot_interval"),
        (dict(max_frozen_fraction=1.0), "max_frozen_fraction"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(give_up_after=0), "give_up_after"),
        (dict(event_capacity=0), "event_capacity"),
        (dict(z_grad=math.nan), "z_grad"),
        (dict(max_update_ratio=-1.0), "max_update_ratio"),
        (dict(mode="off"), "mode"),
        (dict(governor="aimd"), "governor"),
        (dict(lag=1.5), "lag"),
        (dict(snapshots="yes"), "snapshots"),
        (dict(efficiency_records=-1), "efficiency_records"),
        (dict(efficiency_window=0), "efficiency_window"),
        (dict(efficiency_low=0.0), "efficiency_low"),
        (dict(efficiency_min_drop=math.inf), "efficiency_min_drop"),
        (dict(efficiency_large_drop=0.0), "efficiency_large_drop"),
        (dict(efficiency_grad_rise=1.0), "efficiency_grad_rise"),
        (dict(release_drop=1.0), "release_drop"),
        (dict(release_drop=math.nan), "release_drop"),
        (dict(release_loss_z=-1.0), "release_loss_z"),
        (dict(release_loss_z="1"), "release_loss_z"),
    ],
)
def test_config_rejects_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        explicit_config(**changes)


def test_presets_make_guard_and_round_trips(tmp_path):
    assert PRESETS["monitor"].acts is False and PRESETS["default"].acts is True
    assert PRESETS["faults-only"].governor == "off"
    assert make_guard(None) is None
    assert make_guard("monitor").config.mode == "monitor"
    assert make_guard({"min_scale": 0.2}).config.min_scale == 0.2
    with pytest.raises(ValueError, match="unknown guard preset"):
        make_guard("nope")
    with pytest.raises(ValueError, match="unknown GuardConfig field"):
        GuardConfig.from_dict({"min_scal": 0.2})
    with pytest.raises(TypeError):
        make_guard(3)
    config = explicit_config(trace_path=tmp_path / "t.jsonl", keep_trace=True)
    assert config.trace_path == str(tmp_path / "t.jsonl") and config.keep_trace == 10_000
    assert GuardConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert GuardConfig.from_json(str(path)) == config


def test_rejected_spike_does_not_move_the_statistic():
    rng = random.Random(0)
    stat = EmaStat(beta=0.97, warmup=20, min_std=0.05, winsor_z=3.0)
    for _ in range(200):
        stat.update(1.0 + rng.gauss(0, 0.1))
    before = stat.state_dict()
    assert stat.z(50.0) > 100  # a spike: the controller does not fold it in
    assert stat.state_dict() == before
    stat.update(1.0 + 10 * 0.1)  # an accepted large value moves the level only boundedly
    assert stat.mean - before["mean"] <= 0.2 * 3 * math.sqrt(before["var"]) + 1e-12
    assert math.isinf(stat.z(math.nan)) and EmaStat(0.9, 5, 0.1, 3.0).z(7.0) == 0.0  # before warm-up


# ---------------------------------------------------------------------------- record layout
def test_synthetic_records_follow_the_contract_layout():
    rec = make_record(3, groups=2, grad_sq=[4.0, 9.0], loss=1.5, omega=[0.5, None], nonfinite=[0, 2],
                      lrs=[1e-3, math.nan])
    layout = C.record_layout(2)
    assert len(rec.record) == layout.size
    assert rec.record[layout.applied_gate] == [1.0, 0.0]  # the NaN lr's group is not written
    assert rec.record[layout.invalid] == [0.0, 1.0]
    from lbw_guard.guard.signals import derive

    sig = derive(rec)
    assert sig.loss == 1.5 and sig.grad_norm == pytest.approx(math.sqrt(13.0))
    assert sig.groups[0].omega == pytest.approx(0.5) and sig.groups[1].omega is None
    assert sig.nonfinite == 2 and sig.written_groups == [0]
    assert derive(make_record(1, loss=None)).loss is None


# ---------------------------------------------------------------------------- spikes
@pytest.mark.parametrize("fault", [dict(grad_sq=1e6), dict(spikes=800.0), dict(grad_sq=1e12, spikes=1000.0)])
def test_isolated_gradient_spike_is_a_skip_without_cut_or_rollback(fault):
    config = explicit_config()
    sim = Sim(config, snapshot_every=5)
    spec = noisy(faults={30: fault})
    sim.run(29, spec)
    sim.advance(spec)  # step 30: the spike (processed at step 31)
    grad_before = copy.deepcopy(sim.controller.detectors.grad.state_dict())
    limit_before = sim.controller.detectors.grad_norm_limit()
    sim.advance(spec)
    assert sim.controller.detectors.grad.state_dict() == grad_before  # a rejected spike never widens it
    assert sim.controller.detectors.grad_norm_limit() == limit_before
    sim.run(30, spec)
    events = sim.events
    skips = [e for e in events if e.action == "skip"]
    assert [e.step for e in skips] == [30] and "grad_spike" in skips[0].detail["why"]
    assert not [e for e in events if e.action in INTERVENING], actions(events)
    assert all(d["rollback_to"] is None and d["give_up"] is None for _, _, d in sim.decisions)
    assert all(cmd.scale == [1.0] and cmd.gate == [1.0] for cmd in sim.commands.values())
    regimes = [e.detail["to"] for e in events if e.action == "transition"]
    assert regimes == ["stable", "spiking", "recovering", "stable"]


def test_spike_fraction_flags_a_spike_during_warm_up():
    # Before the statistics are warm only the scale-free tests can see a spike.
    config = explicit_config(warmup_steps=50)
    sim = Sim(config).run(20, noisy(faults={8: dict(spikes=500.0)}))
    assert actions(sim.events, "skip") == [(8, "skip")]
    assert not [e for e in sim.events if e.action in INTERVENING]


# ---------------------------------------------------------------------------- level shifts
@pytest.mark.parametrize("records", [2, 3])
def test_loss_level_shift_rebaselines_without_rollback_or_cut(records):
    config = explicit_config(level_shift_records=records)
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(1)

    def spec(n, cmd):  # the loss moves to a new level at step 30; the gradients stay normal
        return healthy(n, rng, loss=(2.0 if n < 30 else 3.0) * (1 + 0.01 * (rng.random() - 0.5)))

    sim.run(90, spec)
    events = sim.events
    skips = [e for e in events if e.action == "skip"]
    # The records over the limit, plus the lag: the command of the step after the last of them
    # was issued (with the old limit) before that record was processed.
    assert [e.step for e in skips] == list(range(30, 30 + records + config.lag))
    assert all(e.detail["device_skipped"] for e in skips)  # over the loss limit on the device
    assert all("loss_spike" in e.detail["why"] for e in skips[:records])
    assert [e.detail["why"] for e in skips[records:]] == ["device_skip"] * config.lag
    rebaselines = [e for e in events if e.action == "rebaseline"]
    assert [(e.step, e.detail["why"], e.detail["records"]) for e in rebaselines] == \
        [(29 + records, "loss_level_shift", records)]
    assert not [e for e in events if e.action in INTERVENING], actions(events)
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())
    loss = sim.controller.detectors.loss
    assert loss.warm and loss.mean == pytest.approx(3.0, rel=0.02)
    assert 3.0 < sim.controller.detectors.loss_limit() < 3.5


def test_notify_data_change_rebaselines_at_once():
    config = explicit_config()
    sim = Sim(config, snapshot_every=5, lag=0)
    rng = random.Random(2)

    def spec(n, cmd):
        return healthy(n, rng, loss=(2.0 if n <= 30 else 3.0) * (1 + 0.01 * (rng.random() - 0.5)))

    sim.run(30, spec)
    assert sim.controller.detectors.loss.warm
    assert math.isfinite(sim.commands[30].loss_limit)
    sim.controller.notify_data_change(30)
    assert math.isinf(sim.controller.detectors.loss_limit())  # restarted: no loss limit until warm again
    sim.run(40, spec)
    events = sim.events
    assert [(e.step, e.action, e.detail) for e in events if e.action == "rebaseline"] == \
        [(30, "rebaseline", {"why": "notify_data_change"})]
    assert not [e for e in events if e.action == "skip"], actions(events)
    assert not [e for e in events if e.action in INTERVENING]
    assert sim.controller.detectors.loss.mean == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize("lag", [1, 3])
def test_notify_data_change_judges_the_queued_old_data_records_first(lag):
    """Called before the first step on the new data, with the last ``lag`` records of the old
    data still queued: they are judged as old data, and the restarted statistics hold only the
    new data's records (folded in, the old level widened the loss limit for many records)."""
    driver = GuardDriver(explicit_config(lag=lag))
    rng = random.Random(3)
    for _ in range(30):
        driver.step(**healthy(0, rng, loss=0.1))
    driver.guard.notify_data_change()
    assert not driver.guard._pending
    for _ in range(lag + 4):
        driver.step(**healthy(0, rng, loss=3.0))
    loss = driver.controller.detectors.loss
    assert loss.count == 4 and loss.mean == pytest.approx(3.0, rel=0.02)
    assert [e.step for e in driver.guard.events if e.action == "rebaseline"] == [30]


def test_notify_data_change_accepts_the_new_gradient_level_too():
    config = explicit_config()
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(2)
    sim.run(30, lambda n, cmd: healthy(n, rng))
    sim.controller.notify_data_change(30)
    sim.run(40, lambda n, cmd: healthy(n, rng, grad_sq=100.0 * (1 + 0.2 * (rng.random() - 0.5)), loss=3.0))
    assert not [e for e in sim.events if e.action in ("rollback", "give_up", "decrease_scale")], actions(sim.events)
    assert len([e for e in sim.events if e.action == "skip"]) <= config.level_shift_records


@pytest.mark.parametrize("records", [2, 3])
def test_gradient_level_shift_with_a_normal_loss_rebaselines_without_rollback_or_cut(records):
    # Gradients x8 from step 30 on (a loss weight, accumulation summed), the loss unchanged.
    config = explicit_config(level_shift_records=records)
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(3)
    sim.run(120, lambda n, cmd: healthy(n, rng, grad_sq=(1.0 if n < 30 else 64.0) * (1 + 0.2 * (rng.random() - 0.5))))
    events = sim.events
    skips = [e for e in events if e.action == "skip"]
    assert [e.step for e in skips] == list(range(30, 30 + records))
    assert all(e.detail["why"] == "grad_spike" and not e.detail["device_skipped"] for e in skips)
    assert [(e.step, e.detail["why"], e.detail["records"]) for e in events if e.action == "rebaseline"] == \
        [(29 + records, "grad_level_shift", records)]
    assert not [e for e in events if e.action in INTERVENING], actions(events)
    assert all(cmd.scale == [1.0] and cmd.gate == [1.0] for cmd in sim.commands.values())
    grad = sim.controller.detectors.grad
    assert grad.warm and math.exp(grad.mean) == pytest.approx(8.0, rel=0.1)  # the norm, sqrt(64)
    # the new level is the reference now: a spike on top of it is still one
    sim.run(5, noisy(seed=4, grad_sq=64.0, faults={123: dict(grad_sq=64.0e6)}))
    assert actions(sim.events, "skip")[-1] == (123, "skip")


def test_gradient_level_shift_without_a_loss_stays_trouble():
    # Without a loss nothing says the model is fine: growing gradients are all the evidence.
    config = explicit_config(give_up_after=30)
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(5)
    sim.run(60, lambda n, cmd: healthy(n, rng, loss=None, grad_sq=(1.0 if n < 30 else 64.0) * (1 + 0.2 * (rng.random() - 0.5))))
    events = sim.events
    assert not [e for e in events if e.action == "rebaseline"]
    assert [e.detail["why"] for e in events if e.action == "rollback"][:1] == ["persistent_trouble"]


@pytest.mark.parametrize("records", [2, 3])
def test_a_rescaled_loss_rebaselines_both_levels_without_rollback_or_cut(records):
    # A weight of 8 on the loss from step 30: the loss the guard reads and the grad norm jump by
    # the same factor. Divergence moves the grad norm far more than the loss; this is a new scale.
    config = explicit_config(level_shift_records=records)
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(6)

    def spec(n, cmd):
        w = 1.0 if n < 30 else 8.0
        return healthy(n, rng, grad_sq=w * w * (1 + 0.2 * (rng.random() - 0.5)), loss=2.0 * w * (1 + 0.01 * (rng.random() - 0.5)))

    sim.run(120, spec)
    events = sim.events
    skips = [e for e in events if e.action == "skip"]
    assert [e.step for e in skips] == list(range(30, 30 + records + config.lag))
    assert all(e.detail["why"] == "grad_spike,loss_spike,device_skip" for e in skips[:records])
    assert [(e.step, e.detail["why"], e.detail["records"]) for e in events if e.action == "rebaseline"] == \
        [(29 + records, "scale_level_shift", records)]
    assert not [e for e in events if e.action in INTERVENING], actions(events)
    assert all(cmd.scale == [1.0] and cmd.gate == [1.0] for cmd in sim.commands.values())
    d = sim.controller.detectors
    assert math.exp(d.grad.mean) == pytest.approx(8.0, rel=0.1) and d.loss.mean == pytest.approx(16.0, rel=0.02)
    assert 16.0 < d.loss_limit() < 18.0


def test_a_rescaled_loss_keeps_the_lr_ceilings():
    # The oscillation evidence is scale-free: a weight on the loss does not release a cut lr
    # (a data change does: the evidence was about the old data).
    config = explicit_config()
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(8)

    def spec(n, cmd):
        w = 1.0 if n < 70 else 8.0
        return healthy(n, rng, omega=0.1 if n > 30 else 1.0, grad_sq=w * w * (1 + 0.2 * (rng.random() - 0.5)),
                       loss=2.0 * w * (1 + 0.01 * (rng.random() - 0.5)))

    sim.run(69, spec)
    cut = sim.commands[69].scale[0]
    assert cut < 1.0
    sim.run(20, spec)
    assert [e.detail["why"] for e in sim.events if e.action == "rebaseline"] == ["scale_level_shift"]
    assert all(sim.commands[n].scale[0] <= cut for n in range(70, 90))


@pytest.mark.parametrize("grad_norm_factor, expected", [(60.0, "persistent_trouble"), (1.0, "loss_level_shift")])
def test_loss_and_gradients_moving_by_different_factors_are_not_a_rescale(grad_norm_factor, expected):
    # The loss x2 from step 30 with the grad norm x60 (a spike that stays: trouble, rolled back)
    # or unchanged (new data: a loss level shift). Neither is a rescaled objective.
    config = explicit_config(give_up_after=30)
    sim = Sim(config, snapshot_every=5)
    rng = random.Random(7)
    g = grad_norm_factor
    sim.run(60, lambda n, cmd: healthy(n, rng, grad_sq=(1.0 if n < 30 else g * g) * (1 + 0.2 * (rng.random() - 0.5)),
                                       loss=(2.0 if n < 30 else 4.0) * (1 + 0.01 * (rng.random() - 0.5))))
    whys = [e.detail["why"] for e in sim.events if e.action in ("rebaseline", "rollback")]
    assert whys[:1] == [expected] and "scale_level_shift" not in whys


# ---------------------------------------------------------------------------- rollback
def test_nonfinite_params_roll_back_to_the_newest_verified_snapshot():
    config = explicit_config()
    sim = Sim(config, snapshot_every=5)
    sim.run(41, noisy(faults={41: dict(param_sq=math.nan)}))
    # Snapshot 40 was taken, but record 41 (the one after it) is in trouble: discarded.
    assert sim.snapshots[-2:] == [35, 40]
    assert decisions_at(sim, 41) == []  # record 41 is processed at step 42 (lag 1)
    sim.advance(noisy())
    (decision,) = decisions_at(sim, 41)
    assert decision["rollback_to"] == 35 and decision["give_up"] is None
    rollback = [e for e in sim.events if e.action == "rollback"]
    assert [(e.step, e.detail["why"], e.detail["to_step"], e.detail["distance"]) for e in rollback] == \
        [(41, "params_nonfinite", 35, 42 - 35)]
    assert (41, "snapshot_discarded") in actions(sim.events)
    ctl = sim.controller
    assert ctl.recovery.verified_snapshots == [30, 35] and ctl.recovery.pending_snapshots == []
    assert ctl.regime == "recovering" and ctl.accounting.rollbacks == 1
    assert ctl.detectors.grad.count == 0  # the statistics restart on the restored trajectory
    assert sim.pending == []  # queued records of the abandoned trajectory are dropped
    cmd = ctl.command(43, [1e-3])
    assert cmd.scale == [pytest.approx(config.rollback_scale)]


def test_a_pending_snapshot_is_never_used():
    config = explicit_config()
    ctl = Controller(config, 1)
    for n in range(1, 21):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n), n)
    ctl.snapshot_taken(20)
    ctl.command(21, [1e-3])
    ctl.observe(make_record(21), 21)  # confirms 20 (records 20 and 21 clean)
    ctl.snapshot_taken(25)
    for n in range(22, 26):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n), n)
    assert ctl.recovery.verified_snapshots == [20] and ctl.recovery.pending_snapshots == [25]
    ctl.command(26, [1e-3])
    decision = ctl.observe(make_record(26, param_sq=math.inf), 26)
    assert decision["rollback_to"] == 20  # not the unverified 25
    assert ctl.recovery.pending_snapshots == [] and 25 not in ctl.recovery.verified_snapshots


@pytest.mark.parametrize("trouble_at", ["snapshot step", "next record"])
def test_a_snapshot_whose_step_or_next_record_is_in_trouble_is_discarded(trouble_at):
    config = explicit_config()
    ctl = Controller(config, 1)
    for n in range(1, 30):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n), n)
    ctl.snapshot_taken(30)  # the state after step 30, verified by records 30 and 31
    bad = 30 if trouble_at == "snapshot step" else 31
    for n in (30, 31, 32):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n, **(dict(nonfinite=3.0) if n == bad else {})), n)
    assert 30 not in ctl.recovery.verified_snapshots and ctl.recovery.pending_snapshots == []
    assert [(e.step, e.action, e.detail) for e in ctl.events if e.action == "snapshot_discarded"] == \
        [(bad, "snapshot_discarded", {"step": 30})]


def test_rollback_respects_the_distance_and_without_a_snapshot_gives_up_with_evidence():
    config = explicit_config(max_rollback_distance=20, snapshot_interval=5)
    ctl = Controller(config, 1)
    for n in range(1, 11):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n), n)
    ctl.snapshot_taken(10)
    for n in range(11, 40):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n), n)
    assert ctl.recovery.verified_snapshots == [10]
    ctl.command(40, [1e-3])
    decision = ctl.observe(make_record(40, param_sq=math.nan), 40)
    assert decision["rollback_to"] is None
    evidence = decision["give_up"]
    assert evidence["why"] == "params_nonfinite" and evidence["step"] == 40
    assert "params_bad" in evidence["reasons"] and evidence["verified_snapshots"] == [10]
    assert {"consecutive_trouble", "rollbacks_in_window", "recent", "signals"} <= set(evidence)
    refused = [e for e in ctl.events if e.action == "rollback_refused"]
    assert [(e.bound, e.detail["why"]) for e in refused] == [("max_rollback_distance", "params_nonfinite")]

    for changes, bound in ((dict(), "no_verified_snapshot"), (dict(snapshots=False), "snapshots_off"),
                           (dict(max_rollbacks=0), "max_rollbacks")):
        ctl = Controller(explicit_config(**changes), 1)
        for n in range(1, 10):
            ctl.command(n, [1e-3])
            ctl.observe(make_record(n), n)
        if changes:
            ctl.snapshot_taken(5)  # verified, but the config does not allow a rollback to it
        decision = ctl.observe(make_record(10, param_sq=math.nan), 10)
        assert decision["rollback_to"] is None and decision["give_up"]["why"] == "params_nonfinite"
        assert [e.bound for e in ctl.events if e.action == "rollback_refused"] == [bound]


def _from_start(ctl, losses, first=1):
    """Records ``first``, ``first + 1``, ... with these losses (lag 0); the decisions."""
    out = []
    for n, loss in enumerate(losses, start=first):
        ctl.command(n, [1e-3])
        out.append(ctl.observe(make_record(n, loss=loss), n))
    return out


@pytest.mark.parametrize("losses", [[2.0, 2.5, 2.5], [2.0, 2.5, 2.1, 2.6], [2.0, 1.0, 2.5, 1.9, 2.5]])
def test_two_of_three_records_above_the_start_roll_back_to_it(losses):
    """The first record's loss is the start's; two of the last three records above it by
    start_rise (of its size) go back to the start (step 0), at rollback_scale of the lr."""
    config = explicit_config(start_rise=0.2)
    ctl = Controller(config, 1)
    ctl.start_taken()
    decisions = _from_start(ctl, losses)
    assert [d["rollback_to"] for d in decisions] == [None] * (len(losses) - 1) + [0]
    (rollback,) = [e for e in ctl.events if e.action == "rollback"]
    assert rollback.detail["why"] == "diverged_from_start" and rollback.detail["to_step"] == 0
    assert rollback.detail["loss_at_start"] == losses[0]
    assert ctl.accounting.rollbacks == 1 and ctl.regime == "recovering"
    assert ctl.command(len(losses) + 1, [1e-3]).scale == [pytest.approx(config.rollback_scale)]
    assert ctl.recovery.start_held  # the restarted run is judged against the same start
    assert ctl.recovery.start_records == 0 and ctl.recovery.start_above == []


@pytest.mark.parametrize("norms, rolls_back", [([1.0, 4.0, 5.0], True), ([1.0, 2.2, 2.5], False),
                                               ([1.0, 4.0, 2.0, 2.9], False), ([1.0, 3.5, 1.0, 3.2], True)])
def test_the_rise_from_the_start_needs_the_gradients_to_rise_too(norms, rolls_back):
    """Minibatch noise moves the loss and the grad norm together (a regression with batches of 16:
    2x the first loss, 1.7-2.2x its grad norm); a too-high lr grows the gradients far more."""
    config = explicit_config(start_rise=0.2, start_rise_grad=3.0)
    ctl = Controller(config, 1)
    ctl.start_taken()
    losses = [2.0, 2.5, 2.6, 2.7][: len(norms)]
    decisions = []
    for n, (loss, norm) in enumerate(zip(losses, norms), start=1):
        ctl.command(n, [1e-3])
        decisions.append(ctl.observe(make_record(n, loss=loss, grad_norm=norm), n))
    assert (decisions[-1]["rollback_to"] == 0) is rolls_back
    assert all(d["rollback_to"] is None for d in decisions[:-1])
    restored = Controller(config, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.recovery.start_grad_norm == ctl.recovery.start_grad_norm


@pytest.mark.parametrize("window, quiet, rolls_back", [(10, 1, True), (10, 7, True), (10, 8, False), (10, 15, False),
                                                        (20, 15, True), (3, 0, True), (3, 1, False)])
def test_the_rise_from_the_start_is_judged_in_the_first_start_rise_records(window, quiet, rolls_back):
    """The same two records above the start roll back while they are within start_rise_records
    of it (the second of them is record quiet + 3), and not after: later, minibatch noise alone
    clears the bar. The start is still held for the other rules up to early_records."""
    rng = random.Random(window * 100 + quiet)
    config = explicit_config(start_rise=0.2, start_rise_records=window, early_records=20)
    ctl = Controller(config, 1)
    ctl.start_taken()
    start = rng.uniform(1.0, 5.0)
    losses = [start] + [start * rng.uniform(0.9, 1.1) for _ in range(quiet)] + [start * 1.3, start * 1.4]
    decisions = _from_start(ctl, losses)
    backs = [d["rollback_to"] for d in decisions]
    assert backs == [None] * (len(losses) - 1) + [0 if rolls_back else None]
    assert ctl.recovery.start_held == (rolls_back or len(losses) <= config.early_records)


@pytest.mark.parametrize("case", ["healthy", "one above", "no start", "off", "non-finite", "data change"])
def test_no_rollback_to_the_start_without_two_of_three_above_it(case):
    config = explicit_config(start_rise=None if case == "off" else 0.2)
    ctl = Controller(config, 1)
    if case != "no start":
        ctl.start_taken()
    if case == "data change":  # the user said so: the start's loss was measured on the old data
        _from_start(ctl, [2.0])
        ctl.notify_data_change(1)
        assert not ctl.recovery.start_held
    losses = {"one above": [2.0, 2.5, 2.3, 2.3, 2.5, 2.0, 2.0], "non-finite": [2.0, math.nan, 2.5, math.inf, 2.1],
              "data change": [3.0, 3.0, 3.0]}
    first = 2 if case == "data change" else 1
    decisions = _from_start(ctl, losses.get(case, [2.0, 2.39, 2.39, 2.3, 1.9, 1.8]), first=first)
    assert all(d["rollback_to"] is None for d in decisions)
    assert not [e for e in ctl.events if e.detail.get("why") == "diverged_from_start"]


@pytest.mark.parametrize("case, norms, rollback_at", [
    ("first record a spike", [1e4, 1.0, 1.0], 2),
    ("second record a spike", [1.0, 1e4, 1.2], 3),
    ("first under the factor", [90.0, 1.0, 1.0], None),
    ("second grown and staying grown (an lr too high)", [1.0, 1e4, 1e4], None),
    ("second under the factor", [1.0, 90.0, 1.0], None),
    ("a spike at the third record, no loose-bound window: the bound's", [1.0, 1.0, 1e4, 1.0], None),
    ("a spike at the fifth record, in the loose bound's window", [1.0, 1.0, 1.0, 1.0, 1e4, 1.0], 6),
    ("a spike at the fifth record, past the loose bound's window", [1.0, 1.0, 1.0, 1.0, 1e4, 1.0], None),
    ("first a spike, not written", [1e4, 1.0, 1.0], None),
    ("first a spike, no start held", [1e4, 1.0, 1.0], None),
    ("first a spike, no rollback left", [1e4, 1.0, 1.0], None),
])
def test_a_spike_the_bound_could_not_hold_rolls_back_to_the_start_without_a_cut(case, norms, rollback_at):
    """The per-element bound has no history in a tensor's first two steps and is loose through
    ``spike_warmup`` records: a grad norm ``warmup_grad_factor`` (100) times its neighbours'
    there went (partly) into v, and the run goes back to the start; the lr was not at fault, so
    the scale stays 1."""
    window = 5 if "in the loose" in case else 4 if "past the loose" in case else 0  # spike_warmup
    ctl = Controller(explicit_config(max_rollbacks=0 if "no rollback" in case else 3, spike_warmup=window), 1)
    if "no start" not in case:
        ctl.start_taken()
    decisions = []
    for n, norm in enumerate(norms, start=1):
        ctl.command(n, [1e-3])
        applied = 0.0 if "not written" in case and n == 1 else None
        decisions.append(ctl.observe(make_record(n, grad_sq=norm ** 2, applied=applied), n))
    assert [n for n, d in enumerate(decisions, start=1) if d["rollback_to"] is not None] == \
        ([rollback_at] if rollback_at else [])
    rollbacks = [e for e in ctl.events if e.action == "rollback"]
    if rollback_at:
        assert [(e.detail["why"], e.detail["to_step"]) for e in rollbacks] == [("unbounded_spike", 0)]
        assert ctl.command(len(norms) + 1, [1e-3]).scale == [1.0]
        assert ctl.recovery.start_held  # records after the rollback are judged afresh from the start
        assert ctl.recovery.start_records == len(norms) - rollback_at
    else:
        assert not rollbacks
    if "no rollback" in case:
        refused = [e for e in ctl.events if e.action == "rollback_refused"]
        assert [(e.detail["why"], e.bound) for e in refused] == [("unbounded_spike", "max_rollbacks")]
        assert not ctl.recovery.start_held


def test_the_start_is_let_go_after_early_records_and_when_the_budget_is_spent():
    config = explicit_config(early_records=5, max_rollbacks=1)
    ctl = Controller(config, 1)
    ctl.start_taken()
    decisions = _from_start(ctl, [2.0, 1.9, 1.8, 1.7, 1.6, 1.5])
    assert [d["release_start"] for d in decisions] == [False] * 5 + [True]
    assert not ctl.recovery.start_held
    assert all(d["rollback_to"] is None for d in _from_start(ctl, [9.0, 9.0, 9.0], first=7))

    ctl = Controller(config, 1)
    ctl.start_taken()
    first = _from_start(ctl, [2.0, 3.0, 3.0])
    assert first[-1]["rollback_to"] == 0
    again = _from_start(ctl, [2.0, 3.0, 3.0], first=4)  # it diverges again: no rollback left
    assert [d["rollback_to"] for d in again] == [None] * 3 and again[-1]["release_start"]
    refused = [e for e in ctl.events if e.action == "rollback_refused"]
    assert [(e.detail["why"], e.bound) for e in refused] == [("diverged_from_start", "max_rollbacks")]
    assert not ctl.recovery.start_held


def _after_a_start_rollback(config, lrs, records=300, first_loss=2.0):
    """A rollback to the start, then healthy records at these scheduler lrs ``lrs(n)``; the
    controller and the effective lrs it issued."""
    ctl = Controller(config, 1)
    ctl.start_taken()
    issued = []
    for n in range(1, records):
        scale = ctl.command(n, [lrs(n)]).scale[0]
        issued.append(scale * lrs(n))
        loss = first_loss * (1.0 if n == 1 else 1.25 if n <= 3 else 0.75)  # back to the start at record 3
        ctl.observe(make_record(n, loss=loss, lrs=lrs(n), scale=scale), n)
    return ctl, issued


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_after_a_rollback_to_the_start_the_climb_back_stops_at_the_scale_it_continued_from(lr):
    """The first steps at lr made the model worse than it began: however healthy the records
    after it, the scale never climbs back above the one the run continued from (start_cap), a
    fraction of the schedule's lr: a warmup still reaches that fraction of its peak (no latch at
    min_scale), a decay keeps it. Without the cap the climb returns to the schedule's lr."""
    config = explicit_config(start_rise=0.2)
    schedules = {"constant": lambda n: lr, "warmup": lambda n: lr * min(1.0, n / 100),
                 "decay": lambda n: lr * 0.99 ** n}
    for name, lrs in schedules.items():
        ctl, issued = _after_a_start_rollback(config, lrs)
        cap = issued[2] / lrs(3) * config.rollback_scale  # record 3's scale (the envelope may cap it)
        assert ctl.governor.start_cap == [pytest.approx(cap)], name
        scales = [x / lrs(n) for n, x in enumerate(issued, start=1)][3:]
        assert all(x <= max(cap, config.min_scale) * (1 + 1e-9) for x in scales), name
        assert scales[-1] == pytest.approx(max(cap, config.min_scale)), name
    free, issued = _after_a_start_rollback(explicit_config(start_rise=0.2, start_cap=False), lambda n: lr)
    assert free.governor.start_cap == [None] and issued[-1] == pytest.approx(lr)


def test_the_start_cap_is_kept_through_data_changes_and_state_and_only_lowered():
    config = explicit_config(start_rise=0.2)
    ctl, _ = _after_a_start_rollback(config, lambda n: 1e-3, records=40)
    (cap,) = ctl.governor.start_cap
    assert cap == pytest.approx(config.rollback_scale)
    ctl.notify_data_change(40)  # the cap is about the lr, not the data
    assert ctl.governor.start_cap == [cap] and ctl.command(41, [1e-3]).scale[0] == pytest.approx(cap)
    twin = Controller(config, 1)
    twin.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert twin.governor.start_cap == [cap]
    old = ctl.state_dict()
    del old["governor"]["start_cap"]  # a state saved before the cap existed has none
    twin.load_state_dict(old)
    assert twin.governor.start_cap == [None]
    gov = ctl.governor  # a later rollback to the start from a lower scale lowers it; a higher one does not
    gov.on_rollback([1e-3], [0.2], to_start=True)
    assert gov.start_cap == [pytest.approx(0.1)]
    gov.on_rollback([1e-3], [1.0], to_start=True)
    assert gov.start_cap == [pytest.approx(0.1)]
    gov.on_rollback([1e-3], [1.0])  # a rollback to a snapshot sets no cap
    assert gov.start_cap == [pytest.approx(0.1)]


def test_the_start_round_trips_through_the_controller_state():
    config = explicit_config()
    ctl = Controller(config, 1)
    ctl.start_taken()
    _from_start(ctl, [2.0, 2.5])
    twin = Controller(config, 1)
    twin.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert twin.recovery.start_held and twin.recovery.start_loss == 2.0 and twin.recovery.start_above == [1]
    assert _from_start(twin, [2.5], first=3)[-1]["rollback_to"] == 0
    old = ctl.state_dict()
    for k in ("start_held", "start_loss", "start_records", "start_above", "start_grads"):
        del old["recovery"][k]  # a state saved before the start existed
    twin = Controller(config, 1)
    twin.load_state_dict(old)
    assert not twin.recovery.start_held and twin.recovery.start_loss is None


def test_a_loss_spike_right_after_an_applied_gradient_spike_rolls_back():
    config = explicit_config()
    sim = Sim(config, snapshot_every=5)
    faults = {33: dict(grad_sq=1e6, spikes=900.0), 34: dict(loss=9.0)}  # 33 written (clamped), 34 damaged
    sim.run(40, noisy(faults=faults))
    rollback = [e for e in sim.events if e.action == "rollback"]
    assert [(e.step, e.detail["why"], e.detail["to_step"]) for e in rollback] == [(34, "spike_damage", 30)]
    # An isolated loss spike (no gradient spike applied before it) is only a skip.
    sim = Sim(config, snapshot_every=5).run(40, noisy(faults={34: dict(loss=9.0)}))
    assert not [e for e in sim.events if e.action == "rollback"]
    assert actions(sim.events, "skip") == [(34, "skip")]
    # A gradient spike the device did not apply (skipped) cannot have done damage.
    sim = Sim(config, snapshot_every=5).run(40, noisy(faults={33: dict(grad_sq=1e6, applied=0.0), 34: dict(loss=9.0)}))
    assert not [e for e in sim.events if e.action == "rollback"]


def test_a_loss_spike_in_the_same_record_as_a_gradient_spike_is_not_damage():
    config = explicit_config(loss_check=False)  # the device writes the (clamped) step
    sim = Sim(config, snapshot_every=5)
    sim.run(40, noisy(faults={33: dict(grad_sq=1e6, spikes=900.0, loss=9.0)}))  # a bad batch: both at once
    assert actions(sim.events, "skip") == [(33, "skip")]
    assert not [e for e in sim.events if e.action == "rollback"], actions(sim.events)


# ---------------------------------------------------------------------------- give-up
def _persistent_nonfinite(give_up_after, max_rollbacks=0, snapshot_every=None, start=11, steps=120):
    config = explicit_config(give_up_after=give_up_after, max_rollbacks=max_rollbacks)
    sim = Sim(config, snapshot_every=snapshot_every)
    spec = noisy(faults={n: dict(nonfinite=5.0) for n in range(start, 10_000)})
    sim.run(steps, spec, stop_on_give_up=True)
    return config, sim


@pytest.mark.parametrize("give_up_after", [
    8, 12, 25,
    3,
])
def test_persistent_trouble_with_no_rollback_left_gives_up_after_give_up_after_records(give_up_after):
    config, sim = _persistent_nonfinite(give_up_after)
    gave_up = [(s, d) for _, s, d in sim.decisions if d["give_up"] is not None]
    assert gave_up, "trouble persisted without a give-up: skipping forever"
    step, decision = gave_up[0]
    assert step == 11 + give_up_after - 1  # the give_up_after-th record in trouble
    evidence = decision["give_up"]
    assert evidence["why"] == "persistent_trouble" and evidence["consecutive_trouble"] == give_up_after
    assert "nonfinite" in evidence["reasons"] and evidence["recent"]
    assert all(s < step for s, _ in evidence["recent"][:-1]) and evidence["recent"][-1][0] == step


def test_persistent_trouble_uses_the_rollback_budget_then_gives_up():
    config = explicit_config(give_up_after=12, max_rollbacks=2)
    sim = Sim(config, snapshot_every=5)
    spec = noisy(faults={n: dict(nonfinite=5.0) for n in range(31, 10_000)})
    sim.run(200, spec, stop_on_give_up=True)
    events = sim.events
    rollbacks = [e for e in events if e.action == "rollback"]
    assert len(rollbacks) == config.max_rollbacks
    assert all(e.detail["why"] == "persistent_trouble" and e.detail["distance"] <= config.max_rollback_distance
               for e in rollbacks)
    assert [e.bound for e in events if e.action == "rollback_refused"][:1] == ["max_rollbacks"]
    assert sim.decisions[-1][2]["give_up"] is not None


def test_accept_give_up_restarts_and_the_next_give_up_needs_new_evidence():
    config, sim = _persistent_nonfinite(10)
    assert sim.decisions[-1][2]["give_up"] is not None
    sim.controller.accept_give_up()
    assert sim.controller.recovery.consecutive_trouble == 0 and sim.controller.detectors.grad.count == 0
    spec = noisy(faults={n: dict(nonfinite=5.0) for n in range(1, 10_000)})
    before = len(sim.decisions)
    sim.run(50, spec, stop_on_give_up=True)
    assert len(sim.decisions) - before == 10  # gives up again, after give_up_after more records


def test_guard_raises_guard_gave_up_or_calls_the_hook_and_continues():
    config = explicit_config(give_up_after=8, max_rollbacks=0)
    driver = GuardDriver(config)
    for _ in range(15):
        driver.step()
    with pytest.raises(GuardGaveUp) as info:
        for _ in range(30):
            driver.step(nonfinite=4.0)
    assert info.value.evidence["why"] == "persistent_trouble"
    assert info.value.evidence["consecutive_trouble"] == 8
    assert "gave up" in str(info.value)
    # it crosses process boundaries (a worker pool's result) with its message and evidence
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is GuardGaveUp and str(again) == str(info.value) and same(again.evidence, info.value.evidence)
    assert [e.action for e in driver.guard.events if e.action == "give_up"] == ["give_up"]

    calls = []
    driver = GuardDriver(config, on_give_up=calls.append)
    for _ in range(15):
        driver.step()
    for _ in range(30):
        driver.step(nonfinite=4.0)  # the hook returns: the guard restarts its statistics and goes on
    for _ in range(5):
        driver.step()
    assert len(calls) == 3 and all(isinstance(c, GuardGaveUp) for c in calls)
    assert driver.opt.num_steps == 50 and driver.guard.summary()["actions"]["give_up"] == 3
    assert driver.guard.controller.recovery.consecutive_trouble == 0


@pytest.mark.parametrize("saved", [False, True])
def test_a_run_resumed_without_its_snapshots_snapshots_at_once(saved):
    """The default checkpoint leaves the snapshots out: the resumed guard snapshots on its first
    stable step, so non-finite parameters soon after the resume roll back to it instead of
    giving up for a whole snapshot interval. A checkpoint with its snapshots keeps the spacing."""
    interval = 20
    config = explicit_config(snapshot_interval=interval, snapshots_in_state_dict=saved)
    first = GuardDriver(config, seed=random.randint(0, 1000))
    for _ in range(30):
        first.step()
    state = first.opt.state_dict()
    last = state["guard"]["last_snapshot"]
    assert 35 - interval < last <= 30 and ("snapshots" in state["guard"]) == saved  # the next one due after step 35
    second = GuardDriver(config, seed=random.randint(0, 1000), on_give_up=lambda exc: None)
    second.opt.load_state_dict(state)
    values = {}
    for n in range(31, 36):
        second.step()
        values[n] = second.params[0].detach().clone()
    second.step(param_sq=math.nan)  # step 36 reports non-finite parameters
    second.step()  # its record is processed here (lag 1)
    (back,) = [e for e in second.guard.events if e.action in ("rollback", "give_up") and e.step > 30]
    assert back.action == "rollback"
    to = back.detail["to_step"]
    assert (31 <= to < 36) if not saved else to == last  # the newest verified snapshot
    if not saved:
        torch.testing.assert_close(second.params[0].detach(), values[to], rtol=0, atol=0)


# ---------------------------------------------------------------------------- governor
def test_governor_cuts_on_sustained_oscillation_rate_limited_within_bounds():
    config = explicit_config()
    sim = Sim(config)
    sim.run(30, lambda n, cmd: dict(omega=1.0))
    sim.run(60, lambda n, cmd: dict(omega=0.1))  # sustained oscillation from step 31
    cuts = [e for e in sim.events if e.action == "decrease_scale"]
    assert cuts and all(e.detail["why"] == "oscillation" and e.detail["group"] == 0 for e in cuts)
    assert cuts[0].step > 31 + 1  # not on the first low record: the filtered omega needs evidence
    assert all(b.step - a.step >= config.cut_interval for a, b in zip(cuts, cuts[1:]))
    for e in cuts:
        assert e.detail["to_lr"] == pytest.approx(max(config.min_scale * 1e-3, e.detail["from_lr"] * config.cut_factor))
        assert e.detail["omega"] < config.omega_low
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert all(config.min_scale <= s <= 1.0 for s in scales)
    assert scales[-1] < 1.0 and all(s == 1.0 for s in scales[:32])
    assert [(e.action, e.bound) for e in sim.events if e.action in ("cap_scale", "recap")][:1] == \
        [("cap_scale", "oscillation")]


def _start(loss_fall: float, cos: float, predicted: float, start: int = 1, omega=1.0):
    """Records from ``start`` on whose steps each predict a loss decrease of ``predicted``; the
    loss falls by ``loss_fall`` x that per step (with a little noise) and the gradient has cosine
    ``cos`` with the previous step's direction; omega stays healthy (or undefined: None)."""
    rng = random.Random(start)

    def spec(n, cmd):
        if n < start:
            return dict(omega=omega, loss=4.0 + 0.01 * rng.uniform(-1, 1))
        loss = 4.0 - loss_fall * predicted * (n - start) + 0.01 * rng.uniform(-1, 1)
        return dict(omega=omega, gdu=-predicted, gdp=cos, loss=loss)
    return spec


def _catapult(n, cmd):
    """A start whose second step overshoots (the loss rises, against a large predicted fall)
    and whose later steps recover all of it and more, with gradients turning against the last
    step (as an MLP language model at its best lr did): since the start, the loss follows the
    prediction well enough; a window of the last steps alone would not."""
    losses = [5.7, 3.7, 4.7, 3.5, 3.5, 3.2, 3.3, 3.05, 2.55, 2.8, 2.85, 2.65, 2.65, 2.45]
    predicted = [2.6, 2.0, 5.7, 0.55, 0.3, 0.4, 0.3, 0.4, 0.25, 0.15, 0.15, 0.15, 0.15, 0.15]
    k = min(n - 1, len(losses) - 1)
    return dict(omega=1.0, gdu=-predicted[k], gdp=-0.02, loss=losses[k] if n <= len(losses) else 2.4)


@pytest.mark.parametrize("omega", [1.0, None])
def test_governor_cuts_a_start_whose_loss_does_not_follow_the_predicted_decrease(omega):
    config = explicit_config(efficiency_records=30)  # room for more than one cut
    sim = Sim(config).run(60, _start(loss_fall=0.02, cos=-0.05, predicted=0.5, omega=omega))
    cuts = [e for e in sim.events if e.action == "decrease_scale"]
    assert len(cuts) >= 2 and all(e.detail["why"] == "overshoot" and e.detail["cos"] < 0 for e in cuts)
    # judged once the window is full, only in the first efficiency_records records, rate-limited
    assert config.efficiency_window + 1 <= cuts[0].step <= config.efficiency_records + config.lag
    assert all(e.step <= config.efficiency_records + config.lag for e in cuts)
    # after a cut the window refills with steps taken at the new ceiling before it judges again
    assert all(b.step - a.step >= config.efficiency_window + 1 for a, b in zip(cuts, cuts[1:]))
    for e in cuts:
        assert e.detail["to_lr"] == pytest.approx(max(config.min_scale * 1e-3, e.detail["from_lr"] * config.cut_factor))
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert all(config.min_scale <= s <= 1.0 for s in scales) and min(scales) < 1.0
    assert scales[-1] > min(scales)  # omega stays healthy: the ceiling climbs back


@pytest.mark.parametrize("why, spec", [
    ("the loss follows the prediction", _start(loss_fall=0.5, cos=-0.05, predicted=0.5)),
    ("a plateau whose gradients keep agreeing", _start(loss_fall=0.02, cos=0.05, predicted=0.5)),
    ("the predicted decrease is within the loss noise", _start(loss_fall=0.02, cos=-0.05, predicted=0.05)),
    ("after the first records", _start(loss_fall=0.02, cos=-0.05, predicted=0.5, start=20)),
    ("a first step that overshoots and is recovered from", _catapult),
    ("a loss that never moves (a constant passed to step)",
     lambda n, cmd: {**_start(loss_fall=0.02, cos=-0.05, predicted=0.5)(n, cmd), "loss": 4.0}),
])
def test_governor_does_not_cut_on_the_loss_efficiency_without_all_its_evidence(why, spec):
    sim = Sim(explicit_config()).run(60, spec)
    assert not [e for e in sim.events if e.action in ("decrease_scale", "cap_scale")], why
    assert all(cmd.scale[0] == 1.0 for cmd in sim.commands.values()), why


@pytest.mark.parametrize("first, decay, grad_growth, cuts", [
    # predictions dying out (0.49-0.58 of the loss over the records judged), gradients steady:
    # a healthy start near its loss floor reads so
    (0.6, 0.75, 1.0, False),
    (0.6, 0.75, 1.25, True),  # the same with the gradients rising 1.25x a record (3x by the window's sixth)
    (0.2, 1.1, 1.0, True),  # predictions growing (a warmup): 0.39-0.93 of the loss over the records judged
    (1.2, 0.9, 1.0, True),  # 1.3 of the loss predicted by the first record judged: the steps outrun the curvature
    (0.6, 0.75, 1.0, "back"),  # the first case in a run that went back to its start before: cut
])
def test_a_predicted_decrease_below_the_loss_needs_the_steps_to_keep_predicting(first, decay, grad_growth, cuts):
    """Each step predicts ``first * decay**k``; the loss falls by 2% of what was predicted; the
    gradient turns against the last step and its norm grows by ``grad_growth`` a record."""
    config = explicit_config(efficiency_large_drop=1.0, efficiency_grad_rise=3.0)
    rng = random.Random(5)
    sim = Sim(config)
    if cuts == "back":  # a rollback to the start for the lr (a rise from the start) showed it too high
        sim.controller.governor.on_rollback([1e-3], [1.0], to_start=True, cut=False)  # a fault's: not that
        assert sim.controller.governor.sent_back_for_lr is False
        sim.controller.governor.on_rollback([1e-3], [1.0], to_start=True)
        state = sim.controller.governor.state_dict()
        assert state["sent_back_for_lr"] is True
        sim.controller.governor.load_state_dict(state)  # and a resumed governor knows it
        cuts = True

    def spec(n, cmd):
        predicted = [first * decay ** k for k in range(n)]
        loss = 4.0 - 0.02 * sum(predicted[:-1]) + 0.01 * rng.uniform(-1, 1)
        return dict(omega=1.0, gdu=-predicted[-1], gdp=-0.05, loss=loss, grad_sq=grad_growth ** (2 * (n - 1)))
    sim.run(30, spec)
    overshoots = [e for e in sim.events if e.action == "decrease_scale" and e.detail["why"] == "overshoot"]
    assert bool(overshoots) == cuts
    if cuts:  # judged once the window is full, in the first records
        assert config.efficiency_window + 1 <= overshoots[0].step <= config.efficiency_records + config.lag
    else:
        assert all(cmd.scale[0] == 1.0 for cmd in sim.commands.values())


@pytest.mark.parametrize("restart, held, cap", [(True, True, True), (True, True, False), (True, False, True),
                                                (False, True, True)])
def test_a_first_overshoot_while_the_start_is_held_restarts_the_run_once_at_a_lower_lr(restart, held, cap):
    config = explicit_config(efficiency_records=30, overshoot_restart=restart, start_cap=cap)  # room for more than one cut
    sim = Sim(config)
    if held:
        sim.controller.start_taken()
    sim.run(160, _start(loss_fall=0.02, cos=-0.05, predicted=0.5))  # long enough for the climb back
    cuts = [e for e in sim.events if e.action == "decrease_scale" and e.detail["why"] == "overshoot"]
    backs = [e for e in sim.events if e.action == "rollback"]
    assert len(cuts) >= 2
    if not (restart and held):
        assert not backs and sim.controller.accounting.rollbacks == 0
        return
    # the first cut sends the run back to the start; later ones only cut
    assert [(e.step, e.detail["why"], e.detail["to_step"]) for e in backs] == [(cuts[0].step, "overshoot", 0)]
    assert sim.controller.accounting.rollbacks == 1 and sim.controller.recovery.returned_to_start
    rolled = [d for _, _, d in sim.decisions if d["rollback_to"] is not None]
    assert len(rolled) == 1 and rolled[0]["rollback_cuts_lr"] is False  # the governor's cut is the lr change
    # the restarted run starts at restart_cut of the lr it overshot at (the cut event says so;
    # no further halving), and is judged afresh: its next cut needs a full efficiency window of
    # its own records
    after = sim.commands[cuts[0].step + config.lag + 1].scale[0]
    assert after == pytest.approx(cuts[0].detail["to_lr"] / 1e-3)
    assert after == pytest.approx(config.restart_cut * cuts[0].detail["from_lr"] / 1e-3)
    # omega stays healthy: without start_cap the ceiling climbs back above that lr, with it never
    later = [cmd.scale[0] for n, cmd in sim.commands.items() if n > cuts[0].step + config.lag]
    assert max(later) <= after * (1 + 1e-12) if cap else max(later) > after
    assert sim.controller.governor.start_cap == ([pytest.approx(after)] if cap else [None])
    assert cuts[1].step - cuts[0].step >= config.efficiency_window + 1
    assert all(config.min_scale <= cmd.scale[0] <= 1.0 for cmd in sim.commands.values())
    # the state carries the restart: a resumed controller does not restart again
    resumed = Controller(config, 1)
    resumed.load_state_dict(copy.deepcopy(sim.controller.state_dict()))
    assert resumed.recovery.returned_to_start


@pytest.mark.parametrize("bulk_at_floor", [True, False])
def test_an_overshoot_restart_needs_a_cut_that_lowers_most_parameters_lr(bulk_at_floor):
    """Going back to the start redoes the start at the cut lr. Where the group holding most of
    the parameters already sits at min_scale (the update envelope held its first steps there),
    the cut lowers only the small group above it: no restart, the cut alone. Where the cut
    lowers the bulk, the run restarts."""
    config = explicit_config(efficiency_records=30, overshoot_restart=True, max_update_ratio=1.0)
    sim = Sim(config, groups=2)
    sim.controller.start_taken()
    numel = [random.randint(500, 5000), random.randint(1, 20)]  # a matrix group, a vector group
    if not bulk_at_floor:
        numel.reverse()
    overshoot = _start(loss_fall=0.02, cos=-0.05, predicted=0.5)
    # group 0's first steps move its matrices by 100x their norm: the envelope holds it at min_scale
    sim.run(config.early_records - 2, lambda n, cmd: {**overshoot(n, cmd), "ratio": [100.0 * cmd.scale[0], None],
                                                      "numel": numel})
    cuts = [e for e in sim.events if e.action == "decrease_scale" and e.detail["why"] == "overshoot"]
    assert cuts and {e.detail["group"] for e in cuts} == {1}  # group 0 was at its floor
    # (from the first command issued after a record of it)
    assert all(sim.commands[n].scale[0] == pytest.approx(config.min_scale) for n in sim.commands if n > 1 + sim.lag)
    backs = [e for e in sim.events if e.action == "rollback"]
    if bulk_at_floor:
        assert not backs and sim.controller.accounting.rollbacks == 0
        assert sim.controller.governor.start_cap == [None, None]
    else:
        assert [(e.detail["why"], e.detail["to_step"]) for e in backs] == [("overshoot", 0)]
        assert sim.controller.recovery.returned_to_start


def test_no_overshoot_restart_for_a_run_that_already_went_back_to_its_start():
    """A run sent back to its start (here: its loss rose above the start's) continues from an lr
    chosen on evidence; an overshoot found after that cuts in place."""
    config = explicit_config(efficiency_records=30, overshoot_restart=True)
    sim = Sim(config)
    sim.controller.start_taken()
    slow = _start(loss_fall=0.02, cos=-0.05, predicted=0.5)
    sim.run(80, lambda n, cmd: dict(omega=1.0, loss=6.0) if n in (2, 3) else slow(n, cmd))
    backs = [(e.detail["why"], e.detail["to_step"]) for e in sim.events if e.action == "rollback"]
    assert backs == [("diverged_from_start", 0)]
    assert [e for e in sim.events if e.action == "decrease_scale" and e.detail["why"] == "overshoot"]


def test_governor_follows_worsening_oscillation_down_to_min_scale_and_no_further():
    config = explicit_config()
    sim = Sim(config)
    sim.run(30, lambda n, cmd: dict(omega=1.0))
    sim.run(120, lambda n, cmd: dict(omega=0.3 * 0.9 ** (n - 30)))  # oscillation getting ever worse
    cuts = [e for e in sim.events if e.action == "decrease_scale"]
    assert all(b.step - a.step >= config.cut_interval for a, b in zip(cuts, cuts[1:]))
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert all(config.min_scale <= s <= 1.0 for s in scales)
    assert scales[-1] == pytest.approx(config.min_scale)
    assert len(cuts) == math.ceil(math.log(config.min_scale) / math.log(config.cut_factor))  # none at the floor


def test_governor_ignores_a_single_low_omega_record():
    config = explicit_config()
    sim = Sim(config).run(80, lambda n, cmd: dict(omega=0.1 if n == 40 else 1.0))
    assert not [e for e in sim.events if e.action in INTERVENING]
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())


def test_governor_pools_the_evidence_of_every_group():
    """One layer group oscillating alone (as the last layer does at the best lr) is not enough;
    every group oscillating is, and the cut keeps their lr ratios (LoRA+)."""
    config = explicit_config()
    sim = Sim(config, groups=4).run(80, lambda n, cmd: dict(omega=[1.0, 1.0, 1.0, 0.1]))
    assert not [e for e in sim.events if e.action == "decrease_scale"]
    sim = Sim(config, groups=2)
    sim.run(60, lambda n, cmd: dict(omega=[0.05, 0.05]), lrs=[1e-3, 16e-3])
    cuts = [e for e in sim.events if e.action == "decrease_scale"]
    assert {e.detail["group"] for e in cuts} == {0, 1}
    last = sim.commands[sim.step]
    assert last.scale[0] == pytest.approx(last.scale[1])


def test_governor_does_not_cut_when_v_remembers_larger_gradients_than_the_recent_ones():
    """omega (m against v) reads low after large early gradients although the gradients do not
    cancel; omega_recent (m against the recent gradients) tells the two apart."""
    config = explicit_config()
    sim = Sim(config).run(120, lambda n, cmd: dict(omega=0.02, recent=1.3))
    assert not [e for e in sim.events if e.action == "decrease_scale"]
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())
    sim = Sim(config).run(120, lambda n, cmd: dict(omega=0.02, recent=0.5))  # cancelling: cut
    assert [e for e in sim.events if e.action == "decrease_scale"]
    sim = Sim(explicit_config(omega_recent_max=None)).run(120, lambda n, cmd: dict(omega=0.02, recent=1.3))
    assert [e for e in sim.events if e.action == "decrease_scale"]  # None: omega alone decides


def test_governor_needs_beta1_to_confirm_a_cut():
    """Without beta1 (a tensor beta on a device) omega_recent is unknown: no cut rests on it."""
    sim = Sim(explicit_config()).run(120, lambda n, cmd: dict(omega=0.02, beta1=None))
    assert not [e for e in sim.events if e.action == "decrease_scale"]
    sim = Sim(explicit_config(omega_recent_max=None)).run(120, lambda n, cmd: dict(omega=0.02, beta1=None))
    assert [e for e in sim.events if e.action == "decrease_scale"]


def test_omega_recent_is_the_momentum_energy_against_the_recent_gradients_white_noise_energy():
    from lbw_guard.guard.governor import StepSizeGovernor
    from lbw_guard.guard.signals import derive

    rng = random.Random(5)
    betas = [0.9, 0.5]
    gov = StepSizeGovernor(explicit_config(omega_window=1), 2)
    energy = [0.0, 0.0]
    for step in range(1, 8):
        g_sq = [rng.uniform(0.1, 10.0) for _ in betas]
        m_sq = [rng.uniform(0.01, 1.0) for _ in betas]
        rec = make_record(step, groups=2, grad_sq=g_sq, beta1=betas)
        for g in range(2):
            rec.record[g * C.NUM_GROUP_FIELDS + C.T_MOMENT1_SQ] = m_sq[g]
        gov.observe(derive(rec), [1.0, 1.0], [1e-3, 1e-3])
        if step > 1:  # m before step t against sum_k b1^(2k) |g_{t-1-k}|^2, pooled over the groups
            expected = sum(m / (1 - b) ** 2 for m, b in zip(m_sq, betas)) / sum(energy)
            assert gov.log_recent == pytest.approx(math.log(expected), rel=1e-12)
        energy = [b * b * e + g for b, e, g in zip(betas, energy, g_sq)]
        assert gov.grad_energy == pytest.approx(energy, rel=1e-12)
    assert gov.recent_samples == 6
    restored = StepSizeGovernor(explicit_config(omega_window=1), 2)
    restored.load_state_dict(gov.state_dict())
    assert restored.state_dict() == gov.state_dict()
    gov.on_data_change()  # the evidence restarts; the energy m carries does not
    assert gov.log_recent is None and gov.grad_energy == pytest.approx(energy)
    gov.on_rollback([1e-3, 1e-3], [1.0, 1.0])  # the moments are a snapshot's: the energy restarts
    assert gov.grad_energy == [0.0, 0.0]
    old = restored.state_dict()
    for key in ("grad_energy", "log_recent", "recent_samples"):
        del old[key]
    restored.load_state_dict(old)  # a state saved before omega_recent existed
    assert restored.grad_energy == [0.0, 0.0] and restored.log_recent is None


@pytest.mark.parametrize("share", [0.0, 0.3, 0.55, 0.9])
def test_omega_recent_reads_the_share_of_gradient_energy_that_alternates(share):
    """Gradients whose energy is a share f flipping sign every step plus white noise: the
    governor's omega_recent, fed Adam's m and the gradients, reads (1 - f) + f (1 - b1) / (1 + b1)
    (the reading ``omega_recent_max`` is set against)."""
    from lbw_guard.guard.governor import StepSizeGovernor
    from lbw_guard.guard.signals import derive

    torch.manual_seed(int(share * 100))
    b1, n = 0.9, 20_000
    direction = torch.randn(n, dtype=torch.float64)
    direction *= n ** 0.5 / direction.norm()
    gov = StepSizeGovernor(explicit_config(omega_window=50), 1)
    m = torch.zeros(n, dtype=torch.float64)
    for step in range(1, 301):
        grad = share ** 0.5 * (-1) ** step * direction + (1 - share) ** 0.5 * torch.randn(n, dtype=torch.float64)
        rec = make_record(step, grad_sq=float(grad.square().sum()), beta1=b1)
        rec.record[C.T_MOMENT1_SQ] = float(m.square().sum())  # m before this step's gradient
        gov.observe(derive(rec), [1.0], [1e-3])
        m = b1 * m + (1 - b1) * grad
    expected = (1 - share) + share * (1 - b1) / (1 + b1)
    assert math.exp(gov.log_recent) == pytest.approx(expected, rel=0.03)


def test_the_default_cuts_on_half_the_gradient_energy_alternating_not_on_mild_anticorrelation():
    """omega low with omega_recent 0.7 (a third of the energy alternating, or v's memory):
    no cut under the default ``omega_recent_max``; at 0.4 (about 60%) the cut comes."""
    default = GuardConfig().omega_recent_max
    assert default == 0.5
    config = explicit_config(omega_recent_max=default)
    sim = Sim(config).run(120, lambda n, cmd: dict(omega=0.02, recent=0.7))
    assert not [e for e in sim.events if e.action == "decrease_scale"]
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())
    sim = Sim(config).run(120, lambda n, cmd: dict(omega=0.02, recent=0.4))
    assert [e for e in sim.events if e.action == "decrease_scale"]


def test_loss_efficiency_state_is_every_record_since_the_start_and_the_whole_model_cosine():
    from lbw_guard.guard.governor import StepSizeGovernor
    from lbw_guard.guard.signals import derive

    rng = random.Random(7)
    config = explicit_config(omega_window=1)
    gov = StepSizeGovernor(config, 2)
    seen = []
    for step in range(1, config.efficiency_records + 4):
        loss, gdu = rng.uniform(1.0, 5.0), [-rng.uniform(0.0, 1.0) for _ in range(2)]
        g_sq = [rng.uniform(0.1, 4.0) for _ in range(2)]
        gdp = [rng.uniform(0.5, 1.0), rng.uniform(-0.5, 0.0)]  # a cosine >= 0 overall: no cut clears the window
        rec = make_record(step, groups=2, grad_sq=g_sq, gdu=gdu, gdp=gdp, loss=loss)  # prev_sq 1 per group
        gov.observe(derive(rec), [1.0, 1.0], [1e-3, 1e-3])
        seen.append([loss, -sum(gdu), math.sqrt(sum(g_sq))])
        if step > config.efficiency_records:  # judged in the first records only: nothing kept
            assert gov.early_losses == []
            continue
        assert len(gov.early_losses) == len(seen)
        assert sum(gov.early_losses, []) == pytest.approx(sum(seen, []), rel=1e-12)
        # one vector over both groups; the filter over one record is the sample itself
        assert gov.cos == pytest.approx(sum(gdp) / math.sqrt(sum(g_sq) * 2.0), rel=1e-12)
        if step == config.efficiency_records - 1:
            saved = gov.state_dict()
    gov.load_state_dict(saved)
    restored = StepSizeGovernor(config, 2)
    restored.load_state_dict(gov.state_dict())
    assert restored.state_dict() == gov.state_dict()
    old = gov.state_dict()
    for key in ("early_losses", "cos", "cos_samples"):
        del old[key]
    restored.load_state_dict(old)  # a state saved before the loss efficiency existed
    assert restored.early_losses == [] and restored.cos is None and restored.cos_samples == 0
    old = gov.state_dict()
    old["early_losses"] = [x[:2] for x in old["early_losses"]]
    restored.load_state_dict(old)  # saved before the grad norm was kept: none known, never a rise
    assert [x[:2] for x in restored.early_losses] == old["early_losses"]
    assert all(math.isnan(x[2]) for x in restored.early_losses) and restored.early_losses
    gov.on_rollback([1e-3, 1e-3], [1.0, 1.0])
    assert gov.early_losses == []


def test_governor_returns_to_one_when_healthy_and_never_latches():
    config = explicit_config()
    sim = Sim(config)
    sim.run(30, lambda n, cmd: dict(omega=1.0))
    sim.run(30, lambda n, cmd: dict(omega=0.05))
    low = sim.commands[sim.step].scale[0]
    assert low < 0.5
    healthy_from = sim.step + 1
    # Healthy: no oscillation (omega ~1).
    sim.run(200, lambda n, cmd: dict(omega=1.0))
    scales = [sim.commands[n].scale[0] for n in range(healthy_from, sim.step + 1)]
    assert scales[-1] == 1.0
    assert all(b - a <= config.max_scale_increase + 1e-12 for a, b in zip(scales, scales[1:]))
    assert all(b >= a - 1e-12 for a, b in zip(scales, scales[1:]))  # no cut without evidence
    assert [e.action for e in sim.events if e.action in ("cap_scale", "release_cap")][-1] == "release_cap"
    assert sim.controller.governor.ceiling == [None]  # no memory of the old cut: a later restart runs free


def _climb_after_a_cut(config, during_climb, lrs=None) -> tuple:
    """A healthy start, oscillation that cuts, then the records ``during_climb(n, cmd, s_cut)``
    while the ceiling climbs back (``s_cut``: the scale the cuts left). Returns the sim and s_cut."""
    sim = Sim(config)
    sim.run(30, lambda n, cmd: dict(omega=1.0))
    sim.run(20, lambda n, cmd: dict(omega=0.05))
    s_cut = sim.commands[sim.step].scale[0]
    sim.run(200, lambda n, cmd: during_climb(n, cmd, s_cut), lrs=lrs)
    return sim, s_cut


def _omega_falls_as_the_lr_rises(n, cmd, s_cut):
    return dict(omega=2.0 * min(1.0, s_cut / cmd.scale[0]))  # healthy at the cut's lr, lower above it


def _loss_rises_as_the_lr_rises(seed):
    rng = random.Random(seed)

    def spec(n, cmd, s_cut):  # omega healthy throughout; the loss noisy as before, higher above 1.5 s_cut
        excess = max(0.0, cmd.scale[0] / (1.5 * s_cut) - 1.0)
        return dict(omega=1.0, loss=2.0 + 0.05 * rng.gauss(0.0, 1.0) + 0.5 * excess)
    return spec


def test_governor_backs_off_a_climb_that_makes_omega_fall():
    """The climb back is a probe: when omega falls to ``release_drop`` of the highest it read
    since the climb began, after the effective lr rose past where it began, the ceiling goes
    back there, and the probe starts again."""
    config = explicit_config()
    sim, s_cut = _climb_after_a_cut(config, _omega_falls_as_the_lr_rises)
    assert s_cut < 0.5
    backs = [e for e in sim.events if e.action == "decrease_scale" and e.detail["why"] == "release_overshoot"]
    assert len(backs) >= 2 and all(b.step - a.step >= config.cut_interval for a, b in zip(backs, backs[1:]))
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert all(config.min_scale <= x <= 1.0 for x in scales)
    for e in backs:  # each climb began at the last cut's ceiling, the lowest the run had
        assert e.detail["omega"] < config.release_drop * e.detail["omega_peak"]
        assert e.detail["from_lr"] > 1.1 * e.detail["to_lr"]
        assert e.detail["to_lr"] == pytest.approx(min(scales) * 1e-3, rel=1e-9)
    # without the probe the climb goes on until omega leaves the healthy band, far higher
    free, _ = _climb_after_a_cut(explicit_config(release_drop=None), _omega_falls_as_the_lr_rises)
    assert not [e for e in free.events if e.detail.get("why") == "release_overshoot"]
    assert max(free.commands[n].scale[0] for n in sorted(free.commands)[60:]) > 1.25 * max(scales[60:])


def test_governor_does_not_back_off_when_the_lr_does_not_rise():
    """omega falling, or the loss rising, while the schedule decays under the ceiling is not the
    climb's doing."""
    config = explicit_config()
    decaying = lambda n: [1e-3 if n <= 50 else 3e-5 * 0.99 ** (n - 50)]  # from under the cuts' ceilings
    sim, _ = _climb_after_a_cut(config, lambda n, cmd, s_cut: dict(omega=max(0.7, 2.0 * 0.98 ** max(0, n - 50)),
                                                                  loss=2.0 + 0.01 * max(0, n - 50)), lrs=decaying)
    assert not [e for e in sim.events if e.detail.get("why") == "release_overshoot"]
    assert sim.commands[sim.step].scale[0] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_governor_backs_off_a_climb_that_makes_the_loss_rise(seed):
    """omega stays healthy, but the loss rises above where the climb began: back there."""
    config = explicit_config()
    sim, s_cut = _climb_after_a_cut(config, _loss_rises_as_the_lr_rises(seed))
    backs = [e for e in sim.events if e.detail.get("why") == "release_overshoot"]
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert backs and all(e.detail["evidence"] == "loss" for e in backs)
    for e in backs:
        assert e.detail["loss_mean"] > e.detail["loss_at_start"]
        assert e.detail["from_lr"] > 1.1 * e.detail["to_lr"]
        assert e.detail["to_lr"] <= 1.5 * s_cut * 1e-3  # where the loss had not risen yet
    assert all(config.min_scale <= x <= 1.0 for x in scales) and max(scales[60:]) < 3.0 * s_cut
    free, _ = _climb_after_a_cut(explicit_config(release_loss_z=None), _loss_rises_as_the_lr_rises(seed))
    assert not [e for e in free.events if e.detail.get("why") == "release_overshoot"]
    assert free.commands[free.step].scale[0] == 1.0  # without the probe: back to the commanded lr


def test_climb_probe_state_round_trips_and_loads_without_it():
    config = explicit_config()
    sim, _ = _climb_after_a_cut(config, _loss_rises_as_the_lr_rises(3))
    gov = sim.controller.governor
    assert gov.climb_peak is not None and gov.climb_lr and gov.loss_var > 0
    from lbw_guard.guard.governor import StepSizeGovernor
    restored = StepSizeGovernor(config, 1)
    restored.load_state_dict(gov.state_dict())
    assert restored.state_dict() == gov.state_dict()
    old = gov.state_dict()
    for key in ("climb_peak", "climb_lr", "climb_loss", "loss_mean", "loss_var"):
        del old[key]
    restored.load_state_dict(old)  # a state saved before the probe existed: it begins afresh
    assert restored.climb_peak is None and restored.climb_lr == {} and restored.loss_mean is None


def test_default_envelope_cap_is_released_when_omega_stays_in_the_healthy_band():
    """The default preset, on a run whose first step the envelope caps (lr 1e-3 would move the
    matrices by 150%) and whose omega then stays at 0.55-0.9, the low end of what healthy runs
    read (a Llama with init 0.002 at its best lr): the ceiling climbs back to the commanded lr
    and is dropped, with no cut on the way."""
    config = GuardConfig()
    sim = Sim(config)
    sim.controller.governor.seed_ratio([1500.0])
    rng = random.Random(11)
    sim.run(240, lambda n, cmd: dict(omega=rng.uniform(0.55, 0.9), ratio=1.5 * cmd.scale[0]))
    scales = [sim.commands[n].scale[0] for n in sorted(sim.commands)]
    assert scales[0] == pytest.approx(0.5 * config.max_update_ratio / 1.5)  # the envelope's cap
    assert scales[-1] == 1.0 and sim.controller.governor.ceiling == [None]
    # held through the early records, then x(1 + recovery_rate) per record: ~55 records to 1x
    climb = math.ceil(math.log(1.5 / (0.5 * config.max_update_ratio)) / math.log(1 + config.recovery_rate))
    first_free = scales.index(1.0)
    assert first_free <= config.early_records + climb + 5
    assert all(s == 1.0 for s in scales[first_free:])
    assert not [e for e in sim.events if e.action == "decrease_scale"]


@pytest.mark.parametrize("how", ["notify", "level_shift"])
def test_a_data_change_restarts_the_governor(how):
    """Oscillation measured on the old data says nothing of the new: a data change (announced,
    or a loss level shift with normal gradients) drops the ceilings at once, and a new cut
    needs new evidence."""
    config = explicit_config()
    sim = Sim(config, lag=0)
    rng = random.Random(3)
    sim.run(30, lambda n, cmd: healthy(n, rng, omega=1.0))
    sim.run(60, lambda n, cmd: healthy(n, rng, omega=0.05))
    low = sim.commands[sim.step].scale[0]
    assert low < 0.5
    cuts_before = len([e for e in sim.events if e.action == "decrease_scale"])
    changed_at = sim.step
    if how == "notify":
        sim.controller.notify_data_change(changed_at)
        new_level = 2.0
    else:
        new_level = 3.0  # the loss jumps; the gradients stay normal
    sim.run(100, lambda n, cmd: healthy(n, rng, omega=1.0, loss=new_level * (1 + 0.01 * (rng.random() - 0.5))))
    assert sim.controller.governor.ceiling == [None]
    assert [e for e in sim.events if e.action == "rebaseline"]
    assert len([e for e in sim.events if e.action == "decrease_scale"]) == cuts_before  # no new evidence, no cut
    # back to 1 as fast as the issued scale may rise (max_scale_increase per step)
    released = min(n for n in sim.commands if n > changed_at and sim.commands[n].scale[0] == 1.0)
    rise = math.ceil((1.0 - low) / config.max_scale_increase)
    assert released <= changed_at + config.level_shift_records + config.lag + rise + 2
    assert not [e for e in sim.events if e.action in ("rollback", "give_up")]


def test_warm_restart_without_evidence_is_never_capped():
    config = explicit_config(max_update_ratio=0.5)

    def lrs(n):  # cosine cycles of 25 steps from 1e-3 down to 1e-5, then back up at once
        t = (n - 1) % 25 / 25
        return [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t))]

    sim = Sim(config)
    # The update ratio follows the effective lr (2% of the params' norm at 1e-3).
    sim.run(150, lambda n, cmd: dict(omega=1.0, ratio=20.0 * lrs(n)[0] * cmd.scale[0]), lrs=lrs)
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())
    assert not [e for e in sim.events if e.action in INTERVENING], actions(sim.events)


def test_update_envelope_caps_a_step_outside_it():
    config = explicit_config(max_update_ratio=0.5)
    ctl = Controller(config, 1)
    ctl.governor.seed_ratio([100.0])  # 1 / rms(theta): lr 0.01 would move the params by 100%
    cmd = ctl.command(1, [0.01])
    assert cmd.scale == [pytest.approx(0.25)]  # over the trigger (0.5): cut to half of it
    assert [(e.action, e.bound) for e in ctl.events] == [("cap_scale", "update_envelope")]
    ctl = Controller(config, 1)
    ctl.governor.seed_ratio([100.0])
    assert ctl.command(1, [0.0049]).scale == [1.0]  # 49% < the trigger: no cap at all
    ctl = Controller(explicit_config(max_update_ratio=None), 1)
    ctl.governor.seed_ratio([100.0])
    assert ctl.command(1, [0.01]).scale == [1.0]  # no envelope configured


def test_governor_off_keeps_the_scale_at_one():
    config = explicit_config(governor="off", max_update_ratio=0.5)
    sim = Sim(config)
    sim.controller.governor.seed_ratio([100.0])
    sim.run(60, lambda n, cmd: dict(omega=0.05), lrs=[0.01])
    assert all(cmd.scale == [1.0] for cmd in sim.commands.values())
    assert not [e for e in sim.events if e.action in ("decrease_scale", "cap_scale")]


# ---------------------------------------------------------------------------- groups
def test_lora_plus_ratio_is_kept_through_a_cut():
    # LoRA+: B at 16x the lr of A, both oscillating: one decision cuts both by the same factor.
    config = explicit_config()
    sim = Sim(config, groups=2)
    sim.run(100, lambda n, cmd: dict(omega=[0.05 if n > 30 else 1.0] * 2), lrs=[1e-4, 1.6e-3])
    cuts = [e for e in sim.events if e.action == "decrease_scale"]
    assert cuts and {e.detail["group"] for e in cuts} == {0, 1}
    scales = [cmd.scale for cmd in sim.commands.values()]
    assert all(a == pytest.approx(b) for a, b in scales)  # the user's 16x ratio holds
    assert config.min_scale <= scales[-1][1] < 1.0
    assert all(cmd.gate == [1.0, 1.0] for cmd in sim.commands.values())


def test_a_group_whose_gradients_alone_are_nonfinite_twice_is_frozen_within_the_bound():
    config = explicit_config(freeze_steps=6)
    numel = [1000.0, 100.0]  # group 1 is 9% of the parameters: within max_frozen_fraction 0.25
    sim = Sim(config, groups=2, lag=1)
    faults = {30: dict(nonfinite=[0.0, 3.0]), 31: dict(nonfinite=[0.0, 3.0])}
    sim.run(50, lambda n, cmd: dict(numel=numel, **faults.get(n, {})))
    freeze = [e for e in sim.events if e.action == "freeze"]
    assert [(e.step, e.detail["groups"], e.detail["until"]) for e in freeze] == [(31, [1], 32 + 6)]
    gates = {n: sim.commands[n].gate for n in sim.commands}
    assert [n for n in gates if gates[n][1] == 0.0] == list(range(33, 39))  # freeze_steps steps
    assert all(g[0] == 1.0 for g in gates.values())
    # Released when a record is processed at step 38 (events carry the record's step, 37).
    assert [(e.step, e.detail["groups"]) for e in sim.events if e.action == "unfreeze"] == [(37, [1])]
    assert not [e for e in sim.events if e.action in ("rollback", "decrease_scale", "give_up")]

    # One hot record is not enough; a group over max_frozen_fraction is refused.
    sim = Sim(config, groups=2).run(50, lambda n, cmd: dict(numel=numel, **({30: faults[30]}.get(n, {}))))
    assert not [e for e in sim.events if e.action in ("freeze", "freeze_refused")]
    sim = Sim(config, groups=2).run(50, lambda n, cmd: dict(numel=[100.0, 1000.0], **faults.get(n, {})))
    assert [(e.action, e.bound, e.detail["groups"]) for e in sim.events if e.action.startswith("freeze")] == \
        [("freeze_refused", "max_frozen_fraction", [1])]
    assert all(cmd.gate == [1.0, 1.0] for cmd in sim.commands.values())


@pytest.mark.parametrize("garbled_records", [1, 2])
def test_one_record_s_garbled_size_cannot_move_the_frozen_fraction_bound(garbled_records):
    """Group sizes count for the bound once two records in a row report them. Two equal groups:
    freezing either is half the parameters, over max_frozen_fraction 0.25. A record that says
    group 0 is 3x its size (while group 1's gradients are non-finite for the second record in a
    row) would have let group 1 be frozen; two such records in a row are the sizes."""
    size = float(random.randint(10, 1000))
    config = explicit_config(freeze_steps=6)
    faults = {30: dict(nonfinite=[0.0, 3.0]), 31: dict(nonfinite=[0.0, 3.0])}
    garbled = range(31 - garbled_records + 1, 32)
    sim = Sim(config, groups=2).run(
        40, lambda n, cmd: dict(numel=[3 * size if n in garbled else size, size], **faults.get(n, {})))
    freezes = [(e.action, e.detail["groups"]) for e in sim.events if e.action.startswith("freeze")]
    if garbled_records == 1:
        assert freezes == [("freeze_refused", [1])]
        assert all(cmd.gate == [1.0, 1.0] for cmd in sim.commands.values())
    else:  # reported twice in a row: group 1 is then a quarter of the parameters
        assert freezes == [("freeze", [1])]
        assert [e.step for e in sim.events if e.action == "freeze"] == [31]


def test_a_frozen_group_with_persistently_nonfinite_gradients_lets_the_others_train():
    config = explicit_config(freeze_steps=20)
    sim = Sim(config, groups=2, snapshot_every=5)
    sim.run(60, lambda n, cmd: dict(numel=[1000.0, 100.0], nonfinite=[0.0, 3.0] if n > 30 else 0.0),
            stop_on_give_up=True)
    assert [e.detail["groups"] for e in sim.events if e.action == "freeze"][:1] == [[1]]
    assert not [e for e in sim.events if e.action in ("rollback", "give_up")], actions(sim.events)
    assert all(cmd.scale[0] == 1.0 and cmd.gate[0] == 1.0 for cmd in sim.commands.values())


# ---------------------------------------------------------------------------- monitor mode
def test_monitor_mode_never_acts():
    config = explicit_config(mode="monitor", give_up_after=8)
    sim = Sim(config, groups=2, snapshot_every=5)
    faults = {30: dict(grad_sq=1e6, spikes=900.0), 31: dict(loss=9.0), 40: dict(nonfinite=[0.0, 3.0]),
              41: dict(nonfinite=[0.0, 3.0]), 60: dict(param_sq=math.nan)}
    faults.update({n: dict(nonfinite=5.0) for n in range(70, 100)})
    sim.run(110, lambda n, cmd: dict(omega=0.1 if n > 20 else 1.0, numel=[1000.0, 100.0], **faults.get(n, {})))
    for cmd in sim.commands.values():
        assert cmd.scale == [1.0, 1.0] and cmd.gate == [1.0, 1.0]
        assert math.isinf(cmd.spike_k) and math.isinf(cmd.loss_limit) and math.isinf(cmd.grad_norm_limit)
        assert not (cmd.check_loss or cmd.precheck or cmd.mask_nonfinite or cmd.clamp)
    assert all(d["rollback_to"] is None and d["give_up"] is None for _, _, d in sim.decisions)
    events = sim.events
    assert {"skip", "decrease_scale"} <= {e.action for e in events}  # it says what it would do...
    assert all(not e.applied for e in events)  # ...and that it did not
    assert sim.controller.events.applied_interventions == 0


# ---------------------------------------------------------------------------- events, state
def test_event_log_is_a_bounded_ring_with_exact_counters():
    log = EventLog(5)
    for i in range(12):
        log.add(Event(step=i, regime="stable", action="skip" if i % 3 else "freeze", applied=i % 2 == 0))
    assert len(log) == 5 and [e.step for e in log] == [7, 8, 9, 10, 11]
    assert dict(log.counts) == {"skip": 8, "freeze": 4} and log.dropped == 7
    assert log.applied_interventions == 6
    twin = EventLog(5)
    twin.load_state_dict(pickle.loads(pickle.dumps(log.state_dict())))
    assert [e.step for e in twin] == [7, 8, 9, 10, 11] and twin.counts == log.counts

    config = explicit_config(event_capacity=10)
    sim = Sim(config).run(200, noisy(faults={n: dict(spikes=900.0) for n in range(20, 200, 3)}))
    ctl = sim.controller
    skips = len(range(20, 199, 3))  # every spike record processed so far
    assert len(ctl.events) == 10 and ctl.events.counts["skip"] == skips
    assert ctl.events.dropped == sum(ctl.events.counts.values()) - 10
    assert len(ctl.state_dict()["events"]["events"]) == 10


def _faulty_spec(seed=3):
    faults = {25: dict(grad_sq=1e6, spikes=900.0), 26: dict(loss=9.0), 44: dict(nonfinite=[0.0, 2.0]),
              45: dict(nonfinite=[0.0, 2.0]), 60: dict(param_sq=math.nan), 80: dict(loss=5.0), 81: dict(loss=5.0)}

    def spec(n, cmd):  # the same record for the same step, whoever asks
        low = 0.1 if 50 < n < 70 else 1.0  # the whole model oscillates for a while
        kw = healthy(n, random.Random(seed * 1000 + n), numel=[1000.0, 100.0], omega=[low, low], gdp=[0.0, 0.3])
        kw.update(faults.get(n, {}))
        return kw

    return spec


@pytest.mark.parametrize("cut_at", [24, 27, 46, 61, 81])
def test_controller_state_dict_round_trips_mid_run(cut_at):
    config = explicit_config(freeze_steps=5)
    spec = _faulty_spec()
    sim = Sim(config, groups=2, snapshot_every=5)
    sim.run(cut_at, spec)
    state = pickle.loads(pickle.dumps(sim.controller.state_dict()))
    twin = Sim(config, groups=2, snapshot_every=5, step=sim.step, pending=copy.deepcopy(sim.pending))
    twin.controller.load_state_dict(state)
    assert same(twin.controller.state_dict(), sim.controller.state_dict())
    sim.run(100 - cut_at, spec)
    twin.run(100 - cut_at, _faulty_spec())
    assert [(e.step, e.action, e.detail, e.bound, e.regime) for e in twin.events] == \
        [(e.step, e.action, e.detail, e.bound, e.regime) for e in sim.events]
    assert [(n, s, d["rollback_to"], d["give_up"] is None) for n, s, d in twin.decisions] == \
        [(n, s, d["rollback_to"], d["give_up"] is None) for n, s, d in sim.decisions[-len(twin.decisions):]]
    assert {n: (c.scale, c.gate, c.loss_limit) for n, c in twin.commands.items()} == \
        {n: (c.scale, c.gate, c.loss_limit) for n, c in sim.commands.items() if n > cut_at}
    assert same(twin.controller.state_dict(), sim.controller.state_dict())
    acts = {e.action for e in sim.events}
    assert {"skip", "rollback", "freeze", "decrease_scale", "rebaseline"} <= acts


def test_load_state_dict_rejects_an_unknown_regime():
    ctl = Controller(explicit_config(), 1)
    state = ctl.state_dict()
    state["regime"] = "panicking"
    with pytest.raises(ValueError, match="regime"):
        Controller(explicit_config(), 1).load_state_dict(state)


def test_controller_never_raises_on_an_out_of_contract_omega():
    ctl = Controller(explicit_config(), 1)
    rec = make_record(1)
    rec.record[C.G_OMEGA_LOG_SUM], rec.record[C.G_OMEGA_COUNT] = 1e4, 1.0
    decision = ctl.observe(rec, 1)
    assert decision["give_up"] is None


def test_a_huge_finite_loss_does_not_poison_the_loss_limit():
    ctl = Controller(explicit_config(warmup_steps=3), 1)
    for n, loss in enumerate([2.0, 1e200, 2.0, 2.0, 2.0, 2.0], 1):
        ctl.command(n, [1e-3])
        ctl.observe(make_record(n, loss=loss), n)
    limit = ctl.command(7, [1e-3]).loss_limit
    assert not math.isnan(limit)


def test_whole_model_cosine_survives_norms_whose_product_underflows():
    """|g|^2 and |d|^2 of 1e-200 each: their product is 0.0 in floats, their norms' is not."""
    from lbw_guard.guard.governor import StepSizeGovernor
    from lbw_guard.guard.signals import derive

    rec = make_record(5, grad_sq=1e-200, gdp=-5e-201)
    rec.record[C.T_PREV_SQ] = 1e-200
    assert StepSizeGovernor._whole_model_cos(derive(rec), [0]) == pytest.approx(-0.5)


# ---------------------------------------------------------------------------- lr spikes
def _lr_gates(config, lrs_per_step, groups=1):
    """The gates the controller issues for each step's lrs (no records: the rule is decided at
    command time), and its events."""
    ctl = Controller(config, groups)
    gates = [ctl.command(n, lrs).gate for n, lrs in enumerate(lrs_per_step, 1)]
    return gates, ctl


@pytest.mark.parametrize("factor", [20.0, 1e3])
def test_a_one_step_lr_spike_is_skipped_and_the_schedule_goes_on(factor):
    rng = random.Random(int(factor))
    base = 10 ** rng.uniform(-5, -2)
    spike_at = rng.randint(12, 30)
    lrs = [[base * (1 + 0.01 * rng.random()), base] for _ in range(40)]
    lrs[spike_at - 1] = [lrs[spike_at - 1][0] * factor, base]  # group 0 only
    gates, ctl = _lr_gates(explicit_config(spike_warmup=10), lrs, groups=2)
    assert [n for n, g in enumerate(gates, 1) if g != [1.0, 1.0]] == [spike_at]
    assert gates[spike_at - 1] == [0.0, 1.0]
    skips = [e for e in ctl.events if e.action == "skip"]
    assert [(e.step, e.detail["why"], e.detail["group"], e.bound) for e in skips] == \
        [(spike_at, "lr_spike", 0, "lr_spike_factor")]
    assert skips[0].detail["lr"] == lrs[spike_at - 1][0]
    assert skips[0].detail["peak_lr"] == max(lr for lr, _ in lrs[:spike_at - 1])
    assert ctl.recovery.lr_peak[0] == max(lr for n, (lr, _) in enumerate(lrs, 1) if n != spike_at)


@pytest.mark.parametrize("records", [1, 2, 3])
def test_an_lr_that_stays_up_is_the_users_after_level_shift_records_skipped_steps(records):
    lrs = [[1e-4]] * 15 + [[1e-2]] * 10  # a deliberate 100x bump at step 16
    gates, ctl = _lr_gates(explicit_config(level_shift_records=records, spike_warmup=10), lrs)
    skipped = [n for n, g in enumerate(gates, 1) if g == [0.0]]
    assert skipped == list(range(16, 16 + records))
    shift = [e for e in ctl.events if e.action == "rebaseline"]
    assert [(e.step, e.detail["why"], e.detail["records"]) for e in shift] == [(16 + records, "lr_level_shift", records)]
    assert ctl.recovery.lr_peak == [1e-2] and ctl.recovery.lr_spike_streak == [0]


def test_schedules_that_return_to_their_peak_or_warm_up_are_never_lr_spikes():
    import torch.optim.lr_scheduler as S

    def lrs_of(make, steps=300):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=3e-4)
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append([opt.param_groups[0]["lr"]])
            opt.step()
            sched.step()
        return out

    schedules = {
        "warm restarts to 0": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=30),
        "cyclic": lambda o: S.CyclicLR(o, base_lr=3e-6, max_lr=3e-4, step_size_up=20, cycle_momentum=False),
        "onecycle": lambda o: S.OneCycleLR(o, max_lr=3e-4, total_steps=300),
        # fastest at its second step (13x), inside the first spike_warmup steps, which only set the peak
        "warmup from 1%": lambda o: S.LinearLR(o, start_factor=0.01, total_iters=8),
        "warmup from 0": lambda o: S.LambdaLR(o, lambda k: min(1.0, k / 10)),
    }
    for name, make in schedules.items():
        gates, ctl = _lr_gates(explicit_config(spike_warmup=10), lrs_of(make))
        assert all(g == [1.0] for g in gates), name
        assert not [e for e in ctl.events if e.detail.get("why") in ("lr_spike", "lr_level_shift")], name


def test_no_lr_spike_rule_when_it_is_off_or_the_lr_cannot_be_read():
    lrs = [[1e-4]] * 12 + [[1.0]] + [[1e-4]] * 3
    gates, _ = _lr_gates(explicit_config(lr_spike_factor=None), lrs)
    assert all(g == [1.0] for g in gates)
    # an lr tensor on a device reads NaN on the host: never judged, and no peak from it
    gates, ctl = _lr_gates(explicit_config(), [[math.nan]] * 12 + [[1.0]])
    assert all(g == [1.0] for g in gates) and ctl.recovery.lr_peak == [1.0]
    gates, _ = _lr_gates(explicit_config(mode="monitor"), lrs)  # monitor mode never acts
    assert all(g == [1.0] for g in gates)


def test_an_lr_spike_counts_as_a_skipped_step_not_a_frozen_one():
    driver = GuardDriver(explicit_config(spike_warmup=10, lag=0), groups=2)
    for n in range(1, 21):
        driver.step(lrs=[1e-3 * (100 if n == 15 else 1), 1e-3 * (100 if n == 15 else 1)])
    summary = driver.guard.summary()
    assert driver.commands[15].gate == [0.0, 0.0]
    assert summary["skipped_fraction"] * summary["steps"] == pytest.approx(1.0)
    assert summary["frozen_fraction"] == 0.0
    assert driver.controller.lr_skipped == {}  # forgotten once its record was processed


def test_an_lr_spike_in_one_group_counts_as_a_partly_skipped_step():
    driver = GuardDriver(explicit_config(spike_warmup=10, lag=0), groups=2)
    for n in range(1, 21):
        driver.step(lrs=[1e-3 * (100 if n == 15 else 1), 1e-3])
    summary = driver.guard.summary()
    assert driver.commands[15].gate == [0.0, 1.0]
    assert summary["partly_skipped_fraction"] * summary["steps"] == pytest.approx(1.0)
    assert summary["skipped_fraction"] == 0.0 and summary["frozen_fraction"] == 0.0


def _per_group_paths(state, num_groups, path=()):
    """Every list in a controller state holding one entry per group."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _per_group_paths(v, num_groups, path + (k,))
    elif isinstance(state, list) and len(state) == num_groups:
        yield path


def _at(state, path):
    for k in path:
        state = state[k]
    return state


@pytest.mark.parametrize("sources", [[1, 2], [2, None, 0, 1], [None, 1], [0, 1, 2, None]])
def test_regroup_moves_every_per_group_value_with_its_group(sources):
    """A group deleted or moved takes its state with it: every per-group list of the state (found
    by walking it, so a list added later is covered) follows each group, and new groups start
    as a fresh controller's."""
    ctl = Controller(explicit_config(), 3)
    state = ctl.state_dict()
    paths = list(_per_group_paths(state, 3))
    assert len(paths) >= 12
    for i, path in enumerate(paths):  # a distinct value per list and group, of the list's type
        first = _at(state, path)[0]
        kind = str if path == ("capped",) else float if first is None else type(first)  # capped: a bound's name
        _at(state, path[:-1])[path[-1]] = [f"bound{i}.{g}" if kind is str else kind(100 * i + g + 1) for g in range(3)]
    state["governor"]["climb_lr"] = [[0, 0.5], [2, 2.5]]
    state["lr_skipped"] = [[7, [0, 2]]]
    ctl.load_state_dict(state)
    ctl.regroup(sources)
    after, fresh = ctl.state_dict(), Controller(explicit_config(), len(sources)).state_dict()
    assert after["num_groups"] == len(sources)
    for path in paths:
        expected = [_at(state, path)[s] if s is not None else _at(fresh, path)[g] for g, s in enumerate(sources)]
        assert _at(after, path) == expected, path
    old_climb = {0: 0.5, 2: 2.5}
    assert after["governor"]["climb_lr"] == [[g, old_climb[s]] for g, s in enumerate(sources) if s in old_climb]
    assert after["lr_skipped"] == [[7, [g for g, s in enumerate(sources) if s in (0, 2)]]]
