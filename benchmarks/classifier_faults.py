"""Faults injected into the small classifiers of :mod:`benchmarks.classifiers`: does the guard's
fault handling hold outside language models?

Each (task, batch size) trains at its best AdamW lr (``../classifiers/results.md``), once clean
and once per fault, with plain AdamW and with ``FusedGuardedAdamW`` from the same initialisation
on the same minibatches. The table gives each arm's held-out loss with the fault over its own
clean run (the fault target of issue 10: every run finite and within 10% of the clean run), and
the guard's rollbacks and skipped steps. The faults fire where the stress matrix's do
(``lbw_guard.experiments.faults``: two-step faults at 40% and 70% of the run, one-step faults at
50%, ``spike-early`` at the first and seventh steps); the loss and lr faults are this module's.

    python -m benchmarks.classifier_faults                        # 5 settings x 12 faults x 3 seeds (~1 min, 2 cores)
    python -m benchmarks.classifier_faults --settings mlp:16:3e-3 --faults spike-1e6,nan-grad --seeds 0

Writes ``results.json`` and ``results.md`` under ``--out``. CPU only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from lbw_guard.experiments.faults import EARLY_STEPS, ONE_STEP_FRACTION, SPIKE_FACTORS, TWO_STEP_FRACTIONS

from .classifiers import STEPS, train
from .sweep import numbers

FAULTS = {
    "spike-1e3": "every gradient x1e3 at 2 steps",
    "spike-1e4": "every gradient x1e4 at 2 steps",
    "spike-1e6": "every gradient x1e6 at 2 steps",
    "spike-early": "every gradient x1e4 at steps 1 and 7",
    "nan-grad": "one NaN gradient element (first tensor) at 2 steps",
    "inf-grad": "one inf gradient element (last tensor) at 2 steps",
    "nan-loss": "the loss passed to the step is NaN at 2 steps (gradients finite)",
    "zero-grad": "every gradient zero at 2 steps",
    "random-labels": "1 batch with uniformly random labels",
    "outlier-input": "1 batch of inputs x100",
    "nan-input": "1 batch with one NaN input element (a corrupted sample)",
    "lr-x100": "the lr x100 for 1 step (a scheduler bug)",
}
# The best AdamW lr of each setting of ../classifiers/results.md (3 seeds).
DEFAULT_SETTINGS = "cnn:16:1e-2,cnn:64:1e-2,cnn-bn:32:3e-3,mlp:16:3e-3,mlp:128:1e-3"
WITHIN = 0.10  # the fault target: within 10% of the clean run


def fault_steps(name: str, steps: int) -> frozenset[int]:
    """The 0-based steps at which ``name`` fires in a run of ``steps`` steps."""
    if name == "clean":
        return frozenset()
    if name == "spike-early":
        return frozenset(s for s in EARLY_STEPS if s < steps)
    if name in ("random-labels", "outlier-input", "nan-input", "lr-x100"):
        fractions = (ONE_STEP_FRACTION,)
    elif name in FAULTS:
        fractions = TWO_STEP_FRACTIONS
    else:
        raise ValueError(f"unknown fault {name!r}: use clean or one of {', '.join(FAULTS)}")
    return frozenset(min(steps - 1, int(f * steps)) for f in fractions)


@dataclass
class Fault:
    """Corrupts one classifier run at :func:`fault_steps` (the hooks :func:`benchmarks.classifiers.train`
    calls: ``batch`` before the forward pass, ``before_step`` between backward and the step)."""

    name: str
    steps: int
    seed: int

    def __post_init__(self) -> None:
        self.at = fault_steps(self.name, self.steps)

    def batch(self, step: int, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step in self.at and self.name == "random-labels":
            gen = torch.Generator().manual_seed(7919 * self.seed + step)
            labels = torch.randint(0, int(labels.max()) + 1, labels.shape, generator=gen)
        if step in self.at and self.name == "outlier-input":
            inputs = inputs * 100
        if step in self.at and self.name == "nan-input":
            inputs = inputs.clone()
            inputs.view(-1)[0] = math.nan
        return inputs, labels

    @torch.no_grad()
    def before_step(self, step: int, model: torch.nn.Module, opt, lr: float, loss: torch.Tensor) -> torch.Tensor:
        """Corrupts the gradients or the lr of this step; returns the loss the step is given."""
        if self.name == "lr-x100":  # set every step, so the step after the fault is back at ``lr``
            for group in opt.param_groups:
                group["lr"] = lr * (100 if step in self.at else 1)
        if step not in self.at:
            return loss
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self.name in SPIKE_FACTORS:
            for g in grads:
                g.mul_(SPIKE_FACTORS[self.name])
        elif self.name == "nan-grad":
            grads[0].view(-1)[0] = math.nan
        elif self.name == "inf-grad":
            grads[-1].view(-1)[0] = math.inf
        elif self.name == "zero-grad":
            for g in grads:
                g.zero_()
        elif self.name == "nan-loss":
            return torch.full_like(loss, math.nan)
        return loss


def run_key(task: str, batch: int, arm: str, fault: str, seed: int) -> str:
    return f"{task}|{batch}|{arm}|{fault}|{seed}"


def _one(job: tuple) -> tuple[str, dict]:
    task, batch, lr, arm, fault, seed, steps, backend = job
    torch.set_num_threads(1)
    plan = None if fault == "clean" else Fault(fault, steps, seed)
    return run_key(task, batch, arm, fault, seed), train(task, batch, arm, lr, seed, steps, backend, plan)


def ratios(runs: dict, task: str, batch: int, arm: str, fault: str, seeds: list[int]) -> list[float]:
    """Per seed, the fault run's held-out loss over the same arm's clean run (inf if not finite)."""
    return [runs[run_key(task, batch, arm, fault, s)]["final_loss"] / runs[run_key(task, batch, arm, "clean", s)]["final_loss"]
            for s in seeds]


def table(runs: dict, settings: list[tuple[str, int, float]], faults: list[str], seeds: list[int]) -> str:
    def cell(r: list[float]) -> str:
        return f"{statistics.fmean(r):.3f} / {max(r):.3f}" if all(map(math.isfinite, r)) else \
            f"{sum(map(math.isfinite, r))} of {len(r)} finite"

    def mean_steps(guard: list[dict], field: str) -> float:
        return statistics.fmean(g[field] * g["steps"] for g in guard)

    met = {"guard": 0, "adamw": 0}
    lines = ["| task | batch | lr | fault | guard: fault / clean (mean / worst) | AdamW: fault / clean (mean / worst) "
             "| guard rollbacks (mean) | guard steps skipped / partly skipped (mean) |", "|---|---|---|---|---|---|---|---|"]
    for task, batch, lr in settings:
        for fault in faults:
            row = {arm: ratios(runs, task, batch, arm, fault, seeds) for arm in met}
            for arm, r in row.items():
                met[arm] += sum(1 for v in r if v <= 1 + WITHIN)
            guard = [runs[run_key(task, batch, "guard", fault, s)] for s in seeds]
            lines.append(f"| {task} | {batch} | {lr:g} | {fault} | {cell(row['guard'])} | {cell(row['adamw'])} | "
                         f"{statistics.fmean(g['rollbacks'] for g in guard):.1f} | "
                         f"{mean_steps(guard, 'skipped_fraction'):.1f} / {mean_steps(guard, 'partly_skipped_fraction'):.1f} |")
    n = len(settings) * len(faults) * len(seeds)
    lines += ["", f"Fault runs finite and within {WITHIN:.0%} of their clean run: guard {met['guard']} of {n}, "
              f"plain AdamW {met['adamw']} of {n}."]
    return "\n".join(lines)


def run(settings: list[tuple[str, int, float]], faults: list[str], seeds: list[int], out: pathlib.Path,
        steps: dict | None = None, backend: str = "cpu", workers: int = 2, progress: bool = True) -> dict:
    """Every (setting, arm, fault or clean, seed); writes ``results.json`` and ``results.md`` under
    ``out`` and returns the runs by key."""
    steps = {**STEPS, **(steps or {})}
    jobs = [(task, batch, lr, arm, fault, seed, steps[task], backend) for task, batch, lr in settings
            for fault in ("clean", *faults) for seed in seeds for arm in ("adamw", "guard")]
    runs, start = {}, time.time()
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        for done, (key, r) in enumerate((pool.map if pool else map)(_one, jobs), 1):
            runs[key] = r
            if progress:
                print(f"[{done}/{len(jobs)} {time.time() - start:.0f}s] {key}: held-out {r['final_loss']:.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "faults in the small classifiers: each arm's fault runs against its clean run",
           "torch": torch.__version__, "backend": backend, "faults": {f: FAULTS[f] for f in faults},
           "settings": [list(s) for s in settings], "steps": {task: steps[task] for task, _, _ in settings},
           "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(table(runs, settings, faults, seeds) + "\n")
    return runs


def _settings(p: argparse.ArgumentParser, text: str) -> list[tuple[str, int, float]]:
    """``task:batch:lr`` triples from a comma list."""
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        parts = item.split(":")
        task, batch, lr = parts if len(parts) == 3 else ("", "", "")
        try:
            value = float(lr)
        except ValueError:
            value = math.nan
        if task not in STEPS or not batch.isdigit() or int(batch) < 1 or not (math.isfinite(value) and value > 0):
            p.error(f"--settings: {item!r} is not TASK:BATCH:LR with TASK one of {', '.join(STEPS)}, "
                    "BATCH >= 1 and LR above 0")
        out.append((task, int(batch), value))
    if not out or len({s[:2] for s in out}) != len(out):
        p.error("--settings: give distinct TASK:BATCH pairs, each with one lr")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma list of TASK:BATCH:LR, TASK one of {', '.join(STEPS)} (default: each setting's best lr)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma list from {', '.join(FAULTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backend", default="cpu", choices=("cpu", "torch"), help="the guarded optimizer's backend")
    p.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    p.add_argument("--out", default="benchmarks/results/classifier-faults")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    settings = _settings(p, args.settings)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not faults or any(f not in FAULTS for f in faults) or len(set(faults)) != len(faults):
        p.error(f"--faults: give distinct names from {', '.join(FAULTS)}")
    if args.workers < 1:
        p.error("--workers: give 1 or more")
    seeds = numbers(p, "--seeds", args.seeds, int)
    out = pathlib.Path(args.out)
    run(settings, faults, seeds, out, backend=args.backend, workers=args.workers, progress=not args.no_progress)
    print((out / "results.md").read_text(), end="")


if __name__ == "__main__":
    main()
