"""Config validation, statistics, detection and replay on synthetic telemetry (no model)."""

import json
import math
import random

import pytest

from lbw_guard.guard import PRESETS, Controller, GuardConfig, HostRecord, make_guard
from lbw_guard.guard.replay import main as replay_main
from lbw_guard.guard.stats import EmaStat


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(min_scale=0.0), "min_scale"),
        (dict(min_scale=1.5), "min_scale"),
        (dict(decrease_factor=1.0), "decrease_factor"),
        (dict(recovery_rate=0.2, max_scale_increase=0.1), "recover faster"),
        (dict(snapshot_interval=60, max_rollback_distance=50), "snapshot_interval"),
        (dict(diverge_spikes=20, diverge_window=10), "diverge_spikes"),
        (dict(max_frozen_fraction=1.0), "max_frozen_fraction"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(z_grad=math.nan), "z_grad"),
        (dict(mode="off"), "mode"),
        (dict(lag=1.5), "lag"),
    ],
)
def test_config_rejects_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        GuardConfig(**changes)


def test_presets_and_make_guard():
    assert PRESETS["monitor"].acts is False and PRESETS["default"].acts is True
    assert make_guard(None) is None
    assert make_guard("monitor").config.mode == "monitor"
    assert make_guard({"min_scale": 0.2}).config.min_scale == 0.2
    with pytest.raises(ValueError, match="unknown guard preset"):
        make_guard("nope")
    with pytest.raises(ValueError, match="unknown GuardConfig field"):
        GuardConfig.from_dict({"min_scal": 0.2})
    with pytest.raises(TypeError):
        make_guard(3)


def test_rejected_spike_does_not_move_the_statistic():
    rng = random.Random(0)
    stat = EmaStat(beta=0.97, warmup=20, min_std=0.05, winsor_z=3.0)
    for _ in range(200):
        stat.update(1.0 + rng.gauss(0, 0.1))
    before = stat.state_dict()
    z = stat.z(50.0)
    assert z > 100  # a spike: the controller does not fold it in
    assert stat.state_dict() == before
    stat.update(1.0 + 10 * 0.1)  # an accepted large value moves the level only boundedly
    assert stat.mean - before["mean"] <= 0.2 * 3 * math.sqrt(before["var"]) + 1e-12


def _record(step, grad_norm, loss=2.0, groups=1, lr=1e-3, applied=1.0, gate=1.0, scale=1.0):
    rows = [[grad_norm**2 / groups, (lr * 0.3) ** 2 * 1000, 1000 * 0.05**2, -lr, 0.0, 0.0, 1000.0]
            for _ in range(groups)]
    return HostRecord(step, rows, [applied] * groups, loss, [lr] * groups, [scale] * groups, [gate] * groups)


def _run(config, spikes=(), steps=120, seed=0):
    rng = random.Random(seed)
    ctl = Controller(config, 1)
    events = []
    for step in range(1, steps + 1):
        ctl.control_values(step, [1e-3])
        events += ctl.outbox
        ctl.outbox = []
        grad = 1.0 + 0.1 * rng.random()
        rec = _record(step, grad * (1e3 if step in spikes else 1.0), loss=2.0 + 0.05 * rng.random())
        events += ctl.observe(rec).events
        ctl.take_snapshot(step)
    return ctl, events


def test_spike_is_detected_and_recovered_from():
    config = GuardConfig()
    ctl, events = _run(config, spikes={60})
    actions = [(e.step, e.action) for e in events]
    assert (60, "skip") in actions and (60, "decrease_scale") in actions
    regimes = [e.detail["to"] for e in events if e.action == "transition"]
    assert regimes == ["stable", "spiking", "recovering", "stable"]
    assert ctl.aimd_scale == 1.0
    limit = ctl.grad_norm_limit()
    # the 1e3x spike did not widen the threshold: it stays at the floor's width above a
    # level of 1.0-1.1 (exp(z_grad * min_grad_log_std) = 3.3x)
    assert 1.1 < limit < 1.1 * math.exp(config.z_grad * config.min_grad_log_std) + 1e-9


def test_healthy_synthetic_run_has_no_interventions():
    _, events = _run(GuardConfig(), steps=400, seed=3)
    assert [e for e in events if e.intervention] == []


def test_monitor_mode_never_acts():
    ctl, events = _run(PRESETS["monitor"], spikes={60, 61, 62, 63, 64, 65})
    values = ctl.control_values(200, [1e-3])
    assert values.scale == [1.0] and values.gate == [1.0]
    assert math.isinf(values.grad_norm_limit) and math.isinf(values.loss_limit)
    assert events and all(not e.applied for e in events if e.intervention)


def test_persistent_trouble_rolls_back_then_rebaselines():
    config = GuardConfig(snapshot_interval=10)
    ctl, events = _run(config, spikes=set(range(60, 120)), steps=130)
    actions = [e.action for e in events]
    assert "rollback" in actions
    rollback = next(e for e in events if e.action == "rollback")
    assert rollback.detail["to_step"] < 60 and rollback.detail["distance"] <= config.max_rollback_distance
    assert "rebaseline" in actions  # the level change is finally accepted: the run never stalls


def test_replay_cli_reports_what_it_would_do(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    rng = random.Random(1)
    with open(trace, "w") as fh:
        for step in range(1, 101):
            rec = _record(step, (1.0 + 0.1 * rng.random()) * (1e4 if step == 70 else 1.0))
            fh.write(json.dumps({"type": "record", **rec.to_dict()}) + "\n")
    assert replay_main(["replay", str(trace), "--events", str(tmp_path / "ev.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "step      70" in out and "skip" in out and "1 flagged" in out
    lines = [json.loads(l) for l in open(tmp_path / "ev.jsonl")]
    assert any(l["action"] == "skip" and l["step"] == 70 and l["applied"] is False for l in lines)
    # A stricter threshold flags more; an absurdly loose one flags nothing.
    assert replay_main(["replay", str(trace), "--quiet", "--set", "z_grad=1000"]) == 0
    assert "0 flagged" in capsys.readouterr().out
    assert replay_main(["replay", str(tmp_path / "missing.jsonl")]) == 2


# ---------------------------------------------------------------- trust region
def _trust_run(config, loss_fn, steps, lr=1e-3, gdotu=-0.1, param_rms=None, seed=0, with_loss=True):
    """Records with a given loss curve and g.u, issued through control_values (lag 0)."""
    rng = random.Random(seed)
    ctl = Controller(config, 1)
    if param_rms is not None:
        ctl.set_param_rms([param_rms], [1000.0])
    events, scales = [], []
    for step in range(1, steps + 1):
        values = ctl.control_values(step, [lr])
        events += ctl.outbox
        ctl.outbox = []
        scales.append(values.scale[0])
        rows = [[1.0 + 0.1 * rng.random(), (lr * values.scale[0] * 0.3) ** 2 * 1000, 1000 * 0.05**2,
                 gdotu * values.scale[0], 0.0, 0.0, 1000.0]]
        loss = loss_fn(step, values.scale[0], rng) if with_loss else None
        rec = HostRecord(step, rows, [1.0], loss, [lr], values.scale, values.gate)
        events += ctl.observe(rec).events
    return ctl, events, scales


def test_trust_ratio_cuts_when_the_loss_rises_against_the_prediction():
    # g.u predicts a decrease of 0.1 per step, the loss climbs 0.05 per step: rho ~ -0.5.
    config = GuardConfig()
    ctl, events, scales = _trust_run(config, lambda s, sc, rng: 5.0 + 0.05 * s + 0.01 * rng.random(), 80)
    cuts = [e for e in events if e.action == "decrease_scale" and e.detail.get("why") == "trust_ratio"]
    assert cuts and cuts[0].step >= config.trust_min_records
    assert cuts[0].signals["rho"] < 0 and cuts[0].detail["rho_hi"] < config.trust_low
    gaps = [b.step - a.step for a, b in zip(cuts, cuts[1:])]
    assert all(g >= config.trust_min_records for g in gaps)  # a fresh window per ceiling
    assert ctl.trust_scale == pytest.approx(config.min_scale)
    assert min(scales) >= config.min_scale and scales[-1] == pytest.approx(config.min_scale)
    assert ctl.aimd_scale == 1.0  # independent of the AIMD scale


def test_trust_ceiling_holds_a_capped_command_until_progress_earns_a_raise():
    # lr 0.1 on rms(theta) 0.05: predicted ratio 2 > 0.2, the cap binds at 0.1 on step 1.
    config = GuardConfig()
    flat = lambda s, sc, rng: 4.0 + 0.3 * rng.gauss(0, 1)  # no evidence either way: hold
    ctl, events, scales = _trust_run(config, flat, 120, lr=0.1, param_rms=0.05)
    assert ctl.trust_scale == pytest.approx(config.min_scale)
    assert max(scales[20:]) == pytest.approx(config.min_scale)  # the cap's release was not earned
    assert not [e for e in events if e.action in ("raise_trust", "decrease_scale")]
    # The loss falls as fast as g.u predicts (rho ~ 1): the ceiling is raised, boundedly.
    fall = {"loss": 8.0}

    def falling(s, sc, rng):
        fall["loss"] += -0.1 * sc + 0.002 * rng.gauss(0, 1)
        return fall["loss"]

    ctl, events, scales = _trust_run(config, falling, 120, lr=0.1, param_rms=0.05)
    raises = [e for e in events if e.action == "raise_trust"]
    assert raises and all(e.detail["to"] <= e.detail["from"] * config.trust_increase + 1e-12 for e in raises)
    assert all(b - a <= config.max_scale_increase + 1e-12 for a, b in zip(scales, scales[1:]))
    assert ctl.trust_scale > config.min_scale


def test_trust_ceiling_needs_loss_telemetry():
    config = GuardConfig()
    ctl, events, scales = _trust_run(config, None, 60, lr=0.1, param_rms=0.05, with_loss=False)
    assert ctl.trust_scale == 1.0  # without step(loss=...) the cap releases as before
    assert scales[0] == pytest.approx(config.min_scale) and scales[-1] > scales[0]


def test_trust_region_is_silent_on_a_converged_run():
    # A flat, noisy loss with a sizeable predicted decrease (rho ~ 0, the late phase of a
    # healthy run): no cut, no raise over many windows.
    config = GuardConfig()
    for seed in range(3):
        _, events, _ = _trust_run(config, lambda s, sc, rng: 3.0 + 0.3 * rng.gauss(0, 1), 400, seed=seed)
        assert [e for e in events if e.intervention] == []
