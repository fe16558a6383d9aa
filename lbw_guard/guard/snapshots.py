"""A bounded ring of snapshots of params and AdamW state, for rollback.

A snapshot copies every parameter and its ``step``/``exp_avg``/``exp_avg_sq`` to host
memory: on CUDA asynchronously into pinned buffers (reused from the slot it evicts) with
an event marking completion; on the CPU as plain clones. Rollback copies back *in place*,
so no parameter or state tensor changes identity (DDP/FSDP hooks, references held by the
user and the optimizer's kernel tables stay valid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lbw_guard.distributed import local_tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _params(optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Snapshot:
    def __init__(self, step: int, entries: list[dict], event=None):
        self.step = step
        self.entries = entries  # per parameter: {"param": host tensor, "state": {key: host tensor}}
        self.event = event  # CUDA event recorded after the copies were enqueued, or None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # a snapshot is steps old by the time it is read
            self.event = None


def _host_copy(src: Tensor, reuse: Tensor | None) -> Tensor:
    src = src.detach()
    if src.device.type == "cpu":
        return src.clone()
    if reuse is not None and reuse.shape == src.shape and reuse.dtype == src.dtype:
        buf = reuse
    else:
        buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    buf.copy_(src, non_blocking=True)
    return buf


class SnapshotRing:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: list[Snapshot] = []

    def steps(self) -> list[int]:
        return [s.step for s in self.slots]

    def clear(self) -> None:
        for s in self.slots:
            s.wait()
        self.slots = []

    def retain(self, steps) -> None:
        """Drop snapshots whose step is not in ``steps``."""
        keep = set(steps)
        for s in self.slots:
            if s.step not in keep:
                s.wait()
        self.slots = [s for s in self.slots if s.step in keep]

    def take(self, step: int, optimizer) -> None:
        reuse = None
        if len(self.slots) >= self.capacity:
            reuse = self.slots.pop(0)
            reuse.wait()  # its buffers are about to be overwritten
        entries = []
        old = reuse.entries if reuse is not None else []
        device = None
        for i, p in enumerate(_params(optimizer)):
            prev = old[i] if i < len(old) else {"param": None, "state": {}}
            state = optimizer.state.get(p, {})
            entry = {
                "param": _host_copy(local_tensor(p), prev["param"]),
                "state": {k: _host_copy(local_tensor(state[k]), prev["state"].get(k)) for k in STATE_KEYS if k in state},
            }
            entries.append(entry)
            if p.device.type == "cuda":
                device = p.device
        event = None
        if device is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self.slots.append(Snapshot(step, entries, event))

    def restore(self, step: int, optimizer) -> None:
        """Copy snapshot ``step`` back into the optimizer's tensors, in place."""
        snap = next((s for s in self.slots if s.step == step), None)
        if snap is None:
            raise KeyError(f"no snapshot of step {step} (have {self.steps()})")
        snap.wait()
        params = _params(optimizer)
        if len(params) != len(snap.entries):
            raise RuntimeError("the parameter set changed since the snapshot was taken")
        device = None
        with torch.no_grad():
            for p, entry in zip(params, snap.entries):
                local_tensor(p.data).copy_(entry["param"], non_blocking=True)
                state = optimizer.state.get(p, {})
                for k, buf in entry["state"].items():
                    if k in state:
                        local_tensor(state[k]).copy_(buf, non_blocking=True)
                if p.device.type == "cuda":
                    device = p.device
        if device is not None:  # the host buffers must outlive the copies out of them
            snap.event = torch.cuda.Event()
            snap.event.record(torch.cuda.current_stream(device))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        for s in self.slots:
            s.wait()
        return {
            "capacity": self.capacity,
            "slots": [
                {"step": s.step, "entries": [{"param": e["param"], "state": dict(e["state"])} for e in s.entries]}
                for s in self.slots
            ],
        }

    def load_state_dict(self, state: dict, pin: bool = False) -> None:
        def host(t: Tensor) -> Tensor:
            t = t.detach().to("cpu", copy=True)
            return t.pin_memory() if pin else t

        self.slots = [
            Snapshot(
                int(s["step"]),
                [{"param": host(e["param"]), "state": {k: host(v) for k, v in e["state"].items()}} for e in s["entries"]],
            )
            for s in state["slots"]
        ][-self.capacity:]
