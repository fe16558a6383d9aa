"""Accelerate: prepare(optimizer) with bf16 autocast and gradient accumulation gives the guard
one telemetry record (and one loss, the mean of the micro-batches) per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from lbw_guard import FusedGuardedAdamW  # noqa: E402
from lbw_guard.guard import GuardConfig  # noqa: E402
from lbw_guard.integrations.accelerate import StepLoss  # noqa: E402


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    # Accelerate's state is a process-wide singleton (a Trainer test may have set it up).
    _reset_accelerate()
    yield
    _reset_accelerate()


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    return model, data


def run(accum: int, mixed_precision: str):
    model, data = model_and_data()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accum, cpu=True)
    model, wrapped, data = accelerator.prepare(model, opt, data)
    step_loss = StepLoss(wrapped, accelerator)
    micro_losses = []
    for x, y in data:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x).float(), y)
            accelerator.backward(loss)
            step_loss.add(loss)
            micro_losses.append(loss.item())
            wrapped.step()
            wrapped.zero_grad()
    return opt, micro_losses, model


def test_one_record_per_optimizer_step_with_bf16_and_accumulation():
    opt, micro, _ = run(accum=2, mixed_precision="bf16")
    assert opt.num_steps == 4  # 8 micro-batches, 2 per step
    records = opt.guard.records
    assert [r["step"] for r in records] == [1, 2, 3]  # lag 1: the last one is still pending
    for r in records:
        expected = (micro[2 * r["step"] - 2] + micro[2 * r["step"] - 1]) / 2
        assert math.isclose(r["loss"], expected, rel_tol=1e-6)


def test_accumulated_steps_equal_a_full_batch_step():
    # fp32: 2 accumulated micro-batches of 8 = one step on the batch of 16 (mean losses).
    opt, _, model = run(accum=2, mixed_precision="no")
    ref, data = model_and_data()
    ref_opt = FusedGuardedAdamW(ref.parameters(), lr=1e-2, backend="torch", guard=GuardConfig())
    batches = list(data)
    for i in range(0, len(batches), 2):
        x = torch.cat([batches[i][0], batches[i + 1][0]])
        y = torch.cat([batches[i][1], batches[i + 1][1]])
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        ref_opt.step(loss=loss)
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
