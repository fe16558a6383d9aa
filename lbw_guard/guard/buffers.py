"""Module buffers (BatchNorm's running statistics and the like) kept in step with the guard.

The optimizer sees parameters only, but a forward pass in training mode also writes module
buffers. A batch with one NaN element turns every BatchNorm running statistic it reaches into
NaN: the guard skips the step, the parameters stay finite, and the model is still broken in
eval mode for the rest of the run (a small BatchNorm CNN: held-out loss NaN, where the same
fault in a CNN without BatchNorm ends within 1% of the clean run). A rollback that restores
the parameters but keeps the running statistics of the abandoned trajectory is not a return to
a healthy state either.

So the buffers a user registers (``opt.guard.watch_buffers(model)``):

- go back to their values after the last good step when a step was bad, decided on the
  device without a host sync: the step-wide checks failed (a non-finite or over-limit loss,
  ``found_inf``, the guard's grad-norm skip), a gradient element was not finite, or a watched
  floating buffer is not finite. A skipped step leaves no trace; a batch with finite values
  (an outlier batch the step takes) writes its statistics as it does under plain AdamW;
- are held in each snapshot and in the start, and restored with the parameters on a rollback.

Cost: one copy of the buffers, one small device op per buffer and three more per step, and
one copy per snapshot (BatchNorm's buffers are two floats per channel and a counter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from lbw_kernels import contract as C

from lbw_guard.distributed import local_tensor


def buffers_of(source) -> list[Tensor]:
    """The tensors to watch: a module's buffers (every submodule's), or tensors given as such."""
    if isinstance(source, torch.nn.Module):
        return [b for b in source.buffers() if b is not None]
    if isinstance(source, Tensor):
        return [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(f"watch_buffers takes a torch.nn.Module (its buffers are watched) or an iterable of "
                        f"tensors, got {type(source).__name__}; pass the model: opt.guard.watch_buffers(model)")
    tensors = list(source)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"watch_buffers: item {i} is a {type(t).__name__}, not a tensor; pass the model "
                            "(opt.guard.watch_buffers(model)) or its buffers (model.buffers())")
    return tensors


class WatchedBuffers:
    """The buffers, their values after the last good step, and their snapshots by step (0: the
    start)."""

    def __init__(self):
        self.tensors: list[Tensor] = []
        self.good: list[Tensor] = []  # each buffer after the last good step
        self.snapshots: dict[int, list[Tensor]] = {}

    def watch(self, tensors: list[Tensor]) -> None:
        """Watch ``tensors`` too (each once); their snapshots begin with the next one taken."""
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise TypeError(f"watch_buffers: buffer {i} has layout {t.layout}; only dense buffers can be "
                                "restored in place: pass the dense ones (e.g. a list of the model's buffers)")
        known = {id(t) for t in self.tensors}
        for t in tensors:
            if id(t) in known:
                continue
            known.add(id(t))
            self.tensors.append(t)
            self.good.append(local_tensor(t.detach()).clone())
        self.snapshots.clear()  # a snapshot without the new buffers would restore only some of them

    def __len__(self) -> int:
        return len(self.tensors)

    @torch.no_grad()
    def after_step(self, record: Tensor, num_groups: int) -> None:
        """Undo what a bad step's forward pass wrote into the buffers, and keep a good step's
        values as the ones to go back to (device ops only)."""
        if not self.tensors:
            return
        self._follow_shapes()
        layout = C.record_layout(num_groups)
        fields = record[layout.group_fields].view(num_groups, C.NUM_GROUP_FIELDS)
        bad = (record[layout.globals][C.R_STEP_OK] == 0) | (fields[:, C.T_NONFINITE].sum() > 0)
        live = [local_tensor(t) for t in self.tensors]
        floats = [t for t in live if t.is_floating_point() or t.is_complex()]
        if floats:  # the largest magnitude of each: NaN or inf where one element is
            largest = torch.stack([x.to(bad.device, torch.float64) for x in torch._foreach_norm(floats, math.inf)])
            bad = bad | ~torch.isfinite(largest).all()
        for local, good in zip(live, self.good):
            torch.where(bad.to(local.device), good, local, out=local)
        torch._foreach_copy_(self.good, live)

    def _follow_shapes(self) -> None:
        """A buffer replaced in place by one of another shape or dtype (a module resized) has no
        good value to go back to: its copy starts again from it, and no snapshot holds it."""
        for i, (t, good) in enumerate(zip(self.tensors, self.good)):
            local = local_tensor(t)
            if local.shape != good.shape or local.dtype != good.dtype or local.device != good.device:
                self.good[i] = local.detach().clone()
                self.snapshots.clear()

    @torch.no_grad()
    def take(self, step: int, keep: Iterable[int]) -> None:
        """Hold the buffers as they are after ``step`` (0: the start); forget snapshots not in
        ``keep`` (the guard's ring holds the same steps)."""
        if not self.tensors:
            return
        self._follow_shapes()
        self.retain(keep, start=True)
        # the values after the last good step: the start is taken inside the first step, after
        # its forward pass has written the buffers
        self.snapshots[step] = [good.clone() for good in self.good]

    @torch.no_grad()
    def restore(self, step: int) -> bool:
        """Copy snapshot ``step`` back into the buffers, in place (their ``good`` copies too).
        False when no snapshot of that step holds them (taken before they were watched)."""
        held = self.snapshots.get(step)
        if held is None or len(held) != len(self.tensors):
            return False
        for t, good, value in zip(self.tensors, self.good, held):
            local = local_tensor(t)
            if local.shape != value.shape or local.dtype != value.dtype:
                continue  # resized since: nothing of its own to restore
            local.copy_(value)
            good.copy_(value)
        return True

    def retain(self, steps: Iterable[int], start: bool) -> None:
        """Keep the snapshots of ``steps`` (and the start's while ``start``)."""
        keep = set(steps) | ({0} if start else set())
        for s in [s for s in self.snapshots if s not in keep]:
            del self.snapshots[s]

    def release_start(self) -> None:
        self.snapshots.pop(0, None)

    @torch.no_grad()
    def clear(self) -> None:
        """Forget every snapshot (the start included), and take the buffers as they are now as
        the good values: a checkpoint load or a reset. (Where the model's own checkpoint is
        loaded after the optimizer's, its values become the good ones at the next good step.)"""
        self.snapshots.clear()
        if self.tensors:
            self._follow_shapes()
            torch._foreach_copy_(self.good, [local_tensor(t) for t in self.tensors])
