"""Per-step wall time of a training step, with and without the guard: where the one-time stalls are.

    PYTHONPATH=. python -m benchmarks.step_stalls                  # GPU: Qwen2.5-0.5B shape, 50 steps each
    python -m benchmarks.step_stalls --tiny --steps 8              # CPU: a tiny model (checks the script)

Medians hide what a user sees once: the first guarded step (the start's copy), the first use of
each snapshot slot (page-locking its host memory). Each step here is synchronised and timed on
its own; the steps that took a snapshot are starred. The configurations run one after the other
on the same model (guard=None first), so the first one's first step also pays the process's
first kernel compiles.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from benchmarks.common import Spy
from benchmarks.gpu_validate import QWEN, QWEN_TINY, qwen_model


def step_times(model, tokens, guard, steps: int) -> tuple[list[float], list[int]]:
    """Milliseconds per step and snapshots taken per step, for a fresh optimizer."""
    from lbw_guard import FusedGuardedAdamW

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FusedGuardedAdamW(model.parameters(), lr=1e-5, weight_decay=0.01, guard=guard)
    spy = Spy(opt)
    cuda = tokens.device.type == "cuda"
    times, snaps = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start, before = time.perf_counter(), spy.snapshots
        opt.zero_grad(set_to_none=True)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step(loss=loss.detach())
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
        snaps.append(spy.snapshots - before)
    return times, snaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_stalls", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2 (the CPU check of this script)")
    ap.add_argument("--steps", type=int, default=50, help="steps per configuration (default 50)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        ap.error("no CUDA device here: use --tiny to check the script on the CPU")
    model = qwen_model(QWEN_TINY if args.tiny else QWEN, device)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32) if args.tiny else (4, 1024), device=device)
    n = sum(p.numel() for p in model.parameters())
    print(f"{device.type}, {n / 1e6:.3g}M params, {args.steps} steps per configuration", flush=True)
    for guard in (None, "default"):
        times, snaps = step_times(model, tokens, guard, args.steps)
        rest = sorted(times[1:]) or times
        print(f"guard={guard}: first step {times[0]:.0f} ms, then median {rest[len(rest) // 2]:.1f} ms, "
              f"max {max(rest):.0f} ms; snapshot steps (*):", flush=True)
        print("  " + " ".join(f"{t:.1f}{'*' if s else ''}" for t, s in zip(times, snaps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
