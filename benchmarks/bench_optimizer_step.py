"""Optimizer step time: FusedGuardedAdamW per backend against torch.optim.AdamW, same tensors.

Telemetry is always on in FusedGuardedAdamW (it is part of the fused pass); the variants add
the guard (guard="default") or fused clipping (max_grad_norm=1.0). Baselines: torch AdamW
foreach, fused, and fused after clip_grad_norm_(max_norm=1.0). Every row also reports
achieved GB/s for its bytes-per-parameter model and the share of the copy bandwidth.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from benchmarks import common, roofline
from benchmarks.bench_copy import ensure_copy_bw


@dataclass(frozen=True)
class Variant:
    name: str
    impl: str  # "torch" (torch.optim.AdamW) or "lbw" (FusedGuardedAdamW)
    backend: str  # foreach/fused for torch; the FusedGuardedAdamW backend for lbw
    guard: bool = False
    clip: bool = False


TORCH_VARIANTS = [
    Variant("torch-foreach", "torch", "foreach"),
    Variant("torch-fused", "torch", "fused"),
    Variant("torch-fused+clip", "torch", "fused", clip=True),
]
# Backends worth timing per device; triton on a CPU would only be the interpreter.
LBW_BACKENDS = {"cpu": ("torch", "cpu"), "cuda": ("torch", "triton", "cuda")}


def lbw_variants(backends) -> list[Variant]:
    out = []
    for b in backends:
        out += [Variant(f"lbw-{b}", "lbw", b), Variant(f"lbw-{b}+guard", "lbw", b, guard=True),
                Variant(f"lbw-{b}+clip", "lbw", b, clip=True)]
    return out


def pytest_generate_tests(metafunc):
    # One parametrize call, variant innermost, so every variant of a case reuses its tensors.
    if "variant" in metafunc.fixturenames:
        cfg = metafunc.config._lbw_bench
        variants = TORCH_VARIANTS + lbw_variants(LBW_BACKENDS.get(cfg["device"].type, ("torch",)))
        combos = [(c, d, v) for c in cfg["cases"] for d in cfg["dtypes"] for v in variants]
        metafunc.parametrize("case,dtype_name,variant", combos,
                             ids=[f"{c.name}-{d}-{v.name}" for c, d, v in combos])


MAX_NORM = 1.0
REFERENCE_CPU_MAX_NUMEL = 1 << 20
LR, WD = 1e-3, 1e-2


_TENSORS: dict[tuple, list] = {}


@pytest.fixture
def tensors(case, dtype_name, device):
    """Params with grads for one (case, dtype), kept until the next case needs the memory."""
    key = (case.name, dtype_name, str(device))
    if key not in _TENSORS:
        _TENSORS.clear()
        common.free_memory(device)
        _TENSORS[key] = common.make_params(case.tensors, case.numel_each, device, common.DTYPES[dtype_name])
    return _TENSORS[key]


def teardown_module():
    _TENSORS.clear()


def build(variant: Variant, params, device, numel: int):
    """(optimizer, step callable) or pytest.skip with the reason."""
    if variant.impl == "torch":
        kw = {"fused": True} if variant.backend == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kw)

        def step():
            if variant.clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()

        return opt, step

    from lbw_guard import FusedGuardedAdamW

    if variant.backend == "torch" and device.type == "cpu" and numel > REFERENCE_CPU_MAX_NUMEL:
        pytest.skip("the torch reference backend (the test oracle) is timed on the CPU only at 1M: "
                    "it is far too slow for larger sizes in the CPU time budget")
    why = common.backend_unavailable(variant.backend, device)
    if why is None and variant.guard:
        why = common.guard_unavailable()
    if why:
        pytest.skip(why)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt = FusedGuardedAdamW(params, lr=LR, weight_decay=WD, backend=variant.backend,
                                guard="default" if variant.guard else None,
                                max_grad_norm=MAX_NORM if variant.clip else None)
    if opt.backend_name != variant.backend:
        pytest.skip(f"backend {variant.backend!r} fell back to {opt.backend_name!r}")
    return opt, opt.step


def test_step(benchmark, variant, case, dtype_name, tensors, device, plan, copy_bw):
    benchmark.group = f"step {case.name} {dtype_name}"
    copy_gbps = ensure_copy_bw(copy_bw, device)
    opt, step = build(variant, tensors, device, case.numel)
    spy = common.Spy(opt) if variant.impl == "lbw" else None
    timing = common.time_steps(benchmark, step, device, plan)
    if timing is None:
        return
    dtype = common.DTYPES[dtype_name]
    if spy is not None:
        bpp = roofline.lbw_bytes_per_param(dtype, prepass=spy.prepass_per_step())
        extra = {"prepass_per_step": spy.prepass_per_step(), **spy.guard_fields()}
    else:
        bpp = roofline.torch_adamw_bytes_per_param(dtype, clip=variant.clip)
        extra = {}
    achieved = roofline.gbps(bpp, case.numel, timing["ms_per_step"])
    common.record(
        benchmark, "optimizer-step", timing, case=case.name, numel=case.numel, tensors=case.tensors,
        dtype=dtype_name, variant=variant.name, impl=variant.impl, backend=variant.backend,
        guard=variant.guard, clip=variant.clip, bytes_per_param=bpp, gbps=achieved,
        pct_copy=100.0 * achieved / copy_gbps, **extra,
    )
    del opt
