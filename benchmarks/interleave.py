"""Ratios measured in one process: variants built on the same kind of tensors, stepped in
interleaved, rotating order, medians per variant.

A shared machine drifts by 10-30% over a minute; timing variant A for a minute and then
variant B measures the drift as much as the variants. Here every repetition runs each
variant once (the order rotates so that no variant always follows the same neighbour), so
slow periods hit every variant alike, and a ratio of medians is what the targets are judged
on. Paired ratios (the median over repetitions of A_i / B_i, adjacent in time) are given too.

Used by :mod:`benchmarks.cpu_targets` (CPU targets, host time), :mod:`benchmarks.gpu_validate`
(GPU step times, end-to-end) and :mod:`benchmarks.op_count`. No pytest here.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

LR, WD, MAX_NORM = 1e-3, 1e-2, 1.0


class Unavailable(RuntimeError):
    """A variant cannot run here (backend missing, fell back, guard unavailable); says why."""


# ------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """``torch-fused``, ``torch-fused+clip``, ``torch-foreach``, ``lbw-<backend>``,
    ``lbw-<backend>+guard`` (guard="default", the loss passed), ``lbw-<backend>+clip``
    (max_grad_norm=1.0, no guard)."""

    name: str
    impl: str  # "torch" (torch.optim.AdamW) or "lbw" (FusedGuardedAdamW)
    backend: str  # fused/foreach for torch; the FusedGuardedAdamW backend for lbw
    guard: bool = False
    clip: bool = False

    @classmethod
    def parse(cls, name: str) -> "Variant":
        base, _, extra = name.partition("+")
        impl, _, backend = base.partition("-")
        if impl not in ("torch", "lbw") or not backend or extra not in ("", "guard", "clip"):
            raise ValueError(f"unknown variant {name!r}")
        if impl == "torch" and (backend not in ("fused", "foreach") or extra == "guard"):
            raise ValueError(f"unknown variant {name!r}")
        return cls(name, impl, backend, guard=extra == "guard", clip=extra == "clip")

    def fields(self) -> dict:
        return {"variant": self.name, "impl": self.impl, "backend": self.backend, "guard": self.guard,
                "clip": self.clip}


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why FusedGuardedAdamW's backend ``name`` cannot be *timed* on ``device``, or None."""
    import os

    from lbw_kernels.backends import BackendUnavailable, load_backend

    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: interpreter timings say nothing about GPU speed"
    try:
        load_backend(name, device)  # builds a C++ backend now, outside any timed region
    except BackendUnavailable as exc:
        return str(exc)
    return None


def build(variant: Variant | str, params, *, loss: torch.Tensor | None = None, allow_interpreter: bool = False,
          lr: float = LR, weight_decay: float = WD):
    """``(optimizer, step)`` for ``variant`` over ``params`` (tensors with ``.grad`` set, or
    param-group dicts); raises :class:`Unavailable` saying why it cannot run here.

    ``loss``: the 0-d tensor a guarded step receives (``step(loss=loss)``); made up if None.
    """
    v = Variant.parse(variant) if isinstance(variant, str) else variant
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    if v.impl == "torch":
        kw = {"fused": True} if v.backend == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)

        if v.clip:
            def step():
                torch.nn.utils.clip_grad_norm_(flat, MAX_NORM)
                opt.step()
        else:
            step = opt.step
        return opt, step

    from lbw_guard import FusedGuardedAdamW

    device = flat[0].device
    why = None if (allow_interpreter and v.backend == "triton") else backend_unavailable(v.backend, device)
    if why:
        raise Unavailable(why)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            opt = FusedGuardedAdamW(params, lr=lr, weight_decay=weight_decay, backend=v.backend,
                                    guard="default" if v.guard else None,
                                    max_grad_norm=MAX_NORM if v.clip else None)
        except Exception as exc:  # noqa: BLE001 - e.g. the guard package missing
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
    if opt.backend_name != v.backend:
        raise Unavailable(f"backend {v.backend!r} fell back to {opt.backend_name!r}")
    if v.guard:
        loss = loss if loss is not None else torch.full((), 2.5, device=device)

        def step():
            opt.step(loss=loss)

        return opt, step
    return opt, opt.step


def make_params(count: int, numel: int, device, dtype=torch.float32, seed: int = 0, shapes=None) -> list:
    """``count`` parameters of ``numel`` elements (or the given ``shapes``) with small random
    gradients, seeded; generated on the device in fp32, then cast."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = shapes or [(numel,)] * count
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device).to(dtype))
        p.grad = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def transformer_like_shapes(layers: int = 24, hidden: int = 64, vocab: int = 1024, mlp_ratio: float = 2.6875,
                            kv_ratio: int = 7) -> list[tuple]:
    """Parameter shapes of a Qwen2-style decoder: per layer q/k/v (weights and biases), o, gate,
    up, down and two norms (12 tensors), plus the embedding and the final norm; 24 layers give
    290 tensors. Small ``hidden`` keeps the arithmetic negligible: host time is what is left."""
    inter = int(hidden * mlp_ratio)
    kv = max(1, hidden // kv_ratio)
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,), (kv, hidden), (kv,), (kv, hidden), (kv,), (hidden, hidden),
                   (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes.append((hidden,))
    return shapes


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_rep(step: Callable, device: torch.device, min_rep_s: float) -> int:
    """Steps in one repetition so that it lasts at least ``min_rep_s`` (amortises a sync)."""
    if min_rep_s <= 0:
        return 1
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    probe = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, math.ceil(min_rep_s / probe)))


def interleave(steps: dict[str, Callable], device: torch.device, *, reps: int, warmup: int = 2,
               min_rep_s: float = 0.0, deadline: float | None = None, min_reps: int = 3,
               on_rep: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Time every step callable in interleaved, rotating order; per name a summary dict.

    A repetition of one variant is ``k`` steps (``k`` from a probe so that it lasts
    ``min_rep_s``), preceded by a device sync. On a GPU the device time comes from CUDA events
    around the ``k`` steps and ``host_ms_per_step`` is the host's wall time to issue them (no
    sync inside); on the CPU both are wall time. ``deadline`` (a ``time.perf_counter()``
    value) stops after the repetition in progress, once ``min_reps`` are done.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    k = {n: steps_per_rep(steps[n], device, min_rep_s) for n in names}
    cuda = device.type == "cuda"
    dev_s: dict[str, list[float]] = {n: [] for n in names}
    host_s: dict[str, list[float]] = {n: [] for n in names}
    events: dict[str, list] = {n: [] for n in names}
    done = 0
    for r in range(reps):
        if deadline is not None and done >= min_reps and time.perf_counter() > deadline:
            break
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if on_rep is not None:
                on_rep(n)
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(k[n]):
                steps[n]()
            t1 = time.perf_counter()
            if cuda:
                end.record()
                events[n].append((start, end))
            else:
                dev_s[n].append((t1 - t0) / k[n])
            host_s[n].append((t1 - t0) / k[n])
        done += 1
    _sync(device)
    if cuda:
        for n in names:
            dev_s[n] = [a.elapsed_time(b) / 1e3 / k[n] for a, b in events[n]]
    return {n: summarize(dev_s[n], host_s[n], k[n]) for n in names}


def summarize(samples: list[float], host: list[float], k: int) -> dict:
    """Milliseconds per step: median (the figure), min, mean, stddev; host median."""
    ms = [s * 1e3 for s in samples]
    out = {
        "ms_per_step": statistics.median(ms) if ms else math.nan,
        "ms_min": min(ms) if ms else math.nan,
        "ms_mean": statistics.fmean(ms) if ms else math.nan,
        "ms_stddev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "host_ms_per_step": statistics.median(host) * 1e3 if host else math.nan,
        "reps": len(ms),
        "steps_per_rep": k,
        "samples_ms": [round(x, 5) for x in ms],
    }
    return out


def ratio(a: dict, b: dict, key: str = "ms_per_step") -> float:
    """a / b of one summary figure."""
    return a[key] / b[key] if b.get(key) else math.nan


def paired_ratio(a: dict, b: dict) -> float:
    """Median over repetitions of a_i / b_i (the samples of one repetition are adjacent in time)."""
    xs = [x / y for x, y in zip(a["samples_ms"], b["samples_ms"]) if y > 0]
    return statistics.median(xs) if xs else math.nan


def drop_samples(summary: dict) -> dict:
    """A summary without its raw samples (for compact tables)."""
    return {k: v for k, v in summary.items() if k != "samples_ms"}
