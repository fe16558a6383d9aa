"""A bucket state on which the spike bound's floor decides (shared by the backend tests).

One tensor: typical elements whose gradients stay well under k * sqrt(v_hat); 64 *quiet*
elements that have seen almost nothing (v = 1e-10) and now get a gradient 100 of their own
sigmas but far under k times the tensor's RMS sqrt(v) (a layer waking up); 16 *loud* elements
at 1e3 of their own sigmas (a fault). With the previous step's sums in ``tensor_out`` only the
loud ones are outliers; with a zeroed ``tensor_out`` (no history, no floor) the quiet ones too.
"""

from __future__ import annotations

import torch

from lbw_kernels import contract as C

SHAPE = (64, 64)
NUM_QUIET = 64
NUM_LOUD = 16
STEP = 10.0


def floor_case(seed: int):
    """(param, grad, exp_avg, exp_avg_sq, tensor_in row [NUM_TENSOR_FIELDS]), float32 CPU."""
    gen = torch.Generator().manual_seed(seed)
    n = SHAPE[0] * SHAPE[1]
    v = torch.rand(n, generator=gen) * 1e-2 + 1e-3
    g = torch.randn(n, generator=gen).clamp(-4.0, 4.0) * 0.5 * v.sqrt()  # under 2 sigma
    picked = torch.randperm(n, generator=gen)[: NUM_QUIET + NUM_LOUD]
    quiet, loud = picked[:NUM_QUIET], picked[NUM_QUIET:]
    sign = lambda k: torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    v[quiet] = 1e-10
    g[quiet] = 1e-3 * sign(NUM_QUIET)
    g[loud] = 1e3 * v[loud].sqrt() * sign(NUM_LOUD)
    tensor_in = torch.zeros(C.NUM_TENSOR_FIELDS, dtype=torch.float64)
    tensor_in[C.T_MOMENT2_SUM] = v.double().sum()
    tensor_in[C.T_NUMEL] = float(n)
    p = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 1e-3
    return p.reshape(SHAPE), g.reshape(SHAPE), m.reshape(SHAPE), v.reshape(SHAPE), tensor_in
