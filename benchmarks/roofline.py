"""The bandwidth roofline: bytes each optimizer variant must move, and the copy bandwidth.

An AdamW step is memory bound, so its floor is (bytes it must move) / (the bandwidth the
device reaches on a plain copy). The copy bandwidth is measured in the same run; bytes per
parameter follow from what each variant reads and writes (DESIGN §3):

- FusedGuardedAdamW, fp32 params: read p, g, m, v + write p, m, v = 7 x 4 = 28 B/param;
  16-bit params with fp32 moments: read 2+2+4+4, write 2+4+4 = 22 B/param.
- torch.optim.AdamW keeps moments in the parameter dtype: 7 x itemsize (28 fp32, 14 bf16).
- A grad pre-pass (max_grad_norm, or the guard's precheck) reads the grads once more.
- clip_grad_norm_ reads the grads for the norm, then reads and writes them to scale them.

This module only does arithmetic and one timed copy; it imports nothing from pytest.
"""

from __future__ import annotations

import time

import torch

STATE_BYTES = 4  # our moments are fp32 whatever the parameter dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def lbw_bytes_per_param(dtype: torch.dtype, prepass: float = 0.0) -> float:
    """FusedGuardedAdamW; ``prepass`` = grad pre-passes per step (0, 1, or a measured mean)."""
    s = itemsize(dtype)
    return 2 * s + 2 * STATE_BYTES + s + 2 * STATE_BYTES + prepass * s


def torch_adamw_bytes_per_param(dtype: torch.dtype, clip: bool = False) -> float:
    """torch.optim.AdamW (foreach or fused), optionally after clip_grad_norm_."""
    s = itemsize(dtype)
    return 7 * s + (3 * s if clip else 0)


def gbps(bytes_per_param: float, numel: int, ms_per_step: float) -> float:
    return bytes_per_param * numel / (ms_per_step * 1e-3) / 1e9


def copy_bytes(numel: int, dtype: torch.dtype = torch.float32) -> int:
    """A copy_ reads the source and writes the destination: 2 x size."""
    return 2 * numel * itemsize(dtype)


def copy_buffers(device: torch.device, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = nbytes // 4
    return torch.ones(n, device=device), torch.empty(n, device=device)


def quick_copy_gbps(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Median copy bandwidth without pytest-benchmark (when the copy benchmark was not run)."""
    src, dst = copy_buffers(device, nbytes)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return copy_bytes(src.numel()) / times[len(times) // 2] / 1e9
