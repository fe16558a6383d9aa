"""Accelerate: prepare(optimizer) with bf16 autocast and gradient accumulation gives the guard
one telemetry record (and one loss, the mean of the micro-batches) per optimizer step; after
attach_guard the wrapper takes step(loss=...), reports the guard's skips (so the prepared
scheduler does not step on them) and hands accelerator.clip_grad_norm_'s pre-clip norm over."""

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
from lbw_guard.integrations import unwrap_optimizer  # noqa: E402
from lbw_guard.integrations.accelerate import GuardedAcceleratedOptimizer, StepLoss, attach_guard  # noqa: E402


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


def losses_seen(opt) -> dict[int, float]:
    return {r["step"]: r["signals"]["loss"] for r in opt.guard.records if r["type"] == "record"}


def run(accum: int, mixed_precision: str, how: str = "step_loss"):
    model, data = model_and_data()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accum, cpu=True)
    model, wrapped, data = accelerator.prepare(model, opt, data)
    assert unwrap_optimizer(wrapped) is opt and opt.guard is not None  # prepare() keeps the guard
    step_loss = StepLoss(wrapped, accelerator) if how == "step_loss" else attach_guard(accelerator, wrapped)
    micro_losses = []
    for x, y in data:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x).float(), y)
            accelerator.backward(loss)
            micro_losses.append(loss.item())
            if how == "step_loss":
                step_loss.add(loss)
                wrapped.step()
            else:
                wrapped.step(loss=loss)
            wrapped.zero_grad()
    return opt, micro_losses, model


@pytest.mark.parametrize("how", ["step_loss", "step_kwarg"])
def test_one_record_and_the_mean_loss_per_optimizer_step_with_bf16_and_accumulation(how):
    opt, micro, _ = run(accum=2, mixed_precision="bf16", how=how)
    assert opt.num_steps == 4  # 8 micro-batches, 2 per step
    seen = losses_seen(opt)
    assert sorted(seen) == [1, 2, 3]  # lag 1: the last one is still pending
    for step, loss in seen.items():
        assert math.isclose(loss, (micro[2 * step - 2] + micro[2 * step - 1]) / 2, rel_tol=1e-6)


def test_step_loss_kwarg_needs_attach_guard_or_the_unwrapped_optimizer():
    model, data = model_and_data()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    accelerator = Accelerator(cpu=True)
    model, wrapped = accelerator.prepare(model, opt)
    x, y = next(iter(data))
    loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    with pytest.raises(TypeError):  # Accelerate's wrapper has no loss keyword
        wrapped.step(loss=loss)
    unwrap_optimizer(wrapped).latest_loss = loss  # the documented path without attach_guard
    wrapped.step()
    assert opt.latest_loss is None and opt.num_steps == 1
    wrapped.zero_grad()
    accelerator.backward(nn.functional.mse_loss(model(x), y))
    wrapped.step()  # the record of step 1 is processed now
    assert losses_seen(opt) == {1: pytest.approx(loss.item(), rel=1e-6)}


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


def test_skipped_steps_reach_accelerate_and_its_scheduler_and_pre_clip_norms_reach_the_guard():
    model, data = model_and_data()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    accelerator = Accelerator(cpu=True)
    model, wrapped, data, sched = accelerator.prepare(model, opt, data, sched)
    assert wrapped.step_was_skipped is False
    attach_guard(accelerator, wrapped)
    assert isinstance(wrapped, GuardedAcceleratedOptimizer) and accelerator._optimizers[0] is wrapped
    skipped, norms = [], []
    for k, (x, y) in enumerate(data, start=1):
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.01)))  # clips hard
        wrapped.step(loss=torch.tensor(float("nan")) if k == 3 else loss)  # NaN loss: skipped on the device
        sched.step()
        skipped.append(accelerator.optimizer_step_was_skipped)
        wrapped.zero_grad()
    assert skipped == [k == 3 for k in range(1, 9)]
    assert sched.scheduler.last_epoch == 7  # 8 steps, one skipped
    for r in (r for r in opt.guard.records if r["type"] == "record"):  # the norms before the clip
        assert r["signals"]["grad_norm"] == pytest.approx(norms[r["step"] - 1], rel=1e-6)
    assert min(norms) > 0.01


def test_the_pre_clip_norm_is_recorded_when_clip_grad_norm_starts_with_frozen_parameters():
    """``model.parameters()`` of a LoRA model starts with frozen base weights the optimizer does
    not hold: the norm is still this optimizer's."""
    model, data = model_and_data()
    model[0].requires_grad_(False)  # the frozen base layer comes first
    opt = FusedGuardedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, backend="torch",
                            guard=GuardConfig(keep_trace=True))
    accelerator = Accelerator(cpu=True)
    model, wrapped, data = accelerator.prepare(model, opt, data)
    attach_guard(accelerator, wrapped)
    norms = []
    for x, y in data:
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.01)))
        wrapped.step()
        wrapped.zero_grad()
    records = [r for r in opt.guard.records if r["type"] == "record"]
    assert len(records) == 7
    for r in records:
        assert r["signals"]["grad_norm"] == pytest.approx(norms[r["step"] - 1], rel=1e-6)
