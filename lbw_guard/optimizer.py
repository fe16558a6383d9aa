"""FusedGuardedAdamW: a drop-in AdamW whose fused step also reduces training telemetry.

One step, as data flows:

1. everything the step uses is validated (gradients, hyperparameters, the loss) before
   anything changes;
2. the guard (if any) hands over its command for this step (per-group lr scale and gate, the
   per-element spike bound, the loss limit); the optimizer folds it with each group's lr,
   betas, eps and weight decay into a small control table on the device;
3. optionally a gradient-norm pre-pass (``max_grad_norm``, or a same-step grad-norm skip);
4. the backend's fused kernel updates p, m, v in one pass, computing step counters, bias
   corrections and coefficients on the device, and reduces the telemetry record;
5. the guard receives the record, still on the device, and acts on it a step later.

No step of this reads a device value on the host; the host work per step is a check of each
parameter and its gradient, a few Python operations per group and the backend's launch.
"""

from __future__ import annotations

import array
import contextlib
import copy
import logging
import math
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lbw_kernels import contract as C
from lbw_kernels.backends import (BACKEND_NAMES, FALLBACKS, KERNEL_DTYPES, Backend, BackendUnavailable,
                                  auto_order, load_backend)

from . import distributed, validation
from .control import GuardCommand, StepRecord
from .step_buffers import StepBuffers
from .telemetry import Telemetry

logger = logging.getLogger("lbw_guard")

# Steps without any loss after which a guarded optimizer says its loss checks are off.
_NO_LOSS_WARN_AFTER = 10


def _resolve_guard(guard: Any):
    if guard is None:
        return None
    from .guard import make_guard  # the control plane is imported only when used

    return make_guard(guard)


@dataclass
class _Bucket:
    """Tensors of one device and dtype that one backend call updates."""

    device: torch.device
    dtype: torch.dtype
    dense: bool
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    owners: list[Tensor] = field(default_factory=list)  # the parameters (DTensors stay DTensors)
    positions: list[int] = field(default_factory=list)  # their places among all the optimizer's params
    backend: Backend | None = None

    @property
    def key(self) -> tuple:
        """Its layout: one ``tensor_out`` buffer each, whose rows belong to these parameters."""
        return (self.dtype, self.dense, tuple(self.positions))


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,) if m.__file__) + (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "lbw_",)


def _seed_floor(out: Tensor, sums: list | None) -> None:
    """Write a layout's saved (sum of v, numel) rows into its ``tensor_out`` buffer."""
    if sums is not None:
        out[:, [C.T_MOMENT2_SUM, C.T_NUMEL]] = torch.tensor(sums, dtype=torch.float64).to(out.device)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside torch and this
    package (torch's optimizer hooks wrap ``step`` in a varying number of frames)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class FusedGuardedAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, fused telemetry and an optional training guard.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param groups,
            as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; per group if given there.
            ``lr`` may be a tensor (also on the GPU, for capturable schedules).
        amsgrad, maximize, foreach, capturable, differentiable, fused, decoupled_weight_decay:
            ``torch.optim.AdamW``'s keywords, accepted and kept in every param group so code
            written for AdamW runs unchanged. ``amsgrad=True``, ``maximize=True``,
            ``differentiable=True`` and ``decoupled_weight_decay=False`` are not supported and
            raise ``ValueError``; ``foreach``, ``fused`` and ``capturable`` change nothing
            (the step is always fused and never synchronises).
        guard: ``"default"``, another preset name (``"monitor"``, ``"conservative"``), a
            ``GuardConfig``, a ``Guard``, or ``None`` to run the optimizer alone: it then
            computes exactly what ``torch.optim.AdamW`` computes, NaN propagation included.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``, ``"foreach"`` (torch
            multi-tensor ops, the fallback) or ``"torch"`` (the per-tensor reference). A
            backend that cannot run here warns and falls back to the next one.
        max_grad_norm: global-norm clipping fused into the step (``clip_grad_norm_``
            semantics) or ``None``. A step whose gradient norm is not finite is skipped.
        telemetry_group: the process group of a partitioned optimizer (``ZeroRedundancyOptimizer``):
            each rank's optimizer holds different parameters, so the telemetry, the grad norm and
            the loss are combined over this group and every rank takes the same decision.

    Moments are fp32 for fp32, bf16 and fp16 parameters and fp64 for fp64 ones.
    ``opt.telemetry`` holds the last step's :class:`~lbw_guard.telemetry.Telemetry`.

    Differences from ``torch.optim.AdamW``, all deliberate (PyTorch's ``test/test_optim.py``
    passes with an ``OptimizerInfo`` modelled on AdamW's except where it checks these; see
    ``tests/test_torch_conformance.py``):

    * ``amsgrad=True``, ``maximize=True``, ``differentiable=True`` and
      ``decoupled_weight_decay=False`` raise ``ValueError`` (above).
    * A parameter listed twice in one group raises ``ValueError``; torch only warns
      ("duplicate parameters"), and its fused and foreach steps then update it twice.
    * Complex parameters raise ``TypeError`` (optimize ``torch.view_as_real(p)``, which is
      what torch's AdamW does internally); so do non-floating and sparse parameters.
    * Parameters on the meta device raise ``ValueError``: the optimizer measures each
      parameter when it joins. torch accepts them, but ``module.to_empty()`` then gives the
      module new ``Parameter`` objects and the optimizer silently steps the stale meta ones.
      Build the optimizer after materialising the model.
    * Parameters of one group on several devices raise ``ValueError`` (one group per device).
    * A Tensor ``lr`` or Tensor ``betas`` is accepted with ``foreach=True`` and
      ``capturable=False``, where torch raises: ``foreach`` changes nothing here.
    * Hyperparameters are validated in every param group (``add_param_group``, a loaded state
      dict) and again before every step, and an inf or NaN ``lr``, ``eps`` or
      ``weight_decay`` is refused as well as a negative one; messages begin with torch's
      wording ("Invalid learning rate: ...").
    * ``state_dict()`` has top-level ``num_steps`` (and ``guard``) entries and its first param
      group an ``"lbw_guard"`` bytes entry (the same, packed, for
      ``torch.distributed.checkpoint``, which keeps only ``state`` and ``param_groups``). So
      the first param group of a state dict is not identical to the others, and
      ``torch.optim.AdamW`` can load the state dict (it keeps the extra keys as inert group
      options).
    * Tensor hyperparameters are read once as doubles; torch computes with fp32 tensor
      hyperparameters in fp32 (``1 - lr * weight_decay``, ``beta ** step``), so fp64
      parameters then differ from torch's by ~1e-7 relative (from torch's float path, not at all).
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
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = True,
        guard: Any = "default",
        backend: str = "auto",
        max_grad_norm: float | None = None,
        telemetry_group: Any = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        validation.check_hyperparameters(defaults, "FusedGuardedAdamW", read_device_lr=False)
        if isinstance(params, (Tensor, str, bytes)) or not hasattr(params, "__iter__"):
            # torch.optim.Optimizer's wording, then what to pass instead
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                            f"but got {torch.typename(params)} (pass model.parameters(), "
                            "model.named_parameters() or a list of param group dicts)")
        if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKEND_NAMES}")
        self.requested_backend = backend
        self.max_grad_norm = validation.check_max_grad_norm(max_grad_norm)
        self.telemetry_group = telemetry_group
        self._init_runtime()
        super().__init__(params, defaults)
        self._guard = _resolve_guard(guard)
        if self._guard is not None:
            self._guard.bind(self)

    def _init_runtime(self) -> None:
        """Caches and per-step values that are rebuilt, never saved (see ``__getstate__``)."""
        self._backends: dict[tuple, Backend] = {}
        self._buffers: dict[torch.device, StepBuffers] = {}
        self._param_info: dict[Tensor, tuple[int, float]] = {}  # param -> (kind, rms when it joined)
        self._known_groups = 0  # param groups added through add_param_group (or unpickled)
        self._known_layout: list[int] = []  # the lists as last checked (see _layout): a change means they were edited
        self._section_follows = False  # set by the DCP helper: the guard's state comes after the load
        self._guard = None
        self.telemetry: Telemetry | None = None
        self.num_steps = 0
        self._pending_loss: Any = None
        self._pending_grad_norm: Any = None
        self._steps_without_loss = 0
        self._warned_no_loss = False
        self._checked_replicas = False
        self._last_command: GuardCommand | None = None
        self._graph_has_loss = False
        # Loaded spike-bound floors of layouts not stepped since (see _spike_floor_state).
        self._loaded_floor: dict[tuple, list] = {}

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
                return self._backend_for(p.device, p.dtype, True).name
        return "torch"

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"param group {len(self.param_groups)}"
        if "params" not in param_group:
            raise ValueError(f"{where} has no 'params' entry; pass {{'params': [...], ...}}")
        merged = {**self.defaults, **param_group}
        validation.check_hyperparameters(merged, where, read_device_lr=False)
        count = len(self.param_groups)
        super().add_param_group(param_group)  # names, sets, non-leaf tensors, overlaps
        group = self.param_groups[-1]
        try:
            self._check_joining(group["params"], where)
        except Exception:
            del self.param_groups[count:]
            raise
        group["betas"] = tuple(group["betas"])
        self._probe_params(group["params"])
        self._note_param_lists()
        if self._guard is not None:
            self._guard.bind(self)

    def _check_joining(self, params: list[Tensor], where: str) -> None:
        """Parameters joining the optimizer: valid, and a backend takes their device and dtype."""
        validation.check_params(params, where)
        for p in params:
            self._backend_for(p.device, p.dtype, True)

    def _note_param_lists(self) -> None:
        """The groups and parameters listed now, all checked: a later change means the lists
        were edited in place (see ``_collect``)."""
        if len(self.param_groups) != self._known_groups:
            self._buffers.clear()  # the control table and record are sized by the group count
        self._known_groups = len(self.param_groups)
        self._known_layout = self._layout()

    def _layout(self) -> list[int]:
        """Which parameter is where: each group as -1 followed by its parameters' ids."""
        out = []
        for group in self.param_groups:
            out.append(-1)
            out.extend(map(id, group["params"]))
        return out

    @torch.no_grad()
    def _probe_params(self, params: list[Tensor]) -> None:
        """Each parameter's kind and rms, measured once when it joins the optimizer (one
        device sync per param group): the kernels need the kind (matrix, zero-initialised
        matrix, vector) and the guard's update envelope the matrices' rms."""
        if not params:
            return
        sq = torch.stack([distributed.local_tensor(p.detach()).double().square().sum().to(params[0].device)
                          for p in params])
        distributed.sum_over_group(sq, distributed.shard_group(params))
        for p, s in zip(params, sq.cpu().tolist()):
            rms = math.sqrt(s / p.numel()) if p.numel() else 0.0
            self._param_info[p] = (C.tensor_kind(p, zero=not s > 0), rms)

    def inverse_matrix_rms(self) -> list[float]:
        """Per group: RMS over its matrices (not zero-initialised) of 1 / rms(theta) at the
        time they joined; NaN for a group without such matrices."""
        out = []
        for group in self.param_groups:
            inv = [1.0 / rms ** 2 for p in group["params"]
                   for kind, rms in [self._param_info.get(p, (C.KIND_OTHER, 0.0))]
                   if kind == C.KIND_MATRIX and rms > 0]
            out.append(math.sqrt(sum(inv) / len(inv)) if inv else math.nan)
        return out

    def _backend_for(self, device: torch.device, dtype: torch.dtype, dense: bool) -> Backend:
        key = (device, dtype, dense)
        if key not in self._backends:
            self._backends[key] = self._pick_backend(device, dtype, dense)
        return self._backends[key]

    def _pick_backend(self, device: torch.device, dtype: torch.dtype, dense: bool) -> Backend:
        order = auto_order(device.type)
        if self.requested_backend != "auto":
            order = (self.requested_backend,) + tuple(n for n in order if n != self.requested_backend)
        reasons = []
        for name in order:
            if name not in FALLBACKS and dtype not in KERNEL_DTYPES:
                reasons.append(f"{name}: no kernel for {dtype}")
                continue
            if name not in FALLBACKS and not dense:
                reasons.append(f"{name}: the parameters are not dense (non-overlapping)")
                continue
            try:
                backend = load_backend(name, device)
            except BackendUnavailable as exc:
                reasons.append(str(exc))
                continue
            if reasons and (self.requested_backend != "auto" or name in FALLBACKS) and dtype in KERNEL_DTYPES and dense:
                warnings.warn(
                    f"FusedGuardedAdamW: {device} {dtype} parameters run on backend={name!r} "
                    f"because {'; '.join(reasons)}",
                    stacklevel=_user_stacklevel(),
                )
            logger.info("FusedGuardedAdamW: %s %s parameters use backend=%r", device, dtype, name)
            return backend
        raise RuntimeError("no backend available: " + "; ".join(reasons))  # torch never fails

    # ------------------------------------------------------------------ state
    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _init_state(self, p: Tensor) -> dict:
        dtype = self._state_dtype(p)
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
        }

    def state_dict(self) -> dict:
        # The state of parameters no longer in any group (a group deleted from param_groups) has
        # no index to be saved under: torch's state_dict raises KeyError on it. It is left out
        # of the checkpoint, and kept here (the parameters may be added back).
        grouped = {id(p) for group in self.param_groups for p in group["params"]}
        orphans = {p: self.state.pop(p) for p in list(self.state) if id(p) not in grouped}
        try:
            sd = super().state_dict()
        finally:
            self.state.update(orphans)
        sd["num_steps"] = self.num_steps  # the guard numbers its records, events and snapshots by it
        if self._guard is not None:
            sd["guard"] = self._guard.state_dict()
            sd["spike_floor"] = self._spike_floor_state()
        # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and
        # "param_groups": the two entries above also ride, packed, in the first param group.
        # Constructor options that ZeroRedundancyOptimizer copies into every param group
        # (telemetry_group: a process group cannot be pickled) are no state and are dropped.
        from .checkpoint import finish_state_dict

        finish_state_dict(sd, self.num_steps, sd.get("guard"), sd.get("spike_floor"))
        return sd

    def _spike_floor_state(self) -> list[dict]:
        """What the spike bound's floor reads at the next step, per bucket layout: each tensor's
        sum of v and element count from its last step (``lbw_kernels.contract``). Saved so that
        a resumed run bounds its first step exactly as the uninterrupted run would; a state dict
        without it (torch's AdamW) starts with no floor, as a fresh run does."""
        layouts = dict(self._loaded_floor)  # loaded, not stepped since
        for buf in self._buffers.values():
            for key, out in buf.tensor_out.items():
                layouts[key[-1]] = out[:, [C.T_MOMENT2_SUM, C.T_NUMEL]].cpu().tolist()
        # (a rank's empty step of a partitioned optimizer has a layout of no parameters)
        return [{"params": list(positions), "sums": sums} for positions, sums in layouts.items() if positions]

    def _load_spike_floor(self, layouts: dict[tuple, list] | None) -> None:
        """Make the floors those of a checkpoint (validated by ``checkpoint.check_spike_floor``):
        live buffers in place (a captured graph keeps reading them), the rest when their layout
        next steps."""
        self._loaded_floor = dict(layouts or {})
        for buf in self._buffers.values():
            for key, out in buf.tensor_out.items():
                out.zero_()
                _seed_floor(out, self._loaded_floor.pop(key[-1], None))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load our own or a ``torch.optim.AdamW`` state dict (same per-parameter keys).

        The whole state dict is validated first; nothing changes unless all of it is valid.
        """
        from .checkpoint import OPTION_KEYS, prepare_load

        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # shallow, as torch's: the pre-hooks may edit it
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        plan = prepare_load(self, state_dict)
        options = [{k: g[k] for k in OPTION_KEYS if k in g} for g in self.param_groups]  # ZeRO's copies
        with _load_hooks_paused(self):  # they run here, around our conversion, not inside torch's
            super().load_state_dict(plan.torch_state)
        for group, kept in zip(self.param_groups, options):
            group.update(kept)
        # torch casts loaded states to the parameter dtype and layout policy of torch.optim;
        # ours keep fp32 (fp64) moments in the parameter's memory format on its device.
        for p, state in plan.states.items():
            self.state[p] = state
        self.num_steps = plan.num_steps
        for buffers in self._buffers.values():
            buffers.invalidate()
        self._load_spike_floor(plan.spike_floor)
        if self._guard is not None:
            self._guard.bind(self)
            if plan.guard_state is not None:
                self._guard.load_state_dict(plan.guard_state)
            elif not self._section_follows:  # what the guard learnt was about the weights just replaced
                self._guard.reset()
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def __getstate__(self) -> dict:
        """torch keeps only ``defaults``, ``state`` and ``param_groups``; ours also carries the
        options and the guard's state with its snapshots, so a deep copy or an unpickled
        optimizer steps exactly like the original. The guard's ``on_give_up`` hook goes with a
        deep copy (:meth:`__deepcopy__`), not into a pickle (set it again after unpickling)."""
        return {
            **super().__getstate__(),
            "_lbw": {
                "requested_backend": self.requested_backend,
                "max_grad_norm": self.max_grad_norm,
                "num_steps": self.num_steps,
                "guard_config": self._guard.config if self._guard is not None else None,
                "guard_state": self._guard.state_dict(snapshots=True) if self._guard is not None else None,
                "spike_floor": self._spike_floor_state(),
                "pending_loss": self._pending_loss,
                "pending_grad_norm": self._pending_grad_norm,
                "param_info": [self._param_info.get(p) for g in self.param_groups for p in g["params"]],
            },
        }

    def __deepcopy__(self, memo: dict) -> "FusedGuardedAdamW":
        """As the default deep copy (``__getstate__`` / ``__setstate__``), plus the guard's
        ``on_give_up`` hook, which a pickle cannot carry (a lambda, a bound method)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if self._guard is not None and copied._guard is not None:
            copied._guard.on_give_up = self._guard.on_give_up
        return copied

    def __setstate__(self, state: dict) -> None:
        options = state.pop("_lbw", None)
        if "_guard" in self.__dict__:
            # torch's load_state_dict ends here with {"state", "param_groups"}: a live optimizer
            # keeps its options, guard and caches.
            super().__setstate__(state)
            return
        self.requested_backend = "auto"  # unpickling (copy.deepcopy, torch.load): rebuild
        self.max_grad_norm = None
        self.telemetry_group = None
        self._init_runtime()
        super().__setstate__(state)
        self._note_param_lists()
        params = [p for g in self.param_groups for p in g["params"]]
        if options is None or len(options.get("param_info", [])) != len(params):
            for group in self.param_groups:
                self._probe_params(group["params"])
        else:
            self._param_info = {p: tuple(info) for p, info in zip(params, options["param_info"])}
        if options is None:
            return
        self.requested_backend = options["requested_backend"]
        self.max_grad_norm = options["max_grad_norm"]
        self.num_steps = options["num_steps"]
        self._pending_loss = options["pending_loss"]
        self._pending_grad_norm = options["pending_grad_norm"]
        from .checkpoint import check_spike_floor

        self._loaded_floor = check_spike_floor(options.get("spike_floor") or [], len(params))
        if options["guard_config"] is not None:
            self._guard = _resolve_guard(options["guard_config"])
            self._guard.bind(self)
            self._guard.load_state_dict(options["guard_state"])

    # ------------------------------------------------------------------ inputs from the loop
    def record_loss(self, loss: Tensor | float) -> None:
        """Give the next ``step()`` its loss telemetry when the caller of ``step()`` cannot
        (a wrapper such as Accelerate's or the HF Trainer calls ``step()`` without it).
        Under gradient accumulation, call it with the accumulated loss once per step. A bad
        value is refused here, where it comes from; ``None`` clears it."""
        if loss is not None:
            validation.check_scalar("loss", loss)
        self._pending_loss = loss.detach() if isinstance(loss, Tensor) else loss

    @property
    def latest_loss(self):
        """The loss the next step will use (set it instead of calling ``record_loss``, as
        OLMo-core's trainer does with its skip-step optimizers)."""
        return self._pending_loss

    @latest_loss.setter
    def latest_loss(self, loss) -> None:
        self.record_loss(loss)

    def record_grad_norm(self, norm: Tensor | float) -> None:
        """Give the next step the global gradient norm measured *before* a clip done outside
        the optimizer (``clip_grad_norm_`` returns it; the HF Trainer logs it). The guard then
        judges spikes on it: after such a clip the gradients it sees are never above the
        clip norm."""
        if norm is not None:
            validation.check_scalar("grad_norm", norm)
        self._pending_grad_norm = norm.detach() if isinstance(norm, Tensor) else norm

    @property
    def latest_grad_norm(self):
        return self._pending_grad_norm

    @latest_grad_norm.setter
    def latest_grad_norm(self, norm) -> None:
        self.record_grad_norm(norm)

    @property
    def step_was_skipped(self) -> Tensor | bool:
        """Whether the last step changed nothing (every group gated off on the device: a
        skipped spike, a non-finite loss, GradScaler's found_inf): a 0-d bool device tensor,
        read without a host sync until you call ``bool()`` on it. False before any step."""
        if self.telemetry is None:
            return False
        return (self.telemetry.applied_gate == 0).all()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, loss: Tensor | float | None = None):
        """One AdamW step. ``loss`` (or the closure's result, or ``latest_loss``) becomes
        guard telemetry.

        Under ``torch.amp.GradScaler`` the scaler sets ``grad_scale`` and ``found_inf``
        device tensors on the optimizer; gradients are unscaled inside the kernel and a
        step with ``found_inf`` is skipped on the device, as torch's fused AdamW does.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"step(closure) takes a callable that returns the loss, got {type(closure).__name__}; "
                            "pass a loss as a keyword: opt.step(loss=loss)")
        # torch.distributed.checkpoint's initialising step (state_dict._init_optim_state: no state
        # yet, every lr 0, zero grads) only creates the states; it is no training step (no
        # num_steps, no guard record). See lbw_guard.checkpoint.dcp_initialising_step.
        if closure is None and loss is None and not self.state:
            from .checkpoint import dcp_initialising_step

            if dcp_initialising_step(self):
                return None
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if loss is None:
            loss = self._pending_loss if closure_loss is None else self._closure_loss(closure_loss)
        buckets = self._collect()  # validates every gradient before anything changes
        if not buckets:
            if not self._joins_collectives():
                return closure_loss
            buckets = [self._empty_bucket()]  # no gradient here, but the other ranks' sums wait for ours
        device = buckets[0].device
        loss_t = validation.loss_tensor(loss, device) if loss is not None else None
        self._check_step_hyperparameters()
        self._pending_loss = None
        grad_norm_before_clip = self._pending_grad_norm
        self._pending_grad_norm = None
        joined = self._init_missing_states(buckets)

        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            # Only the device work is captured; the host side runs around each replay
            # (before_replay / after_replay), reading and writing the same static buffers.
            if loss_t is not None and self._guard is not None:
                loss_t = distributed.mean_over_ranks(loss_t, self.telemetry_group)
            self._graph_has_loss = loss_t is not None
            self._run(buckets, self._last_command or GuardCommand.plain(len(self.param_groups)), loss_t, True)
            return closure_loss
        if joined and self.num_steps > 0 and self._guard is not None:
            self._guard.params_joined(joined)  # unfrozen mid-run: new gradient and loss levels
        self.num_steps += 1
        if self._guard is not None:
            command = self._guard.before_step(self.num_steps)
            if loss_t is not None:
                # Each rank saw its own micro-batch: check the mean so all ranks agree.
                loss_t = distributed.mean_over_ranks(loss_t, self.telemetry_group)
        else:
            command = GuardCommand.plain(len(self.param_groups))
        self._last_command = command
        record = self._run(buckets, command, loss_t, False)
        if self._guard is not None:
            self._note_loss(loss_t is not None)
            self._guard.after_step(StepRecord(step=self.num_steps, record=record, lrs=self._host_lrs(),
                                              beta1=self._host_beta1(), has_loss=loss_t is not None,
                                              grad_norm=grad_norm_before_clip))
        return closure_loss

    # ------------------------------------------------------------------ CUDA graphs
    def before_replay(self) -> None:
        """Host side of a captured step, before ``graph.replay()``: the guard's command for the
        coming step and the scheduler's lrs go into the static control table the graph reads."""
        command = GuardCommand.plain(len(self.param_groups))
        if self._guard is not None:
            command = self._guard.before_step(self.num_steps + 1)
        self._last_command = command
        values = self._control_values(command)
        for buf in self._buffers.values():
            buf.upload(values)

    def after_replay(self) -> None:
        """Host side of a captured step, after ``graph.replay()``: hands the record the graph
        wrote to the guard (which acts on it a step later, without a host sync)."""
        if not self._buffers:
            raise RuntimeError("after_replay() needs a step captured with this optimizer first")
        self.num_steps += 1
        record = next(iter(self._buffers.values())).record
        self.telemetry = Telemetry(record, len(self.param_groups), self.telemetry.per_tensor if self.telemetry else ())
        if self._guard is not None:
            self._guard.after_step(StepRecord(step=self.num_steps, record=record, lrs=self._host_lrs(),
                                              beta1=self._host_beta1(), has_loss=self._graph_has_loss))

    def _collect(self) -> list[_Bucket]:
        """Buckets of (device, dtype, dense) with their tensors; validates before any change."""
        found = []
        position = 0
        for gid, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is not None:
                    validation.check_grad(p, g, f"param group {gid} params[{i}]")
                    found.append((gid, i, p, g, position))
                position += 1
        if self._layout() != self._known_layout:
            self._adopt_edited_lists()
        if found and not self._checked_replicas and self._guard is not None:
            distributed.check_replicated([f[2] for f in found], self.telemetry_group, self._settings_text())
            self._checked_replicas = True
        buckets: dict[tuple, _Bucket] = {}
        for gid, i, p, g, position in found:
            info = self._param_info[p]
            lp, lg = distributed.local_tensor(p), distributed.local_tensor(g)
            dense = is_dense(lp)
            state = self.state.get(p)
            if state:
                m = state["exp_avg"]
                if m.dtype != self._state_dtype(p) or m.shape != p.shape:
                    self._refuse_changed(p, m, gid, i)
                step = state.get("step")
                if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0
                        and step.device == p.device):
                    self._refuse_step(step, p, gid, i)
                if dense:  # moments loaded with other strides than the param
                    dense = m.stride() == lp.stride() == state["exp_avg_sq"].stride()
            key = (p.device, p.dtype, dense)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = _Bucket(p.device, p.dtype, dense, backend=self._backend_for(*key))
            if dense and lg.stride() != lp.stride():
                lg = torch.empty_like(lp).copy_(lg)  # the kernels walk p, g, m, v in one order
            b.owners.append(p)
            b.params.append(lp)
            b.grads.append(lg)
            b.group_ids.append(gid)
            b.positions.append(position)
            b.kinds.append(info[0])
        return list(buckets.values())

    def _settings_text(self) -> str:
        """What every rank of a replicated run must agree on, as text: each group's hyperparameters,
        the clip, and the guard's config less what is per rank by design (its trace file)."""
        groups = [(_host_float(g["lr"]), [_host_float(b) for b in g["betas"]], _host_float(g["eps"]),
                   _host_float(g["weight_decay"])) for g in self.param_groups]
        per_rank = ("trace_path", "keep_trace")  # where each rank writes its trace, how much it keeps
        config = {k: v for k, v in self._guard.config.to_dict().items() if k not in per_rank} if self._guard else None
        return repr((groups, self.max_grad_norm, config))

    def _closure_loss(self, value):
        """The closure's result as the loss telemetry. The guard needs a scalar (else an error
        that says how to give one); without a guard anything goes, as in torch.optim, and only
        a scalar is recorded."""
        try:
            validation.check_scalar("loss", value)
        except (TypeError, ValueError) as exc:
            if self._guard is None:
                return self._pending_loss
            raise type(exc)(f"step(closure): the guard reads the closure's result as the loss ({exc}); return "
                            "the scalar loss from the closure, or pass it as step(closure, loss=...)") from None
        return value

    def _joins_collectives(self) -> bool:
        """Under a ``telemetry_group`` (a partitioned optimizer) every rank's step sums the
        telemetry with the others', so a rank with no gradient this step steps too, with nothing."""
        return self.telemetry_group is not None and distributed.is_distributed()

    def _empty_bucket(self) -> _Bucket:
        """A bucket without tensors: the reference backend writes its record (zero telemetry,
        the loss and the step checks) for the collective sums. On the parameters' device, or
        where the process group communicates when this rank's share is empty."""
        p = next((p for g in self.param_groups for p in g["params"]), None)
        if p is not None:
            device, dtype = p.device, p.dtype
        else:
            device, dtype = distributed.group_device(self.telemetry_group), torch.float32
        return _Bucket(device, dtype, True, backend=load_backend("torch", device))

    def _adopt_edited_lists(self) -> None:
        """The param lists were edited in place (torch.optim steps whatever they hold): a group
        appended directly or a parameter listed twice is refused; parameters put into a group's
        list are checked and measured as add_param_group would; and the guard binds to the new
        layout, since its per-group state and snapshots were of the old one (a parameter moved
        to another group, or removed, made a rollback restore the wrong tensors). Before the
        step changes anything."""
        if len(self.param_groups) > self._known_groups:
            raise ValueError(f"param group {self._known_groups} was appended to param_groups directly; add it with "
                             "opt.add_param_group({'params': [...], ...}) so that it is checked and measured")
        validation.check_each_once(self.param_groups)
        for gid, group in enumerate(self.param_groups):
            joining = [p for p in group["params"] if p not in self._param_info]
            if joining:
                self._check_joining(group["params"], f"param group {gid}")
                self._probe_params(joining)
        self._note_param_lists()
        if self._guard is not None:
            self._guard.bind(self)

    @staticmethod
    def _refuse_changed(p: Tensor, m: Tensor, gid: int, i: int) -> None:
        """The moments were made for another shape or dtype: the parameter was changed in place
        after it was stepped (``model.double()``, a resized embedding). Refused while the step
        is still being gathered, before any bucket steps, not half-way through it."""
        raise ValueError(
            f"param group {gid} params[{i}] is now {p.dtype} of shape {tuple(p.shape)}, but its optimizer state "
            f"was made for {tuple(m.shape)} with {m.dtype} moments (the parameter was changed in place after it "
            "was stepped); build the optimizer again after changing the model, or load a matching state dict")

    @staticmethod
    def _refuse_step(step, p: Tensor, gid: int, i: int) -> None:
        """``state["step"]`` written directly (load_state_dict converts what it loads): the
        kernels count in a float32 scalar tensor on the parameter's device."""
        what = (f"a {step.dtype} tensor of shape {tuple(step.shape)} on {step.device}" if isinstance(step, Tensor)
                else f"{type(step).__name__} {step!r:.40}")
        raise TypeError(f"param group {gid} params[{i}]: optimizer.state[p]['step'] is {what}; it must be a float32 "
                        f"scalar tensor on {p.device}, e.g. torch.tensor(float(n), device=p.device), as "
                        "load_state_dict makes it")

    def _init_missing_states(self, buckets: list[_Bucket]) -> int:
        """Create moments for parameters stepped for the first time (after validation); how
        many there were."""
        created = 0
        for b in buckets:
            for p in b.owners:
                state = self.state[p]
                if len(state) == 0:
                    state.update(self._init_state(p))
                    created += 1
                b.exp_avgs.append(distributed.local_tensor(state["exp_avg"]))
                b.exp_avg_sqs.append(distributed.local_tensor(state["exp_avg_sq"]))
                b.steps.append(state["step"])
        return created

    def _check_step_hyperparameters(self) -> None:
        """lr, betas, eps, weight decay as the scheduler or the user left them: a NaN, inf or
        negative value is refused here, naming the group, rather than turning params NaN."""
        for i, group in enumerate(self.param_groups):
            validation.check_hyperparameters(group, f"param group {i}", read_device_lr=False, between_steps=True)

    def _run(self, buckets: list[_Bucket], command: GuardCommand, loss_t: Tensor | None, capturing: bool) -> Tensor:
        values = self._control_values(command)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_norm = None
        if self.max_grad_norm is not None or command.precheck:
            grad_norm = self._grad_norm(buckets, grad_scale)
        shard_group = distributed.shard_group([p for b in buckets for p in b.owners])
        uploaded: set[torch.device] = set()
        tensor_sums = []
        steps_before = []
        for b in buckets:
            buf = self._buffers_for(b.device)
            if b.device not in uploaded and not capturing:
                buf.upload(values)
            if b.device not in uploaded:
                self._copy_tensor_lrs(buf)
            out = buf.tensor_sums(b.key, len(b.params))
            if self._loaded_floor:
                _seed_floor(out, self._loaded_floor.pop(b.key[-1], None))
            if shard_group is not None:
                steps_before.append(torch.stack([s.reshape(()).double() for s in b.steps]))
            on = b.device
            b.backend.step(
                b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.steps, b.group_ids, b.kinds, buf.control,
                out, buf.record,
                loss=_on(loss_t, on), found_inf=_on(found_inf, on), grad_scale=_on(grad_scale, on),
                grad_norm=_on(grad_norm, on), accumulate=on in uploaded,
            )
            uploaded.add(on)
            tensor_sums.append(out)
        record = self._merge_records(buckets)
        if shard_group is not None:
            self._resum_sharded(record, buckets, tensor_sums, steps_before, shard_group)
        elif self.telemetry_group is not None:
            layout = C.record_layout(len(self.param_groups))
            distributed.sum_over_group(record[layout.group_fields], self.telemetry_group)
        self.telemetry = Telemetry(record, len(self.param_groups), tuple(tensor_sums))
        return record

    def _buffers_for(self, device: torch.device) -> StepBuffers:
        buf = self._buffers.get(device)
        if buf is None or buf.num_groups != len(self.param_groups):
            buf = self._buffers[device] = StepBuffers(device, len(self.param_groups))
        return buf

    def _control_values(self, command: GuardCommand) -> array.array:
        """The control table as host doubles, row-major ``[G + 1, NUM_CONTROL]``."""
        values = array.array("d")
        for g, group in enumerate(self.param_groups):
            lr = group["lr"]
            lr = 0.0 if isinstance(lr, Tensor) and lr.device.type != "cpu" else float(lr)
            b1, b2 = group["betas"]
            row = [0.0] * C.NUM_CONTROL
            row[C.LR], row[C.SCALE], row[C.GATE] = lr, command.scale[g], command.gate[g]
            row[C.BETA1], row[C.BETA2] = float(b1), float(b2)
            row[C.EPS], row[C.WEIGHT_DECAY] = float(group["eps"]), float(group["weight_decay"])
            row[C.SPIKE_K], row[C.CLAMP] = command.spike_k, float(command.clamp)
            values.extend(row)
        row = [0.0] * C.NUM_CONTROL
        row[C.LOSS_LIMIT] = command.loss_limit
        row[C.CHECK_LOSS] = float(command.check_loss)
        row[C.GRAD_NORM_LIMIT] = command.grad_norm_limit
        row[C.MAX_GRAD_NORM] = self.max_grad_norm or 0.0
        row[C.MASK_NONFINITE] = float(command.mask_nonfinite)
        values.extend(row)
        return values

    def _copy_tensor_lrs(self, buf: StepBuffers) -> None:
        """An lr tensor on the accelerator is used where it is, never read back."""
        for g, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device.type != "cpu":
                buf.control[g, C.LR].copy_(lr.reshape(()), non_blocking=True)

    def _grad_norm(self, buckets: list[_Bucket], grad_scale: Tensor | None) -> Tensor:
        """One read of every gradient: the global L2 norm (unscaled) as a float64 device scalar."""
        device = buckets[0].device
        total = sum((b.backend.grad_norm_sq(b.grads).to(device) for b in buckets if b.grads),
                    torch.zeros((), dtype=torch.float64, device=device))
        total = distributed.sum_over_group(total, distributed.shard_group([p for b in buckets for p in b.owners])
                                           or self.telemetry_group)
        norm = total.sqrt()
        if grad_scale is not None:
            norm = norm / grad_scale.to(device, torch.float64).reshape(())
        return norm

    def _merge_records(self, buckets: list[_Bucket]) -> Tensor:
        """The record of the step: the first device's, with other devices' groups added."""
        devices = list(dict.fromkeys(b.device for b in buckets))
        record = self._buffers[devices[0]].record
        if len(devices) > 1:
            layout = C.record_layout(len(self.param_groups))
            for d in devices[1:]:
                other = self._buffers[d].record.to(devices[0])
                record[layout.group_fields] += other[layout.group_fields]
        return record

    def _resum_sharded(self, record, buckets, tensor_sums, steps_before, group) -> None:
        """FSDP2: each rank reduced its shard of every tensor; per-tensor signals need whole
        tensors, so the per-tensor sums are summed over the shard group and the group fields
        recomputed from them (the same function every backend implements)."""
        sums = torch.cat(tensor_sums)
        distributed.sum_over_group(sums, group)
        device = record.device
        gids = torch.tensor([g for b in buckets for g in b.group_ids], device=device)
        kinds = torch.tensor([k for b in buckets for k in b.kinds], device=device)
        layout = C.record_layout(len(self.param_groups))
        control = self._buffers[device].control
        fields = C.group_fields(sums.to(device), gids, kinds, torch.cat(steps_before).to(device), control,
                                record[layout.applied_gate])
        record[layout.group_fields].copy_(fields.reshape(-1))
        start = 0
        for out in tensor_sums:
            out.copy_(sums[start:start + out.shape[0]])
            start += out.shape[0]

    def _note_loss(self, has_loss: bool) -> None:
        self._steps_without_loss = 0 if has_loss else self._steps_without_loss + 1
        if self._steps_without_loss >= _NO_LOSS_WARN_AFTER and not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                f"FusedGuardedAdamW: the guard has had no loss for {_NO_LOSS_WARN_AFTER} steps, so its "
                "loss checks and loss-based signals are off. Pass step(loss=loss), or set "
                "opt.latest_loss = loss before step() (Hugging Face Trainer: attach "
                "lbw_guard.integrations.hf.GuardCallback; Accelerate: lbw_guard.integrations.accelerate.StepLoss).",
                stacklevel=_user_stacklevel(),
            )

    def _host_lrs(self) -> list[float]:
        """Scheduler lrs as host floats for the guard. A tensor lr on an accelerator is
        reported as NaN rather than read back (that would synchronise)."""
        return [_host_float(g["lr"]) for g in self.param_groups]

    def _host_beta1(self) -> list[float]:
        return [_host_float(g["betas"][0]) for g in self.param_groups]


@contextlib.contextmanager
def _load_hooks_paused(opt):
    """torch's ``load_state_dict`` without the user's load hooks, which ours runs itself: the
    pre-hooks before the state dict is checked, the post-hooks after our states are in place."""
    pre, post = opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks
    opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = pre, post


def _host_float(x) -> float:
    """A hyperparameter as a host float; NaN for a tensor on an accelerator (no sync)."""
    on_host = not isinstance(x, Tensor) or x.device.type == "cpu"
    return float(x) if on_host else math.nan


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a contiguous block of memory exactly once, in some dimension order
    (contiguous, channels_last, a transpose...): the kernels then walk it as a flat array."""
    if t.is_contiguous():
        return True
    dims = sorted((st, size) for st, size in zip(t.stride(), t.shape) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
