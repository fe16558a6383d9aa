"""Optimizer step time: FusedGuardedAdamW per backend against torch.optim.AdamW, same tensors.

Telemetry is always on in FusedGuardedAdamW (it is part of the fused pass); the variants add
the guard (guard="default") or fused clipping (max_grad_norm=1.0). Baselines: torch AdamW
foreach, fused, and fused after clip_grad_norm_(max_norm=1.0). Every row also reports
achieved GB/s for its bytes-per-parameter model and the share of the copy bandwidth.
"""

from __future__ import annotations

import pytest

from benchmarks import common, roofline
from benchmarks import interleave as il
from benchmarks.bench_copy import ensure_copy_bw


Variant = il.Variant

TORCH_VARIANTS = [Variant.parse(n) for n in ("torch-foreach", "torch-fused", "torch-fused+clip")]
# Backends worth timing per device; triton on a CPU would only be the interpreter.
LBW_BACKENDS = {"cpu": ("torch", "foreach", "cpu"), "cuda": ("torch", "foreach", "triton", "cuda")}
# The torch-only backends are timed on the CPU only at 1M: the reference (the test oracle) takes
# seconds per step at larger sizes there, and the foreach fallback is not what the CPU runs.
SLOW_ON_CPU = ("torch", "foreach")


def lbw_variants(backends) -> list[Variant]:
    return [Variant.parse(f"lbw-{b}{x}") for b in backends for x in ("", "+guard", "+clip")]


def pytest_generate_tests(metafunc):
    # One parametrize call, variant innermost, so every variant of a case reuses its tensors.
    if "variant" in metafunc.fixturenames:
        cfg = metafunc.config._lbw_bench
        variants = TORCH_VARIANTS + lbw_variants(LBW_BACKENDS.get(cfg["device"].type, ("torch",)))
        combos = [(c, d, v) for c in cfg["cases"] for d in cfg["dtypes"] for v in variants]
        metafunc.parametrize("case,dtype_name,variant", combos,
                             ids=[f"{c.name}-{d}-{v.name}" for c, d, v in combos])


REFERENCE_CPU_MAX_NUMEL = 1 << 20


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
    if variant.impl == "lbw" and variant.backend in SLOW_ON_CPU and device.type == "cpu" \
            and numel > REFERENCE_CPU_MAX_NUMEL:
        pytest.skip(f"backend {variant.backend!r} is timed on the CPU only at 1M (too slow for the CPU budget)")
    if variant.guard and (why := common.guard_unavailable()):
        pytest.skip(why)
    try:
        return il.build(variant, params)
    except il.Unavailable as exc:
        pytest.skip(str(exc))


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
