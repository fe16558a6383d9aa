"""GuardConfig: every bound the guard works within, validated at construction, and presets.

All step counts are optimizer steps. The defaults were chosen on small transformers
(see tests/test_guard_integration.py and the guard report): a well-tuned run is never
capped and a run plain AdamW loses is held inside the envelope.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

MODES = ("act", "monitor")


@dataclass(frozen=True)
class GuardConfig:
    """Bounds and thresholds of the training guard.

    ``mode="monitor"`` observes, classifies and logs what it would do, but never acts
    (scale 1, gate 1, no device-side limits).
    """

    mode: str = "act"

    # --- statistics -------------------------------------------------------------------
    warmup_steps: int = 20
    """Records folded into the statistics before z-scores are trusted."""
    ema_beta: float = 0.97
    """EMA factor of the running mean/variance (window about 1 / (1 - beta) records)."""
    winsor_z: float = 3.0
    """An accepted value is clamped to mean +- winsor_z * std before folding (robustness)."""
    min_log_std: float = 0.05
    """Floor of the std of log-scale signals (grad norm, update ratio): 5% relative noise."""
    min_grad_log_std: float = 0.2
    """Floor of the std of log grad norm (global and per group): a grad-norm spike is at least
    exp(z_grad * 0.2) = 3.3x its level. Early in training the grad norm moves 2-3x within a
    few steps in healthy runs (measured: 0.72 -> 2.01 in two steps at the best learning rate
    of the stress suite), and the device-side limit, issued from statistics two records old,
    would skip such a step; true spikes (faults, overflow) are orders of magnitude larger."""
    min_loss_rel_std: float = 0.02
    """Floor of the loss std, relative to the mean loss."""
    min_outlier_std: float = 1e-3
    """Floor of the std of the outlier ratio."""

    # --- detection --------------------------------------------------------------------
    z_grad: float = 6.0
    """Upward z-score of log grad norm that counts as a spike (and the device-side limit)."""
    z_loss: float = 6.0
    """Upward z-score of the loss that counts as a spike (and the device-side loss limit)."""
    z_update: float = 6.0
    """Upward z-score of the log update/param ratio that counts as a spike."""
    z_outlier: float = 6.0
    """Upward z-score of a group's outlier ratio that marks the group as carrying trouble."""
    warmup_grad_factor: float = 100.0
    """During warm-up, skip a step whose grad norm exceeds this multiple of the largest seen."""
    outlier_factor: float = 10.0
    """Per-element outlier bound k: |g| > k * sqrt(v_hat_prev). A Gaussian gradient crosses
    10 sigma essentially never, while a 30x..1e6x spike flags nearly every element."""

    # --- LR scale (AIMD) and the predictive bound -------------------------------------
    min_scale: float = 0.1
    decrease_factor: float = 0.5
    """Multiplicative decrease per trouble record (and after a rollback)."""
    hold_steps: int = 5
    """Clean records after trouble before the scale starts to recover."""
    recovery_rate: float = 0.05
    """Additive recovery of the scale per clean record (0.5 -> 1 in 10 records)."""
    max_scale_increase: float = 0.05
    """Largest increase of the issued scale from one step to the next."""
    max_update_ratio: float | None = 0.2
    """Predictive bound: cap scale so lr * scale * c / rms(theta) stays below this per group
    (c = last measured normalised-update RMS, 1 before any). None turns the bound off."""
    min_param_rms: float = 1e-2
    """rms(theta) used by the predictive bound is at least this (zero-initialised groups)."""

    # --- trust region: is the commanded step size still making progress? -------------
    trust_region: bool = True
    """Hold the scale down while the commanded learning rate is too high (needs step(loss=...)).
    The trust ratio rho = (slope of the loss over a window) / (mean predicted change g.u) is
    about 1 - eta / (2 eta*) on a quadratic: ~0.5 at the best step size, < 0 past twice it.
    A ceiling on the scale is set where a predictive cap binds (the commanded step is outside
    the envelope) and is raised only while rho is confidently above ``trust_high``; it is cut
    by ``decrease_factor`` while rho is confidently below ``trust_low``. Without evidence
    (minibatch noise hides the trend) it holds. Runs without loss telemetry: no ceiling."""
    trust_window: int = 32
    """Records in the sliding window of (loss, g.u) the trust ratio is estimated over."""
    trust_min_records: int = 16
    """Records at the current ceiling needed before it may move again."""
    trust_z_raise: float = 2.0
    """One-sided confidence (standard errors of the loss slope) a raise needs."""
    trust_z_cut: float = 3.5
    """One-sided confidence a cut needs: stricter, because the test slides over every record
    and a converged run sits at rho ~ 0 (its loss flat, its g.u mostly minibatch noise)."""
    trust_low: float = 0.0
    """Cut the ceiling while rho's upper confidence bound is below this (loss not falling)."""
    trust_high: float = 0.5
    """Raise the ceiling while rho's lower confidence bound is above this: on a quadratic,
    rho > 1/2 means the step is below the best step size, so a larger one is warranted."""
    trust_increase: float = 1.5
    """Multiplicative raise of the ceiling per decision (issuance still obeys max_scale_increase)."""

    # --- regimes ----------------------------------------------------------------------
    calm_steps: int = 10
    """Clean records at full scale before recovering becomes stable again."""
    diverge_spikes: int = 3
    """Trouble records within ``diverge_window`` records that mean divergence."""
    diverge_window: int = 10
    max_consecutive_skips: int = 5
    """Consecutive trouble records after which the guard rolls back or, if it cannot,
    re-baselines its statistics (a lasting level change must not stall the run)."""

    # --- snapshots and rollback -------------------------------------------------------
    snapshot_interval: int = 10
    snapshot_ring: int = 2
    max_rollback_distance: int = 50
    max_rollbacks: int = 3
    """Rollbacks allowed per ``rollback_window`` steps."""
    rollback_window: int = 500

    # --- freezing ---------------------------------------------------------------------
    freeze_steps: int = 20
    max_frozen_fraction: float = 0.25
    """Largest fraction of all parameters (by element count) frozen at once."""

    # --- plumbing ---------------------------------------------------------------------
    lag: int = 1
    """Records are processed this many steps after they were produced (same on CPU and GPU)."""
    trace_path: str | None = None
    """If set, every processed record and event is appended to this JSONL file."""
    keep_trace: bool = False
    """Keep processed records in memory for ``Guard.write_jsonl``."""

    def __post_init__(self) -> None:
        errors = _validate(self)
        if errors:
            raise ValueError("invalid GuardConfig: " + "; ".join(errors))

    @property
    def acts(self) -> bool:
        return self.mode == "act"

    def replace(self, **changes: Any) -> "GuardConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "GuardConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GuardConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "GuardConfig":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def _validate(c: GuardConfig) -> list[str]:
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def number(name: str) -> float:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{name} must be a finite number, got {value!r}")
            return float("nan")
        return float(value)

    def integer(name: str, low: int) -> int:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{name} must be an int, got {value!r}")
            return low
        check(value >= low, f"{name} must be >= {low}, got {value}")
        return value

    check(c.mode in MODES, f"mode must be one of {MODES}, got {c.mode!r}")
    integer("warmup_steps", 1)
    for name in ("hold_steps", "freeze_steps", "lag"):
        integer(name, 0)
    integer("trust_window", 3)
    integer("trust_min_records", 3)
    check(isinstance(c.trust_region, bool), f"trust_region must be a bool, got {c.trust_region!r}")
    for name in ("calm_steps", "diverge_spikes", "diverge_window", "max_consecutive_skips",
                 "snapshot_interval", "snapshot_ring", "max_rollback_distance", "rollback_window"):
        integer(name, 1)
    integer("max_rollbacks", 0)

    beta = number("ema_beta")
    check(0.0 < beta < 1.0, f"ema_beta must be in (0, 1), got {c.ema_beta}")
    for name in ("winsor_z", "min_log_std", "min_grad_log_std", "min_loss_rel_std", "min_outlier_std",
                 "z_grad", "z_loss", "z_update", "z_outlier", "outlier_factor", "min_param_rms"):
        value = number(name)
        check(not value <= 0.0, f"{name} must be > 0, got {getattr(c, name)}")
    check(not number("warmup_grad_factor") <= 1.0, f"warmup_grad_factor must be > 1, got {c.warmup_grad_factor}")

    floor = number("min_scale")
    check(0.0 < floor <= 1.0, f"min_scale must be in (0, 1], got {c.min_scale}")
    dec = number("decrease_factor")
    check(0.0 < dec < 1.0, f"decrease_factor must be in (0, 1), got {c.decrease_factor}")
    rec = number("recovery_rate")
    check(0.0 < rec <= 1.0, f"recovery_rate must be in (0, 1], got {c.recovery_rate}")
    inc = number("max_scale_increase")
    check(0.0 < inc <= 1.0, f"max_scale_increase must be in (0, 1], got {c.max_scale_increase}")
    if math.isfinite(rec) and math.isfinite(inc):
        check(rec <= inc, f"recovery_rate ({rec}) cannot exceed max_scale_increase ({inc}): "
                          "the scale would recover faster than it may move")
    if c.max_update_ratio is not None:
        ratio = number("max_update_ratio")
        check(not ratio <= 0.0, f"max_update_ratio must be > 0 or None, got {c.max_update_ratio}")

    for name in ("trust_z_raise", "trust_z_cut"):
        check(not number(name) < 0.0, f"{name} must be >= 0, got {getattr(c, name)}")
    low, high = number("trust_low"), number("trust_high")
    check(not low >= high, f"trust_low ({c.trust_low}) must be below trust_high ({c.trust_high})")
    check(not number("trust_increase") <= 1.0, f"trust_increase must be > 1, got {c.trust_increase}")

    frac = number("max_frozen_fraction")
    check(0.0 <= frac < 1.0, f"max_frozen_fraction must be in [0, 1), got {c.max_frozen_fraction}")

    if not errors:
        check(c.snapshot_interval <= c.max_rollback_distance,
              f"snapshot_interval ({c.snapshot_interval}) > max_rollback_distance "
              f"({c.max_rollback_distance}): no snapshot would ever be close enough to roll back to")
        check(c.trust_min_records <= c.trust_window,
              f"trust_min_records ({c.trust_min_records}) > trust_window ({c.trust_window})")
        check(c.diverge_spikes <= c.diverge_window,
              f"diverge_spikes ({c.diverge_spikes}) > diverge_window ({c.diverge_window}): "
              "divergence could never be detected")
        check(c.max_rollbacks == 0 or c.rollback_window >= c.snapshot_interval,
              "rollback_window must be at least snapshot_interval")
    if c.trace_path is not None and not isinstance(c.trace_path, str):
        errors.append(f"trace_path must be a str or None, got {c.trace_path!r}")
    return errors


PRESETS: dict[str, GuardConfig] = {
    # Act within the default envelope.
    "default": GuardConfig(),
    # Observe, classify and log what would be done; never touch the run.
    "monitor": GuardConfig(mode="monitor"),
    # Fewer, later interventions: for runs whose telemetry is noisy by nature.
    "conservative": GuardConfig(z_grad=8.0, z_loss=8.0, z_update=8.0, z_outlier=8.0, max_update_ratio=0.1),
}


def preset(name: str) -> GuardConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown guard preset {name!r}; choose one of {sorted(PRESETS)}") from None
