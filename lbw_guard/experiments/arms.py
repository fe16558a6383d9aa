"""The optimizer arms a stress sweep compares, and how each one takes a step.

An arm is an optimizer plus an optional host-side gradient clip. The AdamW baselines are
``torch.optim.AdamW`` with its default (foreach) implementation, clipped with
``torch.nn.utils.clip_grad_norm_`` like a user's training loop would; the guard arms are
:class:`lbw_guard.FusedGuardedAdamW`, whose ``max_grad_norm`` clip is fused into the step.

The generalization matrix adds three baselines (see :mod:`.baselines` for their sources):
``skipstep`` (OLMo-core's SkipStepAdamW rule), ``zclip`` (ZClip's adaptive clipping), both in
front of ``torch.optim.AdamW``, and ``adamw-guardlr``: plain AdamW at the guard's mean effective
learning rate (the caller passes lr x the guard run's ``summary()["mean_scale"]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_ARMS = ("adamw", "adamw-clip1.0", "adamw-clip0.5", "guard", "guard-clip1.0")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-guardlr", "guard", "guard-off", "skipstep", "zclip")
_ARM_RE = re.compile(r"^(" + "|".join(sorted(OPTIMIZERS, key=len, reverse=True))
                     + r")(?:-clip(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str  # one of OPTIMIZERS: "adamw" (torch foreach), "adamw-fused" (torch fused), "guard", ...
    clip: float | None

    @property
    def guarded(self) -> bool:
        return self.optimizer == "guard"

    @property
    def label(self) -> str:
        base = {
            "adamw": "AdamW",
            "adamw-fused": "AdamW (torch fused)",
            "guard": "guard",
            "guard-off": "FusedGuardedAdamW (guard off)",
            "adamw-guardlr": "AdamW at guard's mean lr",
            "skipstep": "SkipStep (OLMo-core)",
            "zclip": "ZClip",
        }[self.optimizer]
        if self.clip is None:
            return base
        clip = f"{self.clip:.1f}" if round(self.clip, 1) == self.clip else f"{self.clip:g}"
        return f"{base} + clip {clip}"


def parse_arm(name: str) -> Arm:
    """``adamw``, ``adamw-clip0.5``, ``guard``, ``guard-clip1.0``, ``adamw-fused``, ``guard-off``,
    ``skipstep``, ``zclip``, ``adamw-guardlr`` (each optionally with ``-clipG``)."""
    m = _ARM_RE.match(name.strip())
    if not m:
        raise ValueError(
            f"unknown arm {name!r}: use {', '.join(OPTIMIZERS)}, optionally "
            f"followed by -clipG with G > 0 (e.g. adamw-clip0.5)"
        )
    clip = float(m.group(2)) if m.group(2) else None
    if clip is not None and clip <= 0:
        raise ValueError(f"arm {name!r}: the clip norm must be positive")
    return Arm(name=name.strip(), optimizer=m.group(1), clip=clip)


def build_optimizer(
    arm: Arm,
    param_groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    guard: str = "default",
    backend: str = "auto",
) -> torch.optim.Optimizer:
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if arm.optimizer in ("adamw", "adamw-guardlr", "skipstep", "zclip"):
        return torch.optim.AdamW(param_groups, **kw)
    if arm.optimizer == "adamw-fused":
        return torch.optim.AdamW(param_groups, fused=True, **kw)
    from lbw_guard.optimizer import FusedGuardedAdamW

    return FusedGuardedAdamW(
        param_groups,
        **kw,
        guard=guard if arm.optimizer == "guard" else None,
        max_grad_norm=arm.clip,
        backend=backend,
    )


class Stepper:
    """Takes one optimizer step the way this arm's user would write it."""

    def __init__(self, arm: Arm, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        from .baselines import SkipStepRule, ZClipRule

        self.arm = arm
        self.optimizer = optimizer
        self.params = params
        self._fused_kind = arm.optimizer in ("guard", "guard-off")
        self.rule = None
        if arm.optimizer == "skipstep":
            self.rule = SkipStepRule()
        elif arm.optimizer == "zclip":
            self.rule = ZClipRule(max_grad_norm=arm.clip)

    def step(self, loss: torch.Tensor) -> None:
        from .baselines import SkipStepRule, ZClipRule, scale_grads, total_grad_norm

        if self._fused_kind:
            # The clip (if any) is the optimizer's own fused max_grad_norm.
            self.optimizer.step(loss=loss.detach())
        elif isinstance(self.rule, SkipStepRule):
            # OLMo-core records the grad norm before its clipper clips, then decides.
            norm = total_grad_norm(self.params)
            if self.arm.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.arm.clip)
            if self.rule.take_step(float(loss.detach()), norm):
                self.optimizer.step()
        elif isinstance(self.rule, ZClipRule):
            norm = total_grad_norm(self.params)
            target = self.rule.clip_value(norm)  # includes the -clipG ceiling, if any
            if target is not None:
                scale_grads(self.params, target / (norm + 1e-6))
            self.optimizer.step()
        else:
            if self.arm.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.arm.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def stats(self) -> dict | None:
        """What a baseline rule did (skipped or clipped steps), or None for the other arms."""
        return self.rule.stats() if self.rule is not None else None
