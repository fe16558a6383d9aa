"""Plain loops: the pre-clip grad norm one-liner, and the closure path that Lightning uses
(``optimizer.step(closure)`` returns the closure's loss, which the guard takes as its loss)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig


def model_and_batches(steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), 10 * torch.randn(16, 1, generator=g)) for _ in range(steps)]
    return model, batches


def seen(opt) -> dict[int, dict]:
    return {r["step"]: r["signals"] for r in opt.guard.records if r["type"] == "record"}  # not markers


@pytest.mark.parametrize("record", [False, True])
def test_clip_grad_norm_one_liner_gives_the_guard_the_pre_clip_norm(record):
    model, batches = model_and_batches()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    norms = []
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if record:
            opt.record_grad_norm(norm)  # the one-liner: opt.record_grad_norm(clip_grad_norm_(params, 1.0))
        norms.append(float(norm))
        opt.step(loss=loss)
        opt.zero_grad()
    assert min(norms) > 1.0  # every step was clipped
    for step, s in seen(opt).items():
        if record:
            assert s["grad_norm"] == pytest.approx(norms[step - 1], rel=1e-9)
        else:  # what the guard is left with otherwise: norms that never exceed the clip
            assert s["grad_norm"] <= 1.0 + 1e-6


def test_step_with_a_closure_returns_its_loss_and_the_guard_uses_it():
    model, batches = model_and_batches()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch", guard=GuardConfig(keep_trace=True))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "the guard has had no loss" warning
        for k in range(12):
            x, y = batches[k % len(batches)]

            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
    assert opt.num_steps == 12
    for step, s in seen(opt).items():
        assert s["loss"] == pytest.approx(losses[step - 1], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_automatic_optimization_feeds_the_guard(tmp_path):
    import lightning as L

    model, batches = model_and_batches(8)
    recorded = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            recorded.append(loss.item())
            return loss

        def configure_optimizers(self):
            return FusedGuardedAdamW(self.parameters(), lr=1e-2, backend="torch", max_grad_norm=1.0,
                                     guard=GuardConfig(keep_trace=True))

    module = Module()
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        trainer.fit(module, train_dataloaders=data)
    opt = trainer.optimizers[0]
    assert opt.num_steps == len(batches)
    records = seen(opt)
    assert sorted(records) == list(range(1, len(batches)))
    for step, s in records.items():
        assert math.isclose(s["loss"], recorded[step - 1], rel_tol=1e-6)
