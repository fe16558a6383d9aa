"""The guard's decision logic: pure host-side Python over telemetry records given as floats.

No tensors and no devices here, so the same controller runs inside a training loop, over a
recorded trace (``replay``) and under property tests. Per processed record it

1. derives the signals (grad norm, update ratio, outlier ratio, non-finite count, loss,
   curvature along the update) per group and globally;
2. scores them against running statistics *before* folding them in, and folds in only a
   clean record (so a rejected spike never raises the threshold that rejected it);
3. moves the regime (warmup, stable, spiking, diverging, recovering) and takes bounded
   actions: AIMD LR scale, device-side skip limits, rollback requests, per-group freezing.

Before each step, :meth:`Controller.control_values` turns the state into the values the
device will use: per-group scale (AIMD scale, capped by the predictive update bound),
per-group gate, and the grad-norm and loss limits for the device-side skip.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

from .config import GuardConfig
from .events import Event
from .signals import NUM_FIELDS, StepSignals, derive
from .stats import EmaStat, safe_log

WARMUP, STABLE, SPIKING, DIVERGING, RECOVERING = "warmup", "stable", "spiking", "diverging", "recovering"
REGIMES = (WARMUP, STABLE, SPIKING, DIVERGING, RECOVERING)


@dataclass
class HostRecord:
    """One step's record on the host: telemetry rows plus the control that was issued for it."""

    step: int
    telemetry: list[list[float]]
    applied_gate: list[float]
    loss: float | None
    lrs: list[float]
    scale: list[float]
    """The guard scale issued for this step (1.0 per group when unknown)."""
    gate: list[float]
    """The guard gate issued for this step (1.0 per group when unknown)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HostRecord":
        return cls(**{k: d[k] for k in ("step", "telemetry", "applied_gate", "loss", "lrs", "scale", "gate")})


@dataclass
class Decision:
    events: list[Event] = field(default_factory=list)
    rollback_to: int | None = None
    """Step of the snapshot to restore, or None."""
    signals: dict = field(default_factory=dict)
    """The record's signals and z-scores, as logged."""


@dataclass
class ControlValues:
    scale: list[float]
    gate: list[float]
    grad_norm_limit: float
    loss_limit: float

    def as_list(self) -> list[float]:
        return [*self.scale, *self.gate, self.grad_norm_limit, self.loss_limit]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _as_float(x, default: float = math.nan) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _trust_fit(window) -> tuple | None:
    """(b, se, p) of a window of (step, loss, g.u): the least-squares slope of the loss over
    the steps, its standard error (from the residuals) and the mean g.u of the updates between
    the window's losses (the first-order predicted change per step). None when undefined."""
    n = len(window)
    if n < 3:
        return None
    p = sum(r[2] for r in list(window)[:-1]) / (n - 1)
    if not p < 0.0:
        return None  # no predicted decrease to compare against
    t0 = window[0][0]
    ts = [r[0] - t0 for r in window]
    ls = [r[1] for r in window]
    tm, lm = sum(ts) / n, sum(ls) / n
    sxx = sum((t - tm) ** 2 for t in ts)
    if not sxx > 0:
        return None
    b = sum((t - tm) * (l - lm) for t, l in zip(ts, ls)) / sxx
    res = sum((l - lm - b * (t - tm)) ** 2 for t, l in zip(ts, ls))
    se = math.sqrt(res / (n - 2) / sxx)
    if not all(math.isfinite(x) for x in (b, se, p, b / p)):
        return None
    return b, se, p


class Controller:
    """Adaptive statistics, regime and bounded actions for ``num_groups`` parameter groups."""

    def __init__(self, config: GuardConfig, num_groups: int):
        self.config = config
        c = config
        self.grad_stat = EmaStat(c.ema_beta, c.warmup_steps, c.min_grad_log_std, c.winsor_z)
        self.loss_stat = EmaStat(c.ema_beta, c.warmup_steps, c.min_loss_rel_std, c.winsor_z, relative_std=True)
        self.update_stat = EmaStat(c.ema_beta, c.warmup_steps, c.min_log_std, c.winsor_z)
        self.group_grad_stats: list[EmaStat] = []
        self.group_outlier_stats: list[EmaStat] = []
        self.num_groups = 0
        self.regime = WARMUP
        self.aimd_scale = 1.0
        self.grad_max = 0.0  # largest accepted grad norm: the warm-up skip limit
        self.processed = 0
        self.clean_streak = 0
        self.consecutive_trouble = 0
        self.trouble_steps: deque[int] = deque()
        self.episode_start: int | None = None  # first trouble step not yet resolved
        self.rollback_steps: list[int] = []
        self.snapshot_steps: list[int] = []
        self.prev: dict | None = None  # previous record's loss and g.u, for the curvature
        # Trust region: a ceiling on the scale, and the window of (step, loss, g.u) records
        # measured under it (records issued before ``trust_since`` describe another ceiling).
        self.trust_scale = 1.0
        self.trust_since = 0
        self.trust_window: deque[tuple[int, float, float]] = deque()
        self.outbox: list[Event] = []  # events raised while issuing control
        self.resize(num_groups)

    # ------------------------------------------------------------------ groups
    def resize(self, num_groups: int) -> None:
        """Grow (add_param_group) or shrink the per-group state; new groups start fresh."""
        c = self.config
        num_groups = max(int(num_groups), 1)
        old = self.num_groups

        def fit(values: list, fill) -> list:
            return (values + [fill] * num_groups)[:num_groups]

        self.group_grad_stats = fit(self.group_grad_stats, None)
        self.group_outlier_stats = fit(self.group_outlier_stats, None)
        self.command_stats = fit(getattr(self, "command_stats", []), None)
        for g in range(old, num_groups):
            self.command_stats[g] = EmaStat(c.ema_beta, c.warmup_steps, c.min_log_std, c.winsor_z)
            self.group_grad_stats[g] = EmaStat(c.ema_beta, c.warmup_steps, c.min_grad_log_std, c.winsor_z)
            self.group_outlier_stats[g] = EmaStat(c.ema_beta, c.warmup_steps, c.min_outlier_std, c.winsor_z)
        self.norm_update = fit(getattr(self, "norm_update", []), 1.0)  # c: RMS of the normalised update
        self.param_rms = fit(getattr(self, "param_rms", []), math.nan)
        self.numel = fit(getattr(self, "numel", []), 0.0)
        self.freeze_until = fit(getattr(self, "freeze_until", []), 0)
        self.last_scale = fit(getattr(self, "last_scale", []), 1.0)
        self.capped = fit(getattr(self, "capped", []), None)  # the bound capping each group, or None
        self.num_groups = num_groups

    def set_param_rms(self, values: list[float], numel: list[float] | None = None) -> None:
        """Seed rms(theta) (and sizes) before the first record, for the first steps' bound."""
        for g, v in enumerate(values[: self.num_groups]):
            if _finite(v):
                self.param_rms[g] = float(v)
        if numel is not None:
            for g, n in enumerate(numel[: self.num_groups]):
                if _finite(n) and n > 0 and self.numel[g] <= 0:
                    self.numel[g] = float(n)

    # ------------------------------------------------------------------ issuing control
    def control_values(self, step: int, lrs: list[float]) -> ControlValues:
        """The scale, gate and device limits for optimizer step ``step``."""
        c = self.config
        G = self.num_groups
        if not c.acts:
            return ControlValues([1.0] * G, [1.0] * G, math.inf, math.inf)
        gates = [0.0 if step <= self.freeze_until[g] else 1.0 for g in range(G)]
        scales = []
        group_lrs = [_as_float(lrs[g]) if g < len(lrs) else math.nan for g in range(G)]
        group_caps = [self._predictive_caps(g, group_lrs[g]) for g in range(G)]
        self._latch_trust(step, [cap for caps in group_caps for cap in caps])  # one ceiling for all groups
        for g in range(G):
            lr = group_lrs[g]
            target, bound = self.aimd_scale, None
            caps = group_caps[g]
            if c.trust_region:
                caps.append((self.trust_scale, "trust_ratio"))
            for cap, name in caps:
                if cap < target:
                    target, bound = cap, name
            target = min(1.0, max(c.min_scale, target))
            issued = min(target, self.last_scale[g] + c.max_scale_increase)
            capped = bound if bound is not None and issued < self.aimd_scale else None
            if capped != self.capped[g]:
                self.outbox.append(
                    Event(
                        step=step,
                        regime=self.regime,
                        # A new bound taking over an ongoing cap (the predictive cap handing
                        # the scale to the trust ceiling) is the same intervention, re-labelled.
                        action=("recap" if self.capped[g] else "cap_scale") if capped else "release_cap",
                        detail={"group": g, "scale": issued, "aimd_scale": self.aimd_scale, "lr": lr,
                                "trust_scale": self.trust_scale,
                                "predicted_ratio": self._commanded_ratio(g, lr),
                                "envelope": self._envelope(g)},
                        bound=capped or self.capped[g],
                    )
                )
                self.capped[g] = capped
            self.last_scale[g] = issued
            scales.append(issued)
        return ControlValues(scales, gates, self.grad_norm_limit(), self.loss_limit())

    def _latch_trust(self, step: int, caps: list[tuple[float, str]]) -> None:
        """A predictive cap that binds says the commanded step is outside the envelope: the
        trust ceiling follows it down, and rises again only on evidence (``_trust_decide``),
        not merely because the cap's inputs (c, rms(theta)) drifted."""
        c = self.config
        if not c.trust_region or not caps:
            return
        cap = min(1.0, max(c.min_scale, min(v for v, _ in caps)))
        if cap < self.trust_scale:
            self.trust_scale = cap
            self.trust_since = step
            self.trust_window.clear()

    def _commanded_ratio(self, g: int, lr: float) -> float:
        """Predicted update/param ratio of the next step at scale 1: lr * c / rms(theta)."""
        if not _finite(lr) or lr <= 0:
            return math.nan
        rms = self.param_rms[g]
        rms = max(rms if _finite(rms) else 0.0, self.config.min_param_rms)
        norm_update = self.norm_update[g]
        if not _finite(norm_update) or norm_update <= 0:
            return math.nan
        return lr * norm_update / rms

    def _envelope(self, g: int) -> float:
        """The adaptive bound on the predicted ratio: exp(mean + z_update * std) of the
        commanded ratios accepted so far (inf during warm-up)."""
        upper = self.command_stats[g].upper(self.config.z_update)
        return math.exp(upper) if upper < 700.0 else math.inf

    def _predictive_caps(self, g: int, lr: float) -> list[tuple[float, str]]:
        """Largest scales keeping the predicted ratio lr*scale*c/rms under (a) the configured
        maximum and (b) the adaptive envelope. A command inside the envelope is folded into
        its statistic; one outside (a learning-rate jump) is not, so it stays capped."""
        ratio = self._commanded_ratio(g, lr)
        if not math.isfinite(ratio) or ratio <= 0:
            return []
        caps = []
        if self.config.max_update_ratio is not None:
            caps.append((self.config.max_update_ratio / ratio, "max_update_ratio"))
        envelope = self._envelope(g)
        if ratio > envelope:
            caps.append((envelope / ratio, "update_envelope"))
        else:
            self.command_stats[g].update(math.log(ratio))
        return caps

    def grad_norm_limit(self) -> float:
        if not self.config.acts:
            return math.inf
        if self.grad_stat.warm:
            upper = self.grad_stat.upper(self.config.z_grad)
            return math.exp(upper) if upper < 700.0 else math.inf
        if self.grad_max > 0:
            return self.config.warmup_grad_factor * self.grad_max
        return math.inf

    def loss_limit(self) -> float:
        if not self.config.acts:
            return math.inf
        return self.loss_stat.upper(self.config.z_loss)

    def frozen_fraction(self, step: int) -> float:
        total = sum(n for n in self.numel if n > 0)
        if total <= 0:
            return 0.0
        frozen = sum(n for g, n in enumerate(self.numel) if n > 0 and step <= self.freeze_until[g])
        return frozen / total

    # ------------------------------------------------------------------ snapshots
    def take_snapshot(self, step: int) -> bool:
        """Whether a snapshot of the state after ``step`` is due; records it if so."""
        c = self.config
        if self.regime != STABLE or step % c.snapshot_interval != 0 or step in self.snapshot_steps:
            return False
        self.snapshot_steps.append(step)
        del self.snapshot_steps[: -c.snapshot_ring]
        return True

    # ------------------------------------------------------------------ observing
    def observe(self, rec: HostRecord, now: int | None = None) -> Decision:
        """Process one record; ``now`` is the latest optimizer step (for rollback distance)."""
        cfg = self.config
        step = int(rec.step)
        now = step if now is None else max(int(now), step)
        G = self.num_groups
        rows = self._rows(rec.telemetry)
        loss = _as_float(rec.loss) if rec.loss is not None else None
        sig = derive(rows, loss)
        issued_gate = self._per_group(rec.gate, 1.0)
        applied_gate = self._per_group(rec.applied_gate, 1.0)
        issued_scale = self._per_group(rec.scale, 1.0)
        lrs = self._per_group(rec.lrs, math.nan)
        written = [issued_gate[g] > 0 and applied_gate[g] > 0 for g in range(G)]
        device_skip = any(issued_gate[g] > 0 and not applied_gate[g] > 0 for g in range(G))
        decision = Decision()  # events raised by control_values stay in self.outbox for the caller
        self.processed += 1

        self._curvature(sig, step, written)
        for g, gs in enumerate(sig.groups):
            if gs.numel > 0 and _finite(gs.numel):
                self.numel[g] = gs.numel

        # ---- score against the statistics as they were before this record
        log_grad = safe_log(sig.grad_norm)
        nonfinite = not sig.nonfinite == 0 or (loss is not None and not math.isfinite(loss))
        params_bad = not math.isfinite(sig.param_sq)
        if self.grad_stat.warm:
            z_grad = self.grad_stat.z(log_grad)
            grad_spike = z_grad > cfg.z_grad
        else:
            z_grad = 0.0 if math.isfinite(sig.grad_norm) else math.inf
            grad_spike = (self.grad_max > 0 and sig.grad_norm > cfg.warmup_grad_factor * self.grad_max) or (
                not math.isfinite(sig.grad_norm)
            )
        z_loss = self.loss_stat.z(loss) if loss is not None else 0.0
        loss_spike = loss is not None and z_loss > cfg.z_loss
        norm_ratio = self._normalised_update_ratio(rows, written, issued_scale, lrs)
        z_update = self.update_stat.z(safe_log(norm_ratio)) if norm_ratio is not None else 0.0
        update_spike = norm_ratio is not None and z_update > cfg.z_update
        group_z = self._group_scores(sig, written, issued_gate)

        reasons = [name for name, hit in (
            ("nonfinite", nonfinite), ("params_nonfinite", params_bad), ("grad_spike", grad_spike),
            ("loss_spike", loss_spike), ("update_spike", update_spike), ("device_skip", device_skip),
        ) if hit]
        trouble = bool(reasons)
        trust = self._trust_observe(step, loss, sig, trouble, written)
        sig.extra.update({"z_grad": z_grad, "z_loss": z_loss, "z_update": z_update,
                          "norm_update_ratio": norm_ratio, "reasons": reasons,
                          "rho": trust[0], "rho_lo": trust[1], "rho_hi": trust[2],
                          "rho_records": trust[3], "trust_scale": self.trust_scale})
        signals = sig.summary()
        decision.signals = signals

        # ---- fold in a clean record only
        if not trouble:
            self._fold(sig, log_grad, loss, norm_ratio, written)
        self._measure_update(sig, written, issued_scale, lrs)
        self._release_frozen(now, decision)

        if trouble:
            self._on_trouble(step, now, sig, signals, reasons, device_skip, params_bad, group_z,
                             issued_gate, decision)
        else:
            self._on_clean(step, signals, decision)
            self._trust_decide(step, now, trust, issued_scale, written, signals, decision)
        return decision

    # ---- helpers of observe
    def _per_group(self, values, fill: float) -> list[float]:
        out = [_as_float(v, fill) for v in (values or [])][: self.num_groups]
        return out + [fill] * (self.num_groups - len(out))

    def _rows(self, telemetry) -> list[list[float]]:
        rows = []
        for g in range(self.num_groups):
            row = telemetry[g] if telemetry is not None and g < len(telemetry) else []
            row = [_as_float(v, 0.0) for v in row][:NUM_FIELDS]
            rows.append(row + [0.0] * (NUM_FIELDS - len(row)))
        return rows

    def _normalised_update_ratio(self, rows, written, scale, lrs) -> float | None:
        """||u|| / ||theta|| / lr_eff over written groups: scale- and schedule-free, so a
        scheduler or the guard's own scale never looks like a spike (the predictive bound
        is what answers a learning-rate jump)."""
        total_u = total_p = 0.0
        weights = 0.0
        for g, row in enumerate(rows):
            lr_eff = lrs[g] * scale[g]
            if not written[g] or not _finite(lr_eff) or lr_eff <= 0:
                continue
            total_u += row[1] / (lr_eff * lr_eff)
            total_p += row[2]
            weights += 1
        if weights == 0 or not total_p > 0 or not math.isfinite(total_p):
            return None
        ratio = math.sqrt(total_u / total_p) if total_u > 0 else 0.0
        return ratio if ratio > 0 else None

    def _group_scores(self, sig: StepSignals, written, issued_gate) -> list[float]:
        """Per group: how far its grad norm / outlier ratio sit above its own statistics."""
        scores = []
        for g, gs in enumerate(sig.groups):
            if not issued_gate[g] > 0:
                scores.append(0.0)
                continue
            if not gs.nonfinite == 0:
                scores.append(math.inf)
                continue
            zg = self.group_grad_stats[g].z(safe_log(gs.grad_norm)) / self.config.z_grad
            zo = self.group_outlier_stats[g].z(gs.outlier_ratio) / self.config.z_outlier
            scores.append(max(zg, zo))
        return scores  # > 1: the group crosses its own threshold

    def _fold(self, sig: StepSignals, log_grad, loss, norm_ratio, written) -> None:
        self.grad_stat.update(log_grad)
        if math.isfinite(sig.grad_norm):
            self.grad_max = max(self.grad_max, sig.grad_norm)
        if loss is not None:
            self.loss_stat.update(loss)
        if norm_ratio is not None:
            self.update_stat.update(safe_log(norm_ratio))
        for g, gs in enumerate(sig.groups):
            if written[g]:
                self.group_grad_stats[g].update(safe_log(gs.grad_norm))
                self.group_outlier_stats[g].update(gs.outlier_ratio)

    def _measure_update(self, sig: StepSignals, written, scale, lrs) -> None:
        """Refresh the predictive bound's inputs: c = rms(u) / lr_eff and rms(theta)."""
        for g, gs in enumerate(sig.groups):
            if _finite(gs.param_rms) and gs.numel > 0:
                self.param_rms[g] = gs.param_rms
            lr_eff = lrs[g] * scale[g]
            if written[g] and _finite(lr_eff) and lr_eff > 0 and _finite(gs.update_rms) and gs.update_rms > 0:
                value = gs.update_rms / lr_eff
                if math.isfinite(value):
                    self.norm_update[g] = value

    def _curvature(self, sig: StepSignals, step: int, written) -> None:
        prev, loss = self.prev, sig.loss
        if prev is not None and prev["step"] == step - 1 and loss is not None and prev["loss"] is not None:
            dl = loss - prev["loss"]
            gu = prev["gdotu"]
            if math.isfinite(dl) and math.isfinite(gu):
                sig.curvature = dl - gu
                sig.trust_ratio = dl / gu if gu != 0 else None
        written_all = all(written)
        self.prev = {"step": step, "loss": loss if loss is not None and math.isfinite(loss) else None,
                     "gdotu": sig.grad_dot_update if written_all else math.nan}

    # ---- trust region
    def _trust_observe(self, step: int, loss, sig: StepSignals, trouble: bool, written) -> tuple:
        """Fold the record into the trust window; (rho, lower, upper, records) of the window.

        rho = b / p: b the least-squares slope of the loss over the window's steps (the
        minibatch noise of one loss averages out over the window instead of entering twice,
        as a sum of differences would), p the mean g.u of the updates between those losses
        (the first-order predicted change per step, < 0 for a descent step). The bounds are
        b + trust_z_raise and b - trust_z_cut standard errors of the slope, divided by p.
        """
        nothing = (None, None, None, len(self.trust_window))
        c = self.config
        if not c.trust_region:
            return nothing
        if loss is None:  # no loss telemetry: no evidence can ever come, so no ceiling
            self.trust_scale = 1.0
            self.trust_window.clear()
            return nothing
        gu = sig.grad_dot_update
        if trouble or not all(written) or not math.isfinite(loss) or not math.isfinite(gu):
            self.trust_window.clear()  # a spike or a skipped/frozen step is not a trend
            return nothing
        if step < self.trust_since:
            return nothing  # issued under an older ceiling
        window = self.trust_window
        if window and window[-1][0] != step - 1:
            window.clear()
        window.append((step, float(loss), float(gu)))
        while len(window) > c.trust_window:
            window.popleft()
        fit = _trust_fit(window)
        if fit is None:
            return (None, None, None, len(window))
        b, se, p = fit
        # rho and its bounds: the raise tests the lower one, the cut the upper one.
        return b / p, (b + c.trust_z_raise * se) / p, (b - c.trust_z_cut * se) / p, len(window)

    def _trust_decide(self, step, now, trust, issued_scale, written, signals, decision) -> None:
        c = self.config
        rho, lower, upper, n = trust
        if rho is None or n < c.trust_min_records:
            return
        before = self.trust_scale
        measured = max((issued_scale[g] for g in range(self.num_groups) if written[g]), default=before)
        if upper < c.trust_low:
            after = max(c.min_scale, c.decrease_factor * min(before, measured))
            if after >= before:
                return  # already at the floor: nothing to do, keep measuring
            self.trust_scale = after
            decision.events.append(Event(step=step, regime=self.regime, action="decrease_scale", signals=signals,
                                         detail={"from": before, "to": after, "why": "trust_ratio", "rho": rho,
                                                 "rho_hi": upper},
                                         bound="min_scale" if after > c.decrease_factor * min(before, measured) else None,
                                         applied=c.acts))
        elif lower > c.trust_high and before < 1.0 and measured >= before * (1.0 - 1e-9):
            # Only a ceiling the records were measured at (it was binding) earns a raise.
            after = min(1.0, before * c.trust_increase)
            self.trust_scale = after
            decision.events.append(Event(step=step, regime=self.regime, action="raise_trust", signals=signals,
                                         detail={"from": before, "to": after, "rho": rho, "rho_lo": lower},
                                         applied=c.acts))
        else:
            return
        self.trust_since = now + 1
        self.trust_window.clear()

    def _release_frozen(self, now: int, decision: Decision) -> None:
        """Unfreeze expired groups, and the largest frozen ones while the frozen fraction
        exceeds its bound (group sizes are only known from telemetry and may change)."""
        for g in range(self.num_groups):
            if self.freeze_until[g] and now >= self.freeze_until[g]:
                self._unfreeze(g, now, decision, None)
        frozen = sorted((g for g in range(self.num_groups) if self.freeze_until[g]), key=lambda g: -self.numel[g])
        for g in frozen:
            if self.frozen_fraction(now + 1) <= self.config.max_frozen_fraction:
                break
            self._unfreeze(g, now, decision, "max_frozen_fraction")

    def _unfreeze(self, g: int, now: int, decision: Decision, bound: str | None) -> None:
        decision.events.append(Event(step=now, regime=self.regime, action="unfreeze", detail={"group": g},
                                     bound=bound, applied=self.config.acts))
        self.freeze_until[g] = 0

    # ---- regime machine
    def _transition(self, step: int, regime: str, signals: dict, decision: Decision, why: str) -> None:
        if regime != self.regime:
            decision.events.append(Event(step=step, regime=regime, action="transition", signals=signals,
                                         detail={"from": self.regime, "to": regime, "why": why},
                                         applied=self.config.acts))
            self.regime = regime

    def _decrease(self, step: int, signals: dict, decision: Decision, why: str) -> None:
        cfg = self.config
        before = self.aimd_scale
        after = max(cfg.min_scale, before * cfg.decrease_factor)
        bound = "min_scale" if after > before * cfg.decrease_factor else None
        self.aimd_scale = after
        if after < before or bound:
            decision.events.append(Event(step=step, regime=self.regime, action="decrease_scale", signals=signals,
                                         detail={"from": before, "to": after, "why": why}, bound=bound,
                                         applied=cfg.acts))

    def _on_trouble(self, step, now, sig, signals, reasons, device_skip, params_bad, group_z,
                    issued_gate, decision) -> None:
        cfg = self.config
        self.clean_streak = 0
        self.consecutive_trouble += 1
        self.trouble_steps.append(step)
        while self.trouble_steps and self.trouble_steps[0] <= step - cfg.diverge_window:
            self.trouble_steps.popleft()
        if self.episode_start is None:
            self.episode_start = step
        why = ",".join(reasons)

        skip_reasons = {"nonfinite", "grad_spike", "loss_spike", "device_skip"}
        if skip_reasons.intersection(reasons):
            # In act mode the device already skipped it (or the host sees a spike the
            # device's lagged limit let through); in monitor mode this is what it would do.
            decision.events.append(Event(step=step, regime=self.regime, action="skip", signals=signals,
                                         detail={"why": why, "device_skipped": device_skip},
                                         applied=cfg.acts and device_skip))

        diverging = (
            params_bad
            or len(self.trouble_steps) >= cfg.diverge_spikes
            or self.consecutive_trouble >= cfg.max_consecutive_skips
        )
        if diverging:
            self._transition(step, DIVERGING, signals, decision, why)
            self._decrease(step, signals, decision, why)
            if not self._try_rollback(step, now, signals, decision):
                if self.consecutive_trouble >= cfg.max_consecutive_skips and not params_bad:
                    self._rebaseline(step, sig, signals, decision)
            return
        self._transition(step, SPIKING, signals, decision, why)
        self._decrease(step, signals, decision, why)
        self._freeze(step, now, group_z, issued_gate, signals, decision)

    def _try_rollback(self, step, now, signals, decision) -> bool:
        cfg = self.config
        start = self.episode_start if self.episode_start is not None else step
        recent = [s for s in self.rollback_steps if s > now - cfg.rollback_window]
        candidates = [s for s in self.snapshot_steps if s < start]
        bound = None
        target = None
        if len(recent) >= cfg.max_rollbacks:
            bound = "max_rollbacks"
        elif not candidates:
            bound = "no_snapshot"
        else:
            target = max(candidates)
            if now - target > cfg.max_rollback_distance:
                bound, target = "max_rollback_distance", None
        if target is None:
            decision.events.append(Event(step=step, regime=self.regime, action="rollback_refused",
                                         signals=signals, detail={"now": now}, bound=bound, applied=cfg.acts))
            return False
        decision.rollback_to = target if cfg.acts else None
        decision.events.append(Event(step=step, regime=self.regime, action="rollback", signals=signals,
                                     detail={"to_step": target, "now": now, "distance": now - target},
                                     applied=cfg.acts))
        self.rollback_steps = recent + [now]
        self.snapshot_steps = [s for s in self.snapshot_steps if s < start]
        self.trouble_steps.clear()
        self.consecutive_trouble = 0
        self.episode_start = None
        self.prev = None
        self.trust_window.clear()
        self.trust_since = now + 1
        self._transition(step, RECOVERING, signals, decision, "rollback")
        return True

    def _rebaseline(self, step, sig, signals, decision) -> None:
        """Trouble that persists with nowhere to roll back to is a new level, not a spike:
        restart the statistics so the run is not skipped forever (the scale stays reduced)."""
        for stat in (self.grad_stat, self.loss_stat, self.update_stat, *self.group_grad_stats,
                     *self.group_outlier_stats):
            stat.reset()
        self.grad_max = sig.grad_norm if math.isfinite(sig.grad_norm) else 0.0
        self.consecutive_trouble = 0
        self.trouble_steps.clear()
        decision.events.append(Event(step=step, regime=self.regime, action="rebaseline", signals=signals,
                                     bound="max_consecutive_skips", applied=self.config.acts))

    def _freeze(self, step, now, group_z, issued_gate, signals, decision) -> None:
        """Freeze the groups that carry the trouble when it is local to some of them."""
        cfg = self.config
        active = [g for g in range(self.num_groups) if issued_gate[g] > 0]
        hot = [g for g in active if group_z[g] > 1.0]
        if not hot or len(hot) >= len(active) or cfg.freeze_steps == 0:
            return
        total = sum(n for n in self.numel if n > 0)
        if total <= 0:
            return
        frozen = self.frozen_fraction(now + 1) * total
        chosen, refused = [], []
        for g in sorted(hot, key=lambda g: -group_z[g]):
            size = max(self.numel[g], 0.0)
            if frozen + size <= cfg.max_frozen_fraction * total:
                frozen += size
                chosen.append(g)
            else:
                refused.append(g)
        for g in chosen:
            self.freeze_until[g] = now + cfg.freeze_steps
        if chosen:
            decision.events.append(Event(step=step, regime=self.regime, action="freeze", signals=signals,
                                         detail={"groups": chosen, "until": now + cfg.freeze_steps},
                                         applied=cfg.acts))
        if refused:
            decision.events.append(Event(step=step, regime=self.regime, action="freeze_refused",
                                         signals=signals, detail={"groups": refused},
                                         bound="max_frozen_fraction", applied=cfg.acts))

    def _on_clean(self, step, signals, decision) -> None:
        cfg = self.config
        self.clean_streak += 1
        self.consecutive_trouble = 0
        if self.clean_streak >= cfg.hold_steps:
            self.episode_start = None
        if self.regime in (SPIKING, DIVERGING) and self.clean_streak >= cfg.hold_steps:
            self._transition(step, RECOVERING, signals, decision, "calm")
        if self.regime == RECOVERING and self.clean_streak > cfg.hold_steps:
            self.aimd_scale = min(1.0, self.aimd_scale + cfg.recovery_rate)
        if self.regime == RECOVERING and self.aimd_scale >= 1.0 and self.clean_streak >= cfg.calm_steps:
            self._transition(step, STABLE if self.grad_stat.warm else WARMUP, signals, decision, "recovered")
        if self.regime == WARMUP and self.grad_stat.warm:
            self._transition(step, STABLE, signals, decision, "warm")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "num_groups": self.num_groups,
            "regime": self.regime,
            "aimd_scale": self.aimd_scale,
            "grad_max": self.grad_max,
            "processed": self.processed,
            "clean_streak": self.clean_streak,
            "consecutive_trouble": self.consecutive_trouble,
            "trouble_steps": list(self.trouble_steps),
            "episode_start": self.episode_start,
            "rollback_steps": list(self.rollback_steps),
            "snapshot_steps": list(self.snapshot_steps),
            "prev": dict(self.prev) if self.prev is not None else None,
            "outbox": [asdict(e) for e in self.outbox],
            "grad_stat": self.grad_stat.state_dict(),
            "loss_stat": self.loss_stat.state_dict(),
            "update_stat": self.update_stat.state_dict(),
            "group_grad_stats": [s.state_dict() for s in self.group_grad_stats],
            "group_outlier_stats": [s.state_dict() for s in self.group_outlier_stats],
            "command_stats": [s.state_dict() for s in self.command_stats],
            "norm_update": list(self.norm_update),
            "param_rms": list(self.param_rms),
            "numel": list(self.numel),
            "freeze_until": list(self.freeze_until),
            "last_scale": list(self.last_scale),
            "capped": list(self.capped),
            "trust_scale": self.trust_scale,
            "trust_since": self.trust_since,
            "trust_window": [list(r) for r in self.trust_window],
        }

    def load_state_dict(self, state: dict) -> None:
        self.resize(state["num_groups"])
        for name in ("regime", "aimd_scale", "grad_max", "processed", "clean_streak", "consecutive_trouble",
                     "episode_start"):
            setattr(self, name, state[name])
        self.trouble_steps = deque(state["trouble_steps"])
        self.rollback_steps = list(state["rollback_steps"])
        self.snapshot_steps = list(state["snapshot_steps"])
        self.prev = dict(state["prev"]) if state["prev"] is not None else None
        self.outbox = [Event.from_dict(e) for e in state["outbox"]]
        self.grad_stat.load_state_dict(state["grad_stat"])
        self.loss_stat.load_state_dict(state["loss_stat"])
        self.update_stat.load_state_dict(state["update_stat"])
        for stat, s in zip(self.group_grad_stats, state["group_grad_stats"]):
            stat.load_state_dict(s)
        for stat, s in zip(self.group_outlier_stats, state["group_outlier_stats"]):
            stat.load_state_dict(s)
        for stat, s in zip(self.command_stats, state["command_stats"]):
            stat.load_state_dict(s)
        for name in ("norm_update", "param_rms", "numel", "freeze_until", "last_scale", "capped"):
            setattr(self, name, list(state[name]))
        self.trust_scale = float(state.get("trust_scale", 1.0))
        self.trust_since = int(state.get("trust_since", 0))
        self.trust_window = deque((int(s), float(l), float(u)) for s, l, u in state.get("trust_window", []))
