"""Property tests of the guard over arbitrary telemetry sequences (NaN and inf included, lrs
that jump, vanish or go non-finite, gates the device did or did not apply).

Invariants: the issued scale stays in [min_scale, 1] and rises by at most max_scale_increase
per step; rollbacks go to a verified snapshot within max_rollback_distance and at most
max_rollbacks per rollback_window; the frozen fraction stays within max_frozen_fraction; an lr
spike is skipped for at most level_shift_records steps in a row; the
event ring, the pending records, the kept trace and the snapshots stay bounded; the controller
never raises (give-up is a decision; only the Guard raises GuardGaveUp) and never skips
silently forever; monitor mode never acts; a controller restored from its state_dict decides
exactly like the original.
"""

import math
import pickle

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard_records import GuardDriver, device_applied, explicit_config, make_record, same
from lbw_guard.guard import Controller, GuardGaveUp
from lbw_kernels import contract as C

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308, 1e-308]
KINDS = ["healthy"] * 6 + ["grad_spike", "spike_fraction", "loss_spike", "nan_loss", "no_loss", "hot_group",
                           "nonfinite", "params_bad", "device_skip", "oscillation", "overshoot", "garbage"]
LR_FACTORS = [1.0] * 6 + [0.1, 10.0, 100.0, 0.0, -1.0, math.nan, math.inf]
# Record fields garbage may overwrite: everything but the omega sums, whose mean the kernel
# clamps to [-10, 10] (out-of-contract values there are test_controller_never_raises_on_an_out_of_contract_omega).
GARBAGE_INDICES = [i for i in range(C.NUM_GROUP_FIELDS) if i not in (C.G_OMEGA_LOG_SUM, C.G_OMEGA_COUNT)]

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def steps(draw, groups: int, n: int):
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(KINDS))
        step = dict(kind=kind, group=draw(st.integers(0, groups - 1)),
                    lr_factor=[draw(st.sampled_from(LR_FACTORS)) for _ in range(groups)],
                    noise=draw(st.floats(0.8, 1.25)))
        if kind == "garbage":
            step["fields"] = [(draw(st.integers(0, groups - 1)), draw(st.sampled_from(GARBAGE_INDICES)),
                               draw(st.one_of(st.sampled_from(SPECIAL), st.floats(-1e6, 1e12))))
                              for _ in range(draw(st.integers(1, 6)))]
            # (a finite loss above ~1e154 is test_a_huge_finite_loss_does_not_poison_the_loss_limit)
            step["loss"] = draw(st.one_of(st.none(), st.sampled_from([x for x in SPECIAL if abs(x) < 1e150]),
                                          st.floats(-1e100, 1e100)))
        if draw(st.integers(0, 9)) == 0:  # the device reports other gates than expected
            step["applied"] = [draw(st.sampled_from([0.0, 1.0, math.nan])) for _ in range(groups)]
        if draw(st.integers(0, 19)) == 0:
            step["data_change"] = True
        out.append(step)
    return out


@st.composite
def scenarios(draw, mode="act"):
    groups = draw(st.integers(1, 3))
    n = draw(st.integers(1, 90))
    distance = draw(st.integers(5, 30))
    config = explicit_config(
        mode=mode,
        warmup_steps=draw(st.integers(1, 10)),
        level_shift_records=draw(st.integers(1, 4)),
        lr_spike_factor=draw(st.one_of(st.none(), st.floats(1.5, 1000.0))),
        rescale_tolerance=draw(st.floats(0.01, 5.0)),
        min_scale=draw(st.floats(0.05, 0.9)),
        max_update_ratio=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        early_records=draw(st.integers(0, 20)),
        min_evidence=draw(st.integers(1, 4)),
        cut_factor=draw(st.floats(0.1, 0.9)),
        cut_interval=draw(st.integers(1, 6)),
        recovery_rate=draw(st.floats(0.01, 0.5)),
        max_scale_increase=draw(st.floats(0.01, 0.5)),
        rollback_scale=draw(st.floats(0.1, 1.0)),
        start_rise=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        start_cap=draw(st.booleans()),
        overshoot_restart=draw(st.booleans()),
        restart_cut=draw(st.floats(0.05, 1.0)),
        snapshot_interval=draw(st.integers(1, min(distance, 8))),
        snapshot_ring=draw(st.integers(1, 3)),
        max_rollback_distance=distance,
        max_rollbacks=draw(st.integers(0, 3)),
        rollback_window=draw(st.integers(5, 60)),
        freeze_steps=draw(st.integers(0, 10)),
        max_frozen_fraction=draw(st.floats(0.0, 0.9)),
        give_up_after=draw(st.integers(1, 30)),
        event_capacity=draw(st.integers(1, 40)),
        lag=draw(st.integers(0, 2)),
    )
    base_lr = [draw(st.sampled_from([1e-5, 1e-3, 1e-1])) for _ in range(groups)]
    numel = [draw(st.sampled_from([10.0, 100.0, 1000.0, 5000.0])) for _ in range(groups)]
    return config, groups, base_lr, numel, draw(steps(groups, n))


def record_kwargs(step: dict, groups: int, numel: list, prev_cmd) -> dict:
    kind, g = step["kind"], step["group"]
    kw = dict(groups=groups, numel=numel, grad_sq=step["noise"], loss=2.0 * step["noise"] ** 0.1, omega=1.0)

    def one(value, other=0.0):
        return [value if i == g else other for i in range(groups)]

    if kind == "grad_spike":
        kw["grad_sq"] = 1e8
    elif kind == "spike_fraction":
        kw["spikes"] = one(numel[g] * 0.9)
    elif kind == "loss_spike":
        kw["loss"] = 50.0
    elif kind == "nan_loss":
        kw["loss"] = math.nan
    elif kind == "no_loss":
        kw["loss"] = None
    elif kind == "hot_group":
        kw["nonfinite"] = one(3.0)
    elif kind == "nonfinite":
        kw["nonfinite"] = 7.0
    elif kind == "params_bad":
        kw["param_sq"] = one(math.nan, 100.0)
    elif kind == "device_skip":
        kw["step_ok"] = 0.0
    elif kind == "oscillation":
        kw["omega"] = one(0.02, 1.0)
    elif kind == "overshoot" and prev_cmd is not None:
        kw["gdp"] = -5.0  # the gradient turned against the last step
        kw["gdu"] = -5.0  # and the step predicted a decrease the loss does not show
    elif kind == "garbage":
        kw["loss"] = step["loss"]
    return kw


def garble(rec, step: dict) -> None:
    for g, index, value in step.get("fields", []):
        rec.record[g * C.NUM_GROUP_FIELDS + index] = value


class Checked:
    """Drive a controller like the Guard does and check every invariant on the way."""

    def __init__(self, config, groups, base_lr, numel):
        self.config, self.groups, self.base_lr, self.numel = config, groups, base_lr, numel
        self.ctl = Controller(config, groups)
        self.pending = []
        self.rollbacks = []
        self.last_snapshot = None
        self.cmd = None
        self.log = []  # (kind, step, value) of everything decided, for comparisons
        self.lr_skip_run = [0] * groups  # consecutive steps each group was gated off for an lr spike

    def step(self, n: int, step: dict, check: bool = True) -> None:
        c, ctl = self.config, self.ctl
        if n == 1 and c.acts and c.snapshots and c.start_rise is not None and c.early_records > 0:
            ctl.start_taken()  # Guard._maybe_take_start's policy
        lrs = [lr * f for lr, f in zip(self.base_lr, step["lr_factor"])]
        before = list(ctl.last_scale)
        cmd = ctl.command(n, lrs)
        self.log.append(("cmd", n, (list(cmd.scale), list(cmd.gate), cmd.loss_limit, cmd.spike_k)))
        if check:
            self.check_command(cmd, before, lrs, ctl.lr_skipped.get(n, []))
        kw = record_kwargs(step, self.groups, self.numel, self.cmd)
        self.cmd = cmd
        kw.update(lrs=lrs, scale=list(cmd.scale), gate=list(cmd.gate))
        kw["applied"] = step.get("applied") or device_applied(cmd, kw)
        rec = make_record(n, **kw)
        garble(rec, step)
        self.pending.append(rec)
        while len(self.pending) > c.lag:
            rec = self.pending.pop(0)
            verified = list(ctl.recovery.verified_snapshots) + ([0] if ctl.recovery.start_held else [])
            decision = ctl.observe(rec, n)
            self.log.append(("decision", rec.step, (decision["rollback_to"], decision["give_up"] is not None)))
            if check:
                self.check_decision(n, decision, verified)
            if decision["give_up"] is not None:
                ctl.accept_give_up()  # what the Guard does when the on_give_up hook returns
            if check and c.acts:
                # never skips silently forever: trouble either ends, rolls back or gives up
                assert ctl.recovery.consecutive_trouble < c.give_up_after
            if decision["rollback_to"] is not None:
                self.pending.clear()
                break
        if step.get("data_change"):
            ctl.notify_data_change(n)
        self.maybe_snapshot(n)
        if check:
            self.check_memory()

    def maybe_snapshot(self, n: int) -> None:  # Guard._maybe_snapshot's policy
        c, ctl = self.config, self.ctl
        if not c.acts or ctl.regime != "stable" or ctl.recovery.consecutive_trouble or ctl.recovery.pending_snapshots:
            return
        if self.last_snapshot is not None and n - self.last_snapshot < c.snapshot_interval:
            return
        self.last_snapshot = n
        ctl.snapshot_taken(n)

    def check_command(self, cmd, before: list, lrs: list, lr_skipped: list) -> None:
        c = self.config
        assert len(cmd.scale) == len(cmd.gate) == self.groups
        for g in range(self.groups):
            s = cmd.scale[g]
            if c.acts:
                assert c.min_scale <= s <= 1.0, (g, s)
                assert s - before[g] <= c.max_scale_increase + 1e-12, (g, before[g], s)
                cap = self.ctl.governor.start_cap[g]
                assert cap is None or c.start_cap  # only a rollback to the start sets it
                if cap is not None and c.governor != "off" and math.isfinite(lrs[g]) and lrs[g] > 0:
                    # never back above the scale the start's rollback continued from (min_scale
                    # aside; at lr 0 the scale is moot and issued as 1)
                    assert s <= max(cap, c.min_scale) * (1 + 1e-9), (g, s, cap)
            else:
                assert s == 1.0
            assert cmd.gate[g] in (0.0, 1.0)
        for g in range(self.groups):
            # an lr spike is skipped only while it is new: then the lr is the user's
            self.lr_skip_run[g] = self.lr_skip_run[g] + 1 if g in lr_skipped else 0
            assert self.lr_skip_run[g] <= c.level_shift_records
            if g in lr_skipped:
                assert c.acts and c.lr_spike_factor is not None and cmd.gate[g] == 0.0
                assert lrs[g] > c.lr_spike_factor * self.ctl.recovery.lr_peak[g]
        frozen = sum(n for g, n in enumerate(self.numel) if cmd.gate[g] == 0.0 and g not in lr_skipped)
        assert frozen <= c.max_frozen_fraction * sum(self.numel) + 1e-9
        assert not math.isnan(cmd.loss_limit) and not math.isnan(cmd.grad_norm_limit)
        assert cmd.spike_k > 0
        if not c.acts:
            assert cmd.gate == [1.0] * self.groups and math.isinf(cmd.loss_limit) and not cmd.mask_nonfinite

    def check_decision(self, now: int, decision: dict, verified_before: list) -> None:
        c = self.config
        target = decision["rollback_to"]
        if not c.acts:
            assert target is None and decision["give_up"] is None
            return
        if target is not None:
            assert target in verified_before  # never a pending (unverified) snapshot
            # the start (0) is held only through early_records records (check_memory)
            assert target == 0 or now - target <= c.max_rollback_distance
            self.rollbacks.append(now)
            assert len([s for s in self.rollbacks if s > now - c.rollback_window]) <= c.max_rollbacks
        if decision["give_up"] is not None:
            evidence = decision["give_up"]
            assert evidence["why"] in ("params_nonfinite", "spike_damage", "persistent_trouble")
            assert evidence["reasons"]

    def check_memory(self) -> None:
        c, ctl = self.config, self.ctl
        rec = ctl.recovery
        assert len(ctl.events) <= c.event_capacity
        assert ctl.events.dropped == sum(ctl.events.counts.values()) - len(ctl.events) >= 0
        assert len(rec.verified_snapshots) <= c.snapshot_ring
        assert len(rec.pending_snapshots) <= 1
        assert len(self.pending) <= c.lag
        assert len(rec.rollback_steps) <= c.max_rollbacks
        assert len(rec.recent_reasons) <= 8
        assert len(rec.start_above) <= 3
        assert not rec.start_held or rec.start_records <= c.early_records
        for e in ctl.events:
            assert e.applied is False or c.acts


@FAST
@given(scenarios())
def test_controller_stays_within_its_bounds(scenario):
    config, groups, base_lr, numel, seq = scenario
    run = Checked(config, groups, base_lr, numel)
    for n, step in enumerate(seq, 1):
        run.step(n, step)
    summary = run.ctl.accounting.summary()
    assert summary["steps"] <= len(seq) and 0.0 <= summary["skipped_fraction"] <= 1.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(mode="monitor"))
def test_monitor_mode_never_acts_on_any_sequence(scenario):
    config, groups, base_lr, numel, seq = scenario
    run = Checked(config, groups, base_lr, numel)
    for n, step in enumerate(seq, 1):
        run.step(n, step)
    assert run.ctl.events.applied_interventions == 0


@FAST
@given(scenarios(), st.floats(0.0, 1.0))
def test_a_controller_restored_from_its_state_dict_decides_like_the_original(scenario, where):
    config, groups, base_lr, numel, seq = scenario
    cut = int(where * len(seq))
    a = Checked(config, groups, base_lr, numel)
    for n, step in enumerate(seq[:cut], 1):
        a.step(n, step, check=False)
    b = Checked(config, groups, base_lr, numel)
    b.ctl.load_state_dict(pickle.loads(pickle.dumps(a.ctl.state_dict())))
    b.pending = pickle.loads(pickle.dumps(a.pending))
    b.last_snapshot, b.cmd = a.last_snapshot, a.cmd
    a.log = []
    for n, step in enumerate(seq[cut:], cut + 1):
        a.step(n, step, check=False)
        b.step(n, step, check=False)
    assert same(b.log, a.log)
    assert same(b.ctl.state_dict(), a.ctl.state_dict())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 5), st.booleans())
def test_guard_memory_stays_bounded_and_only_give_up_raises(scenario, keep_trace, hook):
    """The real Guard on a real optimizer (snapshots and rollbacks of real tensors) fed the same
    arbitrary records: bounded memory, restorable rollback targets, and nothing raised but
    GuardGaveUp (none at all with an on_give_up hook)."""
    config, groups, base_lr, numel, seq = scenario
    config = config.replace(keep_trace=keep_trace)
    calls = []
    driver = GuardDriver(config, groups=groups, on_give_up=calls.append if hook else None)
    guard = driver.guard
    try:
        for step in seq:
            lrs = [lr * f for lr, f in zip(base_lr, step["lr_factor"])]
            kw = record_kwargs(step, groups, numel, None)
            if step.get("applied"):
                kw["applied"] = step["applied"]
            driver.step(lrs=lrs, edit=lambda rec: garble(rec, step), **kw)
            if step.get("data_change"):
                guard.notify_data_change()
            assert len(guard.records) <= max(keep_trace, 1) and (keep_trace or not guard.records)
            assert len(guard._pending) <= config.lag
            assert len(guard._issued) <= config.lag + 1
            ring = guard._ring.steps()
            assert len(ring) <= config.snapshot_ring + 1
            assert set(guard.controller.recovery.verified_snapshots) <= set(ring)  # restorable
            assert len(guard.events) <= config.event_capacity
            assert not [e for e in guard.events if e.action == "rollback_failed"]
    except GuardGaveUp as exc:
        assert not hook, "with on_give_up the guard must not raise"
        assert exc.evidence["why"] in ("params_nonfinite", "spike_damage", "persistent_trouble")
    summary = guard.summary()
    assert summary["actions"].get("give_up", 0) >= len(calls)
    for p in driver.params:
        assert bool(p.isfinite().all())  # rollbacks copy real (finite) snapshots back
