"""Top-level ops issued per optimizer step, counted with ``torch.profiler``.

torch wraps every ``Optimizer.step`` in a ``record_function`` named
``Optimizer.step#<class>.step``; the ops a step issues from Python are that record's direct
children in the profiler's CPU tree (ops called by ops are not counted again). torch's fused
AdamW issues 4 for 12 tensors in 2 groups (per group: ``_foreach_add_`` on the step counters and
``_fused_adamw_``). Target: a guarded FusedGuardedAdamW step issues at most 3x that.

    python -m benchmarks.op_count                      # cpu + foreach (+ triton, cuda on a GPU)
    python -m benchmarks.op_count --device cuda --steps 40 --json out.json

Each step of a profiled window is counted on its own: the guard's snapshot steps (a copy of
p, m, v every few dozen steps) issue more ops than the others, so min / median / max are
given, with the steps that took a snapshot. The guard needs ~20 records before it snapshots:
the default warm-up (30 steps) lets the window show one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import warnings
from collections import Counter

import torch

from benchmarks import interleave as il

TENSORS, GROUPS = 12, 2


def param_groups(device, dtype=torch.float32, numel: int = 4096) -> list[dict]:
    """12 tensors in 2 groups (6 matrices each), grads set."""
    params = il.make_params(TENSORS, numel, device, dtype, shapes=[(64, numel // 64)] * TENSORS)
    half = TENSORS // GROUPS
    return [{"params": params[i * half:(i + 1) * half], **({"lr": 3e-4} if i else {})} for i in range(GROUPS)]


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line per profiler start/stop on fd 2; keep the output readable."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def count_step_ops(opt, step, steps: int = 20, warmup: int = 30) -> dict:
    """Direct children of each ``Optimizer.step#...`` record over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    taken = snapshot_counter(opt)
    for _ in range(warmup):
        step()
    snap_steps = []
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            before = taken[0]
            step()
            if taken[0] != before:
                snap_steps.append(i)
    tops = [e for e in prof.events() if e.name.startswith("Optimizer.step#")]
    tops.sort(key=lambda e: e.time_range.start)
    counts = [len(e.cpu_children) for e in tops]
    if not counts:
        raise RuntimeError("no Optimizer.step# record in the profile (torch changed its step hook?)")
    typical_count = sorted(counts)[len(counts) // 2]
    typical = next(e for e, c in zip(tops, counts) if c == typical_count)
    return {
        "record": tops[0].name,
        "ops_min": min(counts), "ops_median": statistics.median(counts), "ops_max": max(counts),
        "ops_per_step": counts,
        "snapshot_steps": snap_steps,
        "ops_typical": dict(Counter(c.name for c in typical.cpu_children).most_common(12)),
    }


def count_device_ops(step, device: torch.device, steps: int = 5) -> dict:
    """GPU only: kernels, copies and memsets one step puts on the device, from a profile of
    that single step (synchronised before and after, so every device event is the step's).
    Triton's launches are no aten ops: they show up here, not among the top-level ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    counts, names = [], Counter()
    for _ in range(steps):
        torch.cuda.synchronize(device)
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        counts.append(len(dev))
        names = Counter(e.name[:60] for e in dev)
    return {"device_ops_median": statistics.median(counts), "device_ops_min": min(counts),
            "device_ops_max": max(counts), "device_ops_typical": dict(names.most_common(8))}


def snapshot_counter(opt) -> list[int]:
    """A one-element list counting the guard's snapshots from now on (wraps its ring's take)."""
    count = [0]
    guard = getattr(opt, "guard", None)
    ring = getattr(guard, "_ring", None) if guard is not None else None
    if ring is not None and hasattr(ring, "take"):
        orig = ring.take

        def take(*a, **k):
            count[0] += 1
            return orig(*a, **k)

        ring.take = take
    return count


def measure(device: torch.device, backends: list[str], steps: int = 20, warmup: int = 30) -> list[dict]:
    """Rows (group ``op-count``): torch fused AdamW, then each backend with guard None and default."""
    rows = []
    variants = ["torch-fused"] + [f"lbw-{b}{g}" for b in backends for g in ("", "+guard")]
    for name in variants:
        v = il.Variant.parse(name)
        row = {"group": "op-count", "case": f"{TENSORS} tensors / {GROUPS} groups", "tensors": TENSORS,
               "groups": GROUPS, "device": device.type, **v.fields()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt, step = il.build(v, param_groups(device))
                row.update(count_step_ops(opt, step, steps=steps, warmup=warmup))
            if device.type == "cuda":
                try:
                    row.update(count_device_ops(step, device))
                except Exception as exc:  # noqa: BLE001 - profiler differences across versions
                    row["device_ops_error"] = f"{type(exc).__name__}: {exc}"[:300]
        except il.Unavailable as exc:
            row["skipped"] = str(exc)
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "torch-fused" and "ops_median" in r), None)
    for r in rows:
        if base and "ops_median" in r:
            r["x_torch_fused"] = r["ops_median"] / base["ops_median"]
            r["x_torch_fused_max"] = r["ops_max"] / base["ops_median"]
    return rows


def default_backends(device: torch.device) -> list[str]:
    return ["cpu", "foreach"] if device.type == "cpu" else ["triton", "cuda", "foreach"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="", help="comma list (default: cpu,foreach on CPU; triton,cuda,foreach on GPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = [b for b in args.backends.split(",") if b] or default_backends(device)
    rows = measure(device, backends, steps=args.steps, warmup=args.warmup)
    print(f"torch {torch.__version__}, {device}, {TENSORS} tensors in {GROUPS} groups, {args.steps} profiled steps "
          f"after {args.warmup}")
    from benchmarks import render

    print(render.render_op_count({"results": rows}))
    for t in render.op_count_targets({"results": rows}):
        print(f"{t['variant']}: {t['target']} = {t['value']:.3g} (goal {t['goal']}: "
              f"{'met' if t['met'] else 'MISSED'}; {t['detail']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
