"""Faults injected into a run of the generalization matrix, the same for every arm.

Each fault fires at fixed steps (fractions of the run, after every rule's warm-up: the guard's
20 records, ZClip's 25 steps, SkipStep's 64 values), between ``loss.backward()`` and the
optimizer step, or on the batch before the forward pass:

- ``spike-1e3`` ... ``spike-1e6``: every gradient multiplied by 1e3 ... 1e6 at two steps (x1e3 is
  the fault nearest the guard's per-element bound, x1e6 the farthest).
- ``spike-early``: every gradient x1e4 at the run's first step and its seventh, *before* the
  warm-ups: where no per-element bound has a history (the first two steps) and where only the
  guard's loose warm-up bound (``spike_k_warmup``) stands. The baseline rules have nothing to
  measure a spike against there either; plain AdamW keeps it in v and stalls.
- ``nan-grad``: one element of one gradient tensor (the first matrix of the first transformer
  layer) set to NaN at two steps.
- ``random-batch``: one batch replaced by uniform random tokens.
- ``data-switch``: training data switches from English prose to source code half-way (see
  :class:`SwitchData`); held-out loss is measured on the code. By default the guard is not
  told (``notify_data_change`` is the user's announcement; ``announce=True`` makes the run call it
  at the switch).

``clean`` is the no-fault reference run every fault run is compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .data import TokenData, schedule_seed

FAULTS = ("spike-1e3", "spike-1e4", "spike-1e5", "spike-1e6", "spike-early", "nan-grad", "random-batch",
          "data-switch")
# Every gradient multiplied by this factor at the fault's steps.
SPIKE_FACTORS = {"spike-1e3": 1e3, "spike-1e4": 1e4, "spike-1e5": 1e5, "spike-1e6": 1e6, "spike-early": 1e4}
GRAD_FAULTS = (*SPIKE_FACTORS, "nan-grad")  # the faults that corrupt gradients, at two steps
LABELS = {
    "clean": "clean (no fault)",
    "spike-1e3": "grad x1e3 at 2 steps",
    "spike-1e4": "grad x1e4 at 2 steps",
    "spike-1e5": "grad x1e5 at 2 steps",
    "spike-1e6": "grad x1e6 at 2 steps",
    "spike-early": "grad x1e4 at steps 1 and 7",
    "nan-grad": "NaN grad element at 2 steps",
    "random-batch": "1 random-token batch",
    "data-switch": "prose -> code switch at 50%",
}
# When each fault fires, as fractions of the run (two-step faults at both).
TWO_STEP_FRACTIONS = (0.4, 0.7)
ONE_STEP_FRACTION = 0.5
EARLY_STEPS = (0, 6)  # spike-early: 0-based, whatever the run's length


def fault_steps(name: str, steps: int) -> tuple[int, ...]:
    """The 0-based steps at which ``name`` fires in a run of ``steps`` steps."""
    if name == "clean":
        return ()
    if name == "spike-early":
        return tuple(s for s in EARLY_STEPS if s < steps)
    if name in GRAD_FAULTS:
        out = sorted({min(steps - 1, max(0, int(f * steps))) for f in TWO_STEP_FRACTIONS})
        return tuple(out)
    if name in ("random-batch", "data-switch"):
        return (min(steps - 1, max(0, int(ONE_STEP_FRACTION * steps))),)
    raise ValueError(f"unknown fault {name!r}; choose from {('clean',) + FAULTS}")


@dataclass
class FaultPlan:
    """What to corrupt and when; :meth:`bind` it to a run before its first step."""

    name: str
    steps: int
    announce: bool = False  # data-switch: call guard.notify_data_change() at the switch
    fired: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.at = set(fault_steps(self.name, self.steps))
        self._target: torch.Tensor | None = None
        self._params: list[torch.Tensor] = []
        self._vocab = 0
        self._seed = 0

    def bind(self, groups: list[dict], vocab_size: int, seed: int) -> None:
        self._params = [p for g in groups for p in g["params"]]
        self._vocab, self._seed = vocab_size, seed
        layer = [p for g in groups if str(g.get("name", "")).startswith("layer") for p in g["params"] if p.dim() == 2]
        self._target = layer[0] if layer else next(p for p in self._params if p.dim() >= 1)
        self.fired = []

    def corrupt_batch(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        if self.name != "random-batch" or step not in self.at:
            return tokens
        gen = torch.Generator().manual_seed(7919 * self._seed + step)
        self.fired.append(step)
        return torch.randint(0, self._vocab, tokens.shape, generator=gen).to(tokens.device)

    @torch.no_grad()
    def corrupt_grads(self, step: int) -> None:
        if step not in self.at or self.name not in GRAD_FAULTS:
            return
        self.fired.append(step)
        if self.name == "nan-grad":
            g = self._target.grad
            if g is not None:
                g.view(-1)[0] = math.nan
            return
        factor = SPIKE_FACTORS[self.name]
        for p in self._params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def announce_at(self, step: int) -> bool:
        return self.name == "data-switch" and self.announce and step in self.at


class SwitchData(TokenData):
    """Prose until ``switch_step``, then code: one stream ``[prose | code]`` whose batch schedule
    draws windows from the prose part before the switch and from the code part after it.
    The held-out split is the code's (the post-switch distribution)."""

    def __init__(self, prose: TokenData, code: TokenData, switch_step: int) -> None:
        if prose.vocab_size != code.vocab_size or prose.seq_len != code.seq_len:
            raise ValueError("the prose and code streams need the same tokenizer and seq_len")
        super().__init__(torch.cat([prose.train, code.train]), code.heldout, code.vocab_size, code.seq_len)
        self.boundary = prose.train.numel()
        self.switch_step = switch_step

    def batch_schedule(self, steps: int, batch_size: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(schedule_seed(seed))
        pre = min(self.switch_step, steps)
        prose_high = self.boundary - self.seq_len - 1
        code_high = self.train.numel() - self.boundary - self.seq_len - 1
        a = torch.randint(0, prose_high, (pre, batch_size), generator=gen)
        b = torch.randint(0, code_high, (steps - pre, batch_size), generator=gen) + self.boundary
        return torch.cat([a, b])
