"""The compiled C++ backends (contract version 2) against the PyTorch reference.

The CPU backend is built on first use (about 60 s on 2 cores, then cached in the torch
extensions dir). The CUDA tests run the same comparisons on CUDA tensors and skip without a
GPU. Without one, the CUDA kernels still run: ``cuda-emulated`` compiles
``csrc/cuda/fused_adamw_cuda.cu`` for the CPU with ``csrc/cuda/host_emulation.h`` (every CUDA
thread a fiber, barriers for __syncthreads and the shuffles) and drives it through ctypes with
the tables the binding builds, so the kernels' arithmetic, indexing, reductions and finish are
checked against the reference here too; and the kernel is compiled with nvcc (checked for
spills) and its torch binding syntax-checked against torch's headers.

Params, moments and step counters are compared bit for bit. One caveat makes the CPU oracle
use an exactly rounded square root: on the CPU, ``torch.sqrt`` of float32 tensors runs MKL's
``vsSqrt`` in its high-accuracy mode, which is not correctly rounded (about 20% of random
inputs come out one ulp off), while the contract's arithmetic is IEEE fp32, as the kernels
(and CUDA's ``torch.sqrt``) compute it. :func:`ieee_sqrt` swaps ``Tensor.sqrt`` for a correctly
rounded one (numpy's) while the reference runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

from lbw_kernels import contract as C
from lbw_kernels.backends import BackendUnavailable
from lbw_kernels.reference import fused_adamw_reference
from spike_floor_case import NUM_LOUD, NUM_QUIET, STEP, floor_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
NUM_GROUPS = 4
INF = math.inf

# Shapes: single elements, tails shorter than a vector, a 512-element accumulation pass plus a
# tail, conv kernels, one crossing the CPU's 64K-element chunk and several CUDA chunks.
SHAPES = [(1,), (3,), (64, 67), (4097,), (3, 5, 7, 11), (65536 + 17,), (300, 501)]
GROUP_IDS = [0, 1, 1, 2, 3, 0, 2]
# Smaller buckets for the many scenario tests: still a 512-element pass plus tails, and one
# tensor over two CUDA chunks.
SMALL_SHAPES = [(1,), (3,), (64, 67), (4097,), (3, 5, 7, 11), (17000,)]
SMALL_GROUP_IDS = [0, 1, 1, 2, 3, 0]


# --------------------------------------------------------------------------- fixtures
def _load(kind: str):
    from lbw_kernels.cpp_backend import load_cpp_module

    try:
        return load_cpp_module(kind)
    except BackendUnavailable as exc:
        pytest.skip(f"{kind} backend unavailable here: {exc}")


@pytest.fixture(scope="module")
def cpu_module():
    return _load("cpu")


class Backend(NamedTuple):
    name: str
    device: torch.device
    step: Callable
    precise: bool  # telemetry terms summed in fp64 (CUDA) rather than fp32 lanes (CPU)


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    return build_cuda_emulator(str(tmp_path_factory.mktemp("cuda_emulated")))


@pytest.fixture(params=[
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU")),
    pytest.param("cuda-emulated", marks=pytest.mark.skipif(HAS_CUDA, reason="the GPU runs the real kernels")),
])
def backend(request) -> Backend:
    """The step of one backend: the CPU extension, the CUDA extension, or the CUDA kernels
    emulated on the CPU (no GPU here)."""
    from lbw_kernels import cpp_step

    if request.param == "cuda-emulated":
        return Backend("cuda-emulated", torch.device("cpu"), request.getfixturevalue("cuda_emulator"), True)
    _load(request.param)
    if request.param == "cpu":
        return Backend("cpu", torch.device("cpu"), cpp_step.cpu_step, False)
    return Backend("cuda", torch.device("cuda"), cpp_step.cuda_step, True)


def needs_op(backend: Backend) -> None:
    if backend.name == "cuda-emulated":
        pytest.skip("the emulated kernels are not an op (no validation, no torch.ops)")


@contextlib.contextmanager
def ieee_sqrt():
    """Correctly rounded float32 sqrt for CPU tensors (see the module docstring)."""
    original = torch.Tensor.sqrt

    def sqrt(self):
        if self.dtype == torch.float32 and self.device.type == "cpu":
            return torch.from_numpy(np.asarray(np.sqrt(self.detach().numpy()))).reshape(self.shape)
        return original(self)

    torch.Tensor.sqrt = sqrt
    try:
        yield
    finally:
        torch.Tensor.sqrt = original


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


# --------------------------------------------------------------------------- buckets
def make_control(num_groups: int = NUM_GROUPS, **overrides) -> torch.Tensor:
    """A control table: group columns by their contract name (``LR=[...]`` per group, or one
    value for all), the step-wide row by lower-case name (``max_grad_norm=1.0``)."""
    control = torch.zeros(num_groups + 1, C.NUM_CONTROL, dtype=torch.float64)
    cols = {
        C.LR: [1e-2, 3e-3, 1e-3, 5e-2],
        C.SCALE: [1.0, 0.5, 1.0, 0.25],
        C.GATE: 1.0,
        C.BETA1: [0.9, 0.9, 0.8, 0.95],
        C.BETA2: [0.999, 0.99, 0.999, 0.95],
        C.EPS: [1e-8, 1e-6, 1e-8, 1e-8],
        C.WEIGHT_DECAY: [0.1, 0.0, 0.01, 0.5],
        C.SPIKE_K: 6.0,
        C.CLAMP: [1.0, 0.0, 1.0, 1.0],
    }
    step_wide = {"loss_limit": INF, "check_loss": 1.0, "grad_norm_limit": INF, "max_grad_norm": 0.0,
                 "mask_nonfinite": 1.0}
    for key, value in overrides.items():  # step-wide names in lower case, columns as in contract
        if key in step_wide:
            step_wide[key] = value
        else:
            cols[getattr(C, key)] = value
    for col, value in cols.items():
        values = value if isinstance(value, (list, tuple)) else [value] * num_groups
        control[:num_groups, col] = torch.tensor(values[:num_groups], dtype=torch.float64)
    row = control[num_groups]
    row[C.LOSS_LIMIT] = step_wide["loss_limit"]
    row[C.CHECK_LOSS] = step_wide["check_loss"]
    row[C.GRAD_NORM_LIMIT] = step_wide["grad_norm_limit"]
    row[C.MAX_GRAD_NORM] = step_wide["max_grad_norm"]
    row[C.MASK_NONFINITE] = step_wide["mask_nonfinite"]
    return control


def random_grads(params, exp_avg_sqs, gen, grad_scale: float = 1.0, spikes: bool = True,
                 nonfinite: bool = True):
    """Gradients about sqrt(v) in size, with planted spikes far past any bound and NaN/inf."""
    grads = []
    for p, v in zip(params, exp_avg_sqs):
        n = p.numel()
        flat_v = v.detach().cpu().reshape(-1).float()
        g = torch.randn(n, generator=gen) * (flat_v.sqrt() * 2 + 1e-4)
        if spikes and n > 0:
            idx = torch.randperm(n, generator=gen)[: max(1, n // 300)]
            g[idx] = (flat_v[idx].sqrt() * 1e3 + 1e-2) * torch.sign(torch.randn(idx.numel(), generator=gen))
        if nonfinite and n > 3:
            g[torch.randperm(n, generator=gen)[:3]] = torch.tensor([math.nan, INF, -INF])
        grads.append((g * grad_scale).reshape(p.shape).to(p.dtype).to(p.device))
    return grads


def make_bucket(dtype, device, seed, shapes=SHAPES, group_ids=GROUP_IDS, grad_scale=1.0,
                first_step=False, zero_init=(2,)):
    """A random bucket; the matrices at the indices ``zero_init`` are KIND_ZERO_INIT (their
    omega and cos count, their update/param ratio does not)."""
    gen = torch.Generator().manual_seed(seed)
    params, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    for i, shape in enumerate(shapes):
        n = math.prod(shape)
        p = torch.randn(n, generator=gen) * (0.5 + torch.rand(1, generator=gen))
        if first_step and i in zero_init:
            p.zero_()  # LoRA's B: starts at zero
        params.append(p.reshape(shape).to(dtype))
        v = torch.rand(n, generator=gen) * 1e-3
        v[torch.rand(n, generator=gen) < 0.02] = 0.0  # no history: no spike bound there
        exp_avg_sqs.append(v.reshape(shape))
        exp_avgs.append((torch.randn(n, generator=gen) * 1e-2).reshape(shape))
        steps.append(torch.tensor(0.0 if first_step else float(torch.randint(0, 200, (), generator=gen))))
    if not first_step and len(steps) > 2:
        steps[0] = torch.tensor(0.0)  # a tensor on its first step (no bound, no d_prev)
        steps[1] = torch.tensor(1.0)
    to = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    bucket = {
        "params": to(params),
        "exp_avgs": to(exp_avgs),
        "exp_avg_sqs": to(exp_avg_sqs),
        "steps": to(steps),
        "group_ids": list(group_ids),
        "kinds": [C.tensor_kind(p, zero=i in zero_init) for i, p in enumerate(params)],
    }
    bucket["grads"] = random_grads(bucket["params"], bucket["exp_avg_sqs"], gen, grad_scale)
    return bucket


def clone_bucket(bucket):
    out = dict(bucket)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        out[key] = [t.clone(memory_format=torch.preserve_format) for t in bucket[key]]
    return out


def run(fn, bucket, control, *, record=None, accumulate=False, tensor_in=None, **scalars):
    """One step of ``fn`` on ``bucket`` in place; returns (tensor_out, record_out).
    ``tensor_in``: what tensor_out holds on entry (the previous step's sums give the spike bound
    its floor); by default a value the contract ignores (a negative numel: no floor)."""
    device = control.device
    T = len(bucket["params"])
    G = control.shape[0] - 1
    if tensor_in is None:
        tensor_out = torch.full((T, C.NUM_TENSOR_FIELDS), -7.0, dtype=torch.float64, device=device)
    else:
        tensor_out = tensor_in.to(device, copy=True)
    if record is None:
        record = torch.full((C.record_layout(G).size,), 3.0, dtype=torch.float64, device=device)
    if control.device.type == "cpu" and fn is fused_adamw_reference:
        ctx = ieee_sqrt()
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        fn(bucket["params"], bucket["grads"], bucket["exp_avgs"], bucket["exp_avg_sqs"], bucket["steps"],
           bucket["group_ids"], bucket["kinds"], control, tensor_out, record, accumulate=accumulate, **scalars)
    return tensor_out, record


def scalars_on(device, **scalars):
    """The step's optional scalars as 0-d tensors on ``device`` (Python floats become float32)."""
    return {k: None if v is None else torch.as_tensor(v).to(device) for k, v in scalars.items()}


# --------------------------------------------------------------------------- CUDA kernels on the CPU
class _Scalar(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("type", ctypes.c_int32), ("pad", ctypes.c_int32)]


class _TensorDesc(ctypes.Structure):  # lbw_cuda::TensorDesc
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("step", ctypes.c_void_p), ("n", ctypes.c_int64), ("group", ctypes.c_int32),
                ("kind", ctypes.c_int32), ("chunk_begin", ctypes.c_int32), ("chunk_end", ctypes.c_int32),
                ("aligned", ctypes.c_int32), ("step_f64", ctypes.c_int32)]


class _ChunkDesc(ctypes.Structure):  # lbw_cuda::ChunkDesc
    _fields_ = [("offset", ctypes.c_int64), ("tensor", ctypes.c_int32), ("pad", ctypes.c_int32)]


class _StepArgs(ctypes.Structure):  # lbw_cuda::StepArgs
    _fields_ = [("tensors", ctypes.c_void_p), ("chunks", ctypes.c_void_p), ("group_of", ctypes.c_void_p),
                ("num_tensors", ctypes.c_int32), ("num_chunks", ctypes.c_int32), ("num_groups", ctypes.c_int32),
                ("accumulate", ctypes.c_int32), ("control", ctypes.c_void_p), ("loss", _Scalar),
                ("found_inf", _Scalar), ("grad_scale", _Scalar), ("grad_norm", _Scalar),
                ("partials", ctypes.c_void_p), ("rows", ctypes.c_void_p), ("counter", ctypes.c_void_p),
                ("tensor_out", ctypes.c_void_p), ("tensor_out_stride0", ctypes.c_int64),
                ("tensor_out_stride1", ctypes.c_int64), ("record", ctypes.c_void_p), ("record_stride", ctypes.c_int64)]


_EMU_EXPORTS = r"""
#include <cstddef>
extern "C" int lbw_emu_launch(int dtype, const lbw_cuda::StepArgs* a) {
  return static_cast<int>(lbw_cuda::launch_fused_step(static_cast<lbw_cuda::DType>(dtype), *a, nullptr));
}
extern "C" void lbw_emu_layout(int64_t* out) {
  out[0] = sizeof(lbw_cuda::TensorDesc);
  out[1] = sizeof(lbw_cuda::ChunkDesc);
  out[2] = sizeof(lbw_cuda::StepArgs);
  out[3] = offsetof(lbw_cuda::StepArgs, control);
  out[4] = offsetof(lbw_cuda::StepArgs, partials);
  out[5] = offsetof(lbw_cuda::StepArgs, record_stride);
  out[6] = offsetof(lbw_cuda::TensorDesc, chunk_begin);
}
"""
_EMU_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_EMU_SCALARS = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4, torch.int64: 5,
                torch.int32: 6, torch.uint8: 7, torch.bool: 7}


def build_cuda_emulator(workdir: str) -> Callable:
    """A step function (the backend signature, CPU tensors) that runs the kernels of
    csrc/cuda/fused_adamw_cuda.cu on the CPU with the tables fused_adamw_cuda_binding.cpp
    builds (one chunk table entry per kChunkElems elements of each tensor)."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler to build the emulated CUDA kernels")
    cuda_dir = os.path.join(CSRC, "cuda")
    with open(os.path.join(cuda_dir, "fused_adamw_cuda.cu")) as f:
        src = f.read()
    src, launches = re.subn(r"(\w+(?:<[\w:]+>)?)<<<([^>]*)>>>\((.*?)\);",
                            r"lbw_emu::launch(\2, [&] { \1(\3); });", src)
    assert launches >= 2, "kernel launches not found in fused_adamw_cuda.cu"
    with open(os.path.join(workdir, "cuda_runtime.h"), "w") as f:
        f.write('#pragma once\n#include "host_emulation.h"\n')
    with open(os.path.join(workdir, "emulated.cpp"), "w") as f:
        f.write(src + _EMU_EXPORTS)
    lib_path = os.path.join(workdir, "emulated.so")
    cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{workdir}", f"-I{cuda_dir}",
           os.path.join(workdir, "emulated.cpp"), "-o", lib_path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(lib_path)
    layout = (ctypes.c_int64 * 7)()
    lib.lbw_emu_layout(layout)
    assert list(layout) == [ctypes.sizeof(_TensorDesc), ctypes.sizeof(_ChunkDesc), ctypes.sizeof(_StepArgs),
                            _StepArgs.control.offset, _StepArgs.partials.offset, _StepArgs.record_stride.offset,
                            _TensorDesc.chunk_begin.offset], "ctypes mirror of fused_adamw_cuda.h is stale"
    with open(os.path.join(cuda_dir, "fused_adamw_cuda.h")) as f:
        chunk_elems = int(re.search(r"kChunkElems = (\d+)", f.read()).group(1))

    def scalar(t):
        if t is None:
            return _Scalar(None, 0, 0)
        return _Scalar(t.data_ptr(), _EMU_SCALARS[t.dtype], 0)

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, group_ids, kinds, control, tensor_out, record_out, *,
             loss=None, found_inf=None, grad_scale=None, grad_norm=None, accumulate=False):
        T = len(params)
        descs = (_TensorDesc * max(T, 1))()
        chunks = []
        for i in range(T):
            p, g, m, v, s = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
            d = descs[i]
            d.p, d.g, d.m, d.v, d.step = p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr()
            d.n, d.group, d.kind = p.numel(), int(group_ids[i]), int(kinds[i])
            d.aligned = int(all(x.data_ptr() % 16 == 0 for x in (p, g, m, v)))
            d.step_f64 = int(s.dtype == torch.float64)
            d.chunk_begin = len(chunks)
            chunks += [(off, i) for off in range(0, p.numel(), chunk_elems)]
            d.chunk_end = len(chunks)
        chunk_table = (_ChunkDesc * max(len(chunks), 1))(*[_ChunkDesc(o, t, 0) for o, t in chunks])
        group_of = (ctypes.c_int32 * max(T, 1))(*[int(x) for x in group_ids])
        partials = torch.full((max(len(chunks), 1) * 10,), math.nan, dtype=torch.float64)
        rows = torch.full((max(T, 1) * C.NUM_GROUP_FIELDS,), math.nan, dtype=torch.float64)
        counter = torch.zeros(1, dtype=torch.int32)
        ctl = control.contiguous()
        scalars = [None if x is None else x.detach() for x in (loss, found_inf, grad_scale, grad_norm)]
        args = _StepArgs(ctypes.addressof(descs), ctypes.addressof(chunk_table), ctypes.addressof(group_of), T,
                         len(chunks), control.shape[0] - 1, int(accumulate), ctl.data_ptr(),
                         *[scalar(x) for x in scalars], partials.data_ptr(), rows.data_ptr(), counter.data_ptr(),
                         tensor_out.data_ptr(), tensor_out.stride(0), tensor_out.stride(1), record_out.data_ptr(),
                         record_out.stride(0))
        assert lib.lbw_emu_launch(_EMU_DTYPES[params[0].dtype] if T else 0, ctypes.byref(args)) == 0
        assert counter.item() == 0, "the last finish block must reset the arrival counter"

    return step


# --------------------------------------------------------------------------- comparisons
def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    """Bit for bit, except that NaNs only need to be NaN in the same places."""
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), msg
    a, b = a.cpu(), b.cpu()
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    assert torch.equal(nan_a, nan_b), f"{msg}: NaNs in different places"
    same = bits(a) == bits(b)
    assert bool((same | nan_a).all()), (
        f"{msg}: {int((~same & ~nan_a).sum())} elements differ, e.g. "
        f"{a[~same & ~nan_a][:4].tolist()} vs {b[~same & ~nan_a][:4].tolist()}")


def assert_states_equal(ours, ref, msg: str) -> None:
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, (a, b) in enumerate(zip(ours[key], ref[key])):
            assert_bits_equal(a, b, f"{msg}: {key}[{i}]")


def _close(a, b, scale, rtol, atol, what):
    a, b, scale = a.cpu(), b.cpu(), scale.cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN mismatch\n{a}\n{b}"
    ok = nan_a | (a == b) | ((a - b).abs() <= rtol * scale.nan_to_num(posinf=0.0) + atol)
    assert bool(ok.all()), f"{what}: beyond tolerance\nours {a[~ok].tolist()}\nref  {b[~ok].tolist()}"


def tensor_scale(sums: torch.Tensor) -> torch.Tensor:
    """Per-field magnitude of the terms summed: |sum| for sums of squares, the Cauchy-Schwarz
    bound for the two dot products (whose sums may cancel)."""
    scale = sums.abs().clone()
    scale[:, C.T_GRAD_DOT_UPDATE] = (sums[:, C.T_GRAD_SQ] * sums[:, C.T_UPDATE_SQ]).sqrt()
    scale[:, C.T_GRAD_DOT_PREV] = (sums[:, C.T_GRAD_SQ] * sums[:, C.T_PREV_SQ]).sqrt()
    return scale


def assert_telemetry_close(ours, ref, bucket, control, precise: bool, msg: str) -> None:
    """Counts exact; sums within the backend's summation error; the record's flags exact."""
    (t_ours, r_ours), (t_ref, r_ref) = ours, ref
    rtol = 1e-9 if precise else 2e-5  # CPU: fp32 products in fp32 lanes of 32 terms, then fp64
    counts = [C.T_SPIKES, C.T_NONFINITE, C.T_NUMEL]
    assert torch.equal(t_ours[:, counts].cpu(), t_ref[:, counts].cpu()), f"{msg}: tensor counts"
    scale = tensor_scale(t_ref.cpu())
    _close(t_ours, t_ref, scale, rtol, 1e-30, f"{msg}: tensor_out")

    G = control.shape[0] - 1
    layout = C.record_layout(G)
    g_ours = r_ours[layout.group_fields].view(G, C.NUM_GROUP_FIELDS).cpu()
    g_ref = r_ref[layout.group_fields].view(G, C.NUM_GROUP_FIELDS).cpu()
    exact = [C.T_SPIKES, C.T_NONFINITE, C.T_NUMEL, C.G_OMEGA_COUNT, C.G_COS_COUNT, C.G_RATIO_COUNT,
             C.G_MATRIX_NUMEL]
    assert torch.equal(g_ours[:, exact], g_ref[:, exact]), f"{msg}: group counts\n{g_ours}\n{g_ref}"
    group_scale = torch.zeros(G, C.NUM_GROUP_FIELDS, dtype=torch.float64)
    for t, gid in enumerate(bucket["group_ids"]):
        group_scale[gid, : C.NUM_TENSOR_FIELDS] += scale[t]
    group_scale[:, C.G_RATIO_SQ_SUM] = g_ref[:, C.G_RATIO_SQ_SUM].abs()
    atol = torch.zeros(C.NUM_GROUP_FIELDS, dtype=torch.float64)
    atol[C.G_OMEGA_LOG_SUM] = atol[C.G_COS_SUM] = 1e-8 if precise else 1e-4
    for f in range(C.NUM_GROUP_FIELDS):
        _close(g_ours[:, f], g_ref[:, f], group_scale[:, f], rtol * 5, float(atol[f]) * G + 1e-30,
               f"{msg}: group field {C.GROUP_FIELDS[f]}")
    for part in ("applied_gate", "invalid", "globals"):
        a, b = r_ours[getattr(layout, part)].cpu(), r_ref[getattr(layout, part)].cpu()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{msg}: record {part}")


def check_step(backend: Backend, bucket, control, msg, tensor_in=None, **scalars):
    """One step of the backend and of the reference from the same state; compares everything
    and returns both results (the backend's state continues the run)."""
    ref = clone_bucket(bucket)
    ref_out = run(fused_adamw_reference, ref, control, tensor_in=tensor_in, **scalars)
    ours_out = run(backend.step, bucket, control, tensor_in=tensor_in, **scalars)
    assert_states_equal(bucket, ref, f"{backend.name}: {msg}")
    assert_telemetry_close(ours_out, ref_out, bucket, control, backend.precise, f"{backend.name}: {msg}")
    return ours_out, ref_out


# --------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, dtype):
    """Several groups (one gated), GradScaler, clipping, loss check, spikes clamped in some
    groups, non-finite grads masked; three steps with fresh gradients."""
    seed = fresh_seed()
    device = backend.device
    gen = torch.Generator().manual_seed(seed + 1)
    bucket = make_bucket(dtype, device, seed, grad_scale=1024.0)
    assert set(bucket["kinds"]) == {C.KIND_OTHER, C.KIND_MATRIX, C.KIND_ZERO_INIT}
    control = make_control(GATE=[1.0, 0.0, 1.0, 1.0], max_grad_norm=1.0, loss_limit=1e3).to(device)
    for k in range(3 if backend.name != "cuda-emulated" else 1):  # emulation: ~1 s per step
        scalars = scalars_on(device, grad_scale=1024.0, grad_norm=torch.tensor(3.7, dtype=torch.float64),
                             loss=2.5, found_inf=0.0)
        (t_ours, r_ours), _ = check_step(backend, bucket, control, f"seed={seed} step {k}", **scalars)
        # What the bucket holds is really there: spikes, non-finite grads, a gated group.
        assert t_ours[:, C.T_SPIKES].sum() > 0 and t_ours[:, C.T_NONFINITE].sum() > 0
        gate = r_ours[C.record_layout(NUM_GROUPS).applied_gate].cpu()
        assert gate.tolist() == [1.0, 0.0, 1.0, 1.0]
        bucket["grads"] = random_grads(bucket["params"], bucket["exp_avg_sqs"], gen, 1024.0)


SCENARIOS = {
    # name: (control overrides, step scalars, whether the whole step is skipped)
    "plain": ({}, {}, False),
    "found_inf": ({}, {"found_inf": 1.0}, True),
    "found_inf_zero": ({}, {"found_inf": 0.0, "grad_scale": 64.0}, False),
    "grad_norm_over_limit": ({"grad_norm_limit": 4.0}, {"grad_norm": 5.0}, True),
    "grad_norm_nan": ({}, {"grad_norm": math.nan}, True),
    "clip": ({"max_grad_norm": 1.0}, {"grad_norm": 10.0}, False),
    "no_clip_norm_given": ({"max_grad_norm": 0.0}, {"grad_norm": 10.0}, False),
    "loss_nan_checked": ({}, {"loss": math.nan}, True),
    "loss_nan_unchecked": ({"check_loss": 0.0}, {"loss": math.nan}, False),
    "loss_over_limit": ({"loss_limit": 5.0}, {"loss": 10.0}, True),
    "loss_under_limit": ({"loss_limit": 5.0}, {"loss": 1.0}, False),
    "invalid_lr": ({"LR": [1e-2, math.nan, 1e-3, 5e-2]}, {}, False),
    "invalid_beta": ({"BETA1": [1.0, 0.9, 0.8, 0.95]}, {}, False),
    "negative_scale": ({"SCALE": [1.0, 0.5, 1.0, -1.0]}, {}, False),
    "nan_spike_k": ({"SPIKE_K": [6.0, math.nan, 6.0, 6.0]}, {}, False),
    "no_mask": ({"mask_nonfinite": 0.0}, {"grad_scale": 8.0}, False),
    "no_clamp": ({"CLAMP": 0.0}, {}, False),
    "no_spike_bound": ({"SPIKE_K": INF}, {}, False),
    "gate_zero": ({"GATE": 0.0}, {}, False),
    "eps_zero": ({"EPS": [0.0, 1e-8, 0.0, 1e-8]}, {}, False),
    "beta_zero": ({"BETA1": [0.0, 0.9, 0.0, 0.95], "BETA2": [0.0, 0.99, 0.5, 0.95]}, {}, False),
    "guard_off": ({"SPIKE_K": INF, "CLAMP": 0.0, "mask_nonfinite": 0.0, "check_loss": 0.0}, {"loss": 3.0}, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenarios(backend, dtype, scenario):
    if backend.name == "cuda-emulated" and dtype != torch.float32:
        pytest.skip("emulated kernels: the scenarios in fp32 (every dtype runs in the other tests)")
    overrides, scalars, skipped = SCENARIOS[scenario]
    seed = fresh_seed()
    device = backend.device
    bucket = make_bucket(dtype, device, seed, shapes=SMALL_SHAPES, group_ids=SMALL_GROUP_IDS,
                         grad_scale=scalars.get("grad_scale", 1.0))
    before = clone_bucket(bucket)
    control = make_control(**overrides).to(device)
    (_, record), _ = check_step(backend, bucket, control, f"{scenario} seed={seed}", **scalars_on(device, **scalars))
    layout = C.record_layout(NUM_GROUPS)
    assert record[layout.globals][C.R_STEP_OK].item() == (0.0 if skipped else 1.0)
    if skipped:  # nothing written, no counter advanced
        assert_states_equal(bucket, before, f"{scenario}: skipped step")
        assert record[layout.applied_gate].sum().item() == 0.0


def test_first_step(backend):
    device = backend.device
    bucket = make_bucket(torch.float32, device, fresh_seed(), shapes=SMALL_SHAPES, group_ids=SMALL_GROUP_IDS,
                         first_step=True)
    check_step(backend, bucket, make_control().to(device), "first step", loss=torch.tensor(1.0, device=device))
    assert all(s.item() == 1.0 for s in bucket["steps"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_many_steps(backend, dtype):
    """Twenty steps (six for the emulated kernels) with fresh gradients, every one compared;
    some groups gated on some steps (their counters must not advance), so the coefficients go
    through many step counts."""
    seed = fresh_seed()
    device = backend.device
    gen = torch.Generator().manual_seed(seed + 7)
    shapes = [(33, 17), (1000,), (5,), (2, 3, 4, 5)]
    bucket = make_bucket(dtype, device, seed, shapes=shapes, group_ids=[0, 1, 2, 3], first_step=True,
                         zero_init=(3,))
    assert bucket["kinds"] == [C.KIND_MATRIX, C.KIND_OTHER, C.KIND_OTHER, C.KIND_ZERO_INIT]
    num_steps = 20 if backend.name != "cuda-emulated" else 6
    tensor_in = torch.zeros(len(shapes), C.NUM_TENSOR_FIELDS, dtype=torch.float64)
    for k in range(num_steps):
        gate = [1.0, float(k % 3 != 1), 1.0, float(k % 5 != 4)]
        control = make_control(GATE=gate, max_grad_norm=1.0).to(device)
        scalars = scalars_on(device, grad_norm=0.5 + k * 0.1, loss=1.0)
        # as the optimizer does: each step finds the previous step's sums (the bound's floor)
        (tensor_in, _), _ = check_step(backend, bucket, control, f"seed={seed} step {k}", tensor_in=tensor_in,
                                       **scalars)
        bucket["grads"] = random_grads(bucket["params"], bucket["exp_avg_sqs"], gen, nonfinite=(k % 4 == 0))
    steps = [s.item() for s in bucket["steps"]]
    assert steps[0] == steps[2] == num_steps and steps[1] < num_steps and steps[3] < num_steps


@pytest.mark.parametrize("with_history", [True, False], ids=["floor", "no-history"])
def test_spike_floor(backend, with_history):
    """The spike bound's floor from the previous step's sums in tensor_out: exact outlier
    counts (see tests/spike_floor_case.py), every element against the reference."""
    seed = fresh_seed()
    device = backend.device
    p, g, m, v, row = floor_case(seed)
    bucket = {"params": [p.to(device)], "grads": [g.to(device)], "exp_avgs": [m.to(device)],
              "exp_avg_sqs": [v.to(device)], "steps": [torch.tensor(STEP, device=device)], "group_ids": [0],
              "kinds": [C.KIND_MATRIX]}
    control = make_control(1, SPIKE_K=6.0, CLAMP=1.0).to(device)
    tensor_in = (row if with_history else torch.zeros_like(row)).reshape(1, -1)
    (t_ours, _), _ = check_step(backend, bucket, control, f"seed={seed}", tensor_in=tensor_in)
    expected = NUM_LOUD if with_history else NUM_LOUD + NUM_QUIET
    assert t_ours[0, C.T_SPIKES].item() == expected


def _layout_bucket(dtype, device, seed):
    """channels_last, a transposed matrix, an odd storage offset, numel-0 tensors and a 0-d one."""
    gen = torch.Generator().manual_seed(seed)
    params, exp_avgs, exp_avg_sqs, grads, bases = [], [], [], [], []

    def add(make):
        p, g, m, v = (make(k) for k in range(4))
        params.append(p.to(dtype) if p.dtype != dtype else p)
        grads.append(g)
        exp_avgs.append(m)
        exp_avg_sqs.append(v)

    def channels_last(k):
        x = torch.randn(4, 6, 5, 7, generator=gen) * (1e-3 if k == 3 else 1.0)
        x = x.abs() if k == 3 else x
        x = x.to(dtype) if k in (0, 1) else x
        return x.to(device).contiguous(memory_format=torch.channels_last)

    def transposed(k):
        x = torch.randn(37, 300, generator=gen)
        x = x.abs() * 1e-3 if k == 3 else x
        x = x.to(dtype) if k in (0, 1) else x
        return x.to(device).t()

    def odd_offset(k):
        base = torch.randn(5001, generator=gen)
        base = base.abs() * 1e-3 if k == 3 else base
        base = base.to(dtype) if k in (0, 1) else base
        base = base.to(device)
        bases.append(base)
        return base[1:]

    add(channels_last)
    add(transposed)
    add(odd_offset)
    add(lambda k: torch.zeros(0, device=device, dtype=dtype if k < 2 else torch.float32))
    add(lambda k: torch.zeros(3, 0, device=device, dtype=dtype if k < 2 else torch.float32))
    add(lambda k: (torch.rand((), generator=gen) * (1e-3 if k == 3 else 1)).to(device, dtype if k < 2 else torch.float32))
    bucket = {
        "params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
        "steps": [torch.tensor(float(s), device=device) for s in (3, 0, 7, 2, 1, 5)],
        "group_ids": [0, 1, 2, 3, 0, 1],
        "kinds": [C.tensor_kind(p) for p in params],
    }
    return bucket, bases


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layouts(backend, dtype):
    seed = fresh_seed()
    device = backend.device
    bucket, bases = _layout_bucket(dtype, device, seed)
    assert bucket["params"][0].is_contiguous(memory_format=torch.channels_last)
    assert not bucket["params"][1].is_contiguous()
    heads = [b[0].clone() for b in bases]
    ptrs = [p.data_ptr() for p in bucket["params"]]
    check_step(backend, bucket, make_control().to(device), f"layouts seed={seed}", loss=torch.tensor(1.0, device=device))
    assert [p.data_ptr() for p in bucket["params"]] == ptrs  # updated in place, not copied
    assert bucket["params"][0].is_contiguous(memory_format=torch.channels_last)
    for base, head in zip(bases, heads):  # the element before the odd-offset views is untouched
        assert_bits_equal(base[:1], head.reshape(1), "storage before the view")


def test_accumulate_and_empty_groups(backend):
    """A second bucket adds its group fields; groups without tensors get zeros (not stale
    values) when accumulate is False."""
    seed = fresh_seed()
    step, device = backend.step, backend.device
    control = make_control().to(device)
    b1 = make_bucket(torch.float32, device, seed, shapes=[(100, 30), (7,)], group_ids=[0, 0])
    b2 = make_bucket(torch.bfloat16, device, seed + 1, shapes=[(50, 20), (9,)], group_ids=[0, 2])
    r1, r2 = clone_bucket(b1), clone_bucket(b2)
    ours = run(step, b1, control)
    record = ours[1]
    garbage_groups = record.view(-1)[C.record_layout(NUM_GROUPS).group_fields].view(NUM_GROUPS, -1)[[1, 3]]
    assert bool((garbage_groups == 0).all())  # run() pre-fills the record with 3.0
    ours2 = run(step, b2, control, record=record, accumulate=True)
    ref = run(fused_adamw_reference, r1, control)
    ref2 = run(fused_adamw_reference, r2, control, record=ref[1], accumulate=True)
    assert_states_equal(b1, r1, "bucket 1")
    assert_states_equal(b2, r2, "bucket 2")
    both = dict(b2, group_ids=b1["group_ids"] + b2["group_ids"])
    merged_ours = (torch.cat([ours[0], ours2[0]]), ours2[1])
    merged_ref = (torch.cat([ref[0], ref2[0]]), ref2[1])
    assert_telemetry_close(merged_ours, merged_ref, both, control, backend.precise, "accumulated")


def test_empty_bucket(backend):
    step, device = backend.step, backend.device
    control = make_control().to(device)
    bucket = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "steps": [], "group_ids": [], "kinds": []}
    ours = run(step, bucket, control, loss=torch.tensor(2.0, device=device))
    ref = run(fused_adamw_reference, clone_bucket(bucket), control, loss=torch.tensor(2.0, device=device))
    assert ours[0].shape == (0, C.NUM_TENSOR_FIELDS)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- determinism
def test_cpu_deterministic_across_threads_and_isas(cpu_module):
    from lbw_kernels.cpp_step import cpu_step

    seed = fresh_seed()
    base_bucket = make_bucket(torch.float32, torch.device("cpu"), seed, grad_scale=8.0)
    control = make_control(max_grad_norm=1.0)
    scalars = {"grad_scale": torch.tensor(8.0), "grad_norm": torch.tensor(2.0, dtype=torch.float64),
               "loss": torch.tensor(1.0)}
    threads = torch.get_num_threads()
    detected = cpu_module.isa()
    results = []
    try:
        for isa in ("base", "avx2", "avx512"):
            if cpu_module.set_isa(isa) != isa:
                continue  # not supported by this CPU
            for nthreads in (1, 2):
                torch.set_num_threads(nthreads)
                bucket = clone_bucket(base_bucket)
                out = run(cpu_step, bucket, control, **scalars)
                results.append(((isa, nthreads), bucket, out))
    finally:
        cpu_module.set_isa(detected)
        torch.set_num_threads(threads)
    assert len(results) >= 2
    (_, first, (t0, r0)) = results[0]
    for config, bucket, (t, r) in results[1:]:
        assert_states_equal(bucket, first, str(config))
        assert torch.equal(bits(t), bits(t0)) and torch.equal(bits(r), bits(r0)), config


def test_deterministic_run_to_run(backend):
    step, device = backend.step, backend.device
    bucket = make_bucket(torch.float32, device, fresh_seed(), shapes=SMALL_SHAPES, group_ids=SMALL_GROUP_IDS)
    control = make_control().to(device)
    a, b = clone_bucket(bucket), clone_bucket(bucket)
    ta, ra = run(step, a, control)
    tb, rb = run(step, b, control)
    assert_states_equal(a, b, "run to run")
    assert torch.equal(bits(ta), bits(tb)) and torch.equal(bits(ra), bits(rb))


# --------------------------------------------------------------------------- grad_norm_sq
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_grad_norm_sq(cpu_module, dtype):
    from lbw_kernels.cpp_step import cpu_grad_norm_sq

    gen = torch.Generator().manual_seed(fresh_seed())
    grads = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in (1, 17, 4096, 65536 * 2 + 5, 0)]
    grads.append((torch.randn(40, 30, generator=gen)).to(dtype).t())  # dense, not contiguous
    grads.append((torch.randn(64, 3, generator=gen)).to(dtype)[:, 1])  # not dense: copied
    expected = sum(g.double().square().sum() for g in grads)
    got = cpu_grad_norm_sq(grads)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert cpu_grad_norm_sq([]).item() == 0.0
    for bad, want in ((math.nan, math.isnan), (INF, lambda x: x == INF)):
        g = grads[3].clone()
        g[12345] = bad
        assert want(cpu_grad_norm_sq(grads[:3] + [g]).item())
    # Deterministic across threads and instruction sets.
    threads, detected = torch.get_num_threads(), cpu_module.isa()
    values = set()
    try:
        for isa in ("base", "avx2", "avx512"):
            cpu_module.set_isa(isa)
            for nthreads in (1, 2):
                torch.set_num_threads(nthreads)
                values.add(cpu_grad_norm_sq(grads).item())
    finally:
        cpu_module.set_isa(detected)
        torch.set_num_threads(threads)
    assert len(values) == 1, values


# --------------------------------------------------------------------------- validation
def _bad_buckets(device):
    def base():
        b = make_bucket(torch.float32, device, 0, shapes=[(10,), (4, 5)], group_ids=[0, 1])
        return b, make_control().to(device)

    cases = {}
    b, c = base()
    b["grads"][1] = b["grads"][1].to(torch.bfloat16)
    cases["grad dtype"] = (b, c, "tensor 1")
    b, c = base()
    b["params"][1] = b["params"][1].to(torch.float16)
    cases["mixed param dtypes"] = (b, c, "tensor 1")
    b, c = base()
    b["exp_avgs"][0] = b["exp_avgs"][0].double()
    cases["state dtype"] = (b, c, "tensor 0")
    b, c = base()
    b["grads"][1] = b["grads"][1].t().contiguous().t()
    cases["grad strides"] = (b, c, "tensor 1")
    b, c = base()
    b["group_ids"][1] = 7
    cases["group id"] = (b, c, "tensor 1")
    b, c = base()
    b["kinds"][0] = 5
    cases["kind"] = (b, c, "tensor 0")
    b, c = base()
    b["exp_avg_sqs"][0] = torch.zeros(11, device=device)
    cases["sizes"] = (b, c, "tensor 0")
    b, c = base()
    b["steps"][1] = torch.zeros(2, device=device)
    cases["step"] = (b, c, "tensor 1")
    b, c = base()
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        b[key][1] = torch.zeros(8, 6, device=device)[:, ::2]  # not dense
    cases["not dense"] = (b, c, "tensor 1")
    b, c = base()
    cases["control shape"] = (b, c[:, :5].contiguous(), "control")
    b, c = base()
    cases["control dtype"] = (b, c.float(), "control")
    b, c = base()
    b["params"][1] = b["params"][1].double()
    b["grads"][1] = b["grads"][1].double()
    cases["float64 params"] = (b, c, "tensor 1")
    return cases


@pytest.mark.parametrize("case", ["grad dtype", "mixed param dtypes", "state dtype", "grad strides", "group id", "kind",
                                  "sizes", "step", "not dense", "control shape", "control dtype", "float64 params"])
def test_rejects_bad_buckets_before_writing(backend, case):
    needs_op(backend)
    step, device = backend.step, backend.device
    bucket, control, words = _bad_buckets(device)[case]
    before = clone_bucket(bucket)
    with pytest.raises(RuntimeError, match=words):
        run(step, bucket, control)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):  # nothing was modified
        for a, b in zip(bucket[key], before[key]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("source", ["cpu/fused_adamw_cpu.cpp", "cuda/fused_adamw_cuda_binding.cpp"])
def test_checks_format_messages_without_iostreams(source):
    """Every argument check goes through LBW_CHECK (csrc/common/check_message.h): a failed
    TORCH_CHECK with several arguments formats them with an ostringstream inside the extension,
    which segfaulted on the GPU image's toolchain (torch 2.11, CUDA 13) instead of raising."""
    with open(os.path.join(CSRC, source)) as f:
        code = re.sub(r"//.*", "", f.read())
    assert "LBW_CHECK(" in code
    assert "TORCH_CHECK(" not in code and "c10::str(" not in code and "std::ostringstream" not in code


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_check_messages_refuse_values_they_would_misprint(tmp_path):
    """LBW_CHECK's message takes the types the checks pass; a double or a bool, which
    IntArrayRef's one-element constructor would print as [0] or [1], does not compile."""
    from torch.utils.cpp_extension import include_paths

    src = tmp_path / "m.cpp"
    src.write_text('#include "check_message.h"\n#include <vector>\nvoid f() {\n'
                   '  std::vector<int64_t> v{2, 3};\n'
                   '  lbw_check::message("a", size_t(3), int64_t(-4), 5, std::string("s"), '
                   'c10::ScalarType::Float, c10::IntArrayRef(v));\n'
                   '#ifdef BAD\n  lbw_check::message("d=", BAD);\n#endif\n}\n')
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-w", f"-I{os.path.join(CSRC, 'common')}",
           *(f"-I{d}" for d in include_paths()), str(src)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    for bad in ("0.7", "true", "1.5f"):
        res = subprocess.run(cmd + [f"-DBAD={bad}"], capture_output=True, text=True, timeout=300)
        assert res.returncode != 0 and "deleted" in res.stderr, (bad, res.stderr[-2000:])


def test_rejects_bad_outputs(backend):
    needs_op(backend)
    step, device = backend.step, backend.device
    bucket = make_bucket(torch.float32, device, 0, shapes=[(10,)], group_ids=[0])
    control = make_control().to(device)
    f = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    args = lambda: (bucket["params"], bucket["grads"], bucket["exp_avgs"], bucket["exp_avg_sqs"],  # noqa: E731
                    bucket["steps"], bucket["group_ids"], bucket["kinds"], control)
    with pytest.raises(RuntimeError, match="tensor_out"):
        step(*args(), f(2, C.NUM_TENSOR_FIELDS), f(C.record_layout(NUM_GROUPS).size))
    with pytest.raises(RuntimeError, match="record_out"):
        step(*args(), f(1, C.NUM_TENSOR_FIELDS), f(C.record_layout(NUM_GROUPS).size - 1))
    with pytest.raises(RuntimeError, match="same length"):
        step(bucket["params"], bucket["grads"][:0], *args()[2:], f(1, C.NUM_TENSOR_FIELDS),
             f(C.record_layout(NUM_GROUPS).size))


# --------------------------------------------------------------------------- op integration
def test_cpu_one_op_per_step_and_module_entry(cpu_module):
    from lbw_kernels.cpp_step import cpu_step

    seed = fresh_seed()
    control = make_control()
    bucket = make_bucket(torch.float32, torch.device("cpu"), seed)
    twin = clone_bucket(bucket)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run(cpu_step, bucket, control, loss=torch.tensor(1.0))
    names = [e.name for e in prof.events()]
    assert names.count("lbw_guard_cpu::fused_step") == 1, [n for n in names if "lbw" in n]
    # The loader's entry point (module.fused_adamw) is the same op with the same signature.
    out2 = run(cpu_module.fused_adamw, twin, control, loss=torch.tensor(1.0))
    assert_states_equal(bucket, twin, "module.fused_adamw")
    assert torch.equal(bits(out[0]), bits(out2[0])) and torch.equal(bits(out[1]), bits(out2[1]))
    assert hasattr(torch.ops.lbw_guard_cpu, "fused_step") and hasattr(torch.ops.lbw_guard_cpu, "grad_norm_sq")


def test_params_requiring_grad_and_registry(cpu_module):
    """Leaf parameters that require grad are updated in place (no autograd involvement), also
    with grad mode on; the registry hands out the same step."""
    from lbw_kernels.backends import load_backend

    backend = load_backend("cpu", torch.device("cpu"))
    bucket = make_bucket(torch.float32, torch.device("cpu"), fresh_seed(), shapes=[(20, 30)], group_ids=[0])
    bucket["params"] = [torch.nn.Parameter(p) for p in bucket["params"]]
    ref = clone_bucket(bucket)
    ref["params"] = [p.detach().clone() for p in bucket["params"]]
    control = make_control()
    run(backend.step, bucket, control)
    run(fused_adamw_reference, ref, control)
    assert_bits_equal(bucket["params"][0].detach(), ref["params"][0], "param")
    assert bucket["params"][0].requires_grad and bucket["params"][0].grad_fn is None


def test_torch_compile(backend):
    """The op traces under torch.compile (fake kernels, declared mutations) and gives the
    eager results bit for bit."""
    from lbw_kernels import cpp_step

    needs_op(backend)
    step, device = backend.step, backend.device
    grad_norm_sq = cpp_step.cpu_grad_norm_sq if device.type == "cpu" else (lambda gs: sum(g.double().square().sum() for g in gs))

    def f(params, grads, exp_avgs, exp_avg_sqs, steps, control, tensor_out, record):
        norm = grad_norm_sq(grads).sqrt()
        step(params, grads, exp_avgs, exp_avg_sqs, steps, [0, 2], [1, 0], control, tensor_out, record,
             grad_norm=norm, loss=tensor_out.new_ones(()))
        return record.sum()

    seed = fresh_seed()
    bucket = make_bucket(torch.float32, device, seed, shapes=[(40, 30), (17,)], group_ids=[0, 2])
    twin = clone_bucket(bucket)
    control = make_control(max_grad_norm=1.0).to(device)
    outs = []
    for b, fn in ((bucket, f), (twin, torch.compile(f, backend="aot_eager", fullgraph=True))):
        tensor_out = torch.zeros(2, C.NUM_TENSOR_FIELDS, dtype=torch.float64, device=device)
        record = torch.zeros(C.record_layout(NUM_GROUPS).size, dtype=torch.float64, device=device)
        fn(b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["steps"], control, tensor_out, record)
        outs.append((tensor_out, record))
    assert_states_equal(bucket, twin, "compiled")
    assert torch.equal(bits(outs[0][0]), bits(outs[1][0])) and torch.equal(bits(outs[0][1]), bits(outs[1][1]))


# --------------------------------------------------------------------------- CUDA specifics (GPU only)
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")


@cuda_only
def test_cuda_tables_cached_and_rebuilt_when_storage_moves():
    module = _load("cuda")
    from lbw_kernels.cpp_step import cuda_step

    dev = torch.device("cuda")
    control = make_control().to(dev)
    bucket = make_bucket(torch.float32, dev, fresh_seed())
    run(cuda_step, bucket, control)
    hits, misses = module.cache_stats()
    run(cuda_step, bucket, control)
    assert module.cache_stats() == (hits + 1, misses)
    bucket["grads"] = [g.clone() for g in bucket["grads"]]  # new storage: a new table
    check_step(Backend("cuda", dev, cuda_step, True), bucket, control, "after the grads moved")
    assert module.cache_stats()[1] == misses + 1


@cuda_only
def test_cuda_unaligned_storage():
    """Views at odd element offsets take the scalar path; results stay bit-exact."""
    _load("cuda")
    from lbw_kernels.cpp_step import cuda_step

    dev = torch.device("cuda")
    for dtype in DTYPES:
        bucket, _ = _layout_bucket(dtype, dev, fresh_seed())
        check_step(Backend("cuda", dev, cuda_step, True), bucket, make_control().to(dev), f"unaligned {dtype}")


@cuda_only
def test_cuda_no_sync_and_graph_capture():
    _load("cuda")
    from lbw_kernels.cpp_step import cuda_step

    dev = torch.device("cuda")
    control = make_control(max_grad_norm=1.0).to(dev)
    bucket = make_bucket(torch.bfloat16, dev, fresh_seed())
    scalars = scalars_on(dev, loss=1.5, found_inf=0.0, grad_scale=2.0, grad_norm=torch.tensor(3.0, dtype=torch.float64))
    tensor_out = torch.zeros(len(bucket["params"]), C.NUM_TENSOR_FIELDS, dtype=torch.float64, device=dev)
    record = torch.zeros(C.record_layout(NUM_GROUPS).size, dtype=torch.float64, device=dev)

    def call():
        cuda_step(bucket["params"], bucket["grads"], bucket["exp_avgs"], bucket["exp_avg_sqs"], bucket["steps"],
                  bucket["group_ids"], bucket["kinds"], control, tensor_out, record, **scalars)

    call()  # warm-up: builds and uploads the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()  # a cached call: no host synchronisation
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Graph capture, then replays that match eager steps bit for bit.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    # Each replay reads the sums tensor_out holds (the previous step's: the spike bound's
    # floor), so the reference carries its own from the same start.
    ref, ref_sums = clone_bucket(bucket), tensor_out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        graph.replay()
        ref_sums, _ = run(cuda_step, ref, control, tensor_in=ref_sums, **scalars)
    torch.cuda.synchronize()
    assert_states_equal(bucket, ref, "graph replays")


@cuda_only
def test_cuda_one_op_per_step():
    _load("cuda")
    from lbw_kernels.cpp_step import cuda_step

    dev = torch.device("cuda")
    bucket = make_bucket(torch.float32, dev, fresh_seed())
    control = make_control().to(dev)
    run(cuda_step, bucket, control)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(cuda_step, bucket, control)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert names.count("lbw_guard_cuda::fused_step") == 1


# --------------------------------------------------------------------------- builds and loading
def _load_in_subprocess(tmp_path, env_overrides: dict) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        import sys
        from lbw_kernels.backends import BackendUnavailable
        from lbw_kernels.cpp_backend import load_cpp_backend
        try:
            load_cpp_backend("cpu")
        except BackendUnavailable as exc:
            print("UNAVAILABLE:", exc)
            sys.exit(0)
        print("LOADED")
        sys.exit(1)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_missing_compiler_raises_backend_unavailable(tmp_path):
    res = _load_in_subprocess(tmp_path, {"CXX": str(tmp_path / "no-such-c++")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "UNAVAILABLE:" in res.stdout and "not on PATH" in res.stdout, res.stdout


def test_failing_compiler_raises_backend_unavailable(tmp_path):
    # A compiler that exists but fails: the build itself errors out, in a fresh build dir.
    res = _load_in_subprocess(tmp_path, {"CXX": shutil.which("false") or "/bin/false"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "UNAVAILABLE:" in res.stdout and "failed to build" in res.stdout, res.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_cuda_backend_unavailable_on_cpu_torch():
    from lbw_kernels.cpp_backend import load_cpp_backend

    with pytest.raises(BackendUnavailable, match="CPU-only"):
        load_cpp_backend("cuda")


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        found = cand if os.path.exists(cand) else None
    return found


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_kernel_compiles_without_spills(tmp_path):
    from lbw_kernels._build import cuda_build_args

    flags = [f for f in cuda_build_args()["extra_cuda_cflags"] if f != "-lineinfo"]
    cmd = [_nvcc(), "-c", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
           "arch=compute_90,code=sm_90", *flags, "-Xptxas", "-v",
           os.path.join(CSRC, "cuda", "fused_adamw_cuda.cu"), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0
    log = res.stdout + res.stderr
    assert "Used" in log, log[-2000:]
    spills = [line for line in log.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")
              and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, "\n".join(spills)


@pytest.mark.skipif(_nvcc() is None or shutil.which("c++") is None, reason="nvcc or c++ not found")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Syntax-check the torch side of the CUDA backend, even with a CPU build of torch."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    candidates = [
        os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(_nvcc()))), "include"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
        "/usr/local/cuda/include",
    ]
    cuda_inc = next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip("CUDA headers not found")
    incs = include_paths() + [cuda_inc, sysconfig.get_paths()["include"]]
    # CPU wheels lack this one generated header of c10/cuda; an empty one stands in for it.
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in incs):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path / "stub"))
    incs.append(os.path.join(CSRC, "common"))
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=lbw_check",
           *(f"-I{d}" for d in incs), os.path.join(CSRC, "cuda", "fused_adamw_cuda_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
