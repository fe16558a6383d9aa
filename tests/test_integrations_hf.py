"""Hugging Face Trainer integration: the loss reaches the guard, the guard sees the gradients
before the Trainer's clip, the scheduler does not step on a skipped step, the metrics (the
guard's honest accounting) reach the logs, optimizer_cls_and_kwargs takes its hyperparameters
from TrainingArguments, and checkpoint + resume restores the guard exactly. Tiny random-init
Llama on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lbw_guard import FusedGuardedAdamW  # noqa: E402
from lbw_guard.guard import GuardConfig, preset  # noqa: E402
from lbw_guard.integrations import unwrap_optimizer  # noqa: E402
from lbw_guard.integrations.hf import (GuardCallback, GuardedTrainer, attach_guard,  # noqa: E402
                                       optimizer_cls_and_kwargs)

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


def train_logs(history: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in history if "loss" in h}


def signals(opt) -> dict[int, dict]:
    return {r["step"]: r["signals"] for r in opt.guard.records if r["type"] == "record"}  # not markers


def test_plain_trainer_with_callback_feeds_loss_and_reports_honest_accounting(tmp_path):
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=GuardConfig(keep_trace=True))
    recorder = Recorder()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=token_dataset(24),
                      optimizers=(opt, None), callbacks=[recorder])
    attach_guard(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], GuardCallback)
    trainer.train()

    assert opt.num_steps == 6
    # The model's buffers (here the rotary frequencies) are watched through skips and rollbacks.
    assert opt.guard.watched_buffers == len(list(model.buffers())) > 0
    # The guard saw every step's loss (records lag one step): equal to the Trainer's own.
    logged = train_logs(trainer.state.log_history)
    seen = signals(opt)
    assert sorted(seen) == [1, 2, 3, 4, 5]
    for step, s in seen.items():
        assert s["loss"] is not None and math.isclose(s["loss"], logged[step]["loss"], rel_tol=1e-3, abs_tol=1e-4)
    # A reporting callback placed after the guard's sees its metrics on every log...
    logs = [log for log in recorder.logs if "loss" in log]
    assert len(logs) == 6
    for log in logs:
        for key in ("guard/scale", "guard/regime", "guard/grad_norm", "guard/interventions", "guard/mean_scale",
                    "guard/capped_fraction", "guard/skipped_fraction", "guard/frozen_fraction", "guard/rollbacks"):
            assert isinstance(log[key], float), key
        assert 0.1 <= log["guard/scale"] <= 1.0
    # ...and they are the guard's own accounting and the last step's telemetry.
    summary = opt.guard.summary()
    last = logs[-1]
    for key in ("mean_scale", "capped_fraction", "skipped_fraction", "frozen_fraction", "rollbacks", "interventions"):
        assert last[f"guard/{key}"] == float(summary[key]), key
    assert last["guard/steps"] == summary["steps"] == 5
    assert math.isclose(last["guard/grad_norm"], float(opt.telemetry.grad_norm()), rel_tol=1e-9)
    # The Trainer's own log history carries them too (it copied the logs before the callbacks ran).
    for entry in logged.values():
        assert "guard/mean_scale" in entry and "guard/regime" in entry


def test_guarded_trainer_with_optimizer_cls_and_kwargs_and_grad_accumulation(tmp_path):
    model = tiny_llama()
    a = args(tmp_path, gradient_accumulation_steps=2, max_steps=5, learning_rate=2e-3, adam_beta1=0.8,
             adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.05, max_grad_norm=1.0)
    cls_kwargs = optimizer_cls_and_kwargs(a, guard=GuardConfig(keep_trace=True), backend="torch")
    trainer = GuardedTrainer(model=model, args=a, train_dataset=token_dataset(40), optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)  # AcceleratedOptimizer -> FusedGuardedAdamW
    assert isinstance(opt, FusedGuardedAdamW)
    # The hyperparameters come from TrainingArguments (a bare kwargs dict ignored args.learning_rate).
    assert [g["initial_lr"] for g in opt.param_groups] == [2e-3, 2e-3]
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7 for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # the Trainer's no-decay group
    assert opt.max_grad_norm == 1.0 and a.max_grad_norm == 0.0  # the clip runs inside the optimizer
    assert opt.num_steps == 5  # one step (one telemetry record) per 2 micro-batches
    logged = train_logs(trainer.state.log_history)
    for step, s in signals(opt).items():
        assert math.isclose(s["loss"], logged[step]["loss"], rel_tol=1e-3, abs_tol=1e-4)
        assert math.isclose(s["grad_norm"], logged[step]["grad_norm"], rel_tol=1e-5)
    # GuardedTrainer puts the metrics in the log history itself.
    assert all("guard/regime" in h and "guard/mean_scale" in h for h in logged.values())


@pytest.mark.parametrize("accumulation", [2, 4])
def test_plain_trainer_callback_gives_the_guard_the_steps_loss_under_accumulation(tmp_path, accumulation):
    """transformers normalises each micro-batch's loss by the token count of the whole window
    (``num_items_in_batch``), so the step's loss is their sum, not their mean; 14 samples in
    batches of 4 end each epoch on a shorter window."""
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=GuardConfig(keep_trace=True))
    trainer = Trainer(model=model, args=args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=6),
                      train_dataset=token_dataset(14), optimizers=(opt, None))
    attach_guard(trainer)
    trainer.train()
    logged = train_logs(trainer.state.log_history)
    seen = signals(opt)
    assert len(seen) == 5
    for step, s in seen.items():
        assert math.isclose(s["loss"], logged[step]["loss"], rel_tol=1e-3, abs_tol=1e-4), (step, s["loss"])


def test_optimizer_cls_and_kwargs_maps_training_arguments(tmp_path):
    a = args(tmp_path, learning_rate=3e-4, max_grad_norm=0.5, weight_decay=0.1)
    cls, kwargs = optimizer_cls_and_kwargs(a, guard="monitor", backend="torch")
    assert cls is FusedGuardedAdamW
    assert kwargs == {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "guard": "monitor",
                      "max_grad_norm": 0.5, "backend": "torch"}
    assert a.max_grad_norm == 0.0
    # A second call on the same args (one Trainer per trial of a sweep) still clips at 0.5.
    _, again = optimizer_cls_and_kwargs(a, lr=1e-3)
    assert again["max_grad_norm"] == 0.5 and again["lr"] == 1e-3 and a.max_grad_norm == 0.0
    # Keeping the Trainer's clip: args untouched, no optimizer clip.
    b = args(tmp_path, max_grad_norm=1.0)
    _, kwargs = optimizer_cls_and_kwargs(b, max_grad_norm=None, lr=1e-3)
    assert "max_grad_norm" not in kwargs and kwargs["lr"] == 1e-3 and b.max_grad_norm == 1.0
    FusedGuardedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)  # every key is a valid argument


def _clip_run(tmp_path, attach: bool, guard, max_grad_norm=None, callbacks=()):
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=guard, max_grad_norm=max_grad_norm)
    a = args(tmp_path, max_steps=4, max_grad_norm=1.0)  # the Trainer's default clip
    trainer = Trainer(model=model, args=a, train_dataset=token_dataset(16), optimizers=(opt, None),
                      callbacks=list(callbacks))
    callback = attach_guard(trainer) if attach else None
    trainer.train()
    return model, opt, trainer, callback


def test_guard_sees_gradients_before_the_trainers_default_clip(tmp_path):
    # A monitoring guard records what it sees and changes nothing: AdamW's updates exactly.
    monitor = dataclasses.replace(preset("monitor"), keep_trace=100)
    model, opt, trainer, callback = _clip_run(tmp_path / "a", True, monitor)
    assert callback.clipping == "moved"
    logged = train_logs(trainer.state.log_history)
    assert any(h["grad_norm"] > 1.0 for h in logged.values())  # the clip is active
    for step, s in signals(opt).items():  # the guard judges the norm before the clip, not <= 1
        assert math.isclose(s["grad_norm"], logged[step]["grad_norm"], rel_tol=1e-5)
    assert trainer.args.max_grad_norm == 1.0 and opt.max_grad_norm is None  # put back after training
    # The clip still happens: the same parameters as with the Trainer clipping itself.
    ref, _, _, _ = _clip_run(tmp_path / "b", False, None)
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_pre_clip_norm_recorded_when_the_optimizer_clips_itself(tmp_path):
    # The optimizer clips at 0.5 and the Trainer at 1.0: the Trainer's pre-clip norm is recorded.
    _, opt, trainer, callback = _clip_run(tmp_path / "a", True, GuardConfig(keep_trace=True), max_grad_norm=0.5)
    assert callback.clipping == "recorded"
    logged = train_logs(trainer.state.log_history)
    for step, s in signals(opt).items():
        assert math.isclose(s["grad_norm"], logged[step]["grad_norm"], rel_tol=1e-5)
    # A callback without the trainer cannot: it says so.
    with pytest.warns(UserWarning, match="cannot get the norm before the clip"):
        _clip_run(tmp_path / "b", False, "default", max_grad_norm=0.5, callbacks=[GuardCallback()])


def test_a_loss_computed_outside_the_model_is_said_at_the_first_step_and_guarded_trainer_gets_it(tmp_path):
    # With label smoothing the Trainer pops the labels and computes the loss itself.
    runs = {}
    for kind in ("attached", "guarded"):
        model = tiny_llama()
        opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard=GuardConfig(keep_trace=100))
        a = args(tmp_path / kind, max_steps=12, label_smoothing_factor=0.1)
        cls = Trainer if kind == "attached" else GuardedTrainer
        trainer = cls(model=model, args=a, train_dataset=token_dataset(48), optimizers=(opt, None))
        if kind == "attached":
            attach_guard(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        losses = [r["signals"]["loss"] for r in opt.guard.records if r["type"] == "record"]
        runs[kind] = ([str(w.message) for w in caught if "loss" in str(w.message)], losses)
    said, losses = runs["attached"]
    assert len(said) == 1 and "carry no loss" in said[0] and "GuardedTrainer" in said[0]
    assert losses and all(r is None for r in losses)  # nothing reached the guard
    said, losses = runs["guarded"]
    assert said == [] and len(losses) == 11 and all(math.isfinite(x) and x > 0 for x in losses)


class FailAt(TrainerCallback):
    """Raises at the end of one step, as an out-of-memory error or a dead data loader would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("the run failed")


@pytest.mark.parametrize("attach", [True, False])
def test_a_run_that_raises_leaves_the_trainers_clip_for_the_retry(tmp_path, attach):
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard="default")
    a = args(tmp_path, max_steps=4, max_grad_norm=1.0)
    callback = GuardCallback()
    trainer = Trainer(model=model, args=a, train_dataset=token_dataset(16), optimizers=(opt, None),
                      callbacks=[] if attach else [callback, FailAt(2)])
    if attach:
        attach_guard(trainer, callback)
        trainer.add_callback(FailAt(2))
    with pytest.raises(RuntimeError, match="the run failed"):
        trainer.train()
    if attach:  # put back as the exception leaves train(), with the loss hook removed
        assert a.max_grad_norm == 1.0 and opt.max_grad_norm is None and callback._hook is None
    trainer.callback_handler.callbacks = [cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, FailAt)]
    trainer.train()  # the retry: a bare callback puts the clip back when the retry begins
    assert callback.clipping == "moved" and a.max_grad_norm == 1.0 and opt.max_grad_norm is None


class PoisonLoss(TrainerCallback):
    """Gives the guard a NaN loss at one step, after the GuardCallback recorded the real one:
    the default guard skips that step on the device."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            unwrap_optimizer(optimizer).record_loss(float("nan"))


def test_scheduler_does_not_step_on_a_skipped_step(tmp_path):
    model = tiny_llama()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, backend="torch", guard="default")
    recorder = Recorder()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=12, lr_scheduler_type="linear"),
                      train_dataset=token_dataset(48), optimizers=(opt, None), callbacks=[PoisonLoss(3), recorder])
    attach_guard(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. the optimizer's "no loss for 10 steps"
        trainer.train()
    assert opt.num_steps == 12
    # The skipped step changed nothing, and the schedule did not advance with it.
    assert trainer.optimizer.step_was_skipped is False  # the last step was applied
    assert trainer.lr_scheduler.last_epoch == 11
    history = dict(zip(range(1, 13), [log for log in recorder.logs if "loss" in log]))
    assert history[3]["guard/step_skipped"] == 1.0
    assert history[3]["learning_rate"] == history[4]["learning_rate"]  # lr before steps 3 and 4
    assert history[12]["guard/skipped_fraction"] == pytest.approx(1 / 11)  # 11 records processed


def _state(opt) -> dict:
    sd = opt.state_dict()
    return {"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]], "guard": sd["guard"]}


def test_checkpoint_resume_restores_guard_exactly(tmp_path):
    # Small warm-up so that the guard is past warm-up and snapshots exist at the checkpoint,
    # which carries them (snapshots_in_state_dict): the resumed guard is the same in every field.
    config = GuardConfig(warmup_steps=3, snapshot_interval=2, keep_trace=True, snapshots_in_state_dict=True)

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
    for key in ("controller", "pending", "issued", "last_snapshot"):  # JSON: NaN compares equal to NaN
        assert json.dumps(a["guard"][key], sort_keys=True) == json.dumps(b["guard"][key], sort_keys=True), key
    slots = [[s["step"] for s in x["guard"]["snapshots"]["slots"]] for x in (a, b)]
    assert slots[0] == slots[1] and slots[0]
    assert full.num_steps == resumed.num_steps == 8


def test_window_normalised_losses_are_scaled_back_by_the_data_parallel_ranks():
    """With average_tokens_across_devices each rank's model divides by the whole world's token
    count; compute_loss multiplies by the ranks after the forward the hook sees, so the hook
    must too (the optimizer then averages over the ranks)."""
    from types import SimpleNamespace

    callback = GuardCallback()
    assert callback._ranks_in_count(SimpleNamespace(average_tokens_across_devices=True, world_size=4)) == 4.0
    assert callback._ranks_in_count(SimpleNamespace(average_tokens_across_devices=False, world_size=4)) == 1.0
    callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=8), get_tp_size=lambda: 2)
    assert callback._ranks_in_count(SimpleNamespace(average_tokens_across_devices=True, world_size=8)) == 4.0
