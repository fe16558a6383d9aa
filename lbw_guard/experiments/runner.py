"""Run a configured stress test and write its results JSON, markdown report and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .config import StressConfig
from .progress import SweepProgress
from .report import markdown_report, print_table, results_document, write_json
from .stress import run_sweep
from .train import run_from_json


@dataclass
class StressOutputs:
    doc: dict
    json_path: Path
    report_path: Path
    plot_paths: list[Path]


def execute(cfg: StressConfig, console: Console | None = None) -> StressOutputs:
    console = console or Console()
    with SweepProgress(Console(stderr=True), enabled=cfg.progress) as progress:
        sweep = run_sweep(cfg, progress)
    return write_outputs(sweep, cfg.out_dir, cfg.plots, console)


def merge_results(paths: list[Path]) -> dict:
    """One sweep from several results JSONs of the same setting (e.g. learning rates run apart).

    The parts must agree on everything but their learning rates, seeds and arms; wall time is summed.
    """
    docs = [json.loads(Path(p).read_text()) for p in paths]
    if not docs:
        raise ValueError("no results files to merge")
    ignore = {"lrs", "seeds", "arms", "out_dir", "progress", "plots", "threads", "compare_speed", "speed_steps"}
    first = {k: v for k, v in docs[0]["config"].items() if k not in ignore}
    for p, d in zip(paths, docs):
        other = {k: v for k, v in d["config"].items() if k not in ignore}
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise ValueError(f"{p} was run with different settings: {', '.join(diff)}")
    runs = [run_from_json(r) for d in docs for r in d["runs"]]
    config = dict(docs[0]["config"])
    config["lrs"] = sorted({r.lr for r in runs})
    config["seeds"] = sorted({r.seed for r in runs})
    config["arms"] = list(dict.fromkeys(a for d in docs for a in d["config"]["arms"]))
    meta = dict(docs[0]["meta"])
    meta["wall_seconds"] = sum(d["meta"]["wall_seconds"] for d in docs)
    meta["merged_from"] = [str(p) for p in paths]
    meta["part_wall_seconds"] = [d["meta"]["wall_seconds"] for d in docs]
    speed = next((d["speed"] for d in docs if d.get("speed")), None)
    return {"meta": meta, "config": config, "runs": runs, "speed": speed}


def write_outputs(sweep: dict, out: Path, plots: bool, console: Console) -> StressOutputs:
    doc = results_document(sweep)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    write_json(doc, json_path)
    plot_paths: list[Path] = []
    if plots:
        from .plots import write_plots

        plot_paths = write_plots(doc, out)
    report_path = out / "report.md"
    report_path.write_text(markdown_report(doc, [str(p) for p in plot_paths]))
    print_table(doc, console)
    console.print(f"results: {json_path}  report: {report_path}  plots: {', '.join(p.name for p in plot_paths) or 'none'}")
    return StressOutputs(doc, json_path, report_path, plot_paths)
