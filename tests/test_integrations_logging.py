"""Guard metrics, Python logging of regime changes, TensorBoard scalars, JSONL traces."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig, read_jsonl
from lbw_guard.integrations.logging import REGIME_CODES, EventLogger, TensorBoardLogger, guard_metrics


def spiky_run(guard, steps: int = 10, spike: int = 7):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=guard)
    g = torch.Generator().manual_seed(3)
    for k in range(1, steps + 1):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        loss = (model(x) - y).square().mean()
        loss.backward()
        if k == spike:
            for p in model.parameters():
                p.grad.mul_(1e5)
        opt.step(loss=loss)
        opt.zero_grad()
        yield k, opt


def test_guard_metrics_values():
    steps = list(spiky_run(GuardConfig(warmup_steps=3)))
    opt = steps[-1][1]
    m = guard_metrics(opt)
    t = opt.telemetry
    assert math.isclose(m["guard/grad_norm"], float(t.grad_norm()), rel_tol=1e-12)
    assert math.isclose(m["guard/update_ratio"], float(t.update_param_ratio()), rel_tol=1e-9)
    assert m["guard/regime"] == REGIME_CODES[opt.guard.regime]
    assert m["guard/scale"] == min(opt.guard.scale) < 1.0  # the spike lowered it
    assert m["guard/skips"] >= 1 and m["guard/interventions"] == len(opt.guard.interventions)
    # Without a guard only the telemetry is reported.
    plain = FusedGuardedAdamW([nn.Parameter(torch.randn(4))], guard=None, backend="torch")
    assert guard_metrics(plain) == {}
    plain.param_groups[0]["params"][0].grad = torch.ones(4)
    plain.step()
    assert set(guard_metrics(plain)) == {"guard/grad_norm", "guard/update_ratio", "guard/outlier_ratio",
                                         "guard/nonfinite"}


def test_event_logger_logs_each_regime_change_once(caplog):
    caplog.set_level(logging.DEBUG, logger="lbw_guard")
    events = None
    for _, opt in spiky_run(GuardConfig(warmup_steps=3)):
        events = events or EventLogger(opt)
        events.update()
    transitions = [e for e in opt.guard.events if e.action == "transition"]
    assert any(e.regime == "spiking" for e in transitions)
    lines = [r for r in caplog.records if "regime" in r.getMessage()]
    assert len(lines) == len(transitions)  # each once, though update() ran every step
    for rec, e in zip(lines, transitions):
        assert f"{e.detail['from']} -> {e.detail['to']}" in rec.getMessage()
        assert rec.levelno == (logging.WARNING if e.regime in ("spiking", "diverging") else logging.INFO)


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_tensorboard_logger_writes_scalars():
    *_, (_, opt) = spiky_run(GuardConfig(warmup_steps=3))
    writer = FakeWriter()
    metrics = TensorBoardLogger(opt, writer=writer).log()
    assert writer.scalars == [(k, v, opt.num_steps) for k, v in metrics.items()]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="tensorboard"):
            TensorBoardLogger(opt, log_dir="unused")


def test_jsonl_trace_has_records_and_events(tmp_path):
    path = tmp_path / "trace.jsonl"
    *_, (_, opt) = spiky_run(GuardConfig(warmup_steps=3, trace_path=str(path)))
    opt.guard.close()
    lines = read_jsonl(path)
    records = [line for line in lines if line["type"] == "record"]
    events = [line for line in lines if line["type"] == "event"]
    assert [r["step"] for r in records] == list(range(1, opt.num_steps))
    assert len(events) == len(opt.guard.events)
    assert any(e["action"] == "skip" for e in events)
