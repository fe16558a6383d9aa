"""Detectors: is this record a fault? Spike and non-finite tests against robust statistics.

Each record is scored against the statistics as they were *before* it, and only a clean
record is folded in, so a rejected spike never raises the threshold that rejected it.
Thresholds are z-scores of running statistics (see :mod:`.stats`), with a warm-up.

The detectors also set the device-side loss limit of the next steps: a step whose loss is
not finite or beyond ``mean + z_loss * std`` is skipped on the device before it is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import GuardConfig
from .signals import StepSignals
from .stats import EmaStat, safe_log


@dataclass
class Assessment:
    """What the detectors found in one record."""

    nonfinite: bool = False
    """Non-finite gradient elements or a non-finite loss (never written on the device)."""
    params_bad: bool = False
    """The parameters themselves were not finite: the run has diverged."""
    control_invalid: bool = False
    """A group's coefficients were invalid (an lr tensor set to NaN, ...): it was not written."""
    grad_spike: bool = False
    loss_spike: bool = False
    device_skip: bool = False
    """A group the guard let through was skipped on the device (loss check, found_inf, ...)."""
    z_grad: float = 0.0
    z_loss: float = 0.0
    hot_groups: list[int] = field(default_factory=list)
    """Groups with non-finite or spiking gradients while others were clean."""
    rescaled: bool = False
    """The loss and the grad norm both spiked, by one factor (within ``rescale_tolerance``):
    what a weight on the loss does, not what divergence does."""

    @property
    def reasons(self) -> list[str]:
        return [name for name in ("nonfinite", "params_bad", "control_invalid", "grad_spike", "loss_spike",
                                  "device_skip") if getattr(self, name)]

    @property
    def trouble(self) -> bool:
        return bool(self.reasons)


class Detectors:
    """Running statistics of the log grad norm and the loss, and the spike tests."""

    def __init__(self, config: GuardConfig):
        c = config
        self.config = config
        self.grad = EmaStat(c.ema_beta, c.warmup_steps, c.min_grad_log_std, c.winsor_z)
        self.loss = EmaStat(c.ema_beta, c.warmup_steps, c.min_loss_rel_std, c.winsor_z, relative_std=True)
        self.grad_max = 0.0  # largest accepted grad norm: the warm-up spike test

    def assess(self, sig: StepSignals, issued_gate: list[float]) -> Assessment:
        c = self.config
        a = Assessment()
        active = [g for g, gs in enumerate(sig.groups) if issued_gate[g] > 0]
        # a group the guard froze is not written: its gradients are no fault of this step
        nonfinite = sum(sig.groups[g].nonfinite for g in active)
        spikes = sum(sig.groups[g].spikes for g in active)
        numel = sum(sig.groups[g].numel for g in active)
        spike_fraction = spikes / numel if numel > 0 else 0.0
        a.nonfinite = not nonfinite == 0 or (sig.loss is not None and not math.isfinite(sig.loss))
        a.params_bad = not sig.params_finite
        a.control_invalid = any(gs.invalid > 0 for gs in sig.groups)
        log_grad = safe_log(sig.grad_norm)
        if self.grad.warm:
            a.z_grad = self.grad.z(log_grad)
            a.grad_spike = a.z_grad > c.z_grad
        else:
            a.grad_spike = (self.grad_max > 0 and sig.grad_norm > c.warmup_grad_factor * self.grad_max) or \
                not math.isfinite(sig.grad_norm)
        a.grad_spike = a.grad_spike or spike_fraction > c.spike_fraction
        if sig.loss is not None:
            a.z_loss = self.loss.z(sig.loss)
            a.loss_spike = a.z_loss > c.z_loss
        a.rescaled = a.loss_spike and a.grad_spike and self._one_factor(sig.loss, log_grad)
        a.device_skip = any(issued_gate[g] > 0 and not gs.applied_gate > 0 for g, gs in enumerate(sig.groups))
        hot = [g for g in active if not sig.groups[g].nonfinite == 0 or sig.groups[g].spike_fraction > c.spike_fraction]
        if hot and len(hot) < len(active):
            a.hot_groups = hot
        return a

    def _one_factor(self, loss: float, log_grad: float) -> bool:
        """Did the loss and the grad norm move from their levels by the same factor? A weight w
        on the loss multiplies both by w; divergence moves the grad norm far more than the loss
        (a held-out GPT-Neo's natural spike: loss x2.3, grad norm x120)."""
        level = self.loss.mean
        if not (self.grad.warm and self.loss.warm and level > 0 and loss > 0 and math.isfinite(loss)
                and math.isfinite(log_grad)):
            return False
        return abs(math.log(loss / level) - (log_grad - self.grad.mean)) <= self.config.rescale_tolerance

    def fold(self, sig: StepSignals, a: Assessment) -> None:
        """Fold a clean record into the statistics (a loss-only level shift folds its gradients)."""
        if a.nonfinite or a.params_bad or a.control_invalid or a.grad_spike:
            return
        self.grad.update(safe_log(sig.grad_norm))
        if math.isfinite(sig.grad_norm):
            self.grad_max = max(self.grad_max, sig.grad_norm)
        if sig.loss is not None and not a.loss_spike:
            self.loss.update(sig.loss)

    def loss_limit(self) -> float:
        return self.loss.upper(self.config.z_loss)

    def grad_norm_limit(self) -> float:
        if self.grad.warm:
            upper = self.grad.upper(self.config.z_grad)
            return math.exp(upper) if upper < 700.0 else math.inf
        if self.grad_max > 0:
            return self.config.warmup_grad_factor * self.grad_max
        return math.inf

    def rebaseline_loss(self, loss: float | None) -> None:
        """The loss moved to a new level (new data): restart its statistics from there."""
        self.loss.reset()
        if loss is not None and math.isfinite(loss):
            self.loss.update(loss)

    def rebaseline_grad(self, grad_norm: float) -> None:
        """The gradients moved to a new level with a normal loss: restart their statistics there."""
        self.grad.reset()
        self.grad_max = 0.0
        if math.isfinite(grad_norm) and grad_norm > 0:
            self.grad.update(safe_log(grad_norm))
            self.grad_max = grad_norm

    def rebaseline(self) -> None:
        """Restart every statistic (after a rollback the trajectory is a different one)."""
        self.grad.reset()
        self.loss.reset()
        self.grad_max = 0.0

    def state_dict(self) -> dict:
        return {"grad": self.grad.state_dict(), "loss": self.loss.state_dict(), "grad_max": self.grad_max}

    def load_state_dict(self, state: dict) -> None:
        self.grad.load_state_dict(state["grad"])
        self.loss.load_state_dict(state["loss"])
        self.grad_max = float(state["grad_max"])
