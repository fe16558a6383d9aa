"""Synthetic telemetry for guard tests: flat records built from the contract's layout, and a
small driver that feeds a :class:`Controller` the way ``Guard`` does (command, then the record
of ``lag`` steps ago, then snapshots), without a model or a device.

Every value has a plausible healthy default, so a test names only what it changes::

    rec = make_record(7, grad_sq=1e6)                    # a gradient spike at step 7
    rec = make_record(7, loss=math.nan)                  # a non-finite loss
    rec = make_record(7, groups=2, nonfinite=[0, 3])     # non-finite grads in group 1 only
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lbw_kernels import contract as C
from lbw_guard.guard import Controller, GuardConfig, HostRecord

NUMEL = 1000.0


def _per_group(value, groups: int) -> list:
    if isinstance(value, (list, tuple)):
        assert len(value) == groups, f"expected {groups} per-group values, got {value!r}"
        return list(value)
    return [value] * groups


def make_record(step: int, *, groups: int = 1, grad_sq=1.0, param_sq=100.0, numel=NUMEL, spikes=0.0,
                nonfinite=0.0, omega=1.0, cos=0.0, ratio=None, gdu=-1e-3, gdp=0.0, update_sq=1e-6,
                applied=None, invalid=None, loss: float | None = 2.0, step_ok: float = 1.0,
                lrs=1e-3, scale=1.0, gate=1.0, now: int | None = None,
                grad_norm: float | None = None, matrices: int = 2, beta1=0.9, recent=None) -> HostRecord:
    """One host record. Per-group arguments take a scalar (every group) or a list.

    ``omega``/``cos``/``ratio``: the group's mean omega (geometric), mean cos and RMS update
    ratio over ``matrices`` matrices; None leaves the signal undefined (count 0).
    ``recent``: omega_recent, what the momentum energy (``moment1_sq``) reads against the
    white-noise energy of ``grad_sq`` held steady; None: equal to omega (steady gradients make
    the two agree), 1 without an omega. ``beta1``: the group's beta1 (None: unknown).
    ``gdu``/``gdp``: grad_dot_update and grad_dot_prev (the governor's secant estimate).
    ``applied`` defaults to the issued gate (the device wrote what the guard let through).
    ``loss=None`` means no loss was given (``has_loss`` False).
    """
    G = groups
    layout = C.record_layout(G)
    values = [0.0] * layout.size
    per = {name: _per_group(v, G) for name, v in dict(
        grad_sq=grad_sq, param_sq=param_sq, numel=numel, spikes=spikes, nonfinite=nonfinite, omega=omega,
        cos=cos, ratio=ratio, gdu=gdu, gdp=gdp, update_sq=update_sq, invalid=invalid, lrs=lrs, scale=scale,
        gate=gate, beta1=beta1, recent=recent).items()}
    if invalid is None:  # the kernel's check of the group's coefficients
        per["invalid"] = [0.0 if math.isfinite(lr * s) and lr * s >= 0 else 1.0
                          for lr, s in zip(per["lrs"], per["scale"])]
    applied = [a if not i else 0.0 for a, i in zip(per["gate"], per["invalid"])] if applied is None \
        else _per_group(applied, G)
    for g in range(G):
        row = [0.0] * C.NUM_GROUP_FIELDS
        row[C.T_GRAD_SQ] = per["grad_sq"][g]
        row[C.T_UPDATE_SQ] = per["update_sq"][g]
        row[C.T_PARAM_SQ] = per["param_sq"][g]
        row[C.T_GRAD_DOT_UPDATE] = per["gdu"][g]
        row[C.T_GRAD_DOT_PREV] = per["gdp"][g]
        row[C.T_PREV_SQ] = 1.0
        b1 = per["beta1"][g] if per["beta1"][g] is not None else 0.9
        recent_g = per["recent"][g] if per["recent"][g] is not None else (per["omega"][g] or 1.0)
        row[C.T_MOMENT1_SQ] = recent_g * (1.0 - b1) ** 2 * per["grad_sq"][g] / (1.0 - b1 * b1)
        row[C.T_MOMENT2_SUM] = 1.0
        row[C.T_SPIKES] = per["spikes"][g]
        row[C.T_NONFINITE] = per["nonfinite"][g]
        row[C.T_NUMEL] = per["numel"][g]
        row[C.G_MATRIX_NUMEL] = per["numel"][g]
        if per["omega"][g] is not None:
            row[C.G_OMEGA_LOG_SUM] = matrices * math.log(per["omega"][g])
            row[C.G_OMEGA_COUNT] = matrices
        if per["cos"][g] is not None:
            row[C.G_COS_SUM] = matrices * per["cos"][g]
            row[C.G_COS_COUNT] = matrices
        if per["ratio"][g] is not None:
            row[C.G_RATIO_SQ_SUM] = matrices * per["ratio"][g] ** 2
            row[C.G_RATIO_COUNT] = matrices
        values[g * C.NUM_GROUP_FIELDS:(g + 1) * C.NUM_GROUP_FIELDS] = row
    values[layout.applied_gate] = [float(a) for a in applied]
    values[layout.invalid] = [float(i) for i in per["invalid"]]
    glob = [0.0] * C.NUM_GLOBAL_FIELDS
    glob[C.R_LOSS] = math.nan if loss is None else float(loss)
    glob[C.R_STEP_OK] = step_ok
    values[layout.globals] = glob
    return HostRecord(step=step, record=values, num_groups=G, lrs=[float(x) for x in per["lrs"]],
                      scale=[float(x) for x in per["scale"]], gate=[float(x) for x in per["gate"]],
                      has_loss=loss is not None, grad_norm=grad_norm, now=now,
                      beta1=None if beta1 is None else [float(b) if b is not None else math.nan for b in per["beta1"]])


def healthy(step: int, rng=None, **kw) -> dict:
    """Keyword arguments of a healthy record with a little noise (deterministic without rng)."""
    jitter = (lambda s: 1.0 + s * (rng.random() - 0.5)) if rng is not None else (lambda s: 1.0)
    out = dict(grad_sq=1.0 * jitter(0.4), loss=2.0 * jitter(0.02))
    out.update(kw)
    return out


def device_applied(cmd, kw: dict, loss_check: bool = True) -> list[float]:
    """The applied gates the kernel would report for record arguments ``kw`` under ``cmd``: a
    gated-off group is not written; a loss over the limit (or not finite) or a failed step-wide
    check skips every group; an invalid group (NaN lr, ...) is not written."""
    groups = kw["groups"]
    gate = _per_group(kw.get("gate", 1.0), groups)
    invalid = _per_group(kw.get("invalid") or 0.0, groups)
    lrs = _per_group(kw.get("lrs", 1e-3), groups)
    scale = _per_group(kw.get("scale", 1.0), groups)
    applied = [1.0 if g > 0 and not i > 0 and math.isfinite(lr * s) and lr * s >= 0 else 0.0
               for g, i, lr, s in zip(gate, invalid, lrs, scale)]
    loss = kw.get("loss", 2.0)
    if loss_check and cmd.check_loss and loss is not None and not (math.isfinite(loss) and loss <= cmd.loss_limit):
        applied = [0.0] * groups
    if kw.get("step_ok", 1.0) <= 0:
        applied = [0.0] * groups
    return applied


@dataclass
class Sim:
    """Drive a Controller like ``Guard`` does with ``lag``: before step ``n`` the command for
    ``n``; after it the record of step ``n - lag`` (``now = n``); then, optionally, a snapshot.

    ``spec(step, command)`` returns the keyword arguments of ``make_record`` for that step (the
    scale and gate default to the command's). The device side is simulated: a gated-off group
    is not written (``applied`` 0), and with ``device_loss_check`` a loss over the command's
    limit (or not finite) skips the whole step, as the kernel does.
    """

    config: GuardConfig
    groups: int = 1
    lag: int = 1
    snapshot_every: int | None = None
    device_loss_check: bool = True
    controller: Controller = None
    step: int = 0
    pending: list = field(default_factory=list)
    decisions: list = field(default_factory=list)  # (now, record step, decision)
    commands: dict = field(default_factory=dict)
    snapshots: list = field(default_factory=list)

    def __post_init__(self):
        if self.controller is None:
            self.controller = Controller(self.config, self.groups)

    @property
    def events(self):
        return list(self.controller.events)

    def run(self, steps: int, spec, lrs=None, stop_on_give_up: bool = False):
        for _ in range(steps):
            self.advance(spec, lrs)
            if stop_on_give_up and self.decisions and self.decisions[-1][2]["give_up"] is not None:
                break
        return self

    def advance(self, spec, lrs=None):
        self.step += 1
        n = self.step
        lr = lrs(n) if callable(lrs) else (lrs if lrs is not None else [1e-3] * self.groups)
        lr = list(lr) if isinstance(lr, (list, tuple)) else [lr] * self.groups
        cmd = self.controller.command(n, lr)
        self.commands[n] = cmd
        kw = dict(spec(n, cmd) or {})
        kw.setdefault("groups", self.groups)
        kw.setdefault("lrs", lr)
        kw.setdefault("scale", list(cmd.scale))
        kw.setdefault("gate", list(cmd.gate))
        if "applied" not in kw:
            kw["applied"] = device_applied(cmd, kw, self.device_loss_check)
        self.pending.append(make_record(n, **kw))
        while len(self.pending) > self.lag:
            rec = self.pending.pop(0)
            rec.now = n
            decision = self.controller.observe(rec, n)
            self.decisions.append((n, rec.step, decision))
            if decision["rollback_to"] is not None:
                self.pending.clear()
                break
        if self.snapshot_every and n % self.snapshot_every == 0 and self.controller.regime == "stable" \
                and not self.controller.recovery.consecutive_trouble and not self.controller.recovery.pending_snapshots:
            self.controller.snapshot_taken(n)
            self.snapshots.append(n)
        return self


def actions(events, *names) -> list[tuple]:
    """(step, action) of the events, optionally only those with one of ``names``."""
    return [(e.step, e.action) for e in events if not names or e.action in names]


class GuardDriver:
    """A real ``Guard`` on a real ``FusedGuardedAdamW`` (one small matrix per group), fed
    synthetic records through ``before_step``/``after_step`` instead of kernel output: the glue
    (lag, snapshots, rollbacks, give-up, traces) without a model. Rollbacks restore the real
    tensors; the records say what the test wants them to say."""

    def __init__(self, config: GuardConfig, groups: int = 1, on_give_up=None, lr: float = 1e-3, seed: int = 0):
        import torch

        from lbw_guard.guard import Guard
        from lbw_guard.optimizer import FusedGuardedAdamW

        self.torch = torch
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(4, 4, generator=gen)) for _ in range(groups)]
        self.groups = groups
        self.guard = Guard(config, on_give_up=on_give_up)
        self.opt = FusedGuardedAdamW([{"params": [p]} for p in self.params], lr=lr, guard=self.guard,
                                     backend="torch")
        self.commands: dict = {}

    @property
    def controller(self) -> Controller:
        return self.guard.controller

    def step(self, lrs=None, edit=None, **kw):
        """One optimizer step as the guard sees it; returns the command it issued. ``edit``
        may change the HostRecord before it is sent (garbage, out-of-contract values)."""
        from lbw_guard.control import StepRecord

        torch = self.torch
        if lrs is not None:
            for group, lr in zip(self.opt.param_groups, lrs):
                group["lr"] = lr
        self.opt.num_steps += 1
        n = self.opt.num_steps
        cmd = self.guard.before_step(n)
        self.commands[n] = cmd
        kw.setdefault("groups", self.groups)
        kw.setdefault("lrs", self.opt._host_lrs())
        kw.setdefault("scale", list(cmd.scale))
        kw.setdefault("gate", list(cmd.gate))
        if "applied" not in kw:
            kw["applied"] = device_applied(cmd, kw)
        rec = make_record(n, **kw)
        if edit is not None:
            edit(rec)
        self.guard.after_step(StepRecord(step=n, record=torch.tensor(rec.record, dtype=torch.float64),
                                         lrs=list(rec.lrs), has_loss=rec.has_loss))
        return cmd


TUNING = dict(
    mode="act", warmup_steps=5, ema_beta=0.97, winsor_z=3.0, min_grad_log_std=0.2, min_loss_rel_std=0.02,
    z_grad=6.0, z_loss=6.0, spike_fraction=0.05, warmup_grad_factor=100.0, level_shift_records=2,
    rescale_tolerance=0.5, lr_spike_factor=10.0,
    spike_k=10.0, spike_warmup=0, clamp_spikes=True, loss_check=True, same_step_grad_skip=False,
    governor="evidence", min_scale=0.1, max_update_ratio=None,
    early_records=20, omega_low=0.35, omega_high=0.6, omega_recent_max=1.0, omega_worsening=0.7,
    omega_window=8, efficiency_records=12, efficiency_window=6, efficiency_low=0.15, efficiency_min_drop=0.3,
    efficiency_large_drop=None, efficiency_grad_rise=3.0,
    min_evidence=3, cut_factor=0.6, cut_interval=4, recovery_rate=0.02, release_drop=0.5, release_loss_z=1.0,
    max_scale_increase=0.05,
    snapshots=True, snapshot_interval=5, snapshot_budget=0.02, snapshot_ring=2, snapshot_device="cpu",
    max_rollback_distance=50, max_rollbacks=3, rollback_window=500, rollback_scale=0.5, start_rise=0.2,
    start_rise_records=10, start_rise_grad=None,
    overshoot_restart=False, restart_cut=0.3,
    freeze_steps=20,
    max_frozen_fraction=0.25, give_up_after=25, event_capacity=1000, lag=1, keep_trace=0,
)


def explicit_config(**changes) -> GuardConfig:
    """A GuardConfig with every tuning field spelled out (tests must not depend on the
    defaults, which are still being calibrated), plus ``changes``. Fields this version of
    GuardConfig does not have are left out, so the helper survives the calibration work."""
    from dataclasses import fields

    known = {f.name for f in fields(GuardConfig)}
    return GuardConfig(**{k: v for k, v in {**TUNING, **changes}.items() if k in known or k in changes})


def same(a, b) -> bool:
    """Deep equality with NaN equal to NaN (dict order aside): for states and logs that went
    through pickle, where NaN objects are no longer identical."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b
