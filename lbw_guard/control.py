"""The interface between the optimizer plane and the control plane.

Before each step the optimizer asks its guard for a :class:`GuardCommand` (host values, built
from the guard's lagged view of the run); the optimizer folds them into the per-group control
table that the fused kernel reads on the device. After the step it hands the guard a
:class:`StepRecord` whose telemetry is still on the device; the guard copies it to host memory
asynchronously and acts on it a fixed number of steps later, so the loop never waits on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass
class GuardCommand:
    """What the guard asks of the next step (host values)."""

    scale: list[float]
    """Per group: multiplies the scheduler's lr; the governor keeps it in [min_scale, 1]."""
    gate: list[float]
    """Per group: 1.0 updates the group, 0.0 leaves its params, moments and steps as they are."""
    spike_k: float = math.inf
    """k of the per-element bound |g| <= k * sqrt(v_hat) (inf: no bound)."""
    clamp: bool = False
    """Clamp elements over the bound to it (else they are only counted)."""
    loss_limit: float = math.inf
    """Skip the whole step on the device when the loss exceeds it."""
    check_loss: bool = False
    """A given loss that is not finite (or over the limit) skips the step on the device."""
    grad_norm_limit: float = math.inf
    """Skip the step on the device when the pre-pass grad norm exceeds it."""
    precheck: bool = False
    """Run the gradient-norm pre-pass for a same-step grad-norm skip (one more read of the grads)."""
    mask_nonfinite: bool = False
    """Never write a non-finite gradient element (else AdamW's propagation)."""

    @classmethod
    def plain(cls, num_groups: int) -> "GuardCommand":
        """The command of an optimizer without a guard: exactly AdamW."""
        return cls(scale=[1.0] * num_groups, gate=[1.0] * num_groups)


@dataclass
class StepRecord:
    """What one optimizer step produced, as the guard receives it."""

    step: int
    """1-based count of ``optimizer.step()`` calls that updated something."""
    record: Tensor
    """Flat float64 device tensor laid out by ``lbw_kernels.contract.record_layout`` (summed over
    ranks where parameters are sharded). The guard copies it before the next step overwrites it."""
    lrs: list[float]
    """Each group's commanded lr at this step (host floats; NaN for an lr tensor on a device)."""
    beta1: list[float] | None = None
    """Each group's beta1 at this step (host floats; NaN for a tensor on a device)."""
    has_loss: bool = False
    """Whether a loss reached this step (``step(loss=...)``, a closure or ``latest_loss``)."""
    grad_norm: Tensor | None = None
    """The global gradient norm before any clipping done outside the optimizer, if the caller
    recorded it (``record_grad_norm``); the telemetry's own grad norm is after that clipping."""
