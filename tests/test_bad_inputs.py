"""Bad inputs to FusedGuardedAdamW: every one is refused with a ValueError/TypeError that names
the culprit, before anything changes.

Covered: every constructor argument; ``step()`` (losses of every wrong kind, closures, gradients
of the wrong shape/dtype/device/layout, bad pending values); hyperparameters set between steps
(fixed tables and hypothesis-drawn values); every ``GuardConfig`` field (table-driven over
``dataclasses.fields(GuardConfig)``, bad values derived from each field's type); and tampered
checkpoints for ``load_state_dict`` (moments, step counts, groups, ids, the guard's section and
its snapshot ring).

"Before anything changes" is checked, not assumed: after every refused call the optimizer's
full state dict (moments, step counters, ``num_steps``, the guard's state with its snapshots),
every parameter and every gradient are compared bit for bit with what they were.

``TALLY`` counts the bad inputs tried and those that ended cleanly (refused as specified, or,
for inputs that are fine, such as a NaN loss, handled as specified); the last test prints it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbw_guard import FusedGuardedAdamW, validation
from lbw_guard.guard import Guard, GuardConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
]

TALLY = {"tried": 0, "clean": 0, "known_bugs": 0}
"""Bad inputs tried, those that ended cleanly, and those tried by the strict-xfail tests of known
bugs outside this suite's files (each of those is expected not to end cleanly)."""
ERRORS = (ValueError, TypeError)
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- helpers
def same(a, b) -> bool:
    """Deep equality: tensors bit for bit (dtype, shape, NaNs where NaNs), floats NaN-aware."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or a.layout != b.layout:
            return False
        if a.layout != torch.strided or a.device.type == "meta":
            return True
        return torch.equal(a.detach(), b.detach()) or bool(
            torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)]))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def snapshot(opt, params) -> dict:
    """Everything a refused call must leave as it was."""
    return {
        "state_dict": copy.deepcopy(opt.state_dict()),
        "num_steps": opt.num_steps,
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "groups": [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        "group_params": [list(map(id, g["params"])) for g in opt.param_groups],
        "state_keys": {id(p): sorted(opt.state[p]) for p in params if p in opt.state},
        "pending": (opt.latest_loss, opt.latest_grad_norm),
        "telemetry": None if opt.telemetry is None else opt.telemetry.record.clone(),
    }


def refuse(opt, params, call, errors=ERRORS, *needles):
    """``call()`` raises one of ``errors`` whose message holds every needle, and nothing of
    ``opt``, its params and their grads changed."""
    TALLY["tried"] += 1
    before = snapshot(opt, params)
    with pytest.raises(errors) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    after = snapshot(opt, params)
    changed = [k for k in before if not same(before[k], after[k])]
    assert not changed, f"a refused call changed {changed}"
    TALLY["clean"] += 1
    return info.value


def accepted(check):
    """A fine input (a NaN loss, a loss that requires grad...): ``check()`` asserts it was handled."""
    TALLY["tried"] += 1
    check()
    TALLY["clean"] += 1


def leaf(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_()


def trained(guard="default", steps=4, seed=0, **kwargs):
    """Two param groups, stepped a few times (state, guard state and telemetry exist), with
    gradients set for the next step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    opt = FusedGuardedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}], guard=guard,
                            backend="torch", **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(6, 4, generator=gen)).square().mean()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.zero_grad()
    model(torch.randn(6, 4, generator=gen)).square().mean().backward()
    return model, params, opt


def step_works(opt, params):
    """After a refusal, a good step still runs and changes the params."""
    before = [p.detach().clone() for p in params]
    opt.step(loss=1.0)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def _known_bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# --------------------------------------------------------------------------- the constructor
def _constructor_cases():
    p = leaf(3, 4)
    cases = [
        # params
        ("params=int", lambda: FusedGuardedAdamW(42), TypeError, ["params"]),
        ("params=tensor", lambda: FusedGuardedAdamW(leaf(3)), TypeError, ["params"]),
        ("params=[]", lambda: FusedGuardedAdamW([]), ValueError, ["empty parameter list"]),
        ("params=[str]", lambda: FusedGuardedAdamW(["w"]), TypeError, ["Tensor"]),
        ("params=group set", lambda: FusedGuardedAdamW([{"params": {leaf(3)}}]), TypeError, ["ordered"]),
        ("params=int64", lambda: FusedGuardedAdamW([torch.zeros(3, dtype=torch.long)]), TypeError,
         ["param group 0 params[0]", "int64"]),
        ("params=complex", lambda: FusedGuardedAdamW([leaf(3), torch.zeros(2, dtype=torch.complex64, requires_grad=True)]),
         TypeError, ["param group 0 params[1]", "complex"]),
        ("params=meta", lambda: FusedGuardedAdamW([torch.zeros(2, device="meta", requires_grad=True)]), ValueError,
         ["param group 0 params[0]", "meta"]),
        ("params=sparse", lambda: FusedGuardedAdamW([torch.zeros(2, 2).to_sparse().requires_grad_()]), TypeError,
         ["param group 0 params[0]", "layout"]),
        ("params=non-leaf", lambda: FusedGuardedAdamW([leaf(3) * 2]), ValueError, ["non-leaf"]),
        ("params=[p, p]", lambda: FusedGuardedAdamW([p, p]), ValueError, ["params[1]", "more than once"]),
        ("params=p in two groups", lambda: FusedGuardedAdamW([{"params": [p]}, {"params": [p]}]), ValueError,
         ["more than one parameter group"]),
        ("params=group not a dict", lambda: FusedGuardedAdamW([{"params": [leaf(3)]}, 5]), TypeError,
         ["param_group must be a dict"]),
        ("params=names half missing", lambda: FusedGuardedAdamW([("a", leaf(3)), leaf(2)]), (ValueError, TypeError),
         []),
        ("unknown keyword", lambda: FusedGuardedAdamW([leaf(3)], lrr=1e-3), TypeError, ["lrr"]),
    ]
    bad_numbers = [NAN, INF, -1.0, "0.1", None, [1e-3], 1j, True, torch.tensor([1e-3, 2e-3]),
                   torch.tensor(1e-3, requires_grad=True), torch.tensor(1 + 1j), torch.tensor(True),
                   torch.tensor(1e-3, device="meta")]
    for key in ("lr", "eps", "weight_decay"):
        for value in bad_numbers:
            cases.append((f"{key}={value!r}", lambda key=key, value=value: FusedGuardedAdamW([leaf(3)], **{key: value}),
                          ERRORS, [key]))
            cases.append((f"group {key}={value!r}", lambda key=key, value=value: FusedGuardedAdamW(
                [{"params": [leaf(3)]}, {"params": [leaf(2)], key: value}]), ERRORS, [f"param group 1 {key}"]))
    bad_betas = [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (NAN, 0.9), (0.9, INF), "ab", (0.9,), (0.9, 0.99, 0.5),
                 None, 0.9, (0.9, "x"), (0.9, torch.tensor(0.99)), (torch.tensor([0.9, 0.8]), torch.tensor(0.99)),
                 (0.9, None)]
    for value in bad_betas:
        cases.append((f"betas={value!r}", lambda value=value: FusedGuardedAdamW([leaf(3)], betas=value), ERRORS,
                      ["betas"]))
    for key, value in (("amsgrad", True), ("maximize", True), ("differentiable", True),
                       ("decoupled_weight_decay", False), ("amsgrad", torch.tensor([True, False]))):
        cases.append((f"{key}={value!r}", lambda key=key, value=value: FusedGuardedAdamW([leaf(3)], **{key: value}),
                      ERRORS, [key]))
    for value in (42, "bogus", {"z_grad": -1.0}, {"no_such_field": 1}, 1.5, [GuardConfig()]):
        cases.append((f"guard={value!r}", lambda value=value: FusedGuardedAdamW([leaf(3)], guard=value), ERRORS,
                      ["guard" if not isinstance(value, dict) else next(iter(value))]))
    for value in ("rocket", 42, None, "", "TORCH"):
        cases.append((f"backend={value!r}", lambda value=value: FusedGuardedAdamW([leaf(3)], backend=value),
                      ValueError, ["backend"]))
    for value in (0, -1.0, NAN, INF, "1.0", True, torch.tensor([1.0, 2.0]), [1.0]):
        cases.append((f"max_grad_norm={value!r}",
                      lambda value=value: FusedGuardedAdamW([leaf(3)], max_grad_norm=value), ERRORS,
                      ["max_grad_norm"]))
    return [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in cases]


CONSTRUCTOR_CASES = _constructor_cases()


@pytest.mark.parametrize("name, build, errors, needles", CONSTRUCTOR_CASES)
def test_constructor_refuses_bad_arguments_naming_them(name, build, errors, needles, request):
    if request.node.get_closest_marker("xfail"):
        TALLY["known_bugs"] += 1
    TALLY["tried"] += 1
    with pytest.raises(errors) as info:
        build()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    TALLY["clean"] += 1


def test_constructor_refusal_modifies_nothing():
    """A refused constructor touches no parameter, gradient or guard."""
    params = [leaf(3, 4), leaf(5)]
    for p in params:
        p.grad = torch.ones_like(p)
    guard = Guard()
    before = ([p.detach().clone() for p in params], [p.grad.clone() for p in params])
    for kwargs in (dict(lr=NAN), dict(max_grad_norm=-1.0), dict(backend="rocket"), dict(amsgrad=True)):
        TALLY["tried"] += 1
        with pytest.raises(ValueError):
            FusedGuardedAdamW(params, guard=guard, **kwargs)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before[0]))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, before[1]))
        assert guard.optimizer is None  # still free to bind
        TALLY["clean"] += 1
    FusedGuardedAdamW(params, guard=guard)  # and usable afterwards


def test_fine_torch_flags_are_accepted():
    for kwargs in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(capturable=True),
                   dict(amsgrad=False, maximize=False, differentiable=False, decoupled_weight_decay=True),
                   dict(lr=torch.tensor(1e-3)), dict(betas=(torch.tensor(0.9), torch.tensor(0.99))),
                   dict(lr=0.0, weight_decay=0.0, eps=0.0, betas=(0.0, 0.0)), dict(max_grad_norm=torch.tensor(1.0))):
        def check(kwargs=kwargs):
            p = leaf(3)
            opt = FusedGuardedAdamW([p], guard=None, **kwargs)
            p.grad = torch.ones(3)
            opt.step()
            assert bool(torch.isfinite(p).all())
        accepted(check)


def test_param_group_without_params_raises_value_error():
    TALLY["tried"] += 1
    opt = FusedGuardedAdamW([leaf(3)], guard=None)
    with pytest.raises(ERRORS, match="params"):
        opt.add_param_group({"lr": 1e-3})
    TALLY["clean"] += 1


def test_guard_bound_to_another_optimizer_raises_value_error():
    TALLY["tried"] += 1
    guard = Guard()
    FusedGuardedAdamW([leaf(3)], guard=guard)
    with pytest.raises(ERRORS, match="already bound"):
        FusedGuardedAdamW([leaf(3)], guard=guard)
    TALLY["clean"] += 1


def test_add_param_group_refusals_leave_the_optimizer_as_it_was():
    model, params, opt = trained()
    cases = [
        (lambda: opt.add_param_group({"params": [leaf(2)], "lr": NAN}), ["param group 2 lr"]),
        (lambda: opt.add_param_group({"params": [leaf(2)], "betas": (0.9, 1.5)}), ["param group 2 betas[1]"]),
        (lambda: opt.add_param_group({"params": [params[0]]}), ["more than one parameter group"]),
        (lambda: opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]}),
         ["param group 2 params[0]"]),
        (lambda: opt.add_param_group({"params": [leaf(2), torch.zeros(2, device="meta", requires_grad=True)]}),
         ["param group 2 params[1]", "meta"]),
        (lambda: opt.add_param_group([leaf(2)]), ["param_group must be a dict"]),
        (lambda: opt.add_param_group({"params": [leaf(2)], "maximize": True}), ["param group 2", "maximize"]),
    ]
    for call, needles in cases:
        refuse(opt, params, call, ERRORS, *needles)
    assert len(opt.param_groups) == 2
    step_works(opt, params)


# --------------------------------------------------------------------------- step(): the loss
BAD_LOSSES = [
    ("multi-element", torch.tensor([1.0, 2.0]), ValueError, ["loss", "shape"]),
    ("empty", torch.zeros(0), ValueError, ["loss"]),
    ("str", "1.0", TypeError, ["loss", "str"]),
    ("object", object(), TypeError, ["loss", "object"]),
    ("list", [1.0], TypeError, ["loss", "list"]),
    ("bool", True, TypeError, ["loss"]),
    ("int too large for a float", 10 ** 400, ValueError, ["loss", "too large"]),
    ("meta", torch.tensor(1.0, device="meta"), ValueError, ["loss", "meta"]),
    ("complex tensor", torch.tensor(1.0 + 2.0j), TypeError, ["loss", "complex"]),
    ("complex", 1.0 + 2.0j, TypeError, ["loss", "complex"]),
    ("bool tensor", torch.tensor(True), TypeError, ["loss", "bool"]),
    ("sparse", torch.tensor([1.0]).to_sparse(), ValueError, ["loss"]),
]


@pytest.mark.parametrize("name, loss, error, needles", BAD_LOSSES, ids=[c[0] for c in BAD_LOSSES])
@pytest.mark.parametrize("guard", [None, "default"])
def test_step_refuses_a_bad_loss_before_anything_changes(guard, name, loss, error, needles):
    model, params, opt = trained(guard)
    refuse(opt, params, lambda: opt.step(loss=loss), error, *needles)
    # the same value handed over through latest_loss is refused at once, where it comes from
    refuse(opt, params, lambda: setattr(opt, "latest_loss", loss), error, *needles)
    refuse(opt, params, lambda: opt.record_loss(loss), error, *needles)
    opt.latest_loss = None
    step_works(opt, params)


def test_step_refuses_a_closure_returning_a_bad_loss():
    model, params, opt = trained()
    refuse(opt, params, lambda: opt.step(lambda: "nope"), TypeError, "loss", "step(closure, loss=...)")
    refuse(opt, params, lambda: opt.step(lambda: torch.ones(3)), ValueError, "loss", "closure")


def test_a_raising_closure_propagates_and_changes_nothing():
    model, params, opt = trained()

    def closure():
        raise RuntimeError("boom in the closure")

    refuse(opt, params, lambda: opt.step(closure), RuntimeError, "boom in the closure")
    step_works(opt, params)


@pytest.mark.parametrize("guard", [None, "default"])
def test_fine_losses_are_used(guard):
    """A loss that requires grad, an int, a NumPy float, a (1,)-shaped tensor: used as the loss.
    A NaN or inf loss is fine too: the guard judges it (it skips the step on the device);
    without a guard the step runs as AdamW's would."""
    np = pytest.importorskip("numpy")
    for loss, expect in ((torch.tensor(2.0, requires_grad=True) * 1.0, 2.0), (3, 3.0), (np.float32(1.5), 1.5),
                         (torch.tensor([4.0]), 4.0), (torch.tensor(5, dtype=torch.int64), 5.0),
                         (torch.tensor(6, dtype=torch.int8), 6.0), (torch.tensor(7, dtype=torch.uint8), 7.0)):
        def check(loss=loss, expect=expect):
            model, params, opt = trained(guard)
            opt.step(loss=loss)
            assert float(opt.telemetry.loss) == expect
            assert not bool(opt.step_was_skipped)
        accepted(check)
    for loss in (NAN, torch.tensor(INF), -INF):
        def check(loss=loss):
            model, params, opt = trained(guard)
            before = [p.detach().clone() for p in params]
            opt.step(loss=loss)
            moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
            assert bool(opt.step_was_skipped) == (guard is not None) and moved == (guard is None)
        accepted(check)


# --------------------------------------------------------------------------- step(): gradients
def _bad_grad_cases():
    def wrong_shape(p):
        p.grad = torch.ones_like(p)
        p.grad.set_(torch.ones(p.numel() + 1))  # torch's grad setter checks; set_ does not

    def wrong_dtype(p):
        p.grad = torch.ones_like(p)
        p.grad.data = torch.ones(p.shape, dtype=torch.float64)

    def grad_dtype_none(p):
        p.grad_dtype = None  # torch >= 2.10: a tensor may accept grads of another dtype
        p.grad = torch.ones(p.shape, dtype=torch.bfloat16)

    def complex_grad(p):
        p.grad_dtype = None
        p.grad = torch.ones(p.shape, dtype=torch.complex64)

    def sparse(p):
        p.grad = torch.ones_like(p).to_sparse()

    cases = [("shape", wrong_shape, ["param group 1 params[0]", "shape"]), ("dtype", wrong_dtype, ["param group 1 params[0]", "dtype"]),
             ("sparse", sparse, ["param group 1 params[0]", "sparse"])]
    if hasattr(torch.Tensor, "grad_dtype"):
        cases += [("grad_dtype bf16", grad_dtype_none, ["param group 1 params[0]", "dtype"]),
                  ("complex", complex_grad, ["param group 1 params[0]", "dtype"])]
    return cases


BAD_GRADS = _bad_grad_cases()


@pytest.mark.parametrize("name, spoil, needles", BAD_GRADS, ids=[c[0] for c in BAD_GRADS])
def test_step_refuses_a_bad_gradient_before_anything_changes(name, spoil, needles):
    """The third parameter's gradient is bad; the first two (good) are not stepped either."""
    model, params, opt = trained()
    spoil(params[2])
    refuse(opt, params, lambda: opt.step(loss=1.0), ValueError, *needles)
    params[2].grad = None
    if hasattr(params[2], "grad_dtype"):
        params[2].grad_dtype = params[2].dtype
    params[2].grad = torch.ones_like(params[2])
    step_works(opt, params)


@pytest.mark.parametrize("step", [5, 5.0, torch.tensor(5), torch.tensor(5.0, dtype=torch.float64),
                                  torch.tensor([5.0]), torch.tensor(5.0, device="meta")],
                         ids=["int", "float", "int64", "float64", "shape (1,)", "meta"])
def test_a_step_count_written_directly_is_refused_before_anything_changes(step):
    model, params, opt = trained()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.state[params[3]]["step"] = step
    refuse(opt, params, lambda: opt.step(loss=1.0), TypeError, "param group 1 params[1]", "['step']", "float32")
    opt.state[params[3]]["step"] = torch.tensor(float(opt.num_steps))
    step_works(opt, params)


def test_gradients_torch_cannot_attach_are_refused_by_check_grad():
    """torch's grad setter refuses these; check_grad refuses them too (for custom loops that
    build gradients another way, e.g. through DTensor or .data)."""
    p = leaf(3, 4)
    for grad, needles in ((torch.empty(3, 4, device="meta"), ["param group 0 params[7]", "meta"]),
                          (torch.ones(3, 4).to_sparse_csr(), ["param group 0 params[7]", "sparse"]),
                          (torch.ones(4, 3), ["param group 0 params[7]", "shape"]),
                          (torch.ones(3, 4, dtype=torch.float16), ["param group 0 params[7]", "dtype"])):
        TALLY["tried"] += 1
        with pytest.raises(ValueError) as info:
            validation.check_grad(p, grad, "param group 0 params[7]")
        assert all(n in str(info.value) for n in needles), str(info.value)
        TALLY["clean"] += 1


def test_fine_gradients_are_used():
    """NaN/inf gradient elements (the guard masks them), a gradient that requires grad
    (create_graph=True), an expanded (stride 0) or transposed gradient: all step."""
    def nan_grad():
        model, params, opt = trained()
        params[0].grad[0, 0] = NAN
        params[1].grad[0] = INF
        opt.step(loss=1.0)
        assert all(bool(torch.isfinite(p).all()) for p in params)
        assert opt.telemetry.to_dict()["nonfinite"][0] == 2.0

    def grad_requires_grad():
        model, params, opt = trained()
        params[0].grad = params[0].grad.clone().requires_grad_()
        step_works(opt, params)

    def odd_strides():
        model, params, opt = trained(None)
        ref = copy.deepcopy(opt)
        ref_params = [p for g in ref.param_groups for p in g["params"]]
        dense = [p.grad.clone() for p in params]
        params[0].grad = dense[0].t().contiguous().t()  # transposed storage
        params[1].grad = torch.full((1,), 0.5).expand(params[1].shape)  # stride 0
        dense[1] = torch.full(params[1].shape, 0.5)
        for q, g in zip(ref_params, dense):
            q.grad = g
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(params, ref_params))

    for check in (nan_grad, grad_requires_grad, odd_strides):
        accepted(check)


@pytest.mark.parametrize("norm", ["x", object(), torch.tensor([1.0, 2.0])], ids=["str", "object", "2-element"])
def test_a_bad_recorded_grad_norm_is_refused_before_anything_changes(norm):
    model, params, opt = trained()

    def call():
        opt.record_grad_norm(norm)  # refused here, or else by the step before it changes anything
        opt.step(loss=1.0)

    refuse(opt, params, call, ERRORS, "grad_norm")


def test_no_gradients_at_all_is_a_no_op():
    model, params, opt = trained()
    opt.zero_grad()

    def check():
        before = snapshot(opt, params)
        assert opt.step(loss="not even a loss") is None  # nothing to step: nothing judged
        assert same(before, snapshot(opt, params))
    accepted(check)


# --------------------------------------------------------------------------- hyperparameters between steps
BAD_HYPER = {
    "lr": [NAN, INF, 1e39, -1e-3, "0.1", None, [1e-3], 1j, True, torch.tensor([1e-3, 2e-3]), torch.tensor(NAN),
           torch.tensor(-1.0), torch.tensor(1e-3, requires_grad=True), torch.tensor(1 + 1j),
           torch.tensor(1e-3, device="meta"), torch.tensor(True)],
    "betas": [(NAN, 0.999), (0.9, INF), (-0.1, 0.999), (1.0, 0.999), (0.9, 1.0), "ab", (0.9,), None,
              (0.9, "x"), 0.5, (0.9, 0.99, 0.9)],  # (0.9, tensor(0.99)) is OneCycleLR's: fine between steps
    "eps": [NAN, INF, 1e39, -1e-8, "1e-8", None, True, torch.tensor([1e-8, 1e-8])],
    "weight_decay": [NAN, INF, 1e39, -0.1, "0.1", None, False, torch.tensor(NAN)],
    "amsgrad": [True, torch.tensor([True, False])],
    "maximize": [True],
    "differentiable": [True],
    "decoupled_weight_decay": [False],
}
HYPER_CASES = [(key, value) for key, values in BAD_HYPER.items() for value in values]


@pytest.mark.parametrize("key, value", HYPER_CASES, ids=[f"{k}={v!r}" for k, v in HYPER_CASES])
def test_a_bad_hyperparameter_set_between_steps_is_refused_naming_group_and_key(key, value):
    model, params, opt = trained()
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    refuse(opt, params, lambda: opt.step(loss=1.0), ERRORS, "param group 1", key)
    opt.param_groups[1][key] = good
    step_works(opt, params)


def test_a_deleted_hyperparameter_is_refused_naming_it():
    model, params, opt = trained()
    for key in ("lr", "betas", "eps", "weight_decay"):
        value = opt.param_groups[0].pop(key)
        refuse(opt, params, lambda: opt.step(loss=1.0), ValueError, "param group 0", repr(key))
        opt.param_groups[0][key] = value
    step_works(opt, params)


_reals = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, -0.0, 1.0, 1 - 1e-16, -1e-300, 1e300]))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(["lr", "eps", "weight_decay", "beta1", "beta2"]), value=_reals,
       as_tensor=st.booleans())
def test_random_hyperparameter_values_step_or_are_refused_cleanly(key, value, as_tensor):
    """Any float for lr/eps/weight_decay/betas: a valid one steps (params stay finite or follow
    AdamW), an invalid one is refused naming group and key, with nothing changed."""
    model, params, opt = trained(steps=1)
    group = opt.param_groups[0]
    wrap = (lambda x: torch.tensor(x, dtype=torch.float64)) if as_tensor else (lambda x: x)
    if key.startswith("beta"):
        b = list(group["betas"])
        b[int(key[-1]) - 1] = value
        group["betas"] = (wrap(b[0]), wrap(b[1])) if as_tensor else tuple(b)
        name = f"betas[{int(key[-1]) - 1}]"
        valid = 0.0 <= value < 1.0
    else:
        group[key] = wrap(value)
        name = key
        valid = math.isfinite(value) and 0.0 <= value <= torch.finfo(torch.float32).max  # the kernels' floats
    if valid:
        def check():
            opt.step(loss=1.0)
            assert opt.num_steps == 2
        accepted(check)
    else:
        refuse(opt, params, lambda: opt.step(loss=1.0), ValueError, "param group 0", name)


# --------------------------------------------------------------------------- GuardConfig
def _bad_values(field: dataclasses.Field) -> list:
    """Wrong types and out-of-range values for a GuardConfig field, from its type annotation."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kind = kind.replace("typing.", "").replace("Optional[float]", "float | None").replace("Optional[str]", "str | None")
    table = {
        "int": [-1, 1.5, "3", None, NAN, INF] + ([] if field.name == "keep_trace" else [True]),
        "float": [-1.0, NAN, INF, -INF, "0.5", None, True, [0.5], 10**400],
        "float | None": [-1.0, NAN, INF, "0.5", True, [0.5], 10**400],
        "bool": [1, 0, "yes", None, 1.0],
        "str": [123, None, "no-such-choice", b"act"],
        "str | None": [123, 4.5, b"trace.jsonl", ["trace.jsonl"]],
    }
    if kind not in table:
        raise AssertionError(f"GuardConfig.{field.name} has a type ({kind}) this table does not know: add it")
    bad = [v for v in table[kind] if not (field.name in INF_MEANS_NONE and v == INF)]
    return bad + RANGE_EXTRAS.get(field.name, [])


INF_MEANS_NONE = {"spike_k_warmup"}  # float fields where inf is a valid setting (no bound)


# Values of the right type but outside the field's range (on top of the type-derived ones).
RANGE_EXTRAS = {
    "warmup_steps": [0], "ema_beta": [0.0, 1.0], "winsor_z": [0.0], "min_grad_log_std": [0.0],
    "min_loss_rel_std": [0.0], "z_grad": [0.0], "z_loss": [0.0], "spike_fraction": [0.0, 1.5],
    "warmup_grad_factor": [1.0, 0.5], "level_shift_records": [0], "rescale_tolerance": [0.0], "lr_spike_factor": [1.0, 0.5], "spike_k": [0.0], "spike_k_warmup": [0.0], "min_scale": [0.0, 1.5],
    "max_update_ratio": [0.0],
    "early_records": [], "omega_low": [0.0, 0.95], "omega_high": [0.01],  # below the default omega_low
    "omega_worsening": [0.0, 1.5], "omega_window": [0], "min_evidence": [0], "cut_factor": [0.0, 1.0],
    "restart_cut": [0.0, 1.5],
    "cut_interval": [0], "recovery_rate": [0.0, 1.5], "max_scale_increase": [0.0, 1.5],
    "snapshot_interval": [51], "snapshot_budget": [0.0, 1.5], "snapshot_ring": [0],
    "max_rollback_distance": [0], "rollback_window": [0], "rollback_scale": [0.0, 1.5], "start_rise": [0.0, -0.2],
    "start_rise_records": [0],
    "max_frozen_fraction": [1.0], "give_up_after": [0], "event_capacity": [0],
}
GUARD_FIELD_CASES = [(f.name, value) for f in dataclasses.fields(GuardConfig) for value in _bad_values(f)]
# Fields whose validation is missing in lbw_guard/guard/config.py (_validate never checks them).
_UNVALIDATED: set[str] = set()


@pytest.mark.parametrize("name, value", GUARD_FIELD_CASES, ids=[f"{n}={v!r}" for n, v in GUARD_FIELD_CASES])
def test_every_guard_config_field_refuses_bad_values_naming_the_field(name, value, request):
    if name in _UNVALIDATED:
        TALLY["known_bugs"] += 1
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            f"lbw_guard/guard/config.py _validate never checks {name}: any value (NaN, a str, None) is accepted")))
    TALLY["tried"] += 1
    with pytest.raises(ERRORS) as info:
        GuardConfig(**{name: value})
    assert name in str(info.value), str(info.value)
    TALLY["clean"] += 1


def test_guard_config_takes_numpy_scalars_as_python_numbers():
    """Values from np.linspace / np.arange in a sweep: checked and kept as the numbers they are
    (a trace header and a checkpoint write the config as JSON)."""
    import json

    import numpy as np

    config = GuardConfig(lag=np.int64(2), z_grad=np.float32(7.5), min_scale=np.float64(0.2))
    assert (config.lag, config.z_grad, config.min_scale) == (2, 7.5, 0.2)
    assert type(config.lag) is int and type(config.z_grad) is float
    json.dumps(config.to_dict())
    with pytest.raises(ValueError, match="min_scale must be in"):
        GuardConfig(min_scale=np.float32(1.5))


def test_huge_ring_lag_and_event_sizes_cost_only_what_is_used():
    """A ring, lag or capacity of 10**9 is valid; memory grows with what is held, not the size."""
    import tracemalloc

    def train(config):
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        opt = FusedGuardedAdamW(params, lr=1e-2, backend="torch", guard=config)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step(loss=torch.rand(()))
        return opt

    train(GuardConfig(snapshot_interval=5))  # the modules a step imports on first use
    tracemalloc.start()
    opt = train(GuardConfig(snapshot_ring=10**9, lag=10**9, event_capacity=10**9, keep_trace=10**9,
                            snapshot_interval=5, max_rollback_distance=10**9))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"
    assert opt.num_steps == 20 and len(opt.guard._copies.buffers) == 20  # one per queued record


def test_guard_config_refusals_through_every_door_name_the_field():
    """GuardConfig(...), .replace(...), .from_dict(...) and FusedGuardedAdamW(guard=dict)."""
    doors = [
        (lambda: GuardConfig().replace(z_grad=-1.0), "z_grad"),
        (lambda: GuardConfig.from_dict({"lag": "1"}), "lag"),
        (lambda: GuardConfig.from_dict({"no_such_field": 1}), "no_such_field"),
        (lambda: GuardConfig.from_dict([("lag", 1)]), "dict"),
        (lambda: FusedGuardedAdamW([leaf(3)], guard={"min_scale": 0.0}), "min_scale"),
        (lambda: FusedGuardedAdamW([leaf(3)], guard={"mode": "acting"}), "mode"),
    ]
    for call, needle in doors:
        TALLY["tried"] += 1
        with pytest.raises(ERRORS) as info:
            call()
        assert needle in str(info.value), str(info.value)
        TALLY["clean"] += 1


def test_guard_config_table_covers_every_field():
    names = {f.name for f in dataclasses.fields(GuardConfig)}
    assert names == {name for name, _ in GUARD_FIELD_CASES}
    assert set(RANGE_EXTRAS) <= names, set(RANGE_EXTRAS) - names


# --------------------------------------------------------------------------- load_state_dict
def _guarded():
    cfg = GuardConfig(snapshots_in_state_dict=True, snapshot_interval=4, warmup_steps=3, lag=1)
    model, params, opt = trained(cfg, steps=16)
    sd = opt.state_dict()
    assert sd["guard"]["snapshots"]["slots"], "the fixture needs snapshots in the state dict"
    return model, params, opt, sd


def _set(path, value):
    def tamper(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return tamper


def _delete(path):
    def tamper(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return tamper


def _edit(path, fn):
    def tamper(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = fn(node[path[-1]])
    return tamper


def _only_packed(sd):
    """A state dict as torch.distributed.checkpoint leaves it: no top-level extras."""
    sd.pop("guard", None)
    sd.pop("num_steps", None)


def _with(*tampers):
    def tamper(sd):
        for t in tampers:
            t(sd)
    return tamper


S0 = ["state", 0]
SLOT0 = ["guard", "snapshots", "slots", 0]
CHECKPOINT_CASES = [
    # per-parameter state
    ("exp_avg wrong shape", _edit(S0 + ["exp_avg"], lambda t: t.reshape(-1)), ValueError, ["state'][0]['exp_avg'", "shape"]),
    ("exp_avg (1,)", _set(S0 + ["exp_avg"], torch.zeros(1)), ValueError, ["state'][0]['exp_avg'", "shape"]),
    ("exp_avg NaN", _edit(S0 + ["exp_avg"], lambda t: t.index_fill(0, torch.tensor([0]), NAN)), ValueError,
     ["state'][0]['exp_avg'", "NaN"]),
    ("exp_avg inf", _edit(S0 + ["exp_avg"], lambda t: t.index_fill(0, torch.tensor([1]), INF)), ValueError,
     ["state'][0]['exp_avg'"]),
    ("exp_avg_sq negative", _edit(S0 + ["exp_avg_sq"], lambda t: -t - 1), ValueError,
     ["state'][0]['exp_avg_sq'", "negative"]),
    ("exp_avg_sq NaN", _edit(S0 + ["exp_avg_sq"], lambda t: t * NAN), ValueError, ["state'][0]['exp_avg_sq'"]),
    ("exp_avg_sq inf", _edit(S0 + ["exp_avg_sq"], lambda t: t + INF), ValueError, ["state'][0]['exp_avg_sq'"]),
    ("exp_avg list", _edit(S0 + ["exp_avg"], lambda t: t.tolist()), TypeError, ["state'][0]['exp_avg'"]),
    ("exp_avg int", _edit(S0 + ["exp_avg"], lambda t: t.long()), TypeError, ["state'][0]['exp_avg'", "dtype"]),
    ("exp_avg complex", _edit(S0 + ["exp_avg"], lambda t: t.to(torch.complex64)), TypeError,
     ["state'][0]['exp_avg'"]),
    ("exp_avg meta", _edit(S0 + ["exp_avg"], lambda t: t.to("meta")), ValueError, ["state'][0]['exp_avg'", "meta"]),
    ("exp_avg sparse", _edit(S0 + ["exp_avg"], lambda t: t.to_sparse()), ValueError, ["state'][0]['exp_avg'"]),
    ("step -5", _set(S0 + ["step"], torch.tensor(-5.0)), ValueError, ["state'][0]['step'"]),
    ("step 1.5", _set(S0 + ["step"], 1.5), ValueError, ["state'][0]['step'"]),
    ("step NaN", _set(S0 + ["step"], torch.tensor(NAN)), ValueError, ["state'][0]['step'"]),
    ("step inf", _set(S0 + ["step"], INF), ValueError, ["state'][0]['step'"]),
    ("step list", _set(S0 + ["step"], [4]), TypeError, ["state'][0]['step'"]),
    ("step str", _set(S0 + ["step"], "4"), TypeError, ["state'][0]['step'"]),
    ("step bool", _set(S0 + ["step"], True), TypeError, ["state'][0]['step'"]),
    ("step shape (2,)", _set(S0 + ["step"], torch.tensor([4.0, 4.0])), ValueError, ["state'][0]['step'"]),
    ("step complex", _set(S0 + ["step"], torch.tensor(4 + 0j)), TypeError, ["state'][0]['step'"]),
    ("step meta", _set(S0 + ["step"], torch.tensor(4.0, device="meta")), ValueError, ["state'][0]['step'"]),
    ("missing exp_avg_sq", _delete(S0 + ["exp_avg_sq"]), ValueError, ["state'][0]", "exp_avg_sq"]),
    ("missing step", _delete(S0 + ["step"]), ValueError, ["state'][0]", "step"]),
    ("amsgrad state", _edit(S0, lambda s: {**s, "max_exp_avg_sq": s["exp_avg_sq"]}), ValueError,
     ["state'][0]", "max_exp_avg_sq"]),
    ("state entry not a dict", _set(S0, 5), TypeError, ["state'][0]"]),
    ("state not a dict", _set(["state"], [1, 2]), TypeError, ["state'"]),
    ("unknown param id", _edit(["state"], lambda s: {**s, 99: s[0]}), ValueError, ["unknown parameter ids", "99"]),
    # the top level and the groups
    ("no state", _delete(["state"]), ValueError, ["'state'"]),
    ("no param_groups", _delete(["param_groups"]), ValueError, ["'param_groups'"]),
    ("param_groups not a list", _set(["param_groups"], {"params": [0]}), TypeError, ["param_groups"]),
    ("a group not a dict", _edit(["param_groups"], lambda g: [g[0], 5]), TypeError, ["param_groups"]),
    ("one group too few", _edit(["param_groups"], lambda g: g[:1]), ValueError, ["1 param groups", "has 2"]),
    ("one group too many", _edit(["param_groups"], lambda g: g + [copy.deepcopy(g[1])]), ValueError,
     ["3 param groups"]),
    ("a param too few", _edit(["param_groups", 1, "params"], lambda ids: ids[:1]), ValueError,
     ["param group 1 has 1 params"]),
    ("a param too many", _edit(["param_groups", 1, "params"], lambda ids: ids + [7]), ValueError,
     ["param group 1 has 3 params"]),
    ("group without params", _delete(["param_groups", 0, "params"]), ValueError, ["param group 0"]),
    ("duplicate param id", _edit(["param_groups", 1, "params"], lambda ids: [0, ids[1]]), ValueError,
     ["param group 1 params[0]", "more than once"]),
    ("unhashable param id", _edit(["param_groups", 1, "params"], lambda ids: [[2], ids[1]]), TypeError,
     ["param group 1 params[0]"]),
    ("group lr NaN", _set(["param_groups", 1, "lr"], NAN), ValueError, ["param group 1 lr"]),
    ("group lr str", _set(["param_groups", 1, "lr"], "fast"), TypeError, ["param group 1 lr"]),
    ("group betas", _set(["param_groups", 0, "betas"], (0.9, 1.0)), ValueError, ["param group 0 betas[1]"]),
    ("group eps", _set(["param_groups", 0, "eps"], -1.0), ValueError, ["param group 0 eps"]),
    ("group weight_decay", _set(["param_groups", 0, "weight_decay"], INF), ValueError,
     ["param group 0 weight_decay"]),
    ("group amsgrad", _set(["param_groups", 0, "amsgrad"], True), ValueError, ["param group 0", "amsgrad"]),
    ("num_steps -1", _set(["num_steps"], -1), ValueError, ["num_steps"]),
    ("num_steps 1.5", _set(["num_steps"], 1.5), ValueError, ["num_steps"]),
    ("num_steps str", _set(["num_steps"], "16"), ValueError, ["num_steps"]),
    ("num_steps bool", _set(["num_steps"], True), ValueError, ["num_steps"]),
    # the guard's section
    ("guard a list", _set(["guard"], [1, 2]), TypeError, ["state_dict['guard']"]),
    ("guard a str", _set(["guard"], "stable"), TypeError, ["state_dict['guard']"]),
    ("guard version 1", _set(["guard", "version"], 1), ValueError, ["version"]),
    ("guard version missing", _delete(["guard", "version"]), ValueError, ["version"]),
    ("guard controller not a dict", _set(["guard", "controller"], [1]), TypeError, ["state_dict['guard']"]),
    ("guard unknown regime", _set(["guard", "controller", "regime"], "panicking"), ValueError,
     ["state_dict['guard']", "regime"]),
    ("guard regime None", _set(["guard", "controller", "regime"], None), ValueError, ["state_dict['guard']"]),
    ("guard groups mismatch", _set(["guard", "controller", "num_groups"], 3), ValueError, ["state_dict['guard']"]),
    ("guard processed inf", _set(["guard", "controller", "processed"], INF), ValueError, ["state_dict['guard']"]),
    ("guard processed str", _set(["guard", "controller", "processed"], "x"), ValueError, ["state_dict['guard']"]),
    ("guard controller missing key", _edit(["guard", "controller"], lambda c: {k: v for k, v in c.items()
                                                                             if k != "regime"}),
     ValueError, ["state_dict['guard']"]),
    ("guard pending not records", _set(["guard", "pending"], [5]), TypeError, ["state_dict['guard']"]),
    ("guard pending in the future", _edit(["guard", "pending"], lambda ps: [{**ps[0], "step": 10 ** 6}] if ps else
                                          [{"step": 10 ** 6, "record": [], "num_groups": 2, "lrs": [0, 0],
                                            "scale": [1, 1], "gate": [1, 1]}]),
     ValueError, ["state_dict['guard']"]),
    ("guard issued bad step", _set(["guard", "issued"], {"x": [[1.0, 1.0], [1.0, 1.0]]}), ValueError,
     ["state_dict['guard']"]),
    ("guard issued bad entry", _set(["guard", "issued"], {17: [[1.0, 1.0]]}), ValueError, ["state_dict['guard']"]),
    ("guard last_scale too short", _set(["guard", "controller", "last_scale"], []), ValueError,
     ["state_dict['guard']"]),
    ("guard controller missing", _delete(["guard", "controller"]), ValueError, ["state_dict['guard']", "controller"]),
    ("guard pending missing", _delete(["guard", "pending"]), ValueError, ["state_dict['guard']", "pending"]),
    ("guard issued missing", _delete(["guard", "issued"]), ValueError, ["state_dict['guard']", "issued"]),
    ("guard issued entry of floats", _set(["guard", "issued"], {15: [1.0, 1.0]}), ValueError,
     ["state_dict['guard']", "issued"]),
    ("guard issued entry of strs", _set(["guard", "issued"], {15: ["ab", "cd"]}), ValueError,
     ["state_dict['guard']", "issued"]),
    ("guard issued scale of 5 groups", _set(["guard", "issued"], {15: [[1.0] * 5, [1.0] * 5]}), ValueError,
     ["state_dict['guard']", "issued"]),
    ("guard last_snapshot str", _set(["guard", "last_snapshot"], "x"), ValueError, ["last_snapshot"]),
    ("guard last_snapshot in the future", _set(["guard", "last_snapshot"], 10 ** 6), ValueError, ["last_snapshot"]),
    ("guard pending record empty", _edit(["guard", "pending"], lambda ps: [{**ps[0], "record": []}] if ps else
                                         [{"step": 1, "record": [], "num_groups": 2, "lrs": [0, 0],
                                           "scale": [1, 1], "gate": [1, 1]}]),
     ValueError, ["state_dict['guard']", "pending"]),
    # the snapshot ring
    ("snapshots not a dict", _set(["guard", "snapshots"], [1]), TypeError, ["state_dict['guard']", "snapshots"]),
    ("snapshot slot not a dict", _set(SLOT0, 5), TypeError, ["['snapshots']['slots'][0]"]),
    ("snapshot step missing", _delete(SLOT0 + ["step"]), ValueError, ["['snapshots']['slots'][0]['step']"]),
    ("snapshot step in the future", _set(SLOT0 + ["step"], 10 ** 6), ValueError,
     ["['snapshots']['slots'][0]['step']"]),
    ("snapshot step str", _set(SLOT0 + ["step"], "12"), ValueError, ["['snapshots']['slots'][0]['step']"]),
    ("snapshot (1,) buffer", _set(SLOT0 + ["buffers", 0], torch.zeros(1)), ValueError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot wrong-shaped buffer", _edit(SLOT0 + ["buffers", 0], lambda t: t.t().contiguous()), ValueError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot wrong dtype", _edit(SLOT0 + ["buffers", 0], lambda t: t.double()), ValueError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot buffer not a tensor", _edit(SLOT0 + ["buffers", 0], lambda t: t.tolist()), TypeError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot NaN buffer", _edit(SLOT0 + ["buffers", 0], lambda t: t * NAN), ValueError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot one buffer too many", _edit(SLOT0 + ["buffers"], lambda b: b + [torch.zeros(1)]), ValueError,
     ["['snapshots']['slots'][0]['buffers']"]),
    ("snapshot last buffer missing", _edit(SLOT0 + ["buffers"], lambda b: b[:-1]), ValueError,
     ["['snapshots']['slots'][0]['buffers']"]),
    ("snapshot of another model", _edit(SLOT0 + ["buffers"], lambda b: [torch.zeros(7)] * len(b)), ValueError,
     ["['snapshots']['slots'][0]['buffers'][0]"]),
    ("snapshot buffers swapped", _edit(SLOT0 + ["buffers"], lambda b: [b[4], *b[1:4], b[0], *b[5:]]), ValueError,
     ["['snapshots']['slots'][0]['buffers']"]),
    ("snapshots duplicate step", _edit(["guard", "snapshots", "slots"], lambda s: [s[0], copy.deepcopy(s[0])]),
     ValueError, ["step"]),
    ("snapshot layout not a list", _set(SLOT0 + ["layout"], "exp_avg"), ValueError,
     ["['snapshots']['slots'][0]['layout']"]),
    ("snapshot layout unknown key", _edit(SLOT0 + ["layout"], lambda keys: [["momentum"]] + keys[1:]), ValueError,
     ["['snapshots']['slots'][0]['layout']", "state keys"]),
    ("snapshot layout one parameter short", _edit(SLOT0 + ["layout"], lambda keys: keys[:-1]), ValueError,
     ["['snapshots']['slots'][0]['layout']"]),
    ("snapshot layout against its buffers", _edit(SLOT0 + ["layout"], lambda keys: [[]] + keys[1:]), ValueError,
     ["['snapshots']['slots'][0]['layout']", "buffers"]),
    # the spike bound's floors (per bucket layout: parameter positions, [sum of v, numel] pairs)
    ("spike_floor a dict", _set(["spike_floor"], {"params": [0]}), TypeError, ["state_dict['spike_floor']"]),
    ("spike_floor entry a list", _set(["spike_floor", 0], [0, 1]), TypeError, ["state_dict['spike_floor'][0]"]),
    ("spike_floor unknown parameter", _set(["spike_floor", 0, "params"], [10 ** 6]), ValueError,
     ["state_dict['spike_floor'][0]['params']"]),
    ("spike_floor parameter twice", _edit(["spike_floor", 0, "params"], lambda ps: [ps[0]] * len(ps)), ValueError,
     ["state_dict['spike_floor'][0]['params']", "increasing"]),
    ("spike_floor layout twice", _edit(["spike_floor"], lambda layouts: layouts + layouts), ValueError,
     ["state_dict['spike_floor'][1]['params']"]),
    ("spike_floor one pair short", _edit(["spike_floor", 0, "sums"], lambda pairs: pairs[:-1]), ValueError,
     ["state_dict['spike_floor'][0]['sums']"]),
    ("spike_floor NaN sum", _set(["spike_floor", 0, "sums", 0], [NAN, 3.0]), ValueError,
     ["state_dict['spike_floor'][0]['sums'][0]"]),
    ("spike_floor negative numel", _set(["spike_floor", 0, "sums", 0], [1.0, -3.0]), ValueError,
     ["state_dict['spike_floor'][0]['sums'][0]"]),
    ("spike_floor str sum", _set(["spike_floor", 0, "sums", 0], ["1.0", 3.0]), ValueError,
     ["state_dict['spike_floor'][0]['sums'][0]"]),
    # the packed copy of num_steps and the guard state (what torch.distributed.checkpoint keeps)
    ("packed section garbage", _with(_only_packed, _set(["param_groups", 0, "lbw_guard"], b"garbage")), ValueError,
     ["lbw_guard"]),
    ("packed section a list", _with(_only_packed, _set(["param_groups", 0, "lbw_guard"], [1])), TypeError,
     ["lbw_guard"]),
]


@pytest.fixture(scope="module")
def guarded_checkpoint():
    return _guarded()


CHECKPOINT_CASES = [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CHECKPOINT_CASES]


@pytest.mark.parametrize("name, tamper, error, needles", CHECKPOINT_CASES)
def test_a_tampered_checkpoint_is_refused_naming_the_entry_and_changes_nothing(name, tamper, error, needles,
                                                                             guarded_checkpoint, request):
    model, params, opt, saved = guarded_checkpoint
    if request.node.get_closest_marker("xfail"):
        TALLY["known_bugs"] += 1
        model, params, opt, saved = _guarded()  # a load that wrongly succeeds must not spoil the shared one
    if name.startswith("packed") and "lbw_guard" not in saved["param_groups"][0]:
        pytest.skip("this version of state_dict() packs no section")
    sd = copy.deepcopy(saved)
    tamper(sd)
    refuse(opt, params, lambda: opt.load_state_dict(sd), error, *needles)


def test_after_every_refusal_the_good_checkpoint_still_loads_and_resumes_exactly(guarded_checkpoint):
    model, params, opt, saved = guarded_checkpoint
    opt.load_state_dict(copy.deepcopy(saved))
    assert same(opt.state_dict()["state"], saved["state"]) and opt.num_steps == saved["num_steps"]
    assert sorted(s["step"] for s in opt.state_dict()["guard"]["snapshots"]["slots"]) == \
        sorted(s["step"] for s in saved["guard"]["snapshots"]["slots"])


def test_a_state_dict_missing_hyperparameters_keeps_the_groups_complete():
    """A torch.optim.AdamW state dict of another torch version may lack keys (e.g.
    decoupled_weight_decay, betas): the group keeps the optimizer's value for each."""
    model, params, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("betas", "eps", "decoupled_weight_decay", "differentiable", "fused"):
            group.pop(key, None)
    accepted(lambda: opt.load_state_dict(sd))
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    step_works(opt, params)


def test_a_guarded_checkpoint_loads_into_an_unguarded_optimizer_and_back():
    model, params, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    plain_model, plain_params, plain = trained(None)
    accepted(lambda: plain.load_state_dict(sd))  # the guard section is ignored without a guard
    assert plain.guard is None and plain.num_steps == sd["num_steps"]
    step_works(plain, plain_params)


@pytest.mark.parametrize("layout", ["kept", "saved before layouts were kept"])
def test_a_snapshot_of_params_without_state_yet_is_kept_not_refused(layout):
    """A snapshot taken before a parameter first had a gradient holds no state for it: a
    legitimate ring, loaded (and dropped by the ring if it no longer fits), never refused."""
    model, params, opt, saved = _guarded()
    sd = copy.deepcopy(saved)
    slot = sd["guard"]["snapshots"]["slots"][0]
    del slot["buffers"][1:4]  # parameter 0 without its state
    if layout == "kept":
        slot["layout"][0] = []
    else:
        del slot["layout"]
    accepted(lambda: opt.load_state_dict(sd))


# --------------------------------------------------------------------------- the tally
def test_zz_tally_of_bad_inputs():
    """Printed with ``-s`` (and in the terminal summary of -rA); every bad input tried so far in
    this module ended cleanly except those of the known bugs (strict xfails)."""
    print(f"\nbad inputs tried: {TALLY['tried']}, ended cleanly: {TALLY['clean']}, "
          f"known bugs (xfail): {TALLY['known_bugs']}")
    assert TALLY["tried"] - TALLY["clean"] == TALLY["known_bugs"]
