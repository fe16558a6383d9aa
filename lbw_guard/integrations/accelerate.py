"""Accelerate integration: one loss per optimizer step under gradient accumulation.

``accelerator.prepare(optimizer)`` needs nothing special: the ``AcceleratedOptimizer``
calls ``FusedGuardedAdamW.step()`` only on the micro-batch that syncs gradients, so the
guard gets one telemetry record per optimizer step. What the wrapper cannot pass on is the
loss; :class:`StepLoss` collects the micro-batch losses and hands their mean to the guard
just before the real step:

>>> model, opt, dl = accelerator.prepare(model, opt, dl)
>>> step_loss = StepLoss(opt, accelerator)
>>> for batch in dl:
...     with accelerator.accumulate(model):
...         loss = model(**batch).loss
...         accelerator.backward(loss)
...         step_loss.add(loss)        # before opt.step()
...         opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import torch

from . import unwrap_optimizer


class StepLoss:
    """Averages the losses of one optimizer step's micro-batches for the guard."""

    def __init__(self, optimizer, accelerator=None):
        self.optimizer = unwrap_optimizer(optimizer)
        self.accelerator = accelerator
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's (unscaled) loss; on the micro-batch that syncs
        gradients (every one without an accelerator), record the mean for the next step."""
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        if self.accelerator is None or self.accelerator.sync_gradients:
            self.optimizer.record_loss(self._sum / self._count)
            self._sum, self._count = None, 0


__all__ = ["StepLoss"]
