"""Guard metrics (the guard's honest accounting), Python logging of guard events, TensorBoard
scalars, JSONL traces."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig, read_jsonl
from lbw_guard.integrations.logging import (REGIME_CODES, SUMMARY_KEYS, EventLogger, TensorBoardLogger,
                                            guard_metrics)


def spiky_run(guard, steps: int = 10, spikes=(7,)):
    """A short run with gradient spikes (x1e5) and a NaN loss at step 9. A spike inside the
    first ``spike_warmup`` records rolls back to the start (the loose bound lets a share of it
    into v): callers that want it clamped and skipped set a short ``spike_warmup``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=guard)
    g = torch.Generator().manual_seed(3)
    for k in range(1, steps + 1):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        loss = (model(x) - y).square().mean()
        loss.backward()
        if k in spikes:
            for p in model.parameters():
                p.grad.mul_(1e5)
        opt.step(loss=float("nan") if k == 9 else loss)  # step 9: skipped on the device
        opt.zero_grad()
        yield k, opt


def test_guard_metrics_report_the_guards_accounting_and_telemetry():
    steps = list(spiky_run(GuardConfig(warmup_steps=3, spike_warmup=3)))
    opt = steps[-1][1]
    m = guard_metrics(opt)
    summary = opt.guard.summary()
    for key in SUMMARY_KEYS:
        assert m[f"guard/{key}"] == float(summary[key]), key
    assert m["guard/regime"] == REGIME_CODES[summary["regime"]]
    assert m["guard/scale"] == min(summary["scale"])
    assert {k[len("guard/actions/"):]: v for k, v in m.items() if k.startswith("guard/actions/")} == \
        {a: float(c) for a, c in summary["actions"].items()}
    # Honest: the skipped step counts (step 9: NaN loss) among the 9 records processed.
    assert summary["steps"] == 9 and m["guard/skipped_fraction"] == pytest.approx(1 / 9)
    assert m["guard/interventions"] >= 2 and 0 < m["guard/mean_scale"] <= 1
    t = opt.telemetry
    assert math.isclose(m["guard/grad_norm"], float(t.grad_norm()), rel_tol=1e-12)
    assert math.isclose(m["guard/update_ratio"], float(t.update_param_ratio()), rel_tol=1e-9)
    assert math.isclose(m["guard/spike_fraction"], float(t.spike_ratio()), rel_tol=1e-12)
    assert m["guard/step_skipped"] == 0.0
    # Without a guard only the telemetry is reported.
    plain = FusedGuardedAdamW([nn.Parameter(torch.randn(4))], guard=None, backend="torch")
    assert guard_metrics(plain) == {}
    plain.param_groups[0]["params"][0].grad = torch.ones(4)
    plain.step()
    assert set(guard_metrics(plain)) == {"guard/grad_norm", "guard/update_ratio", "guard/spike_fraction",
                                         "guard/nonfinite", "guard/step_skipped"}


def test_event_logger_logs_each_event_once_even_after_the_ring_wraps(caplog):
    caplog.set_level(logging.DEBUG, logger="lbw_guard")
    events = None
    # A ring of 3 events: the run raises more than that; each is still logged once.
    for _, opt in spiky_run(GuardConfig(warmup_steps=3, event_capacity=3), steps=14, spikes=(6, 11)):
        events = events or EventLogger(opt)
        events.update()
    total = sum(opt.guard.summary()["actions"].values())
    assert total > 3
    lines = [r for r in caplog.records if r.getMessage().startswith("lbw-guard step")]
    assert len(lines) + events.missed == total and events.missed == 0  # update() ran every step
    transitions = [r for r in lines if "regime" in r.getMessage()]
    assert any("-> spiking" in r.getMessage() and r.levelno == logging.WARNING for r in transitions)
    events.update()  # nothing new: nothing logged
    assert len([r for r in caplog.records if r.getMessage().startswith("lbw-guard step")]) == len(lines)


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_tensorboard_logger_writes_the_accounting_as_scalars():
    *_, (_, opt) = spiky_run(GuardConfig(warmup_steps=3, spike_warmup=3))
    writer = FakeWriter()
    metrics = TensorBoardLogger(opt, writer=writer).log()
    assert writer.scalars == [(k, v, opt.num_steps) for k, v in metrics.items()]
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"guard/capped_fraction", "guard/skipped_fraction", "guard/frozen_fraction", "guard/mean_scale",
            "guard/rollbacks", "guard/interventions", "guard/regime"} <= tags
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="tensorboard"):
            TensorBoardLogger(opt, log_dir="unused")


def test_jsonl_trace_has_records_and_events(tmp_path):
    path = tmp_path / "trace.jsonl"
    *_, (_, opt) = spiky_run(GuardConfig(warmup_steps=3, spike_warmup=3, trace_path=str(path)))
    opt.guard.close()
    lines = read_jsonl(path)
    records = [line for line in lines if line["type"] == "record"]
    events = [line for line in lines if line["type"] == "event"]
    assert [r["step"] for r in records] == list(range(1, opt.num_steps))
    assert len(events) == sum(opt.guard.summary()["actions"].values())
    assert any(e["action"] == "skip" for e in events)
