"""Hugging Face Trainer integration.

The Trainer calls ``optimizer.step()`` without a loss, clips the gradients before it
(``max_grad_norm=1.0`` by default: the guard would never see a norm above 1), and steps the
lr scheduler whether or not the guard skipped the step. :class:`GuardCallback` fixes all three
and puts the guard's metrics into the Trainer's ``logs`` (hence TensorBoard, W&B, ... through
``report_to``):

- the loss: a forward hook on the model (``GuardCallback``) or ``training_step``
  (``GuardedTrainer``) gives each optimizer step's loss to ``optimizer.record_loss``;
- clipping: the Trainer's clip moves into the optimizer (``FusedGuardedAdamW(max_grad_norm=
  args.max_grad_norm)``, the Trainer's ``args.max_grad_norm`` set to 0 for the run): the fused
  clip has ``clip_grad_norm_``'s semantics and the guard's telemetry is before it. Where the
  optimizer already clips itself, the Trainer's pre-clip norm is recorded instead
  (``optimizer.record_grad_norm``); where neither is possible a warning says so;
- skipped steps: the prepared optimizer's ``step_was_skipped`` (which the Trainer reads as
  ``accelerator.optimizer_step_was_skipped`` before ``lr_scheduler.step()``) includes the
  guard's skips, so the schedule does not advance on a step that changed nothing. Reading it
  is one host sync per optimizer step (the Trainer already syncs on every micro-batch's loss
  with ``logging_nan_inf_filter=True``, its default); ``skipped_steps=False`` turns it off.

Three ways in:

>>> trainer = GuardedTrainer(model=model, args=args, train_dataset=ds,
...                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))
>>> trainer = GuardedTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
>>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
>>> attach_guard(trainer)                    # a plain Trainer: add the callback, first

:func:`optimizer_cls_and_kwargs` builds the optimizer from ``TrainingArguments`` (lr, betas,
eps, weight decay, ``max_grad_norm``): with a bare ``(FusedGuardedAdamW, {...})`` the Trainer
passes only the given kwargs and ``args.learning_rate`` is silently ignored.

Checkpoints need nothing extra: the Trainer saves ``optimizer.state_dict()``, which holds the
guard's whole state, and loads it back on ``resume_from_checkpoint`` (FSDP2 checkpoints go
through ``torch.distributed.checkpoint``, which carries it too: see :mod:`.dcp`).
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from transformers import Trainer, TrainerCallback

from lbw_guard import validation
from lbw_guard.optimizer import FusedGuardedAdamW

from . import unwrap_optimizer
from .logging import EventLogger, guard_metrics

logger = logging.getLogger("lbw_guard")


def _uses_deepspeed(args) -> bool:
    return bool(getattr(args, "deepspeed", None)) or getattr(args, "deepspeed_plugin", None) is not None


def optimizer_cls_and_kwargs(args, guard="default", **overrides) -> tuple[type, dict]:
    """``(FusedGuardedAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, from
    ``args`` (``TrainingArguments``): ``lr=args.learning_rate``, ``betas=(args.adam_beta1,
    args.adam_beta2)``, ``eps=args.adam_epsilon``, ``weight_decay=args.weight_decay`` (the
    Trainer still gives biases and norms their own group without decay) and the clip.

    Clipping moves into the optimizer: ``max_grad_norm=args.max_grad_norm`` and
    ``args.max_grad_norm`` is set to 0 (logged), so the guard judges the gradients before the
    clip. A later call with the same ``args`` (one Trainer per trial of a sweep) takes the clip
    it moved. Pass ``max_grad_norm=None`` to leave the clip to the Trainer (the callback then
    records its pre-clip norm). ``overrides`` (``backend=``, ``lr=``, ...) win over ``args``.
    """
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay, guard=guard)
    trainer_clip = float(getattr(args, "max_grad_norm", 0) or 0)
    # An earlier call on these args moved the clip (a sweep builds one Trainer per trial): its
    # value still holds, else the later trials would train without clipping.
    clip = trainer_clip if trainer_clip > 0 else float(getattr(args, "_lbw_moved_clip", 0) or 0)
    max_grad_norm = overrides.pop("max_grad_norm", clip if clip > 0 else None)
    if max_grad_norm is not None and not _uses_deepspeed(args):
        kwargs["max_grad_norm"] = max_grad_norm
        if trainer_clip > 0:
            logger.info("lbw-guard: clipping at %s moves into FusedGuardedAdamW; args.max_grad_norm set to 0",
                        max_grad_norm)
            args._lbw_moved_clip = clip
            args.max_grad_norm = 0.0
    kwargs.update(overrides)
    return FusedGuardedAdamW, kwargs


def _loss_of(output):
    """The loss in a model output (ModelOutput, dict or tuple with a loss first), or None."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    return loss


class GuardCallback(TrainerCallback):
    """Connects a FusedGuardedAdamW (found as the Trainer's optimizer) to the Trainer loop.

    - ``capture_loss``: a forward hook on the model collects the training losses of the
      micro-batches of one optimizer step; their mean goes to ``optimizer.record_loss``
      just before the step (their sum, times the data-parallel ranks where transformers
      averages tokens across devices, when the model was given ``num_items_in_batch``: it
      then divides by the whole window's token count). Turn it off when something else
      records the loss.
    - ``move_clipping``: at train begin, move the Trainer's ``max_grad_norm`` clip into the
      optimizer (see the module doc); else (or where the optimizer clips already) record
      the Trainer's pre-clip norm, which needs the trainer (:func:`attach_guard` gives it).
    - ``skipped_steps``: make the prepared optimizer's ``step_was_skipped`` report the
      guard's skips, so the lr scheduler does not step on them (one host sync per step).
    - ``on_log`` adds :func:`guard_metrics` to the logs (keys already there are kept), and to
      the entry ``Trainer.log`` has just appended to ``state.log_history``.
    - Guard events are forwarded to Python :mod:`logging` after every step.
    - At train begin the model's buffers are watched (``optimizer.guard.watch_buffers``):
      BatchNorm's running statistics go with the guard's skips and rollbacks.
    """

    def __init__(self, optimizer=None, *, capture_loss: bool = True, prefix: str = "guard/",
                 move_clipping: bool = True, skipped_steps: bool = True):
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.capture_loss = capture_loss
        self.prefix = prefix
        self.move_clipping = move_clipping
        self.skipped_steps = skipped_steps
        self.trainer = None
        self.events = EventLogger()
        self.clipping: str | None = None
        """How the Trainer's clip reached the guard in the last run: ``"moved"``, ``"recorded"``,
        ``"blind"`` (neither was possible), or None (the Trainer did not clip)."""
        self._hook = None
        self._loss_sum = None
        self._loss_count = 0
        self._window_normalised = False
        self._moved = None
        self._output_without_loss = False
        self._warned_no_loss = False

    # ------------------------------------------------------------------ plumbing
    def _resolve(self, optimizer):
        if optimizer is not None:
            self.optimizer = unwrap_optimizer(optimizer)
        self.events.optimizer = self.optimizer
        return self.optimizer

    def _guarded(self) -> bool:
        return isinstance(self.optimizer, FusedGuardedAdamW)

    def _on_forward(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and no-grad passes are not training steps
        loss = _loss_of(output)
        if loss is None:
            self._output_without_loss = True
            return
        # Given num_items_in_batch (transformers passes it to models that accept it), the model
        # divides by the token count of the whole accumulation window: the step's loss is the
        # sum of the micro-batch losses, not their mean.
        self._window_normalised = kwargs.get("num_items_in_batch") is not None
        self.add_loss(loss.mean())

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's loss towards the next optimizer step (used when
        ``capture_loss`` is off and the caller sees the losses itself)."""
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def flush_loss(self, mean: bool = True, scale: float = 1.0) -> None:
        """Hand the step's loss to the optimizer: the mean of the micro-batch losses, or
        their sum (times ``scale``) when they were already divided by the accumulation steps."""
        if self._loss_sum is not None and self.optimizer is not None and hasattr(self.optimizer, "record_loss"):
            loss = self._loss_sum / self._loss_count if mean else self._loss_sum * scale
            self.optimizer.record_loss(loss)
        self._loss_sum, self._loss_count = None, 0

    # ------------------------------------------------------------------ clipping
    def _setup_clipping(self, args) -> None:
        self.clipping = None
        clip = float(getattr(args, "max_grad_norm", 0) or 0)
        if clip <= 0 or _uses_deepspeed(args):  # DeepSpeed clips inside its engine
            return
        opt = self.optimizer
        if self.move_clipping and opt.max_grad_norm is None:
            opt.max_grad_norm = validation.check_max_grad_norm(clip)
            args.max_grad_norm = 0.0
            self._moved = (args, clip, opt)
            self.clipping = "moved"
            logger.info("lbw-guard: the Trainer's clip at max_grad_norm=%s runs inside FusedGuardedAdamW, so the "
                        "guard sees the gradients before it", clip)
            return
        if self._record_trainer_norms():
            self.clipping = "recorded"
            return
        self.clipping = "blind"
        warnings.warn(
            f"lbw-guard: the Trainer clips the gradients to max_grad_norm={clip} before FusedGuardedAdamW.step() "
            "and the guard cannot get the norm before the clip, so it judges gradients that never exceed "
            f"{clip}. Use attach_guard(trainer) (it records the Trainer's pre-clip norm), build the optimizer "
            "with optimizer_cls_and_kwargs(args), or set max_grad_norm=0 and FusedGuardedAdamW(max_grad_norm=...).",
            stacklevel=2,
        )

    def _record_trainer_norms(self) -> bool:
        """Record the Trainer's pre-clip grad norm into the optimizer; False without the trainer."""
        trainer = self.trainer
        if trainer is None:
            return False
        get_norm = getattr(trainer, "_get_grad_norm", None)
        if get_norm is not None:  # transformers 5: returns the pre-clip norm on every path
            if not getattr(get_norm, "_lbw", False):
                def _get_grad_norm(model, grad_norm=None):
                    norm = get_norm(model, grad_norm=grad_norm)
                    if norm is not None and self._guarded() and (trainer.args.max_grad_norm or 0) > 0:
                        self.optimizer.record_grad_norm(norm)
                    return norm

                _get_grad_norm._lbw = True
                trainer._get_grad_norm = _get_grad_norm
            return True
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None:
            from .accelerate import record_grad_norms

            record_grad_norms(accelerator, self.optimizer)
            return True
        return False

    def _restore_clipping(self) -> None:
        if self._moved is not None:
            args, clip, opt = self._moved
            args.max_grad_norm = clip
            opt.max_grad_norm = None
            self._moved = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._finish_run()  # a run that raised before on_train_end left the clip moved
        self._resolve(optimizer)
        self.events.skip_existing()  # on resume: logged by the run that raised them
        if self.capture_loss and model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        if not self._guarded():
            warnings.warn(f"lbw-guard: GuardCallback found a {type(self.optimizer).__name__}, not a "
                          "FusedGuardedAdamW; it only reports metrics", stacklevel=2)
            return
        self._setup_clipping(args)
        if model is not None and self.optimizer.guard is not None:
            self.optimizer.guard.watch_buffers(model)  # running statistics go with skips and rollbacks
        if self.skipped_steps and optimizer is not None and optimizer is not self.optimizer:
            from .accelerate import guard_accelerated_optimizer

            guard_accelerated_optimizer(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        # A new accumulation window starts: nothing from an unfinished one carries over.
        self._loss_sum, self._loss_count = None, 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._resolve(optimizer)
        if self.capture_loss:
            if self._loss_sum is None and self._output_without_loss:
                self._warn_no_loss_in_output()
            normalised = self._window_normalised
            self.flush_loss(mean=not normalised, scale=self._ranks_in_count(args) if normalised else 1.0)

    def _warn_no_loss_in_output(self) -> None:
        """At the first step, not after the optimizer's ten: the model's output has no loss
        because the Trainer computes it outside the model."""
        if self._warned_no_loss or not self._guarded():
            return
        self._warned_no_loss = True
        self.optimizer._warned_no_loss = True  # its generic advice (attach this callback) does not apply
        warnings.warn(
            "lbw-guard: the model's outputs carry no loss (the Trainer computes it outside the model: "
            "label_smoothing_factor, compute_loss_func, or batches without labels), so GuardCallback cannot "
            "give the guard the loss and its loss checks are off. Use lbw_guard.integrations.hf.GuardedTrainer, "
            "which takes the loss from training_step.", stacklevel=2)

    def _ranks_in_count(self, args) -> float:
        """With ``average_tokens_across_devices`` the token count the model divides by is the
        whole world's; the Trainer multiplies the loss back by its data-parallel ranks after the
        forward (``compute_loss``), and the optimizer then averages over the ranks."""
        if not getattr(args, "average_tokens_across_devices", False):
            return 1.0
        trainer = self.trainer
        if trainer is not None and hasattr(trainer, "get_tp_size"):
            return float(trainer.accelerator.num_processes // trainer.get_tp_size())
        return float(max(getattr(args, "world_size", 1), 1))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.update()

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is not None:
            _add_guard_metrics(logs, self._resolve(optimizer), self.prefix)
            # Trainer.log appended its copy of these logs to the history before the callbacks ran
            last = state.log_history[-1] if state is not None and state.log_history else None
            if last is not None and last.get("step") == state.global_step and all(
                    last.get(k) == v for k, v in logs.items() if not k.startswith(self.prefix) and k in last):
                for key, value in logs.items():
                    last.setdefault(key, value)

    def on_train_end(self, args, state, control, **kwargs):
        self.events.update()
        self._finish_run()

    def _finish_run(self) -> None:
        """Put the Trainer's clip back and remove the loss hook (also after a run that raised)."""
        self._restore_clipping()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def attach_guard(trainer: Trainer, callback: GuardCallback | None = None) -> GuardCallback:
    """Add a GuardCallback to ``trainer`` ahead of its other callbacks and return it.

    The reporting callbacks (TensorBoard, W&B, the console printer) read ``logs`` in list
    order, so the guard's metrics must be added before them; ``Trainer(callbacks=[...])``
    and ``add_callback`` would append it after them. The callback also gets the trainer, to
    record its pre-clip grad norm where the clip cannot move into the optimizer.
    """
    callback = callback or GuardCallback()
    callback.trainer = trainer
    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if cb is not callback]
    handler.callbacks.insert(0, callback)
    _restore_clipping_on_failure(trainer)
    return callback


def _restore_clipping_on_failure(trainer: Trainer) -> None:
    """Wrap ``trainer.train`` so that a run that raises still puts ``args.max_grad_norm`` back
    (``on_train_end`` never runs then): a retry with the same ``args`` must clip as asked."""
    train = trainer.train
    if getattr(train, "_lbw", False):
        return

    @functools.wraps(train)
    def guarded_train(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        except BaseException:
            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, GuardCallback):
                    cb._finish_run()
            raise

    guarded_train._lbw = True
    trainer.train = guarded_train


class GuardedTrainer(Trainer):
    """A Trainer with :class:`GuardCallback` attached: its FusedGuardedAdamW receives each
    optimizer step's loss (from ``training_step``, so a custom ``compute_loss`` works too),
    sees the gradients before the clip, makes the scheduler skip with it, and its logs
    (including ``state.log_history``) carry the guard metrics."""

    def __init__(self, *args, guard_prefix: str = "guard/", guard_callback: GuardCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        callback = guard_callback or GuardCallback(capture_loss=False, prefix=guard_prefix)
        self.guard_callback = attach_guard(self, callback)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard_callback.capture_loss:
            return loss  # the callback's forward hook records it
        # training_step returns the micro-batch loss already divided by the accumulation
        # steps (or normalised by the step's token count), so the sum is the step's loss.
        self.guard_callback.add_loss(loss)
        if self.accelerator.sync_gradients:
            self.guard_callback._resolve(self.optimizer)
            self.guard_callback.flush_loss(mean=False)
        return loss

    def log(self, logs, *args, **kwargs):
        if self.optimizer is not None:
            _add_guard_metrics(logs, unwrap_optimizer(self.optimizer), self.guard_callback.prefix)
        return super().log(logs, *args, **kwargs)


def _add_guard_metrics(logs: dict, opt, prefix: str) -> None:
    """Add the guard's metrics to a Trainer log entry, keeping any value already there."""
    if opt is not None and hasattr(opt, "record_loss"):
        for key, value in guard_metrics(opt, prefix).items():
            logs.setdefault(key, value)


__all__ = ["GuardCallback", "GuardedTrainer", "attach_guard", "optimizer_cls_and_kwargs"]
