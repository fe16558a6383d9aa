"""The generalization matrix's summary, target checks, markdown report and console tables.

Everything here works on the JSON document (``matrix.json``), so a report can be rebuilt from a
results file without training. Losses are final held-out mean NLL in nats/token; "n" is the
number of seeds; a cell with non-finite runs says how many.

Targets (the guard only; each cell checked separately, then the target passes if every cell does):

- ``lr-10x``: at 10x the best AdamW lr, constant and warmup + cosine schedules, every
  architecture: the guard's mean final loss within 15% of the best AdamW loss of the sweep.
- ``clean-1x``: at 1x with every schedule (warm restarts, OneCycle, LoRA and LoRA+ included) and
  through the data switch: the guard's mean final loss within 1% of AdamW's on the same cell, no
  rollback, fewer than 1% of steps capped (every seed).
- ``faults``: every guard fault run survived (finite parameters and final loss) and ended within
  10% of the guard's clean run with the same seed (the data switch, whose clean counterpart is
  not a like-for-like run, is judged by ``clean-1x`` and survival instead).
"""

from __future__ import annotations

import math
import statistics

from .arms import parse_arm
from .faults import LABELS as FAULT_LABELS
from .schedules import LABELS as SCHEDULE_LABELS

TARGET_10X = 1.15
TARGET_1X = 1.01
TARGET_CAPPED = 0.01
TARGET_FAULT = 1.10
TARGETS = {
    "lr-10x": f"10x lr (constant, warmup + cosine): guard final loss <= {TARGET_10X:g} x best AdamW loss of the sweep, "
              "every architecture",
    "clean-1x": f"1x lr, every schedule and mode, and the data switch: guard final loss <= {TARGET_1X:g} x AdamW's, "
                f"no rollback, < {TARGET_CAPPED:.0%} of steps capped",
    "faults": f"faults: 100% of guard runs survive, each <= {TARGET_FAULT:g} x the clean run (same seed)",
}


def _num(x) -> float:
    return math.inf if x is None else float(x)


def loss_stats(runs: list[dict]) -> dict:
    losses = [_num(r["final_loss"]) for r in runs]
    finite = [x for x in losses if math.isfinite(x)]
    return {
        "n": len(losses),
        "nonfinite": len(losses) - len(finite),
        "mean": statistics.fmean(finite) if len(finite) == len(losses) and losses else None,
        "finite_mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) == len(losses) and len(finite) > 1 else (0.0 if finite else None),
        "survived": sum(bool(r.get("survived")) for r in runs),
    }


def fmt_loss(st: dict | None) -> str:
    if not st or not st["n"]:
        return "-"
    if st["nonfinite"]:
        if st["nonfinite"] == st["n"]:
            return f"diverged ({st['n']}/{st['n']})"
        return f"{st['finite_mean']:.3f} ({st['nonfinite']}/{st['n']} div.)"
    if st["n"] > 1:
        return f"{st['mean']:.3f} ± {st['std']:.3f}"
    return f"{st['mean']:.3f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return None
    return a / b


def guard_accounting(runs: list[dict]) -> dict:
    gs = [r["guard"] for r in runs if r.get("guard")]
    if not gs:
        return {}

    def mean(k):
        return statistics.fmean(float(g[k]) for g in gs)

    return {
        "capped_fraction": mean("capped_fraction"), "max_capped_fraction": max(g["capped_fraction"] for g in gs),
        "skipped_fraction": mean("skipped_fraction"), "partly_skipped_fraction": mean("partly_skipped_fraction"),
        "frozen_fraction": mean("frozen_fraction"), "mean_scale": mean("mean_scale"),
        "rollbacks": sum(int(g["rollbacks"]) for g in gs), "gave_up": sum(int(g.get("gave_up", 0)) for g in gs),
        "interventions": mean("interventions"),
    }


# ---------------------------------------------------------------------------- the summary
def summarize_matrix(doc: dict) -> dict:
    cfg = doc["config"]
    runs = doc["runs"]
    arms = list(cfg["arms"])
    sweeps = doc.get("sweeps") or {}
    index: dict[tuple, list[dict]] = {}
    for r in runs:
        index.setdefault((r["arch"], r["mode"], r["schedule"], float(r["multiple"]), r["fault"], r["arm"]), []).append(r)

    def cell_runs(arch, mode, sched, mult, fault, arm):
        return sorted(index.get((arch, mode, sched, float(mult), fault, arm), []), key=lambda r: r["seed"])

    def best(arch, mode, sched):
        e = sweeps.get(f"{arch}/{mode}/{sched}")
        return (e.get("best_lr"), _num(e.get("best_loss"))) if e and e.get("complete") else (None, None)

    summary: dict = {"arms": arms, "targets": TARGETS, "checks": [], "sweeps": [],
                     "errors": [{k: r.get(k) for k in ("arch", "mode", "schedule", "multiple", "fault", "seed", "arm",
                                                       "error")} for r in runs if r.get("error")]}
    for sid, e in sweeps.items():
        if not e.get("complete"):
            continue
        summary["sweeps"].append({"setting": sid, "best_lr": e["best_lr"], "best_loss": e["best_loss"],
                                  "edge": e.get("edge", False),
                                  "grid": {k: r["final_loss"] for k, r in sorted(e["runs"].items(),
                                                                                  key=lambda kv: float(kv[0]))}})

    def check(target: str, where: str, passed: bool | None, detail: str) -> dict:
        c = {"target": target, "where": where, "passed": passed, "detail": detail}
        summary["checks"].append(c)
        return c

    def clean_1x(where: str, guard_runs: list[dict], adamw_runs: list[dict]) -> dict:
        g, a = loss_stats(guard_runs), loss_stats(adamw_runs)
        acc = guard_accounting(guard_runs)
        raised = [r for r in guard_runs if r.get("error")]
        if raised:
            return check("clean-1x", where, False, f"{len(raised)} guard run(s) raised: {raised[0]['error']}")
        if not guard_runs or not adamw_runs or not acc:
            return check("clean-1x", where, None, "not run")
        ratio = _ratio(g["mean"], a["mean"])
        ok_loss = ratio is not None and ratio <= TARGET_1X
        if ratio is None and g["mean"] is not None and a["mean"] is None:
            ok_loss = True  # AdamW diverged, the guard did not
        ok = ok_loss and acc["rollbacks"] == 0 and acc["max_capped_fraction"] < TARGET_CAPPED
        detail = (f"guard/AdamW {ratio:.4f}" if ratio is not None else "guard/AdamW n/a") + \
                 f", rollbacks {acc['rollbacks']}, max capped {acc['max_capped_fraction']:.2%}"
        return check("clean-1x", where, ok, detail)

    # -- lr and finetune slices: losses per arm and multiple, guard accounting per multiple
    for name, modes, scheds, mults in (
        ("lr", ["full"], cfg["lr_schedules"], cfg["lr_multiples"]),
        ("finetune", cfg["ft_modes"], cfg["ft_schedules"], cfg["ft_multiples"]),
    ):
        if name not in cfg["slices"]:
            continue
        rows, guard_rows = [], []
        for arch in cfg["archs"]:
            for mode in modes:
                for sched in scheds:
                    best_lr, best_loss = best(arch, mode, sched)
                    for arm in arms:
                        row = {"arch": arch, "mode": mode, "schedule": sched, "arm": arm, "cells": {}}
                        for m in mults:
                            rs = cell_runs(arch, mode, sched, m, "clean", arm)
                            if rs:
                                st = loss_stats(rs)
                                st["ratio_to_best"] = _ratio(st["mean"], best_loss)
                                st["lr"] = statistics.fmean(r["lr"] for r in rs)
                                row["cells"][f"{m:g}"] = st
                        rows.append(row)
                    for m in mults:
                        grs = cell_runs(arch, mode, sched, m, "clean", "guard")
                        ars = cell_runs(arch, mode, sched, m, "clean", "adamw")
                        if not grs:
                            continue
                        g, a = loss_stats(grs), loss_stats(ars)
                        gr = {"arch": arch, "mode": mode, "schedule": sched, "multiple": m, "best_lr": best_lr,
                              "best_loss": best_loss, "guard_loss": g, "adamw_loss": a,
                              "guard_ratio_to_best": _ratio(g["mean"], best_loss),
                              "adamw_ratio_to_best": _ratio(a["mean"], best_loss),
                              "guard_over_adamw": _ratio(g["mean"], a["mean"]), **guard_accounting(grs)}
                        where = f"{arch} {mode} {sched} {m:g}x"
                        marks = []
                        if m == 1.0:
                            marks.append(clean_1x(where, grs, ars))
                        if name == "lr" and m == 10.0 and sched in ("constant", "cosine"):
                            ratio = gr["guard_ratio_to_best"]
                            marks.append(check("lr-10x", where, ratio is not None and ratio <= TARGET_10X,
                                               f"guard/best AdamW {ratio:.3f}" if ratio is not None
                                               else "guard diverged or no sweep"))
                        gr["checks"] = marks
                        guard_rows.append(gr)
        summary[name] = {"rows": rows, "guard": guard_rows, "multiples": list(mults)}

    # -- faults
    if "faults" in cfg["slices"]:
        rows, guard_rows = [], []
        for arch in cfg["archs"]:
            for fault in ["clean"] + list(cfg["faults"]):
                for arm in arms:
                    rs = cell_runs(arch, "full", "constant", 1.0, fault, arm)
                    if not rs:
                        continue
                    st = loss_stats(rs)
                    clean = {r["seed"]: r for r in cell_runs(arch, "full", "constant", 1.0, "clean", arm)}
                    ratios = []
                    for r in rs:
                        c = clean.get(r["seed"])
                        ratios.append(_ratio(_num(r["final_loss"]), _num(c["final_loss"])) if c else None)
                    known = [x for x in ratios if x is not None]
                    row = {"arch": arch, "fault": fault, "arm": arm, **st,
                           "ratio_to_clean": statistics.fmean(known) if len(known) == len(ratios) and known else None,
                           "within_10pct": sum(1 for x in ratios if x is not None and x <= TARGET_FAULT),
                           "compared": sum(1 for r in rs if r["seed"] in clean)}
                    rows.append(row)
                    if arm != "guard" or fault == "clean":
                        continue
                    acc = guard_accounting(rs)
                    gr = {"arch": arch, "fault": fault, **row, **acc, "checks": []}
                    where = f"{arch} {fault}"
                    survived = st["survived"] == st["n"]
                    if fault == "data-switch":
                        gr["checks"].append(check("faults", where, survived, f"survived {st['survived']}/{st['n']}"))
                        gr["checks"].append(clean_1x(where, rs, cell_runs(arch, "full", "constant", 1.0, fault,
                                                                          "adamw")))
                    else:
                        ok = survived and row["compared"] == st["n"] and row["within_10pct"] == st["n"]
                        detail = (f"survived {st['survived']}/{st['n']}, within 10% of clean "
                                  f"{row['within_10pct']}/{row['compared']}")
                        if row["compared"] < st["n"]:
                            ok, detail = None, detail + " (clean runs missing)"
                        gr["checks"].append(check("faults", where, ok, detail))
                    guard_rows.append(gr)
        summary["faults"] = {"rows": rows, "guard": guard_rows}

    verdict = {}
    for t in TARGETS:
        cs = [c for c in summary["checks"] if c["target"] == t]
        known = [c for c in cs if c["passed"] is not None]
        verdict[t] = {"cells": len(cs), "passed": sum(bool(c["passed"]) for c in known),
                      "failed": sum(not c["passed"] for c in known), "not_run": len(cs) - len(known),
                      "status": "n/a" if not known else ("PASS" if all(c["passed"] for c in known)
                                                          and len(known) == len(cs) else
                                                          ("FAIL" if any(not c["passed"] for c in known)
                                                           else "incomplete"))}
    summary["verdict"] = verdict
    return summary


# ---------------------------------------------------------------------------- text
def _mark(checks: list[dict]) -> str:
    if not checks:
        return ""
    if any(c["passed"] is False for c in checks):
        return "FAIL"
    if all(c["passed"] for c in checks):
        return "pass"
    return "n/a"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _r(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _label(arm: str) -> str:
    return parse_arm(arm).label


def _mode(mode: str) -> str:
    return {"full": "full", "lora": "LoRA", "lora+": "LoRA+"}.get(mode, mode)


def loss_table(doc: dict, name: str) -> tuple[list[str], list[list[str]]]:
    s = doc["summary"][name]
    mults = s["multiples"]
    first = ["arch", "schedule"] if name == "lr" else ["arch", "mode", "schedule"]
    header = first + ["arm"] + [f"{m:g}x" for m in mults]
    rows = []
    for row in s["rows"]:
        lead = [row["arch"], SCHEDULE_LABELS[row["schedule"]]] if name == "lr" else \
            [row["arch"], _mode(row["mode"]), SCHEDULE_LABELS[row["schedule"]]]
        rows.append(lead + [_label(row["arm"])] + [fmt_loss(row["cells"].get(f"{m:g}")) for m in mults])
    return header, rows


def guard_table(doc: dict, name: str) -> tuple[list[str], list[list[str]]]:
    s = doc["summary"][name]
    first = ["arch", "schedule"] if name == "lr" else ["arch", "mode", "schedule"]
    header = first + ["lr x", "best AdamW lr", "guard / best AdamW", "AdamW / best AdamW", "guard / AdamW",
                      "capped", "skipped", "partly skipped", "frozen", "mean scale", "rollbacks", "target"]
    rows = []
    for g in s["guard"]:
        lead = [g["arch"], SCHEDULE_LABELS[g["schedule"]]] if name == "lr" else \
            [g["arch"], _mode(g["mode"]), SCHEDULE_LABELS[g["schedule"]]]
        rows.append(lead + [f"{g['multiple']:g}", f"{g['best_lr']:.3g}" if g["best_lr"] else "-",
                            _r(g["guard_ratio_to_best"]), _r(g["adamw_ratio_to_best"]), _r(g["guard_over_adamw"], 4),
                            _pct(g.get("capped_fraction")), _pct(g.get("skipped_fraction")),
                            _pct(g.get("partly_skipped_fraction")), _pct(g.get("frozen_fraction")),
                            _r(g.get("mean_scale")), str(g.get("rollbacks", "-")), _mark(g["checks"])])
    return header, rows


def fault_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["arch", "fault", "arm", "final loss", "survived", "fault / clean", "within 10% of clean"]
    rows = []
    for r in doc["summary"]["faults"]["rows"]:
        rows.append([r["arch"], FAULT_LABELS.get(r["fault"], r["fault"]), _label(r["arm"]), fmt_loss(r),
                     f"{r['survived']}/{r['n']}", "-" if r["fault"] == "clean" else _r(r["ratio_to_clean"]),
                     "-" if r["fault"] == "clean" else f"{r['within_10pct']}/{r['compared']}"])
    return header, rows


def fault_guard_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["arch", "fault", "guard / clean", "capped", "skipped", "partly skipped", "frozen", "mean scale",
              "rollbacks", "gave up", "target"]
    rows = []
    for g in doc["summary"]["faults"]["guard"]:
        rows.append([g["arch"], FAULT_LABELS.get(g["fault"], g["fault"]),
                     "-" if g["fault"] == "data-switch" else _r(g["ratio_to_clean"]),
                     _pct(g.get("capped_fraction")), _pct(g.get("skipped_fraction")),
                     _pct(g.get("partly_skipped_fraction")), _pct(g.get("frozen_fraction")), _r(g.get("mean_scale")),
                     str(g.get("rollbacks", "-")), str(g.get("gave_up", "-")), _mark(g["checks"])])
    return header, rows


def sweep_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    sweeps = doc["summary"]["sweeps"]
    lrs = sorted({float(k) for s in sweeps for k in s["grid"]})
    header = ["setting"] + [f"lr {lr:g}" for lr in lrs] + ["best lr", "best loss"]
    rows = []
    for s in sweeps:
        cells = []
        for lr in lrs:
            v = s["grid"].get(f"{lr:g}", "absent")
            cells.append("-" if v == "absent" else ("diverged" if v is None else f"{v:.3f}"))
        rows.append([s["setting"]] + cells + [f"{s['best_lr']:g}" + (" (edge)" if s["edge"] else ""),
                                              f"{s['best_loss']:.3f}"])
    return header, rows


def verdict_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["target", "definition", "cells", "passed", "failed", "not run", "status"]
    rows = []
    for t, v in doc["summary"]["verdict"].items():
        rows.append([t, TARGETS[t], str(v["cells"]), str(v["passed"]), str(v["failed"]), str(v["not_run"]),
                     v["status"]])
    return header, rows


ARM_NOTES = {
    "adamw": "`torch.optim.AdamW` (foreach), no clipping.",
    "adamw-clip1.0": "AdamW after `clip_grad_norm_(1.0)`.",
    "skipstep": "OLMo-core's skip-step rule (`allenai/OLMo-core`, `src/olmo_core/optim/skip_step_optimizer.py`): "
                "skip the step when loss or grad norm exceeds mean + 6 std of the last 128 values, once 64 are "
                "collected; then AdamW.",
    "zclip": "ZClip (Kumar et al. 2025; `bluorion-com/ZClip`, `zclip/zclip.py`): EMA (alpha 0.97) mean/std of the "
             "grad norm, z > 2.5 clips to mean + (2.5^2 / z) std, 25 warm-up steps; then AdamW.",
    "guard": "`FusedGuardedAdamW` with the guard (preset in the config).",
    "adamw-guardlr": "AdamW at lr x the guard run's `summary()['mean_scale']` (same cell and seed): is the guard "
                     "more than an lr cut? (Where that scale is 1 the run is plain AdamW's, reused.)",
}


def markdown_matrix(doc: dict, plots: list[str]) -> str:
    cfg, meta, s = doc["config"], doc["meta"], doc["summary"]
    data = meta.get("data", {})
    parts = [
        "# lbw-guard generalization matrix",
        "",
        f"Architectures {', '.join(cfg['archs'])} at size `{cfg['size']}`; {cfg['steps']} steps of "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens; seeds {cfg['seeds']} (mean ± std over seeds); guard preset "
        f"`{cfg['guard']}`; weight decay {cfg['weight_decay']}. Loss = final held-out mean NLL (nats/token)."
        + (" **Smoke run: the numbers mean nothing.**" if cfg.get("smoke") else ""),
        f"Data: code = `{data.get('code', {}).get('name', '?')}` ({data.get('code', {}).get('train_tokens', 0):,} "
        f"training tokens), prose = `{data.get('prose', {}).get('name', '?')}` "
        f"({data.get('prose', {}).get('train_tokens', 0):,}); one BPE of vocabulary "
        f"{data.get('tokenizer', {}).get('vocab_size', '?')} trained on both.",
        f"Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}"
        + (f", peft {meta['peft']}" if meta.get("peft") else "")
        + f"; {meta['platform']}, {meta['cpu_count']} CPUs, {meta.get('workers', 1)} worker process(es) x "
        f"{meta['torch_threads']} torch thread(s), device "
        f"{meta['device']}. Wall time {meta['wall_seconds'] / 60:.1f} min (sweep {meta['sweep_seconds'] / 60:.1f} min); "
        f"optimizer/guard source `{meta['optimizer_source_sha1']}`.",
        "",
    ]
    if not meta.get("complete", True):
        parts += [f"**Unfinished matrix: {meta['runs_finished']} of {meta['runs_planned']} runs** (the same command "
                  "with `--resume` finishes it).", ""]
    parts += ["## Targets", "", _md(*verdict_table(doc)), ""]
    if s.get("errors"):
        parts += [f"**{len(s['errors'])} run(s) raised an exception** (counted as failed runs):", ""]
        parts += [f"- {e['arch']} {e['mode']} {e['schedule']} {e['multiple']:g}x {e['fault']} seed {e['seed']} "
                  f"{_label(e['arm'])}: `{e['error']}`" for e in s["errors"][:30]]
        parts += ([f"- ... and {len(s['errors']) - 30} more (see matrix.json)"] if len(s["errors"]) > 30 else []) + [""]
    failed = [c for c in s["checks"] if c["passed"] is False]
    if failed:
        parts += ["Failing cells:", ""] + [f"- `{c['target']}` {c['where']}: {c['detail']}" for c in failed] + [""]
    parts += ["## How it was run", "",
              "Not the full cross product: three slices, each its own small cross product "
              "(a cell two slices share runs once).", ""]
    for name, p in doc["plan"]["slices"].items():
        parts.append(f"- **{name}**: {p['shape']} = {p['runs']} runs" + (f" ({p['note']})" if p.get("note") else ""))
    parts += [
        f"- **sweep**: plain AdamW, seed {cfg['seeds'][0]}, per (architecture, mode, schedule) over "
        f"{', '.join(f'{x:g}' for x in cfg['sweep_lrs_full'])} (full) and "
        f"{', '.join(f'{x:g}' for x in cfg['sweep_lrs_lora'])} (LoRA), extended by up to {cfg['sweep_extend']} "
        "half-decade points past an edge; best = lowest final held-out loss; the lr multiples multiply it.",
        f"- **schedules**: constant; warmup + cosine ({cfg['warmup_fraction']:.0%} linear warm-up, cosine to 0); "
        f"cosine with warm restarts ({cfg['restart_cycles']} cycles, `CosineAnnealingWarmRestarts`); OneCycle "
        f"(`OneCycleLR`, peak at {cfg['onecycle_pct']:.0%}, no momentum cycling).",
        f"- **fine-tuning**: LoRA r={cfg['lora_rank']} alpha={cfg['lora_alpha']} on a base model pre-trained on code "
        f"({cfg['base_steps']} AdamW steps at {cfg['base_lr']:g}), fine-tuned on prose; LoRA+ puts the `lora_B` "
        f"matrices in their own groups at {cfg['lora_plus_ratio']:g}x the lr.",
        "- **faults** (full, constant, 1x): gradients x1e3, x1e4, x1e5 and x1e6 at 40% and 70% of the run; a NaN in one "
        "gradient element at the same steps; one batch of uniform random tokens at 50%; prose -> code data switch "
        "at 50% (held-out loss on code; the guard is "
        + ("told via `notify_data_change()`" if cfg.get("announce_data_switch") else "not told") + ").",
        "- **survived**: finite parameters and a finite final held-out loss.",
        "", "Arms:", ""]
    parts += [f"- **{_label(a)}**: {ARM_NOTES.get(a, '')}" for a in cfg["arms"]] + [""]
    parts += ["Guard accounting is the guard's own `summary()`: *capped* = steps whose issued lr scale was below 1 "
              "in some group, *skipped* = steps that changed nothing, *partly skipped* = steps with gradient "
              "elements clamped or dropped, *frozen* = steps with a group frozen, *mean scale* = mean effective "
              "lr scale (element-weighted), averaged over seeds (the target uses the worst seed).", ""]
    if s["sweeps"]:
        parts += ["## AdamW sweep", "", _md(*sweep_table(doc)), ""]
    titles = {"lr": "Slice: learning-rate stress (full training)", "finetune": "Slice: fine-tuning (LoRA, LoRA+)"}
    for name in ("lr", "finetune"):
        if name in s:
            parts += [f"## {titles[name]}", "", "Final held-out loss, mean ± std over seeds:", "",
                      _md(*loss_table(doc, name)), "", "Guard accounting and targets:", "",
                      _md(*guard_table(doc, name)), ""]
    if "faults" in s:
        parts += ["## Slice: faults (full training, constant, 1x)", "", _md(*fault_table(doc)), "",
                  "Guard accounting and targets:", "", _md(*fault_guard_table(doc)), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.rsplit('.', 1)[0]}]({p})" for p in plots] + [""]
    return "\n".join(parts)


def print_matrix(doc: dict, console) -> None:
    from rich.table import Table

    def show(title: str, header: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("arch", "arm", "schedule", "mode", "fault", "setting",
                                                         "target", "definition") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    s = doc["summary"]
    for name, title in (("lr", "lr stress: final held-out loss"), ("finetune", "fine-tuning: final held-out loss")):
        if name in s:
            show(title, *loss_table(doc, name))
            show(f"{title.split(':')[0]}: guard accounting", *guard_table(doc, name))
    if "faults" in s:
        show("faults", *fault_table(doc))
        show("faults: guard accounting", *fault_guard_table(doc))
    show("targets", *verdict_table(doc))
    if s.get("errors"):
        console.print(f"{len(s['errors'])} run(s) raised an exception, e.g. {s['errors'][0]['error']}",
                      markup=False, highlight=False)
