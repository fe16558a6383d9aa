"""The optimizer arms a stress sweep compares, and how each one takes a step.

An arm is an optimizer plus an optional host-side gradient clip. The AdamW baselines are
``torch.optim.AdamW`` with its default (foreach) implementation, clipped with
``torch.nn.utils.clip_grad_norm_`` like a user's training loop would; the guard arms are
:class:`lbw_guard.FusedGuardedAdamW`, whose ``max_grad_norm`` clip is fused into the step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_ARMS = ("adamw", "adamw-clip1.0", "adamw-clip0.5", "guard", "guard-clip1.0")
_ARM_RE = re.compile(r"^(adamw|adamw-fused|guard|guard-off)(?:-clip(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str  # "adamw" (torch foreach), "adamw-fused" (torch fused), "guard", "guard-off"
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
        }[self.optimizer]
        if self.clip is None:
            return base
        clip = f"{self.clip:.1f}" if round(self.clip, 1) == self.clip else f"{self.clip:g}"
        return f"{base} + clip {clip}"


def parse_arm(name: str) -> Arm:
    """``adamw``, ``adamw-clip0.5``, ``guard``, ``guard-clip1.0``, ``adamw-fused``, ``guard-off``."""
    m = _ARM_RE.match(name.strip())
    if not m:
        raise ValueError(
            f"unknown arm {name!r}: use adamw, adamw-fused, guard or guard-off, optionally "
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
    if arm.optimizer == "adamw":
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
        self.arm = arm
        self.optimizer = optimizer
        self.params = params
        self._fused_kind = arm.optimizer in ("guard", "guard-off")

    def step(self, loss: torch.Tensor) -> None:
        if self._fused_kind:
            # The clip (if any) is the optimizer's own fused max_grad_norm.
            self.optimizer.step(loss=loss.detach())
        else:
            if self.arm.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.arm.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
