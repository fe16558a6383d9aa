"""Recovery: what to do about a fault. Skip, rebaseline, freeze, roll back, or give up.

The policy answers faults, not level changes, and never harms a healthy run:

- an isolated spike is skipped (on the device: the per-element bound and the loss check) and
  nothing else happens: no lr cut;
- a loss that jumps while the gradients stay normal, for ``level_shift_records`` records in a
  row, is new data: the loss statistics restart at the new level (``notify_data_change`` does
  it at once). Gradients that jump while the given loss stays normal, as long, are a new scale
  (Adam's steps do not depend on it): the gradient statistics restart. Both jumping by one
  factor (``rescale_tolerance``) is a weight on the loss: both restart;
- a group whose gradients alone are non-finite or spiking in two records in a row is frozen
  (gated off) for ``freeze_steps``, within ``max_frozen_fraction`` of the parameters (the
  group sizes as two records in a row report them);
- divergence rolls back when it is corroborated: non-finite parameters, or a loss spike right
  after a gradient spike was applied (the step did the damage); or when trouble persists for
  ``min(8, give_up_after)`` records in a row. The target is the newest *verified* snapshot
  (taken, then confirmed by two clean records), within distance and budget, or before one
  exists the state the run began from while it is held;
- divergence from the start rolls back to the start: before the detectors have statistics,
  the run's first loss is the reference, and two of three records above it by ``start_rise``
  in the first ``start_rise_records`` say the first steps made the model worse than it began (a
  too-high lr in a fine-tune does it within 2-4 steps, and Adam's second moment then keeps
  those gradients for the rest of the run). The state the run began from is held until then;
- the governor's first overshoot at a run's start (the loss efficiency) also goes back to the
  start, once, while it is held and if the cut lowered most parameters' lr: ``restart_cut``
  of the lr it overshot at then applies from the first step (``GuardConfig.overshoot_restart``);
- a gradient spike that the per-element bound could not hold (none in a tensor's first two
  steps, a loose one through ``spike_warmup`` records) rolls back to the start too (seen one
  record later, against the neighbouring records' grad norms), without an lr cut: the fault
  was the data's;
- an lr spike (a group's commanded lr more than ``lr_spike_factor`` above the highest lr
  commanded to it so far) skips the group's step before it is taken; ``level_shift_records``
  of them in a row are the user's new lr, which then runs (a deliberate bump);
- trouble that persists with no rollback left ends in :class:`GuardGaveUp` (or the user's
  hook) with the evidence, never in skipping forever.
"""

from __future__ import annotations

import math
from collections import deque

from .config import GuardConfig
from .detectors import Assessment
from .signals import StepSignals, per_group, regrouped

# Consecutive records in trouble after which a rollback is tried even without corroboration.
_PERSISTENT_TROUBLE = 8


class GuardGaveUp(RuntimeError):
    """The guard cannot keep the run inside its envelope: trouble persisted with no rollback
    left. ``evidence`` holds what it saw (steps, reasons, the last signals, counters)."""

    def __init__(self, message: str, evidence: dict):
        super().__init__(message)
        self.evidence = evidence

    def __reduce__(self):
        # pickled with its evidence: it crosses process boundaries (multiprocessing pools,
        # torch.multiprocessing spawn), where the default reduce would call __init__(message)
        return type(self), (str(self), self.evidence)


class Recovery:
    """Skip, rebaseline, freeze, rollback and escalation for ``num_groups`` groups."""

    def __init__(self, config: GuardConfig, num_groups: int):
        self.config = config
        self.consecutive_trouble = 0
        self.loss_only_streak = 0
        self.grad_only_streak = 0
        self.rescale_streak = 0
        self.grad_spike_applied_at: int | None = None  # step of the last applied gradient spike
        self.rollback_steps: deque[int] = deque()
        self.pending_snapshots: list[int] = []  # taken, not yet confirmed by two clean records
        self.verified_snapshots: list[int] = []
        self.recent_reasons: deque[tuple[int, list[str]]] = deque(maxlen=8)
        self.start_held = False  # the guard holds the state the run began from
        self.start_loss: float | None = None  # the loss of that state (the first record's)
        self.start_grad_norm: float | None = None  # and its grad norm
        self.start_records = 0  # records judged against it since the start (or a rollback to it)
        self.start_above: list[int] = []  # of the last 3 records, which were above it by start_rise
        self.start_grads: list[list] = []  # of the last 3 records since the start: [grad norm or None, written]
        self.returned_to_start = False  # the run has gone back to its start (for any reason)
        self.num_groups = 0
        self.resize(num_groups)

    def resize(self, num_groups: int) -> None:
        self.regroup(range(max(int(num_groups), 1)))

    def regroup(self, sources) -> None:
        """Per-group state for a new group layout: group i keeps old group ``sources[i]``'s
        (None: a new group, without history)."""
        sources = list(sources) or [None]
        self.freeze_until = regrouped(getattr(self, "freeze_until", []), sources, 0)
        self.hot_streak = regrouped(getattr(self, "hot_streak", []), sources, 0)
        self.numel = regrouped(getattr(self, "numel", []), sources, 0.0)
        self.numel_reported = regrouped(getattr(self, "numel_reported", []), sources, 0.0)
        self.lr_peak = regrouped(getattr(self, "lr_peak", []), sources, None)
        self.lr_spike_streak = regrouped(getattr(self, "lr_spike_streak", []), sources, 0)
        self.num_groups = len(sources)

    # ------------------------------------------------------------------ gates
    def gate(self, g: int, step: int) -> float:
        return 0.0 if step <= self.freeze_until[g] else 1.0

    def frozen_fraction(self, step: int) -> float:
        total = sum(n for n in self.numel if n > 0)
        if total <= 0:
            return 0.0
        return sum(n for g, n in enumerate(self.numel) if n > 0 and step <= self.freeze_until[g]) / total

    def lr_gate(self, g: int, step: int, lr: float) -> tuple[float, dict | None]:
        """Group ``g``'s gate for optimizer step ``step`` at commanded ``lr``, and the event it
        raised (or None).

        Decided before the step, on the host: an lr spike must not reach the parameters, and
        the lr is known before the step (an lr tensor on a device reads NaN here: not judged).
        The first ``spike_warmup`` steps only set the peak: a warm-up from a small factor rises
        fastest on its second step (torch's ``LinearLR`` from 0.01 over 8 steps: 13x).
        """
        factor = self.config.lr_spike_factor
        if factor is None or not (math.isfinite(lr) and lr > 0):
            return 1.0, None
        peak = self.lr_peak[g]
        if peak is not None and step > self.config.spike_warmup and lr > factor * peak:
            self.lr_spike_streak[g] += 1
            if self.lr_spike_streak[g] <= self.config.level_shift_records:
                return 0.0, {"action": "skip", "why": "lr_spike", "group": g, "lr": lr, "peak_lr": peak,
                             "bound": "lr_spike_factor"}
            event = {"action": "rebaseline", "why": "lr_level_shift", "group": g, "lr": lr, "peak_lr": peak,
                     "records": self.lr_spike_streak[g] - 1}
        else:
            event = None
        self.lr_spike_streak[g] = 0
        self.lr_peak[g] = lr if peak is None else max(peak, lr)
        return 1.0, event

    # ------------------------------------------------------------------ snapshots
    def snapshot_taken(self, step: int) -> None:
        self.pending_snapshots.append(step)

    def _confirm_snapshots(self, step: int, trouble: bool) -> list[dict]:
        """A snapshot of the state after step s is verified by clean records s and s + 1 (the
        latter's loss and parameter norm are those of that very state)."""
        out = []
        for s in list(self.pending_snapshots):
            if trouble and s in (step, step - 1):
                self.pending_snapshots.remove(s)
                out.append({"action": "snapshot_discarded", "step": s})
            elif step >= s + 1 and not trouble:
                self.pending_snapshots.remove(s)
                self.verified_snapshots.append(s)
                del self.verified_snapshots[: -self.config.snapshot_ring]
        return out

    # ------------------------------------------------------------------ deciding
    def observe(self, sig: StepSignals, a: Assessment, now: int, issued_gate: list[float]) -> dict:
        """Fold one assessed record in; returns the decision as a dict of actions."""
        c = self.config
        step = sig.step
        decision: dict = {"events": [], "rollback_to": None, "rollback_cuts_lr": True, "give_up": None,
                          "rebaseline_loss": False, "rebaseline_grad": False, "rebaseline_scale": False,
                          "release_start": False}
        self._fold_sizes(sig)
        self._release_frozen(now, decision)
        trouble = a.trouble
        decision["events"].extend(self._confirm_snapshots(step, trouble))
        written = any(gs.written for gs in sig.groups)
        if self._diverged_from_start(sig, decision) and self._rollback_to_start(now, decision):
            return decision
        # the fault was the data's, not the lr's: no cut
        if self._unbounded_spike(sig, written) and self._rollback_to_start(now, decision, "unbounded_spike",
                                                                            cuts_lr=False):
            return decision
        if a.grad_spike and written:
            self.grad_spike_applied_at = step
        if not trouble:
            self.consecutive_trouble = 0
            self.restart_streaks()
            self._cool_hot()
            return decision

        self.consecutive_trouble += 1
        self.recent_reasons.append((step, a.reasons))
        loss_only = a.loss_spike and not (a.grad_spike or a.nonfinite or a.params_bad)
        self.loss_only_streak = self.loss_only_streak + 1 if loss_only else 0
        # the loss must be given and normal: without it a growing gradient is all the evidence
        grad_only = a.grad_spike and sig.loss is not None and not (a.loss_spike or a.nonfinite or a.params_bad)
        self.grad_only_streak = self.grad_only_streak + 1 if grad_only else 0
        rescaled = a.rescaled and not (a.nonfinite or a.params_bad)
        self.rescale_streak = self.rescale_streak + 1 if rescaled else 0
        decision["events"].append({"action": "skip", "why": ",".join(a.reasons), "device_skipped": a.device_skip,
                                   "applied": a.device_skip or a.nonfinite or a.grad_spike})

        # The loss of record t is measured before step t: damage done by an applied spike shows
        # in the next record's loss.
        damage = a.loss_spike and self.grad_spike_applied_at is not None and step - self.grad_spike_applied_at == 1
        persistent = self.consecutive_trouble >= min(_PERSISTENT_TROUBLE, c.give_up_after)
        if a.params_bad or damage or persistent:
            why = "params_nonfinite" if a.params_bad else ("spike_damage" if damage else "persistent_trouble")
            if self._rollback(step, now, why, decision):
                return decision
        if a.params_bad or self.consecutive_trouble >= c.give_up_after:
            why = "params_nonfinite" if a.params_bad else "persistent_trouble"
            decision["give_up"] = self._evidence(sig, a, why)
            return decision
        # at most one of them is not 0
        streaks = {"loss": self.loss_only_streak, "grad": self.grad_only_streak, "scale": self.rescale_streak}
        level = next((k for k, n in streaks.items() if n >= c.level_shift_records), None)
        if level is not None:
            decision[f"rebaseline_{level}"] = True
            decision["events"].append({"action": "rebaseline", "why": f"{level}_level_shift",
                                       "records": streaks[level]})
            if level in ("loss", "scale") and self.start_held:  # the start's loss is of the old data or scale
                self._release_start(decision)
            self.restart_streaks()
            self.consecutive_trouble = 0
        self._freeze(a, now, issued_gate, decision)
        return decision

    def restart_streaks(self) -> None:
        """Forget the records counted towards a level shift (the statistics restarted)."""
        self.loss_only_streak = self.grad_only_streak = self.rescale_streak = 0

    # ------------------------------------------------------------------ the start
    def start_taken(self) -> None:
        """The guard holds the state the run began from (before its first step)."""
        self.start_held = True
        self.start_records, self.start_above = 0, []

    def _diverged_from_start(self, sig: StepSignals, decision: dict) -> bool:
        """Two of the last three records with a loss above the first record's by ``start_rise``
        (of its size), within ``start_rise_records`` of the start; past ``early_records`` the
        start is let go."""
        c = self.config
        if not self.start_held:
            return False
        self.start_records += 1
        if self.start_records > c.early_records or c.start_rise is None:
            self._release_start(decision)
            return False
        if self.start_records == 1 and not sig.params_finite:
            self._release_start(decision)  # the run began from non-finite parameters: no state to go back to
            return False
        loss = sig.loss
        if loss is None or not math.isfinite(loss):
            return False  # a non-finite loss is a fault, answered as one
        norm = sig.usable_grad_norm
        if self.start_loss is None:
            self.start_loss, self.start_grad_norm = float(loss), norm
            return False
        if self.start_records > c.start_rise_records:
            return False  # the start stays held for the other rules; noise alone clears the bar later
        above = loss - self.start_loss > c.start_rise * abs(self.start_loss) and self._grads_rose_from_start(norm)
        self.start_above = (self.start_above + [int(above)])[-3:]
        return sum(self.start_above) >= 2

    def _grads_rose_from_start(self, norm: float | None) -> bool:
        """The loss's rise is corroborated by the gradients: their norm is ``start_rise_grad``
        times the first record's (without a first grad norm, the loss alone judges)."""
        factor = self.config.start_rise_grad
        if factor is None or self.start_grad_norm is None:
            return True
        return norm is not None and norm > factor * self.start_grad_norm

    def _unbounded_spike(self, sig: StepSignals, written: bool) -> bool:
        """Was a gradient spike written where the per-element bound could not hold it? A
        tensor's first two steps have no bound (``lbw_kernels.contract``), and through the
        first ``spike_warmup`` records the loose one (``spike_k_warmup``) lets a share of the
        elements through: ~10% of a x1e4 spike's, ~70% of a x1e3's. Whatever enters v keeps
        Adam's steps on those elements too small for thousands of steps. Measured:
        - a x1e4 spike at step 1 of a small MLP: eval loss 1.8, where the clean run ends at
          1e-4, as under plain AdamW;
        - the same spike at step 7 of the held-out Phi-3, through the loose bound: +29%.

        Seen one record later: a grad norm ``warmup_grad_factor`` times those of its neighbours
        (the one before and the one after; for the first record, the one after). An lr too high
        grows the gradients too, but they stay grown, and divergence from the start answers it.
        Measured on the first 6 records of the 30 held-out scenarios, plain AdamW, against both
        neighbours: at most 6x at 1x-10x their best lr, and at most 14x at 30x-100x."""
        n = self.start_records  # this record's place since the start (_diverged_from_start counts it)
        if not self.start_held:
            return False
        norm = sig.usable_grad_norm
        self.start_grads = ((self.start_grads if n > 1 else []) + [[norm, bool(written)]])[-3:]
        judged = n - 1  # the record judged now: its successor has arrived
        if judged < 1 or judged > max(2, self.config.spike_warmup) or len(self.start_grads) != min(n, 3):
            return False
        spike, spike_written = self.start_grads[-2]
        around = [x for x, _ in self.start_grads[:-2] + self.start_grads[-1:]]
        if spike is None or not spike_written or None in around:
            return False
        return spike > self.config.warmup_grad_factor * max(around)

    def _release_start(self, decision: dict) -> None:
        self.start_held = False
        decision["release_start"] = True

    def _rollback_to_start(self, now: int, decision: dict, why: str = "diverged_from_start",
                           cuts_lr: bool = True) -> bool:
        c = self.config
        self._expire_rollbacks(now)
        if len(self.rollback_steps) >= c.max_rollbacks:
            decision["events"].append({"action": "rollback_refused", "why": why,
                                       "bound": "max_rollbacks", "now": now})
            self._release_start(decision)
            return False
        self._roll_back_to(0, now, decision, why)
        decision["rollback_cuts_lr"] = cuts_lr
        decision["events"][-1]["loss_at_start"] = self.start_loss
        self.start_records, self.start_above = 0, []  # the restarted run is judged afresh
        return True

    def restart_from_start(self, now: int, decision: dict, why: str) -> bool:
        """Go back to the start for the governor (the lr was too high from the first steps), if
        it is still held and the budget allows; the governor's cut is the lr change."""
        if not self.start_held or self.returned_to_start:
            return False
        return self._rollback_to_start(now, decision, why, cuts_lr=False)

    def rollback_failed(self) -> None:
        """The last rollback could not be restored: take it back from the budget, and forget
        every snapshot (they are of a state the optimizer can no longer take)."""
        if self.rollback_steps:
            self.rollback_steps.pop()
        self.snapshots_lost()

    def snapshots_lost(self) -> None:
        """No snapshot, nor the start, can be restored any more: none is a target."""
        self.verified_snapshots, self.pending_snapshots = [], []
        self.start_held = False

    def _expire_rollbacks(self, now: int) -> None:
        while self.rollback_steps and self.rollback_steps[0] <= now - self.config.rollback_window:
            self.rollback_steps.popleft()

    def _rollback(self, step: int, now: int, why: str, decision: dict) -> bool:
        c = self.config
        self._expire_rollbacks(now)
        candidates = [s for s in self.verified_snapshots if now - s <= c.max_rollback_distance]
        bound = None
        if not c.snapshots:
            bound = "snapshots_off"
        elif len(self.rollback_steps) >= c.max_rollbacks:
            bound = "max_rollbacks"
        elif not candidates:
            bound = "no_verified_snapshot" if not self.verified_snapshots else "max_rollback_distance"
        if bound in ("no_verified_snapshot", "max_rollback_distance") and self.start_held:
            # early in the run, before a snapshot is verified: the state the run began from
            self._roll_back_to(0, now, decision, why)
            self.start_records, self.start_above = 0, []
            return True
        if bound is not None:
            decision["events"].append({"action": "rollback_refused", "why": why, "bound": bound, "now": now})
            return False
        self._roll_back_to(max(candidates), now, decision, why)
        return True

    def _roll_back_to(self, target: int, now: int, decision: dict, why: str = "diverged_from_start") -> None:
        """Decide the rollback to snapshot ``target`` (0: the start) and forget the abandoned
        trajectory: its snapshots (those after the target) and its trouble."""
        decision["rollback_to"] = target
        self.returned_to_start = self.returned_to_start or target == 0
        decision["events"].append({"action": "rollback", "why": why, "to_step": target, "now": now,
                                   "distance": now - target})
        self.rollback_steps.append(now)
        self.verified_snapshots = [s for s in self.verified_snapshots if s <= target]
        self.pending_snapshots = []
        self.consecutive_trouble = 0
        self.restart_streaks()
        self.grad_spike_applied_at = None

    def _evidence(self, sig: StepSignals, a: Assessment, why: str) -> dict:
        return {"step": sig.step, "why": why, "reasons": a.reasons,
                "consecutive_trouble": self.consecutive_trouble,
                "rollbacks_in_window": len(self.rollback_steps),
                "verified_snapshots": list(self.verified_snapshots),
                "recent": list(self.recent_reasons), "signals": sig.summary()}

    def _fold_sizes(self, sig: StepSignals) -> None:
        """A group's size, for the frozen-fraction bound, once two records in a row report it:
        one record's garbled telemetry cannot move the bound (a size inflated by it let a group
        of half the parameters be frozen under ``max_frozen_fraction`` 0.25)."""
        for g, gs in enumerate(sig.groups):
            if not (gs.numel > 0 and math.isfinite(gs.numel)):
                continue  # a group with nothing written reports no size
            if gs.numel == self.numel_reported[g]:
                self.numel[g] = gs.numel
            self.numel_reported[g] = gs.numel

    def _cool_hot(self) -> None:
        for g in range(self.num_groups):
            self.hot_streak[g] = 0

    def _freeze(self, a: Assessment, now: int, issued_gate: list[float], decision: dict) -> None:
        c = self.config
        for g in range(self.num_groups):
            self.hot_streak[g] = self.hot_streak[g] + 1 if g in a.hot_groups else 0
        hot = [g for g in a.hot_groups if self.hot_streak[g] >= 2 and issued_gate[g] > 0]
        if not hot or c.freeze_steps == 0:
            return
        total = sum(n for n in self.numel if n > 0)
        if total <= 0:
            return
        frozen = self.frozen_fraction(now + 1) * total
        chosen, refused = [], []
        for g in hot:
            size = max(self.numel[g], 0.0)
            if frozen + size <= c.max_frozen_fraction * total:
                frozen += size
                chosen.append(g)
            else:
                refused.append(g)
        for g in chosen:
            self.freeze_until[g] = now + c.freeze_steps
            self.hot_streak[g] = 0
        if chosen:
            decision["events"].append({"action": "freeze", "groups": chosen, "until": now + c.freeze_steps})
        if refused:
            decision["events"].append({"action": "freeze_refused", "groups": refused, "bound": "max_frozen_fraction"})

    def _release_frozen(self, now: int, decision: dict) -> None:
        for g in range(self.num_groups):
            if self.freeze_until[g] and now >= self.freeze_until[g]:
                decision["events"].append({"action": "unfreeze", "groups": [g]})
                self.freeze_until[g] = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "num_groups": self.num_groups,
            "consecutive_trouble": self.consecutive_trouble,
            "loss_only_streak": self.loss_only_streak,
            "grad_only_streak": self.grad_only_streak,
            "rescale_streak": self.rescale_streak,
            "grad_spike_applied_at": self.grad_spike_applied_at,
            "rollback_steps": list(self.rollback_steps),
            "pending_snapshots": list(self.pending_snapshots),
            "verified_snapshots": list(self.verified_snapshots),
            "recent_reasons": [[s, list(r)] for s, r in self.recent_reasons],
            "freeze_until": list(self.freeze_until),
            "hot_streak": list(self.hot_streak),
            "numel": list(self.numel),
            "numel_reported": list(self.numel_reported),
            "start_held": self.start_held,
            "start_loss": self.start_loss,
            "start_grad_norm": self.start_grad_norm,
            "start_records": self.start_records,
            "start_above": list(self.start_above),
            "start_grads": [list(x) for x in self.start_grads],
            "returned_to_start": self.returned_to_start,
            "lr_peak": list(self.lr_peak),
            "lr_spike_streak": list(self.lr_spike_streak),
        }

    def load_state_dict(self, state: dict) -> None:
        self.resize(int(state["num_groups"]))
        self.consecutive_trouble = int(state["consecutive_trouble"])
        self.loss_only_streak = int(state["loss_only_streak"])
        self.grad_only_streak = int(state.get("grad_only_streak", 0))  # came later
        self.rescale_streak = int(state.get("rescale_streak", 0))  # came later
        spike = state["grad_spike_applied_at"]
        self.grad_spike_applied_at = int(spike) if spike is not None else None
        self.rollback_steps = deque(int(s) for s in state["rollback_steps"])
        self.pending_snapshots = [int(s) for s in state["pending_snapshots"]]
        self.verified_snapshots = [int(s) for s in state["verified_snapshots"]]
        self.recent_reasons = deque(((int(s), list(r)) for s, r in state["recent_reasons"]), maxlen=8)
        G = self.num_groups
        self.freeze_until = [int(x) for x in per_group("freeze_until", state["freeze_until"], G)]
        self.hot_streak = [int(x) for x in per_group("hot_streak", state["hot_streak"], G)]
        self.numel = [float(x) for x in per_group("numel", state["numel"], G)]
        self.numel_reported = [float(x) for x in per_group("numel_reported", state.get("numel_reported", self.numel),
                                                           G)]  # came later: the sizes as known
        # the start came later: a state saved without it holds none
        self.start_held = bool(state.get("start_held", False))
        self.start_loss = None if state.get("start_loss") is None else float(state["start_loss"])
        # came later: a state saved without it judges the rise by the loss alone
        self.start_grad_norm = None if state.get("start_grad_norm") is None else float(state["start_grad_norm"])
        self.start_records = int(state.get("start_records", 0))
        self.start_above = [int(bool(x)) for x in state.get("start_above", [])][-3:]
        self.start_grads = [[None if x is None else float(x), bool(w)]  # came later
                            for x, w in state.get("start_grads", [])][-3:]
        self.returned_to_start = bool(state.get("returned_to_start", False))
        # came later: a state saved without them has no lr history, as a fresh run
        self.lr_peak = [None if x is None else float(x) for x in per_group("lr_peak", state.get("lr_peak", [None] * G), G)]
        self.lr_spike_streak = [int(x) for x in per_group("lr_spike_streak", state.get("lr_spike_streak", [0] * G), G)]


__all__ = ["GuardGaveUp", "Recovery"]
