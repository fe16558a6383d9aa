"""Per-device buffers of a fused step, allocated once: the control table the kernels read and
the record they write.

The control table changes on the host between steps (a scheduler moves the lr every step, the
guard moves its scale). It is written without any tensor op: on the CPU straight into the
table's memory, on a GPU into a pinned staging buffer followed by one non-blocking copy. Two
staging buffers alternate, each guarded by the event of the copy that last read it, so the host
never overwrites memory a pending copy still reads and never waits in practice. The table and
the record keep their storage for the life of the optimizer, which is what a captured CUDA
graph needs.
"""

from __future__ import annotations

import array
import ctypes

import torch
from torch import Tensor

from lbw_kernels import contract as C


def write_doubles(dst: Tensor, values: array.array) -> None:
    """Copy host doubles into a contiguous float64 host tensor (no tensor op, no dispatch)."""
    ctypes.memmove(dst.data_ptr(), values.buffer_info()[0], len(values) * 8)


def read_doubles(src: Tensor) -> array.array:
    """The values of a contiguous float64 host tensor as an array of doubles (no tensor op)."""
    out = array.array("d", bytes(src.numel() * 8))
    ctypes.memmove(out.buffer_info()[0], src.data_ptr(), src.numel() * 8)
    return out


class StepBuffers:
    """Control table and record of one device for ``num_groups`` parameter groups."""

    def __init__(self, device: torch.device, num_groups: int):
        self.device = device
        self.num_groups = num_groups
        self.layout = C.record_layout(num_groups)
        self.control = torch.zeros(num_groups + 1, C.NUM_CONTROL, dtype=torch.float64, device=device)
        self.record = torch.zeros(self.layout.size, dtype=torch.float64, device=device)
        self.tensor_out: dict[tuple, Tensor] = {}
        self._uploaded: bytes | None = None
        self._staging: list[list] = []  # [pinned buffer, event of the copy that last read it]
        self._next = 0

    def upload(self, values: array.array) -> None:
        """Make the device table hold ``values`` (row-major [G + 1, NUM_CONTROL]); a no-op
        when they did not change since the last upload."""
        raw = values.tobytes()
        if raw == self._uploaded:
            return
        if self.device.type == "cpu":
            write_doubles(self.control, values)
        else:
            self._upload_async(values)
        self._uploaded = raw

    def _upload_async(self, values: array.array) -> None:
        if len(self._staging) < 2:
            buf = torch.empty(self.control.numel(), dtype=torch.float64, pin_memory=True)
            self._staging.append([buf, None])
        slot = self._staging[self._next % len(self._staging)]
        self._next += 1
        if slot[1] is not None:
            slot[1].synchronize()  # that copy was enqueued a step ago: long complete
        write_doubles(slot[0], values)
        with torch.cuda.device(self.device):
            self.control.view(-1).copy_(slot[0], non_blocking=True)
            slot[1] = torch.cuda.Event()
            slot[1].record()

    def invalidate(self) -> None:
        """Forget what was uploaded: the next ``upload`` writes the table again."""
        self._uploaded = None

    def tensor_sums(self, key: tuple, num_tensors: int) -> Tensor:
        """The per-tensor telemetry buffer of one bucket layout (allocated once per layout)."""
        out = self.tensor_out.get(key)
        if out is None or out.shape[0] != num_tensors:
            if len(self.tensor_out) > 16:  # grad-presence patterns come and go: stay bounded
                self.tensor_out.clear()
            out = torch.zeros(num_tensors, C.NUM_TENSOR_FIELDS, dtype=torch.float64, device=self.device)
            self.tensor_out[key] = out
        return out
