"""The Triton fused AdamW step against the PyTorch reference (lbw_kernels.reference).

On a machine without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU
tensors through Triton's interpreter; with a GPU they run on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lbw_kernels import contract as C  # noqa: E402
from lbw_kernels import triton_adamw  # noqa: E402
from lbw_kernels.reference import fused_adamw_reference  # noqa: E402
from lbw_kernels.triton_adamw import _round_to, fused_adamw_triton  # noqa: E402

# The interpreter runs the kernels in numpy, which warns on inf * 0 (an outlier bound on a
# tensor's first step) and on fp16 overflow in the rounding test; both are intended.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU (not interpreted)")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (1, 3, 4097, 2500, 0, 1800, 64)
NUM_GROUPS = 4  # group 3 gets no tensors: its telemetry must be all zeros
GATED_GROUP = 1


def _f64(values, device):
    return torch.tensor(values, dtype=torch.float64, device=device)


def make_bucket(dtype, device, seed, sizes=SIZES):
    """Fresh random bucket with the awkward cases planted: NaN/inf grads, outliers, a gated
    group, a tensor on its first step, a grad scale and clip coefficient != 1."""
    gen = torch.Generator().manual_seed(seed)
    group_ids = [i % 3 for i in range(len(sizes))]
    grad_scale = 256.0
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for i, n in enumerate(sizes):
        v = torch.rand(n, generator=gen) * 1e-4
        g = torch.randn(n, generator=gen) * 0.01
        if n >= 3:  # outliers: far past k * sqrt(v)
            idx = torch.randint(0, n, (max(1, n // 500),), generator=gen)
            g[idx] = 50 * v[idx].sqrt() * torch.sign(torch.randn(len(idx), generator=gen))
        if n >= 64:  # non-finite grads, all three kinds
            idx = torch.randperm(n, generator=gen)[:3]
            g[idx] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        params.append(torch.randn(n, generator=gen).to(dtype).to(device))
        grads.append((g * grad_scale).to(dtype).to(device))
        exp_avgs.append((torch.randn(n, generator=gen) * 0.01).to(device))
        exp_avg_sqs.append(v.to(device))
        # Step 1 on tensor 0 (outlier scale +inf), otherwise random: bias corrections differ.
        step = 1 if i == 0 else int(torch.randint(2, 60, (), generator=gen))
        steps.append(torch.tensor(float(step), device=device))
    gate = _f64([1.0] * NUM_GROUPS, device)
    gate[GATED_GROUP] = 0.0
    coeffs = C.coefficient_table(
        steps, torch.tensor(group_ids, device=device),
        lr=_f64([1e-3, 3e-4, 2e-2, 1e-3], device), beta1=_f64([0.9, 0.9, 0.8, 0.9], device),
        beta2=_f64([0.999, 0.99, 0.95, 0.999], device),
        eps=_f64([1e-8, 1e-6, 1e-8, 1e-8], device),
        weight_decay=_f64([0.1, 0.0, 0.01, 0.1], device), gate=gate, outlier_factor=4.0)
    scalars = dict(
        inv_grad_scale=torch.tensor(1.0 / grad_scale, device=device),
        clip_coef=torch.tensor(0.37, device=device))
    return [params, grads, exp_avgs, exp_avg_sqs], coeffs, group_ids, scalars


def clone_lists(lists):
    return [[t.clone() for t in ts] for ts in lists]


def run(fn, lists, coeffs, group_ids, scalars):
    return fn(*lists, coeffs, group_ids, NUM_GROUPS, scalars["inv_grad_scale"],
              scalars["clip_coef"])


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (fp64), floored at the subnormal spacing."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1) * fi.eps
    return spacing.clamp_min(fi.smallest_normal * fi.eps)


def assert_within_ulp(actual, expected, ulps, what, before=None):
    """|actual - expected| <= ulps ulp of expected, plus ulps ulp of the update
    ``expected - before`` when given: an ulp of error in the normalised step is an ulp of
    the update, which exceeds an ulp of p when the update is larger than p."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = (actual.double() - expected.double()).abs()
    tol = ulp(expected, expected.dtype)
    if before is not None:
        tol = tol + ulp(expected.double() - before.double(), torch.float32)
    ok = (actual == expected) | (diff <= ulps * tol)
    ok |= actual.isnan() & expected.isnan()
    assert bool(ok.all()), (f"{what}: {int((~ok).sum())} of {ok.numel()} elements off by more "
                            f"than {ulps} ulp, max abs diff {diff[~ok].max().item():.3e}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def ieee_step(p, g, m, v, c, inv_grad_scale, clip_coef):
    """The contract's per-element math with every fp32 operation correctly rounded: each op
    is done in fp64 (exact enough for +, -, *, /, sqrt of fp32 operands) and rounded to
    fp32. The kernel uses IEEE sqrt/div and no FMA, so it must agree bit for bit; torch's
    own CPU sqrt is not always correctly rounded, hence the ulp tolerance vs the reference."""
    def f32(x):
        return x.to(torch.float32).to(torch.float64)

    c = c.double()
    p32, m, v = p.double(), m.double(), v.double()
    g_raw = f32(g.double() * inv_grad_scale.double())
    finite = torch.isfinite(g_raw)
    g_raw = torch.where(finite, g_raw, 0.0)
    g_used = f32(g_raw * clip_coef.double())
    m_new = f32(m + f32(c[C.ONE_MINUS_BETA1] * f32(g_used - m)))
    v_new = f32(f32(v * c[C.BETA2]) + f32(f32(c[C.ONE_MINUS_BETA2] * g_used) * g_used))
    denom = f32(f32(f32(v_new.sqrt()) / c[C.BC2_SQRT]) + c[C.EPS])
    p_new = f32(f32(p32 * c[C.DECAY]) - f32(c[C.STEP_SIZE] * f32(m_new / denom)))
    written = finite & (c[C.GATE] != 0)
    return (torch.where(written, p_new, p32).to(torch.float32).to(p.dtype),
            torch.where(written, m_new, m).to(torch.float32),
            torch.where(written, v_new, v).to(torch.float32))


def expected_telemetry(ref_lists, before, coeffs, group_ids, scalars):
    """The reference's telemetry, except param_sq, which is taken from its contract
    definition (sum of p^2 *before* the step): the reference reads fp32 params after its
    in-place copy, because ``p.float()`` aliases ``p`` when p is already fp32."""
    expected = run(fused_adamw_reference, ref_lists, coeffs, group_ids, scalars)
    param_sq = torch.zeros(NUM_GROUPS, dtype=torch.float64, device=expected.device)
    for p, gid in zip(before[0], group_ids):
        param_sq[gid] += (p.double() ** 2).sum()
    expected[:, 2] = param_sq
    return expected


def assert_telemetry_close(actual, expected):
    assert actual.dtype == torch.float64 and actual.shape == (NUM_GROUPS, C.NUM_REDUCED_FIELDS)
    sums, counts = slice(0, 4), slice(4, 6)
    torch.testing.assert_close(actual[:, sums], expected[:, sums], rtol=1e-5, atol=1e-12)
    assert torch.equal(actual[:, counts], expected[:, counts]), (actual, expected)


@pytest.fixture
def small_block(monkeypatch):
    """Tiles of 1024 elements so tensors span several full tiles and a partial one, and a
    reduce that sums 4 tile rows per iteration so a group's reduction loops."""
    monkeypatch.setattr(triton_adamw, "_INTERPRET_BLOCK", 1024)
    monkeypatch.setattr(triton_adamw, "_GPU_BLOCK", 1024)
    monkeypatch.setattr(triton_adamw, "_REDUCE_ROWS", 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(device, dtype, seed, small_block):
    lists, coeffs, group_ids, scalars = make_bucket(dtype, device, seed)
    before = clone_lists(lists)
    ref = clone_lists(lists)
    got = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    expected = expected_telemetry(ref, before, coeffs, group_ids, scalars)

    # Against the reference: fp32 params within a few ulp (torch's CPU sqrt is not always
    # correctly rounded), bf16/fp16 params within one ulp; m and v involve no sqrt.
    for i in range(len(SIZES)):
        if dtype == torch.float32:
            assert_within_ulp(lists[0][i], ref[0][i], 2, f"param {i}", before=before[0][i])
        else:
            assert_within_ulp(lists[0][i], ref[0][i], 1, f"param {i}")
        assert_within_ulp(lists[2][i], ref[2][i], 1, f"exp_avg {i}")
        assert_within_ulp(lists[3][i], ref[3][i], 1, f"exp_avg_sq {i}")
        assert torch.equal(bits(lists[1][i]), bits(before[1][i])), "grads must not change"
    assert_telemetry_close(got, expected)

    # Against correctly rounded fp32 arithmetic: bit for bit.
    for i in range(len(SIZES)):
        want = ieee_step(*(before[k][i] for k in range(4)), coeffs[i],
                         scalars["inv_grad_scale"], scalars["clip_coef"])
        for k, name in zip((0, 2, 3), ("param", "exp_avg", "exp_avg_sq")):
            same = (bits(lists[k][i]) == bits(want[(0, 2, 3).index(k)]))
            assert bool(same.all()), f"{name} {i}: {int((~same).sum())} elements differ"

    # The inputs did exercise every path.
    assert expected[:, 4].sum() > 0 and expected[:, 5].sum() > 0  # outliers and non-finite
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # a group with no tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unwritten_elements_are_bit_identical(device, dtype, small_block):
    lists, coeffs, group_ids, scalars = make_bucket(dtype, device, seed=2)
    before = clone_lists(lists)
    got = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    for i, gid in enumerate(group_ids):
        finite = torch.isfinite(before[1][i].float())
        # Gated group: nothing moves. Elsewhere: exactly the non-finite-grad elements stay.
        frozen = torch.ones_like(finite) if gid == GATED_GROUP else ~finite
        for k in (0, 2, 3):
            new, old = bits(lists[k][i]), bits(before[k][i])
            assert torch.equal(new[frozen], old[frozen]), (i, k)
            if gid != GATED_GROUP and k == 2:  # and the written ones did move
                assert bool((new[~frozen] != old[~frozen]).all()), (i, k)
    assert got[GATED_GROUP, 1] == 0 and got[GATED_GROUP, 3] == 0  # no update when gated
    assert got[GATED_GROUP, 0] > 0  # but its gradient is still measured


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, small_block):
    lists, coeffs, group_ids, scalars = make_bucket(torch.float32, device, seed=3)
    second = clone_lists(lists)
    a = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    b = run(fused_adamw_triton, second, coeffs, group_ids, scalars)
    assert torch.equal(a, b)
    for xs, ys in zip(lists, second):
        for x, y in zip(xs, ys):
            assert torch.equal(bits(x), bits(y))


class _LaunchCounter:
    """Stands in for a @triton.jit kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
def test_one_update_launch_per_call(device, small_block, monkeypatch):
    lists, coeffs, group_ids, scalars = make_bucket(torch.bfloat16, device, seed=4)
    update = _LaunchCounter(triton_adamw._adamw_tiles_kernel)
    reduce = _LaunchCounter(triton_adamw._reduce_kernel)
    monkeypatch.setattr(triton_adamw, "_adamw_tiles_kernel", update)
    monkeypatch.setattr(triton_adamw, "_reduce_kernel", reduce)
    run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    # Seven tensors in three groups, one launch over all their tiles, one reduce launch.
    tiles = sum(-(-n // 1024) for n in SIZES)
    assert update.grids == [(tiles,)]
    assert reduce.grids == [(NUM_GROUPS,)]


@pytest.mark.parametrize("device", DEVICES)
def test_tables_cached_and_rebuilt_when_storage_moves(device):
    lists, coeffs, group_ids, scalars = make_bucket(torch.float32, device, seed=5)
    triton_adamw.clear_caches()
    stats = triton_adamw.cache_stats
    run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    builds = dict(stats)
    run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    assert stats == builds  # same storage: nothing rebuilt

    # Replace one state tensor, as load_state_dict does: same shape, new storage.
    old_m = lists[2][2]
    lists[2][2] = old_m.clone()
    old_m_bits = bits(old_m).clone()
    before, ref = clone_lists(lists), clone_lists(lists)
    got = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    assert stats["pointer_builds"] == builds["pointer_builds"] + 1
    assert stats["layout_builds"] == builds["layout_builds"]  # sizes and groups unchanged
    assert torch.equal(bits(old_m), old_m_bits)  # the stale storage is no longer written
    expected = expected_telemetry(ref, before, coeffs, group_ids, scalars)
    for k in (0, 2, 3):
        for x, y, x_before in zip(lists[k], ref[k], before[k]):
            assert_within_ulp(x, y, 2, f"list {k}", before=x_before)
    assert_telemetry_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    lists, coeffs, group_ids, scalars = make_bucket(torch.float32, device, seed=6,
                                                    sizes=(48 * 40, 5))
    # A transposed (non-contiguous) grad is read through a contiguous copy.
    for k in (0, 2, 3):  # the reference wants p, m, v of one shape
        lists[k][0] = lists[k][0].reshape(48, 40)
    grad_t = torch.empty(40, 48, dtype=torch.float32, device=device).t()
    lists[1][0] = grad_t.copy_(lists[1][0].reshape(48, 40))
    assert not lists[1][0].is_contiguous()
    before, ref = clone_lists(lists), clone_lists(lists)
    got = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    expected = expected_telemetry(ref, before, coeffs, group_ids, scalars)
    for k in (0, 2, 3):
        for x, y, x_before in zip(lists[k], ref[k], before[k]):
            assert_within_ulp(x, y, 2, f"list {k}", before=x_before)
    assert_telemetry_close(got, expected)

    # A non-contiguous param or state is refused with a message naming the problem, even
    # when it is a view of storage whose pointer table is already cached.
    lists, coeffs, group_ids, scalars = make_bucket(torch.float32, device, seed=6,
                                                    sizes=(16 * 16, 5))
    for k in range(4):
        lists[k][0] = lists[k][0].reshape(16, 16)
    run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    for k, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
        bad = [list(ts) for ts in lists]
        bad[k][0] = bad[k][0].t()
        with pytest.raises(ValueError, match=f"tensor 0: {name} is not contiguous"):
            run(fused_adamw_triton, bad, coeffs, group_ids, scalars)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_buckets(device):
    lists, coeffs, group_ids, scalars = make_bucket(torch.float16, device, seed=7, sizes=(0, 0))
    got = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    assert torch.equal(got, torch.zeros(NUM_GROUPS, C.NUM_REDUCED_FIELDS, dtype=torch.float64,
                                        device=device))
    empty = torch.empty(0, C.NUM_COEFFS, device=device)
    got = fused_adamw_triton([], [], [], [], empty, [], 2, scalars["inv_grad_scale"],
                             scalars["clip_coef"])
    assert got.shape == (2, C.NUM_REDUCED_FIELDS) and not got.any()


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, _round_to(x, P_DTYPE), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_round_to_matches_torch_cast(device, dtype):
    """The kernel's fp32 -> bf16/fp16 rounding equals torch's, on every kind of value:
    random bit patterns (NaN, inf, subnormals, huge), exact ties and carries."""
    gen = torch.Generator().manual_seed(8)
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


@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_graph_capture_and_no_sync(device, small_block):
    """Once the tables are cached, the step neither syncs with the host nor resists capture."""
    lists, coeffs, group_ids, scalars = make_bucket(torch.bfloat16, device, seed=9)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(fused_adamw_triton, lists, coeffs, group_ids, scalars)  # builds the tables
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(fused_adamw_triton, lists, coeffs, group_ids, scalars)
    # New inputs in the captured storage, then replay and compare with the reference.
    fresh, _, _, _ = make_bucket(torch.bfloat16, device, seed=10)
    for k in range(4):
        for dst, src in zip(lists[k], fresh[k]):
            dst.copy_(src)
    before, ref = clone_lists(lists), clone_lists(lists)
    graph.replay()
    torch.cuda.synchronize()
    expected = expected_telemetry(ref, before, coeffs, group_ids, scalars)
    for k in (0, 2, 3):
        for x, y in zip(lists[k], ref[k]):
            assert_within_ulp(x, y, 1, f"list {k}")
    assert_telemetry_close(static_out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_buckets(device):
    lists, coeffs, group_ids, scalars = make_bucket(torch.bfloat16, device, seed=11,
                                                    sizes=(10, 7))
    before = clone_lists(lists)
    with pytest.raises(ValueError, match="group ids"):
        run(fused_adamw_triton, lists, coeffs, [0, NUM_GROUPS], scalars)
    bad = clone_lists(lists)
    bad[1][1] = bad[1][1].float()
    with pytest.raises(ValueError, match="param/grad dtypes"):
        run(fused_adamw_triton, bad, coeffs, group_ids, scalars)
    bad = clone_lists(lists)
    bad[3][0] = bad[3][0].half()
    with pytest.raises(ValueError, match="must be float32"):
        run(fused_adamw_triton, bad, coeffs, group_ids, scalars)
    with pytest.raises(ValueError, match="coeffs must be float32"):
        run(fused_adamw_triton, lists, coeffs[:1], group_ids, scalars)
    assert all(torch.equal(bits(a), bits(b))  # nothing was touched on the way out
               for xs, ys in zip(lists, before) for a, b in zip(xs, ys))
