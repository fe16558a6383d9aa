"""Guard: glues the host-side Controller to a FusedGuardedAdamW without host syncs.

Per step the optimizer calls :meth:`Guard.before_step` (control tensors for this step) and
:meth:`Guard.after_step` (this step's telemetry, still on the device). The guard

- keeps one small device tensor holding every control value and refreshes it from the host
  only when a value changed (pinned staging buffer, ``non_blocking`` copy on CUDA);
- copies each record to host memory asynchronously and hands the controller the record of
  ``lag`` steps ago, whose copy has completed (waiting on its event never stalls in
  practice; the same lag on CPU keeps CPU and GPU runs identical and deterministic);
- executes the controller's rollback requests and takes the snapshots it asks for.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict

import torch
from torch import Tensor

from lbw_guard import distributed
from lbw_guard.control import StepControl, StepRecord

from .config import GuardConfig, preset
from .controller import Controller, HostRecord
from .events import Event, JsonlWriter
from .signals import NUM_FIELDS
from .snapshots import SnapshotRing

STATE_VERSION = 1


def _async_to_host(t: Tensor) -> tuple[Tensor, object]:
    """Start copying a small device tensor to pinned host memory; returns the host tensor and
    the CUDA event that completes with the copy (None, and the tensor itself, on the CPU)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _Pending:
    """One record on its way to the host: a packed host tensor (+ CUDA event) or ready floats."""

    def __init__(self, step: int, num_groups: int, packed: Tensor | None, event, has_loss: bool,
                 lrs: list[float], ready: HostRecord | None = None):
        self.step = step
        self.num_groups = num_groups
        self.packed = packed
        self.event = event
        self.has_loss = has_loss
        self.lrs = lrs
        self.ready = ready

    def host_record(self, scale: list[float], gate: list[float]) -> HostRecord:
        if self.ready is None:
            if self.event is not None:
                self.event.synchronize()  # recorded a step ago: already complete
            values = self.packed.tolist()
            G = self.num_groups
            F = NUM_FIELDS
            rows = [values[g * F:(g + 1) * F] for g in range(G)]
            applied = values[F * G:(F + 1) * G]
            loss = values[(F + 1) * G] if self.has_loss else None
            self.ready = HostRecord(self.step, rows, applied, loss, list(self.lrs), list(scale), list(gate))
            self.packed = self.event = None
        return self.ready


class Guard:
    """The training guard. Build it from a :class:`GuardConfig` (or use ``make_guard``)."""

    def __init__(self, config: GuardConfig | None = None):
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"Guard expects a GuardConfig, got {type(config).__name__}")
        self.config = config if config is not None else GuardConfig()
        self.controller: Controller | None = None
        self.optimizer = None
        self.events: list[Event] = []
        self.records: list[dict] = []
        self._pending: deque[_Pending] = deque()
        self._issued: dict[int, tuple[list[float], list[float]]] = {}
        self._ring = SnapshotRing(self.config.snapshot_ring)
        self._writer: JsonlWriter | None = None
        self._device: torch.device | None = None
        self._num_groups = 0
        self._param_key: tuple | None = None
        self._control: Tensor | None = None
        self._last_values: list[float] | None = None
        self._staging: list[tuple[Tensor, object]] = []
        self._staging_next = 0
        self._rms_probe = None
        self._nan: Tensor | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, optimizer) -> None:
        """Attach to ``optimizer`` (again after ``add_param_group`` or ``load_state_dict``)."""
        if self.optimizer is not None and self.optimizer is not optimizer:
            raise RuntimeError("this Guard is already bound to another optimizer; build one Guard per optimizer")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        G = len(groups)
        params = [p for g in groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        if self.controller is None:
            self.controller = Controller(self.config, G)
        elif G != self.controller.num_groups:
            self.controller.resize(G)
        key = tuple((id(p), tuple(p.shape)) for p in params)
        if key != self._param_key:  # snapshots of another parameter set cannot be restored
            if self._param_key is not None:
                self._ring.clear()
                self.controller.snapshot_steps = []
            self._param_key = key
        if G != self._num_groups or device != self._device:
            self._num_groups, self._device = G, device
            self._control = torch.ones(2 * G + 2, dtype=torch.float64, device=device)
            self._staging = []
            self._last_values = None
        self._probe_param_rms(groups, device)

    def _probe_param_rms(self, groups, device) -> None:
        """rms(theta) per group for the predictive bound of the very first steps.

        Reduced on the device and copied back asynchronously; read at the next
        ``before_step`` (after the copy's event), so binding never blocks either.
        """
        with torch.no_grad():
            sums, counts = [], []
            for group in groups:
                ps = [p.detach() for p in group["params"] if p.numel() > 0]
                counts.append(float(sum(p.numel() for p in ps)))  # global sizes (DTensor too)
                # Sharded (FSDP2) parameters: square-sum the local shard, summed over ranks below.
                locs = [distributed.local_tensor(p) for p in ps]
                if locs:
                    sums.append(torch.stack([t.float().square().sum().to(device, torch.float64) for t in locs]).sum())
                else:
                    sums.append(torch.zeros((), dtype=torch.float64, device=device))
            packed = torch.stack(sums)
            params = [p for group in groups for p in group["params"]]
            distributed.sum_over_group(packed, distributed.shard_group(params))
            packed, event = _async_to_host(packed)
        self._rms_probe = (packed, event, counts)

    def _read_rms_probe(self) -> None:
        packed, event, counts = self._rms_probe
        self._rms_probe = None
        if event is not None:
            event.synchronize()
        sums = packed.tolist()
        rms = [math.sqrt(s / n) if n > 0 and math.isfinite(s) else math.nan for s, n in zip(sums, counts)]
        self.controller.set_param_rms(rms, counts)

    # ------------------------------------------------------------------ per step
    def before_step(self, step: int) -> StepControl:
        if self.controller is None:
            raise RuntimeError("Guard.before_step called before bind(optimizer)")
        if self._rms_probe is not None:
            self._read_rms_probe()
        lrs = self.optimizer._host_lrs()
        values = self.controller.control_values(step, lrs)
        self._emit(self.controller.outbox)
        self.controller.outbox = []
        self._issued[step] = (values.scale, values.gate)
        flat = values.as_list()
        if flat != self._last_values:
            self._upload(flat)
            self._last_values = flat
        G = self._num_groups
        c = self._control
        return StepControl(scale=c[:G], gate=c[G:2 * G], grad_norm_limit=c[2 * G], loss_limit=c[2 * G + 1],
                           precheck=self.config.acts)

    def _upload(self, flat: list[float]) -> None:
        host = torch.tensor(flat, dtype=torch.float64)
        if self._device.type != "cuda":
            self._control.copy_(host)
            return
        # Two pinned staging buffers: the one written now was last read by a copy enqueued
        # at least one step ago, whose event has long completed.
        if len(self._staging) < 2:
            self._staging.append((torch.empty(len(flat), dtype=torch.float64, pin_memory=True), None))
        i = self._staging_next % len(self._staging)
        self._staging_next += 1
        buf, event = self._staging[i]
        if event is not None:
            event.synchronize()
        buf.copy_(host)
        self._control.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._staging[i] = (buf, event)

    def after_step(self, record: StepRecord) -> None:
        self._pending.append(self._to_host(record))
        now = record.step
        while len(self._pending) > self.config.lag:
            pending = self._pending.popleft()
            rec = pending.host_record(*self._issued_for(pending, pop=True))
            decision = self.controller.observe(rec, now)
            self._trace_record(rec, decision.signals)
            self._emit(decision.events)
            if decision.rollback_to is not None:
                self._ring.restore(decision.rollback_to, self.optimizer)
                self._ring.retain(self.controller.snapshot_steps)
                # The records still queued describe the abandoned trajectory.
                self._pending.clear()
                self._issued = {s: v for s, v in self._issued.items() if s > now}
                break
        if self.controller.take_snapshot(now) and self.config.acts:
            self._ring.take(now, self.optimizer)

    def _issued_for(self, pending: _Pending, pop: bool = False) -> tuple[list[float], list[float]]:
        """The scale and gate issued for a pending record's step (ones if none was)."""
        lookup = self._issued.pop if pop else self._issued.get
        return lookup(pending.step, ([1.0] * pending.num_groups, [1.0] * pending.num_groups))

    def _to_host(self, record: StepRecord) -> _Pending:
        G = record.telemetry.shape[0]
        device = record.telemetry.device
        loss = record.loss.detach().reshape(1).to(device, torch.float64) if record.loss is not None else self._nan_on(device)
        packed = torch.cat([record.telemetry.detach().reshape(-1).to(torch.float64),
                            record.applied_gate.detach().reshape(-1).to(device, torch.float64), loss])
        packed, event = _async_to_host(packed)
        lrs = [float(x) for x in record.lrs]
        return _Pending(record.step, G, packed, event, record.loss is not None, lrs)

    def _nan_on(self, device) -> Tensor:
        if self._nan is None or self._nan.device != device:
            self._nan = torch.full((1,), math.nan, dtype=torch.float64, device=device)
        return self._nan

    # ------------------------------------------------------------------ events and traces
    def _emit(self, events: list[Event]) -> None:
        for event in events:
            self.events.append(event)
            writer = self._trace_writer()
            if writer is not None:
                writer.write(event.to_dict())

    def _trace_record(self, rec: HostRecord, signals: dict) -> None:
        if self.config.trace_path is None and not self.config.keep_trace:
            return
        line = {"type": "record", **rec.to_dict(), "regime": self.controller.regime, "signals": signals}
        if self.config.keep_trace:
            self.records.append(line)
        writer = self._trace_writer()
        if writer is not None:
            writer.write(line)

    def _trace_writer(self) -> JsonlWriter | None:
        if self.config.trace_path is None:
            return None
        if self._writer is None:
            self._writer = JsonlWriter(self.config.trace_path, mode="a")
        return self._writer

    def write_jsonl(self, path) -> None:
        """Write the kept records (``keep_trace=True``) and every event to ``path``."""
        with JsonlWriter(path, mode="w") as writer:
            writer.write({"type": "config", **self.config.to_dict()})
            writer.write_all(self.records)
            writer.write_all(e.to_dict() for e in self.events)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ introspection
    @property
    def regime(self) -> str:
        return self.controller.regime if self.controller is not None else "warmup"

    @property
    def scale(self) -> list[float]:
        """The scale issued for the latest step, per group."""
        return list(self.controller.last_scale) if self.controller is not None else []

    @property
    def interventions(self) -> list[Event]:
        return [e for e in self.events if e.intervention and e.applied]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        pending = []
        for p in self._pending:
            scale, gate = self._issued_for(p)
            pending.append({"record": p.host_record(scale, gate).to_dict(), "num_groups": p.num_groups})
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "pending": pending,
            "issued": {int(s): [list(v[0]), list(v[1])] for s, v in self._issued.items()},
            "events": [asdict(e) for e in self.events],
            "records": list(self.records),
            "snapshots": self._ring.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported guard state version {state.get('version')!r}")
        if state["controller"] is not None:
            if state["controller"]["num_groups"] != self.controller.num_groups:
                raise ValueError(
                    f"guard state has {state['controller']['num_groups']} parameter groups, "
                    f"the optimizer has {self.controller.num_groups}"
                )
            self.controller.load_state_dict(state["controller"])
        self._issued = {int(s): (list(v[0]), list(v[1])) for s, v in state["issued"].items()}
        self._pending = deque(
            _Pending(p["record"]["step"], p["num_groups"], None, None, p["record"]["loss"] is not None,
                     p["record"]["lrs"], ready=HostRecord.from_dict(p["record"]))
            for p in state["pending"]
        )
        self.events = [Event.from_dict(e) for e in state["events"]]
        self.records = list(state["records"])
        self._ring = SnapshotRing(self.config.snapshot_ring)
        self._ring.load_state_dict(state["snapshots"], pin=self._device is not None and self._device.type == "cuda")
        self._last_values = None  # re-upload the control values on the next step
        loaded = state["controller"]["param_rms"] if state["controller"] is not None else []
        if any(isinstance(v, (int, float)) and math.isfinite(v) for v in loaded):
            self._rms_probe = None  # the controller's loaded rms(theta) wins over the bind-time probe


def make_guard(spec) -> Guard | None:
    """None, a preset name, a GuardConfig, a dict of GuardConfig fields or a Guard -> Guard | None."""
    if spec is None:
        return None
    if isinstance(spec, Guard):
        return spec
    if isinstance(spec, GuardConfig):
        return Guard(spec)
    if isinstance(spec, str):
        return Guard(preset(spec))
    if isinstance(spec, dict):
        return Guard(GuardConfig.from_dict(spec))
    raise TypeError(
        f"guard must be None, a preset name, a GuardConfig, a dict or a Guard; got {type(spec).__name__}"
    )
