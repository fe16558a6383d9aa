"""FusedGuardedAdamW: a drop-in AdamW whose fused step also reduces training telemetry.

One step, as data flows (DESIGN §2):

1. the guard (if any) hands over this step's control tensors: per-group LR scale and gate,
   grad-norm and loss limits, all on the device;
2. optionally a gradient pre-pass (one read of the grads) gives the global grad norm, for
   ``max_grad_norm`` clipping and for the device-side skip of non-finite or spiking steps;
3. the backend's fused kernel updates p, m, v in one pass and reduces per-group telemetry;
4. the guard receives the telemetry record, still on the device, and acts on it later.

No step of this reads a device value on the host; the guard reads each record one step
later, so the host runs at most about one step ahead of the GPU, never stalling on the step
it just launched.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lbw_kernels import contract as C
from lbw_kernels.backends import BACKEND_NAMES, BackendUnavailable, auto_order, load_backend

from . import distributed, validation
from .control import StepRecord
from .guard.config import GuardConfig
from .telemetry import Telemetry

logger = logging.getLogger("lbw_guard")

# Dtypes the fused kernels handle; anything else (e.g. float64) runs on the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _resolve_guard(guard: Any):
    if guard is None:
        return None
    from .guard import make_guard  # the control plane is imported only when used

    return make_guard(guard)


class FusedGuardedAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, fused telemetry and an optional training guard.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; per group if given there.
        guard: ``"default"``, ``"monitor"`` (another preset name), a ``GuardConfig``, a
            ``Guard``, or ``None`` to run the optimizer alone (then it equals AdamW).
        backend: ``"auto"``, ``"torch"`` (reference), ``"triton"``, ``"cpu"`` or ``"cuda"``.
            A backend that cannot run here warns and falls back to the next one.
        max_grad_norm: global-norm clipping fused into the step (``clip_grad_norm_``
            semantics) or ``None``. A step whose gradient norm is not finite is skipped.
        capturable: kept for state-dict compatibility with ``torch.optim.AdamW``; step
            counters and hyperparameters always live on the parameters' device.

    Moments are kept in fp32 whatever the parameter dtype. ``opt.telemetry`` holds the
    last step's :class:`~lbw_guard.telemetry.Telemetry`.
    """

    # torch.amp.GradScaler then hands us grad_scale/found_inf device tensors instead of
    # unscaling the grads itself and skipping step() after reading found_inf on the host.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        guard: Any = "default",
        backend: str = "auto",
        max_grad_norm: float | None = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=capturable)
        validation.check_hyperparameters(defaults, "FusedGuardedAdamW")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKEND_NAMES}")
        self.requested_backend = backend
        self.max_grad_norm = validation.check_max_grad_norm(max_grad_norm)
        self._backends: dict[tuple[torch.device, torch.dtype], tuple[str, Callable]] = {}
        self._device_cache: OrderedDict[Any, Tensor] = OrderedDict()
        self._hyper_key: tuple | None = None
        self._hyper: Tensor | None = None
        self._guard = None
        self.telemetry: Telemetry | None = None
        self.applied_gate: Tensor | None = None
        self.num_steps = 0
        self._shard_group = None
        self._pending_loss: Tensor | None = None
        super().__init__(params, defaults)
        self._guard = _resolve_guard(guard)
        if self._guard is not None:
            self._guard.bind(self)

    # ------------------------------------------------------------------ set-up
    @property
    def guard(self):
        """The attached guard, or None when the optimizer runs alone."""
        return self._guard

    @property
    def backend_name(self) -> str:
        """The backend the first parameter's bucket runs on."""
        for group in self.param_groups:
            for p in group["params"]:
                return self._backend_for(p.device, p.dtype)[0]
        return "torch"

    def add_param_group(self, param_group: dict) -> None:
        where = f"param group {len(self.param_groups)}"
        params = param_group["params"]
        if not isinstance(params, set):  # torch itself refuses sets (their order is random)
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group["params"] = params
            validation.check_params(params, where)
        merged = {**self.defaults, **param_group}
        validation.check_hyperparameters(merged, where)
        super().add_param_group(param_group)
        for p in params:
            self._backend_for(p.device, p.dtype)
        self._hyper_key = None
        if self._guard is not None:
            self._guard.bind(self)

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
        key = (device, dtype)
        if key not in self._backends:
            self._backends[key] = self._pick_backend(device, dtype)
        return self._backends[key]

    def _pick_backend(self, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
        order = auto_order(device.type)  # always ends with the reference, "torch"
        if self.requested_backend != "auto":
            order = (self.requested_backend,) + tuple(n for n in order if n != self.requested_backend)
        reasons = []
        for name in order:
            if name != "torch" and dtype not in KERNEL_DTYPES:
                reasons.append(f"{name}: no kernel for {dtype}")
                continue
            try:
                fn = load_backend(name, device)
            except BackendUnavailable as exc:
                reasons.append(str(exc))
                continue
            if reasons and self.requested_backend != "auto":
                warnings.warn(
                    f"FusedGuardedAdamW: backend={self.requested_backend!r} is unavailable "
                    f"({'; '.join(reasons)}); falling back to backend={name!r}",
                    stacklevel=4,
                )
            logger.info("FusedGuardedAdamW: %s %s parameters use backend=%r", device, dtype, name)
            return name, fn
        raise RuntimeError("no backend available: " + "; ".join(reasons))  # torch never fails

    # ------------------------------------------------------------------ state
    @staticmethod
    def _init_state(p: Tensor) -> dict:
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format),
        }

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["num_steps"] = self.num_steps  # the guard numbers its records, events and snapshots by it
        if self._guard is not None:
            sd["guard"] = self._guard.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load our own or a ``torch.optim.AdamW`` state dict (same per-parameter keys)."""
        state_dict = dict(state_dict)
        guard_state = state_dict.pop("guard", None)
        num_steps = state_dict.pop("num_steps", None)
        for i, group in enumerate(state_dict["param_groups"]):
            validation.check_hyperparameters({**self.defaults, **group}, f"loaded param group {i}")
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        # torch casts loaded states to the parameter dtype; ours stay fp32 on the device,
        # so take them from the saved values again rather than from the cast copies.
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = {
                "step": torch.as_tensor(saved["step"]).detach().to(p.device, torch.float32, copy=True).reshape(()),
                "exp_avg": saved["exp_avg"].detach().to(p.device, torch.float32, copy=True),
                "exp_avg_sq": saved["exp_avg_sq"].detach().to(p.device, torch.float32, copy=True),
            }
            self.state[p] = state
        self._hyper_key = None
        if num_steps is None:  # a torch.optim.AdamW state dict: continue from its step counts
            steps = [float(st["step"]) for st in self.state.values() if "step" in st]
            num_steps = int(max(steps, default=0))
        self.num_steps = int(num_steps)
        if self._guard is not None:
            self._guard.bind(self)
            if guard_state is not None:
                self._guard.load_state_dict(guard_state)

    # ------------------------------------------------------------------ device scalars
    def _cached(self, key: tuple, build: Callable[[], Tensor]) -> Tensor:
        """Small device tensors built once from host values (group ids, element counts,
        constants): a host-to-device copy only when a new grad-presence pattern shows up.
        Least recently used entries go, so the cache stays small."""
        if key in self._device_cache:
            self._device_cache.move_to_end(key)
        else:
            self._device_cache[key] = build()
            if len(self._device_cache) > _DEVICE_CACHE_SIZE:
                self._device_cache.popitem(last=False)
        return self._device_cache[key]

    def _hyperparameters(self, device: torch.device) -> Tensor:
        """[5, G] float64 on device: lr, beta1, beta2, eps, weight_decay per group.

        Rebuilt only when a value changes (a scheduler changes lr every step); the host
        values travel through pinned memory so the copy never blocks the host.
        """
        groups = self.param_groups
        on_device = [isinstance(g["lr"], Tensor) and g["lr"].device.type != "cpu" for g in groups]
        host = self._hyperparameters_from_host([0.0 if d else float(g["lr"]) for g, d in zip(groups, on_device)], device)
        if not any(on_device):
            return host
        # An lr tensor on the accelerator is used where it is, never read back.
        lrs = torch.stack([
            g["lr"].to(device, torch.float64).reshape(()) if d else host[0, i] for i, (g, d) in enumerate(zip(groups, on_device))
        ])
        return torch.cat([lrs[None], host[1:]])

    def _hyperparameters_from_host(self, lrs: list[float], device: torch.device) -> Tensor:
        groups = self.param_groups
        rows = (
            lrs,
            [float(g["betas"][0]) for g in groups],
            [float(g["betas"][1]) for g in groups],
            [float(g["eps"]) for g in groups],
            [float(g["weight_decay"]) for g in groups],
        )
        key = (device, tuple(map(tuple, rows)))
        if key != self._hyper_key:
            host = torch.tensor(rows, dtype=torch.float64)
            if device.type == "cuda":
                host = host.pin_memory()
            self._hyper = host.to(device, non_blocking=True)
            self._hyper_key = key
        return self._hyper

    # ------------------------------------------------------------------ step
    def record_loss(self, loss: Tensor | float) -> None:
        """Give the next ``step()`` its loss telemetry when the caller of ``step()`` cannot
        (a wrapper such as Accelerate's or the HF Trainer calls ``step()`` without it).
        Under gradient accumulation, call it with the accumulated loss once per step."""
        self._pending_loss = loss.detach() if isinstance(loss, Tensor) else loss

    def _collect(self) -> dict[tuple[torch.device, torch.dtype], dict[str, list]]:
        """Buckets of (device, dtype) with their tensor lists; validates before any change."""
        index = 0
        found = []
        for gid, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    validation.check_grad(p, index)
                    found.append((gid, p))
                index += 1
        buckets: dict[tuple[torch.device, torch.dtype], dict[str, list]] = {}
        for gid, p in found:
            state = self.state[p]
            if len(state) == 0:
                state.update(self._init_state(p))
            b = buckets.setdefault(
                (p.device, p.dtype),
                {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "steps": [], "group_ids": []},
            )
            # Kernels work on rank-local storage (FSDP2 parameters are DTensors).
            b["params"].append(distributed.local_tensor(p))
            b["grads"].append(distributed.local_tensor(p.grad))
            b["exp_avgs"].append(distributed.local_tensor(state["exp_avg"]))
            b["exp_avg_sqs"].append(distributed.local_tensor(state["exp_avg_sq"]))
            b["steps"].append(state["step"])
            b["group_ids"].append(gid)
        self._shard_group = distributed.shard_group([p for _, p in found])
        return buckets

    def _group_ids_tensor(self, group_ids: list[int], device: torch.device) -> Tensor:
        return self._cached(("gid", device, tuple(group_ids)), lambda: torch.tensor(group_ids).to(device))

    def _numel_column(self, buckets: dict, num_groups: int, device: torch.device) -> Tensor:
        counts = [0] * num_groups
        for bucket in buckets.values():
            for p, gid in zip(bucket["params"], bucket["group_ids"]):
                counts[gid] += p.numel()
        return self._cached(
            ("numel", device, tuple(counts)), lambda: torch.tensor(counts, dtype=torch.float64).to(device)
        )

    def _global_grad_norm(self, buckets: dict, device: torch.device) -> Tensor:
        """One read of every gradient: the global L2 norm as a float64 device scalar."""
        sums = []
        for (_, dtype), bucket in buckets.items():
            # bf16 norms accumulate in fp32 and share fp32's range, and the native kernel is
            # ~5x faster on the CPU than an fp32 output; fp16 norms could overflow at 65504.
            out_dtype = None if dtype == torch.bfloat16 else torch.float32
            norms = torch._foreach_norm(bucket["grads"], 2, dtype=out_dtype)
            sums.append(torch.stack(norms).to(device, torch.float64).square().sum())
        total_sq = distributed.sum_over_group(torch.stack(sums).sum(), self._shard_group)
        return total_sq.sqrt()

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, loss: Tensor | float | None = None):
        """One AdamW step. ``loss`` (or the closure's result) becomes guard telemetry.

        Under ``torch.amp.GradScaler`` the scaler sets ``grad_scale`` and ``found_inf``
        device tensors on the optimizer; gradients are unscaled inside the kernel and a
        step with ``found_inf`` is skipped on the device, as torch's fused AdamW does.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if loss is None:
            loss = closure_loss if closure_loss is not None else self._pending_loss
        self._pending_loss = None

        buckets = self._collect()
        if not buckets:
            return closure_loss
        self.num_steps += 1
        num_groups = len(self.param_groups)
        device = next(iter(buckets))[0]

        control = self._guard.before_step(self.num_steps) if self._guard is not None else None
        one = self._cached(("one", device), lambda: torch.ones((), device=device))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_grad_scale = one if grad_scale is None else grad_scale.to(device, torch.float32).reciprocal()

        ok = None  # device-side "this step may proceed"
        clip_coef = one
        if self.max_grad_norm is not None or (control is not None and control.precheck):
            grad_norm = self._global_grad_norm(buckets, device) * inv_grad_scale.double()
            ok = torch.isfinite(grad_norm)
            if control is not None and control.precheck:
                ok = ok & (grad_norm <= control.grad_norm_limit)
            if self.max_grad_norm is not None:
                coef = (self.max_grad_norm / (grad_norm.float() + 1e-6)).clamp(max=1.0)
                clip_coef = torch.where(ok, coef, one)
        loss_t = None
        if loss is not None:
            # Each rank saw its own micro-batch: decide on the mean so all ranks agree.
            loss_t = self._loss_tensor(loss, device)
            if self._guard is not None:
                loss_t = distributed.mean_over_ranks(loss_t)
            if control is not None:
                loss_ok = torch.isfinite(loss_t) & (loss_t.double() <= control.loss_limit)
                ok = loss_ok if ok is None else ok & loss_ok
        if found_inf is not None:
            no_inf = found_inf.to(device).reshape(()) == 0
            ok = no_inf if ok is None else ok & no_inf

        if control is not None:
            gate = control.gate
        else:
            gate = self._cached(("ones", num_groups, device), lambda: torch.ones(num_groups, dtype=torch.float64, device=device))
        # A fresh tensor: the guard rewrites its control buffer in place on later steps.
        applied_gate = gate.clone() if ok is None else gate * ok.to(torch.float64)
        hyper = self._hyperparameters(device)
        lr_eff = hyper[0] * (control.scale if control is not None else 1.0)

        partials = []
        for (bdev, dtype), b in buckets.items():
            name, fn = self._backend_for(bdev, dtype)
            gids = self._group_ids_tensor(b["group_ids"], bdev)
            bgate = applied_gate.to(bdev)
            C.advance_steps(b["steps"], b["group_ids"], bgate)
            h = hyper.to(bdev)
            coeffs = C.coefficient_table(
                b["steps"], gids, lr_eff.to(bdev), h[1], h[2], h[3], h[4], bgate, self._outlier_factor()
            )
            partials.append(
                fn(
                    b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], coeffs, b["group_ids"],
                    num_groups, inv_grad_scale.to(bdev), clip_coef.to(bdev),
                ).to(device)
            )
        reduced = partials[0] if len(partials) == 1 else torch.stack(partials).sum(0)
        values = torch.cat([reduced, self._numel_column(buckets, num_groups, device)[:, None]], dim=1)
        distributed.sum_over_group(values, self._shard_group)  # shard partials -> global values
        self.telemetry = Telemetry(values)
        self.applied_gate = applied_gate

        if self._guard is not None:
            self._guard.after_step(
                StepRecord(
                    step=self.num_steps,
                    telemetry=values,
                    applied_gate=applied_gate,
                    loss=loss_t,
                    lrs=self._host_lrs(),
                )
            )
        return closure_loss

    @staticmethod
    def _loss_tensor(loss: Tensor | float, device: torch.device) -> Tensor:
        """The loss as a 0-d tensor on ``device``; a host value travels through pinned memory
        so the copy never blocks."""
        if isinstance(loss, Tensor) and loss.device == device:
            return loss.detach().reshape(())
        host = torch.as_tensor(loss).detach().reshape(())
        if device.type == "cuda" and host.device.type == "cpu":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def _host_lrs(self) -> list[float]:
        """Scheduler lrs as host floats for the guard. A tensor lr on an accelerator is
        reported as NaN rather than read back (that would synchronise); the guard's
        predictive bound is then off for that group."""
        out = []
        for g in self.param_groups:
            lr = g["lr"]
            on_host = not isinstance(lr, Tensor) or lr.device.type == "cpu"
            out.append(float(lr) if on_host else float("nan"))
        return out

    def _outlier_factor(self) -> float:
        if self._guard is not None:
            return float(self._guard.config.outlier_factor)
        return _DEFAULT_OUTLIER_FACTOR


_DEVICE_CACHE_SIZE = 64
# Telemetry without a guard counts outliers with the guard's default factor.
_DEFAULT_OUTLIER_FACTOR = GuardConfig.outlier_factor
