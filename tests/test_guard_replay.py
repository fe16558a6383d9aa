"""Replay reproduces the live guard: a guarded run writes its trace (``trace_path``: a run_start
header, every processed record, the events, and marker lines for snapshots, data changes and
records dropped by a rollback); ``replay(lines, config)`` over that trace takes exactly the
live decisions (same events, same order, same steps, actions, details and bounds), also
through the CLI; several runs appended to one trace are told apart.
"""

import json
import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard_records import GuardDriver, explicit_config
from lbw_guard import cli
from lbw_guard.guard import Guard, GuardConfig, read_jsonl
from lbw_guard.guard.replay import read_runs, replay
from lbw_guard.optimizer import FusedGuardedAdamW

BACKEND = "torch"  # the reference backend: small models, exact contract


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def key(e):
    return (e.step, e.action, e.detail, e.bound, e.regime)


def assert_replay_matches(path, config, live_events):
    """Replaying the trace at ``path`` with ``config`` decides exactly what the live guard did."""
    events, *_ = replayed(path, config)
    assert [key(e) for e in events] == [key(e) for e in live_events]


def replayed(path, config, run=None):
    runs = read_runs(str(path))
    lines = runs[-1 if run is None else run - 1].records
    events, flagged, controller = replay(lines, config)
    return events, flagged, controller, runs


class Live:
    """A small guarded regression run with scripted faults (on the real optimizer)."""

    def __init__(self, config, seed=4, lr=1e-2, on_give_up=None):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        self.xs, self.ys = torch.randn(64, 16), torch.randn(64, 4)
        guard = Guard(config, on_give_up=on_give_up)
        self.opt = FusedGuardedAdamW(self.model.parameters(), lr=lr, guard=guard, backend=BACKEND)
        self.guard = guard
        self.shift = 0.0  # added to the targets: new data (the loss and the gradients move)
        self.offset = 0.0  # added to the loss: a level shift the gradients do not see

    def step(self, grad_scale=1.0, nan_grad=False, nan_loss=False, nan_param=False, loss_weight=1.0):
        params = list(self.model.parameters())
        if nan_param:
            with torch.no_grad():
                params[0].view(-1)[0] = math.nan
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.xs), self.ys + self.shift) + self.offset
        if nan_loss:
            loss = loss * math.nan
        loss = loss * loss_weight  # the loss the guard reads is weighted too
        loss.backward()
        if grad_scale != 1.0:
            for p in params:
                p.grad.mul_(grad_scale)
        if nan_grad:
            params[2].grad.view(-1)[1] = math.nan
        self.opt.step(loss=loss.detach())

    def run(self, steps, faults=None, data_change=None, notify=True, level_shift=None):
        faults = faults or {}
        for _ in range(steps):
            n = self.opt.num_steps + 1
            if data_change is not None and n == data_change:
                self.shift = 3.0  # new targets: the loss moves to a new level
                if notify:
                    self.guard.notify_data_change()
            if level_shift is not None and n == level_shift:
                self.offset = 2.0
            self.step(**faults.get(n, {}))
        return self


FAULTS = {30: dict(grad_scale=1e4), 38: dict(nan_grad=True), 44: dict(grad_scale=1e6),
          80: dict(nan_param=True), 95: dict(nan_loss=True)}


def test_replay_reproduces_the_live_decisions(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config).run(120, FAULTS, data_change=60)
    live.guard.close()
    lines = read_jsonl(path)
    assert lines[0]["type"] == "run_start" and lines[0]["config"] == config.to_dict()
    kinds = {line["type"] for line in lines}
    assert {"record", "event", "snapshot", "data_change", "dropped"} <= kinds
    records = [line for line in lines if line["type"] == "record"]
    dropped = [line["step"] for line in lines if line["type"] == "dropped"]
    assert sorted([r["step"] for r in records] + dropped) == list(range(1, 120))  # each step once (lag 1)

    events, flagged, controller, runs = replayed(path, config)
    assert len(runs) == 1
    live_events = live.guard.events
    assert [key(e) for e in events] == [key(e) for e in live_events]
    assert all(e.applied is False for e in events)
    actions = {e.action for e in live_events}
    assert {"skip", "rollback", "rebaseline", "transition"} <= actions, actions
    assert [s for s, _ in flagged] == [e.step for e in live_events if e.action == "skip"]
    assert controller.regime == live.guard.regime
    assert controller.state_dict()["recovery"] == live.guard.controller.state_dict()["recovery"]
    # The events the live guard wrote into the trace are its events, in order.
    traced = [line for line in lines if line["type"] == "event"]
    assert [(t["step"], t["action"]) for t in traced] == [(e.step, e.action) for e in live_events]


def test_replay_reproduces_a_level_shift_without_notice(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config).run(100, {30: dict(grad_scale=1e5)}, level_shift=60)
    live.guard.close()
    assert_replay_matches(path, config, live.guard.events)
    events = live.guard.events
    assert ("rebaseline", "loss_level_shift") in [(e.action, e.detail.get("why")) for e in events]


def test_replay_reproduces_parameters_joining_mid_run(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config)
    first = list(live.model.parameters())[:2]
    for p in first:
        p.requires_grad_(False)
    live.run(40)
    for p in first:  # unfrozen: stepped for the first time at step 41
        p.requires_grad_(True)
    live.run(40, {70: dict(grad_scale=1e4)})
    live.guard.close()
    assert {"type": "params_joined", "step": 40, "count": 2} in read_jsonl(path)
    assert_replay_matches(path, config, live.guard.events)
    assert ("rebaseline", "params_joined") in [(e.action, e.detail.get("why")) for e in live.guard.events]


@pytest.mark.parametrize("change, why", [
    (dict(grad_scale=8.0), "grad_level_shift"),  # the gradients x8, the loss the guard reads not
    (dict(loss_weight=8.0), "scale_level_shift"),  # a weight on the loss: both x8
])
def test_replay_reproduces_a_scale_change(tmp_path, change, why):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config).run(100, {n: dict(change) for n in range(50, 101)})  # from step 50 on
    live.guard.close()
    assert_replay_matches(path, config, live.guard.events)
    events = live.guard.events
    assert [(e.action, e.detail.get("why")) for e in events if e.action == "rebaseline"] == [("rebaseline", why)]
    assert not [e for e in events if e.action in ("rollback", "give_up", "decrease_scale")]


def test_replay_through_the_cli(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config).run(100, FAULTS, data_change=60)
    live.guard.close()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config.to_dict()))
    out_events = tmp_path / "events.jsonl"
    assert cli.main(["replay", str(path), "--config", str(cfg), "--events", str(out_events)]) == 0
    out = capsys.readouterr().out
    records = sum(1 for line in read_jsonl(path) if line["type"] == "record")
    assert f"replayed {records} records" in out and "rollback" in out
    written = read_jsonl(out_events)
    assert [(e["step"], e["action"], e["bound"]) for e in written] == \
        [(e.step, e.action, e.bound) for e in live.guard.events]
    assert all(e["applied"] is False for e in written)
    assert cli.main(["replay", str(path), "--config", str(tmp_path / "missing.json")]) == 2


def test_the_cli_replays_with_the_config_the_trace_recorded_unless_told_otherwise(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5, warmup_steps=40)
    live = Live(config).run(100, FAULTS, data_change=60)
    live.guard.close()
    default_events, *_ = replayed(path, GuardConfig(snapshot_interval=5))
    assert [key(e) for e in default_events] != [key(e) for e in live.guard.events]  # the config matters here
    out_events = tmp_path / "events.jsonl"
    assert cli.main(["replay", str(path), "--events", str(out_events), "--quiet"]) == 0
    assert "with the config the trace recorded" in capsys.readouterr().out
    assert [(e["step"], e["action"], e["bound"]) for e in read_jsonl(out_events)] == \
        [(e.step, e.action, e.bound) for e in live.guard.events]
    assert cli.main(["replay", str(path), "--config", "default", "--quiet"]) == 0
    assert "with --config default" in capsys.readouterr().out


def test_the_cli_refuses_to_write_the_events_over_the_trace(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    live = Live(GuardConfig(trace_path=str(path))).run(30)
    live.guard.close()
    before = path.read_bytes()
    assert cli.main(["replay", str(path), "--events", str(path)]) == 2
    assert "is the trace itself" in capsys.readouterr().err and path.read_bytes() == before


def test_two_runs_in_one_trace_replay_the_last_by_default(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    first = Live(config, seed=1).run(60, {30: dict(grad_scale=1e4)})
    first.guard.close()
    second = Live(config, seed=2).run(70, {40: dict(nan_grad=True), 41: dict(nan_grad=True)}, data_change=50)
    second.guard.close()
    assert [line["type"] for line in read_jsonl(path)].count("run_start") == 2
    events, _, _, runs = replayed(path, config)
    assert len(runs) == 2
    assert [key(e) for e in events] == [key(e) for e in second.guard.events]
    events_1, *_ = replayed(path, config, run=1)
    assert [key(e) for e in events_1] == [key(e) for e in first.guard.events]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config.to_dict()))
    assert cli.main(["replay", str(path), "--config", str(cfg), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "run 2 of 2" in captured.out and "holds 2 runs" in captured.err
    assert cli.main(["replay", str(path), "--config", str(cfg), "--quiet", "--run", "1"]) == 0
    assert "run 1 of 2" in capsys.readouterr().out


def test_replay_reproduces_a_run_that_gave_up_and_went_on(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5, give_up_after=10, max_rollbacks=1)
    calls = []
    live = Live(config, on_give_up=calls.append)
    live.run(90, {n: dict(nan_loss=True) for n in range(40, 75)})
    live.guard.close()
    assert calls
    assert_replay_matches(path, config, live.guard.events)


def test_replay_reproduces_a_run_capped_by_the_update_envelope_from_step_one(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5, max_update_ratio=0.5)
    live = Live(config, lr=0.1).run(40)
    live.guard.close()
    assert [(e.step, e.action, e.bound) for e in live.guard.events][:1] == [(1, "cap_scale", "update_envelope")]
    assert_replay_matches(path, config, live.guard.events)


def test_replay_keeps_the_order_of_a_data_change_right_after_a_rollback(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = explicit_config(trace_path=str(path), snapshot_interval=5)
    driver = GuardDriver(config)
    for n in range(1, 31):
        driver.step(param_sq=math.nan if n == 30 else 100.0)
    driver.step()  # step 31 processes record 30: rollback; record 31 is dropped
    assert driver.guard.summary()["rollbacks"] == 1
    driver.step()  # step 32: its command caps the scale (after the rollback); no record processed
    driver.guard.notify_data_change()
    for _ in range(5):
        driver.step()
    driver.guard.close()
    live = driver.guard.events
    assert [e.action for e in live if e.action in ("cap_scale", "rebaseline")][:2] == ["cap_scale", "rebaseline"]
    assert_replay_matches(path, config, live)


def test_replay_uses_the_live_lrs_at_the_end_of_a_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = explicit_config(trace_path=str(path), max_update_ratio=0.05)
    driver = GuardDriver(config)
    for _ in range(20):
        driver.step(lrs=[1e-3], ratio=0.01)  # 1% of the params per step at lr 1e-3
    driver.step(lrs=[8e-3], ratio=0.01)  # the lr jumps 8x (not a spike) at the last step: the envelope caps it
    driver.guard.close()
    live = driver.guard.events
    assert [(e.step, e.action, e.bound) for e in live][-1:] == [(21, "cap_scale", "update_envelope")]
    assert_replay_matches(path, config, live)


def test_replay_reproduces_rollbacks_to_the_start(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), start_rise_grad=None)  # the loss alone judges the rise
    live = Live(config).run(40, level_shift=2)  # the loss the guard reads jumps after step 1
    live.guard.close()
    assert [line["type"] for line in read_jsonl(path)][:3] == ["run_start", "seed", "start"]
    starts = [e for e in live.guard.events if e.detail.get("why") == "diverged_from_start"]
    assert [e.action for e in starts] == ["rollback"] * config.max_rollbacks + ["rollback_refused"]
    assert_replay_matches(path, config, live.guard.events)


def test_replay_reproduces_groups_deleted_and_added_mid_run(tmp_path):
    """A group deleted from the middle takes its state with it (its lr peak: the group moving into
    its place runs at 100x its lr), the snapshots follow the parameters left (a NaN weight rolls
    back), and parameters that join drop them: the seed lines carry both to replay."""
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config)
    first, (weight, bias) = list(live.model[0].parameters()), list(live.model[2].parameters())
    live.guard = Guard(config)  # three groups, the first at a 100x smaller lr
    live.opt = FusedGuardedAdamW([{"params": first, "lr": 1e-4}, {"params": [weight]}, {"params": [bias]}],
                                 lr=1e-2, guard=live.guard, backend=BACKEND)
    live.run(30)
    del live.opt.param_groups[0]
    for n in range(31, 61):
        if n == 45:
            with torch.no_grad():
                weight[0, 0] = math.nan
        live.step()
    live.opt.add_param_group({"params": first, "lr": 1e-3})
    live.run(30, {70: dict(grad_scale=1e4)})
    live.guard.close()
    seeds = [line for line in read_jsonl(path) if line["type"] == "seed"]
    assert [s.get("groups") for s in seeds] == [None, [1, 2], [0, 1, None]]
    assert [s.get("snapshots") for s in seeds] == [None, None, "dropped"]
    acted = [(e.step, e.action) for e in live.guard.events if e.action in ("skip", "rollback")]
    assert acted == [(45, "skip"), (45, "rollback"), (70, "skip")]  # no lr spike at step 31
    assert_replay_matches(path, config, live.guard.events)


def test_a_rollback_that_cannot_be_restored_does_not_count_and_replays(tmp_path, monkeypatch):
    """A restore that fails (the parameters changed shape since the snapshot, ...) is taken back:
    not counted, its snapshots forgotten (none is a target any more), and the trace says so,
    so that replay decides what the live guard did after it."""
    path = tmp_path / "trace.jsonl"
    config = GuardConfig(trace_path=str(path), snapshot_interval=5)
    live = Live(config)
    live.run(40)
    before = [p.detach().clone() for p in live.model.parameters()]

    def fail(step, optimizer):
        raise RuntimeError("the parameters or their state changed shape since the snapshot was taken")

    monkeypatch.setattr(live.guard._ring, "restore", fail)
    live.run(1, {41: dict(nan_param=True)})
    live.run(1)  # the record of step 41 is processed here (lag 1): params_nonfinite, a rollback
    live.guard.close()
    (failed,) = [e for e in live.guard.events if e.action == "rollback_failed"]
    assert failed.detail["to_step"] > 0 and "changed shape" in failed.detail["error"]
    assert live.guard.summary()["rollbacks"] == 0
    recovery = live.guard.controller.recovery
    assert not recovery.rollback_steps and recovery.verified_snapshots == [] and live.guard._ring.steps() == []
    assert not torch.equal(next(live.model.parameters()).detach(), before[0])  # nothing was restored
    assert "rollback_failed" in [line["type"] for line in read_jsonl(path)]
    _, _, controller, _ = replayed(path, config)
    assert_replay_matches(path, config, live.guard.events)
    assert controller.state_dict()["recovery"] == live.guard.controller.state_dict()["recovery"]


def test_replay_of_a_write_jsonl_trace_reproduces_a_rollback(tmp_path):
    config = explicit_config(keep_trace=1000, snapshot_interval=5)
    driver = GuardDriver(config)
    for n in range(1, 41):
        driver.step(param_sq=math.nan if n == 35 else 100.0)
    path = tmp_path / "kept.jsonl"
    driver.guard.write_jsonl(path)
    live = driver.guard.events
    assert [(e.step, e.action) for e in live if e.action.startswith("rollback")] == [(35, "rollback")]
    assert_replay_matches(path, config, live)


def test_replay_of_a_resumed_run_reproduces_its_decisions(tmp_path):
    path = tmp_path / "trace.jsonl"
    config = explicit_config(trace_path=str(path), snapshot_interval=5)
    first = GuardDriver(config)
    for _ in range(30):
        first.step()
    state = first.opt.state_dict()
    first.guard.close()
    second = GuardDriver(config)
    second.opt.load_state_dict(state)
    for n in range(31, 61):
        second.step(grad_sq=1e6 if n == 45 else 1.0)
    second.guard.close()
    events, *_ = replayed(path, config)  # the resumed controller's event ring holds the first run's too
    assert [key(e) for e in events if e.step > 30] == [key(e) for e in second.guard.events if e.step > 30]
    assert [key(e) for e in events] == [key(e) for e in second.guard.events]


# ---------------------------------------------------------------------------- property
KINDS = ["healthy"] * 5 + ["grad_spike", "loss_spike", "nan_loss", "hot_group", "params_bad", "oscillation"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2), st.integers(0, 2), st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1),
                                                                  st.sampled_from([1.0, 1.0, 1.0, 10.0, 0.1]),
                                                                  st.integers(0, 30)),
                                                        min_size=5, max_size=70))
def test_replay_matches_the_live_guard_on_any_sequence(groups, lag, seq):
    """Random faults, lr jumps and data changes through the real Guard (synthetic records):
    replaying its trace gives the live events. The envelope is off
    (test_replay_reproduces_a_run_capped_by_the_update_envelope_from_step_one), and data changes
    come only where a record was processed (test_replay_keeps_the_order_of_a_data_change_...), and
    the lr holds still over the last steps (test_replay_uses_the_live_lrs_at_the_end_of_a_trace)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.jsonl"
        config = explicit_config(trace_path=path, lag=lag, warmup_steps=4, snapshot_interval=3,
                                 max_update_ratio=None, give_up_after=10, freeze_steps=4)
        driver = GuardDriver(config, groups=groups, on_give_up=lambda exc: None)
        lr = 1e-3
        for kind, g, factor, change in seq:
            lr *= factor
            one = lambda v, o=0.0: [v if i == g % groups else o for i in range(groups)]
            kw = {"grad_spike": dict(grad_sq=1e8), "loss_spike": dict(loss=50.0), "nan_loss": dict(loss=math.nan),
                  "hot_group": dict(nonfinite=one(3.0)), "params_bad": dict(param_sq=one(math.nan, 100.0)),
                  "oscillation": dict(omega=one(0.02, 1.0))}.get(kind, {})
            before = driver.controller.processed
            driver.step(lrs=[lr] * groups, **kw)
            if change == 0 and driver.controller.processed > before:  # a record was processed
                driver.guard.notify_data_change()
        for _ in range(lag + 1):  # the last lag commands' lrs are not in the trace (..._at_the_end_of_a_trace)
            driver.step(lrs=[lr] * groups)
        driver.guard.close()
        # Commands issued after the last processed record (after a late rollback) are not in the
        # trace at all (test_replay_uses_the_live_lrs_at_the_end_of_a_trace).
        last_now = max(line["now"] for line in read_jsonl(path) if line["type"] == "record")
        live = [key(e) for e in driver.guard.events if e.step <= last_now]
        events, *_ = replayed(path, config)
        assert [key(e) for e in events if e.step <= last_now] == live
