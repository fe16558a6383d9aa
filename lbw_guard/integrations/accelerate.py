"""Accelerate integration: the loss, skipped steps and pre-clip grad norms reach the guard.

``accelerator.prepare(optimizer)`` wraps FusedGuardedAdamW in an ``AcceleratedOptimizer``,
which calls its ``step()`` only on the micro-batch that syncs gradients (one telemetry record
per optimizer step). Three things do not cross that wrapper by themselves:

- the loss: ``AcceleratedOptimizer.step(loss=...)`` raises ``TypeError``. Use
  :class:`StepLoss` (the mean of the micro-batch losses), or set it on the wrapped optimizer
  (``unwrap_optimizer(opt).latest_loss = loss``), or :func:`attach_guard`, after which
  ``opt.step(loss=loss)`` works on the wrapper too;
- skipped steps: ``AcceleratedOptimizer.step_was_skipped`` (hence
  ``accelerator.optimizer_step_was_skipped`` and the prepared scheduler, which does not step
  after a skipped step) only knows GradScaler overflows Accelerate saw itself.
  :func:`attach_guard` makes it also report the guard's skips (and the in-kernel GradScaler
  skips). Reading it costs one host sync per optimizer step (``step_was_skipped`` is a device
  value); the prepared scheduler reads it on every sync step;
- the pre-clip grad norm: after ``accelerator.clip_grad_norm_(params, 1.0)`` the gradients
  the guard sees are never above 1. :func:`attach_guard` hands the norm that call returns to
  the optimizer (``record_grad_norm``). Better still, drop the call and let the optimizer
  clip: ``FusedGuardedAdamW(..., max_grad_norm=1.0)`` (its telemetry is before the clip).

>>> model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
>>> step_loss = attach_guard(accelerator, opt)
>>> for batch in dl:
...     with accelerator.accumulate(model):
...         loss = model(**batch).loss
...         accelerator.backward(loss)
...         step_loss.add(loss)        # or: opt.step(loss=loss) below
...         opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import logging

import torch
from accelerate.optimizer import AcceleratedOptimizer

from . import unwrap_optimizer

logger = logging.getLogger("lbw_guard")


class StepLoss:
    """Averages the losses of one optimizer step's micro-batches for the guard."""

    def __init__(self, optimizer, accelerator=None):
        self.optimizer = unwrap_optimizer(optimizer)
        self.accelerator = accelerator
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's (unscaled) loss; on the micro-batch that syncs
        gradients (every one without an accelerator), record the mean for the next step.
        Call it before ``opt.step()``."""
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        if self.accelerator is None or self.accelerator.sync_gradients:
            self.optimizer.record_loss(self._sum / self._count)
            self._sum, self._count = None, 0


class GuardedAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` that takes ``step(loss=...)`` and whose ``step_was_skipped``
    includes the guard's skips. :func:`guard_accelerated_optimizer` turns a prepared optimizer
    into one in place (Accelerate keeps a reference to the object it prepared)."""

    def step(self, closure=None, *, loss=None):
        """Like ``AcceleratedOptimizer.step``; ``loss`` (one micro-batch's) is averaged over the
        micro-batches of the optimizer step and given to the guard on the syncing one."""
        if loss is not None:
            loss = loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss)
            total = getattr(self, "_lbw_loss_sum", None)
            self._lbw_loss_sum = loss if total is None else total + loss
            self._lbw_loss_count = getattr(self, "_lbw_loss_count", 0) + 1
        if self.gradient_state.sync_gradients and getattr(self, "_lbw_loss_count", 0):
            unwrap_optimizer(self.optimizer).record_loss(self._lbw_loss_sum / self._lbw_loss_count)
            self._lbw_loss_sum, self._lbw_loss_count = None, 0
        return super().step(closure)

    @property
    def step_was_skipped(self):
        """Whether the last optimizer step changed nothing: a GradScaler overflow Accelerate
        saw, or a step the guard (or GradScaler's found_inf, in the kernel) skipped on the
        device. Reading the latter synchronises with the device once."""
        if self._is_overflow:
            return True
        skipped = getattr(unwrap_optimizer(self.optimizer), "step_was_skipped", False)
        return bool(skipped)


def guard_accelerated_optimizer(optimizer):
    """Make a prepared ``AcceleratedOptimizer`` a :class:`GuardedAcceleratedOptimizer` (in
    place) and return it. Other wrappers (DeepSpeed's, which steps itself) are returned as
    they are."""
    if isinstance(optimizer, GuardedAcceleratedOptimizer):
        return optimizer
    if type(optimizer) is AcceleratedOptimizer:
        optimizer.__class__ = GuardedAcceleratedOptimizer
    else:
        logger.info("lbw-guard: %s is not a plain AcceleratedOptimizer; its step_was_skipped is left as it is",
                    type(optimizer).__name__)
    return optimizer


def record_grad_norms(accelerator, optimizer) -> None:
    """Hand every 2-norm ``accelerator.clip_grad_norm_`` returns for ``optimizer``'s parameters
    to the optimizer (``record_grad_norm``): the guard then judges spikes on the norm before
    the clip. Patches the accelerator instance; calling it again for the same optimizer does
    nothing."""
    inner = unwrap_optimizer(optimizer)
    if not hasattr(inner, "record_grad_norm"):
        raise TypeError(f"{type(inner).__name__} has no record_grad_norm; is this a FusedGuardedAdamW?")
    clip = accelerator.clip_grad_norm_
    recorders = getattr(clip, "_lbw_recorders", None)
    if recorders is not None:
        if all(r is not inner for r in recorders):
            recorders.append(inner)
        return
    original = clip
    recorders = [inner]

    def clip_grad_norm_(parameters, max_norm, norm_type=2, **kwargs):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        norm = original(parameters, max_norm, norm_type=norm_type, **kwargs)
        if norm is not None and float(norm_type) == 2.0 and parameters:
            # the first trainable one: model.parameters() of a LoRA model starts with frozen weights
            clipped = next((p for p in parameters if p.requires_grad), None)
            for opt in recorders:
                if clipped is not None and any(p is clipped for g in opt.param_groups for p in g["params"]):
                    opt.record_grad_norm(norm)
        return norm

    clip_grad_norm_._lbw_recorders = recorders
    clip_grad_norm_.__doc__ = original.__doc__
    accelerator.clip_grad_norm_ = clip_grad_norm_


def attach_guard(accelerator, optimizer) -> StepLoss:
    """Everything at once for a prepared FusedGuardedAdamW: ``step(loss=...)`` and skipped
    steps on the wrapper (:func:`guard_accelerated_optimizer`), pre-clip grad norms from
    ``accelerator.clip_grad_norm_`` (:func:`record_grad_norms`). Returns a :class:`StepLoss`
    for loops that prefer ``step_loss.add(loss)``."""
    guard_accelerated_optimizer(optimizer)
    record_grad_norms(accelerator, optimizer)
    return StepLoss(optimizer, accelerator)


__all__ = ["GuardedAcceleratedOptimizer", "StepLoss", "attach_guard", "guard_accelerated_optimizer",
           "record_grad_norms"]
