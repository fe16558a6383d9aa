"""A bounded ring of snapshots of params and AdamW state, for rollback, with a bounded cost.

Buffers are allocated once per slot and reused. On a GPU the copy runs on a side stream that
first waits for the step it copies; the next optimizer step waits for the copy (forward and
backward overlap it), so the copy never sits on the compute stream. ``snapshot_device="device"``
keeps the ring on the GPU instead (fast, costs device memory). Rollback copies back *in place*,
so no parameter or state tensor changes identity (DDP/FSDP hooks, references held by the user
and the kernels' tables stay valid).

Beside the ring, the *start*: the state the run began from, held through its first records so
that a run whose first steps made it worse than it began can start again (the moments, not yet
created then, go back to zero).

How often to snapshot comes from a cost budget: the guard measures what a copy takes and how
long a step takes, and spaces the snapshots so that copies stay under ``snapshot_budget`` of
the run's time: at least 5 steps apart, and at most half the maximal rollback distance (or 5,
when that distance is under 10).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from lbw_guard.distributed import local_tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
MIN_INTERVAL = 5


def _params(optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _sources(optimizer, layout: tuple | None = None) -> list[Tensor]:
    """Every tensor a snapshot holds, in a fixed order: per parameter, it and its state (with
    ``layout``: only the state keys each parameter had then, see :func:`_layout`)."""
    out = []
    for p, keys in zip(_params(optimizer), layout or _layout(optimizer)):
        out.append(local_tensor(p.detach()))
        out.extend(local_tensor(optimizer.state[p][k]) for k in keys)
    return out


def _layout(optimizer) -> tuple:
    """Per parameter, the state keys it has (none before its first step)."""
    return tuple(tuple(k for k in STATE_KEYS if k in optimizer.state.get(p, {})) for p in _params(optimizer))


def _restorable(then: tuple, now: tuple) -> bool:
    """A snapshot taken with layout ``then`` fits the optimizer's layout ``now``: the same
    parameters, each with the state it had then, or with state it gained since (stepped for
    the first time after the snapshot)."""
    return len(then) == len(now) and all(not a or a == b for a, b in zip(then, now))


class Slot:
    """One snapshot: buffers matching the sources, the step they hold, and the copy's event."""

    def __init__(self):
        self.step: int | None = None
        self.buffers: list[Tensor] = []
        self.layout: tuple | None = None  # the state keys of each parameter when it was taken
        self.event = None  # CUDA event of the copy into (or out of) the buffers

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def runs(self) -> list[list[Tensor]]:
        """The buffers per parameter: its value, then its state (``layout``'s keys)."""
        out, i = [], 0
        for keys in self.layout:
            out.append(self.buffers[i:i + 1 + len(keys)])
            i += 1 + len(keys)
        return out

    def fits(self, sources: list[Tensor]) -> bool:
        return len(self.buffers) == len(sources) and all(
            b.shape == s.shape and b.dtype == s.dtype for b, s in zip(self.buffers, sources))


class SnapshotRing:
    """``capacity`` snapshots (the verified ones and one being verified)."""

    def __init__(self, capacity: int, where: str = "cpu"):
        self.capacity = capacity
        self.where = where
        self.slots: list[Slot] = []  # grown on use, up to capacity (a large ring costs nothing up front)
        self._stream = None
        self.last_copy_seconds: float | None = None
        self._timing = None  # (start event, end event) of the last GPU copy, read later
        self.pending_wait = None  # event the next optimizer step must wait for
        self.start = Slot()  # the state before the first step (step 0), or no buffers
        self.start_params = 0  # how many parameters the start holds (its moments did not exist)

    def steps(self) -> list[int]:
        return [s.step for s in self.slots if s.step is not None]

    def clear(self) -> None:
        for s in self.slots:
            s.wait()
            s.step = None

    def retain(self, steps) -> None:
        keep = set(steps)
        for s in self.slots:
            if s.step is not None and s.step not in keep:
                s.step = None

    def follow(self, before: list[Tensor], now: list[Tensor]) -> bool:
        """Keep the snapshots (and the start) through a change of the parameter lists that only
        removed or moved parameters (a group deleted, a weight moved to another group): each
        snapshot's tensors are put in the new order, so a rollback restores every parameter
        that remains from its own values. False, and nothing is changed, when a parameter
        joined (no snapshot holds its values) or changed shape: the caller drops them."""
        where = {id(p): i for i, p in enumerate(before)}
        order = [where.get(id(p)) for p in now]
        if None in order:
            return False
        held = [s for s in self.slots + [self.start] if s.step is not None]
        for slot in held:
            slot.wait()
            if slot.layout is None or len(slot.layout) != len(before):
                return False
            runs = slot.runs()
            if any(runs[j][0].shape != local_tensor(p.detach()).shape for j, p in zip(order, now)):
                return False
        for slot in held:
            runs = slot.runs()
            slot.buffers = [b for j in order for b in runs[j]]
            slot.layout = tuple(slot.layout[j] for j in order)
        if self.start_params:
            self.start_params = len(now)
        return True

    # ------------------------------------------------------------------ taking
    def take(self, step: int, optimizer, keep: list[int]) -> None:
        """Snapshot the state after ``step`` into a slot not holding one of ``keep``."""
        slot = next((s for s in self.slots if s.step is None or s.step not in keep), None)
        if slot is None and len(self.slots) < self.capacity:
            slot = Slot()
            self.slots.append(slot)
        if slot is None:
            return
        layout = _layout(optimizer)
        self._copy_into(slot, _sources(optimizer, layout))
        slot.step = step
        slot.layout = layout

    def take_start(self, optimizer) -> None:
        """Hold the state before the first step: the parameters, and whatever state exists (none
        for a fresh optimizer: its moments start at zero)."""
        params = _params(optimizer)
        sources = _sources(optimizer)
        self.start_params = len(params) if len(sources) == len(params) else 0
        # Copied once, read back at most once: page-locking its host memory costs more than
        # that one copy saves (on an H100 machine, with 2 GB of parameters, the first guarded
        # step took 4.5 s longer pinned), so the start goes to pageable memory, and its copy
        # holds the host back once.
        self._copy_into(self.start, sources, timed=False, pinned=False)
        self.start.step = 0
        self.start.layout = _layout(optimizer)

    def release_start(self) -> None:
        self.start.wait()
        self.start.step = None
        self.start.buffers = []
        self.start.layout = None

    def _copy_into(self, slot: Slot, sources: list[Tensor], timed: bool = True, pinned: bool = True) -> None:
        """Copy ``sources`` into ``slot``; ``timed``: the copy's time sets the snapshot interval;
        ``pinned``: host buffers of GPU tensors are page-locked (the ring's, reused every copy)."""
        slot.wait()
        if not slot.fits(sources):
            slot.buffers = [self._buffer_like(t, pinned) for t in sources]
        device = next((t.device for t in sources if t.device.type == "cuda"), None)
        started = time.perf_counter()
        if device is None:
            with torch.no_grad():
                torch._foreach_copy_(slot.buffers, sources)
            if timed:
                self.last_copy_seconds = time.perf_counter() - started
        else:
            self._copy_on_side_stream(slot, sources, device, timed)

    def _buffer_like(self, t: Tensor, pinned: bool) -> Tensor:
        if t.device.type == "cuda" and self.where == "cpu":
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        return torch.empty_like(t, memory_format=torch.preserve_format)

    def _copy_on_side_stream(self, slot: Slot, sources: list[Tensor], device, timed: bool) -> None:
        self._read_timing()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        current = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._stream.wait_stream(current)  # copy the state this step left
        with torch.cuda.stream(self._stream), torch.no_grad():
            start.record()
            for b, s in zip(slot.buffers, sources):
                b.copy_(s, non_blocking=True)
            end.record()
        for s in sources:  # the caching allocator must not reuse them before the copy ran
            s.record_stream(self._stream)
        slot.event = end
        self.pending_wait = end
        if timed:
            self._timing = (start, end)

    def _read_timing(self) -> None:
        if self._timing is not None and self._timing[1].query():
            self.last_copy_seconds = self._timing[0].elapsed_time(self._timing[1]) / 1000.0
            self._timing = None

    def before_step(self) -> None:
        """Called before the optimizer writes p, m, v: the last copy must have read them."""
        if self.pending_wait is not None:
            torch.cuda.current_stream().wait_event(self.pending_wait)
            self.pending_wait = None

    # ------------------------------------------------------------------ restoring
    def restore(self, step: int, optimizer) -> None:
        """Copy snapshot ``step`` (0: the start) back into the optimizer's tensors, in place."""
        slot = self.start if step == 0 else next((s for s in self.slots if s.step == step), None)
        if slot is None or slot.step != step:
            raise KeyError(f"no snapshot of step {step} (have {self.steps()})")
        slot.wait()
        now = _layout(optimizer)
        sources = _sources(optimizer, now)
        zeroed = []
        if slot is self.start and self.start_params and len(sources) != self.start_params:
            # The moments did not exist at the start: back to zero, as a fresh optimizer has them.
            params = _params(optimizer)
            zeroed = [local_tensor(optimizer.state[p][k]) for p in params
                      for k in STATE_KEYS if k in optimizer.state.get(p, {})]
            sources = [local_tensor(p.detach()) for p in params]
        elif slot is not self.start and slot.layout not in (None, now):
            sources, zeroed = self._joined_since(slot, optimizer, now)
        if not slot.fits(sources):
            raise RuntimeError("the parameters or their state changed shape since the snapshot was taken")
        with torch.no_grad():
            torch._foreach_copy_(sources, slot.buffers)
            for t in zeroed:
                t.zero_()
        device = next((t.device for t in sources if t.device.type == "cuda"), None)
        if device is not None:  # the host buffers must outlive the copies out of them
            slot.event = torch.cuda.Event()
            slot.event.record(torch.cuda.current_stream(device))

    @staticmethod
    def _joined_since(slot: Slot, optimizer, now: tuple) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters stepped for the first time after the snapshot (unfrozen, a MoE expert
        first routed to) had no moments then: the snapshot restores their values, and their
        moments and step go back to zero, as a parameter never stepped has them."""
        if not _restorable(slot.layout, now):
            raise RuntimeError("the parameters or their state changed shape since the snapshot was taken")
        zeroed = [local_tensor(optimizer.state[p][k]) for p, then, keys in zip(_params(optimizer), slot.layout, now)
                  if not then for k in keys]
        return _sources(optimizer, slot.layout), zeroed

    # ------------------------------------------------------------------ budget
    def interval(self, step_seconds: float | None, budget: float, max_distance: int) -> int:
        """Steps between snapshots so that copies cost at most ``budget`` of the run's time."""
        self._read_timing()
        cap = max(MIN_INTERVAL, max_distance // 2)
        if not self.last_copy_seconds or not step_seconds or step_seconds <= 0:
            return min(10, cap)
        wanted = math.ceil(self.last_copy_seconds / (budget * step_seconds))
        return int(min(cap, max(MIN_INTERVAL, wanted)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The held snapshots, less any with a non-finite value: a snapshot taken on the step a
        parameter went NaN is not verified yet (its record is read a step later, and will discard
        it), and ``load_state_dict`` refuses a non-finite snapshot."""
        out = []
        for s in self.slots:
            if s.step is None:
                continue
            s.wait()
            buffers = [b.detach().cpu().clone() for b in s.buffers]
            if not all(bool(torch.isfinite(b).all()) for b in buffers if b.is_floating_point()):
                continue
            out.append({"step": s.step, "buffers": buffers,
                        "layout": [list(keys) for keys in s.layout] if s.layout is not None else None})
        return {"capacity": self.capacity, "slots": out}

    def start_state_dict(self) -> dict | None:
        """The start's tensors (None when none is held): a checkpoint saved in the first records
        resumes able to go back to it."""
        if self.start.step is None:
            return None
        self.start.wait()
        return {"params_only": bool(self.start_params),
                "buffers": [b.detach().cpu().clone() for b in self.start.buffers]}

    def load_start(self, state: dict | None, optimizer) -> bool:
        """Hold the saved start if its tensors match the optimizer's; whether it is held."""
        self.release_start()
        if not state:
            return False
        params, sources = _params(optimizer), _sources(optimizer)
        expected = [local_tensor(p.detach()) for p in params] if state["params_only"] else sources
        buffers = state["buffers"]
        if len(buffers) != len(expected) or any(
                tuple(b.shape) != tuple(s.shape) or b.dtype != s.dtype for b, s in zip(buffers, expected)):
            return False
        self.start.buffers = [self._buffer_like(s, pinned=False) for s in expected]
        with torch.no_grad():
            for dst, src in zip(self.start.buffers, buffers):
                dst.copy_(src)
        self.start_params = len(params) if state["params_only"] else 0
        self.start.step = 0
        self.start.layout = tuple(() for _ in params) if state["params_only"] else _layout(optimizer)
        return True

    def load_state_dict(self, state: dict, optimizer) -> None:
        """Restore saved snapshots whose tensors match the optimizer's (others are dropped)."""
        self.clear()
        now = _layout(optimizer)
        saved = sorted(state.get("slots", []), key=lambda s: s["step"])[-self.capacity:]
        self.slots += [Slot() for _ in range(len(saved) - len(self.slots))]
        for slot, entry in zip(self.slots, saved):
            buffers = entry["buffers"]
            layout = entry.get("layout")  # saved before layouts were kept: the optimizer's own
            layout = tuple(tuple(keys) for keys in layout) if layout is not None else now
            if not _restorable(layout, now):
                continue  # state the optimizer no longer has
            sources = _sources(optimizer, layout)
            if len(buffers) != len(sources) or any(
                    tuple(b.shape) != tuple(s.shape) or b.dtype != s.dtype for b, s in zip(buffers, sources)):
                continue
            slot.buffers = [self._buffer_like(s, pinned=True) for s in sources]
            with torch.no_grad():
                for dst, src in zip(slot.buffers, buffers):
                    dst.copy_(src)
            slot.step = int(entry["step"])
            slot.layout = layout
