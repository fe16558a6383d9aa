"""Small classifiers trained with small minibatches: where the guard stands outside language models.

Three tasks with synthetic data (fixed by the seed, nothing downloaded): ``cnn``, one 3x3
convolution and a linear layer on a 2-class pattern in 12x12 noise images; ``cnn-bn``, two
convolutions with BatchNorm on a 4-class pattern in 3x16x16 images; ``mlp``, a 3-layer GELU MLP
on a 10-class noisy linear teacher. Each (task, batch size, lr, seed) is trained with plain AdamW
and with ``FusedGuardedAdamW`` from the same initialisation on the same minibatches; the table
gives, per lr, AdamW's cross-entropy on held-out samples, the guard's against it, its rollbacks
(the overshoot's return to the start counts as one) and the share of steps it capped. The lr
with AdamW's lowest loss is marked: the guard should match AdamW there and below it.

    python -m benchmarks.classifiers                               # 5 settings x 5 lrs x 3 seeds (~40 s, 1 core)
    python -m benchmarks.classifiers --settings cnn:64 --lrs 1e-2,3e-2 --seeds 0
    python -m benchmarks.classifiers --schedule warmup-cosine --out benchmarks/results/classifiers/warmup-cosine

Writes ``results.json`` and ``results.md`` under ``--out``. CPU only.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .sweep import guard_accounting, numbers, per_lr_lines, progress_line

SAMPLES = 1024  # training samples per task; as many again are held out
STEPS = {"cnn": 80, "cnn-bn": 150, "mlp": 200}


def task_data(task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2 x SAMPLES inputs and labels (the first half trains, the second is held out)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * SAMPLES
    if task == "cnn":  # which half of the image is brighter
        x = torch.randn(n, 1, 12, 12, generator=gen)
        y = (x[:, :, :6].mean((1, 2, 3)) > x[:, :, 6:].mean((1, 2, 3))).long()
    elif task == "cnn-bn":  # two bits: top-left against bottom-right, and the first channel's sign
        x = torch.randn(n, 3, 16, 16, generator=gen)
        y = 2 * (x[:, :, :8, :8].mean((1, 2, 3)) > x[:, :, 8:, 8:].mean((1, 2, 3))).long() \
            + (x[:, 0].mean((1, 2)) > 0).long()
    elif task == "mlp":  # the arg max of a noisy linear teacher
        x = torch.randn(n, 32, generator=gen)
        teacher = torch.randn(32, 10, generator=gen)
        y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=gen)).argmax(1)
    else:
        raise ValueError(f"unknown task {task!r}: use {', '.join(STEPS)}")
    return x, y


def build_model(task: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if task == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 2))
    if task == "cnn-bn":
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 4, 4))
    if task == "mlp":
        return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    raise ValueError(f"unknown task {task!r}: use {', '.join(STEPS)}")


SCHEDULES = ("constant", "cosine", "warmup-cosine", "onecycle", "warm-restarts", "step")


def make_schedule(name: str, opt, steps: int):
    """The lr scheduler ``name`` over a run of ``steps`` (stepped after every optimizer step), or
    None for a constant lr."""
    sched = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, steps)
    if name == "warmup-cosine":  # a linear warm-up from 1% over the first 10% of the run
        warm = max(1, steps // 10)
        return sched.SequentialLR(opt, [sched.LinearLR(opt, 0.01, 1.0, warm),
                                        sched.CosineAnnealingLR(opt, max(1, steps - warm))], [warm])
    if name == "onecycle":
        return sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps)
    if name == "warm-restarts":  # 4 cosine cycles, no warm-up
        return sched.CosineAnnealingWarmRestarts(opt, T_0=max(1, steps // 4))
    if name == "step":
        return sched.StepLR(opt, max(1, steps // 3), 0.3)
    raise ValueError(f"unknown schedule {name!r}: use {', '.join(SCHEDULES)}")


def run_key(task: str, batch: int, arm: str, lr: float, seed: int) -> str:
    return f"{task}|{batch}|{arm}|{lr}|{seed}"


def train(task: str, batch: int, arm: str, lr: float, seed: int, steps: int, backend: str, fault=None,
          schedule: str = "constant") -> dict:
    """``steps`` of ``arm`` ("adamw" or "guard") under the lr ``schedule`` (peak ``lr``); the
    held-out loss (and the guard's accounting). ``fault`` (a
    :class:`benchmarks.classifier_faults.Fault`) corrupts the run at its steps."""
    from lbw_guard import FusedGuardedAdamW

    x, y = task_data(task, seed)
    model = build_model(task, seed)
    guarded = arm == "guard"
    opt = (FusedGuardedAdamW(model.parameters(), lr=lr, backend=backend) if guarded
           else torch.optim.AdamW(model.parameters(), lr=lr))
    if guarded:
        opt.guard.watch_buffers(model)  # BatchNorm's running statistics go with skips and rollbacks
    scheduler = make_schedule(schedule, opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)  # the same minibatches for both arms
    model.train()
    for step in range(steps):
        i = torch.randint(0, SAMPLES, (batch,), generator=gen)
        inputs, labels = (x[i], y[i]) if fault is None else fault.batch(step, x[i], y[i])
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        seen = loss.detach()
        if fault is not None:
            seen = fault.before_step(step, model, opt, lr, seen)
        opt.step(loss=seen) if guarded else opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(x[SAMPLES:]), y[SAMPLES:]).item()
    out = {"final_loss": final if math.isfinite(final) else math.inf}
    if guarded:
        out.update(guard_accounting(opt))
    return out


def table(runs: dict, settings: list[tuple[str, int]], lrs: list[float], seeds: list[int]) -> str:
    lines = ["| task | batch | lr | AdamW held-out loss | guard / AdamW | guard runs rolled back | guard capped (mean) |",
             "|---|---|---|---|---|---|---|"]
    for task, batch in settings:
        lines += per_lr_lines(runs, lambda arm, lr, s: run_key(task, batch, arm, lr, s), lrs, seeds,
                              f"| {task} | {batch} |", digits=3)
    return "\n".join(lines)


def run(settings: list[tuple[str, int]], lrs: list[float], seeds: list[int], out: pathlib.Path,
        steps: dict | None = None, backend: str = "cpu", progress: bool = True, schedule: str = "constant") -> dict:
    """AdamW and the guard for every (task, batch, lr, seed); writes ``results.json`` and
    ``results.md`` under ``out`` and returns the runs by key."""
    torch.set_num_threads(1)
    steps = {**STEPS, **(steps or {})}
    runs = {}
    total, done, start = len(settings) * len(lrs) * len(seeds) * 2, 0, time.time()
    for task, batch in settings:
        for lr in lrs:
            for seed in seeds:
                for arm in ("adamw", "guard"):
                    r = runs[run_key(task, batch, arm, lr, seed)] = train(task, batch, arm, lr, seed, steps[task],
                                                                          backend, schedule=schedule)
                    done += 1
                    if progress:
                        print(progress_line(done, total, start, f"{task} batch {batch} seed {seed}", arm, lr, r),
                              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "small classifiers: AdamW and the guard from the same initialisation and minibatches",
           "torch": torch.__version__, "backend": backend, "schedule": schedule, "samples": SAMPLES,
           "steps": {task: steps[task] for task, _ in settings}, "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(table(runs, settings, lrs, seeds) + "\n")
    return runs


def _settings(p: argparse.ArgumentParser, text: str) -> list[tuple[str, int]]:
    """``task:batch`` pairs from a comma list."""
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        task, _, batch = item.partition(":")
        if task not in STEPS or not batch.isdigit() or int(batch) < 1:
            p.error(f"--settings: {item!r} is not TASK:BATCH with TASK one of {', '.join(STEPS)} and BATCH >= 1")
        out.append((task, int(batch)))
    if not out or len(set(out)) != len(out):
        p.error("--settings: give distinct TASK:BATCH pairs")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="cnn:16,cnn:64,cnn-bn:32,mlp:16,mlp:128",
                   help=f"comma list of TASK:BATCH, TASK one of {', '.join(STEPS)}")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backend", default="cpu", choices=("cpu", "torch"), help="the guarded optimizer's backend")
    p.add_argument("--schedule", default="constant", choices=SCHEDULES, help="the lr schedule (peak: each --lrs value)")
    p.add_argument("--out", default="benchmarks/results/classifiers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    settings = _settings(p, args.settings)
    lrs = numbers(p, "--lrs", args.lrs)
    seeds = numbers(p, "--seeds", args.seeds, int)
    out = pathlib.Path(args.out)
    run(settings, lrs, seeds, out, backend=args.backend, progress=not args.no_progress, schedule=args.schedule)
    print((out / "results.md").read_text(), end="")


if __name__ == "__main__":
    main()
