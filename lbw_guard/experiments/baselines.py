"""Published spike-mitigation rules the guard is compared with, re-implemented for the stress suite.

Both rules decide on the host from the step's loss and global gradient norm (one host sync per
step, which these CPU-sized runs do not notice) and then let ``torch.optim.AdamW`` take the
step, exactly like the clipped-AdamW baselines.

SkipStep (OLMo-core)
    Source: ``allenai/OLMo-core``, ``src/olmo_core/optim/skip_step_optimizer.py``
    (``SkipStepOptimizer.get_step_factor``) and ``src/olmo_core/optim/adamw.py``
    (``SkipStepAdamW``). The loss and the grad norm of each step are appended to rolling lists
    of at most ``rolling_interval_length + 1`` values (default 128 + 1); once there are at least
    ``max(20, rolling_interval_length // 2)`` losses, the step is taken only if
    ``loss - mean <= sigma_factor * std`` and ``grad_norm - mean <= sigma_factor * std``, mean
    and std (``torch.std_mean``, unbiased) over the list without the current value;
    ``sigma_factor`` defaults to 6. A skipped step's values stay in the lists.
    Two deliberate differences, both in the baseline's favour: (1) a skipped step here is not
    taken at all (no moment or weight-decay update), where ``SkipStepAdamW`` multiplies its
    update terms by a 0/1 step factor, so a NaN gradient would still reach its moments
    (``lerp_(nan, 0)`` is NaN); (2) a non-finite loss or grad norm skips the step and is not
    added to the lists (in the reference a NaN in the list makes the std NaN, every comparison
    false and every step of the next ``rolling_interval_length`` skipped).

ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507)
    Source: ``bluorion-com/ZClip``, ``zclip/zclip.py`` (class ``ZClip``, ``mode="zscore"``,
    ``clip_option="adaptive_scaling"``). The first ``warmup_steps`` (25) grad norms are only
    collected (no clipping); then the EMA mean and variance start from their mean and population
    variance. Each step: ``z = (g - mean) / (std + eps)``; if ``z > z_thresh`` (2.5) the
    gradient is clipped to ``mean + (z_thresh * std) / (z / z_thresh)`` =
    ``mean + z_thresh**2 / z * std`` (times ``clip_factor`` 1.0). The EMA (``alpha`` 0.97) is
    then updated with the clipped norm (or the raw norm when not clipped):
    ``mean = a*mean + (1-a)*g``; ``var = a*var + (1-a)*(g - mean)**2`` with the new mean.
    The repository's newest ``ZClip`` adds a fixed ``max_grad_norm`` ceiling (1.0); the rule
    here is the paper's, without a ceiling (``zclip-clip1.0`` adds one). As in the reference,
    a non-finite grad norm is not clipped (a clip cannot repair a NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def total_grad_norm(params: list[torch.Tensor]) -> float:
    """The global L2 norm of the gradients (NaN/inf if any element is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])))


def scale_grads(params: list[torch.Tensor], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


@dataclass
class SkipStepRule:
    """OLMo-core's skip-step rule (see the module docstring for the source and the differences)."""

    rolling_interval_length: int = 128
    sigma_factor: float = 6.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    steps: int = 0

    @property
    def min_values(self) -> int:
        return max(20, self.rolling_interval_length // 2)

    def _push(self, values: list[float], x: float) -> None:
        values.append(x)
        while len(values) > self.rolling_interval_length + 1:
            values.pop(0)

    @staticmethod
    def _std_mean(values: list[float]) -> tuple[float, float]:
        t = torch.tensor(values, dtype=torch.float64)
        std, mean = torch.std_mean(t)
        return float(std), float(mean)

    def take_step(self, loss: float, grad_norm: float) -> bool:
        """Whether the optimizer should take this step (records it either way)."""
        self.steps += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped += 1
            return False
        self._push(self.losses, loss)
        self._push(self.grad_norms, grad_norm)
        if len(self.losses) < self.min_values:
            return True
        loss_std, loss_mean = self._std_mean(self.losses[:-1])
        gn_std, gn_mean = self._std_mean(self.grad_norms[:-1])
        ok = (loss - loss_mean) <= self.sigma_factor * loss_std and (grad_norm - gn_mean) <= self.sigma_factor * gn_std
        if not ok:
            self.skipped += 1
        return ok

    def stats(self) -> dict:
        return {"rule": "skipstep", "steps": self.steps, "skipped_steps": self.skipped,
                "skipped_fraction": self.skipped / max(self.steps, 1),
                "rolling_interval_length": self.rolling_interval_length, "sigma_factor": self.sigma_factor}


@dataclass
class ZClipRule:
    """ZClip's z-score rule with adaptive scaling (see the module docstring for the source)."""

    alpha: float = 0.97
    z_thresh: float = 2.5
    clip_factor: float = 1.0
    eps: float = 1e-6
    warmup_steps: int = 25
    max_grad_norm: float | None = None
    buffer: list[float] = field(default_factory=list)
    mean: float | None = None
    var: float | None = None
    clipped: int = 0
    steps: int = 0

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    def clip_value(self, grad_norm: float) -> float | None:
        """The norm this step's gradient is clipped to, or None (also updates the statistics)."""
        self.steps += 1
        if not self.initialized:
            self.buffer.append(grad_norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.buffer = []
            return self.max_grad_norm if self.max_grad_norm is not None and grad_norm > self.max_grad_norm else None
        std = self.var ** 0.5
        z = (grad_norm - self.mean) / (std + self.eps)
        adaptive = None
        if z > self.z_thresh:
            adaptive = (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        effective = adaptive if adaptive is not None else grad_norm
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * (adaptive if adaptive is not None else grad_norm)
        self.var = self.alpha * self.var + (1 - self.alpha) * ((adaptive if adaptive is not None else grad_norm)
                                                               - self.mean) ** 2
        if effective < grad_norm:
            self.clipped += 1
            return effective
        return None

    def stats(self) -> dict:
        return {"rule": "zclip", "steps": self.steps, "clipped_steps": self.clipped,
                "clipped_fraction": self.clipped / max(self.steps, 1), "alpha": self.alpha,
                "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm}
