"""The Triton fused AdamW step (contract v2) against the PyTorch reference.

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through
Triton's interpreter; with a GPU the same tests run on CUDA tensors (the CUDA-only tests are
skipped on the CPU and vice versa).

How results are compared with :func:`lbw_kernels.reference.fused_adamw_reference` (run on
clones of the same inputs):

- params, moments and steps **bit for bit** (NaNs compared as NaNs), for fp32, bf16 and fp16.
  torch's vectorised fp32 ``sqrt`` on x86 CPUs (AVX2/AVX512 builds) is not correctly rounded
  (about 20% of random inputs come out one ulp off), so on the CPU the reference runs with
  ``Tensor.sqrt`` of fp32 computed through fp64 (correctly rounded: double rounding is
  innocuous for sqrt); CUDA's sqrt is IEEE already. The kernels use IEEE sqrt/div and no
  FMA contraction.
- per-tensor and group telemetry: counts exactly; sums of squares and sums to a relative
  1e-5 (the kernel accumulates each lane in fp32 and reduces in fp64, the reference sums in
  fp64); dot products to 1e-5 of the Cauchy-Schwarz bound sqrt(sum x^2 * sum y^2); the
  governor's signals (log omega, cos) to 1e-4 per contributing tensor, ratio_sq to 1e-4
  relative.
- the record's applied gates, invalid flags and globals exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lbw_kernels import contract as C  # noqa: E402
from lbw_kernels import triton_adamw  # noqa: E402
from lbw_kernels.reference import fused_adamw_reference  # noqa: E402
from lbw_kernels.triton_adamw import fused_adamw_triton  # noqa: E402
from lbw_kernels.triton_common import round_to  # noqa: E402
from spike_floor_case import NUM_LOUD, NUM_QUIET, STEP, floor_case  # noqa: E402

# The interpreter runs the kernels in numpy, which warns on inf * 0 (a spike bound on a
# tensor's first step) and on NaN arithmetic; both are intended.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_NO_CUDA = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                              reason="needs a CUDA GPU (not interpreted)")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, _NO_CUDA]),
]


def cuda_only(fn):
    return pytest.mark.gpu(_NO_CUDA(fn))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Small tiles, chunks and finish loops, so that tensors span several chunks with partial
# tiles and every loop of the finish kernel iterates more than once.
SMALL = replace(triton_adamw.INTERPRET_CONFIG, block=256, fixed_chunk_tiles=3, rows=2,
                members=2, groups=2)
# The GPU's chunk sizing (chunk_tiles with one "SM") on small tiles.
AUTO = replace(triton_adamw.INTERPRET_CONFIG, block=256, fixed_chunk_tiles=0)
CONFIGS = [None, SMALL, AUTO]  # None: the interpreter's default


# --------------------------------------------------------------------------- inputs
@dataclass
class Spec:
    shape: tuple
    group: int
    layout: str = "contiguous"  # contiguous | offset | channels_last | transposed
    zero_init: bool = False  # a matrix of KIND_ZERO_INIT (omega and cos, no ratio)


@dataclass
class Bucket:
    specs: list
    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    steps: list
    group_ids: list = field(default_factory=list)
    kinds: list = field(default_factory=list)

    def lists(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps)

    def clone(self) -> "Bucket":
        """Same values in the same layouts (odd offsets, channels_last, ...)."""
        out = []
        for k, xs in enumerate(self.lists()[:4]):
            out.append([alloc(s, x.dtype, x.device, k).copy_(x) for s, x in zip(self.specs, xs)])
        return Bucket(self.specs, *out, [s.clone() for s in self.steps], list(self.group_ids),
                      list(self.kinds))


def alloc(spec: Spec, dtype, device, salt: int = 0) -> torch.Tensor:
    """An uninitialised tensor of ``spec.shape`` in ``spec.layout``."""
    shape = tuple(spec.shape)
    n = math.prod(shape)
    if spec.layout == "offset":  # a view into a larger buffer at an odd element offset
        off = 1 + 2 * (salt % 2)
        buf = torch.empty(n + off + 5, dtype=dtype, device=device)
        return buf[off:off + n].view(shape)
    if spec.layout == "channels_last":
        return torch.empty(shape, dtype=dtype, device=device).to(
            memory_format=torch.channels_last)
    if spec.layout == "transposed":
        return torch.empty(shape[::-1], dtype=dtype, device=device).t()
    return torch.empty(shape, dtype=dtype, device=device)


def make_bucket(specs, dtype, device, gen, grad_scale=1.0, first_step=True) -> Bucket:
    """Random values with the awkward cases planted: spikes far over the bound, NaN/inf
    gradients, zero second moments, a tensor on its first step."""
    b = Bucket(specs, [], [], [], [], [])
    for i, spec in enumerate(specs):
        n = math.prod(spec.shape)
        v = torch.rand(n, generator=gen) * 1e-4
        g = torch.randn(n, generator=gen) * 0.01
        if n >= 4:
            idx = torch.randint(0, n, (max(1, n // 300),), generator=gen)
            v[idx[: len(idx) // 2]] = 0.0
            idx = torch.randint(0, n, (max(2, n // 200),), generator=gen)
            g[idx] = 1000 * v[idx].sqrt() * torch.sign(torch.randn(len(idx), generator=gen))
        if n >= 50:
            idx = torch.randperm(n, generator=gen)[:3]
            g[idx] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        p = torch.randn(n, generator=gen)
        m = torch.randn(n, generator=gen) * 0.01
        for xs, values, dt, k in ((b.params, p, dtype, 0), (b.grads, g * grad_scale, dtype, 1),
                                  (b.exp_avgs, m, torch.float32, 2),
                                  (b.exp_avg_sqs, v, torch.float32, 3)):
            x = alloc(spec, dt, device, k)
            x.copy_(values.to(dt).reshape(spec.shape))
            xs.append(x)
        step = 0 if (i == 0 and first_step) else int(torch.randint(1, 40, (), generator=gen))
        b.steps.append(torch.tensor(float(step), device=device))
        b.group_ids.append(spec.group)
        b.kinds.append(C.tensor_kind(b.params[-1], zero=spec.zero_init))
    return b


def random_specs(gen, num_groups: int, layouts=("contiguous", "offset", "channels_last",
                                                 "transposed")) -> list:
    """Random shapes: matrices, vectors, a 4-D conv kernel, empty tensors, one tensor large
    enough for several chunks; groups cycle so that the last group has no tensor."""
    r = lambda lo, hi: int(torch.randint(lo, hi, (), generator=gen))  # noqa: E731
    shapes = [(r(20, 60), r(20, 90)), (r(1, 3000),), (r(2, 5), r(3, 9), r(1, 5), r(2, 6)),
              (0,), (r(1, 8),), (r(30, 70), r(40, 80)), (3, 0), (r(1, 4), r(1, 200))]
    specs = []
    for i, shape in enumerate(shapes):
        if len(shape) == 4:
            layout = "channels_last" if "channels_last" in layouts else "contiguous"
        else:
            choices = [x for x in layouts if x != "channels_last" and
                       (x != "transposed" or len(shape) == 2)]
            layout = choices[r(0, len(choices))]
        specs.append(Spec(shape, i % max(1, num_groups - 1), layout))
    specs[-1].zero_init = True  # a LoRA-B-like matrix (KIND_ZERO_INIT)
    return specs


def make_control(num_groups: int, gen, device, **stepwide) -> torch.Tensor:
    """Random group rows (lr, scale, betas, eps, weight decay, spike bound, clamp)."""
    c = torch.zeros(num_groups + 1, C.NUM_CONTROL, dtype=torch.float64)
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731
    pick = lambda xs: xs[int(torch.randint(0, len(xs), (), generator=gen))]  # noqa: E731
    for g in range(num_groups):
        c[g, C.LR] = u(1e-4, 2e-2)
        c[g, C.SCALE] = u(0.2, 1.0)
        c[g, C.GATE] = 1.0
        c[g, C.BETA1] = pick([0.9, 0.8, 0.95, 0.0])
        c[g, C.BETA2] = pick([0.999, 0.99, 0.95])
        c[g, C.EPS] = pick([1e-8, 1e-6, 0.0])
        c[g, C.WEIGHT_DECAY] = pick([0.0, 0.01, 0.1])
        c[g, C.SPIKE_K] = pick([math.inf, 3.0, 6.0])
        c[g, C.CLAMP] = pick([0.0, 1.0])
    row = c[num_groups]
    row[C.LOSS_LIMIT] = math.inf
    row[C.CHECK_LOSS] = 1.0
    row[C.GRAD_NORM_LIMIT] = math.inf
    row[C.MAX_GRAD_NORM] = 0.0
    row[C.MASK_NONFINITE] = 1.0
    for name, value in stepwide.items():
        row[getattr(C, name)] = value
    return c.to(device)


# --------------------------------------------------------------------------- running
@contextlib.contextmanager
def ieee_sqrt():
    """Correctly rounded fp32 ``Tensor.sqrt`` (through fp64) while the reference runs."""
    had = "sqrt" in torch.Tensor.__dict__
    orig = torch.Tensor.sqrt

    def sqrt(self):
        return orig(self.double()).float() if self.dtype == torch.float32 else orig(self)

    torch.Tensor.sqrt = sqrt
    try:
        yield
    finally:
        if had:
            torch.Tensor.sqrt = orig
        else:
            del torch.Tensor.sqrt


@dataclass
class Outputs:
    tensor_out: torch.Tensor
    record: torch.Tensor


def new_outputs(b: Bucket, num_groups: int, device, fill=float("nan")) -> Outputs:
    """Outputs pre-filled with NaN: whatever the backend must write, it must overwrite."""
    return Outputs(torch.full((len(b.params), C.NUM_TENSOR_FIELDS), fill, dtype=torch.float64,
                              device=device),
                   torch.full((C.record_layout(num_groups).size,), fill, dtype=torch.float64,
                              device=device))


def call(fn, b: Bucket, control, out: Outputs, **kw):
    ctx = ieee_sqrt() if fn is fused_adamw_reference else contextlib.nullcontext()
    with ctx:
        fn(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.steps, b.group_ids, b.kinds,
           control, out.tensor_out, out.record, **kw)


def run_both(b: Bucket, control, config=None, accumulate_into=None, tensor_in=None, **kw):
    """Run the reference on a clone and the Triton backend on ``b``; returns
    (reference bucket, reference outputs, triton outputs). ``tensor_in``: what tensor_out holds
    on entry (the previous step's sums: the spike bound's floor); NaN (no floor) by default."""
    G = control.shape[0] - 1
    ref = b.clone()
    device = control.device
    if accumulate_into is None:
        ref_out, got_out = new_outputs(b, G, device), new_outputs(b, G, device)
        if tensor_in is not None:
            ref_out.tensor_out.copy_(tensor_in)
            got_out.tensor_out.copy_(tensor_in)
    else:
        ref_rec, got_rec = accumulate_into
        ref_out = Outputs(torch.full((len(b.params), C.NUM_TENSOR_FIELDS), float("nan"),
                                     dtype=torch.float64, device=device), ref_rec)
        got_out = Outputs(ref_out.tensor_out.clone(), got_rec)
    call(fused_adamw_reference, ref, control, ref_out, **kw)
    with use_config(config):
        call(fused_adamw_triton, b, control, got_out, **kw)
    return ref, ref_out, got_out


@contextlib.contextmanager
def use_config(config):
    if config is None:
        yield
        return
    old = triton_adamw.INTERPRET_CONFIG, triton_adamw.GPU_CONFIG
    triton_adamw.INTERPRET_CONFIG = config
    triton_adamw.GPU_CONFIG = replace(triton_adamw.GPU_CONFIG, block=config.block,
                                      fixed_chunk_tiles=config.fixed_chunk_tiles,
                                      rows=config.rows, members=config.members,
                                      groups=config.groups)
    try:
        yield
    finally:
        triton_adamw.INTERPRET_CONFIG, triton_adamw.GPU_CONFIG = old


# --------------------------------------------------------------------------- comparing
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    same = (bits(actual) == bits(expected)) | (actual.isnan() & expected.isnan())
    assert bool(same.all()), (
        f"{what}: {int((~same).sum())} of {same.numel()} elements differ, e.g. "
        f"{actual[~same][:4].tolist()} vs {expected[~same][:4].tolist()}")


def assert_same_state(got: Bucket, ref: Bucket, grads_before=None):
    for i in range(len(got.params)):
        for k, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
            assert_same(got.lists()[k][i], ref.lists()[k][i], f"{name} {i}")
        assert_same(got.steps[i], ref.steps[i], f"step {i}")
        if grads_before is not None:
            assert_same(got.grads[i], grads_before[i], f"grad {i} must not change")


_COUNTS = (C.T_SPIKES, C.T_NONFINITE, C.T_NUMEL)
_POSITIVE = (C.T_GRAD_SQ, C.T_UPDATE_SQ, C.T_PARAM_SQ, C.T_PREV_SQ, C.T_MOMENT1_SQ,
             C.T_MOMENT2_SUM)
_DOTS = ((C.T_GRAD_DOT_UPDATE, C.T_GRAD_SQ, C.T_UPDATE_SQ),
         (C.T_GRAD_DOT_PREV, C.T_GRAD_SQ, C.T_PREV_SQ))


def _close(actual, expected, atol, rtol, what):
    nan = actual.isnan() & expected.isnan()
    inf = torch.isinf(expected) & (actual == expected)
    ok = nan | inf | ((actual - expected).abs() <= atol + rtol * expected.abs())
    assert bool(ok.all()), f"{what}: {actual[~ok].tolist()} vs {expected[~ok].tolist()}"


def assert_sums_close(actual, expected, what):
    """Rows of the TENSOR_FIELDS (per tensor, or the first columns of group rows)."""
    for col in _COUNTS:
        assert_same(actual[:, col], expected[:, col], f"{what} {C.TENSOR_FIELDS[col]}")
    for col in _POSITIVE:
        _close(actual[:, col], expected[:, col], 1e-300, 1e-5, f"{what} {C.TENSOR_FIELDS[col]}")
    for col, a, b in _DOTS:
        scale = (expected[:, a] * expected[:, b]).sqrt().nan_to_num(0.0, posinf=0.0)
        _close(actual[:, col], expected[:, col], 1e-5 * scale + 1e-300, 1e-5,
               f"{what} {C.TENSOR_FIELDS[col]}")


def assert_telemetry(got: Outputs, ref: Outputs, num_groups: int):
    assert_sums_close(got.tensor_out, ref.tensor_out, "tensor_out")
    layout = C.record_layout(num_groups)
    g = got.record[layout.group_fields].view(num_groups, C.NUM_GROUP_FIELDS)
    r = ref.record[layout.group_fields].view(num_groups, C.NUM_GROUP_FIELDS)
    assert_sums_close(g, r, "group")
    for col in (C.G_OMEGA_COUNT, C.G_COS_COUNT, C.G_RATIO_COUNT, C.G_MATRIX_NUMEL):
        assert_same(g[:, col], r[:, col], C.GROUP_FIELDS[col])
    _close(g[:, C.G_OMEGA_LOG_SUM], r[:, C.G_OMEGA_LOG_SUM], 1e-4 * r[:, C.G_OMEGA_COUNT], 0.0,
           "omega_log_sum")
    _close(g[:, C.G_COS_SUM], r[:, C.G_COS_SUM], 1e-4 * r[:, C.G_COS_COUNT], 0.0, "cos_sum")
    _close(g[:, C.G_RATIO_SQ_SUM], r[:, C.G_RATIO_SQ_SUM], 1e-300, 1e-4, "ratio_sq_sum")
    for part in ("applied_gate", "invalid", "globals"):
        sl = getattr(layout, part)
        assert_same(got.record[sl], ref.record[sl], part)


def check(b: Bucket, control, config=None, tensor_in=None, **kw):
    """Run both backends and compare everything; returns (ref outputs, triton outputs)."""
    grads_before = [g.clone() for g in b.grads]
    ref, ref_out, got_out = run_both(b, control, config=config, tensor_in=tensor_in, **kw)
    assert_same_state(b, ref, grads_before)
    assert_telemetry(got_out, ref_out, control.shape[0] - 1)
    return ref_out, got_out


def tensor(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(device, dtype, seed):
    """Mixed layouts, several groups (one without tensors), grad scale, clipping, a loss,
    three steps in a row with fresh gradients."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G = 4
    control = make_control(G, gen, device, MAX_GRAD_NORM=0.5)
    b = make_bucket(random_specs(gen, G), dtype, device, gen, grad_scale=1024.0)
    for step in range(3):
        if step:
            for x in b.grads:
                x.copy_((torch.randn(x.shape, generator=gen) * 10.0).to(x.dtype))
        ref_out, _ = check(b, control, config=CONFIGS[seed],
                           loss=tensor(2.5, device), grad_scale=tensor(1024.0, device),
                           found_inf=tensor(0.0, device), grad_norm=tensor(3.0, device))
        rec = ref_out.record[C.record_layout(G).group_fields].view(G, -1)
        if step == 0:  # the planted cases were there
            assert rec[:, C.T_SPIKES].sum() > 0 and rec[:, C.T_NONFINITE].sum() > 0
        assert not rec[G - 1].any()  # the group without tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clamp", [0.0, 1.0])
@pytest.mark.parametrize("mask_nonfinite", [0.0, 1.0])
def test_spikes_and_nonfinite(device, clamp, mask_nonfinite):
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    control = make_control(2, gen, device, MASK_NONFINITE=mask_nonfinite)
    control[:2, C.SPIKE_K] = 3.0
    control[:2, C.CLAMP] = clamp
    specs = [Spec((40, 70), 0), Spec((1500,), 1, "offset"), Spec((2, 3, 5, 7), 0,
                                                                  "channels_last")]
    b = make_bucket(specs, torch.bfloat16, device, gen, first_step=False)
    ref_out, _ = check(b, control)
    assert ref_out.tensor_out[:, C.T_SPIKES].sum() > 0
    assert ref_out.tensor_out[:, C.T_NONFINITE].sum() > 0
    has_nan = any(bool(p.isnan().any()) for p in b.params)
    assert has_nan == (mask_nonfinite == 0.0)  # AdamW's propagation only when unmasked


STEP_CASES = {
    # name: (stepwide control, kwargs builder, expected step_ok)
    "plain": ({}, lambda d: {}, 1.0),
    "found_inf": ({}, lambda d: {"found_inf": tensor(1.0, d)}, 0.0),
    "found_inf_zero": ({}, lambda d: {"found_inf": tensor(0.0, d)}, 1.0),
    "clip": ({"MAX_GRAD_NORM": 1.0, "GRAD_NORM_LIMIT": 10.0},
             lambda d: {"grad_norm": tensor(4.0, d)}, 1.0),
    "norm_over_limit": ({"MAX_GRAD_NORM": 1.0, "GRAD_NORM_LIMIT": 10.0},
                        lambda d: {"grad_norm": tensor(12.0, d)}, 0.0),
    "norm_nan": ({}, lambda d: {"grad_norm": tensor(float("nan"), d)}, 0.0),
    "norm_no_clip": ({"MAX_GRAD_NORM": 0.0}, lambda d: {"grad_norm": tensor(0.3, d)}, 1.0),
    # A max norm without a pre-pass norm does not clip (and a tiny one would show if it did).
    "max_norm_without_norm": ({"MAX_GRAD_NORM": 1e-9}, lambda d: {}, 1.0),
    "loss_ok": ({"LOSS_LIMIT": 5.0}, lambda d: {"loss": tensor(2.0, d)}, 1.0),
    "loss_over_limit": ({"LOSS_LIMIT": 5.0}, lambda d: {"loss": tensor(7.0, d)}, 0.0),
    "loss_nan": ({}, lambda d: {"loss": tensor(float("nan"), d)}, 0.0),
    "loss_inf_unchecked": ({"CHECK_LOSS": 0.0}, lambda d: {"loss": tensor(float("inf"), d)}, 1.0),
    "loss_fp64_scaled": ({}, lambda d: {"loss": torch.tensor(1.5, dtype=torch.float64, device=d),
                                        "grad_scale": tensor(64.0, d)}, 1.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_wide_checks(device, case):
    stepwide, kwargs, expected_ok = STEP_CASES[case]
    seed = list(STEP_CASES).index(case)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    control = make_control(2, gen, device, **stepwide)
    dtype = DTYPES[seed % 3]
    b = make_bucket([Spec((30, 41), 0), Spec((700,), 1, "offset"), Spec((0,), 1)], dtype,
                    device, gen)
    steps_before = [float(s) for s in b.steps]
    ref_out, got = check(b, control, **kwargs(device))
    layout = C.record_layout(2)
    assert float(got.record[layout.globals][C.R_STEP_OK]) == expected_ok
    for s, before in zip(b.steps, steps_before):
        assert float(s) == before + expected_ok


@pytest.mark.parametrize("device", DEVICES)
def test_gates_and_invalid_groups(device):
    """Gate 0, NaN lr, beta2 = 1, negative eps, NaN spike bound: not written, steps kept,
    invalid flagged for the invalid ones; telemetry still measured (NaNs and all)."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    G = 6
    control = make_control(G, gen, device)
    control[1, C.GATE] = 0.0
    control[2, C.LR] = float("nan")
    control[3, C.BETA2] = 1.0
    control[4, C.EPS] = -1e-8
    control[5, C.SPIKE_K] = float("nan")
    specs = [Spec((25, 30), g, "offset" if g % 2 else "contiguous") for g in range(G)]
    b = make_bucket(specs, torch.float32, device, gen, first_step=False)
    before = b.clone()
    _, got = check(b, control, loss=tensor(1.0, device))
    layout = C.record_layout(G)
    assert got.record[layout.applied_gate].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert got.record[layout.invalid].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    for i in range(1, G):
        assert_same(b.params[i], before.params[i], f"param {i} not written")
        assert_same(b.steps[i], before.steps[i], f"step {i} kept")
    assert not torch.equal(b.params[0], before.params[0])


@pytest.mark.parametrize("device", DEVICES)
def test_signal_clamps(device):
    """log omega beyond +-OMEGA_LOG_CLAMP (tiny and huge first moments), one group each."""
    gen = torch.Generator().manual_seed(13)
    control = make_control(3, gen, device)
    b = make_bucket([Spec((20, 30), 0), Spec((24, 11), 1), Spec((9, 40), 2, "offset")],
                    torch.float32, device, gen, first_step=False)
    b.exp_avgs[0].mul_(1e-6)
    b.exp_avgs[1].mul_(1e4)
    ref_out, _ = check(b, control)
    fields = ref_out.record[C.record_layout(3).group_fields].view(3, -1)
    assert fields[0, C.G_OMEGA_LOG_SUM] == -C.OMEGA_LOG_CLAMP
    assert fields[1, C.G_OMEGA_LOG_SUM] == C.OMEGA_LOG_CLAMP
    assert abs(fields[2, C.G_OMEGA_LOG_SUM]) < C.OMEGA_LOG_CLAMP


@pytest.mark.parametrize("device", DEVICES)
def test_kinds(device):
    """KIND_ZERO_INIT matrices count in omega, cos and matrix_numel but not in the ratio;
    KIND_OTHER tensors in none of them."""
    gen = torch.Generator().manual_seed(14)
    control = make_control(3, gen, device)
    b = make_bucket([Spec((20, 30), 0), Spec((24, 11), 1, zero_init=True),
                     Spec((500,), 2, "offset")], torch.bfloat16, device, gen, first_step=False)
    assert b.kinds == [C.KIND_MATRIX, C.KIND_ZERO_INIT, C.KIND_OTHER]
    ref_out, _ = check(b, control)
    fields = ref_out.record[C.record_layout(3).group_fields].view(3, -1)
    counts = fields[:, [C.G_OMEGA_COUNT, C.G_COS_COUNT, C.G_RATIO_COUNT]].tolist()
    assert counts == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert fields[:, C.G_MATRIX_NUMEL].tolist() == [600, 264, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_over_two_buckets(device):
    """Two buckets (fp32, then bf16) into one record: the second adds its group fields."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    G = 4
    control = make_control(G, gen, device, MAX_GRAD_NORM=2.0)
    first = make_bucket([Spec((20, 33), 0), Spec((900,), 1, "offset")], torch.float32, device,
                        gen)
    second = make_bucket([Spec((17, 29), 1, "transposed"), Spec((2, 4, 3, 3), 2, "channels_last"),
                          Spec((5,), 1)], torch.bfloat16, device, gen)
    kw = dict(loss=tensor(0.7, device), grad_norm=tensor(5.0, device))
    size = C.record_layout(G).size
    ref_rec = torch.full((size,), float("nan"), dtype=torch.float64, device=device)
    got_rec = ref_rec.clone()
    for bucket, accumulate in ((first, False), (second, True)):
        grads = [g.clone() for g in bucket.grads]
        ref, ref_out, got_out = run_both(bucket, control, accumulate_into=(ref_rec, got_rec),
                                         accumulate=accumulate, **kw)
        assert_same_state(bucket, ref, grads)
        assert_telemetry(got_out, ref_out, G)
    group_rows = got_rec[C.record_layout(G).group_fields].view(G, -1)
    assert group_rows[1, C.T_NUMEL] == 900 + 17 * 29 + 5  # group 1 spans both buckets
    assert not group_rows[3].any()


@pytest.mark.parametrize("device", DEVICES)
def test_many_steps_in_a_row(device):
    """Ten steps on the same storage: steps advance by the applied gate (one skipped step),
    the tables are built once, results stay bit-exact."""
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    control = make_control(2, gen, device, LOSS_LIMIT=10.0)
    b = make_bucket([Spec((33, 47), 0), Spec((1200,), 1, "offset"), Spec((3, 0), 0)],
                    torch.float16, device, gen)
    triton_adamw.clear_caches()
    builds = None
    tensor_in = None
    for step in range(10):
        for x in b.grads:
            x.copy_((torch.randn(x.shape, generator=gen) * 0.05).to(x.dtype))
        loss = 20.0 if step == 4 else 1.0 / (step + 1)  # step 4 is skipped
        steps_before = [float(s) for s in b.steps]
        # as the optimizer does: each step finds the previous step's sums (the bound's floor)
        _, got_out = check(b, control, tensor_in=tensor_in, loss=tensor(loss, device))
        tensor_in = got_out.tensor_out.clone()
        for s, before in zip(b.steps, steps_before):
            assert float(s) == before + (step != 4)
        if step == 0:
            builds = dict(triton_adamw.cache_stats)
    assert triton_adamw.cache_stats == builds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_history", [True, False], ids=["floor", "no-history"])
def test_spike_floor(device, with_history):
    """The spike bound's floor from the previous step's sums in tensor_out: exact outlier
    counts (see tests/spike_floor_case.py), bit-exact against the reference."""
    gen = torch.Generator().manual_seed(11)
    spec = Spec((64, 64), 0)
    p, g, m, v, row = floor_case(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    b = Bucket([spec], [p.to(device)], [g.to(device)], [m.to(device)], [v.to(device)],
               [torch.tensor(STEP, device=device)], [0], [C.KIND_MATRIX])
    control = make_control(1, gen, device)
    control[0, C.SPIKE_K] = 6.0
    control[0, C.CLAMP] = 1.0
    tensor_in = (row if with_history else torch.zeros_like(row)).reshape(1, -1).to(device)
    ref_out, _ = check(b, control, tensor_in=tensor_in)
    expected = NUM_LOUD if with_history else NUM_LOUD + NUM_QUIET
    assert ref_out.tensor_out[0, C.T_SPIKES].item() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_empty_buckets(device):
    """No tensors, or only empty ones: the record is still rewritten (zero group fields,
    gates, invalid flags, globals)."""
    gen = torch.Generator().manual_seed(6)
    control = make_control(3, gen, device)
    control[2, C.LR] = float("nan")
    for specs in ([], [Spec((0,), 1), Spec((4, 0), 0)]):
        b = make_bucket(specs, torch.float32, device, gen)
        _, got = check(b, control, loss=tensor(1.0, device), grad_norm=tensor(1.0, device))
        fields = got.record[C.record_layout(3).group_fields]
        assert not fields.any()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    G = 3
    control = make_control(G, gen, device, MAX_GRAD_NORM=1.0)
    a = make_bucket(random_specs(gen, G), torch.float32, device, gen, grad_scale=8.0)
    b = a.clone()
    outs = []
    for bucket in (a, b):
        out = new_outputs(bucket, G, device)
        with use_config(SMALL):
            call(fused_adamw_triton, bucket, control, out, grad_scale=tensor(8.0, device),
                 grad_norm=tensor(2.0, device))
        outs.append(out)
    assert torch.equal(bits(outs[0].tensor_out), bits(outs[1].tensor_out))
    assert torch.equal(bits(outs[0].record), bits(outs[1].record))
    for xs, ys in zip(a.lists(), b.lists()):
        for x, y in zip(xs, ys):
            assert_same(x, y, "state")


class _LaunchCounter:
    """Stands in for a @triton.jit kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
def test_two_launches_and_caching(device, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    control = make_control(2, gen, device)
    specs = [Spec((40, 60), 0), Spec((10,), 1), Spec((0,), 0), Spec((5000,), 1, "offset")]
    b = make_bucket(specs, torch.bfloat16, device, gen)
    update = _LaunchCounter(triton_adamw.update_kernel)
    finish = _LaunchCounter(triton_adamw.finish_kernel)
    monkeypatch.setattr(triton_adamw, "update_kernel", update)
    monkeypatch.setattr(triton_adamw, "finish_kernel", finish)
    triton_adamw.clear_caches()
    with use_config(SMALL):  # 768-element chunks
        out = new_outputs(b, 2, device)
        call(fused_adamw_triton, b, control, out)
        chunks = sum(-(-math.prod(s.shape) // 768) for s in specs)
        assert update.grids == [(chunks,)] and finish.grids == [(len(specs) + 1,)]
        builds = dict(triton_adamw.cache_stats)
        call(fused_adamw_triton, b, control, out)
        assert triton_adamw.cache_stats == builds  # same storage: nothing rebuilt
        # Replace a state tensor (as load_state_dict does): new storage, new pointer table.
        old_m = b.exp_avgs[0]
        b.exp_avgs[0] = old_m.clone()
        old_bits = bits(old_m).clone()
        check(b, control, config=SMALL)
        assert triton_adamw.cache_stats["pointer_builds"] == builds["pointer_builds"] + 1
        assert triton_adamw.cache_stats["struct_builds"] == builds["struct_builds"]
        assert torch.equal(bits(old_m), old_bits)  # the stale storage is not written


def _bad_cases(b: Bucket, control, device):
    """(what, modify(args) -> args, message) for invalid calls."""
    def with_list(k, i, x):
        def f(a):
            lists = [list(t) for t in a["lists"]]
            lists[k][i] = x
            return dict(a, lists=lists)
        return f

    def with_kw(**kw):
        return lambda a: dict(a, **kw)

    T = len(b.params)

    def non_dense(a):  # p, g, m, v all every-other-column views: same strides, not dense
        lists = [list(t) for t in a["lists"]]
        for k in range(4):
            x = lists[k][0]
            wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=device)
            lists[k][0] = wide[:, ::2]
        return dict(a, lists=lists)
    return [
        ("lengths", lambda a: dict(a, lists=[a["lists"][0][:1], *a["lists"][1:]]), "differ in length"),
        ("grad dtype", with_list(1, 1, b.grads[1].float()), "param/grad dtypes"),
        ("fp16 moment", with_list(3, 0, b.exp_avg_sqs[0].half()), "not float32"),
        ("grad strides", with_list(1, 0, b.grads[0].t().contiguous().t()), "strides"),
        ("grad shape", with_list(1, 0, b.grads[0].reshape(-1)), "shape"),
        ("non-dense param", non_dense, "dense"),
        ("fp64 step", with_list(4, 0, torch.tensor(1.0, dtype=torch.float64, device=device)),
         "0-d float32"),
        ("shared step", with_list(4, 1, b.steps[0]), "shares its step"),
        ("group id", with_kw(group_ids=[0, 2]), "group id"),
        ("kind", with_kw(kinds=[1, 3]), "kind"),
        ("control dtype", with_kw(control=control.float()), "control"),
        ("control shape", with_kw(control=control[:, :5].contiguous()), "control"),
        ("tensor_out shape", with_kw(tensor_out=torch.zeros(T + 1, C.NUM_TENSOR_FIELDS,
                                                            dtype=torch.float64, device=device)),
         "tensor_out"),
        ("record_out size", with_kw(record_out=torch.zeros(3, dtype=torch.float64, device=device)),
         "record_out"),
        ("fp32 param dtype", with_kw(lists=[[x.double() for x in b.params],
                                            [x.double() for x in b.grads], *[b.exp_avgs,
                                                                             b.exp_avg_sqs,
                                                                             b.steps]]),
         "unsupported param dtype"),
        ("loss shape", with_kw(loss=torch.ones(2, device=device)), "loss"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_calls_before_touching_anything(device):
    gen = torch.Generator().manual_seed(9)
    control = make_control(2, gen, device)
    b = make_bucket([Spec((6, 5), 0), Spec((7,), 1)], torch.bfloat16, device, gen,
                    first_step=False)
    before = b.clone()
    good = dict(lists=list(b.lists()), group_ids=b.group_ids, kinds=b.kinds, control=control,
                tensor_out=torch.zeros(2, C.NUM_TENSOR_FIELDS, dtype=torch.float64,
                                       device=device),
                record_out=torch.zeros(C.record_layout(2).size, dtype=torch.float64,
                                       device=device))
    for what, modify, message in _bad_cases(b, control, device):
        triton_adamw.clear_caches()  # per-tensor checks run when the tables are built
        a = modify(dict(good))
        kw = {k: a[k] for k in ("loss",) if k in a}
        with pytest.raises(ValueError, match=message):
            fused_adamw_triton(*a["lists"], a["group_ids"], a["kinds"], a["control"],
                               a["tensor_out"], a["record_out"], **kw)
        for xs, ys in zip(b.lists(), before.lists()):
            for x, y in zip(xs, ys):
                assert_same(x, y, f"{what}: state touched")
        assert not good["tensor_out"].any() and not good["record_out"].any(), what


def test_chunk_sizes_for_a_gpu():
    """The GPU grid: a full wave of 4 blocks per SM when the bucket allows it, at most 8
    waves, chunks of at least 8 tiles when there is enough work, at most 1024 chunks per
    tensor."""
    cfg, sms = triton_adamw.GPU_CONFIG, 132
    slots = sms * cfg.blocks_per_sm
    for total, biggest in ((10, 10), (1000, 400), (40_000, 20_000), (10**6, 10**6),
                           (10**7, 10**5), (3 * 10**7, 2 * 10**7)):
        ct = triton_adamw.chunk_tiles(total, biggest, cfg, sms)
        programs = -(-total // ct)
        assert programs <= slots * cfg.max_waves or ct >= cfg.min_chunk_tiles
        assert -(-biggest // ct) <= cfg.max_rows_per_tensor
        if total >= slots * cfg.min_chunk_tiles:
            assert ct >= cfg.min_chunk_tiles
        if total >= slots:
            assert programs >= min(slots, total) * 0.5
        assert ct * cfg.block <= 1 << 30


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, round_to(x, P_DTYPE), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_round_to_matches_torch_cast(device, dtype):
    """The kernel's fp32 -> bf16/fp16 rounding equals torch's on every kind of value:
    random bit patterns (NaN, inf, subnormals, huge), exact ties and carries."""
    gen = torch.Generator().manual_seed(10)
    random_bits = torch.randint(-2**31, 2**31, (6000,), generator=gen, dtype=torch.int64)
    specials = [0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001, 0x80000000,
                0x3F808000, 0x3F818000, 0x3F8FFFFF, 0x477FEFFF, 0x477FF000, 0x33000000,
                0x33000001, 0x387FC000]
    ties = (torch.randint(0, 2**16, (2000,), generator=gen) << 16) | 0x8000  # bf16 ties
    words = torch.cat([random_bits, torch.tensor(specials), ties]).to(torch.int64)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    x = words.view(torch.float32)
    x = torch.cat([x, torch.randn(2000, generator=gen) * 1e-5]).to(device)  # fp16 subnormals
    y = torch.empty_like(x, dtype=dtype)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](
        x, y, x.numel(), P_DTYPE=getattr(tl, str(dtype).split(".")[1]), BLOCK=1024)
    expected = x.to(dtype)
    same = (bits(y) == bits(expected)) | (y.isnan() & expected.isnan())
    assert bool(same.all()), x[~same][:8]


# --------------------------------------------------------------------------- CUDA only
@cuda_only
def test_cuda_graph_capture_and_no_sync():
    """Once the tables are cached, the step neither syncs with the host nor resists
    capture; replaying the graph on new gradients matches the reference."""
    device = "cuda"
    gen = torch.Generator().manual_seed(11)
    G = 3
    control = make_control(G, gen, device, MAX_GRAD_NORM=1.0)
    b = make_bucket(random_specs(gen, G), torch.bfloat16, device, gen)
    kw = dict(loss=tensor(1.0, device), grad_norm=tensor(2.0, device),
              found_inf=tensor(0.0, device), grad_scale=tensor(1.0, device))
    out = new_outputs(b, G, device)
    call(fused_adamw_triton, b, control, out, **kw)  # builds the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(fused_adamw_triton, b, control, out, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(fused_adamw_triton, b, control, out, **kw)
    for x in b.grads:
        x.copy_((torch.randn(x.shape, generator=gen) * 0.1).to(x.dtype))
    # The replay reads the sums ``out`` holds (the previous step's: the spike bound's floor),
    # so the reference starts from the same ones.
    ref, ref_out = b.clone(), Outputs(out.tensor_out.clone(), out.record.clone())
    call(fused_adamw_reference, ref, control, ref_out, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_state(b, ref)
    assert_telemetry(out, ref_out, G)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu_with_current_device_zero():
    device = "cuda:1"
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(12)
    control = make_control(2, gen, device)
    b = make_bucket([Spec((30, 30), 0), Spec((100,), 1, "offset")], torch.float32, device, gen)
    check(b, control, loss=tensor(1.0, device))
    assert torch.cuda.current_device() == 0
