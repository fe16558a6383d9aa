"""The controller: composes the detectors, the step-size governor and recovery over records.

Pure host-side Python over :class:`~lbw_guard.guard.signals.HostRecord` values: no tensors,
no devices, so the same controller runs inside a training loop, over a recorded trace
(``lbw-guard replay``, which reproduces the live decisions exactly) and under property tests.

Per processed record: derive the signals; let the detectors score them against statistics as
they were before this record; let recovery decide on faults (skip, rebaseline, freeze,
rollback, give up); let the governor move the lr scale on evidence; fold a clean record into
the statistics; move the regime. Before each step, :meth:`Controller.command` turns the state
into what the device will use.
"""

from __future__ import annotations

import math

from lbw_guard.control import GuardCommand

from .accounting import Accounting, EventLog
from .config import GuardConfig
from .detectors import Detectors
from .events import Event
from .governor import StepSizeGovernor
from .recovery import Recovery
from .signals import HostRecord, StepSignals, derive, per_group, regrouped

WARMUP, STABLE, SPIKING, DIVERGING, RECOVERING = "warmup", "stable", "spiking", "diverging", "recovering"
REGIMES = (WARMUP, STABLE, SPIKING, DIVERGING, RECOVERING)


def _as_float(x, default: float = math.nan) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


class Controller:
    """Detectors, governor and recovery for ``num_groups`` parameter groups."""

    def __init__(self, config: GuardConfig, num_groups: int):
        self.config = config
        self.detectors = Detectors(config)
        self.governor = StepSizeGovernor(config, num_groups)
        self.recovery = Recovery(config, num_groups)
        self.events = EventLog(config.event_capacity)
        self.accounting = Accounting()
        self.regime = WARMUP
        self.processed = 0
        self.clean_streak = 0
        self.num_groups = 0
        self.last_scale: list[float] = []
        self.capped: list[str | None] = []
        self.lr_skipped: dict[int, list[int]] = {}  # step -> groups gated off for an lr spike, until observed
        self.resize(num_groups)

    def resize(self, num_groups: int) -> None:
        self.regroup(range(max(int(num_groups), 1)))

    def regroup(self, sources) -> None:
        """A new group layout: group i keeps old group ``sources[i]``'s state (None: a new
        group). A group deleted from the middle takes its state with it, instead of leaving its
        ceilings, lr peak and freezes to the group that moves into its place."""
        sources = list(sources) or [None]
        self.governor.regroup(sources)
        self.recovery.regroup(sources)
        self.last_scale = regrouped(self.last_scale, sources, 1.0)
        self.capped = regrouped(self.capped, sources, None)
        now_of = {s: g for g, s in enumerate(sources) if s is not None}
        self.lr_skipped = {step: sorted(now_of[g] for g in groups if g in now_of)
                           for step, groups in self.lr_skipped.items()}
        self.num_groups = len(sources)

    # ------------------------------------------------------------------ issuing
    def command(self, step: int, lrs: list[float]) -> GuardCommand:
        """The scale, gate and device-side checks for optimizer step ``step``."""
        c = self.config
        G = self.num_groups
        if not c.acts:
            return GuardCommand.plain(G)
        scales, gates, lr_skipped = [], [], []
        for g in range(G):
            lr = _as_float(lrs[g]) if g < len(lrs) else math.nan
            target, bound = self.governor.target(g, lr)
            issued = min(target, self.last_scale[g] + c.max_scale_increase)
            self._note_cap(step, g, issued, bound, lr)
            self.last_scale[g] = issued
            scales.append(issued)
            lr_gate, event = self.recovery.lr_gate(g, step, lr)
            if event is not None:
                self._recovery_events(step, [event], {})
            if lr_gate == 0.0:
                lr_skipped.append(g)
            gates.append(min(lr_gate, self.recovery.gate(g, step)))
        if lr_skipped:
            self.lr_skipped[step] = lr_skipped  # a skip, not a freeze, in the accounting
        # (the kernels add no bound before a tensor's third step: lbw_kernels.contract)
        spike_k = c.spike_k if self.processed >= c.spike_warmup else c.spike_k_warmup
        return GuardCommand(
            scale=scales, gate=gates, spike_k=spike_k, clamp=c.clamp_spikes,
            loss_limit=self.detectors.loss_limit() if c.loss_check else math.inf,
            check_loss=c.loss_check,
            grad_norm_limit=self.detectors.grad_norm_limit() if c.same_step_grad_skip else math.inf,
            precheck=c.same_step_grad_skip, mask_nonfinite=True,
        )

    def _note_cap(self, step: int, g: int, issued: float, bound: str | None, lr: float) -> None:
        capped = bound if issued < 1.0 else None
        if capped == self.capped[g]:
            return
        action = ("recap" if self.capped[g] else "cap_scale") if capped else "release_cap"
        self._event(step, action, detail={"group": g, "scale": issued, "lr": lr}, bound=capped or self.capped[g])
        self.capped[g] = capped

    # ------------------------------------------------------------------ observing
    def observe(self, rec: HostRecord, now: int | None = None) -> dict:
        """Process one record; ``now`` is the latest optimizer step. Returns the decision:
        ``rollback_to`` (a snapshot step or None), ``give_up`` (evidence or None), ``signals``."""
        c = self.config
        now = rec.now if now is None else now
        now = rec.step if now is None else max(int(now), rec.step)
        self.processed += 1
        sig = derive(rec)
        issued_gate = self._per_group(rec.gate, 1.0)
        issued_scale = self._per_group(rec.scale, 1.0)
        lrs = self._per_group(rec.lrs, math.nan)
        a = self.detectors.assess(sig, issued_gate)
        sig.extra.update({"z_grad": a.z_grad, "z_loss": a.z_loss, "reasons": a.reasons})
        signals = sig.summary()

        decision = self.recovery.observe(sig, a, now, issued_gate)
        self._recovery_events(rec.step, decision["events"], signals)
        if decision["rollback_to"] is not None:
            self.governor.on_rollback(lrs, issued_scale, to_start=decision["rollback_to"] == 0,
                                      cut=decision["rollback_cuts_lr"])
            self._rolled_back(rec.step, signals)
        elif decision["rebaseline_loss"]:
            self.detectors.rebaseline_loss(sig.loss)
            self.governor.on_data_change()
        elif decision["rebaseline_grad"]:  # a new gradient scale; the lr evidence is scale-free
            self.detectors.rebaseline_grad(sig.grad_norm)
        elif decision["rebaseline_scale"]:  # a rescaled objective: both levels, and the loss's history
            self.detectors.rebaseline_loss(sig.loss)
            self.detectors.rebaseline_grad(sig.grad_norm)
            self.governor.on_loss_rescale()
        else:
            self.detectors.fold(sig, a)
            if not (a.nonfinite or a.params_bad or a.grad_spike):  # a fault says nothing of the lr
                cuts = self.governor.observe(sig, issued_scale, lrs)
                before = len(decision["events"])
                restarted = (c.overshoot_restart and self._overshoot_cut_lowered_the_lr(cuts, sig)
                             and self._restart_after_overshoot(now, decision, lrs, cuts))
                for cut in cuts:  # (a restart deepened them first)
                    self._event(rec.step, "decrease_scale", signals=signals, detail=cut, bound=None)
                self._recovery_events(rec.step, decision["events"][before:], signals)
                if restarted:
                    self._rolled_back(rec.step, signals)

        numel = [gs.numel for gs in sig.groups]
        lr_skipped = self._lr_skipped_at(rec.step)
        freeze_gate = [1.0 if g in lr_skipped else x for g, x in enumerate(issued_gate)]
        self.accounting.add(issued_scale, freeze_gate, [gs.applied_gate for gs in sig.groups], numel,
                            sig.spike_fraction > 0 or sig.nonfinite > 0 or bool(lr_skipped))
        self._move_regime(rec.step, a, signals, decision)
        if decision["give_up"] is not None and c.acts:
            self._event(rec.step, "give_up", signals=signals, detail={"why": decision["give_up"]["why"]})
        if not c.acts:
            decision["rollback_to"] = None
            decision["give_up"] = None
        decision["signals"] = signals
        return decision

    def _lr_skipped_at(self, step: int) -> list[int]:
        """The groups gated off for an lr spike at ``step``; forgets it and every earlier step."""
        for s in [s for s in self.lr_skipped if s < step]:
            del self.lr_skipped[s]
        return self.lr_skipped.pop(step, [])

    def _overshoot_cut_lowered_the_lr(self, cuts: list[dict], sig: StepSignals) -> bool:
        """An overshoot cut that lowered the parameters' lr, element-weighted, by at least half a
        cut. Going back to the start redoes the start at a lower lr: where most parameters
        already sat at ``min_scale`` (a 33x lr under the update envelope, with only the small
        vector group above it) the cut leaves their lr as it was, and the restart would only
        throw their steps away."""
        written = sum(gs.numel for gs in sig.groups if gs.written)
        removed = sum(sig.groups[cut["group"]].numel * (1.0 - cut["to_lr"] / cut["from_lr"])
                      for cut in cuts if cut["why"] == "overshoot")
        return written > 0 and removed >= 0.5 * (1.0 - self.config.cut_factor) * written

    def _restart_after_overshoot(self, now: int, decision: dict, lrs: list[float], cuts: list[dict]) -> bool:
        """The governor's first overshoot, found while the start is held, sends the run back to
        the start at ``restart_cut`` of the lr it overshot at: the damage of a run's first steps
        at a too-high lr is what a later cut cannot undo (see ``GuardConfig.overshoot_restart``).
        Returns whether it did (the rollback budget or a lost start can refuse it)."""
        restarted = self.recovery.restart_from_start(now, decision, "overshoot")
        if restarted:
            self.governor.on_restart(lrs, cuts)
        return restarted

    def _rolled_back(self, step: int, signals: dict) -> None:
        """What every rollback does past the governor: count it, restart the statistics."""
        self.accounting.rollbacks += 1
        self.detectors.rebaseline()
        self._transition(step, RECOVERING, signals, "rollback")

    def _recovery_events(self, step: int, events: list[dict], signals: dict) -> None:
        for e in events:
            e = dict(e)
            action = e.pop("action")
            applied = e.pop("applied", True) and self.config.acts
            bound = e.pop("bound", None)
            self._event(step, action, signals=signals, detail=e, bound=bound, applied=applied)

    def notify_data_change(self, step: int) -> None:
        """The user says the data changed: the loss and the gradients are at a new level, not
        spiking; their statistics restart, and so does the governor's evidence."""
        self.governor.on_data_change()
        self.recovery.start_held = False  # the start's loss was measured on the old data
        self._restart_detectors(step, why="notify_data_change")

    def params_joined(self, step: int, count: int) -> None:
        """Parameters stepped for the first time after the run began: the gradients and the loss
        move to levels their statistics say nothing of, so those restart (the data did not
        change: the governor's evidence and the start stay)."""
        self._restart_detectors(step, why="params_joined", params=int(count))

    def _restart_detectors(self, step: int, **detail) -> None:
        self.detectors.rebaseline()
        self.recovery.restart_streaks()
        self._event(step, "rebaseline", detail=detail)

    def rollback_failed(self, step: int, target: int, error: str) -> None:
        """The rollback to ``target`` could not be restored (the parameters changed shape since
        the snapshot, ...): it does not count, and no snapshot taken before now is a target any
        more. The lr cut that came with it stays: the trouble that asked for it is real."""
        self.accounting.rollbacks = max(0, self.accounting.rollbacks - 1)
        self.recovery.rollback_failed()
        self._event(step, "rollback_failed", detail={"to_step": int(target), "error": str(error)})

    def start_taken(self) -> None:
        """The guard holds the state the run began from (see ``GuardConfig.start_rise``)."""
        self.recovery.start_taken()

    def snapshot_taken(self, step: int) -> None:
        """The guard took a snapshot of the state step ``step`` left (to be verified)."""
        self.recovery.snapshot_taken(step)

    def snapshots_lost(self) -> None:
        """The guard dropped its snapshots and the start (a parameter joined, or changed shape:
        none of them can be restored)."""
        self.recovery.snapshots_lost()

    def accept_give_up(self) -> None:
        """The user's ``on_give_up`` hook returned: restart the statistics and go on."""
        self.detectors.rebaseline()
        self.recovery.consecutive_trouble = 0

    # ---- helpers
    def _per_group(self, values, fill: float) -> list[float]:
        out = [_as_float(v, fill) for v in (values or [])][: self.num_groups]
        return out + [fill] * (self.num_groups - len(out))

    def _event(self, step: int, action: str, signals: dict | None = None, detail: dict | None = None,
               bound: str | None = None, applied: bool | None = None) -> None:
        self.events.add(Event(step=int(step), regime=self.regime, action=action, signals=signals or {},
                              detail=detail or {}, bound=bound, applied=self.config.acts if applied is None else applied))

    def _transition(self, step: int, regime: str, signals: dict, why: str) -> None:
        if regime != self.regime:
            before = self.regime
            self.regime = regime
            self._event(step, "transition", signals=signals, detail={"from": before, "to": regime, "why": why})

    def _move_regime(self, step: int, a, signals: dict, decision: dict) -> None:
        if decision["rollback_to"] is not None:
            self.clean_streak = 0
            return
        if a.trouble:
            self.clean_streak = 0
            diverging = a.params_bad or self.recovery.consecutive_trouble >= 3
            self._transition(step, DIVERGING if diverging else SPIKING, signals, ",".join(a.reasons))
            return
        self.clean_streak += 1
        if self.regime in (SPIKING, DIVERGING) and self.clean_streak >= 3:
            self._transition(step, RECOVERING, signals, "calm")
        elif self.regime == RECOVERING and self.clean_streak >= 10:
            self._transition(step, STABLE if self.detectors.grad.warm else WARMUP, signals, "recovered")
        elif self.regime == WARMUP and self.detectors.grad.warm:
            self._transition(step, STABLE, signals, "warm")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "num_groups": self.num_groups,
            "regime": self.regime,
            "processed": self.processed,
            "clean_streak": self.clean_streak,
            "last_scale": list(self.last_scale),
            "capped": list(self.capped),
            "lr_skipped": [[s, list(g)] for s, g in self.lr_skipped.items()],
            "detectors": self.detectors.state_dict(),
            "governor": self.governor.state_dict(),
            "recovery": self.recovery.state_dict(),
            "events": self.events.state_dict(),
            "accounting": self.accounting.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.resize(int(state["num_groups"]))
        if state["regime"] not in REGIMES:
            raise ValueError(f"unknown guard regime {state['regime']!r}; expected one of {REGIMES}")
        self.regime = state["regime"]
        self.processed = int(state["processed"])
        self.clean_streak = int(state["clean_streak"])
        self.last_scale = [float(x) for x in per_group("last_scale", state["last_scale"], self.num_groups)]
        self.capped = per_group("capped", state["capped"], self.num_groups)
        self.lr_skipped = {int(s): [int(g) for g in groups] for s, groups in state.get("lr_skipped", [])}  # came later
        self.detectors.load_state_dict(state["detectors"])
        self.governor.load_state_dict(state["governor"])
        self.recovery.load_state_dict(state["recovery"])
        self.events.load_state_dict(state["events"])
        self.accounting.load_state_dict(state["accounting"])


__all__ = ["REGIMES", "Controller", "HostRecord", "StepSignals"]
