"""Run a configured stress test and write its results JSON, markdown report and plots."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .config import PARTIAL_NAME, StressConfig
from .progress import SweepProgress
from .report import check_output_paths, jsonable, markdown_report, print_table, results_document, write_json
from .stress import SweepState, planned_runs, run_key, run_sweep
from .train import RunResult, run_from_json

PARTIAL_SCHEMA = "lbw-guard-stress-partial/1"
# Settings that do not change what one run measures: a resumed sweep may differ in these
# (the run set itself -- sizes, lrs, seeds, arms -- may grow or shrink).
RESUME_IGNORES = {"sizes", "lrs", "seeds", "arms", "out_dir", "cache_dir", "progress", "plots", "threads",
                  "compare_speed", "speed_steps"}


@dataclass
class StressOutputs:
    doc: dict | None
    json_path: Path | None
    report_path: Path | None
    plot_paths: list[Path]
    interrupted: bool = False
    finished: int = 0
    total: int = 0
    partial_path: Path | None = None

    def interrupt_message(self) -> str:
        """What an interrupt kept, and how to go on."""
        if not self.finished:
            return "interrupted before any run finished: nothing was written."
        where = (f"results in {self.json_path}, report in {self.report_path}"
                 if self.json_path else "results not written (interrupted while preparing the data)")
        return (f"interrupted: kept {self.finished} of {self.total} runs ({where}; every finished run is in "
                f"{self.partial_path}). To finish the sweep, run the same command again with --resume.")


@dataclass
class Resumed:
    """Finished runs of an earlier, interrupted invocation with the same settings."""

    runs: list[RunResult] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- the partial results file
def save_partial(state: SweepState, path: Path) -> None:
    """Rewrite the partial results file atomically: a crash mid-write leaves the previous one."""
    doc = {"schema": PARTIAL_SCHEMA, "config": state.cfg.to_json(), "runs_planned": state.total_runs,
           "models": state.models, "lora_base": state.bases, "runs": state.runs}
    tmp = path.with_name(path.name + ".tmp")
    write_json(jsonable(doc), tmp)
    os.replace(tmp, path)


def load_resume(cfg: StressConfig, resume: bool) -> Resumed:
    """The runs ``--resume`` skips. Raises ValueError, before any work, if the partial file
    cannot be used, or if one exists and ``--resume`` was not given (it would be overwritten)."""
    check_output_paths(cfg.out_dir, (PARTIAL_NAME, PARTIAL_NAME + ".tmp", "results.json", "report.md"))
    path = cfg.out_dir / PARTIAL_NAME
    if not path.exists():
        if resume:
            _check_finished(cfg, cfg.out_dir / "results.json")
        return Resumed()
    if not resume:
        raise ValueError(f"--out {cfg.out_dir} holds an unfinished sweep ({path}): add --resume to continue it, "
                         "or remove that file (or choose another --out) to start over")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != PARTIAL_SCHEMA:
            raise ValueError(f"not a {PARTIAL_SCHEMA} file")
        runs = [run_from_json(r) for r in doc["runs"]]
        diff = _settings_diff(cfg.to_json(), doc["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume: cannot read {path} ({exc}); remove it to start over") from None
    if diff:
        raise ValueError(f"--resume: {path} was run with different settings ({', '.join(diff)}); use the same "
                         "settings, or remove that file (or choose another --out) to start over")
    planned = set(planned_runs(cfg))
    dropped = [run_key(r) for r in runs if run_key(r) not in planned]
    if dropped:  # the results file is rewritten from the plan: they would be lost
        raise ValueError(f"--resume: {path} holds {len(dropped)} finished run(s) this command does not plan "
                         f"(e.g. {dropped[0]}); resume with the same or more --sizes/--seeds/--lrs/--arms, "
                         "or choose another --out")
    return Resumed(runs, doc.get("models") or {}, doc.get("lora_base") or {})


def _settings_diff(mine: dict, theirs: dict, ignore: set[str] = RESUME_IGNORES) -> list[str]:
    """The settings (less ``ignore``) in which two sweeps' configs differ."""
    mine = {k: v for k, v in mine.items() if k not in ignore}
    theirs = {k: v for k, v in theirs.items() if k not in ignore}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def _check_finished(cfg: StressConfig, path: Path) -> None:
    """``--resume`` where a sweep finished: refused if it ran with other settings (its
    results.json would be overwritten by a different sweep)."""
    if not path.exists():
        return
    try:
        diff = _settings_diff(cfg.to_json(), json.loads(path.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume: --out {cfg.out_dir} holds {path}, which cannot be read ({exc}); "
                         "choose another --out") from None
    if diff:
        raise ValueError(f"--resume: --out {cfg.out_dir} holds a finished sweep run with different settings "
                         f"({', '.join(diff)}); choose another --out, or drop --resume to replace it")


# ---------------------------------------------------------------------------- running
def execute(cfg: StressConfig, console: Console | None = None, resumed: Resumed | None = None) -> StressOutputs:
    """Run the sweep, saving every finished run as it ends; on Ctrl-C write what finished."""
    console = console or Console()
    resumed = resumed or Resumed()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    partial = cfg.out_dir / PARTIAL_NAME
    state = SweepState(cfg, runs=list(resumed.runs), models=dict(resumed.models), bases=dict(resumed.bases),
                       resumed=len(resumed.runs))
    try:
        with SweepProgress(Console(stderr=True, log_path=False), enabled=cfg.progress) as progress:
            sweep = run_sweep(cfg, progress, state, on_run=lambda s: save_partial(s, partial))
    except KeyboardInterrupt:
        return _write_interrupted(state, partial, console)
    outputs = write_outputs(sweep, cfg.out_dir, cfg.plots, console)
    partial.unlink(missing_ok=True)  # results.json now holds every run
    return outputs


def _write_interrupted(state: SweepState, partial: Path, console: Console) -> StressOutputs:
    finished, total = len(state.runs), state.total_runs
    if finished > state.resumed:  # again: the interrupt may have come between a run's end and its save
        save_partial(state, partial)
    if finished == 0 or state.prep is None:  # no run, or no data facts to describe them with
        return StressOutputs(None, None, None, [], True, finished, total, partial if finished else None)
    outputs = write_outputs(state.document(), state.cfg.out_dir, state.cfg.plots, console)
    outputs.interrupted, outputs.finished, outputs.total, outputs.partial_path = True, finished, total, partial
    return outputs


def merge_results(paths: list[Path]) -> dict:
    """One sweep from several results JSONs of the same setting (e.g. learning rates run apart).

    The parts must agree on everything but their learning rates, seeds and arms; wall time is summed.
    """
    docs = [json.loads(Path(p).read_text()) for p in paths]
    if not docs:
        raise ValueError("no results files to merge")
    # the parts must share the model sizes; the rest of what a resume may change can differ
    for p, d in zip(paths, docs):
        diff = _settings_diff(docs[0]["config"], d["config"], RESUME_IGNORES - {"sizes"})
        if diff:
            raise ValueError(f"{p} was run with different settings: {', '.join(diff)}")
    runs, seen = [], {}
    for p, d in zip(paths, docs):
        for r in (run_from_json(r) for r in d["runs"]):
            key = run_key(r)
            if key in seen:  # counted twice it would read as two seeds agreeing
                raise ValueError(f"{p} and {seen[key]} both hold the run {key}; merge each run once")
            seen[key] = p
            runs.append(r)
    config = dict(docs[0]["config"])
    config["lrs"] = sorted({r.lr for r in runs})
    config["seeds"] = sorted({r.seed for r in runs})
    config["arms"] = list(dict.fromkeys(a for d in docs for a in d["config"]["arms"]))
    meta = dict(docs[0]["meta"])
    meta["wall_seconds"] = sum(d["meta"]["wall_seconds"] for d in docs)
    meta["merged_from"] = [str(p) for p in paths]
    meta["part_wall_seconds"] = [d["meta"]["wall_seconds"] for d in docs]
    meta["runs_finished"] = len(runs)
    meta["complete"] = all(d["meta"].get("complete", True) for d in docs)
    meta.pop("runs_planned", None)
    meta.pop("runs_resumed", None)
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
