"""FusedGuardedAdamW with the guard off: equal to torch.optim.AdamW, and its API contract."""

from __future__ import annotations

import copy

import pytest
import torch

from lbw_guard import TELEMETRY_FIELDS, FusedGuardedAdamW

SIZES = (1, 3, 4097)


def close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Every element within ``rtol`` of the expected value, relative to the tensor's scale
    for elements near zero (a relative error at an element that crossed zero means nothing)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected.double()).abs()
    bound = rtol * (expected.double().abs() + scale.double())
    assert bool((err <= bound).all()), f"max abs err {err.max().item():.3e} (scale {scale.item():.3e})"


def make_params(seed: int, dtype=torch.float32, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def groups_of(params, lr=1e-3):
    # Several groups with their own hyperparameters.
    return [
        {"params": params[:1]},
        {"params": params[1:2], "lr": 3 * lr, "betas": (0.8, 0.99), "weight_decay": 0.0},
        {"params": params[2:], "eps": 1e-6, "weight_decay": 0.1},
    ]


def available_backends():
    """Backends that can run here: the reference, Triton (natively on a GPU or through the
    interpreter), and the compiled C++ backend when it builds."""
    from lbw_kernels.backends import BackendUnavailable, load_backend

    names = []
    device = torch.device("cpu")
    for name in ("torch", "triton", "cpu"):
        try:
            load_backend(name, device)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_equals_torch_adamw_over_200_steps_with_scheduler(backend):
    ours = make_params(1)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(groups_of(ours), lr=2e-3, guard=None, backend=backend)
    ref = torch.optim.AdamW(groups_of(theirs), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-3, 6e-3, 2e-3], total_steps=200)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=[2e-3, 6e-3, 2e-3], total_steps=200)
    gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for p, q in zip(ours, theirs):
        close_to_reference(p.detach(), q.detach(), rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-6)
        close_to_reference(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 200


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_fp32_adamw_rounded_each_step(dtype, backend):
    """bf16/fp16 params with fp32 moments equal fp32 AdamW whose params are rounded to the
    dtype after every step, to within one unit in the last place of the dtype."""
    ours = make_params(3, dtype)
    theirs = clone_params(ours, torch.float32)
    opt = FusedGuardedAdamW(ours, lr=1e-2, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in theirs:
                q.copy_(q.to(dtype).float())
    eps = torch.finfo(dtype).eps
    for p, q in zip(ours, theirs):
        err = (p.detach().float() - q.detach()).abs()
        # a rounding-boundary flip can differ by one ulp of the value
        assert bool((err <= eps * q.detach().abs() + 1e-6).all()), err.max()
        close_to_reference(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_transformer_equals_adamw(backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    twin = copy.deepcopy(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    twin_decay = [p for n, p in twin.named_parameters() if p.ndim >= 2]
    twin_no_decay = [p for n, p in twin.named_parameters() if p.ndim < 2]
    opt = FusedGuardedAdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, guard=None, backend=backend
    )
    ref = torch.optim.AdamW([{"params": twin_decay}, {"params": twin_no_decay, "weight_decay": 0.0}], lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        # Real transformer gradients, handed to both optimizers identically (otherwise a
        # one-ulp difference feeds back through the forward pass and compounds).
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        close_to_reference(p.detach(), q.detach(), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_clipping_equals_clip_grad_norm_then_adamw(backend):
    ours = make_params(6)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(groups_of(ours), guard=None, backend=backend, max_grad_norm=0.5)
    ref = torch.optim.AdamW(groups_of(theirs))
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):
        for p, q in zip(ours, theirs):
            g = 3 * torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
    for p, q in zip(ours, theirs):
        close_to_reference(p.detach(), q.detach(), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_unscales_and_found_inf_skips_on_device(backend):
    ours = make_params(8)
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(ours, guard=None, backend=backend)
    ref = torch.optim.AdamW(theirs)
    gen = torch.Generator().manual_seed(9)
    for i in range(10):
        skip = i in (3, 7)
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g * 1024.0
            q.grad = g.clone()
        opt.grad_scale = torch.tensor(1024.0)
        opt.found_inf = torch.tensor(1.0 if skip else 0.0)
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone() if opt.state[p] else None) for p in ours]
        opt.step()
        if skip:
            for p, (pb, mb) in zip(ours, before):
                assert torch.equal(p.detach(), pb)
                if mb is not None:
                    assert torch.equal(opt.state[p]["exp_avg"], mb)
        else:
            ref.step()
    for p, q in zip(ours, theirs):
        close_to_reference(p.detach(), q.detach(), rtol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_telemetry_matches_direct_computation(backend):
    params = make_params(10)
    opt = FusedGuardedAdamW(groups_of(params), guard=None, backend=backend)
    gen = torch.Generator().manual_seed(11)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        before = [p.detach().clone() for p in params]
        opt.step()
        tel = opt.telemetry.to_dict()
        assert list(tel) == list(TELEMETRY_FIELDS)
        for gid, group in enumerate(opt.param_groups):
            idx = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
            g_all = torch.cat([grads[i].double() for i in idx])
            u_all = torch.cat([(params[i].detach() - before[i]).double() for i in idx])
            p_all = torch.cat([before[i].double() for i in idx])
            assert tel["grad_sq"][gid] == pytest.approx(float(g_all.square().sum()), rel=1e-6)
            assert tel["param_sq"][gid] == pytest.approx(float(p_all.square().sum()), rel=1e-6)
            assert tel["update_sq"][gid] == pytest.approx(float(u_all.square().sum()), rel=1e-3)
            assert tel["grad_dot_update"][gid] == pytest.approx(float((g_all * u_all).sum()), rel=1e-3)
            assert tel["numel"][gid] == g_all.numel()
            assert tel["nonfinite"][gid] == 0
    t = opt.telemetry
    total = {k: sum(v) for k, v in tel.items()}
    assert float(t.grad_norm()) == pytest.approx(total["grad_sq"] ** 0.5)
    assert float(t.update_param_ratio()) == pytest.approx((total["update_sq"] / total["param_sq"]) ** 0.5)
    assert float(t.outlier_ratio()) == pytest.approx(total["outliers"] / total["numel"])


def test_outliers_and_nonfinite_are_counted_and_nonfinite_elements_untouched():
    p = torch.ones(1000, requires_grad=True)
    opt = FusedGuardedAdamW([p], guard=None, backend="torch")
    for _ in range(5):
        p.grad = torch.full_like(p, 0.01)
        opt.step()
    g = torch.full_like(p, 0.01)
    g[:7] = 50.0  # 5000x the running RMS: outliers
    g[10] = float("nan")
    g[11] = float("inf")
    p.grad = g
    before = p.detach().clone()
    opt.step()
    tel = opt.telemetry.to_dict()
    assert tel["outliers"] == [7.0]
    assert tel["nonfinite"] == [2.0]
    assert torch.equal(p.detach()[10:12], before[10:12])
    assert bool(torch.isfinite(p.detach()).all())


def test_state_dict_round_trip_is_exact_and_resumes_identically():
    def run(params, opt, steps, seed):  # noqa: E306
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    a = make_params(12)
    opt_a = FusedGuardedAdamW(groups_of(a), guard=None, backend="torch")
    run(a, opt_a, 5, 1)
    saved = copy.deepcopy(opt_a.state_dict())
    saved_params = [p.detach().clone() for p in a]
    run(a, opt_a, 5, 2)

    b = [p.clone().requires_grad_() for p in saved_params]
    opt_b = FusedGuardedAdamW(groups_of(b), guard=None, backend="torch")
    opt_b.load_state_dict(saved)
    reloaded = opt_b.state_dict()
    for pid, st in saved["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(reloaded["state"][pid][key], st[key])
    run(b, opt_b, 5, 2)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_torch_adamw_state_dict_loads_and_goes_back():
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
    opt = FusedGuardedAdamW(groups_of(b), guard=None, backend="torch")
    opt.load_state_dict(ref.state_dict())
    for _ in range(4):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    for p, q in zip(a, b):
        close_to_reference(q.detach(), p.detach(), rtol=1e-6)
    back = torch.optim.AdamW(groups_of(clone_params(b)))
    back.load_state_dict(opt.state_dict())
    for q, r in zip(opt.param_groups, back.param_groups):
        for pq, pr in zip(q["params"], r["params"]):
            assert torch.equal(back.state[pr]["exp_avg"], opt.state[pq]["exp_avg"])
            assert float(back.state[pr]["step"]) == 8


def test_params_without_grad_are_left_alone():
    a, b = make_params(15, sizes=(5, 6))
    opt = FusedGuardedAdamW([a, b], guard=None, backend="torch")
    a.grad = torch.randn(5)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before)
    assert len(opt.state[b]) == 0
    assert opt.telemetry.to_dict()["numel"] == [5.0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(backend="rocket"), ValueError, "backend"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(lr="fast"), TypeError, "lr"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedGuardedAdamW(make_params(0), guard=None, **kwargs)


def test_bad_params_are_refused():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        FusedGuardedAdamW([torch.randn(3, dtype=torch.complex64, requires_grad=True)], guard=None)
    with pytest.raises(ValueError, match="more than once"):
        FusedGuardedAdamW([p, p], guard=None)
    with pytest.raises(ValueError, match="more than one parameter group"):
        FusedGuardedAdamW([{"params": [p]}, {"params": [p]}], guard=None)
    with pytest.raises(ValueError, match=r"lr must be finite"):
        FusedGuardedAdamW([{"params": [p], "lr": float("inf")}], guard=None)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="put each device"):
            FusedGuardedAdamW([p, torch.randn(3, device="cuda", requires_grad=True)], guard=None)


def test_sparse_grad_refused_and_nothing_modified():
    a, b = make_params(16, sizes=(4, 4))
    opt = FusedGuardedAdamW([a, b], guard=None, backend="torch")
    a.grad = torch.randn(4)
    b.grad = torch.randn(4).to_sparse()
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert len(opt.state[a]) == 0 and opt.num_steps == 0


def test_add_param_group_and_closure():
    a, b = make_params(17, sizes=(3, 5))
    opt = FusedGuardedAdamW([a], guard=None, backend="torch")
    opt.add_param_group({"params": [b], "lr": 0.1})
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0.9, 2.0)})

    def closure():
        opt.zero_grad()
        loss = (a.square().sum() + b.square().sum())
        loss.backward()
        return loss

    first = float(opt.step(closure))
    for _ in range(20):
        last = float(opt.step(closure))
    assert last < first
    assert opt.telemetry.values.shape == (2, len(TELEMETRY_FIELDS))


def test_auto_backend_reports_its_choice():
    opt = FusedGuardedAdamW(make_params(18), guard=None)
    assert opt.backend_name in ("cpu", "torch", "triton", "cuda")


def test_real_grad_scaler_unscales_in_the_step_and_skips_inf_steps():
    """torch.amp.GradScaler hands FusedGuardedAdamW its scale and found_inf tensors
    (_step_supports_amp_scaling): results equal unscaled AdamW, an inf step is skipped."""
    ours = make_params(19, sizes=(3, 4097))
    theirs = clone_params(ours)
    opt = FusedGuardedAdamW(ours, guard=None, backend="torch")
    ref = torch.optim.AdamW(theirs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(20)
    for i in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        loss = sum((p * g).sum() for p, g in zip(ours, grads))
        if i == 3:
            loss = loss * float("inf")  # every grad becomes inf: the scaler must skip the step
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in ours]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == 3:
            assert all(torch.equal(p.detach(), b) for p, b in zip(ours, before))
            assert scaler.get_scale() == 2.0**9
            continue
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        ref.step()
    for p, q in zip(ours, theirs):
        close_to_reference(p.detach(), q.detach(), rtol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 5


def test_torch_adamw_state_dict_sets_the_step_count():
    a = make_params(21)
    ref = torch.optim.AdamW(a)
    for _ in range(3):
        for p in a:
            p.grad = torch.randn_like(p)
        ref.step()
    opt = FusedGuardedAdamW(clone_params(a), guard=None, backend="torch")
    opt.load_state_dict(ref.state_dict())
    assert opt.num_steps == 3


def test_applied_gate_is_a_snapshot_of_its_step():
    a = make_params(22, sizes=(8,))
    opt = FusedGuardedAdamW(a, guard="monitor", backend="torch")
    gates = []
    for _ in range(3):
        a[0].grad = torch.randn(8)
        opt.step()
        gates.append(opt.applied_gate)
    assert len({id(g) for g in gates}) == 3
