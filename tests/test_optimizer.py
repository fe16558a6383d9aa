"""FusedGuardedAdamW (kernel contract v2) against torch.optim.AdamW, and its API contract.

Every comparison runs on fresh random inputs and checks every element of every output:

- fp32 params: within about 1e-6 of ``torch.optim.AdamW`` relative to the tensor's scale
  (the fused step rounds its coefficients to fp32 once, as the contract says, where torch
  keeps Python doubles; the order of a few fp32 operations differs);
- bf16/fp16 params: fp32 AdamW whose params are rounded to the dtype after every step, to one
  unit in the last place of the dtype (a rounding-boundary flip);
- fp64 params: torch's fp64 AdamW to 1e-12 (the fallbacks keep fp64 coefficients);
- telemetry: the contract's definitions computed directly in fp64, sums to a relative 1e-5
  and dot products to 1e-5 of their Cauchy-Schwarz bound (the compiled backends accumulate
  in fp32 lanes), counts exactly;
- copies, pickles and state dicts: bit for bit.

Backends: "torch" (the reference) and "foreach" always; "cpu" (the C++ extension) and
"triton" (on the CPU through TRITON_INTERPRET=1, set by conftest) when they load here, else
skipped with the reason. The interpreter is slow, so Triton runs fewer steps (``steps``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import pickle
import warnings

import pytest
import torch

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig
from lbw_kernels import contract as C

# The Triton interpreter runs the kernels in numpy, which warns on inf * 0 (a spike bound on a
# tensor's first step) and on NaN arithmetic; both are intended.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

BACKENDS = ("torch", "foreach", "cpu", "triton")
SIZES = (1, 3, 4097)
# Interpreted Triton costs ~0.15 s a step on two cores: cap the length of its runs.
TRITON_MAX_STEPS = 10


# --------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _unavailable(name: str) -> str | None:
    """Why ``backend=name`` cannot run fp32 CPU parameters here (None: it can)."""
    p = torch.zeros(4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            actual = FusedGuardedAdamW([p], guard=None, backend=name).backend_name
        except Exception as exc:  # noqa: BLE001 - any failure to load means "not here"
            return f"backend={name!r} raised {type(exc).__name__}: {exc}"
    if actual != name:
        return f"backend={name!r} is unavailable here: " + "; ".join(str(w.message) for w in caught)
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def steps(backend: str, n: int, triton: int = TRITON_MAX_STEPS) -> int:
    return min(n, triton) if backend == "triton" else n


def close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Every element within ``rtol`` of the expected value, relative to the element plus the
    tensor's scale (a relative error at an element that crossed zero means nothing)."""
    assert actual.shape == expected.shape
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().clamp_min(1e-30)
    err = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    assert bool((err <= bound).all()), f"max abs err {err.max().item():.3e} (scale {scale.item():.3e})"


def make_params(seed: int, dtype=torch.float32, shapes=SIZES + ((33, 17),)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s if isinstance(s, tuple) else (s,), generator=gen).to(dtype).requires_grad_()
            for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def groups_of(params, lr=1e-3):
    """Three groups with their own lr, betas, eps and weight decay."""
    return [
        {"params": params[:1]},
        {"params": params[1:2], "lr": 3 * lr, "betas": (0.8, 0.99), "weight_decay": 0.0},
        {"params": params[2:], "eps": 1e-6, "weight_decay": 0.1, "betas": (0.85, 0.995)},
    ]


def random_grads(params, gen, scale=1.0):
    return [scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def set_grads(params_a, params_b, grads):
    for p, q, g in zip(params_a, params_b, grads):
        p.grad = g.clone()
        q.grad = g.clone().to(q.dtype)


def assert_same_run(params_a, opt_a, params_b, opt_b):
    """Bit-identical params and optimizer state."""
    for p, q in zip(params_a, params_b):
        assert torch.equal(p.detach(), q.detach())
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- equal to AdamW
def test_fp32_equals_torch_adamw_over_200_steps_with_scheduler(backend):
    """Three groups with their own lr/betas/eps/wd, a OneCycle schedule, 200 steps."""
    n = steps(backend, 200)
    ours = make_params(1)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(groups_of(ours), lr=2e-3, guard=None, backend=backend)
    ref = torch.optim.AdamW(groups_of(theirs), lr=2e-3)
    max_lr = [2e-3, 6e-3, 2e-3]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=n)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=max_lr, total_steps=n)
    gen = torch.Generator().manual_seed(2)
    for _ in range(n):
        set_grads(ours, theirs, random_grads(ours, gen))
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for g_ours, g_ref in zip(opt.param_groups, ref.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert g_ours[key] == g_ref[key], key
    for p, q in zip(ours, theirs):
        close_to_reference(p, q, rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6)
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == n
    assert opt.num_steps == n


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.3, 0.5), (0.5, 0.9), (0.9, 0.0)])
def test_small_beta1_updates_the_first_moment_from_the_nearer_end_as_torch_lerp(backend, betas):
    """torch's lerp_ computes m + w (g - m) for a weight w = 1 - beta1 below 0.5, else
    g - (1 - w)(g - m): with beta1 = 0, m is g exactly. A large gradient, then tiny ones: the
    other form loses the tiny gradient to cancellation (the update was 24% off with beta2 = 0)."""
    ours = make_params(5)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(ours, lr=1e-3, betas=betas, weight_decay=0.0, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-3, betas=betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(6)
    for scale in (1.0, 20.0, 3e-6, 3e-6):
        set_grads(ours, theirs, random_grads(ours, gen, scale))
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        close_to_reference(p, q, rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_fp32_adamw_rounded_each_step(dtype, backend):
    """bf16/fp16 params with fp32 moments equal fp32 AdamW whose params are rounded to the
    dtype after every step, to within one unit in the last place of the dtype."""
    ours = make_params(3, dtype)
    theirs = clone_params(ours, torch.float32)
    opt = FusedGuardedAdamW(ours, lr=1e-2, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps(backend, 40)):
        set_grads(ours, theirs, random_grads(ours, gen))
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in theirs:
                q.copy_(q.to(dtype).float())
    eps = torch.finfo(dtype).eps
    for p, q in zip(ours, theirs):
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
        err = (p.detach().float() - q.detach()).abs()
        assert bool((err <= eps * q.detach().abs() + 1e-6).all()), err.max()
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5)
        close_to_reference(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5)


def tiny_qwen2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg)


def test_small_transformer_equals_adamw(backend):
    model = tiny_qwen2()
    twin = copy.deepcopy(model)

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.ndim >= 2]},
                {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}]

    opt = FusedGuardedAdamW(groups(model), lr=3e-3, guard=None, backend=backend)
    ref = torch.optim.AdamW(groups(twin), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3 if backend == "triton" else 10):
        # Real transformer gradients handed to both optimizers (a one-ulp difference would
        # otherwise feed back through the forward pass and compound).
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        close_to_reference(p, q, rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6)


def test_fused_clipping_equals_clip_grad_norm_then_adamw(backend):
    ours = make_params(6)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(groups_of(ours), guard=None, backend=backend, max_grad_norm=0.5)
    ref = torch.optim.AdamW(groups_of(theirs))
    gen = torch.Generator().manual_seed(7)
    for i in range(steps(backend, 30)):
        # alternately above and below the clip norm (the coefficient is then 1)
        grads = random_grads(ours, gen, scale=3.0 if i % 2 == 0 else 1e-3)
        set_grads(ours, theirs, grads)
        opt.step()
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
        # the telemetry keeps the unclipped norm
        assert float(opt.telemetry.grad_norm()) == pytest.approx(float(expected_norm), rel=1e-5)
        assert float(opt.telemetry.record[C.record_layout(3).globals][C.R_GRAD_NORM]) == \
            pytest.approx(float(expected_norm), rel=1e-5)
    for p, q in zip(ours, theirs):
        close_to_reference(p, q, rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-6)


def test_real_grad_scaler_unscales_in_the_step_and_skips_inf_steps_on_device(backend, request):
    """torch.amp.GradScaler hands the optimizer its scale and found_inf tensors
    (_step_supports_amp_scaling): results equal unscaled AdamW, an inf step is skipped on
    the device (nothing written, no step counter advanced)."""
    ours = make_params(19)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(ours, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(20)
    n = steps(backend, 8)
    skip_at = (3, 6)
    for i in range(n):
        grads = random_grads(ours, gen)
        loss = sum((p * g).sum() for p, g in zip(ours, grads))
        if i in skip_at:
            loss = loss * float("inf")  # every grad inf: the scaler's found_inf skips the step
        scaler.scale(loss).backward()
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ours]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i in skip_at:
            assert bool(opt.step_was_skipped)
            for p, (pb, sb) in zip(ours, before):
                assert torch.equal(p.detach(), pb)
                for k, v in sb.items():
                    assert torch.equal(opt.state[p][k], v)
            continue
        assert not bool(opt.step_was_skipped)
        # the telemetry's grad norm is unscaled
        expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        assert float(opt.telemetry.grad_norm()) == pytest.approx(expected, rel=1e-5)
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        ref.step()
    done = n - sum(1 for i in skip_at if i < n)
    for p, q in zip(ours, theirs):
        close_to_reference(p, q, rtol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == done


def test_params_without_grad_are_skipped_with_their_step_unchanged(backend):
    a, b, c = make_params(15, shapes=((5,), (6,), (3, 4)))
    opt = FusedGuardedAdamW([a, b, c], guard=None, backend=backend)
    a_ref, b_ref, c_ref = clone_params([a, b, c])
    ref = torch.optim.AdamW([a_ref, b_ref, c_ref])
    gen = torch.Generator().manual_seed(16)
    # step 1: all three; steps 2-3: only a (b and c keep their values, moments and step)
    for i in range(3):
        with_grad = [a, b, c] if i == 0 else [a]
        for p in (a, b, c):
            p.grad = None
        for p, q in zip((a, b, c), (a_ref, b_ref, c_ref)):
            q.grad = None
        set_grads(with_grad, [a_ref, b_ref, c_ref][: len(with_grad)], random_grads(with_grad, gen))
        kept = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (b, c)}
        opt.step()
        ref.step()
        if i > 0:
            for p in (b, c):
                assert torch.equal(p.detach(), kept[id(p)][0])
                for k, v in kept[id(p)][1].items():
                    assert torch.equal(opt.state[p][k], v)
            assert opt.telemetry.to_dict()["numel"] == [5.0]
    assert float(opt.state[a]["step"]) == 3 and float(opt.state[b]["step"]) == float(opt.state[c]["step"]) == 1
    for p, q in zip((a, b, c), (a_ref, b_ref, c_ref)):
        close_to_reference(p, q, rtol=1e-6)
    fresh = torch.zeros(2, requires_grad=True)
    opt.add_param_group({"params": [fresh]})
    a.grad = torch.ones(5)
    opt.step()
    assert len(opt.state[fresh]) == 0  # never stepped: no state at all, as in torch


def test_channels_last_params_equal_adamw_and_keep_their_layout(backend):
    gen = torch.Generator().manual_seed(30)
    w = torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    v = torch.randn(2, 3, 5, 4, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    ours = [w, v]
    theirs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for x in ours]
    opt = FusedGuardedAdamW(ours, lr=1e-2, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for i in range(steps(backend, 20)):
        grads = [torch.randn(x.shape, generator=gen) for x in ours]
        # a channels_last grad, and a contiguous one for a channels_last param
        for p, q, g in zip(ours, theirs, grads):
            g = g.contiguous(memory_format=torch.channels_last) if i % 2 == 0 else g.contiguous()
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert p.is_contiguous(memory_format=torch.channels_last)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].stride() == p.stride()
            close_to_reference(opt.state[p][key], ref.state[q][key], rtol=1e-6)
        close_to_reference(p, q, rtol=1e-6)


def _consistent_grads(params, gen, base):
    """Gradients with a steady direction (a per-element base plus 10% noise): no spike, no
    overshoot, no oscillation, so the default guard never intervenes."""
    return [base[i] + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for i, p in enumerate(params)]


FP64_CASES = [
    pytest.param(None, None, id="plain"),
    pytest.param(None, "default", id="default-guard"),
    pytest.param(0.5, None, id="max_grad_norm"),
    pytest.param(0.5, "default", id="max_grad_norm-default-guard"),
]


@pytest.mark.parametrize("max_grad_norm, guard", FP64_CASES)
@pytest.mark.parametrize("fp64_backend", ["torch", "foreach"])
def test_float64_params_equal_torch_adamw_in_fp64(fp64_backend, max_grad_norm, guard):
    gen = torch.Generator().manual_seed(40)
    ours = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in ((3,), (50,), (8, 6))]
    theirs = clone_params(ours)
    base = [torch.randn(p.shape, generator=gen, dtype=torch.float64).sign()
            * (0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64)) for p in ours]
    opt = FusedGuardedAdamW(ours, guard=guard, backend=fp64_backend, max_grad_norm=max_grad_norm)
    ref = torch.optim.AdamW(theirs)
    for _ in range(40):
        set_grads(ours, theirs, _consistent_grads(ours, gen, base))
        opt.step(loss=1.0)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm)
        ref.step()
    if guard is not None:
        assert opt.guard.summary()["interventions"] == 0 and opt.guard.scale == [1.0]
    for p, q in zip(ours, theirs):
        assert p.dtype == opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float64
        close_to_reference(p, q, rtol=1e-12)
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-12)
        close_to_reference(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-12)


def test_nonfinite_grads_propagate_like_adamw_without_guard_and_are_masked_with_it(backend, request):
    """guard=None is AdamW: a NaN/inf gradient element turns its param and moments NaN
    exactly as torch does. With the guard on, such elements are never written (their param
    and moments keep their bits) while every finite element steps normally."""
    ours = make_params(50, shapes=((64,), (8, 8)))
    theirs = clone_params(ours)
    guarded = clone_params(ours)
    opt = FusedGuardedAdamW(ours, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs)
    opt_g = FusedGuardedAdamW(guarded, guard="default", backend=backend)
    gen = torch.Generator().manual_seed(51)
    for i in range(3):
        grads = random_grads(ours, gen)
        if i == 1:
            grads[0][5], grads[0][6], grads[0][7] = float("nan"), float("inf"), -float("inf")
            grads[1][2, 3] = float("nan")
        set_grads(ours, theirs, grads)
        for p, g in zip(guarded, grads):
            p.grad = g.clone()
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt_g.state[p].items()}) for p in guarded]
        opt.step()
        ref.step()
        opt_g.step(loss=1.0)
        if i == 1:
            assert opt.telemetry.to_dict()["nonfinite"] == [4.0]
            assert opt_g.telemetry.to_dict()["nonfinite"] == [4.0]
            bad = [~torch.isfinite(g) for g in grads]
            for p, (pb, sb), m in zip(guarded, before, bad):
                assert torch.equal(p.detach()[m], pb[m])
                assert torch.equal(opt_g.state[p]["exp_avg"][m], sb["exp_avg"][m])
                assert torch.equal(opt_g.state[p]["exp_avg_sq"][m], sb["exp_avg_sq"][m])
                assert not torch.equal(p.detach()[~m], pb[~m])  # finite elements stepped
    for p, q in zip(ours, theirs):
        for a, e in ((p, q), (opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]),
                     (opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])):
            bad = ~torch.isfinite(e)
            assert torch.equal(torch.isnan(a), torch.isnan(e))  # NaN where torch has NaN
            assert torch.equal(a.detach()[bad & ~torch.isnan(e)], e.detach()[bad & ~torch.isnan(e)])  # same infs
            close_to_reference(a.detach()[~bad], e.detach()[~bad], rtol=1e-6)
    assert bool(ours[0].isnan()[5:8].all()) and bool(ours[1].isnan()[2, 3])
    assert all(bool(torch.isfinite(p).all()) for p in guarded)


# --------------------------------------------------------------------------- telemetry
def _direct_tensor_sums(g, p_old, p_new, m_old, v_old, s, beta1, beta2, eps):
    """The contract's TENSOR_FIELDS of one tensor, computed directly in fp64 (guard off)."""
    g, p_old, p_new, m_old, v_old = (t.double() for t in (g, p_old, p_new, m_old, v_old))
    finite = torch.isfinite(g)
    g_t = torch.where(finite, g, torch.zeros_like(g))
    u = torch.where(finite, p_new - p_old, torch.zeros_like(g))
    if s == 0:
        d_prev = m_old / (v_old.sqrt() + eps)
    else:
        d_prev = (m_old / (1 - beta1 ** s)) / (v_old.sqrt() / math.sqrt(1 - beta2 ** s) + eps)
    d_t = torch.where(finite, d_prev, torch.zeros_like(g))
    out = torch.zeros(C.NUM_TENSOR_FIELDS, dtype=torch.float64)
    out[C.T_GRAD_SQ] = g_t.square().sum()
    out[C.T_UPDATE_SQ] = u.square().sum()
    out[C.T_PARAM_SQ] = p_old.square().sum()
    out[C.T_GRAD_DOT_UPDATE] = (g_t * u).sum()
    out[C.T_GRAD_DOT_PREV] = (g_t * d_t).sum()
    out[C.T_PREV_SQ] = d_prev.square().sum()
    out[C.T_MOMENT1_SQ] = m_old.square().sum()
    out[C.T_MOMENT2_SUM] = v_old.sum()
    out[C.T_SPIKES] = 0.0  # no bound without a guard
    out[C.T_NONFINITE] = (~finite).sum()
    out[C.T_NUMEL] = g.numel()
    return out


def _check_sums(actual, expected, partners):
    """Sums of squares and sums: relative 1e-5; dot products: 1e-5 of the Cauchy-Schwarz
    bound; counts exactly."""
    for i, name in enumerate(C.TENSOR_FIELDS):
        a, e = float(actual[i]), float(expected[i])
        if i in partners:
            x, y = partners[i]
            bound = 1e-5 * math.sqrt(float(expected[x]) * float(expected[y])) + 1e-30
            assert abs(a - e) <= bound, (name, a, e)
        elif name in ("spikes", "nonfinite", "numel"):
            assert a == e, (name, a, e)
        else:
            assert a == pytest.approx(e, rel=1e-5, abs=1e-30), name


@pytest.mark.parametrize("zero_init", [False, True], ids=["matrices", "zero-init-matrix"])
def test_telemetry_matches_a_direct_computation_of_the_contract(backend, zero_init, request):
    gen = torch.Generator().manual_seed(10)
    shapes = ((7,), (33, 17), (5, 6), (300,))
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    if zero_init:
        with torch.no_grad():
            params[2].zero_()  # a zero-initialised matrix (LoRA's B): omega and cos, no ratio
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}]
    opt = FusedGuardedAdamW(groups, guard=None, backend=backend)
    kinds = [C.KIND_OTHER, C.KIND_MATRIX, C.KIND_ZERO_INIT if zero_init else C.KIND_MATRIX, C.KIND_OTHER]
    gid_of = [0, 0, 1, 1]
    layout = C.record_layout(2)
    for s in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if s == 3:  # the last step (guard off: it then turns the element NaN)
            grads[3][0] = float("nan")  # counted, excluded from the sums
        for p, g in zip(params, grads):
            p.grad = g
        p_old = [p.detach().clone() for p in params]
        m_old = [opt.state[p]["exp_avg"].clone() if opt.state[p] else torch.zeros_like(p) for p in params]
        v_old = [opt.state[p]["exp_avg_sq"].clone() if opt.state[p] else torch.zeros_like(p) for p in params]
        opt.step(loss=torch.tensor(2.5))
        tel = opt.telemetry
        assert len(tel.per_tensor) == 1  # one bucket: fp32 on the CPU
        per_tensor = tel.per_tensor[0]
        assert per_tensor.shape == (4, C.NUM_TENSOR_FIELDS) and per_tensor.dtype == torch.float64
        expected_group = torch.zeros(2, C.NUM_GROUP_FIELDS, dtype=torch.float64)
        partners = {C.T_GRAD_DOT_UPDATE: (C.T_GRAD_SQ, C.T_UPDATE_SQ), C.T_GRAD_DOT_PREV: (C.T_GRAD_SQ, C.T_PREV_SQ)}
        for t, p in enumerate(params):
            group = opt.param_groups[gid_of[t]]
            b1, b2 = group["betas"]
            e = _direct_tensor_sums(grads[t], p_old[t], p.detach(), m_old[t], v_old[t], s, b1, b2, group["eps"])
            _check_sums(per_tensor[t], e, partners)
            row = expected_group[gid_of[t]]
            row[: C.NUM_TENSOR_FIELDS] += e
            if kinds[t] != C.KIND_OTHER:
                row[C.G_MATRIX_NUMEL] += e[C.T_NUMEL]
                if s >= 1 and e[C.T_MOMENT1_SQ] > 0 and e[C.T_MOMENT2_SUM] > 0:
                    bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
                    white = (1 - b1) * (1 + b1 ** s) / ((1 + b1) * (1 - b1 ** s))
                    omega = (e[C.T_MOMENT1_SQ] / bc1 ** 2) / (e[C.T_MOMENT2_SUM] / bc2) / white
                    row[C.G_OMEGA_LOG_SUM] += float(torch.log(omega).clamp(-C.OMEGA_LOG_CLAMP, C.OMEGA_LOG_CLAMP))
                    row[C.G_OMEGA_COUNT] += 1
                if e[C.T_GRAD_SQ] > 0 and e[C.T_PREV_SQ] > 0:
                    row[C.G_COS_SUM] += e[C.T_GRAD_DOT_PREV] / math.sqrt(e[C.T_GRAD_SQ] * e[C.T_PREV_SQ])
                    row[C.G_COS_COUNT] += 1
                if kinds[t] == C.KIND_MATRIX and e[C.T_PARAM_SQ] > 0:
                    row[C.G_RATIO_SQ_SUM] += e[C.T_UPDATE_SQ] / e[C.T_PARAM_SQ]
                    row[C.G_RATIO_COUNT] += 1
        for g in range(2):
            _check_sums(tel.values[g, : C.NUM_TENSOR_FIELDS], expected_group[g], partners)
            for f in (C.G_OMEGA_COUNT, C.G_COS_COUNT, C.G_RATIO_COUNT, C.G_MATRIX_NUMEL):
                assert float(tel.values[g, f]) == float(expected_group[g, f]), (s, g, C.GROUP_FIELDS[f])
            for f in (C.G_OMEGA_LOG_SUM, C.G_COS_SUM):
                assert float(tel.values[g, f]) == pytest.approx(float(expected_group[g, f]), abs=1e-4)
            assert float(tel.values[g, C.G_RATIO_SQ_SUM]) == pytest.approx(
                float(expected_group[g, C.G_RATIO_SQ_SUM]), rel=1e-4, abs=1e-30)
        assert tel.to_dict()["applied_gate"] == [1.0, 1.0]
        assert opt.telemetry.record[layout.invalid].tolist() == [0.0, 0.0]
        glob = opt.telemetry.record[layout.globals].tolist()
        assert glob[C.R_LOSS] == 2.5 and float(tel.loss) == 2.5
        assert math.isnan(glob[C.R_GRAD_NORM])  # no pre-pass without clipping
        assert glob[C.R_STEP_OK] == 1.0
        total = expected_group[:, : C.NUM_TENSOR_FIELDS].sum(0)
        assert float(tel.grad_norm()) == pytest.approx(math.sqrt(total[C.T_GRAD_SQ]), rel=1e-5)
        assert float(tel.update_param_ratio()) == pytest.approx(
            math.sqrt(total[C.T_UPDATE_SQ] / total[C.T_PARAM_SQ]), rel=1e-5)
        assert float(tel.spike_ratio()) == 0.0
        assert list(tel.to_dict())[: C.NUM_GROUP_FIELDS] == list(C.GROUP_FIELDS)


def test_spike_bound_floor_comes_from_the_previous_steps_sums(backend):
    """The optimizer hands each bucket the same tensor_out every step, so the per-element bound
    has its floor (k times the tensor's RMS sqrt(v) of the previous step): elements that had
    almost no gradient and now get a legitimate one (a layer waking up) are not outliers; a
    real spike still is."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    p = torch.randn(64, 64, generator=gen).requires_grad_()
    idx = torch.randperm(p.numel(), generator=gen)
    quiet, loud = idx[:64], idx[64:80]
    # a constant loss against the steps' predicted fall reads as a start that overshoots: no
    # restart from the start (GuardConfig.overshoot_restart), which would drop the floor read here
    opt = FusedGuardedAdamW([p], lr=1e-3, backend=backend,
                            guard=GuardConfig(spike_warmup=2, overshoot_restart=False))
    spikes = []
    for s in range(9):
        g = torch.randn(p.numel(), generator=gen)
        g[quiet] = 1e-6 * g[quiet].sign()  # almost nothing: v_hat ~ 1e-12 there
        if s == 7:
            g[quiet] = 1e-3 * g[quiet].sign()  # 1000 of their own sigmas, far under k * RMS
        if s == 8:
            g[loud] = 1e4 * g[loud].sign()  # a real spike: over the floored bound too
        p.grad = g.reshape(p.shape)
        opt.step(loss=torch.tensor(2.0))
        spikes.append(int(opt.telemetry.per_tensor[0][0, C.T_SPIKES]))
    assert spikes[7] == 0, spikes
    assert spikes[8] == len(loud), spikes


def test_no_spike_bound_before_a_tensors_third_step(backend):
    """After one step v holds a single gradient and there is no floor yet, so the contract
    puts no bound on a tensor before its third step, counted per tensor: a tensor stepped for
    the first time mid-run is not bounded at its second step either."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    params = [torch.randn(256, generator=gen).requires_grad_() for _ in range(3)]
    opt = FusedGuardedAdamW(params, lr=1e-3, backend=backend, guard=GuardConfig(spike_warmup=0))
    hit = torch.randperm(256, generator=gen)[:16]
    spiked_at = {2: (0, 1), 3: (2,)}  # (0-based) step -> the tensors with a spike (1e4, ~1e4 sigma) on 16 elements
    spikes = []
    for step in range(4):
        for i, p in enumerate(params):
            g = torch.randn(256, generator=gen)
            if i in spiked_at.get(step, ()):
                g[hit] = 1e4 * g[hit].sign()
            p.grad = g if i == 0 or step >= 1 else None  # tensors 1 and 2 are stepped from step 1 on
        opt.step(loss=torch.tensor(2.0))
        spikes.append([int(x) for x in opt.telemetry.per_tensor[0][:, C.T_SPIKES]])
    # tensor 0 is bounded at its third step; tensor 1 not at its second; tensor 2 at its third
    assert spikes == [[0], [0, 0, 0], [16, 0, 0], [0, 0, 16]], spikes


@pytest.mark.parametrize("via", ["state_dict", "packed", "deepcopy"])
def test_a_resumed_run_bounds_its_first_step_with_the_saved_spike_floor(backend, via):
    """The bound's floor comes from the previous step's sums, and the state dict carries them
    (top level; packed for torch.distributed.checkpoint; through a deep copy): a run resumed just
    before a layer wakes up lets the waking elements through as the uninterrupted run does.
    Without the saved floor (an AdamW state dict has none) they are clamped."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    bias0, w0 = torch.randn(8, generator=gen), torch.randn(64, 64, generator=gen)
    quiet = torch.randperm(w0.numel(), generator=gen)[:64]

    def grads(step):
        g = torch.Generator().manual_seed(seed + 1 + step)
        gb, gw = torch.randn(8, generator=g), torch.randn(w0.numel(), generator=g)
        gw[quiet] = (1e-3 if step == 6 else 1e-6) * gw[quiet].sign()  # wakes up at step 6
        return gb, gw.reshape(w0.shape)

    def fresh():
        params = [bias0.clone().requires_grad_(), w0.clone().requires_grad_()]
        opt = FusedGuardedAdamW([{"params": params[:1]}, {"params": params[1:], "lr": 2e-3}], lr=1e-3,
                                backend=backend,  # no restart: see the test above
                                guard=GuardConfig(spike_warmup=2, overshoot_restart=False))
        return params, opt

    def run(params, opt, steps):
        spikes = []
        for s in steps:
            for p, g in zip(params, grads(s)):
                p.grad = g
            opt.step(loss=torch.tensor(2.0))
            spikes.append(int(opt.telemetry.per_tensor[0][1, C.T_SPIKES]))  # rows by position: w is 1
        return spikes

    def resumed(saved_params, sd):
        params, opt = fresh()
        with torch.no_grad():
            for p, q in zip(params, saved_params):
                p.copy_(q)
        opt.load_state_dict(sd)
        return params, opt

    params, opt = fresh()
    run(params, opt, range(6))
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    if via == "deepcopy":
        params_b, opt_b = copy.deepcopy((params, opt))
    elif via == "packed":  # only the copy in the first param group, as DCP leaves it
        packed = {k: v for k, v in copy.deepcopy(saved).items() if k not in ("num_steps", "guard", "spike_floor")}
        params_b, opt_b = resumed(saved_params, packed)
    else:
        params_b, opt_b = resumed(saved_params, copy.deepcopy(saved))
    spikes = run(params, opt, range(6, 9))
    assert spikes == [0, 0, 0]
    assert run(params_b, opt_b, range(6, 9)) == spikes
    assert_same_run(params, opt, params_b, opt_b)

    bare = copy.deepcopy(saved)
    del bare["spike_floor"]
    params_c, opt_c = resumed(saved_params, bare)
    assert run(params_c, opt_c, range(6, 9))[0] == len(quiet)
    assert not torch.equal(params_c[1], params[1])


# --------------------------------------------------------------------------- API
def test_named_parameters_work_and_record_param_names_like_torch(backend):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin = copy.deepcopy(model)
    opt = FusedGuardedAdamW(model.named_parameters(), guard=None, backend=backend)
    ref = torch.optim.AdamW(twin.named_parameters())
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == \
        [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(60)
    for _ in range(3):
        set_grads(list(model.parameters()), list(twin.parameters()), random_grads(list(model.parameters()), gen))
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        close_to_reference(p, q, rtol=1e-6)
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert sd["param_groups"][0]["param_names"] == ref_sd["param_groups"][0]["param_names"]
    # named groups mixed with add_param_group of named params
    extra = torch.nn.Linear(2, 2)
    opt.add_param_group({"params": list(extra.named_parameters()), "lr": 0.1})
    assert opt.param_groups[1]["param_names"] == ["weight", "bias"]


def _train(model, opt, gen, n, with_loss=True):
    for _ in range(n):
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss=loss.detach() if with_loss else None)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _guard_state_equal(a, b):
    """Two guard state dicts equal (NaN-aware, through their pickled form; the start's tensors,
    whose pickles name their storage, element by element)."""
    a, b = dict(a), dict(b)
    start_a, start_b = a.pop("start", None), b.pop("start", None)
    assert (start_a is None) == (start_b is None)
    if start_a is not None:
        assert start_a["params_only"] == start_b["params_only"]
        assert len(start_a["buffers"]) == len(start_b["buffers"])
        assert all(torch.equal(x, y) for x, y in zip(start_a["buffers"], start_b["buffers"]))
    assert pickle.dumps(a) == pickle.dumps(b)


@pytest.mark.parametrize("guard", [None, "default"])
def test_deepcopy_and_pickle_step_exactly_like_the_original(backend, guard):
    cfg = None if guard is None else GuardConfig(snapshot_interval=5)  # snapshots on a fixed schedule
    model = _mlp()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, guard=cfg, backend=backend, max_grad_norm=5.0)
    gen = torch.Generator().manual_seed(70)
    _train(model, opt, gen, steps(backend, 8, triton=3))
    opt.record_loss(torch.tensor(0.5))  # a pending loss travels too
    model_c, opt_c = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model_p, opt_p = loaded["model"], loaded["opt"]
    for other, other_model in ((opt_c, model_c), (opt_p, model_p)):
        assert other.max_grad_norm == 5.0 and other.requested_backend == backend
        assert other.num_steps == opt.num_steps
        assert other.latest_loss is not None and float(other.latest_loss) == 0.5
        assert [p for p in other.param_groups[0]["params"]] == list(other_model.parameters()) or all(
            a is b for a, b in zip(other.param_groups[0]["params"], other_model.parameters()))
        assert (other.guard is None) == (guard is None)
        if guard is not None:
            assert other.guard is not opt.guard and other.guard.optimizer is other
            _guard_state_equal(other.guard.state_dict(), opt.guard.state_dict())
    seeds = [torch.Generator().manual_seed(71) for _ in range(3)]
    n = steps(backend, 12, triton=3)
    for m, o, g in zip((model, model_c, model_p), (opt, opt_c, opt_p), seeds):
        _train(m, o, g, n)
    for m, o in ((model_c, opt_c), (model_p, opt_p)):
        assert_same_run(list(model.parameters()), opt, list(m.parameters()), o)
        assert o.num_steps == opt.num_steps
        if guard is not None:
            _guard_state_equal(o.guard.state_dict(), opt.guard.state_dict())


@pytest.mark.parametrize("guard", [None, "default"])
def test_state_dict_round_trip_is_exact_and_resumes_bit_identically(backend, guard):
    cfg = None if guard is None else GuardConfig(snapshot_interval=5)
    model = _mlp()
    opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, guard=cfg, backend=backend)
    _train(model, opt, torch.Generator().manual_seed(80), steps(backend, 7, triton=3))
    saved = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    assert saved["num_steps"] == opt.num_steps and ("guard" in saved) == (guard is not None)
    n = steps(backend, 12, triton=3)
    _train(model, opt, torch.Generator().manual_seed(81), n)

    model_b = _mlp(seed=1)
    model_b.load_state_dict(saved_model)
    opt_b = FusedGuardedAdamW(model_b.parameters(), lr=1e-2, guard=cfg, backend=backend)
    opt_b.load_state_dict(saved)
    reloaded = opt_b.state_dict()
    assert reloaded["num_steps"] == saved["num_steps"]
    for pid, st in saved["state"].items():
        assert reloaded["state"][pid].keys() == st.keys()
        for key in st:
            assert torch.equal(reloaded["state"][pid][key], st[key]), key
    if guard is not None:
        _guard_state_equal(reloaded["guard"], saved["guard"])
    _train(model_b, opt_b, torch.Generator().manual_seed(81), n)
    assert_same_run(list(model.parameters()), opt, list(model_b.parameters()), opt_b)
    assert opt_b.num_steps == opt.num_steps
    if guard is not None:
        a, b = opt.guard.state_dict(), opt_b.guard.state_dict()
        _guard_state_equal(a["controller"], b["controller"])


def test_torch_adamw_state_dict_loads_and_goes_back(backend):
    a = make_params(13)
    b = clone_params(a)
    ref = torch.optim.AdamW(groups_of(a))
    gen = torch.Generator().manual_seed(14)
    for _ in range(4):
        for p in a:
            p.grad = torch.randn(p.shape, generator=gen)
        ref.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt = FusedGuardedAdamW(groups_of(b), guard=None, backend=backend)
    opt.load_state_dict(ref.state_dict())
    assert opt.num_steps == 4
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[q][key], ref.state[p][key])
        assert opt.state[q]["step"].dtype == torch.float32 and float(opt.state[q]["step"]) == 4
    for _ in range(steps(backend, 4, triton=2)):
        set_grads(a, b, random_grads(a, gen))
        ref.step()
        opt.step()
    for p, q in zip(a, b):
        close_to_reference(q, p, rtol=1e-6)
    back = torch.optim.AdamW(groups_of(clone_params(b)))
    back.load_state_dict(opt.state_dict())
    for q_group, r_group in zip(opt.param_groups, back.param_groups):
        for pq, pr in zip(q_group["params"], r_group["params"]):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(back.state[pr][key], opt.state[pq][key])


def test_add_param_group_and_closure(backend):
    a, b = make_params(17, shapes=((3,), (4, 5)))
    a_ref, b_ref = clone_params([a, b])
    opt = FusedGuardedAdamW([a], guard=None, backend=backend)
    ref = torch.optim.AdamW([a_ref])
    opt.add_param_group({"params": [b], "lr": 0.05, "betas": [0.8, 0.9]})
    ref.add_param_group({"params": [b_ref], "lr": 0.05, "betas": [0.8, 0.9]})
    assert opt.param_groups[1]["betas"] == (0.8, 0.9)
    assert opt.param_groups[1]["weight_decay"] == opt.defaults["weight_decay"]
    with pytest.raises(ValueError, match=r"param group 2 betas\[1\]"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0.9, 2.0)})
    assert len(opt.param_groups) == 2

    def closure_for(o, x, y):
        def closure():
            o.zero_grad()
            loss = x.square().sum() + (y - 1).square().sum()
            loss.backward()
            return loss
        return closure

    first = None
    for _ in range(steps(backend, 20)):
        loss = opt.step(closure_for(opt, a, b)).detach()
        ref_loss = ref.step(closure_for(ref, a_ref, b_ref)).detach()
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
        first = float(loss) if first is None else first
        assert float(opt.telemetry.loss) == float(loss)  # the closure's loss is the telemetry's
    assert float(loss) < first
    assert opt.telemetry.values.shape == (2, C.NUM_GROUP_FIELDS)
    close_to_reference(a, a_ref, rtol=1e-6)
    close_to_reference(b, b_ref, rtol=1e-6)


def test_every_torch_adamw_keyword_is_accepted_at_its_default_and_kept():
    """Built with every torch.optim.AdamW argument at torch's default (read from torch's
    signature, so this follows torch); every param group keeps them as AdamW's do."""
    sig = inspect.signature(torch.optim.AdamW.__init__)
    kwargs = {name: prm.default for name, prm in sig.parameters.items()
              if name not in ("self", "params") and prm.default is not inspect.Parameter.empty}
    assert {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
            "differentiable", "fused"} <= set(kwargs)
    p = torch.zeros(3, requires_grad=True)
    ref = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], **kwargs)
    opt = FusedGuardedAdamW([{"params": [p]}, {"params": [torch.zeros(2, requires_grad=True)]}],
                            guard=None, **kwargs)
    for group in opt.param_groups:
        for key in ref.param_groups[0]:
            if key == "params":
                continue
            assert key in group, key
            assert group[key] == ref.param_groups[0][key], key
    p.grad = torch.ones(3)
    opt.step()


@pytest.mark.parametrize("name, value", [("amsgrad", True), ("maximize", True), ("differentiable", True),
                                         ("decoupled_weight_decay", False)])
def test_unsupported_adamw_options_raise_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        FusedGuardedAdamW([torch.zeros(2, requires_grad=True)], guard=None, **{name: value})
    with pytest.raises(ValueError, match=rf"param group 0.*{name}"):
        FusedGuardedAdamW([{"params": [torch.zeros(2, requires_grad=True)], name: value}], guard=None)
    opt = FusedGuardedAdamW([torch.zeros(2, requires_grad=True)], guard=None)
    with pytest.raises(ValueError, match=rf"param group 1.*{name}"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters:UserWarning")
def test_duplicate_params_raise_unlike_torch_which_warns():
    p = torch.randn(3, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        torch.optim.AdamW([p, p])
    with pytest.raises(ValueError, match="more than once"):
        FusedGuardedAdamW([p, p], guard=None)
    with pytest.raises(ValueError, match="more than one parameter group"):
        FusedGuardedAdamW([{"params": [p]}, {"params": [p]}], guard=None)
    opt = FusedGuardedAdamW([p], guard=None)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.999)), (torch.tensor(0.9), 0.999)])
def test_betas_mixing_a_float_and_a_tensor_raise_like_torch(betas):
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)], betas=betas)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        FusedGuardedAdamW([torch.zeros(2, requires_grad=True)], betas=betas, guard=None)


def test_tensor_lr_and_betas_equal_torch_adamw_with_the_same_tensors(backend):
    a = make_params(90)
    b = clone_params(a)

    def hyper():
        return dict(lr=torch.tensor(2e-3), betas=(torch.tensor(0.8), torch.tensor(0.99)))

    opt = FusedGuardedAdamW(a, guard=None, backend=backend, **hyper())
    ref = torch.optim.AdamW(b, **hyper())
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref, 0.9)
    gen = torch.Generator().manual_seed(91)
    for _ in range(steps(backend, 6)):
        set_grads(a, b, random_grads(a, gen))
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for p, q in zip(a, b):
        close_to_reference(p, q, rtol=1e-6)


def test_step_was_skipped():
    p = torch.randn(4, 3, requires_grad=True)
    opt = FusedGuardedAdamW([p], guard="default", backend="torch")
    assert opt.step_was_skipped is False  # before any step
    p.grad = torch.randn(4, 3)
    opt.step(loss=1.0)
    assert isinstance(opt.step_was_skipped, torch.Tensor) and not bool(opt.step_was_skipped)
    before = p.detach().clone()
    opt.step(loss=float("nan"))  # the guard's device-side loss check skips the step
    assert bool(opt.step_was_skipped)
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 1
    opt.step(loss=1.0)
    assert not bool(opt.step_was_skipped)
    plain = FusedGuardedAdamW([torch.randn(3, requires_grad=True)], guard=None, backend="torch")
    plain.param_groups[0]["params"][0].grad = torch.ones(3)
    plain.found_inf, plain.grad_scale = torch.tensor(1.0), torch.tensor(1.0)
    plain.step()
    assert bool(plain.step_was_skipped)


def test_latest_loss_and_record_loss_reach_the_next_step_once():
    p = torch.randn(5, requires_grad=True)
    opt = FusedGuardedAdamW([p], guard="default", backend="torch")
    assert opt.latest_loss is None
    loss = (p * 2).sum()
    opt.record_loss(loss)
    assert not opt.latest_loss.requires_grad and float(opt.latest_loss) == float(loss.detach())
    p.grad = torch.ones(5)
    opt.step()
    assert float(opt.telemetry.loss) == pytest.approx(float(loss.detach()))
    assert opt.latest_loss is None  # consumed
    opt.step()
    assert math.isnan(float(opt.telemetry.loss))
    opt.latest_loss = 3.0  # OLMo-core style
    assert opt.latest_loss == 3.0
    opt.step()
    assert float(opt.telemetry.loss) == 3.0
    opt.latest_loss = 4.0
    opt.step(loss=torch.tensor(7.0))  # an explicit loss wins
    assert float(opt.telemetry.loss) == 7.0 and opt.latest_loss is None


def test_latest_grad_norm_and_record_grad_norm_reach_the_guard():
    p = torch.randn(5, requires_grad=True)
    opt = FusedGuardedAdamW([p], guard=GuardConfig(keep_trace=10, lag=0), backend="torch")
    assert opt.latest_grad_norm is None
    norm = torch.tensor(12.5, requires_grad=True) * 1.0
    opt.record_grad_norm(norm)
    assert not opt.latest_grad_norm.requires_grad and float(opt.latest_grad_norm) == 12.5
    p.grad = torch.ones(5)
    opt.step(loss=1.0)
    assert opt.latest_grad_norm is None
    assert opt.guard.records[-1]["grad_norm"] == 12.5
    opt.latest_grad_norm = 3.0
    assert opt.latest_grad_norm == 3.0
    opt.step(loss=1.0)
    assert opt.guard.records[-1]["grad_norm"] == 3.0
    opt.step(loss=1.0)
    assert opt.guard.records[-1]["grad_norm"] is None


def test_guarded_steps_without_a_loss_warn_exactly_once_after_ten():
    p = torch.randn(5, requires_grad=True)
    opt = FusedGuardedAdamW([p], guard="default", backend="torch")
    p.grad = torch.ones(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(9):
            opt.step()
        assert not [w for w in caught if "no loss" in str(w.message)]
        opt.step()
        assert len([w for w in caught if "no loss" in str(w.message)]) == 1
        for _ in range(15):
            opt.step()
        opt.step(loss=1.0)
        for _ in range(15):
            opt.step()
    assert len([w for w in caught if "no loss for 10 steps" in str(w.message)]) == 1
    # without a guard there is nothing to warn about
    plain = FusedGuardedAdamW([torch.randn(2, requires_grad=True)], guard=None, backend="torch")
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(12):
            plain.step()
