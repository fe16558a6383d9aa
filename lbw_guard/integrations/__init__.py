"""Integrations of FusedGuardedAdamW with training frameworks.

Each submodule imports its framework only when imported itself, so ``lbw_guard`` never
requires transformers, peft, accelerate or tensorboard:

- :mod:`.hf`: ``GuardCallback`` and ``GuardedTrainer`` for the Hugging Face ``Trainer``;
- :mod:`.peft`: LoRA parameter groups the guard can freeze one at a time;
- :mod:`.accelerate`: the loss of accumulated micro-batches, once per optimizer step;
- :mod:`.logging`: guard metrics, Python logging of regime changes, TensorBoard scalars.
"""

from __future__ import annotations


def unwrap_optimizer(optimizer):
    """The innermost optimizer under wrappers such as Accelerate's ``AcceleratedOptimizer``
    (which keeps the wrapped one in ``.optimizer``), so its guard can be reached."""
    seen = set()
    while id(optimizer) not in seen and not hasattr(optimizer, "record_loss"):
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


__all__ = ["unwrap_optimizer"]
