"""Shared machinery of the benchmark suite: cases, timing, the in-memory results list.

Every benchmark times a *step* callable through :func:`time_steps`, which runs warm-up
steps, then pytest-benchmark's pedantic mode over rounds of ``k`` steps followed by one
device synchronisation (and CUDA events around the same ``k`` steps on a GPU), and returns
per-step figures. Results go to :data:`RESULTS`; conftest writes them to a JSON file.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch

# One dict per measurement; conftest's session-finish hook writes them out.
RESULTS: list[dict] = []
# Measured copy bandwidth per device string: {"gbps": ..., "bytes": ...} (the roofline).
COPY_BW: dict[str, dict] = {}


@dataclass(frozen=True)
class Case:
    """A parameter set: ``tensors`` tensors of ``numel_each`` elements."""

    name: str
    tensors: int
    numel_each: int

    @property
    def numel(self) -> int:
        return self.tensors * self.numel_each


# Sizes of the spec. 24Mx6 is the CPU reference point (24M fp32 params in 6 tensors).
CASES = {
    "1M": Case("1M", 1, 1 << 20),
    "16M": Case("16M", 1, 1 << 24),
    "24Mx6": Case("24Mx6", 6, 4_000_000),
    "1000x64K": Case("1000x64K", 1000, 1 << 16),
    "256M": Case("256M", 16, 1 << 24),
    "1B": Case("1B", 64, 1 << 24),
}
PRESETS = {
    "small": ("1M", "16M", "24Mx6", "1000x64K"),
    "full": ("1M", "16M", "24Mx6", "1000x64K", "256M", "1B"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def select_cases(spec: str) -> list[Case]:
    """``small``, ``full`` or a comma list of case names (``1M,24Mx6``)."""
    names = PRESETS.get(spec) or tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark sizes {unknown}; choose from {sorted(CASES)} or {sorted(PRESETS)}")
    return [CASES[n] for n in names]


def select_dtypes(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")
    return names


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one benchmark; GPU and CPU differ (see conftest)."""

    warmup_steps: int
    budget_s: float  # target wall time of the timed rounds
    min_rounds: int
    max_rounds: int
    min_round_s: float  # a round repeats the step until it lasts this long (amortises the sync)


CPU_PLAN = TimingPlan(warmup_steps=2, budget_s=0.6, min_rounds=5, max_rounds=30, min_round_s=0.0)
GPU_PLAN = TimingPlan(warmup_steps=10, budget_s=2.0, min_rounds=20, max_rounds=400, min_round_s=2e-3)
E2E_CPU_PLAN = TimingPlan(warmup_steps=2, budget_s=3.0, min_rounds=8, max_rounds=30, min_round_s=0.0)
E2E_GPU_PLAN = TimingPlan(warmup_steps=5, budget_s=6.0, min_rounds=15, max_rounds=100, min_round_s=0.0)


SLOW_MIN_ROUNDS = 3


def time_steps(benchmark, step, device: torch.device, plan: TimingPlan) -> dict | None:
    """Time ``step()``; return per-step milliseconds (median, min, mean, stddev) and details.

    Returns None when pytest-benchmark ran without timing (``--benchmark-disable``).
    """
    step()  # first step: lazy state allocation, kernel compilation, caches
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    probe = max(time.perf_counter() - t0, 1e-7)
    # Slow steps (big CPU cases) get fewer warm-ups and rounds so that the CPU run stays short.
    slow = probe * plan.min_rounds > 2 * plan.budget_s
    for _ in range(1 if slow else plan.warmup_steps):
        step()
    k = max(1, math.ceil(plan.min_round_s / probe))
    floor = SLOW_MIN_ROUNDS if slow else plan.min_rounds
    rounds = min(plan.max_rounds, max(floor, int(plan.budget_s / (probe * k))))

    cuda = device.type == "cuda"
    events: list = []

    def one_round():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(k):
            step()
        if cuda:
            end.record()
            events.append((start, end))
        sync(device)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0 if slow else 1)
    meta = getattr(benchmark, "stats", None)
    if meta is None or getattr(meta, "stats", None) is None:
        return None
    s = meta.stats
    out = {
        "ms_per_step": s.median / k * 1e3,
        "ms_min": s.min / k * 1e3,
        "ms_mean": s.mean / k * 1e3,
        "ms_stddev": s.stddev / k * 1e3,
        "rounds": rounds,
        "steps_per_round": k,
    }
    if cuda and events:
        ms = sorted(a.elapsed_time(b) / k for a, b in events[-rounds:])  # without the warm-up round
        out["cuda_event_ms_per_step"] = ms[len(ms) // 2]
    return out


def record(benchmark, group: str, timing: dict | None, **fields) -> dict | None:
    """Attach ``fields`` and ``timing`` to the benchmark's extra_info and to RESULTS."""
    if timing is None:
        return None
    row = {"group": group, "name": benchmark.name, **fields, **timing}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "name"})
    RESULTS.append(row)
    return row


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- optimizer helpers
@functools.cache
def guard_unavailable() -> str | None:
    """Why guard="default" cannot be built here (the guard package is optional), or None."""
    from lbw_guard import FusedGuardedAdamW

    try:
        FusedGuardedAdamW([torch.nn.Parameter(torch.zeros(2))], guard="default", backend="torch")
    except Exception as exc:  # noqa: BLE001 - any failure means: benchmark without it
        return f"guard='default' unavailable here: {type(exc).__name__}: {exc}"
    return None


def make_params(count: int, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list:
    """``count`` parameters of ``numel`` elements with small random gradients, seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen, device=device).to(dtype))
        p.grad = (torch.randn(numel, generator=gen, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why FusedGuardedAdamW's backend ``name`` cannot be *timed* on ``device``, or None."""
    from benchmarks.interleave import backend_unavailable as why

    return why(name, device)


class Spy:
    """Counts grad pre-passes and host time spent in the guard, on one optimizer instance.

    Instance attributes shadow the methods, so the optimizer's own code runs unchanged.
    """

    def __init__(self, opt):
        self.opt = opt
        self.prepasses = 0
        self.before_s = self.after_s = 0.0
        self.guard_calls = 0
        self.start_steps = getattr(opt, "num_steps", 0)
        if hasattr(opt, "_grad_norm"):  # v2: the max_grad_norm / precheck pre-pass
            orig_norm = opt._grad_norm

            def norm(*a, **k):
                self.prepasses += 1
                return orig_norm(*a, **k)

            opt._grad_norm = norm
        self.snapshots = 0
        guard = getattr(opt, "guard", None)
        if guard is not None:
            guard.before_step = self._timed(guard.before_step, "before_s", count=True)
            guard.after_step = self._timed(guard.after_step, "after_s")
            ring = getattr(guard, "_ring", None)
            if ring is not None and hasattr(ring, "take"):
                orig_take = ring.take

                def take(*a, **k):
                    self.snapshots += 1
                    return orig_take(*a, **k)

                ring.take = take

    def _timed(self, orig, total: str, count: bool = False):
        """``orig`` wrapped so its wall time accumulates in ``self.<total>``."""

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter() - t0)
                self.guard_calls += count

        return wrapper

    @property
    def steps(self) -> int:
        return max(1, self.opt.num_steps - self.start_steps)

    def prepass_per_step(self) -> float:
        return self.prepasses / self.steps

    def guard_fields(self) -> dict:
        if self.guard_calls == 0:
            return {}
        n = self.guard_calls
        return {"before_step_us": self.before_s / n * 1e6, "after_step_us": self.after_s / n * 1e6,
                "guard_host_us": (self.before_s + self.after_s) / n * 1e6, "snapshots": self.snapshots}
