"""The CPU targets of "One pass, few launches, GPU-ready", measured as ratios in one process.

    python -m benchmarks.cpu_targets                         # ~1-2 min on 2 cores; prints the table
    python -m benchmarks.cpu_targets --merge benchmarks/results/cpu-2026-11-21.json
    python -m benchmarks.cpu_targets --quick --results none  # a smoke run

Every variant goes through ``FusedGuardedAdamW.step()`` / ``torch.optim.AdamW.step()`` (the
whole step, host side included), each on its own tensors, interleaved (see
:mod:`benchmarks.interleave`); the figure is the median over repetitions:

- ``24Mx6`` (24M fp32 params in 6 tensors): ``lbw-cpu`` (guard=None) <= 1.0x
  ``torch-fused``; ``lbw-cpu+guard`` (guard="default", the loss passed) <= 1.05x ``lbw-cpu``;
  ``lbw-cpu+clip`` (max_grad_norm=1.0) >= 1.2x faster than ``torch-fused+clip``
  (``clip_grad_norm_`` then fused AdamW; the byte count caps it at 40/32 = 1.25x);
- ``1M`` (one tensor of 2^20): ``lbw-cpu`` <= 1.2x ``torch-fused``;
- each case is measured in ``--repeat`` (3) independent runs, pooled; each run's median is kept
  (``run_ms``), so the tables show the ratio's spread from run to run next to the pooled one;
- host time per step over a Qwen2-shaped list of 290 small tensors: wall time, time inside
  the optimizer's kernel op(s), and the rest (Python and dispatch), for torch fused AdamW,
  ``lbw-cpu`` and ``lbw-cpu+guard``;
- top-level ops per step (:mod:`benchmarks.op_count`): 12 tensors in 2 groups, guard None and
  default, backends cpu and foreach, against torch fused AdamW (guarded <= 3x).

The guard's snapshots (a copy of p, m, v every 5-25 steps, spaced to cost ~2% of the run) fall
inside the timed window: the median is a step without one, the mean includes them; both are
reported, with the number of snapshots in the window. Warm-up runs 25 steps so that the guard
has left its warm-up (20 records) and its per-element bound is on (after 10).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import envinfo, op_count
from benchmarks import interleave as il

CASES = {"24Mx6": (6, 4_000_000), "1M": (1, 1 << 20)}
VARIANTS = ("torch-fused", "lbw-cpu", "lbw-cpu+guard", "torch-fused+clip", "lbw-cpu+clip")
HOST_VARIANTS = ("torch-fused", "lbw-cpu", "lbw-cpu+guard")
GROUPS = ("optimizer-step-interleaved", "host-time", "op-count")


def _reps(numel: int, quick: bool) -> int:
    if quick:
        return 6
    return 60 if numel > 4_000_000 else 300


def measure_case(name: str, *, quick: bool = False, dtype=torch.float32, backend: str = "cpu",
                 log=print) -> list[dict]:
    """Interleaved timing rows (group ``optimizer-step-interleaved``) of one case."""
    count, numel = CASES[name]
    device = torch.device("cpu")
    loss = torch.full((), 2.5)
    steps, opts, rows, spies = {}, {}, [], {}
    variants = [v.replace("lbw-cpu", f"lbw-{backend}") for v in VARIANTS]
    for i, v in enumerate(variants):
        params = il.make_params(count, numel, device, dtype, seed=i)
        try:
            opts[v], steps[v] = il.build(v, params, loss=loss)
        except il.Unavailable as exc:
            rows.append({"group": "optimizer-step-interleaved", "case": name, "skipped": str(exc),
                         **il.Variant.parse(v).fields()})
    for v, opt in opts.items():
        spies[v] = op_count.snapshot_counter(opt)
    reps = _reps(count * numel, quick)
    warmup = 3 if quick else 25
    load0 = envinfo.loadavg()
    t0 = time.perf_counter()
    res = il.interleave(steps, device, reps=reps, warmup=warmup)
    log(f"  {name}: {reps} reps x {len(steps)} variants in {time.perf_counter() - t0:.1f} s (load {load0})")
    for v, r in res.items():
        rows.append({"group": "optimizer-step-interleaved", "case": name, "numel": count * numel, "tensors": count,
                     "dtype": "fp32" if dtype == torch.float32 else str(dtype).split(".")[-1],
                     **il.Variant.parse(v).fields(), **r, "snapshots": spies[v][0], "threads": torch.get_num_threads(),
                     "warmup_steps": warmup, "load_avg_start": load0, "load_avg_end": envinfo.loadavg()})
    return rows


def measure_case_repeated(name: str, repeat: int, *, quick: bool = False, log=print) -> list[dict]:
    """``repeat`` independent runs of :func:`measure_case` (fresh tensors and optimizers each),
    pooled: the samples of every run together give the medians; ``run_ms`` keeps each run's
    median, so the spread from run to run shows next to the pooled ratio."""
    runs = [measure_case(name, quick=quick, log=log) for _ in range(max(1, repeat))]
    if len(runs) == 1:
        for r in runs[0]:
            if "ms_per_step" in r:
                r["run_ms"] = [r["ms_per_step"]]
        return runs[0]
    out = []
    for first in runs[0]:
        if "ms_per_step" not in first:
            out.append(first)
            continue
        same = [r for run in runs for r in run if r.get("variant") == first["variant"] and "ms_per_step" in r]
        samples = [x for r in same for x in r["samples_ms"]]
        pooled = il.summarize([x / 1e3 for x in samples], [], first["steps_per_rep"])
        out.append({**first, **{k: v for k, v in pooled.items() if k != "host_ms_per_step"},
                    "run_ms": [r["ms_per_step"] for r in same], "runs": len(same),
                    "snapshots": sum(r.get("snapshots", 0) for r in same),
                    "load_avg_end": same[-1].get("load_avg_end")})
    return out


def measure_host_time(*, quick: bool = False, backend: str = "cpu", log=print) -> list[dict]:
    """Host time per step over 290 small tensors: wall, inside the kernel op(s), the rest."""
    device = torch.device("cpu")
    shapes = il.transformer_like_shapes(layers=24, hidden=32, vocab=512)
    numel = sum(torch.Size(s).numel() for s in shapes)
    loss = torch.full((), 2.5)
    clock = KernelClock()
    steps, rows = {}, []
    variants = [v.replace("lbw-cpu", f"lbw-{backend}") for v in HOST_VARIANTS]
    for i, v in enumerate(variants):
        params = il.make_params(0, 0, device, seed=i, shapes=shapes)
        try:
            opt, step = il.build(v, params, loss=loss)
        except il.Unavailable as exc:
            rows.append({"group": "host-time", "case": "qwen-like-290", "skipped": str(exc),
                         **il.Variant.parse(v).fields()})
            continue
        if not isinstance(opt, torch.optim.AdamW):
            clock.wrap_backends(opt)
        steps[v] = clock.tracked(step, v)
    reps = 20 if quick else 400
    with clock.torch_fused():
        res = il.interleave(steps, device, reps=reps, warmup=3 if quick else 25)
    for v, r in res.items():
        n = r["reps"]
        ker = clock.per_step[v][-n:]
        host = [w - k * 1e3 for w, k in zip(r["samples_ms"], ker)]
        rows.append({"group": "host-time", "case": "qwen-like-290", "tensors": len(shapes), "numel": numel,
                     "dtype": "fp32", **il.Variant.parse(v).fields(), "wall_ms": r["ms_per_step"],
                     "kernel_ms": statistics.median(ker) * 1e3 if ker else None,
                     "host_ms": statistics.median(host) if host else None, "reps": n,
                     "threads": torch.get_num_threads()})
    log(f"  host time: {len(shapes)} tensors, {numel / 1e6:.2f}M params, {reps} reps")
    return rows


class KernelClock:
    """Wall time spent inside the optimizers' kernel ops, per step of each named step callable:
    our backends' step functions, torch's ``torch._fused_adamw_``."""

    def __init__(self):
        self.total = 0.0
        self.per_step: dict[str, list[float]] = {}

    def _timed(self, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t0
        return run

    def tracked(self, step, name: str):
        sink = self.per_step.setdefault(name, [])

        def run():
            before = self.total
            step()
            sink.append(self.total - before)
        return run

    def wrap_backends(self, opt) -> None:
        """FusedGuardedAdamW looks its backend up per step in ``_backends``: wrap the entries."""
        for key, backend in list(opt._backends.items()):
            opt._backends[key] = dataclasses.replace(backend, step=self._timed(backend.step))

    @contextlib.contextmanager
    def torch_fused(self):
        """torch's fused AdamW looks ``torch._fused_adamw_`` up at call time: time it there."""
        orig = torch._fused_adamw_
        torch._fused_adamw_ = self._timed(orig)
        try:
            yield
        finally:
            torch._fused_adamw_ = orig


def measure_all(*, quick: bool = False, cases=("24Mx6", "1M"), op_counts: bool = True, host: bool = True,
                repeat: int = 3, log=print) -> list[dict]:
    rows = []
    for c in cases:
        rows += measure_case_repeated(c, repeat, quick=quick, log=log)
    if host:
        rows += measure_host_time(quick=quick, log=log)
    if op_counts:
        rows += op_count.measure(torch.device("cpu"), ["cpu", "foreach"], steps=10 if quick else 20,
                                 warmup=5 if quick else 30)
    return rows


def document(rows: list[dict], load_start, note: str = "", quick: bool = False) -> dict:
    return {"schema": 2, "kind": "cpu-targets", **envinfo.header(torch.device("cpu")),
            "sizes": {"preset": "quick" if quick else "targets",
                      "cases": [{"name": n, "tensors": c, "numel_each": e, "numel": c * e} for n, (c, e) in CASES.items()]},
            "note": note, "load_avg": {"start": load_start, "end": envinfo.loadavg()}, "results": rows}


def merge_into(path: Path, rows: list[dict], load) -> None:
    """Replace this module's groups in an existing results file by ``rows``."""
    doc = json.loads(path.read_text())
    doc["results"] = [r for r in doc.get("results", []) if r.get("group") not in GROUPS] + rows
    doc.setdefault("targets_load_avg", load)
    doc["targets_load_avg"] = load
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None) -> int:
    from benchmarks import render

    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_targets", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, not a measurement")
    ap.add_argument("--cases", default="24Mx6,1M")
    ap.add_argument("--no-host", action="store_true")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=None, help="independent runs per case, pooled (default 3; 1 with --quick)")
    ap.add_argument("--results", default="auto",
                    help="results JSON: a path, 'auto' (benchmarks/results/cpu-targets-<date>.json) or 'none'")
    ap.add_argument("--merge", type=Path, help="replace the targets rows of this results file instead")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = envinfo.loadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {envinfo.cpu_model()}, load {load0}",
          flush=True)
    rows = measure_all(quick=args.quick, cases=[c for c in args.cases.split(",") if c], op_counts=not args.no_ops,
                       host=not args.no_host,
                       repeat=args.repeat or (1 if args.quick else 3), log=lambda m: print(m, flush=True))
    doc = document(rows, load0, args.note, args.quick)
    print(render.render_markdown(doc))
    if args.merge:
        merge_into(args.merge, rows, doc["load_avg"])
        print(f"merged into {args.merge}")
    elif args.results != "none":
        path = Path(args.results) if args.results != "auto" else envinfo.RESULTS_DIR / f"cpu-targets-{doc['date']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
