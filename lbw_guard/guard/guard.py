"""Guard: glues the host-side Controller to a FusedGuardedAdamW without host syncs.

Per step the optimizer calls :meth:`Guard.before_step` (the command for this step) and
:meth:`Guard.after_step` (this step's record, still on the device). The guard

- copies each record to host memory asynchronously (pinned buffers and a CUDA event; on the
  CPU a plain copy) and hands the controller the record of ``lag`` steps ago, whose copy has
  completed, so the loop never waits on the GPU; the same lag on the CPU keeps CPU and GPU
  runs identical and deterministic;
- executes the controller's rollbacks, takes snapshots at an interval set from their measured
  cost, raises :class:`GuardGaveUp` (or calls ``on_give_up``) when the controller gives up;
- writes the trace (``trace_path``) that ``lbw-guard replay`` reproduces exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from typing import Callable, Iterable

import torch
from torch import Tensor

from lbw_guard.control import GuardCommand, StepRecord
from lbw_kernels import contract as C
from lbw_guard.distributed import is_distributed
from lbw_guard.step_buffers import read_doubles, write_doubles

from .buffers import WatchedBuffers, buffers_of
from .config import GuardConfig, preset
from .controller import STABLE, Controller
from .events import Event, JsonlWriter, run_start_line
from .recovery import GuardGaveUp
from .signals import HostRecord
from .snapshots import SnapshotRing

STATE_VERSION = 2


class _HostCopies:
    """Host copies of device records: a few reusable (pinned) buffers, each with the event of
    the copy into it, so reading one never waits in practice."""

    def __init__(self, slots: int):
        self.slots = slots
        self.buffers: list[Tensor | None] = []  # grown on use, up to slots (a large lag costs nothing up front)
        self.events: list = []
        self.next = 0

    def push(self, record: Tensor) -> int:
        i = self.next % self.slots
        self.next += 1
        if i == len(self.buffers):
            self.buffers.append(None)
            self.events.append(None)
        if self.events[i] is not None:
            self.events[i].synchronize()
        size = record.numel()
        # one slot at a time: the others hold queued records, which keep their size (the group
        # count changes with add_param_group, and a queued record is of the groups before it)
        if self.buffers[i] is None or self.buffers[i].numel() != size:
            self.buffers[i] = torch.empty(size, dtype=torch.float64, pin_memory=record.device.type == "cuda")
        if record.device.type == "cuda":
            self.buffers[i].copy_(record, non_blocking=True)
            self.events[i] = torch.cuda.Event()
            self.events[i].record()
        else:
            write_doubles(self.buffers[i], read_doubles(record))
            self.events[i] = None
        return i

    def read(self, i: int) -> list[float]:
        if self.events[i] is not None:
            self.events[i].synchronize()  # recorded `lag` steps ago: long complete
            self.events[i] = None
        return list(read_doubles(self.buffers[i]))


class _Pending:
    """One record on its way to the host."""

    def __init__(self, rec: HostRecord, slot: int, grad_norm):
        self.rec = rec
        self.slot = slot
        self.grad_norm = grad_norm  # host float, or a (pinned host tensor, event) pair, or None


def _group_sources(before: list[dict], now: list[dict]) -> list[int | None]:
    """For each group now, its index at the last bind (None: a new group). Groups are matched by
    identity, so a group deleted from the middle takes its state with it. When no group is the
    same object (``load_state_dict`` builds new group dicts), position is all there is."""
    index = {id(g): i for i, g in enumerate(before)}  # ``before`` is held: no id is reused
    sources = [index.get(id(g)) for g in now]
    if before and all(s is None for s in sources):
        return list(range(len(now)))
    return sources


class Guard:
    """The training guard. Build it from a :class:`GuardConfig` (or use ``make_guard``).

    ``on_give_up``: called with the :class:`GuardGaveUp` when trouble persists with no rollback
    left; if it returns, the guard restarts its statistics and goes on. Without it, the
    exception propagates out of ``optimizer.step()``.
    """

    def __init__(self, config: GuardConfig | None = None, *, on_give_up: Callable | None = None):
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"Guard expects a GuardConfig, got {type(config).__name__}")
        if on_give_up is not None and not callable(on_give_up):
            raise TypeError("on_give_up must be callable (it receives the GuardGaveUp exception)")
        self.config = config if config is not None else GuardConfig()
        self.on_give_up = on_give_up
        self.controller: Controller | None = None
        self.optimizer = None
        self.records: deque[dict] = deque(maxlen=max(self.config.keep_trace, 1))
        self._pending: deque[_Pending] = deque()
        self._issued: dict[int, tuple[list[float], list[float]]] = {}
        self._copies = _HostCopies(self.config.lag + 2)
        self._ring = SnapshotRing(self.config.snapshot_ring + 1, self.config.snapshot_device)
        self._buffers = WatchedBuffers()  # module buffers kept in step with skips and rollbacks
        self._writer: JsonlWriter | None = None
        self._trace_failed = False
        self._param_key: tuple | None = None
        self._groups: list[dict] = []  # the optimizer's groups and parameters at the last bind,
        self._params: list = []  # held so that their ids name them until the next bind
        self._last_snapshot: int | None = None
        self._step_clock: float | None = None
        self._step_seconds: float | None = None
        self._logged_events = 0
        self._seed: list[float] = []

    # ------------------------------------------------------------------ binding
    def bind(self, optimizer) -> None:
        """Attach to ``optimizer`` (again after ``add_param_group`` or ``load_state_dict``)."""
        if self.optimizer is not None and self.optimizer is not optimizer:
            raise ValueError("this Guard is already bound to another optimizer; build one Guard per optimizer")
        path = self.config.trace_path
        if path is not None and self._writer is None:
            try:  # here, not inside the first step(), which would fail half-way through
                open(path, "a").close()
            except (OSError, ValueError) as exc:
                raise ValueError(f"GuardConfig.trace_path={path!r} cannot be written ({exc}); pass a writable "
                                 "file path, or trace_path=None") from None
        self.optimizer = optimizer
        groups = list(optimizer.param_groups)
        bound = {}  # what replay must repeat: the groups' new order, the snapshots dropped
        if self.controller is None:
            self.controller = Controller(self.config, len(groups))
        else:
            old = self.controller.num_groups
            sources = _group_sources(self._groups, groups)
            if sources[:old] != list(range(old)):  # not only groups added
                self._drop_pending()  # records of groups that are gone, or now in other places
            if sources != list(range(old)):
                self.controller.regroup(sources)
                bound["groups"] = sources
        self._groups = groups
        params = [p for g in groups for p in g["params"]]
        key = tuple((id(p), tuple(p.shape)) for p in params)
        if key != self._param_key:  # snapshots of another parameter set cannot be restored
            if self._param_key is not None and not self._ring.follow(self._params, params):
                self._ring.clear()
                self._ring.release_start()  # nor can the start
                self._buffers.retain([], start=False)
                self.controller.snapshots_lost()
                bound["snapshots"] = "dropped"
            self._param_key, self._params = key, params
        self._seed = optimizer.inverse_matrix_rms()
        self.controller.governor.seed_ratio(self._seed)
        if self._writer is not None:  # replay seeds its governor the same way
            self._trace_line({"type": "seed", "ratio": self._seed, **bound})

    def watch_buffers(self, source) -> None:
        """Keep ``source``'s buffers (a module's, e.g. BatchNorm's running statistics, or an
        iterable of tensors) in step with the parameters: a bad step's forward pass leaves no
        trace in them, and a rollback restores them with the parameters (see
        :mod:`lbw_guard.guard.buffers`). The optimizer sees parameters only, so call this once
        with the model; the Trainer integration does it for you. A copy of the optimizer
        (``deepcopy``, pickling) starts a fresh guard that watches none: call it on the copy
        with the copy's model."""
        self._buffers.watch(buffers_of(source))

    @property
    def watched_buffers(self) -> int:
        """How many buffers :meth:`watch_buffers` registered."""
        return len(self._buffers)

    # ------------------------------------------------------------------ per step
    def before_step(self, step: int) -> GuardCommand:
        if self.controller is None:
            raise RuntimeError("Guard.before_step called before bind(optimizer)")
        if self.config.acts:
            self._maybe_take_start()  # before the wait below: the step must not write p under the copy
            self._ring.before_step()  # the last snapshot copy must have read p, m, v
        command = self.controller.command(step, self.optimizer._host_lrs())
        self._issued[step] = (list(command.scale), list(command.gate))
        self._flush_events()
        return command

    def after_step(self, record: StepRecord) -> None:
        now = record.step
        self._time_step()
        scale, gate = self._issued.pop(now, ([1.0] * self.controller.num_groups, [1.0] * self.controller.num_groups))
        G = self.controller.num_groups
        rec = HostRecord(step=now, record=[], num_groups=G, lrs=[float(x) for x in record.lrs], scale=scale,
                         gate=gate, has_loss=record.has_loss,
                         beta1=None if record.beta1 is None else [float(x) for x in record.beta1])
        if self.config.acts:
            self._buffers.after_step(record.record, len(self.optimizer.param_groups))
        self._pending.append(_Pending(rec, self._copies.push(record.record), self._grad_norm_copy(record.grad_norm)))
        if self._process_pending(self.config.lag, now):
            self._maybe_snapshot(now)

    def _process_pending(self, keep: int, now: int) -> bool:
        """Judge the queued records, oldest first, until ``keep`` are left (or a rollback drops
        them). False when an ``on_give_up`` hook loaded a checkpoint: its state stands."""
        while len(self._pending) > keep:
            pending = self._pending.popleft()
            rec = self._host_record(pending, now)
            decision = self.controller.observe(rec, now)
            self._trace_record(rec, decision["signals"])
            self._flush_events()
            if decision["release_start"]:
                self._ring.release_start()
                self._buffers.release_start()
            if decision["rollback_to"] is not None:
                self._rollback(decision["rollback_to"], now)
                break
            if decision["give_up"] is not None:
                self._give_up(decision["give_up"])
                if self.optimizer.num_steps != now:
                    return False
        return True

    def _host_record(self, pending: _Pending, now: int | None) -> HostRecord:
        """The pending record with its values on the host (reads the copy once)."""
        rec = pending.rec
        if pending.slot is not None:
            rec.record = self._copies.read(pending.slot)
            pending.slot = None
            gn = pending.grad_norm
            if isinstance(gn, tuple):
                if gn[1] is not None:
                    gn[1].synchronize()
                gn = float(gn[0])
            rec.grad_norm = gn
        if now is not None:
            rec.now = now
        return rec

    @staticmethod
    def _grad_norm_copy(norm):
        if norm is None:
            return None
        if isinstance(norm, Tensor):
            if norm.device.type == "cuda":
                host = torch.empty((), dtype=torch.float64, pin_memory=True)
                host.copy_(norm.detach().reshape(()), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                return host, event
            return float(norm.detach().reshape(()))
        return float(norm)

    def _time_step(self) -> None:
        clock = time.perf_counter()
        if self._step_clock is not None:
            dt = clock - self._step_clock
            self._step_seconds = dt if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * dt
        self._step_clock = clock

    def _rollback(self, target: int, now: int) -> None:
        try:
            self._ring.restore(target, self.optimizer)
        except (KeyError, RuntimeError) as exc:
            self.controller.rollback_failed(now, target, str(exc))
            self._trace_line({"type": "rollback_failed", "step": now, "to_step": target, "error": str(exc)})
            self._ring.clear()
            self._ring.release_start()
            self._buffers.retain([], start=False)
            return
        self._buffers.restore(target)  # (a snapshot taken before they were watched holds none)
        self._ring.retain(self.controller.recovery.verified_snapshots)
        self._buffers.retain(self._ring.steps(), start=self._ring.start.step is not None)
        self._drop_pending()  # the queued records describe the abandoned trajectory
        self._issued = {s: v for s, v in self._issued.items() if s > now}

    def _drop_pending(self) -> None:
        """Forget the queued records, unprocessed."""
        for p in self._pending:  # replay needs their lrs to issue the same commands
            self._trace_line({"type": "dropped", "step": p.rec.step, "lrs": p.rec.lrs})
        self._pending.clear()

    def _give_up(self, evidence: dict) -> None:
        exc = GuardGaveUp(
            f"the guard gave up at step {evidence['step']}: {evidence['why']} "
            f"({evidence['consecutive_trouble']} records in trouble, {evidence['rollbacks_in_window']} rollbacks "
            f"in the window, verified snapshots {evidence['verified_snapshots']}); last reasons "
            f"{evidence['reasons']}. Lower the learning rate, check the data and the loss scale, or pass "
            "Guard(on_give_up=...) to decide yourself.",
            evidence,
        )
        self._flush_events()
        if self.on_give_up is None:
            raise exc
        self.controller.accept_give_up()  # first: a hook that loads a checkpoint replaces this state
        self.on_give_up(exc)

    def _maybe_take_start(self) -> None:
        """Before the first step the guard sees, hold the state the run begins from."""
        c = self.config
        if not (c.snapshots and c.start_rise is not None and c.early_records > 0):
            return
        if self.controller.processed or self._pending or self.controller.recovery.start_held:
            return  # not the run's first step, or the start is held already
        self._ring.take_start(self.optimizer)
        self._buffers.take(0, keep=self._ring.steps())
        self.controller.start_taken()
        self._trace_line({"type": "start"})

    def _maybe_snapshot(self, now: int) -> None:
        c = self.config
        if not (c.snapshots and c.acts) or self.controller.regime != STABLE:
            return
        if self.controller.recovery.consecutive_trouble or self.controller.recovery.pending_snapshots:
            return
        if c.snapshot_interval:
            interval = c.snapshot_interval
        elif is_distributed():  # every rank must snapshot on the same steps: no local timings
            interval = min(10, max(1, c.max_rollback_distance // 2))
        else:
            interval = self._ring.interval(self._step_seconds, c.snapshot_budget, c.max_rollback_distance)
        if self._last_snapshot is not None and now - self._last_snapshot < interval:
            return
        self._ring.take(now, self.optimizer, keep=self.controller.recovery.verified_snapshots)
        self._buffers.take(now, keep=self._ring.steps())
        self._last_snapshot = now
        self.controller.snapshot_taken(now)
        self._trace_line({"type": "snapshot", "step": now})

    def params_joined(self, count: int) -> None:
        """The optimizer is about to step ``count`` parameters for the first time, after the run
        began (unfrozen layers, a MoE expert first routed to, a new param group). Their first
        gradients and Adam's first steps move the gradient and the loss to levels the running
        statistics say nothing of, so the detectors restart; the snapshots stay restorable (the
        joined parameters go back to their values with zero moments)."""
        if self.controller is None:
            return  # not attached yet: no statistics to restart
        step = self._steps_taken()
        self.controller.params_joined(step, count)
        self._trace_line({"type": "params_joined", "step": step, "count": int(count)})
        self._flush_events()

    def notify_data_change(self) -> None:
        """Tell the guard the data changed on purpose: a loss at a new level is not a spike."""
        if self.controller is None:
            return  # not attached to an optimizer yet: nothing learnt from the old data
        step = self._steps_taken()
        # The queued records are of the old data: judged now, against the old statistics, not
        # folded into the new ones (on a GPU this reads them at once: one host sync).
        if not self._process_pending(0, step):
            return  # an on_give_up hook loaded a checkpoint
        self.controller.notify_data_change(step)
        self._ring.release_start()
        self._buffers.release_start()
        self._trace_line({"type": "data_change", "step": step})
        self._flush_events()

    def _steps_taken(self) -> int:
        """The optimizer's step count (0 before the guard is bound to one)."""
        return self.optimizer.num_steps if self.optimizer is not None else 0

    def _trace_line(self, line: dict) -> None:
        """A line of the trace: a record, or a marker of what the guard did between records."""
        if self.config.keep_trace:
            self.records.append(line)
        self._write_trace([line])

    # ------------------------------------------------------------------ events and traces
    def _flush_events(self) -> None:
        log = self.controller.events
        total = sum(log.counts.values())
        new = total - self._logged_events
        if new > 0 and self.config.trace_path is not None:
            self._write_trace(event.to_dict() for event in list(log.ring)[-min(new, len(log.ring)):])
        self._logged_events = total

    def _trace_record(self, rec: HostRecord, signals: dict) -> None:
        if self.config.trace_path is None and not self.config.keep_trace:
            return
        self._trace_line({"type": "record", **rec.to_dict(), "regime": self.controller.regime, "signals": signals})

    def _write_trace(self, lines: Iterable[dict]) -> None:
        """Append ``lines`` to the trace file. A write that fails (disk full, the file's
        volume gone) stops the tracing with a warning: training must not fail on its log."""
        if self.config.trace_path is None or self._trace_failed:
            return
        try:
            if self._writer is None:
                self._writer = JsonlWriter(self.config.trace_path, mode="a")
                self._writer.write(run_start_line(self.config.to_dict()))
                self._writer.write({"type": "seed", "ratio": self._seed})
            for line in lines:
                self._writer.write(line)
        except OSError as exc:
            self._trace_failed = True
            self._close_writer_quietly()
            warnings.warn(f"lbw-guard: the trace {self.config.trace_path!r} could not be written ({exc}); "
                          "tracing stops here and training goes on. The file holds the lines written "
                          "before the failure.", RuntimeWarning, stacklevel=2)

    def _close_writer_quietly(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the buffered tail is lost with the failed write

    def write_jsonl(self, path) -> None:
        """Write the kept records (``keep_trace``) and the kept events to ``path``."""
        with JsonlWriter(path, mode="w") as writer:
            writer.write(run_start_line(self.config.to_dict()))
            writer.write({"type": "seed", "ratio": self._seed})
            writer.write_all(self.records)
            if self.controller is not None:
                writer.write_all(e.to_dict() for e in self.controller.events)

    def close(self) -> None:
        """Finish the trace: the steps issued but not yet processed, so that replay issues the
        same last commands (an unclosed trace replays up to its last processed record)."""
        if self._writer is not None:
            lines = [{"type": "issued", "step": p.rec.step, "lrs": p.rec.lrs} for p in self._pending]
            if self.optimizer is not None:
                lines.append({"type": "end", "step": self.optimizer.num_steps})
            self._write_trace(lines)
            self._close_writer_quietly()

    # ------------------------------------------------------------------ introspection
    @property
    def regime(self) -> str:
        return self.controller.regime if self.controller is not None else "warmup"

    @property
    def scale(self) -> list[float]:
        """The scale issued for the latest step, per group."""
        return list(self.controller.last_scale) if self.controller is not None else []

    @property
    def events(self) -> list[Event]:
        """The most recent events (a ring of ``event_capacity``)."""
        return list(self.controller.events) if self.controller is not None else []

    @property
    def interventions(self) -> list[Event]:
        return [e for e in self.events if e.intervention and e.applied]

    def summary(self) -> dict:
        """Honest accounting of the run so far: fractions of steps capped, skipped and frozen,
        the mean effective lr scale, rollbacks, counts of every action, and the regime."""
        if self.controller is None:
            return {}
        out = self.controller.accounting.summary()
        out.update({
            "regime": self.controller.regime,
            "scale": self.scale,
            "interventions": self.controller.events.applied_interventions,
            "actions": dict(self.controller.events.counts),
        })
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self, snapshots: bool | None = None) -> dict:
        """``snapshots``: include the snapshot ring (None: as ``config.snapshots_in_state_dict``)."""
        pending = [self._host_record(p, None).to_dict() for p in self._pending]
        state = {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "pending": pending,
            "issued": {int(s): [list(v[0]), list(v[1])] for s, v in self._issued.items()},
            "last_snapshot": self._last_snapshot,
        }
        if self.config.snapshots_in_state_dict if snapshots is None else snapshots:
            state["snapshots"] = self._ring.state_dict()
        start = self._ring.start_state_dict()
        if start is not None:  # held through the first records only (a copy of the parameters)
            state["start"] = start
        return state

    def check_state_dict(self, state: dict, num_steps: int) -> None:
        """Raise ValueError/TypeError naming the entry if ``state`` cannot be loaded (a dry run
        on a fresh controller, so nothing of this guard changes)."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"guard state version {state.get('version')!r} is not {STATE_VERSION} "
                                 "(saved by another version of lbw-guard)")
            missing = [k for k in ("controller", "pending", "issued") if k not in state]
            if missing:
                raise ValueError(f"state_dict['guard'] lacks {missing} (not a Guard.state_dict())")
            ctrl = state.get("controller")
            if ctrl is not None:
                if not isinstance(ctrl, dict):
                    raise TypeError("state_dict['guard']['controller'] must be a dict")
                G = self.controller.num_groups if self.controller is not None else None
                if G is not None and ctrl.get("num_groups") != G:
                    raise ValueError(f"guard state has {ctrl.get('num_groups')} parameter groups, "
                                     f"the optimizer has {G}")
                Controller(self.config, ctrl.get("num_groups", 1)).load_state_dict(ctrl)
            groups = ctrl.get("num_groups") if isinstance(ctrl, dict) else None
            for r in state["pending"]:
                rec = HostRecord.from_dict(r)
                size = C.record_layout(rec.num_groups).size if isinstance(rec.num_groups, int) else None
                if (not isinstance(rec.record, list) or not isinstance(rec.step, int) or rec.step > num_steps
                        or len(rec.record) != size or (groups is not None and not 1 <= rec.num_groups <= groups)):
                    raise ValueError(f"pending guard record of step {rec.step!r} is malformed or after step {num_steps}")
            for step, value in state["issued"].items():
                int(step)
                if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                        isinstance(v, (list, tuple)) and (groups is None or len(v) <= groups)
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                        for v in value)):
                    raise ValueError("state_dict['guard']['issued'] entries must be [scale, gate], two lists of "
                                     "one finite number per param group")
            last = state.get("last_snapshot")
            if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= num_steps):
                raise ValueError(f"state_dict['guard']['last_snapshot'] must be None or a step in [0, {num_steps}], "
                                 f"got {last!r}")
            snaps = state.get("snapshots")
            if snaps is not None and not isinstance(snaps, dict):
                raise TypeError("state_dict['guard']['snapshots'] must be a dict")
            start = state.get("start")
            if start is not None and not (isinstance(start, dict) and isinstance(start.get("params_only"), bool)
                                          and isinstance(start.get("buffers"), list)
                                          and all(isinstance(b, Tensor) for b in start["buffers"])):
                raise TypeError("state_dict['guard']['start'] must be a dict with 'params_only' (a bool) and "
                                "'buffers' (a list of tensors)")
        except (KeyError, AttributeError, TypeError, ValueError, OverflowError) as exc:
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"state_dict['guard'] is malformed: {type(exc).__name__}: {exc}") from None

    def reset(self) -> None:
        """Forget the run: a state without a guard's was loaded into the optimizer (a
        ``torch.optim.AdamW`` or unguarded checkpoint), so the statistics, queued records,
        snapshots and the held start of the run before it describe other weights. The guard (bound
        to its optimizer) goes on as if attached to a freshly resumed one (config and
        ``on_give_up`` kept)."""
        self._pending = deque()
        self._issued = {}
        self._last_snapshot = None
        self._step_clock = None
        self._ring.clear()
        self._ring.release_start()
        self._buffers.clear()
        self.records.clear()
        self.controller = Controller(self.config, len(self.optimizer.param_groups))
        self.controller.governor.seed_ratio(self._seed)
        self._logged_events = 0
        self._trace_resume(self._steps_taken())

    def _trace_resume(self, step: int) -> None:
        """Replay of what follows starts from the controller as it is now."""
        if self.config.trace_path is not None:
            self._trace_line({"type": "resume", "step": step, "controller": self.controller.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        if self.controller is None:
            raise RuntimeError("Guard.load_state_dict needs the guard attached to its optimizer first: build "
                               "FusedGuardedAdamW(..., guard=guard), then load the optimizer's state dict "
                               "(which holds the guard's)")
        num_steps = self.optimizer.num_steps if self.optimizer is not None else 1 << 62
        self.check_state_dict(state, num_steps)
        if state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        self._issued = {int(s): (list(v[0]), list(v[1])) for s, v in state["issued"].items()}
        self._pending = deque()
        for r in state["pending"]:
            self._pending.append(_Pending(HostRecord.from_dict(r), None, None))
        # A checkpoint without its snapshots (the default) leaves nothing to roll back to: the
        # next stable step snapshots, instead of a whole interval after the saved one. (Decided
        # from the checkpoint alone, so every rank resuming it snapshots on the same steps.)
        self._last_snapshot = state.get("last_snapshot") if "snapshots" in state else None
        self._ring.clear()
        self._buffers.clear()  # the checkpoint's snapshots (and start) hold no buffers
        held = self.optimizer is not None and self._ring.load_start(state.get("start"), self.optimizer)
        if "snapshots" in state and self.optimizer is not None:
            self._ring.load_state_dict(state["snapshots"], self.optimizer)
        kept = set(self._ring.steps())
        rec = self.controller.recovery
        rec.start_held = rec.start_held and held  # a start whose tensors did not come is let go
        if not rec.start_held:
            self._ring.release_start()
            self._buffers.release_start()
        rec.verified_snapshots = [s for s in rec.verified_snapshots if s in kept]
        rec.pending_snapshots = [s for s in rec.pending_snapshots if s in kept]
        self._logged_events = sum(self.controller.events.counts.values())
        self._trace_resume(num_steps if num_steps < 1 << 62 else 0)


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


__all__ = ["Guard", "GuardGaveUp", "make_guard"]
