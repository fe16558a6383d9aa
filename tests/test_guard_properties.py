"""Property tests of the controller over arbitrary telemetry sequences, NaN and inf included:
the scale stays in [floor, 1] and moves no faster than allowed, rollbacks respect their
distance and budget, the frozen fraction respects its bound, and nothing ever raises."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbw_guard.guard import Controller, GuardConfig, HostRecord

FIELDS = 7
special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308])
value = st.one_of(st.floats(min_value=0.0, max_value=1e12, allow_nan=False), special)


@st.composite
def record_sequences(draw):
    groups = draw(st.integers(1, 4))
    n = draw(st.integers(1, 60))
    base = [draw(st.floats(1e-3, 1e3)) for _ in range(groups)]
    records = []
    for step in range(1, n + 1):
        rows = []
        for g in range(groups):
            if draw(st.booleans()):  # mostly plausible telemetry, sometimes arbitrary values
                gs = base[g] * draw(st.floats(0.5, 2.0))
                rows.append([gs, 1e-6 * gs, 100.0 * (g + 1), -1e-3, 0.0, 0.0, 1000.0 * (g + 1)])
            else:
                rows.append([draw(value) for _ in range(FIELDS)])
        records.append(
            dict(
                telemetry=rows,
                applied_gate=[draw(st.sampled_from([0.0, 1.0, math.nan])) for _ in range(groups)],
                loss=draw(st.one_of(st.none(), st.floats(0.0, 10.0), special)),
                lrs=[draw(st.one_of(st.floats(1e-6, 1.0), special)) for _ in range(groups)],
            )
        )
    return groups, records


configs = st.builds(
    GuardConfig,
    warmup_steps=st.integers(1, 10),
    min_scale=st.floats(0.05, 0.9),
    decrease_factor=st.floats(0.1, 0.9),
    recovery_rate=st.just(0.05),
    max_scale_increase=st.floats(0.05, 0.5),
    hold_steps=st.integers(0, 5),
    snapshot_interval=st.integers(1, 5),
    max_rollback_distance=st.integers(5, 20),
    max_rollbacks=st.integers(0, 3),
    rollback_window=st.integers(5, 40),
    freeze_steps=st.integers(0, 10),
    max_frozen_fraction=st.floats(0.0, 0.9),
    max_consecutive_skips=st.integers(1, 6),
    lag=st.integers(0, 2),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, record_sequences())
def test_controller_stays_within_bounds(config, seq):
    groups, records = seq
    ctl = Controller(config, groups)
    prev_scale = [1.0] * groups
    prev_aimd = 1.0
    rollbacks = []
    for step, r in enumerate(records, 1):
        values = ctl.control_values(step, r["lrs"])
        prev_trust = ctl.trust_scale  # after the predictive latch, before the record
        for g in range(groups):
            s = values.scale[g]
            assert config.min_scale <= s <= 1.0
            assert s - prev_scale[g] <= config.max_scale_increase + 1e-12
        prev_scale = values.scale
        # frozen fraction (by element count) within its bound
        frozen = sum(ctl.numel[g] for g in range(groups) if values.gate[g] == 0.0 and ctl.numel[g] > 0)
        total = sum(n for n in ctl.numel if n > 0)
        if total > 0:
            assert frozen <= config.max_frozen_fraction * total + 1e-9
        assert values.grad_norm_limit > 0 and values.loss_limit == values.loss_limit  # not NaN
        # a gated group is never counted as written in the record the device produces
        applied = [a if values.gate[g] > 0 else 0.0 for g, a in enumerate(r["applied_gate"])]
        rec = HostRecord(step, r["telemetry"], applied, r["loss"], r["lrs"], values.scale, values.gate)
        decision = ctl.observe(rec, now=step + config.lag)
        # the AIMD scale decreases by at most one factor per record and stays in bounds
        assert config.min_scale <= ctl.aimd_scale <= 1.0
        assert ctl.aimd_scale >= prev_aimd * config.decrease_factor - 1e-12
        assert ctl.aimd_scale - prev_aimd <= config.recovery_rate + 1e-12
        prev_aimd = ctl.aimd_scale
        # the trust ceiling: in bounds; per record cut by at most one factor, raised by at
        # most one factor (or reset to 1 when the record carries no loss)
        assert config.min_scale <= ctl.trust_scale <= 1.0
        assert ctl.trust_scale >= prev_trust * config.decrease_factor - 1e-12
        assert ctl.trust_scale <= prev_trust * config.trust_increase + 1e-12 or ctl.trust_scale == 1.0
        if decision.rollback_to is not None:
            now = step + config.lag
            assert now - decision.rollback_to <= config.max_rollback_distance
            assert decision.rollback_to in ctl.snapshot_steps
            rollbacks.append(now)
            recent = [s for s in rollbacks if s > now - config.rollback_window]
            assert len(recent) <= config.max_rollbacks
        for event in decision.events:
            assert event.regime in ("warmup", "stable", "spiking", "diverging", "recovering")
        ctl.take_snapshot(step + config.lag)
        assert len(ctl.snapshot_steps) <= config.snapshot_ring
    state = ctl.state_dict()
    twin = Controller(config, groups)
    twin.load_state_dict(state)
    assert twin.state_dict() == state or _nan_equal(twin.state_dict(), state)


def _nan_equal(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    return a == b
