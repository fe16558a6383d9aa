"""The step-size governor: a ceiling on each group's effective lr, moved only by evidence that
the commanded step is too large, and rising back when the evidence goes away.

The scheduler's lr is the user's intent (warm restarts, cyclic schedules, re-warmup, manual
bumps and per-group ratios such as LoRA+ are not faults), so the issued scale is
``min(1, ceiling / lr)``: a schedule that decays below the ceiling runs at scale 1, a restart
back above it is capped at once, and without a ceiling nothing is capped. Nothing compares the
lr with a number chosen in advance. The signals, from the fused kernel's telemetry, and what
measurement taught about each (tiny GPT-2, Llama, Qwen2, GPT-NeoX and MLP language models on
the stdlib corpus, 300 steps, constant / warmup+cosine / warm restarts / OneCycle, plain AdamW
at 1/3x to 100x each setting's best lr):

- **oscillation** (omega): Adam's normalised momentum energy against its white-noise level,
  per matrix (geometric mean over the group's matrices). About 1 is gradient noise, well below
  1 means successive gradients cancel. At the best lr it stayed at 0.6-1.9 for every
  transformer and schedule; at 10x it fell to 0.01-0.15 within 20-40 steps. It carries the
  second moment's memory (a run that oscillated keeps a large v for hundreds of steps), which
  holds a 10x run down, but would also keep cutting a run whose cut already worked: a further
  cut needs omega to have fallen further since the last one. An MLP with LayerNorm oscillates
  at its own best lr (omega ~0.1, its loss flat from 0.03 to 0.3): the governor caps it, at no
  cost in loss, but it is capped.
- **overshoot along the step** (the secant estimate): along the last update u_t the loss is
  ``L0 + a g_t.u_t + a^2/2 u_t.H.u_t``; the gradient after the step gives
  ``u_t.H.u_t ~ g_{t+1}.u_t - g_t.u_t``, so the best fraction of the step taken is
  ``alpha = -g_t.u_t / (g_{t+1}.u_t - g_t.u_t)``. In the first records of a run it separates the
  lrs (about 2 at the best lr, 1.1 at 3x, 0.8 at 10x); afterwards minibatch noise keeps it near
  1 at every lr, so it only acts in the first ``early_records``.
- **the update envelope**: no step may move the group's matrices by more than
  ``max_update_ratio`` of their own norm (RMS over matrices of ||u_i|| / ||theta_i||, each
  matrix on its own; zero-initialised ones, such as LoRA's B, excluded). Adam's first update
  moves every element by the lr, before any evidence can exist; 3 steps at 10x already cost
  Qwen2 16% of final loss, 10 steps 24%, and cutting to the best lr afterwards does not undo it.
  The best lr's first step moved those models' matrices by 5-15% (realistic setups far less);
  0.5 caps a 10x first step at ~3x (1.0 let Qwen2 end 22% above its best instead of 15%). An
  envelope cut sets the ceiling, which rises again in the first records only when the secant
  estimate says the steps are clearly too short (``alpha_raise``), later when omega is healthy.

A cut is rate-limited (``cut_interval`` records apart) and bounded by ``min_scale``; without
evidence the ceiling rises by ``recovery_rate`` per record and is dropped once far above the
schedule, so nothing latches.
"""

from __future__ import annotations

import math

from .config import GuardConfig
from .signals import StepSignals, per_group


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class StepSizeGovernor:
    """Per-group lr scale from evidence; pure host logic over telemetry records."""

    def __init__(self, config: GuardConfig, num_groups: int):
        self.config = config
        self.num_groups = 0
        self.resize(num_groups)

    def resize(self, num_groups: int) -> None:
        num_groups = max(int(num_groups), 1)

        def fit(values: list, fill) -> list:
            return (values + [fill] * num_groups)[:num_groups]

        self.ceiling = fit(getattr(self, "ceiling", []), None)  # max effective lr, or None
        self.log_omega = fit(getattr(self, "log_omega", []), None)
        self.omega_samples = fit(getattr(self, "omega_samples", []), 0)
        self.log_alpha = fit(getattr(self, "log_alpha", []), None)
        self.alpha_samples = fit(getattr(self, "alpha_samples", []), 0)
        self.since_cut = fit(getattr(self, "since_cut", []), 1 << 30)
        self.ratio_per_lr = fit(getattr(self, "ratio_per_lr", []), None)
        self.prev_gu = fit(getattr(self, "prev_gu", []), None)  # (step, -g.u, lr_eff) of the last written record
        self.records = fit(getattr(self, "records", []), 0)  # written records seen
        self.omega_at_cut = fit(getattr(self, "omega_at_cut", []), None)  # filtered log omega at the last cut
        self.num_groups = num_groups

    def seed_ratio(self, values: list) -> None:
        """RMS over each group's matrices of 1/rms(theta_i), measured before the first step:
        Adam's first update moves every element by the lr, so lr * this is its update ratio."""
        for g, v in enumerate(values[: self.num_groups]):
            if _finite(v) and v > 0 and self.ratio_per_lr[g] is None:
                self.ratio_per_lr[g] = float(v)

    # ------------------------------------------------------------------ issuing
    def target(self, g: int, lr: float) -> tuple[float, str | None]:
        """The scale this group may run at next, and the bound that set it (None: 1).

        The governor's state is a ceiling on the effective lr, in lr units: a schedule that
        decays below it runs at scale 1, and a warm restart back above it is capped at once.
        """
        c = self.config
        if c.governor == "off" or not _finite(lr) or lr <= 0:
            return 1.0, None
        target, bound = 1.0, None
        ceiling = self.ceiling[g]
        if ceiling is not None and ceiling < lr:
            target, bound = ceiling / lr, "overshoot"
        envelope = self.envelope(g, lr)
        if envelope < target:
            # A step outside the envelope is evidence in itself: the ceiling starts from there
            # and rises again only on evidence that the steps are short (or, later, healthy).
            target, bound = envelope, "update_envelope"
            self.ceiling[g] = max(c.min_scale, envelope) * lr
        return min(1.0, max(c.min_scale, target)), bound

    def envelope(self, g: int, lr: float) -> float:
        """Largest scale keeping the predicted update ratio under ``max_update_ratio``."""
        rpl = self.ratio_per_lr[g]
        if self.config.max_update_ratio is None or rpl is None or not _finite(lr) or lr <= 0:
            return math.inf
        return self.config.max_update_ratio / (lr * rpl)

    # ------------------------------------------------------------------ observing
    def observe(self, sig: StepSignals, issued_scale: list[float], lrs: list[float]) -> list[dict]:
        """Fold one record in; returns the cuts and releases it decided (for events)."""
        c = self.config
        decisions = []
        if c.governor == "off":
            return decisions
        for g, gs in enumerate(sig.groups):
            self.since_cut[g] += 1
            lr_eff = lrs[g] * issued_scale[g] if _finite(lrs[g]) else math.nan
            if not gs.written:
                continue
            ratio = gs.update_ratio
            if ratio is not None and _finite(lr_eff) and lr_eff > 0 and ratio > 0:
                self.ratio_per_lr[g] = ratio / lr_eff
            alpha = self._alpha(g, sig.step, gs, lr_eff)
            if alpha is not None:
                self.log_alpha[g] = self._ema(self.log_alpha[g], math.log(alpha), self.alpha_samples[g], c.alpha_window)
                self.alpha_samples[g] += 1
            if gs.log_omega is not None:
                self.log_omega[g] = self._ema(self.log_omega[g], gs.log_omega, self.omega_samples[g], c.omega_window)
                self.omega_samples[g] += 1
            why = self._evidence(g)
            floor = c.min_scale * lrs[g] if _finite(lrs[g]) else 0.0
            if why is not None and self.since_cut[g] >= c.cut_interval and _finite(lr_eff) and lr_eff > floor:
                before = self.ceiling[g]
                self.ceiling[g] = max(floor, lr_eff * c.cut_factor)
                self.since_cut[g] = 0
                self.omega_at_cut[g] = self.log_omega[g]
                decisions.append({"group": g, "from_lr": lr_eff, "to_lr": self.ceiling[g], "why": why,
                                  "omega": self._value(self.log_omega[g]), "alpha": self._value(self.log_alpha[g]),
                                  "ceiling_before": before})
            elif why is None and self._healthy(g):
                self.omega_at_cut[g] = None  # the episode is over
            if why is None and self.ceiling[g] is not None and self._healthy(g):
                self.ceiling[g] *= 1.0 + c.recovery_rate
                if _finite(lrs[g]) and self.ceiling[g] >= lrs[g] * 4.0:
                    self.ceiling[g] = None  # far above the schedule: no ceiling any more
            self.records[g] += 1
        return decisions

    def _alpha(self, g: int, step: int, gs, lr_eff: float) -> float | None:
        """Secant estimate from this record's g.d_prev and the previous written record's g.u."""
        prev, self.prev_gu[g] = self.prev_gu[g], None
        gu = gs.grad_dot_update
        if _finite(gu) and gu < 0 and _finite(lr_eff) and lr_eff > 0:
            self.prev_gu[g] = (step, -gu, lr_eff)
        if prev is None or prev[0] != step - 1:
            return None
        a = prev[1]  # -g_t.u_t > 0: the first-order decrease the step promised
        b = -prev[2] * gs.grad_dot_prev  # g_{t+1}.u_t (u_t = -lr_eff d_t, weight decay aside)
        if not (_finite(b) and a > 0) or a + b <= 0:
            return None if not _finite(b) else self.config.alpha_max  # no curvature seen: step too short
        return min(self.config.alpha_max, max(1e-3, a / (a + b)))

    @staticmethod
    def _ema(old: float | None, x: float, samples: int, window: int) -> float:
        if old is None:
            return x
        w = max(1.0 / (samples + 1), 1.0 / window)
        return old + w * (x - old)

    @staticmethod
    def _value(log_x: float | None) -> float | None:
        return math.exp(log_x) if log_x is not None else None

    def _evidence(self, g: int) -> str | None:
        c = self.config
        omega = self.log_omega[g]
        if self.omega_samples[g] >= c.min_evidence and omega < math.log(c.omega_low):
            # omega carries the second moment's memory: after a cut it recovers slowly even when
            # the cut worked, so a further cut needs it to have fallen further since the last.
            at_cut = self.omega_at_cut[g]
            if at_cut is None or omega < at_cut + math.log(c.omega_worsening):
                return "oscillation"
        # The secant estimate carries information early; later minibatch noise keeps it near 1
        # at every lr (measured), so it only cuts in the first records of a run.
        if (self.records[g] < c.early_records and self.alpha_samples[g] >= c.min_evidence
                and self.log_alpha[g] < math.log(c.alpha_low)):
            return "overshoot"
        return None

    def _healthy(self, g: int) -> bool:
        """Recovery needs healthy signals; in the first records of a run, before omega means
        anything, it needs positive evidence that the steps are too short."""
        c = self.config
        alpha = self.log_alpha[g]
        if self.records[g] < c.early_records:
            return alpha is not None and self.alpha_samples[g] >= c.min_evidence and alpha > math.log(c.alpha_raise)
        omega_ok = self.log_omega[g] is None or self.log_omega[g] > math.log(c.omega_high)
        alpha_ok = alpha is None or alpha > math.log(c.alpha_high)
        return omega_ok and alpha_ok

    def on_rollback(self, lrs: list[float], scales: list[float]) -> None:
        """The run diverged at the current effective lr: continue from a lower one."""
        c = self.config
        for g in range(self.num_groups):
            if g < len(lrs) and _finite(lrs[g]) and lrs[g] > 0:
                lr_eff = lrs[g] * (scales[g] if g < len(scales) else 1.0)
                self.ceiling[g] = max(c.min_scale * lrs[g], lr_eff * c.rollback_scale)
            self.since_cut[g] = 0
            self.prev_gu[g] = None

    # ------------------------------------------------------------------ state
    _FIELDS = ("ceiling", "log_omega", "omega_samples", "log_alpha", "alpha_samples", "since_cut",
               "ratio_per_lr", "prev_gu", "records", "omega_at_cut")

    def state_dict(self) -> dict:
        return {"num_groups": self.num_groups, **{k: list(getattr(self, k)) for k in self._FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.resize(int(state["num_groups"]))
        for k in self._FIELDS:
            values = per_group(k, state[k], self.num_groups)
            if k == "prev_gu":
                values = [tuple(v) if v is not None else None for v in values]
            setattr(self, k, values)
