"""Step time of the CPU C++ backend against torch.optim.AdamW(fused=True), as ratios measured
in one process with interleaved repetitions (medians).

    python benchmarks/cpu_step_ratio.py                      # 24M fp32 in 6 tensors, and 1M
    python benchmarks/cpu_step_ratio.py --cases 24Mx6 --reps 40 --dtype bf16

Variants (all through lbw_kernels.cpp_step.cpu_step, one custom op per step):

- ``off``:  the guard's per-element work off (SPIKE_K inf, MASK_NONFINITE 0, no loss check);
- ``on``:   the guard's per-element work on (SPIKE_K 10, CLAMP 1, MASK_NONFINITE 1, loss checked);
- ``clip``: max_grad_norm=1.0: cpu_grad_norm_sq pre-pass + the step with the clip coefficient,
  against torch fused AdamW + torch.nn.utils.clip_grad_norm_(max_norm=1.0).

Targets (brief): off <= 1.0x fused at 24M, on <= 1.05x off, off <= 1.2x fused at 1M, clip
>= 1.2x faster than fused + clip_grad_norm_ (the byte count caps it at 40/32 = 1.25x).
Not a test: timings vary from run to run on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from lbw_kernels import contract as C
from lbw_kernels.cpp_step import cpu_grad_norm_sq, cpu_step

CASES = {"1M": (1, 1 << 20), "16M": (1, 1 << 24), "24Mx6": (6, 1 << 22), "1000x64K": (1000, 1 << 16)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_tensors(num: int, numel: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(numel, generator=gen).to(dtype) for _ in range(num)]
    grads = [(torch.randn(numel, generator=gen) * 1e-2).to(dtype) for _ in range(num)]
    return params, grads


def control_table(guard: bool, clip: bool) -> torch.Tensor:
    control = torch.zeros(2, C.NUM_CONTROL, dtype=torch.float64)
    control[0, C.LR] = 1e-3
    control[0, C.SCALE] = 1.0
    control[0, C.GATE] = 1.0
    control[0, C.BETA1] = 0.9
    control[0, C.BETA2] = 0.999
    control[0, C.EPS] = 1e-8
    control[0, C.WEIGHT_DECAY] = 0.01
    control[0, C.SPIKE_K] = 10.0 if guard else math.inf
    control[0, C.CLAMP] = 1.0 if guard else 0.0
    control[1, C.LOSS_LIMIT] = 1e4 if guard else math.inf
    control[1, C.CHECK_LOSS] = 1.0 if guard else 0.0
    control[1, C.GRAD_NORM_LIMIT] = math.inf
    control[1, C.MAX_GRAD_NORM] = 1.0 if clip else 0.0
    control[1, C.MASK_NONFINITE] = 1.0 if guard else 0.0
    return control


class Ours:
    def __init__(self, num, numel, dtype, guard: bool, clip: bool):
        self.params, self.grads = make_tensors(num, numel, dtype, 1)
        self.m = [torch.zeros(numel) for _ in range(num)]
        self.v = [torch.zeros(numel) for _ in range(num)]
        self.steps = [torch.zeros(()) for _ in range(num)]
        self.gids = [0] * num
        self.kinds = [1] * num
        self.control = control_table(guard, clip)
        self.tensor_out = torch.zeros(num, C.NUM_TENSOR_FIELDS, dtype=torch.float64)
        self.record = torch.zeros(C.record_layout(1).size, dtype=torch.float64)
        self.loss = torch.tensor(2.5) if guard else None
        self.clip = clip

    def step(self):
        grad_norm = cpu_grad_norm_sq(self.grads).sqrt_() if self.clip else None
        cpu_step(self.params, self.grads, self.m, self.v, self.steps, self.gids, self.kinds,
                 self.control, self.tensor_out, self.record, loss=self.loss, grad_norm=grad_norm)


class TorchFused:
    def __init__(self, num, numel, dtype, clip: bool):
        params, grads = make_tensors(num, numel, dtype, 2)
        self.params = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.01, fused=True)
        self.clip = clip

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(name: str, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    num, numel = CASES[name]
    runners = {
        "torch_fused": TorchFused(num, numel, dtype, clip=False),
        "off": Ours(num, numel, dtype, guard=False, clip=False),
        "on": Ours(num, numel, dtype, guard=True, clip=False),
        "torch_fused+clip": TorchFused(num, numel, dtype, clip=True),
        "clip": Ours(num, numel, dtype, guard=False, clip=True),
    }
    times = {k: [] for k in runners}
    keys = list(runners)
    for _ in range(warmup):
        for k in keys:
            runners[k].step()
    for r in range(reps):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate: no fixed neighbour
        for k in order:
            times[k].append(timed(runners[k].step))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}

    def ratios(t):
        return {
            "off/fused": t["off"] / t["torch_fused"],
            "on/fused": t["on"] / t["torch_fused"],
            "on/off": t["on"] / t["off"],
            "speedup clip": t["torch_fused+clip"] / t["clip"],
        }

    return {"ms": med, "min_ms": best, "median": ratios(med), "min": ratios(best)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="24Mx6,1M", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per variant (default: by size)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_step  # noqa: B018 - loaded (and compiled) on first use
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}")
    for name in args.cases.split(","):
        num, numel = CASES[name]
        reps = args.reps or max(15, min(300, int(3e8 // (num * numel))))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        res = run_case(name, DTYPES[args.dtype], reps, warmup=3)
        print(f"{name} ({num} x {numel}, {reps} reps, load average {load:.2f}):")
        for label, key in (("median", "ms"), ("min", "min_ms")):
            ms = "  ".join(f"{k} {v:.3f}" for k, v in res[key].items())
            r = res[label]
            print(f"  {label:6s} ms/step: {ms}")
            print(f"  {label:6s} off/fused {r['off/fused']:.3f}  on/fused {r['on/fused']:.3f}  on/off {r['on/off']:.3f}  "
                  f"clip speed-up vs fused+clip_grad_norm_ {r['speedup clip']:.3f}")


if __name__ == "__main__":
    main()
