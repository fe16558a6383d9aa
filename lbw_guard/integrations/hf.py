"""Hugging Face Trainer integration.

The Trainer calls ``optimizer.step()`` without a loss, so the loss has to reach the guard
another way, and the guard's metrics have to reach the Trainer's ``logs`` (and from there
TensorBoard, W&B, ... through ``report_to``). Two ways to get both:

>>> opt = FusedGuardedAdamW(model.parameters(), lr=3e-4)
>>> trainer = GuardedTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

``GuardedTrainer`` takes the loss from ``training_step`` (so a custom ``compute_loss`` works
too) and adds the metrics in ``log()``, so they are also in ``trainer.state.log_history``.
With a plain ``Trainer``:

>>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
>>> attach_guard(trainer)

``attach_guard`` puts a :class:`GuardCallback` first among the callbacks (before the
reporting ones, which read ``logs`` in order); the callback takes the loss from the model's
output with a forward hook. ``optimizer_cls_and_kwargs=(FusedGuardedAdamW, {...})`` works
with both, as the optimizer is looked up when training starts.

Checkpoints need nothing extra: the Trainer saves ``optimizer.state_dict()``, which holds
the guard's whole state, and loads it back on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from . import unwrap_optimizer
from .logging import EventLogger, guard_metrics


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

    - ``capture_loss``: a forward hook on the model sums the training losses of the
      micro-batches of one optimizer step; their mean goes to ``optimizer.record_loss``
      just before the step. Turn it off when something else records the loss.
    - ``on_log`` adds :func:`guard_metrics` to the logs (keys already there are kept).
    - Guard events are forwarded to Python :mod:`logging` after every step.
    """

    def __init__(self, optimizer=None, *, capture_loss: bool = True, prefix: str = "guard/"):
        self.optimizer = optimizer
        self.capture_loss = capture_loss
        self.prefix = prefix
        self.events = EventLogger()
        self._hook = None
        self._loss_sum = None
        self._loss_count = 0

    # ------------------------------------------------------------------ plumbing
    def _resolve(self, optimizer):
        if optimizer is not None:
            self.optimizer = unwrap_optimizer(optimizer)
        self.events.optimizer = self.optimizer
        return self.optimizer

    def _on_forward(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and no-grad passes are not training steps
        loss = _loss_of(output)
        if loss is None:
            return
        self.add_loss(loss.mean())

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's loss towards the next optimizer step (used when
        ``capture_loss`` is off and the caller sees the losses itself)."""
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def flush_loss(self, mean: bool = True) -> None:
        """Hand the step's loss to the optimizer: the mean of the micro-batch losses, or
        their sum when they were already divided by the accumulation steps."""
        if self._loss_sum is not None and self.optimizer is not None and hasattr(self.optimizer, "record_loss"):
            loss = self._loss_sum / self._loss_count if mean else self._loss_sum
            self.optimizer.record_loss(loss)
        self._loss_sum, self._loss_count = None, 0

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._resolve(optimizer)
        self.events.skip_existing()  # on resume: logged by the run that raised them
        if self.capture_loss and model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward)

    def on_step_begin(self, args, state, control, **kwargs):
        # A new accumulation window starts: nothing from an unfinished one carries over.
        self._loss_sum, self._loss_count = None, 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._resolve(optimizer)
        if self.capture_loss:
            self.flush_loss(mean=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.events.update()

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is not None:
            _add_guard_metrics(logs, self._resolve(optimizer), self.prefix)

    def on_train_end(self, args, state, control, **kwargs):
        self.events.update()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def attach_guard(trainer: Trainer, callback: GuardCallback | None = None) -> GuardCallback:
    """Add a GuardCallback to ``trainer`` ahead of its other callbacks and return it.

    The reporting callbacks (TensorBoard, W&B, the console printer) read ``logs`` in list
    order, so the guard's metrics must be added before them; ``Trainer(callbacks=[...])``
    and ``add_callback`` would append it after them.
    """
    callback = callback or GuardCallback()
    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if cb is not callback]
    handler.callbacks.insert(0, callback)
    return callback


class GuardedTrainer(Trainer):
    """A Trainer whose FusedGuardedAdamW receives each optimizer step's loss and whose logs
    (including ``state.log_history``) carry the guard metrics."""

    def __init__(self, *args, guard_prefix: str = "guard/", **kwargs):
        super().__init__(*args, **kwargs)
        self.guard_callback = attach_guard(self, GuardCallback(capture_loss=False, prefix=guard_prefix))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
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


__all__ = ["GuardCallback", "GuardedTrainer", "attach_guard"]
