"""Hugging Face Trainer integration: loss reaches the guard, metrics reach the logs,
checkpoint + resume restores the guard exactly. Tiny random-init Llama on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lbw_guard import FusedGuardedAdamW  # noqa: E402
from lbw_guard.guard import GuardConfig  # noqa: E402
from lbw_guard.integrations.hf import GuardCallback, GuardedTrainer, attach_guard  # noqa: E402

VOCAB, SEQ = 128, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def token_dataset(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
                dataloader_num_workers=0, max_grad_norm=0.0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Stands in for a reporting callback (TensorBoard, W&B): keeps the logs it is shown."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train_losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_plain_trainer_with_callback_feeds_loss_and_reports_metrics(tmp_path):
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=GuardConfig(keep_trace=True))
    recorder = Recorder()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=token_dataset(24),
                      optimizers=(opt, None), callbacks=[recorder])
    attach_guard(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], GuardCallback)
    trainer.train()

    assert opt.num_steps == 6
    # The guard saw every step's loss (records lag one step): equal to the Trainer's own.
    logged = train_losses(trainer.state.log_history)
    records = opt.guard.records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert r["loss"] is not None and math.isclose(r["loss"], logged[r["step"]], rel_tol=1e-3, abs_tol=1e-4)
    # A reporting callback placed after the guard's sees its metrics on every log.
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 6
    for log in train_logs:
        for key in ("guard/scale", "guard/regime", "guard/grad_norm", "guard/interventions"):
            assert isinstance(log[key], float)
        assert 0.1 <= log["guard/scale"] <= 1.0
    # The last step's grad norm is the telemetry's.
    assert math.isclose(train_logs[-1]["guard/grad_norm"], float(opt.telemetry.grad_norm()), rel_tol=1e-9)


def test_guarded_trainer_with_optimizer_cls_and_grad_accumulation(tmp_path):
    model = tiny_llama()
    kwargs = {"lr": 1e-3, "backend": "torch", "guard": GuardConfig(keep_trace=True)}
    trainer = GuardedTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2, max_steps=5),
                             train_dataset=token_dataset(40), optimizer_cls_and_kwargs=(FusedGuardedAdamW, kwargs))
    trainer.train()
    opt = trainer.optimizer.optimizer  # AcceleratedOptimizer -> FusedGuardedAdamW
    assert isinstance(opt, FusedGuardedAdamW)
    assert opt.num_steps == 5  # one step (one telemetry record) per 2 micro-batches
    logged = train_losses(trainer.state.log_history)
    for r in opt.guard.records:
        assert math.isclose(r["loss"], logged[r["step"]], rel_tol=1e-3, abs_tol=1e-4)
    # GuardedTrainer puts the metrics in the log history itself.
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("guard/regime" in h and "guard/scale" in h for h in train_logs)


def _state(opt) -> dict:
    sd = opt.state_dict()
    return {"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]], "guard": sd["guard"]}


def test_checkpoint_resume_restores_guard_exactly(tmp_path):
    # Small warm-up so that the guard is past warm-up and snapshots exist at the checkpoint.
    config = GuardConfig(warmup_steps=3, snapshot_interval=2, keep_trace=True)

    def run(out, resume=None):
        model = tiny_llama()
        opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=config)
        trainer = GuardedTrainer(model=model, args=args(out, max_steps=8, save_strategy="steps", save_steps=4),
                                 train_dataset=token_dataset(32), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return opt

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    a, b = _state(full), _state(resumed)
    for x, y in zip(a["params"], b["params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for key in ("controller", "events", "records", "issued"):  # JSON: NaN compares equal to NaN
        assert json.dumps(a["guard"][key], sort_keys=True) == json.dumps(b["guard"][key], sort_keys=True), key
    assert [s["step"] for s in a["guard"]["snapshots"]["slots"]] == [s["step"] for s in b["guard"]["snapshots"]["slots"]]
    assert full.num_steps == resumed.num_steps == 8
