"""The step-size governor: a ceiling on each group's effective lr, moved only by evidence that
the commanded step is too large, and rising back when the evidence goes away.

The scheduler's lr is the user's intent (warm restarts, cyclic schedules, re-warmup, manual
bumps and per-group ratios such as LoRA+ are not faults), so the issued scale is
``min(1, ceiling / lr)``: a schedule that decays below the ceiling runs at scale 1, a restart
back above it is capped at once, and without a ceiling nothing is capped. Nothing compares the
lr with a number chosen in advance. What measurement taught (tiny GPT-2, Llama, Qwen2,
GPT-NeoX and MLP language models on the stdlib corpus, 240-300 steps, constant / warmup+cosine /
warm restarts / OneCycle, plain AdamW at 1/3x to 100x each setting's best lr, whole-model and
per-layer param groups):

- **oscillation** (omega) is the evidence. Adam's normalised momentum energy against its
  white-noise level, per matrix: about 1 is gradient noise, well below 1 means successive
  gradients cancel, or that they shrank (see omega_recent). Over every matrix of the model
  (geometric mean) it stayed at 0.6-1.9 at the best lr for every transformer and schedule and
  fell to 0.01-0.15 at 10x within 20-40 steps; one layer alone dips to ~0.4 at the best lr, so
  the evidence is pooled over all groups and one decision cuts every group's ceiling in
  proportion (which also keeps LoRA+ ratios). Its level does not separate every healthy run from
  every harmful one: healthy warmup + cosine runs dip to 0.19-0.25 at the schedule's peak,
  GPT-NeoX on prose at its code-tuned lr reads 0.04-0.15. And it lags: at 10x under warmup +
  cosine it passes 0.15 about 20 steps after the schedule's peak, when the damage is done, and
  cuts from then on left Qwen2 and Llama worse than no cut at all (5.57 vs 5.45, 5.42 vs 5.31;
  cutting earlier, at 0.4, worse still: 5.68, 5.59). So ``omega_low`` is 0.05: only deep
  oscillation cuts, and the first steps are the envelope's job.
  omega carries the second moment's memory (a run that oscillated keeps a large v for hundreds
  of steps): that holds a 10x run down, but would also keep cutting a run whose cut worked, so
  a further cut needs omega to have fallen further since the last one. An MLP with LayerNorm
  oscillates at its own best lr (omega ~0.1; its loss is flat from 0.03 to 0.3): above
  ``omega_low``, so it runs uncapped (at 0.15 it was capped, at no cost in loss).
- **omega_recent** confirms it. omega divides by v, the mean of the last ~1/(1-beta2) steps'
  squared gradients, so it also reads low when the gradients are merely smaller than they were:
  omega ~ cancellation x (recent gradient energy / v). omega_recent divides the momentum energy
  by the white-noise energy of the recent gradients instead
  (``sum |m_{t-1}|^2 / (1-b1)^2`` over ``sum_k b1^(2k) |g_{t-1-k}|^2``, whole model, kept on the
  host from the record's ``moment1_sq`` and ``grad_sq``), 1 whatever the gradients' size when
  they are uncorrelated. Measured: rsLoRA (Phi) at 10x, omega 0.01 from step 40 on while
  omega_recent stayed 1.2-1.5; the cuts took it to the floor for the rest of the run and it
  ended 6% worse than AdamW (1.27 vs 1.20 of the best loss); GPT-NeoX on prose at its
  code-tuned lr, omega 0.05 and omega_recent 1.0-1.3, was cut and capped on 29% of its steps.
  With a cut needing omega_recent below 1 as well, the data switch is not cut (uncapped,
  +0.04%), nor is Qwen2 at 10x under warmup + cosine (1.155 -> 1.149); rsLoRA is cut later and
  less (mean scale 0.53 instead of 0.26; 1.196, AdamW 1.197).
  Below 1 is not yet oscillation: a share f of the gradient energy that flips sign every step
  reads (1 - f) + f (1 - b1) / (1 + b1), so mild anti-correlation reads 0.7-0.9. The held-out
  sets (3 seeds) showed what cuts there cost. OLMo-2 at 10x (QK-norm) read omega 0.02-0.06 with
  omega_recent 0.6-0.94, was cut to 0.13-0.22 of its lr and ended 1.18-1.41 of the best loss
  where plain AdamW ended 1.05-1.11: Adam had already shrunk the step itself (the uncut run's
  update/param ratio fell to ~1e-2, the same as the run at the best lr; the cut run's to
  1.6-3.5e-3), and omega went on falling with or without the cuts. Starcoder2 and Mistral under
  hard restarts read 0.7-1.05 at their cuts and were hurt too; the cuts that helped (GPT-BigCode,
  Gemma) read 0.41-0.45. So ``omega_recent_max`` is 0.5, about half of the gradient energy
  alternating: the 60 held-out 10x runs went from 1.146 to 1.130 of the best loss on the mean
  (30 to 35 within 15%; the guard worse than AdamW in 14 instead of 17), and the matrix's 35 runs
  with a cut from 1.0758 to 1.0761 (its counts within 15% unchanged). The guard still ends worse
  than AdamW at 10x on some warmup schedules (Gemma polynomial, Starcoder2): the cut lags the
  damage. With the fused clipping (``max_grad_norm``) m holds clipped gradients while
  ``grad_sq`` is measured before the clip, so omega_recent reads low by the clip factor squared
  on clipped steps: the confirmation weakens towards omega alone, never the other way.
- **the update envelope** protects the first steps. No step may move a group's matrices by more
  than ``max_update_ratio`` of their own norm (RMS over matrices of ||u_i|| / ||theta_i||, each
  matrix on its own, zero-initialised ones such as LoRA's B excluded). Adam's first update moves
  every element by the lr, before any evidence can exist; 3 steps at 10x already cost Qwen2 16%
  of its final loss, 10 steps 24%, and cutting to the best lr afterwards does not undo it. The
  best lr moved the transformers' matrices by 5-50% on its first step (GPT-NeoX 50%, an MLP
  with LayerNorm 83%; realistic setups far less), 10x by 150%. A step predicted above
  ``max_update_ratio`` (1.0: as large as the matrices themselves) is cut to half of it, which
  holds a 10x first step at ~3x (cutting to 1.0 let Qwen2 end 22% above its best, to 0.5 15%)
  and leaves every best lr measured alone. The
  envelope acts in the first ``early_records`` only: later omega has a history, and an
  envelope predicted from the end of a warm-restart cycle (a tiny lr, large normalised
  updates) would cap the restart itself. An envelope cut sets the ceiling, which holds
  through the first ``early_records``.
- **the loss efficiency** covers the start the envelope does not see. Where the first step is
  small against the weights (HF init 0.02), a 10x lr does its harm in the first 5-10 steps,
  long before omega falls (``python -m benchmarks.heldout --late-cut``: AdamW at 10x cut to 3x
  after 5 steps ends 27 of the 30 held-out runs within 15% of the best, after 10 steps 20,
  after 40 steps 14). The evidence there is the loss: since the start of the run (or the last
  cut), over at least ``efficiency_window`` (6) steps, it fell by less than ``efficiency_low``
  (0.15) of the decrease the steps predicted to first order (``-sum g.u``, which the kernel
  reports). Where judged (below) in the first 12 records of the runs traced (held out and
  matrix, seed 0), it read 0.21-0.84 at the best lr and -0.06-0.06 at 10x on a constant lr
  (OPT 0.13-0.15); under a warmup a 10x run still reads 0.3-0.8 there (its lr is still small).
  Since the start, not over the last 6 steps: an MLP language model at its best lr (held out,
  seed 2, 3e-3) overshot on its second step (the loss rose by 1.0 where the step predicted a
  fall of 5.7) and had recovered all of it by the eighth; the last 6 steps read 0.07 at record
  7, and that window cut it and capped it on 93% of its steps (+5.6%); since the start it read
  0.21-0.26. A loss plateau also stops following the prediction (GPT-NeoX on prose at its
  code-tuned lr read 0.01-0.06 at records 9-13 on 2 seeds of 3), but its gradients keep
  agreeing with the last step, so a cut also needs the filtered whole-model cosine of g_t with
  the previous direction below 0 (the hypergradient's sign: the step overshot). The efficiency
  is judged only when the steps predicted a decrease of at least ``efficiency_min_drop`` (30%)
  of the loss, below which two minibatch losses decide, never on a loss that did not move at
  all (a constant passed to ``step``: it was cut by record 7). Healthy starts also read low
  where the loss cannot follow a prediction of half of itself: PiSSA and rank-64 LoRA at their
  best lr, fine-tunes near their loss floor (their steps predicted 0.30-0.69 of the loss) were
  sent back to their start and capped for the rest of the run. Their predictions die out as
  their gradients fall (the last three steps 0.19-0.50 of the first three, grad norms within
  2.03x the first record's); a step too large for the loss keeps predicting. So a prediction
  below the loss itself (``efficiency_large_drop``) counts only while the steps keep
  predicting: the gradients risen to ``efficiency_grad_rise`` (3x) the first record's, or the
  last three predictions at least the first three (LoRA under a warmup at 10x: 3.7-11x, or
  2.5x). It is judged only in the first ``efficiency_records`` (12): later the schedule moves
  the lr (the end of a warmup, a restart)
  and healthy runs read 0.0-0.1 (GPT-2 under warm restarts, Gemma under polynomial decay).
  Reaching to the end of a 24-step warmup (30 records, the last 6 steps with the last 3 also
  below 0.3 of their prediction) cut Gemma under polynomial decay at 10x at record 18 and it
  ended worse than uncut (1.194 of the best loss against 1.174; seed 0, the held-out 10x mean
  1.126 against 1.117-1.120 with 12 records), so it stays at the start. Its cut is the
  oscillation cut (``cut_factor``), and the efficiency then starts again from the new ceiling.
  The first such cut, while the start is held, also sends the run back to its start
  (``overshoot_restart``, decided by the controller with recovery): the steps already taken
  at the too-high lr did damage the cut cannot undo. Only a cut that lowered the parameters'
  lr (element-weighted) by at least half a cut does: where the envelope already holds most of
  them at ``min_scale`` the cut lowers only the small groups above it, and going back would
  only throw the steps away. The restarted run continues at ``restart_cut`` (0.3) of the lr
  it overshot at, deeper than the cut in place: the restart has undone the damage, so the
  deeper cut does not come after it (see ``GuardConfig.restart_cut``). It is judged afresh
  (:meth:`StepSizeGovernor.on_restart`), and that lr is the most it may climb back to
  (``start_cap``): restarted runs that climbed back ended worse than with the cut alone.
- **not used**: the secant estimate of the best step along the update (-g_t.u_t over
  g_{t+1}.u_t - g_t.u_t) and the per-matrix cosine of g_t with u_{t-1} (the hypergradient).
  Whole-model, early in a run, they separate the lrs (secant about 2 at the best lr, 0.8 at
  10x); per layer group the best lr's last layer reads 0.7-1.0, as low as 10x, and after the
  first records minibatch noise keeps them near 1 / 0 at every lr. The kernel still reports
  them. Over the whole model as one vector the cosine is positive in the first ~20 records at
  the best lr (+2..+40%, filtered) and below 0 at 10x on every constant-lr full-training run of
  the matrix and the held-out set, but GPT-2 LoRA reads below 0 at its best lr from the fifth
  record on: alone it is no evidence (an early brake on it, cutting while it was below 0 and
  omega below 0.5 in the first 40 records, left the held-out 10x runs at 1.155 of the best loss
  on the mean instead of 1.126, seed 0), so it only confirms the loss efficiency.

A cut is rate-limited (``cut_interval`` records apart) and bounded by ``min_scale``. Without
evidence the ceilings rise by ``recovery_rate`` (2%) per record and are dropped once far above
the schedule, so nothing latches. "Without evidence" means omega above ``omega_high`` (0.5),
under the healthy band: a Llama with init 0.002 at its best lr reads 0.55-0.9 all run, and with
the recovery at 0.9 the ceiling the envelope set on its first step held every step of the run
(at 0.5: 38% of the steps, the first records and the climb back).

The climb back is a probe, and the governor remembers where it began. Once the effective lr
has risen more than 10% past that point, either of two answers sends the ceilings back there,
and the climb begins again (as it does after a pause, omega under ``omega_high``):
omega falling below ``release_drop`` (0.5) of the highest it read since, or the loss, filtered
over ``omega_window`` records, rising above where it was by ``release_loss_z`` (1) standard
deviations of one step's loss. Without them the climb undid the cuts, because a too-high lr
shows late and omega reads 0.5-0.8 in a run held at ~3x its best lr:
- a tiny Qwen2 on Markov data at 15x its lr (``test_sustained_high_lr_is_held_down``) was cut
  by the loss efficiency at record 7 to 0.006 (plain AdamW is best there at 0.0036), then
  climbed to 12x by step 120 while omega fell from 1.29 to 0.14 (loss 1.073 of the clean run).
  omega sent it back at record 82 (0.64 against 1.29), and it ended at 3.7x, 0.923 of the clean
  run;
- GPT-NeoX LoRA at 10x under a constant lr (matrix, seed 0), cut at record 6 to 1.8x its best
  lr, climbed from record 165 while omega sat at 0.5-0.6 and its training loss rose from 4.80
  to 5.10; it ended at 1.138 of the best loss. The loss sent it back 45 records into the climb,
  and it ended at 1.047.

The probe's measured cost: omega also falls after an early peak in a healthy run. A Llama with
init 0.002 at its best lr (held out, seed 2), whose first steps the envelope caps, read 1.23 at
record 40, early in its climb, and 0.62 at record 77; the probe sent it back once, and it was
capped on 67% of its steps instead of 38% (loss 2.520 instead of 2.467; AdamW 2.606).

A data change (a loss level shift with normal gradients, or ``notify_data_change``) drops the
ceilings and the evidence: GPT-NeoX at its best lr oscillates on prose (omega 0.04-0.15) and was
cut there; after the switch to code its omega stayed at 0.3-0.7, between the cut and the
recovery levels of the time (0.15, 0.9), and the old ceiling held the rest of the run at 0.35x
(measured with ``omega_low`` 0.15: +4.8% loss; +2.8% with the restart, which then measures the
new data's own omega; +1.2% with ``omega_low`` 0.05).

One bound stays through data changes: after a rollback to the start (the first steps made the
model worse than it began) the scale the run continues from caps the scale for the rest of the
run (``start_cap``; a scale, not an lr, so that a rollback early in a warmup does not hold the
peak at ``min_scale``). The probe cannot see that lr's harm, which shows over a run's first
steps: an rsLoRA run at 10x (held out, seed 1) went back to its start, trained well at 3x,
climbed back from record 165 to 6.4x and diverged in its last 40 steps (1.358 of the best loss;
1.047 with the cap).
"""

from __future__ import annotations

import math

from lbw_kernels import contract as C

from .config import GuardConfig
from .signals import StepSignals, per_group, regrouped


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class StepSizeGovernor:
    """A ceiling on each group's effective lr, from pooled evidence; pure host logic."""

    def __init__(self, config: GuardConfig, num_groups: int):
        self.config = config
        self.log_omega: float | None = None  # filtered, pooled over every written group's matrices
        self.omega_samples = 0
        self.since_cut = 1 << 30
        self.omega_at_cut: float | None = None  # filtered log omega at the last cut of an episode
        self.log_recent: float | None = None  # filtered log omega_recent (whole model)
        self.recent_samples = 0
        self.early_losses: list[list[float]] = []  # [loss, predicted decrease, grad norm] of the last records
        self.cos: float | None = None  # filtered whole-model cos(g_t, d_{t-1})
        self.cos_samples = 0
        self.records = 0  # written records seen
        self.climb_peak: float | None = None  # highest filtered log omega since a climb began
        self.climb_lr: dict[int, float] = {}  # each group's effective lr where it began
        self.climb_loss: float | None = None  # the filtered loss where it began
        self.loss_mean: float | None = None  # the loss filtered over omega_window records
        self.loss_var: float | None = None  # the variance of one record's loss about it
        self.sent_back_for_lr = False  # the run went back to its start for a too-high lr
        self.num_groups = 0
        self.resize(num_groups)

    def resize(self, num_groups: int) -> None:
        self.regroup(range(max(int(num_groups), 1)))

    def regroup(self, sources) -> None:
        """Per-group state for a new group layout: group i keeps old group ``sources[i]``'s
        (None: a new group, without history)."""
        sources = list(sources) or [None]
        self.ceiling = regrouped(getattr(self, "ceiling", []), sources, None)  # max effective lr, or None
        # after a rollback to the start: the highest scale for the rest of the run (see on_rollback)
        self.start_cap = regrouped(getattr(self, "start_cap", []), sources, None)
        self.ratio_per_lr = regrouped(getattr(self, "ratio_per_lr", []), sources, None)
        # sum over past steps of beta1^(2k) |g|^2: the white-noise energy of Adam's m, per group
        self.grad_energy = regrouped(getattr(self, "grad_energy", []), sources, 0.0)
        self.climb_lr = {g: self.climb_lr[s] for g, s in enumerate(sources) if s in self.climb_lr}
        self.num_groups = len(sources)

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
            target, bound = ceiling / lr, "oscillation"
        cap = self.start_cap[g]
        if cap is not None and cap < target:
            target, bound = cap, "start_cap"
        envelope = self.envelope(g, lr) if self.records < c.early_records else math.inf
        if envelope < target:
            # A step outside the envelope is evidence in itself: the ceiling starts from there.
            target, bound = envelope, "update_envelope"
            self.ceiling[g] = max(c.min_scale, envelope) * lr
        return min(1.0, max(c.min_scale, target)), bound

    def envelope(self, g: int, lr: float) -> float:
        """The scale of a step the envelope allows: a step predicted to move the group's matrices
        by more than ``max_update_ratio`` of their norm is cut to half that ratio (the trigger and
        the level apart, so a best lr just under the trigger is not capped at all)."""
        rpl = self.ratio_per_lr[g]
        limit = self.config.max_update_ratio
        if limit is None or rpl is None or not _finite(lr) or lr <= 0 or lr * rpl <= limit:
            return math.inf
        return 0.5 * limit / (lr * rpl)

    # ------------------------------------------------------------------ observing
    def observe(self, sig: StepSignals, issued_scale: list[float], lrs: list[float]) -> list[dict]:
        """Fold one clean record in; returns the cuts it decided (for events)."""
        c = self.config
        if c.governor == "off":
            return []
        self.since_cut += 1
        written = [g for g, gs in enumerate(sig.groups) if gs.written]
        if not written:
            return []
        self.records += 1
        lr_eff = {g: lrs[g] * issued_scale[g] for g in written if _finite(lrs[g]) and lrs[g] > 0}
        for g in written:
            ratio = sig.groups[g].update_ratio
            if g in lr_eff and ratio is not None and ratio > 0:
                self.ratio_per_lr[g] = ratio / lr_eff[g]
        pooled = self._pooled_log_omega(sig, written)
        if pooled is not None:
            self.log_omega = self._filtered(self.log_omega, pooled, self.omega_samples)
            self.omega_samples += 1
        recent = self._log_omega_recent(sig, written)
        if recent is not None:
            self.log_recent = self._filtered(self.log_recent, recent, self.recent_samples)
            self.recent_samples += 1
        self._fold_efficiency(sig, written)
        self._fold_loss(sig.loss)
        if self.since_cut >= c.cut_interval:
            if self._oscillating():
                return self._cut(lr_eff, lrs, "oscillation")
            if self._inefficient():
                return self._cut(lr_eff, lrs, "overshoot")
        if self._healthy():
            self.omega_at_cut = None  # the episode is over
            evidence = self._climb_overshot(lr_eff, written)
            if evidence:
                return self._back_off(lr_eff, lrs, evidence)
            for g in written:
                if self.ceiling[g] is not None:
                    self.ceiling[g] *= 1.0 + c.recovery_rate
                    if _finite(lrs[g]) and self.ceiling[g] >= lrs[g] * 4.0:
                        self.ceiling[g] = None  # far above the schedule: no ceiling any more
        else:
            self._end_climb()  # the climb paused: it begins again from here
        return []

    def _fold_loss(self, loss: float | None) -> None:
        """The loss filtered over ``omega_window`` records, and the variance of one step's loss
        about it (over twice as many), for the climb's probe."""
        if loss is None or not math.isfinite(loss):
            return
        if self.loss_mean is None:
            self.loss_mean = float(loss)
            return
        dev = float(loss) - self.loss_mean
        window = self.config.omega_window
        self.loss_mean += dev / window
        var = dev * dev if self.loss_var is None else self.loss_var
        self.loss_var = var + (dev * dev - var) / (2 * window)

    def _climb_overshot(self, lr_eff: dict, written: list[int]) -> str | None:
        """The climb back is a probe: after the effective lr rose past where the climb began,
        omega falling below ``release_drop`` of the highest it read since, or the filtered loss
        rising above where it was by ``release_loss_z`` standard deviations of one step's loss,
        says it went too far. Returns which of them did (None: neither)."""
        c = self.config
        climbing = [g for g in written if self.ceiling[g] is not None and g in lr_eff]
        if (c.release_drop is None and c.release_loss_z is None) or self.log_omega is None or not climbing:
            self._end_climb()
            return None
        if self.climb_peak is None:  # the climb begins (at the ceiling: this record may predate it)
            self.climb_peak = self.log_omega
            self.climb_loss = self.loss_mean
            self.climb_lr = {g: min(lr_eff[g], self.ceiling[g]) for g in climbing}
            return None
        if self.log_omega >= self.climb_peak:
            self.climb_peak = self.log_omega
        if self.since_cut < c.cut_interval:
            return None
        omega_fell = c.release_drop is not None and self.log_omega < self.climb_peak + math.log(c.release_drop)
        loss_rose = (c.release_loss_z is not None and self.climb_loss is not None and self.loss_var is not None
                     and self.loss_mean > self.climb_loss + c.release_loss_z * math.sqrt(self.loss_var))
        # 10% above where it began: the probe judges the climb, not a schedule's small moves
        rose = any(lr_eff[g] > 1.1 * self.climb_lr.get(g, math.inf) for g in climbing)
        if not (rose and (omega_fell or loss_rose)):
            return None
        return "omega" if omega_fell else "loss"

    def _end_climb(self) -> None:
        """No climb under way: the next healthy record with a ceiling begins one."""
        self.climb_peak, self.climb_lr, self.climb_loss = None, {}, None

    def _back_off(self, lr_eff: dict, lrs: list[float], evidence: str) -> list[dict]:
        """Ceilings back to the effective lr where the climb began; the probe starts again."""
        self.since_cut = 0
        decisions = []
        for g, eff in lr_eff.items():
            back = self.climb_lr.get(g)
            if back is None or not eff > back:
                continue
            before = self.ceiling[g]
            self.ceiling[g] = self._floored(lrs[g], back)
            decisions.append({"group": g, "from_lr": eff, "to_lr": self.ceiling[g], "why": "release_overshoot",
                              "evidence": evidence, "omega": math.exp(self.log_omega),
                              "omega_peak": math.exp(self.climb_peak), "loss_mean": self.loss_mean,
                              "loss_at_start": self.climb_loss, "ceiling_before": before})
        self._end_climb()
        return decisions

    def _filtered(self, value: float | None, sample: float, samples: int) -> float:
        """EMA over ``omega_window`` records (a plain mean while fewer have been seen)."""
        w = max(1.0 / (samples + 1), 1.0 / self.config.omega_window)
        return sample if value is None else value + w * (sample - value)

    def _log_omega_recent(self, sig: StepSignals, written: list[int]) -> float | None:
        """ln of omega against the recent gradients, over the whole model:
        ``sum |m_{t-1}|^2 / (1-b1)^2`` over ``sum_k b1^(2k) |g_{t-1-k}|^2``, 1 in expectation when
        successive gradients are uncorrelated whatever their size, below 1 when they cancel.
        Also folds this record's gradients into each written group's energy."""
        num = den = 0.0
        for g in written:
            b1 = sig.beta1[g] if g < len(sig.beta1) else math.nan
            energy = self.grad_energy[g]
            fields = sig.groups[g].fields
            m_sq, g_sq = fields[C.T_MOMENT1_SQ], fields[C.T_GRAD_SQ]
            if not (_finite(b1) and 0.0 <= b1 < 1.0 and math.isfinite(m_sq) and math.isfinite(g_sq)):
                self.grad_energy[g] = 0.0  # unknown beta1 or a bad record: start the memory again
                continue
            if energy > 0:
                num += m_sq / (1.0 - b1) ** 2
                den += energy
            self.grad_energy[g] = b1 * b1 * energy + g_sq
        if not (num > 0 and den > 0):
            return None
        return min(C.OMEGA_LOG_CLAMP, max(-C.OMEGA_LOG_CLAMP, math.log(num / den)))

    @staticmethod
    def _pooled_log_omega(sig: StepSignals, written: list[int]) -> float | None:
        """Mean over every written group's matrices of ln(omega) (each matrix counted once)."""
        total = sum(sig.groups[g].fields[C.G_OMEGA_LOG_SUM] for g in written)
        count = sum(sig.groups[g].fields[C.G_OMEGA_COUNT] for g in written)
        if not count > 0 or not math.isfinite(total):
            return None
        return min(C.OMEGA_LOG_CLAMP, max(-C.OMEGA_LOG_CLAMP, total / count))

    def _fold_efficiency(self, sig: StepSignals, written: list[int]) -> None:
        """In the first ``efficiency_records`` only (no work otherwise): keep the loss and the
        first-order predicted decrease ``-g.u`` of every record since the start (or the last
        cut), and filter the whole-model cosine; afterwards the list is empty, so the loss
        efficiency cannot cut."""
        c = self.config
        if self.records > c.efficiency_records:
            self.early_losses = []
            return
        cos = self._whole_model_cos(sig, written)
        if cos is not None:
            self.cos = self._filtered(self.cos, cos, self.cos_samples)
            self.cos_samples += 1
        if sig.loss is None or not (math.isfinite(sig.loss) and math.isfinite(sig.grad_dot_update)):
            self.early_losses = []  # a gap: the loss difference would span an unmeasured step
            return
        grad_norm = sig.usable_grad_norm
        grad_norm = math.nan if grad_norm is None else grad_norm  # (unusable: never a rise)
        self.early_losses.append([float(sig.loss), -float(sig.grad_dot_update), grad_norm])

    @staticmethod
    def _whole_model_cos(sig: StepSignals, written: list[int]) -> float | None:
        """cos(g_t, d_{t-1}) with every written group's tensors taken as one vector."""
        dot = sum(sig.groups[g].fields[C.T_GRAD_DOT_PREV] for g in written)
        g_sq = sum(sig.groups[g].fields[C.T_GRAD_SQ] for g in written)
        d_sq = sum(sig.groups[g].fields[C.T_PREV_SQ] for g in written)
        norms = math.sqrt(g_sq) * math.sqrt(d_sq) if g_sq > 0 and d_sq > 0 else 0.0  # no underflow
        if not (norms > 0 and math.isfinite(dot) and math.isfinite(norms)):
            return None
        return max(-1.0, min(1.0, dot / norms))

    def _inefficient(self) -> bool:
        """Evidence at the start of a run: since the start (or the last cut), over at least
        ``efficiency_window`` steps, the loss fell by less than ``efficiency_low`` of what the
        steps predicted to first order (and they predicted enough to be judged against the
        minibatch noise), while the gradient turned against the previous step's direction (the
        filtered whole-model cosine is below 0). A loss plateau also stops following the
        prediction, but its gradients keep agreeing; a loss that never moves is no evidence."""
        c = self.config
        window = self.early_losses
        if len(window) < c.efficiency_window + 1:  # also empty after the first records
            return False
        if self.cos_samples < c.min_evidence or not self.cos < 0.0:
            return False
        if len({loss for loss, _, _ in window}) == 1:
            return False  # a loss that never moves (a constant passed to step) says nothing about the steps
        predicted = sum(p for _, p, _ in window[:-1])
        start = abs(window[0][0])
        if not predicted > c.efficiency_min_drop * start:
            return False
        if c.efficiency_large_drop is not None and predicted < c.efficiency_large_drop * start \
                and not self.sent_back_for_lr and not self._steps_keep_predicting(window):
            return False
        return (window[0][0] - window[-1][0]) < c.efficiency_low * predicted

    def _steps_keep_predicting(self, window: list[list[float]]) -> bool:
        """What a predicted decrease below ``efficiency_large_drop`` of the loss also needs: a
        record's grad norm at ``efficiency_grad_rise`` x the window's first, or the window's last
        three steps predicting at least as much as its first three. A healthy start's predictions
        die out as its gradients fall; a step too large for the loss keeps predicting (and under
        a warmup predicts more) while the loss does not follow. Not asked once the run went back
        to its start for its lr (a rise from the start, or the overshoot's restart): the lr is
        shown too high, and a restart's first steps (zero moments, each element moved by the lr)
        die out at any lr."""
        first = window[0][2]
        if any(g >= self.config.efficiency_grad_rise * first for _, _, g in window[1:]):
            return True
        predicted = [p for _, p, _ in window[:-1]]
        return sum(predicted[-3:]) >= sum(predicted[:3])

    def _oscillating(self) -> bool:
        """Evidence: omega low over the window, and (after a cut) lower than at the last cut:
        omega keeps the second moment's memory, so a cut that worked leaves it low for a while."""
        c = self.config
        if self.omega_samples < c.min_evidence or self.log_omega >= math.log(c.omega_low):
            return False
        if c.omega_recent_max is not None and (self.recent_samples < c.min_evidence
                                               or self.log_recent >= math.log(c.omega_recent_max)):
            return False  # v remembers larger gradients, or too little of the energy alternates
        return self.omega_at_cut is None or self.log_omega < self.omega_at_cut + math.log(c.omega_worsening)

    def _healthy(self) -> bool:
        """Recovery needs omega healthy; a ceiling the envelope set in the first records of a run
        holds until then (omega means little before the moments have a history)."""
        c = self.config
        if self.records < c.early_records:
            return False
        return self.log_omega is None or self.log_omega > math.log(c.omega_high)

    def _cut(self, lr_eff: dict, lrs: list[float], why: str) -> list[dict]:
        """Every written group's ceiling to cut_factor x its current effective lr: one decision
        for the whole model keeps the user's per-group lr ratios (LoRA+)."""
        c = self.config
        self.since_cut = 0
        self.omega_at_cut = self.log_omega
        self.early_losses = []  # the loss efficiency judges steps taken at the new ceiling only
        self._end_climb()
        decisions = []
        for g, eff in lr_eff.items():
            floor = c.min_scale * lrs[g]
            if eff <= floor * (1.0 + 1e-9):
                continue
            before = self.ceiling[g]
            self.ceiling[g] = self._floored(lrs[g], eff * c.cut_factor)
            decisions.append({"group": g, "from_lr": eff, "to_lr": self.ceiling[g], "why": why,
                              "omega": None if self.log_omega is None else math.exp(self.log_omega),
                              "cos": self.cos, "ceiling_before": before})
        return decisions

    def on_rollback(self, lrs: list[float], scales: list[float], to_start: bool = False, cut: bool = True) -> None:
        """The run diverged at the current effective lr: continue from a lower one (``cut``
        False: the rollback undid a fault, and only the evidence restarts). After a
        rollback to the start (the first steps made the model worse than it began) the scale of
        that lower lr is also the most the scale may return to (``start_cap``): the probe cannot
        see an lr that damages a run only over its first steps, so without the cap the climb
        went back there and the run diverged late (held-out rsLoRA at 10x)."""
        c = self.config
        self.sent_back_for_lr = self.sent_back_for_lr or (to_start and cut)
        for g in range(self.num_groups if cut else 0):
            if g < len(lrs) and _finite(lrs[g]) and lrs[g] > 0:
                lr_eff = lrs[g] * (scales[g] if g < len(scales) else 1.0)
                self.ceiling[g] = self._floored(lrs[g], lr_eff * c.rollback_scale)
                if to_start and c.start_cap:  # a fraction of the schedule's lr, as the scale is
                    self._cap_at_start(g, self.ceiling[g] / lrs[g])
        self.since_cut = 0
        self.early_losses = []
        self._end_climb()
        self.loss_mean = self.loss_var = None
        self._forget_recent(energy=True)  # the moments are the snapshot's now

    def on_restart(self, lrs: list[float], cuts: list[dict]) -> None:
        """The run went back to its start after the overshoot ``cuts``: each cut group continues
        at ``restart_cut`` of the effective lr it overshot at (the cut's ``to_lr`` is rewritten
        to say so). The evidence was about the abandoned steps, and the restarted run is judged
        afresh (envelope, loss efficiency). As after any return to the start, the scale it
        continues from is the most it may climb back to (``start_cap``)."""
        for cut in cuts:  # (every cut group has a finite lr > 0: observe cuts no other)
            g = cut["group"]
            restart_lr = self._floored(lrs[g], cut["from_lr"] * self.config.restart_cut)
            self.ceiling[g] = min(self.ceiling[g], restart_lr)
            cut["to_lr"] = self.ceiling[g]
        self.records = 0
        self.sent_back_for_lr = True
        self._forget_evidence(energy=True)  # the moments are the start's
        for g in range(self.num_groups if self.config.start_cap else 0):
            if g < len(lrs) and _finite(lrs[g]) and lrs[g] > 0 and self.ceiling[g] is not None:
                self._cap_at_start(g, self.ceiling[g] / lrs[g])

    def _floored(self, lr: float, ceiling: float) -> float:
        """A ceiling never below ``min_scale`` x the schedule's lr."""
        return max(self.config.min_scale * lr, ceiling)

    def _cap_at_start(self, g: int, scale: float) -> None:
        self.start_cap[g] = scale if self.start_cap[g] is None else min(self.start_cap[g], scale)

    def on_data_change(self) -> None:
        """The data changed (a loss level shift with normal gradients, or the user said so): the
        oscillation evidence was about the old data, so the ceilings and the evidence restart."""
        self.ceiling = [None] * self.num_groups  # (start_cap stays: it is about the lr, not the data)
        self._forget_evidence(energy=False)  # m still holds the gradients the energy counts

    def _forget_evidence(self, energy: bool) -> None:
        """omega, the cosine, the loss efficiency's window, the climb and the loss level restart."""
        self.log_omega = None
        self.omega_samples = 0
        self.omega_at_cut = None
        self.early_losses = []
        self.cos = None
        self.cos_samples = 0
        self._end_climb()
        self.loss_mean = self.loss_var = None
        self._forget_recent(energy=energy)

    def on_loss_rescale(self) -> None:
        """The loss was rescaled (a weight on it; the gradients moved by the same factor): the
        ceilings and the oscillation evidence are scale-free and stay, the loss comparisons
        (the loss efficiency, the probe's filtered loss) restart."""
        self.early_losses = []
        self.loss_mean = self.loss_var = None
        self.climb_loss = None  # the climb under way goes on with omega as its only evidence

    def _forget_recent(self, energy: bool) -> None:
        if energy:
            self.grad_energy = [0.0] * self.num_groups
        self.log_recent = None
        self.recent_samples = 0

    # ------------------------------------------------------------------ state
    _SCALARS = ("log_omega", "omega_samples", "since_cut", "omega_at_cut", "records", "log_recent", "recent_samples",
                "cos", "cos_samples", "climb_peak", "climb_loss", "loss_mean", "loss_var", "sent_back_for_lr")

    def state_dict(self) -> dict:
        return {"num_groups": self.num_groups, "ceiling": list(self.ceiling), "start_cap": list(self.start_cap),
                "ratio_per_lr": list(self.ratio_per_lr),
                "grad_energy": list(self.grad_energy), "early_losses": [list(x) for x in self.early_losses],
                "climb_lr": [[g, lr] for g, lr in sorted(self.climb_lr.items())],
                **{k: getattr(self, k) for k in self._SCALARS}}

    def load_state_dict(self, state: dict) -> None:
        self.resize(int(state["num_groups"]))
        self.ceiling = [None if v is None else float(v) for v in per_group("ceiling", state["ceiling"], self.num_groups)]
        self.ratio_per_lr = [None if v is None else float(v)
                             for v in per_group("ratio_per_lr", state["ratio_per_lr"], self.num_groups)]
        for k in ("log_omega", "omega_at_cut"):
            setattr(self, k, None if state[k] is None else float(state[k]))
        for k in ("omega_samples", "since_cut", "records"):
            setattr(self, k, int(state[k]))
        # omega_recent came later: a state saved without it starts its memory afresh
        self._forget_recent(energy=True)
        if "grad_energy" in state:
            self.grad_energy = [float(v) for v in per_group("grad_energy", state["grad_energy"], self.num_groups)]
            self.log_recent = None if state["log_recent"] is None else float(state["log_recent"])
            self.recent_samples = int(state["recent_samples"])
        # the loss efficiency came later still: a state without it starts its window afresh
        # (a record saved before the grad norm was kept has none: NaN, never a rise)
        self.early_losses = [[float(x[0]), float(x[1]), float(x[2]) if len(x) > 2 else math.nan]
                             for x in state.get("early_losses", [])]
        self.cos = None if state.get("cos") is None else float(state["cos"])
        self.cos_samples = int(state.get("cos_samples", 0))
        # and the climb's probe later again: without it the probe starts at the next healthy record
        for k in ("climb_peak", "climb_loss", "loss_mean", "loss_var"):
            setattr(self, k, None if state.get(k) is None else float(state[k]))
        self.climb_lr = {int(g): float(lr) for g, lr in state.get("climb_lr", [])
                         if 0 <= int(g) < self.num_groups}
        self.sent_back_for_lr = bool(state.get("sent_back_for_lr", False))  # (saved later: False)
        # the start's cap came last: a state saved without it has none
        self.start_cap = [None if v is None else float(v)
                          for v in per_group("start_cap", state.get("start_cap", [None] * self.num_groups),
                                             self.num_groups)]
