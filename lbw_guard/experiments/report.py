"""Turn a sweep's runs into the results table, verdicts, a JSON document and a markdown report."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

from .arms import parse_arm
from .train import RunResult

# A plain-AdamW run "trains cleanly" if its final perplexity is within this factor of plain
# AdamW's best at the same size and seed and it never produced a non-finite loss. Guard
# interventions on such runs are counted as false positives. (At 1.5x, a learning rate where
# AdamW ends 50% worse counted as "clean", and the guard's cap that improved it by a quarter
# was booked as a false positive.)
CLEAN_FACTOR = 1.1
# The stress test must reach learning rates where plain AdamW ends this many times above its best.
STRESS_FACTOR = 5.0
# Final perplexities within this relative distance are a tie, not a win or a loss: one seed's
# run-to-run noise is larger than that.
TIE_TOLERANCE = 0.01
# "Stays trainable near the best" (the paper's claim): within this factor of plain AdamW's best.
NEAR_BEST_FACTOR = 1.5


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(not math.isfinite(v) for v in values):
        return math.inf, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_ppl(mean: float, std: float = 0.0, n: int = 1) -> str:
    if not math.isfinite(mean):
        return "diverged"
    text = f"{mean:.4g}" if mean < 1e5 else f"{mean:.2e}"
    return f"{text} ± {std:.2g}" if n > 1 else text


def summarize(runs: list[RunResult]) -> dict:
    """Cells of the arms x learning-rates table per size, and the verdicts drawn from them."""
    sizes = list(dict.fromkeys(r.size for r in runs))
    arms = list(dict.fromkeys(r.arm for r in runs))
    lrs = sorted(dict.fromkeys(r.lr for r in runs))
    cells: dict[str, dict[str, dict[str, dict]]] = {}
    for size in sizes:
        cells[size] = {}
        for arm in arms:
            cells[size][arm] = {}
            for lr in lrs:
                rs = [r for r in runs if r.size == size and r.arm == arm and r.lr == lr]
                if not rs:
                    continue
                mean, std = _mean_std([r.final_ppl for r in rs])
                cells[size][arm][f"{lr:g}"] = {
                    "lr": lr, "mean_ppl": mean, "std_ppl": std, "n": len(rs),
                    "diverged": sum(r.diverged for r in rs),
                    "train_seconds": statistics.fmean(r.train_seconds for r in rs),
                    "tokens_per_second": statistics.fmean(r.tokens_per_second for r in rs),
                }
    return {"sizes": sizes, "arms": arms, "lrs": lrs, "cells": cells,
            "verdicts": verdicts(cells, sizes, arms, lrs), "false_positives": false_positives(runs)}


def verdicts(cells: dict, sizes: list[str], arms: list[str], lrs: list[float]) -> list[dict]:
    """Per size: did the sweep stress AdamW, and where does the guard beat every baseline?"""
    out = []
    baselines = [a for a in arms if not parse_arm(a).guarded]
    guards = [a for a in arms if parse_arm(a).guarded]
    for size in sizes:
        v: dict = {"size": size, "wins": [], "ties": [], "losses": []}
        adamw = cells[size].get("adamw", {})
        finite = [c["mean_ppl"] for c in adamw.values() if math.isfinite(c["mean_ppl"])]
        if adamw and finite:
            best = min(finite)
            worst = max(c["mean_ppl"] for c in adamw.values())
            v["adamw_best_ppl"] = best
            v["adamw_worst_ppl"] = worst if math.isfinite(worst) else None
            v["stress_reached"] = worst >= STRESS_FACTOR * best
        if baselines and guards:
            for lr in lrs:
                key = f"{lr:g}"
                base = {a: cells[size][a][key]["mean_ppl"] for a in baselines if key in cells[size][a]}
                guard = {a: cells[size][a][key]["mean_ppl"] for a in guards if key in cells[size][a]}
                if not base or not guard:
                    continue
                best_base = min(base, key=base.get)
                best_guard = min(guard, key=guard.get)
                entry = {"lr": lr, "best_guard_arm": best_guard, "guard_ppl": guard[best_guard],
                         "best_baseline_arm": best_base, "baseline_ppl": base[best_base],
                         "plain_guard_beats_all_baselines": "guard" in guard and guard["guard"] < base[best_base]}
                g, b = guard[best_guard], base[best_base]
                if math.isfinite(g) and math.isfinite(b) and abs(g - b) <= TIE_TOLERANCE * b:
                    v["ties"].append(entry)
                else:
                    (v["wins"] if g < b else v["losses"]).append(entry)
                if "adamw_best_ppl" in v:
                    entry["guard_over_adamw_best"] = g / v["adamw_best_ppl"] if math.isfinite(g) else None
        out.append(v)
    return out


def false_positives(runs: list[RunResult]) -> dict:
    """Guard interventions on (size, seed, lr) points that plain AdamW trains cleanly."""
    adamw = [r for r in runs if r.arm == "adamw"]
    best: dict[tuple[str, int], float] = {}
    for r in adamw:
        if math.isfinite(r.final_ppl):
            key = (r.size, r.seed)
            best[key] = min(best.get(key, math.inf), r.final_ppl)
    clean = {
        (r.size, r.seed, r.lr)
        for r in adamw
        if (r.size, r.seed) in best and r.final_ppl <= CLEAN_FACTOR * best[(r.size, r.seed)]
        and all(x is not None and math.isfinite(x) for x in r.train_losses)
    }
    per_arm: dict[str, dict] = {}
    for r in runs:
        if r.guard is None or (r.size, r.seed, r.lr) not in clean:
            continue
        acc = per_arm.setdefault(r.arm, {"runs": 0, "steps": 0, "interventions": 0})
        acc["runs"] += 1
        acc["steps"] += r.steps_run
        acc["interventions"] += r.guard.interventions
    for acc in per_arm.values():
        acc["per_1000_steps"] = 1000 * acc["interventions"] / acc["steps"] if acc["steps"] else None
    return {"clean_rule": f"plain AdamW final ppl <= {CLEAN_FACTOR:g} x its best, no non-finite loss",
            "clean_points": sorted([list(k) for k in clean]), "per_arm": per_arm}


# ---------------------------------------------------------------------------- serialisation
def jsonable(obj):
    """``obj`` as plain JSON data: non-finite floats become null, dataclasses dicts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    return obj


def results_document(sweep: dict) -> dict:
    """The JSON document: non-finite numbers become null (a diverged run also says so)."""
    doc = dict(sweep)
    doc["summary"] = summarize(sweep["runs"])
    doc["schema"] = "lbw-guard-stress/1"
    return jsonable(doc)


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def check_output_paths(out_dir: Path, names: tuple[str, ...]) -> None:
    """Raise ValueError, before any training, if ``out_dir`` or one of the files a run writes
    into it exists as something that cannot be written as a file (found after hours otherwise)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory; choose another --out")
    for name in names:
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise ValueError(f"--out {out_dir}: {path} exists and is not a file, so the results could not be "
                             "written there; remove it or choose another --out")


# ---------------------------------------------------------------------------- text renderings
def _ppl_cell(cell: dict | None) -> str:
    if not cell:
        return "-"
    mean = cell["mean_ppl"]
    text = fmt_ppl(mean if mean is not None else math.inf, cell["std_ppl"] or 0.0, cell["n"])
    if cell["diverged"] and mean is not None:
        text += f" ({cell['diverged']} div.)"
    return text


def table_rows(doc: dict, size: str) -> tuple[list[str], list[list[str]]]:
    s = doc["summary"]
    header = ["arm"] + [f"lr {lr:g}" for lr in s["lrs"]]
    rows = []
    for arm in s["arms"]:
        row = [parse_arm(arm).label]
        for lr in s["lrs"]:
            row.append(_ppl_cell(s["cells"][size][arm].get(f"{lr:g}")))
        rows.append(row)
    return header, rows


def verdict_lines(doc: dict) -> list[str]:
    lines = []
    for v in doc["summary"]["verdicts"]:
        size = v["size"]
        if "stress_reached" in v:
            worst = v["adamw_worst_ppl"]
            worst_text = "diverged (non-finite)" if worst is None else f"{worst:.4g}"
            lines.append(
                f"[{size}] plain AdamW: best final perplexity {v['adamw_best_ppl']:.4g}, worst {worst_text}; "
                + ("the sweep reaches the stress regime (worst >= 5x best)." if v["stress_reached"]
                   else "the sweep does NOT reach 5x plain AdamW's best: this is not a stress test at these rates.")
            )
        for w in sorted(v["wins"] + v["ties"] + v["losses"], key=lambda w: w["lr"]):
            pair = (f"{parse_arm(w['best_guard_arm']).label} {fmt_ppl(_inf(w['guard_ppl']))} vs best baseline "
                    f"{parse_arm(w['best_baseline_arm']).label} {fmt_ppl(_inf(w['baseline_ppl']))}")
            if w in v["wins"]:
                lines.append(f"[{size}] lr {w['lr']:g}: the guard beats AdamW and every clipping baseline ({pair}).")
            elif w in v["ties"]:
                lines.append(f"[{size}] lr {w['lr']:g}: the guard ties the best baseline, within "
                             f"{TIE_TOLERANCE:.0%} ({pair}).")
            else:
                lines.append(f"[{size}] lr {w['lr']:g}: the guard does NOT beat the best baseline ({pair}).")
        if not v["wins"] and (v["losses"] or v["ties"]):
            lines.append(f"[{size}] The guard does not beat AdamW and the clipping baselines at any learning rate tried.")
        if v.get("stress_reached"):
            far = [w for w in v["wins"] + v["ties"] + v["losses"]
                   if w.get("guard_over_adamw_best") is None or w["guard_over_adamw_best"] > NEAR_BEST_FACTOR]
            for w in sorted(far, key=lambda w: w["lr"]):
                ratio = w.get("guard_over_adamw_best")
                lines.append(f"[{size}] lr {w['lr']:g}: the best guard arm ends at "
                             + (f"{ratio:.1f}x" if ratio is not None else "a diverged")
                             + f" plain AdamW's best perplexity: it does not stay trainable near the best "
                             f"(within {NEAR_BEST_FACTOR:g}x) as the paper reports.")
    fp = doc["summary"]["false_positives"]
    for arm, acc in fp["per_arm"].items():
        rate = acc["per_1000_steps"]
        lines.append(f"false positives, {parse_arm(arm).label}: {acc['interventions']} interventions in "
                     f"{acc['steps']} steps on runs plain AdamW trains cleanly "
                     f"({rate:.2f} per 1000 steps)." if rate is not None else "")
    return [line for line in lines if line]


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


def print_table(doc: dict, console) -> None:
    from rich.table import Table

    for size in doc["summary"]["sizes"]:
        header, rows = table_rows(doc, size)
        model = doc["meta"]["models"].get(size, {})
        title = (f"final held-out perplexity — {doc['config']['mode']} {doc['config']['arch']} {size} "
                 f"({model.get('trainable_params', 0):,} trainable params), "
                 f"{doc['config']['steps']} steps, seeds {doc['config']['seeds']}")
        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h == "arm" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in verdict_lines(doc):
        console.print(line, markup=False, highlight=False)  # "[size]" is text, not a style tag


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown_report(doc: dict, plots: list[str]) -> str:
    cfg, meta = doc["config"], doc["meta"]
    parts = [
        "# lbw-guard stress test",
        "",
        f"Mode **{cfg['mode']}**, architecture **{cfg['arch']}**, sizes {', '.join(cfg['sizes'])}; "
        f"{cfg['steps']} steps of batch {cfg['batch_size']} x {cfg['seq_len']} tokens, {cfg['schedule']} LR"
        f"{' after ' + str(cfg['warmup_steps']) + ' warm-up steps' if cfg['warmup_steps'] else ''}, "
        f"weight decay {cfg['weight_decay']}, seeds {cfg['seeds']}, guard preset `{cfg['guard']}`.",
        f"Corpus `{meta['corpus']['name']}` ({meta['corpus']['train_tokens']:,} training tokens, "
        f"{meta['corpus']['eval_tokens']:,} held-out tokens evaluated), tokenizer {meta['tokenizer']['kind']} "
        f"with vocabulary {meta['tokenizer']['vocab_size']}.",
        f"Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, device "
        f"{cfg['device']} ({meta['device']}, {meta['torch_threads']} threads). Whole run: "
        f"{meta['wall_seconds']:.0f} s"
        + (f" (sum of {len(meta['part_wall_seconds'])} parts run side by side)" if meta.get("part_wall_seconds") else "")
        + (f"; optimizer/guard source `{meta['optimizer_source_sha1']}`" if meta.get("optimizer_source_sha1") else "")
        + ".",
        "",
    ]
    if meta.get("complete") is False:
        planned = f" of {meta['runs_planned']}" if meta.get("runs_planned") else ""
        parts += [f"**Unfinished sweep: {meta.get('runs_finished', len(doc['runs']))}{planned} runs** (interrupted; "
                  "the same command with `--resume` finishes it).", ""]
    for size in doc["summary"]["sizes"]:
        header, rows = table_rows(doc, size)
        m = meta["models"].get(size, {})
        parts += [f"## Final held-out perplexity, {size} ({m.get('trainable_params', 0):,} trainable / "
                  f"{m.get('total_params', 0):,} parameters)", "", _md_table(header, rows), ""]
    parts += ["## Verdict", ""] + [f"- {line}" for line in verdict_lines(doc)] + [""]
    parts += ["## Guard activity per run", "",
              _md_table(["size", "seed", "lr", "arm", "final ppl", "skipped", "rollbacks", "frozen group-steps",
                         "interventions", "min LR scale"],
                        [[r["size"], str(r["seed"]), f"{r['lr']:g}", parse_arm(r["arm"]).label,
                          fmt_ppl(_inf(r["final_ppl"])), str(r["guard"]["skipped_steps"]), str(r["guard"]["rollbacks"]),
                          str(r["guard"]["frozen_group_steps"]), str(r["guard"]["interventions"]),
                          f"{r['guard']['min_lr_scale']:.3g}"]
                         for r in doc["runs"] if r.get("guard")]), ""]
    parts += ["## Time", "",
              _md_table(["size", "seed", "lr", "arm", "train s", "tokens/s", "s/step", "backend"],
                        [[r["size"], str(r["seed"]), f"{r['lr']:g}", parse_arm(r["arm"]).label,
                          f"{r['train_seconds']:.1f}", f"{r['tokens_per_second']:,.0f}",
                          f"{r['seconds_per_step']:.3f}", r["backend"]] for r in doc["runs"]]), ""]
    if doc.get("speed"):
        sp = doc["speed"]
        tgt = f"{sp['target_ppl']:.4g}" if sp["target_ppl"] else "n/a"
        parts += [f"## End-to-end speed at lr {sp['lr']:g} ({sp['size']}, {sp['steps']} steps; target perplexity "
                  f"{tgt} = {sp['target_rule']})", "",
                  _md_table(["optimizer", "backend", "s/step", "ratio vs torch fused", "time to target s", "final ppl"],
                            [[parse_arm(a).label, v["backend"], f"{v['seconds_per_step']:.4f}",
                              f"{v['step_time_ratio_vs_torch_fused']:.3f}" if v["step_time_ratio_vs_torch_fused"] else "-",
                              f"{v['time_to_target_s']:.1f}" if v["time_to_target_s"] is not None else "not reached",
                              fmt_ppl(_inf(v["final_ppl"]))] for a, v in sp["arms"].items()]),
                  "", f"({sp['note']}.)", ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(parts)
