"""Integrations of FusedGuardedAdamW with training frameworks.

Each submodule imports its framework only when imported itself, so ``lbw_guard`` never
requires transformers, peft, accelerate or tensorboard:

- :mod:`.hf`: ``optimizer_cls_and_kwargs``, ``GuardCallback``, ``attach_guard`` and
  ``GuardedTrainer`` for the Hugging Face ``Trainer``;
- :mod:`.accelerate`: ``StepLoss`` (one loss per optimizer step under gradient accumulation)
  and ``attach_guard`` (skipped steps and pre-clip grad norms visible to Accelerate);
- :mod:`.peft`: LoRA parameter groups the guard can freeze one at a time, LoRA+ groups;
- :mod:`.dcp`: ``torch.distributed.checkpoint`` helpers (``OptimizerState``, flattened dicts);
- :mod:`.logging`: guard metrics (the guard's honest accounting), Python logging of events,
  TensorBoard scalars.
"""

from __future__ import annotations


def unwrap_optimizer(optimizer):
    """The innermost optimizer under wrappers, so its guard can be reached: Accelerate's
    ``AcceleratedOptimizer`` (and others that keep the wrapped one in ``.optimizer``) and
    ``ZeroRedundancyOptimizer`` (its local optimizer is ``.optim``).

    >>> unwrap_optimizer(accelerated_opt).latest_loss = loss   # what step(loss=...) would do
    """
    seen = set()
    while optimizer is not None and id(optimizer) not in seen and not hasattr(optimizer, "record_loss"):
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "optim", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


__all__ = ["unwrap_optimizer"]
