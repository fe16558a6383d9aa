"""Conformance with torch.optim.AdamW on the sample configurations of PyTorch's own optimizer tests.

PyTorch's ``test/test_optim.py`` runs every optimizer through the configurations that
``torch.testing._internal.common_optimizers.optim_db`` samples for it (``optim_inputs_func``,
plus the foreach / fused / differentiable variants). This builds FusedGuardedAdamW from every
configuration sampled for AdamW, for the CPU and the CUDA sample lists (the CUDA list adds
Tensor lr, Tensor betas and capturable; the parameters here are on the CPU, where capturable
and foreach change nothing for us, so torch's reference runs without them), steps it a few
times beside ``torch.optim.AdamW`` with the same kwargs on the same fresh random parameters
and gradients, and checks every element of the parameters and moments, for fp32 and fp64,
with ``guard=None`` and with the default guard (healthy gradients: it must not intervene).

Configurations that use a feature FusedGuardedAdamW deliberately does not support
(``amsgrad=True``, ``maximize=True``, ``differentiable=True``) must raise ``ValueError`` naming
the flag; they are then reported as skipped with the reason. The other deliberate
differences from torch (which PyTorch's full ``test/test_optim.py``, needing its source tree,
shows) are listed in the docstring of ``FusedGuardedAdamW``.
"""

from __future__ import annotations

import copy

import pytest
import torch

# torch.testing._internal.common_utils imports expecttest (a test-only dependency of torch).
pytest.importorskip("expecttest")
common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

from lbw_guard import FusedGuardedAdamW  # noqa: E402

STEPS = 4
UNSUPPORTED = ("amsgrad", "maximize", "differentiable")
# fp32: the fused step rounds its coefficients to fp32 once where torch keeps Python doubles,
# and orders a few fp32 operations differently: a few ulps, relative to the tensor's scale.
# fp64 runs on the fp64 fallback and matches torch to rounding.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _adamw_info():
    return next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.AdamW)


def _samples() -> list:
    """(id, kwargs) for every configuration sampled for AdamW, deduplicated."""
    info = _adamw_info()
    expand = getattr(common_optimizers, "_get_optim_inputs_including_global_cliquey_kwargs", None)
    out, seen = [], set()
    for device in ("cpu", "cuda"):
        if expand is not None:
            inputs = expand(device, torch.float32, info)
        else:  # an older/newer torch without the private helper: the base samples only
            inputs = info.optim_inputs_func(device=device)
        for oi in inputs:
            key = repr(sorted(oi.kwargs.items(), key=lambda kv: kv[0]))
            if key in seen:
                continue
            seen.add(key)
            flags = ",".join(f"{k}={v}" for k, v in sorted(oi.kwargs.items())
                             if k in ("foreach", "fused", "capturable") and v)
            out.append((f"{device}:{oi.desc}" + (f"[{flags}]" if flags else ""), oi.kwargs))
    return out


SAMPLES = _samples()


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """A matrix, a vector, a 0-d tensor, a strided (non-dense) view, a permuted 3-d tensor
    and an empty tensor, as torch's tests use."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return [rnd(16, 8), rnd(8), rnd(()), rnd(10, 5, 2)[..., 0], rnd(3, 4, 5).transpose(0, 2), rnd(0)]


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Every element within ``rtol`` of the reference, relative to the element plus the
    tensor's scale (an element near zero is judged on the tensor's scale)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().clamp_min(1e-30)
    err = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    assert bool((err <= bound).all()), f"{what}: max abs err {err.max().item():.3e} (scale {scale.item():.3e})"


def _reference_hyperparameters(kwargs: dict, dtype: torch.dtype) -> dict:
    """For fp64 params, a Tensor lr/betas go to torch as the same values in Python floats.

    torch's single-tensor AdamW computes with fp32 tensor hyperparameters in fp32 (the decay
    factor ``1 - lr * weight_decay``, ``beta ** step``), an error of ~1e-7 relative to the
    parameter; FusedGuardedAdamW reads them once as doubles, which torch's float path matches
    to the last bit.
    """
    if dtype == torch.float64:
        if isinstance(kwargs.get("lr"), torch.Tensor):
            kwargs["lr"] = float(kwargs["lr"])
        betas = kwargs.get("betas")
        if betas is not None and any(isinstance(b, torch.Tensor) for b in betas):
            kwargs["betas"] = tuple(float(b) for b in betas)
    return kwargs


@pytest.mark.parametrize("guard", [None, "default"], ids=["guard=None", "guard=default"])
@pytest.mark.parametrize("kwargs", [kw for _, kw in SAMPLES], ids=[name for name, _ in SAMPLES])
def test_matches_torch_adamw_on_torch_sample_configs(kwargs, guard):
    unsupported = [k for k in UNSUPPORTED if kwargs.get(k, False)]
    if unsupported:
        with pytest.raises(ValueError, match=unsupported[0]):
            FusedGuardedAdamW([torch.zeros(2, requires_grad=True)], guard=guard, **copy.deepcopy(kwargs))
        pytest.skip(f"{unsupported[0]}=True is deliberately unsupported (raises ValueError, checked)")
    # The reference is torch's single-tensor (forloop) AdamW, which torch's own tests treat as
    # the ground truth: capturable needs an accelerator in torch, torch refuses a Tensor lr/betas
    # with foreach=True unless capturable, and torch 2.13's fused CPU kernel updates a
    # non-dense parameter (or one whose grad has other strides) wrongly. None of the three
    # flags changes the math.
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("capturable", "foreach", "fused")}
    ref_kwargs.update(foreach=False, fused=False)
    for dtype in (torch.float32, torch.float64):
        seed = len(repr(kwargs))
        ours = [p.requires_grad_() for p in _params(dtype, seed)]
        theirs = [p.requires_grad_() for p in _params(dtype, seed)]  # same values and layouts
        opt = FusedGuardedAdamW(ours, guard=guard, **copy.deepcopy(kwargs))
        ref = torch.optim.AdamW(theirs, **_reference_hyperparameters(copy.deepcopy(ref_kwargs), dtype))
        gen = torch.Generator().manual_seed(1234)
        for step in range(STEPS):
            for p, q in zip(ours, theirs):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                # autograd's layout contract: a dense param's grad has its strides, else contiguous
                p.grad = torch.empty_like(p).copy_(g)
                q.grad = torch.empty_like(q).copy_(g)
            opt.step()
            ref.step()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                at = f"{dtype} step {step + 1} param {i}"
                _close(p, q, RTOL[dtype], f"{at} value")
                for key in ("exp_avg", "exp_avg_sq"):
                    _close(opt.state[p][key], ref.state[q][key], RTOL[dtype], f"{at} {key}")
                assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == step + 1
        if guard is not None:
            assert not bool(opt.step_was_skipped)
