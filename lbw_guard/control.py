"""The interface between the optimizer plane and the control plane.

Before each step the optimizer asks its guard for a :class:`StepControl` (device tensors,
built without a host synchronisation); after the step it hands the guard a
:class:`StepRecord` whose telemetry is still on the device. The guard copies the record to
host memory asynchronously and acts on it a fixed number of steps later, so the training
loop never waits on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class StepControl:
    """What the guard asks of the next step. Every tensor lives on the parameters' device."""

    scale: Tensor
    """[G] float64: multiplies each group's scheduler lr; the guard keeps it in [floor, 1]."""
    gate: Tensor
    """[G] float64: 1.0 updates the group, 0.0 leaves its params, moments and steps as they are."""
    grad_norm_limit: Tensor
    """0-d float64: skip the whole step on device when the global grad norm exceeds it (inf: off)."""
    loss_limit: Tensor
    """0-d float64: skip the whole step on device when the loss exceeds it (inf: off)."""
    precheck: bool
    """Run the gradient pre-pass (global norm and non-finite check) before the fused update."""


@dataclass
class StepRecord:
    """What one optimizer step produced, as the guard receives it."""

    step: int
    """1-based count of ``optimizer.step()`` calls."""
    telemetry: Tensor
    """[G, 7] float64 device tensor in ``TELEMETRY_FIELDS`` order (summed over all ranks)."""
    applied_gate: Tensor
    """[G] float64 device tensor: the gate the step really used (guard gate x device checks)."""
    loss: Tensor | None
    """0-d device tensor given as ``step(loss=...)`` (detached), or None."""
    lrs: list[float]
    """Each group's scheduler learning rate at this step (host floats, before the guard's scale)."""
