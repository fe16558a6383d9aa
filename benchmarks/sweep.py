"""What the AdamW-against-the-guard lr sweeps (``lowloss_finetune``, ``classifiers``) share: their
comma-list arguments, the guard's accounting kept per run, their progress lines, and the per-lr
comparison their tables print."""
from __future__ import annotations

import argparse
import math
import statistics
import time

# "steps": the steps the guard accounted, the denominator of its fractions
GUARD_FIELDS = ("steps", "capped_fraction", "skipped_fraction", "partly_skipped_fraction", "mean_scale", "rollbacks",
                "actions")


def guard_accounting(opt) -> dict:
    """The fields of ``opt.guard.summary()`` a sweep keeps per guard run."""
    summary = opt.guard.summary()
    return {k: summary[k] for k in GUARD_FIELDS}


def progress_line(done: int, total: int, start: float, what: str, arm: str, lr: float, run: dict) -> str:
    """One finished run of a sweep (``what`` names its setting and seed); the guard's adds its
    rollbacks and the share of capped steps."""
    guard = f", rollbacks {run['rollbacks']}, capped {run['capped_fraction']:.0%}" if arm == "guard" else ""
    return (f"[{done}/{total} {time.time() - start:.0f}s] {what} {arm} lr {lr:g}: "
            f"held-out {run['final_loss']:.4f}{guard}")


def per_lr(runs: dict, key, lrs: list[float], seeds: list[int]) -> tuple[list[tuple], float]:
    """One setting's comparison: per lr, ``(lr, AdamW's mean loss, the guard's loss over AdamW's
    averaged seed by seed, guard runs rolled back, the guard's mean capped fraction)``, and the lr
    of AdamW's lowest mean loss. ``key(arm, lr, seed)`` names a run in ``runs``."""
    adamw = {lr: statistics.fmean(runs[key("adamw", lr, s)]["final_loss"] for s in seeds) for lr in lrs}
    rows = []
    for lr in lrs:
        guard = [runs[key("guard", lr, s)] for s in seeds]
        ratio = statistics.fmean(g["final_loss"] / runs[key("adamw", lr, s)]["final_loss"]
                                 for g, s in zip(guard, seeds))
        rows.append((lr, adamw[lr], ratio, sum(1 for g in guard if g["rollbacks"]),
                     statistics.fmean(g["capped_fraction"] for g in guard)))
    return rows, min(adamw, key=adamw.get)


def per_lr_lines(runs: dict, key, lrs: list[float], seeds: list[int], prefix: str, digits: int) -> list[str]:
    """One setting's table rows: ``prefix`` (the setting's own columns), then per lr the lr (the
    best marked), AdamW's mean loss, the guard's ratio to ``digits`` places, the guard runs
    rolled back and its mean capped fraction. ``key`` as in :func:`per_lr`."""
    rows, best = per_lr(runs, key, lrs, seeds)
    return [f"{prefix} {lr:g}{' (best)' if lr == best else ''} | {adamw:.4f} | {ratio:.{digits}f} | "
            f"{rolled_back} of {len(seeds)} | {capped:.0%} |" for lr, adamw, ratio, rolled_back, capped in rows]


def numbers(p: argparse.ArgumentParser, option: str, text: str, kind=float) -> list:
    """Distinct values from a comma list: floats above 0, or integers from 0."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{option}: {text!r} is not a comma list of numbers")
    in_range = (lambda v: v >= 0) if kind is int else (lambda v: math.isfinite(v) and v > 0)
    if not values or not all(map(in_range, values)) or len(set(values)) != len(values):
        p.error(f"{option}: give distinct values, " + ("0 or more" if kind is int else "above 0"))
    return values
