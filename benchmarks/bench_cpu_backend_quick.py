"""Throwaway timing of the CPU C++ backend against torch.optim.AdamW(fused=True) on CPU.

python benchmarks/bench_cpu_backend_quick.py [--numel 24000000] [--tensors 6] [--dtype float32]
Prints ms/step (best of several timeit repeats) for each; not a test, asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import timeit

import torch

from lbw_kernels import contract as C
from lbw_kernels.cpp_backend import load_cpp_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=24_000_000)
    ap.add_argument("--tensors", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isa", default=None, help="base / avx2 / avx512 (default: detected)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    n = args.numel // args.tensors
    T = args.tensors

    params = [torch.randn(n).to(dtype) for _ in range(T)]
    grads = [torch.randn(n).to(dtype) * 1e-2 for _ in range(T)]

    # torch fused AdamW on the same sizes (it needs its own params with .grad)
    tparams = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(tparams, grads):
        p.grad = g.clone()
    opt = torch.optim.AdamW(tparams, lr=1e-3, weight_decay=0.01, fused=True)
    opt.step()

    mod = load_cpp_module("cpu")
    if args.isa:
        mod.set_isa(args.isa)
    m = [torch.zeros(n) for _ in range(T)]
    v = [torch.zeros(n) for _ in range(T)]
    steps = [torch.tensor(1.0) for _ in range(T)]
    G = 2
    gids = [i % G for i in range(T)]
    f64 = lambda x: torch.full((G,), x, dtype=torch.float64)  # noqa: E731
    coeffs = C.coefficient_table(
        steps, torch.tensor(gids), f64(1e-3), f64(0.9), f64(0.999), f64(1e-8), f64(0.01),
        f64(1.0), 5.0,
    )
    one = torch.tensor(1.0)

    def ours():
        mod.fused_adamw(params, grads, m, v, coeffs, gids, G, one, one)

    ours()
    # Interleave the two so that load from other processes hits both alike; keep the best.
    runs = (("torch AdamW(fused=True)", opt.step), (f"lbw cpu ({mod.isa()})", ours))
    # Also CPU time of the process (all threads): less distorted than wall time when other
    # processes share the cores.
    results = {name: float("inf") for name, _ in runs}
    cpu = {name: float("inf") for name, _ in runs}
    for _ in range(args.repeats):
        for name, fn in runs:
            c0 = time.process_time()
            results[name] = min(results[name], timeit.timeit(fn, number=args.steps) / args.steps)
            cpu[name] = min(cpu[name], (time.process_time() - c0) / args.steps)
    bpp = 28 if dtype == torch.float32 else 24
    for name, t in results.items():
        gbs = args.numel * bpp / t / 1e9
        print(
            f"{name:28s} {t * 1e3:8.2f} ms/step  ({gbs:5.1f} GB/s at {bpp} B/param)"
            f"  cpu {cpu[name] * 1e3:8.2f} ms/step"
        )
    print(f"numel={args.numel} tensors={T} dtype={args.dtype} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
