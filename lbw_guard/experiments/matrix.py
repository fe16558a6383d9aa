"""The generalization matrix (``lbw-guard stress --matrix``): does the guard hold up on settings it
was not tuned on?

It is not the full cross product (which would take days on a CPU) but three slices, each a
small cross product of its own:

``lr`` (learning-rate stress)
    architectures x full training x 4 schedules (constant, warmup + cosine, cosine with warm
    restarts, OneCycle) x lr at 1x, 3x, 10x and 30x the setting's best AdamW lr x seeds x arms.
``finetune``
    architectures x {LoRA, LoRA+} x {constant, warmup + cosine} x {1x, 10x} x seeds x arms. The base
    model is pre-trained on source code (AdamW, cached) and fine-tuned on English prose.
``faults``
    architectures x {grad x1e3 ... x1e6, NaN grad, random-token batch, prose -> code data switch}
    x seeds x arms, full training, constant schedule, 1x; each fault run is compared with the clean
    run of the same arm and seed (which is the lr slice's 1x constant run: shared, run once).

"Best AdamW lr" comes from the suite's own sweep: per (architecture, mode, schedule), plain AdamW
with one seed over a half-decade grid (extended past an edge where the best lies on it); the best
is the lowest final held-out loss. Sweep results are cached in ``OUT/sweep.json`` and reused by a
resumed or partial matrix. Every finished run is saved to ``OUT/matrix.partial.json``; ``--resume``
skips them.

Arms (see :mod:`.arms` and :mod:`.baselines`): AdamW, AdamW + clip 1.0, OLMo-core's SkipStep rule,
ZClip, the guard, and AdamW at the guard's mean effective lr (lr x the guard run's
``summary()["mean_scale"]`` for the same cell and seed: is the guard more than an lr cut?).

``--workers N`` trains N runs side by side in worker processes (one torch thread each by
default): these models are too small for intra-op threads to use a second core well. The torch
thread count per run is part of the settings a resumed matrix must keep, since it changes the
float reductions and, after a few hundred steps, the final loss by up to about 1%.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..guard.config import PRESETS as GUARD_PRESETS
from .arms import parse_arm
from .config import BACKENDS, StressConfigError, config_json, default_cache_dir
from .faults import FAULTS, FaultPlan, SwitchData, fault_steps
from .models import ARCHITECTURES, SIZES
from .report import check_output_paths
from .schedules import SCHEDULES, ScheduleSpec

SLICES = ("lr", "finetune", "faults")
MATRIX_ARMS = ("adamw", "adamw-clip1.0", "skipstep", "zclip", "guard", "adamw-guardlr")
FT_MODES = ("lora", "lora+")
MODES = ("full",) + FT_MODES
# Half-decade grids of the AdamW sweep (LoRA adapters take higher rates than full training).
SWEEP_GRIDS = {"full": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "lora": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
PARTIAL_NAME = "matrix.partial.json"
SWEEP_NAME = "sweep.json"
PARTIAL_SCHEMA = "lbw-guard-matrix-partial/1"
SWEEP_SCHEMA = "lbw-guard-matrix-sweep/1"
RESULTS_SCHEMA = "lbw-guard-matrix/1"
LOSS_BLOCK = 5  # the stored training-loss curve: means over blocks of this many steps

# The CI smoke: two architectures, every slice and arm, a handful of steps.
SMOKE = dict(archs=("qwen2", "gpt2"), seeds=(0,), size="nano", steps=16, batch_size=4, seq_len=32, vocab_size=512,
             eval_every=8, eval_windows=8, train_chars=200_000, heldout_chars=30_000, prose_chars=60_000,
             lr_schedules=("constant",), lr_multiples=(1.0, 10.0), ft_modes=("lora+",), ft_schedules=("constant",),
             ft_multiples=(1.0,), faults=("spike-1e4", "data-switch"), sweep_lrs_full=(1e-3, 1e-2),
             sweep_lrs_lora=(1e-3, 1e-2), sweep_extend=0, base_steps=8)


@dataclass
class MatrixConfig:
    """Everything one ``lbw-guard stress --matrix`` invocation does."""

    archs: tuple[str, ...] = ARCHITECTURES
    slices: tuple[str, ...] = SLICES
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = MATRIX_ARMS
    size: str = "micro"
    steps: int = 240
    batch_size: int = 16
    seq_len: int = 64
    vocab_size: int = 1024
    eval_every: int = 60
    eval_windows: int = 64
    train_chars: int = 1_500_000  # source code (the stdlib)
    heldout_chars: int = 150_000
    prose_chars: int = 10**9  # English prose (pydoc topics): all of it by default
    lr_schedules: tuple[str, ...] = SCHEDULES
    lr_multiples: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    ft_modes: tuple[str, ...] = FT_MODES
    ft_schedules: tuple[str, ...] = ("constant", "cosine")
    ft_multiples: tuple[float, ...] = (1.0, 10.0)
    faults: tuple[str, ...] = FAULTS
    sweep_lrs_full: tuple[float, ...] = SWEEP_GRIDS["full"]
    sweep_lrs_lora: tuple[float, ...] = SWEEP_GRIDS["lora"]
    sweep_extend: int = 2  # extra half-decade points past an edge of the grid where the best lies on it
    warmup_fraction: float = 0.1
    restart_cycles: int = 4
    onecycle_pct: float = 0.25
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    guard: str = "default"
    backend: str = "auto"
    announce_data_switch: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_plus_ratio: float = 16.0
    base_steps: int = 300
    base_lr: float = 3e-3
    device: str = "cpu"
    precision: str = ""
    threads: int = 0  # torch threads per process (0: torch's default; 1 per worker with workers > 1)
    workers: int = 1  # processes running runs side by side (the plan and the results do not change)
    smoke: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)
    out_dir: Path = Path("matrix-results")
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise StressConfigError(name, msg)

        for name in ("archs", "slices", "seeds", "arms", "lr_schedules", "lr_multiples", "ft_modes", "ft_schedules",
                     "ft_multiples", "faults", "sweep_lrs_full", "sweep_lrs_lora", "betas"):
            setattr(self, name, tuple(getattr(self, name)))
        self.seeds = tuple(int(s) for s in self.seeds)
        for name in ("lr_multiples", "ft_multiples", "sweep_lrs_full", "sweep_lrs_lora"):
            setattr(self, name, tuple(float(x) for x in getattr(self, name)))

        def choices(name: str, allowed: tuple, nonempty: bool = True) -> None:
            values = getattr(self, name)
            need(not nonempty or len(values) > 0, name, f"{name} must not be empty")
            for v in values:
                need(v in allowed, name, f"unknown {name[:-1] if name.endswith('s') else name} {v!r}; "
                                         f"choose from {', '.join(map(str, allowed))}")
            need(len(set(values)) == len(values), name, f"{name} must be distinct, got {values}")

        choices("archs", ARCHITECTURES)
        choices("slices", SLICES)
        choices("lr_schedules", SCHEDULES)
        choices("ft_modes", FT_MODES)
        choices("ft_schedules", SCHEDULES)
        choices("faults", FAULTS)
        need(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
             "seeds must be non-empty and distinct")
        need(all(s >= 0 for s in self.seeds), "seeds", "seeds must be non-negative")
        need(len(self.arms) > 0 and len(set(self.arms)) == len(self.arms), "arms", "arms must be non-empty and distinct")
        for a in self.arms:
            try:
                parse_arm(a)
            except ValueError as exc:
                raise StressConfigError("arms", str(exc)) from None
        if "adamw-guardlr" in self.arms:
            need("guard" in self.arms and self.arms.index("guard") < self.arms.index("adamw-guardlr"), "arms",
                 "adamw-guardlr (AdamW at the guard's mean lr) needs the guard arm, listed before it")
        for name in ("lr_multiples", "ft_multiples", "sweep_lrs_full", "sweep_lrs_lora"):
            values = getattr(self, name)
            need(len(values) > 0 and len(set(values)) == len(values), name, f"{name} must be non-empty and distinct")
            need(all(math.isfinite(x) and x > 0 for x in values), name, f"{name} must be positive, got {values}")
        need(self.size in SIZES, "size", f"unknown size {self.size!r}; choose from {', '.join(SIZES)}")
        for name in ("steps", "batch_size", "eval_every", "eval_windows", "lora_rank", "lora_alpha", "base_steps",
                     "restart_cycles"):
            need(getattr(self, name) >= 1, name, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.steps >= 8, "steps", f"steps must be >= 8 (the faults fire at fractions of the run), got {self.steps}")
        need(self.seq_len >= 8, "seq_len", "seq_len must be >= 8")
        need(self.vocab_size >= 512, "vocab_size", "vocab_size must be >= 512 for BPE")
        need(self.sweep_extend >= 0, "sweep_extend", "sweep_extend must be >= 0")
        need(0 <= self.warmup_fraction < 1 and 0 < self.onecycle_pct < 1, "warmup_fraction",
             "warmup_fraction must be in [0, 1) and onecycle_pct in (0, 1)")
        need(self.restart_cycles <= self.steps, "restart_cycles", "restart_cycles must be <= steps")
        need(0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1, "betas", f"betas must be in [0, 1), got {self.betas}")
        need(math.isfinite(self.eps) and self.eps > 0, "eps", "eps must be > 0")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        need(math.isfinite(self.base_lr) and self.base_lr > 0, "base_lr", "base_lr must be positive")
        need(math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0, "lora_plus_ratio",
             "lora_plus_ratio must be positive")
        need(self.guard in GUARD_PRESETS, "guard",
             f"unknown guard preset {self.guard!r}; choose one of {', '.join(GUARD_PRESETS)}")
        need(self.backend in BACKENDS, "backend", f"backend must be one of {', '.join(BACKENDS)}")
        need(self.device in ("cpu", "cuda"), "device", "device must be 'cpu' or 'cuda'")
        if not self.precision:
            self.precision = "bf16" if self.device == "cuda" else "fp32"
        need(self.precision in ("fp32", "bf16"), "precision", "precision must be 'fp32' or 'bf16'")
        need(self.train_chars > 0 and self.heldout_chars > 0 and self.prose_chars > 0, "train_chars",
             "character budgets must be positive")
        need(self.threads >= 0, "threads", "threads must be >= 0")
        need(self.workers >= 1, "workers", f"workers must be >= 1, got {self.workers}")
        self.cache_dir = Path(self.cache_dir)
        self.out_dir = Path(self.out_dir)

    def to_json(self) -> dict:
        return config_json(self)

    def run_fingerprint(self) -> dict:
        """The settings that change what one run measures (a resumed matrix must keep them)."""
        keep = ("size", "steps", "batch_size", "seq_len", "vocab_size", "eval_every", "eval_windows", "train_chars",
                "heldout_chars", "prose_chars", "warmup_fraction", "restart_cycles", "onecycle_pct", "betas", "eps",
                "weight_decay", "guard", "backend", "announce_data_switch", "lora_rank", "lora_alpha",
                "lora_plus_ratio", "base_steps", "base_lr", "device", "precision")
        d = self.to_json()
        # torch's thread count changes the float reductions, and a few hundred steps amplify that
        # to differences of about 1% in final loss: runs to compare (or reuse) share it.
        return {k: d[k] for k in keep} | {"sweep_seed": self.sweep_seed, "torch_threads": self.torch_threads}

    @property
    def torch_threads(self) -> int:
        """The torch threads each run trains with."""
        return self.threads or (1 if self.workers > 1 else torch.get_num_threads())

    def sweep_fingerprint(self) -> dict:
        """What the AdamW sweep depends on (the guard's settings do not matter to it)."""
        d = self.run_fingerprint()
        for k in ("guard", "backend", "announce_data_switch"):
            d.pop(k)
        return d | {"sweep_lrs_full": list(self.sweep_lrs_full), "sweep_lrs_lora": list(self.sweep_lrs_lora),
                    "sweep_extend": self.sweep_extend}

    @property
    def sweep_seed(self) -> int:
        return self.seeds[0]

    def schedule(self, name: str) -> ScheduleSpec:
        return ScheduleSpec(name, self.steps, self.warmup_fraction, self.restart_cycles, self.onecycle_pct)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Setting:
    """What the AdamW sweep is run for: the best lr of (architecture, mode, schedule)."""

    arch: str
    mode: str  # full, lora, lora+
    schedule: str

    @property
    def id(self) -> str:
        return f"{self.arch}/{self.mode}/{self.schedule}"


# (arch, mode, schedule, multiple, fault, seed, arm)
RunKey = tuple[str, str, str, float, str, int, str]


def cells(cfg: MatrixConfig) -> list[tuple[str, Setting, float, str]]:
    """(slice, setting, lr multiple, fault) of every cell, in run order."""
    out = []
    for arch in cfg.archs:
        if "lr" in cfg.slices:
            for sched in cfg.lr_schedules:
                for mult in cfg.lr_multiples:
                    out.append(("lr", Setting(arch, "full", sched), mult, "clean"))
        if "faults" in cfg.slices:
            for fault in ("clean",) + cfg.faults:
                out.append(("faults", Setting(arch, "full", "constant"), 1.0, fault))
        if "finetune" in cfg.slices:
            for mode in cfg.ft_modes:
                for sched in cfg.ft_schedules:
                    for mult in cfg.ft_multiples:
                        out.append(("finetune", Setting(arch, mode, sched), mult, "clean"))
    return out


def planned_runs(cfg: MatrixConfig) -> list[RunKey]:
    """Every run of the matrix once (a cell two slices share runs once), in run order."""
    seen: dict[RunKey, None] = {}
    for _slice, st, mult, fault in cells(cfg):
        for seed in cfg.seeds:
            for arm in cfg.arms:
                seen.setdefault((st.arch, st.mode, st.schedule, mult, fault, seed, arm), None)
    return list(seen)


def settings_needed(cfg: MatrixConfig) -> list[Setting]:
    return list(dict.fromkeys(st for _s, st, _m, _f in cells(cfg)))


def record_key(r: dict) -> RunKey:
    return (r["arch"], r["mode"], r["schedule"], float(r["multiple"]), r["fault"], int(r["seed"]), r["arm"])


def _half_decade(x: float, up: bool) -> float:
    """The next point of a 1-3-10 grid above (below) ``x``."""
    exp = math.floor(math.log10(x) + 1e-9)
    mant = x / 10**exp
    if up:
        return float(f"{(3 if mant < 2 else 10) * 10**exp:.3g}")
    return float(f"{(1 if mant > 2 else 0.3) * 10**exp:.3g}")


# ---------------------------------------------------------------------------- data
@dataclass
class MatrixData:
    code: object  # TokenData
    prose: object  # TokenData
    code_eval: torch.Tensor
    prose_eval: torch.Tensor
    code_key: str
    facts: dict
    seconds: float


def prepare_matrix_data(cfg: MatrixConfig) -> MatrixData:
    """Source code (the stdlib) and English prose (pydoc topics), one BPE trained on both."""
    from .corpus import load_corpus, load_prose_corpus
    from .data import TokenData
    from .tokenizer import bpe_tokenizer

    t0 = time.perf_counter()
    code = load_corpus("stdlib", train_chars=cfg.train_chars, heldout_chars=cfg.heldout_chars)
    prose = load_prose_corpus(train_chars=cfg.prose_chars, heldout_chars=max(cfg.prose_chars // 10, 1))
    joint_key = hashlib.sha1(f"{code.fingerprint}+{prose.fingerprint}".encode()).hexdigest()[:16]
    tok = bpe_tokenizer(code.train + prose.train, cfg.vocab_size, cfg.cache_dir, joint_key)
    code_data = TokenData(tok.encode_documents(code.train), tok.encode_documents(code.heldout), tok.vocab_size,
                          cfg.seq_len)
    prose_data = TokenData(tok.encode_documents(prose.train), tok.encode_documents(prose.heldout), tok.vocab_size,
                           cfg.seq_len)
    facts = {
        "code": {"name": code.name, "fingerprint": code.fingerprint, "train_documents": len(code.train),
                 "heldout_documents": len(code.heldout), "train_tokens": code_data.train.numel(),
                 "heldout_tokens": code_data.heldout.numel()},
        "prose": {"name": prose.name, "fingerprint": prose.fingerprint, "train_documents": len(prose.train),
                  "heldout_documents": len(prose.heldout), "train_tokens": prose_data.train.numel(),
                  "heldout_tokens": prose_data.heldout.numel()},
        "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size, "trained_on": "code + prose training splits"},
    }
    return MatrixData(code_data, prose_data, code_data.eval_windows(cfg.eval_windows),
                      prose_data.eval_windows(cfg.eval_windows), f"{joint_key}-bpe-{tok.vocab_size}", facts,
                      time.perf_counter() - t0)


# ---------------------------------------------------------------------------- one run
def _settings(cfg: MatrixConfig, steps: int | None = None):
    from .train import RunSettings

    return RunSettings(steps=steps or cfg.steps, batch_size=cfg.batch_size, warmup_steps=0, schedule="constant",
                       betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, guard=cfg.guard,
                       backend=cfg.backend, eval_every=cfg.eval_every, device=cfg.device, precision=cfg.precision)


def _subsample(points: list, limit: int = 60) -> list:
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    return list(points[::stride]) + ([points[-1]] if (len(points) - 1) % stride else [])


def _block_means(values: list[float], block: int = LOSS_BLOCK) -> list[float]:
    out = []
    for i in range(0, len(values), block):
        chunk = values[i:i + block]
        out.append(round(sum(chunk) / len(chunk), 4) if all(math.isfinite(x) for x in chunk) else math.nan)
    return out


def make_record(key: RunKey, result, base_lr: float, fault: FaultPlan | None) -> dict:
    """The JSON record of one run (compact: block-mean losses, subsampled guard history)."""
    arch, mode, schedule, mult, fault_name, seed, arm = key
    rec = {
        "arch": arch, "mode": mode, "schedule": schedule, "multiple": mult, "fault": fault_name, "seed": seed,
        "arm": arm, "lr": result.lr, "base_lr": base_lr,
        "final_loss": result.final_loss, "final_ppl": result.final_ppl, "diverged": result.diverged,
        "survived": bool(result.extra.get("survived", math.isfinite(result.final_loss))),
        "steps_run": result.steps_run, "train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds,
        "seconds_per_step": result.seconds_per_step, "trainable_params": result.trainable_params,
        "backend": result.backend,
        "train_loss_curve": _block_means(result.train_losses),
        "eval_curve": [(s, round(math.log(p), 5) if math.isfinite(p) and p > 0 else math.inf)
                       for s, p in result.eval_curve],
        "guard": None, "baseline": result.extra.get("baseline"), "reused": None,
    }
    if fault is not None and fault.name != "clean":
        rec["fault_steps"] = sorted(fault.at)
    if result.guard is not None:
        g = result.guard
        rec["guard"] = {
            "capped_fraction": g.capped_fraction, "skipped_fraction": g.skipped_fraction,
            "partly_skipped_fraction": g.partly_skipped_fraction, "frozen_fraction": g.frozen_fraction,
            "mean_scale": g.mean_lr_scale, "min_scale": g.min_lr_scale, "rollbacks": g.rollbacks,
            "interventions": g.interventions, "gave_up": g.gave_up, "steps_accounted": g.steps_accounted,
            "actions": g.actions, "final_regime": g.final_regime,
            "intervention_steps": g.intervention_steps[:30],
            "lr_scale_history": [(st, round(x, 4)) for st, x in _subsample(g.lr_scale_history, 40)],
        }
    return rec


def error_record(key: RunKey, lr: float, base_lr: float, exc: BaseException) -> dict:
    """The record of a run that raised: reported as a failed run; ``--resume`` runs it again."""
    import traceback

    arch, mode, schedule, mult, fault, seed, arm = key
    return {"arch": arch, "mode": mode, "schedule": schedule, "multiple": mult, "fault": fault, "seed": seed,
            "arm": arm, "lr": lr, "base_lr": base_lr, "final_loss": None, "final_ppl": None, "diverged": True,
            "survived": False, "steps_run": 0, "train_seconds": 0.0, "eval_seconds": 0.0, "seconds_per_step": 0.0,
            "trainable_params": 0, "backend": "", "train_loss_curve": [], "eval_curve": [], "guard": None,
            "baseline": None, "reused": None, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=-4)}


def _clone(rec: dict, key: RunKey, reused: str, **changes) -> dict:
    out = json.loads(json.dumps(_jsonable(rec)))
    arch, mode, schedule, mult, fault, seed, arm = key
    out.update(arch=arch, mode=mode, schedule=schedule, multiple=mult, fault=fault, seed=seed, arm=arm,
               reused=reused, **changes)
    return out


def _jsonable(obj):
    from .report import jsonable

    return jsonable(obj)


# ---------------------------------------------------------------------------- state, saving, resuming
@dataclass
class MatrixState:
    cfg: MatrixConfig
    records: dict = field(default_factory=dict)  # RunKey -> record
    sweeps: dict = field(default_factory=dict)  # setting id -> sweep entry
    bases: dict = field(default_factory=dict)  # arch -> LoRA base summary
    models: dict = field(default_factory=dict)  # "arch/mode" -> parameter counts
    data: MatrixData | None = None
    resumed: int = 0
    started: float = field(default_factory=time.perf_counter)
    sweep_seconds: float = 0.0

    @property
    def total_runs(self) -> int:
        return len(planned_runs(self.cfg))

    def runs_in_order(self) -> list[dict]:
        order = {k: i for i, k in enumerate(planned_runs(self.cfg))}
        return [self.records[k] for k in sorted(self.records, key=lambda k: order.get(k, len(order)))]


def dumps(doc: dict) -> str:
    """Strict JSON, indented, except that each run record is one line (thousands of runs stay
    readable and diffable)."""
    doc = _jsonable(doc)
    runs = doc.get("runs")
    if not isinstance(runs, list):
        return json.dumps(doc, indent=1, allow_nan=False) + "\n"
    marker = "__matrix_runs__"
    text = json.dumps({**doc, "runs": marker}, indent=1, allow_nan=False)
    body = "[\n" + ",\n".join("  " + json.dumps(r, separators=(",", ":"), allow_nan=False) for r in runs) + "\n ]"
    return text.replace(json.dumps(marker), body, 1) + "\n"


def _write_json_atomic(doc: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(doc))
    os.replace(tmp, path)


def save_partial(state: MatrixState) -> None:
    doc = {"schema": PARTIAL_SCHEMA, "config": state.cfg.to_json(), "fingerprint": state.cfg.run_fingerprint(),
           "runs_planned": state.total_runs, "bases": state.bases, "models": state.models,
           "runs": list(state.records.values())}
    _write_json_atomic(doc, state.cfg.out_dir / PARTIAL_NAME)


def save_sweeps(state: MatrixState) -> None:
    path = state.cfg.out_dir / SWEEP_NAME
    doc = {"schema": SWEEP_SCHEMA, "fingerprint": state.cfg.sweep_fingerprint(), "settings": state.sweeps}
    _write_json_atomic(doc, path)


def load_sweeps(cfg: MatrixConfig) -> dict:
    """Cached sweep entries of ``OUT/sweep.json`` made with the same settings ({} otherwise)."""
    path = cfg.out_dir / SWEEP_NAME
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if doc.get("schema") != SWEEP_SCHEMA or doc.get("fingerprint") != _jsonable(cfg.sweep_fingerprint()):
        return {}
    return dict(doc.get("settings") or {})


def load_resume(cfg: MatrixConfig, resume: bool) -> tuple[dict, dict, dict]:
    """(records, bases, models) that ``--resume`` keeps: the runs of ``OUT/matrix.partial.json``
    or, where there is none, of a finished ``OUT/matrix.json`` (so a matrix can grow slice by
    slice: ``--slices faults``, then ``--slices faults,lr --resume``). Raises ValueError before
    any work if the file cannot be used, or a partial one exists and ``--resume`` was not given."""
    check_output_paths(cfg.out_dir,
                       (PARTIAL_NAME, PARTIAL_NAME + ".tmp", "matrix.json", "matrix.json.tmp", "matrix.md"))
    path = cfg.out_dir / PARTIAL_NAME
    schema = PARTIAL_SCHEMA
    if not path.exists():
        path, schema = cfg.out_dir / "matrix.json", RESULTS_SCHEMA
        if not (resume and path.exists()):
            return {}, {}, {}
    if not resume:
        raise ValueError(f"--out {cfg.out_dir} holds an unfinished matrix ({path}): add --resume to continue it, "
                         "or remove that file (or choose another --out) to start over")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != schema:
            raise ValueError(f"not a {schema} file")
        theirs = doc["fingerprint"]
        runs = {record_key(r): r for r in doc["runs"] if not r.get("error")}  # runs that raised: again
        if schema == RESULTS_SCHEMA:
            doc = {"bases": doc["meta"].get("lora_bases"), "models": doc["meta"].get("models")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume: cannot read {path} ({exc}); remove it to start over") from None
    mine = _jsonable(cfg.run_fingerprint())
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"--resume: {path} was run with different settings ({', '.join(diff)}); use the same "
                         "settings, or remove that file (or choose another --out) to start over")
    planned = set(planned_runs(cfg))
    dropped = [k for k in runs if k not in planned]
    if dropped and schema == PARTIAL_SCHEMA:  # unfinished work the rewrite from the plan would lose
        raise ValueError(f"--resume: {path} holds {len(dropped)} finished run(s) this command does not plan "
                         f"(e.g. {dropped[0]}); resume with the same or more --archs/--seeds/--slices, "
                         "or choose another --out")
    # (a finished matrix.json may be re-rendered for a subset: test_resume_from_a_finished_matrix_...)
    return ({k: r for k, r in runs.items() if k in planned}, doc.get("bases") or {}, doc.get("models") or {})


# ---------------------------------------------------------------------------- the runner
class MatrixRunner:
    def __init__(self, state: MatrixState, progress) -> None:
        self.state = state
        self.cfg = state.cfg
        self.progress = progress
        self._base_states: dict[str, dict] = {}

    # -- models and data per run
    def _model(self, arch: str, mode: str, seed: int):
        from .lora import lora_model, lora_plus_groups
        from .models import build_model, count_parameters
        from .train import layer_param_groups

        cfg, data = self.cfg, self.state.data
        if mode == "full":
            model = build_model(arch, cfg.size, data.code.vocab_size, cfg.seq_len, seed)
            groups = None
        else:
            model = lora_model(arch, cfg.size, self._base_state(arch), data.code.vocab_size, cfg.seq_len,
                               cfg.lora_rank, cfg.lora_alpha, seed)
            groups = layer_param_groups(model)
            if mode == "lora+":
                groups = lora_plus_groups(model, groups, cfg.lora_plus_ratio)
        key = f"{arch}/{'full' if mode == 'full' else 'lora'}"
        if key not in self.state.models:
            self.state.models[key] = {"total_params": count_parameters(model),
                                      "trainable_params": count_parameters(model, trainable_only=True)}
        return model, groups

    def _base_state(self, arch: str) -> dict:
        from .lora import base_model_state

        if arch not in self._base_states:
            cfg, data = self.cfg, self.state.data
            with self.progress.run(f"LoRA base {arch} {cfg.size} (AdamW lr {cfg.base_lr:g}, code)",
                                   cfg.base_steps) as tick:
                state, summary = base_model_state(arch, cfg.size, data.code, data.code_key, data.code_eval,
                                                  _settings(cfg, cfg.base_steps), cfg.base_lr, cfg.cache_dir,
                                                  on_step=tick)
            self._base_states[arch] = state
            self.state.bases[arch] = summary
        return self._base_states[arch]

    def _data(self, mode: str, fault: str):
        d = self.state.data
        if mode != "full":
            return d.prose, d.prose_eval
        if fault == "data-switch":
            switch = fault_steps("data-switch", self.cfg.steps)[0]
            return SwitchData(d.prose, d.code, switch), d.code_eval
        return d.code, d.code_eval

    def train(self, key: RunKey, lr: float, arm_name: str, label: str) -> tuple:
        from .train import train_run

        arch, mode, schedule, _mult, fault_name, seed, _arm = key
        model, groups = self._model(arch, mode, seed)
        data, windows = self._data(mode, fault_name)
        fault = FaultPlan(fault_name, self.cfg.steps, announce=self.cfg.announce_data_switch) \
            if fault_name != "clean" else None
        with self.progress.run(label, self.cfg.steps) as tick:
            result = train_run(model, parse_arm(arm_name), lr, seed, data, windows, _settings(self.cfg),
                               size=self.cfg.size, mode=mode, on_step=tick, groups=groups,
                               lr_schedule=self.cfg.schedule(schedule), fault=fault)
        return result, fault

    # -- the sweep
    def _sweep_entry(self, st: Setting) -> dict:
        entry = self.state.sweeps.get(st.id)
        if entry is None:
            entry = {"setting": asdict(st), "seed": self.cfg.sweep_seed, "runs": {}, "complete": False}
            self.state.sweeps[st.id] = entry  # saved after every sweep run: an interrupt keeps them
        return entry

    def _sweep_next(self, st: Setting) -> list[float]:
        """The learning rates the sweep of ``st`` still needs ([] once complete: then its best is set).

        First the missing points of the grid; then, while the best lies on an edge, one more
        half-decade point past it (at most ``sweep_extend``)."""
        cfg = self.cfg
        entry = self._sweep_entry(st)
        if entry.get("complete"):
            return []
        base_grid = set(cfg.sweep_lrs_full if st.mode == "full" else cfg.sweep_lrs_lora)
        done = {float(k) for k in entry["runs"]}
        missing = sorted(base_grid - done)
        if missing:
            return missing
        losses = {float(k): _num(r["final_loss"]) for k, r in entry["runs"].items()}
        finite = {k: v for k, v in losses.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"the AdamW sweep of {st.id} diverged at every lr of {sorted(losses)}")
        best = min(finite, key=finite.get)
        lo, hi = min(losses), max(losses)
        if len(done - base_grid) < cfg.sweep_extend and best in (lo, hi) and len(losses) > 1:
            return [_half_decade(best, up=best == hi)]
        entry.update(best_lr=best, best_loss=finite[best], grid=sorted(losses), complete=True, edge=best in (lo, hi))
        save_sweeps(self.state)
        return []

    def sweep_run(self, st: Setting, lr: float) -> dict:
        """One AdamW run of the sweep of ``st`` (its JSON record)."""
        key = (st.arch, st.mode, st.schedule, 1.0, "clean", self.cfg.sweep_seed, "adamw")
        result, _ = self.train(key, lr, "adamw", f"sweep {st.id} AdamW lr {lr:g}")
        rec = _jsonable(make_record(key, result, lr, None))
        rec["sweep"] = True
        return rec

    def _sweep_done(self, st: Setting, lr: float, rec: dict) -> None:
        self._sweep_entry(st)["runs"][f"{lr:g}"] = rec
        save_sweeps(self.state)
        self.progress.advance(f"sweep {st.id} lr {lr:g}: held-out loss {_fmt(_num(rec['final_loss']))}")

    def sweep(self, st: Setting) -> dict:
        """The sweep entry of ``st`` (cached, or run now)."""
        t0 = time.perf_counter()
        while lrs := self._sweep_next(st):
            self.progress.add_total(len(lrs))
            for lr in lrs:
                self._sweep_done(st, lr, self.sweep_run(st, lr))
        self.state.sweep_seconds += time.perf_counter() - t0
        return self.state.sweeps[st.id]

    # -- the matrix runs
    def plan_key(self, key: RunKey) -> tuple[dict | None, float, float, float | None]:
        """(a record that needs no training, or None; lr; the setting's best AdamW lr; the guard's
        mean scale for adamw-guardlr). The setting's sweep must be complete."""
        arch, mode, schedule, mult, fault, seed, arm = key
        entry = self.state.sweeps[Setting(arch, mode, schedule).id]
        base_lr = float(entry["best_lr"])
        lr = base_lr * mult
        rec = self._reuse(key, entry, lr)
        if rec is not None or arm != "adamw-guardlr":
            return rec, lr, base_lr, None
        guard_rec = self.state.records.get(key[:-1] + ("guard",))
        if not (guard_rec and guard_rec.get("guard")):
            return (error_record(key, lr, base_lr, RuntimeError("the guard run of this cell failed or is missing: "
                                                                "no mean lr scale to use")), lr, base_lr, None)
        scale = float(guard_rec["guard"]["mean_scale"])
        return None, lr * scale, base_lr, scale

    def train_record(self, key: RunKey, lr: float, base_lr: float, scale: float | None) -> dict:
        """Train the run ``key`` at ``lr`` and return its record (an error record if it raised)."""
        arch, mode, schedule, mult, fault, seed, arm = key
        label = f"{arch} {mode} {schedule} {mult:g}x {fault} seed {seed} {parse_arm(arm).label} lr {lr:.3g}"
        try:
            result, fplan = self.train(key, lr, arm, label)
            rec = _jsonable(make_record(key, result, base_lr, fplan))
        except Exception as exc:  # noqa: BLE001 -- one crashing run must not end hours of others
            rec = error_record(key, lr, base_lr, exc)
        if scale is not None:
            rec["lr_scale_from_guard"] = scale
        return rec

    def _finish(self, key: RunKey, rec: dict) -> None:
        self.state.records[key] = rec
        save_partial(self.state)
        if rec.get("error"):
            self.progress.note(f"run {' '.join(map(str, key))} raised {rec['error']}")
        self.progress.advance(_run_line(rec))

    def _start(self) -> list[RunKey]:
        cfg, state = self.cfg, self.state
        todo = [k for k in planned_runs(cfg) if k not in state.records]
        self.progress.start_sweep(state.total_runs, completed=state.total_runs - len(todo), title="matrix (runs)")
        if state.records:
            self.progress.note(f"resuming: {len(state.records)} of {state.total_runs} runs already done")
        return todo

    def run(self) -> None:
        """Every run not yet done, one after the other in this process."""
        for key in self._start():
            self.sweep(Setting(*key[:3]))
            rec, lr, base_lr, scale = self.plan_key(key)
            self._finish(key, rec if rec is not None else self.train_record(key, lr, base_lr, scale))

    def run_parallel(self, workers: int, threads: int) -> None:
        """Every run not yet done, in ``workers`` processes of ``threads`` torch threads each: tiny
        models use cores far better as parallel runs than as intra-op threads. Phases: LoRA base
        models, the sweeps, every arm but adamw-guardlr, then adamw-guardlr (it needs the guard's
        runs). This process only plans, saves and reports."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        todo = self._start()
        if not todo:
            return
        workers = min(workers, len(todo))  # a process per run at most
        self.progress.note(f"running in {workers} worker processes x {threads} torch thread(s)")
        ctx = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
        with _workers_skip_main():
            self._run_pool(todo, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                     initargs=(self.cfg.to_json(), threads)))

    def _run_pool(self, todo: list[RunKey], ex) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        try:
            # LoRA base models (cached on disk, where the workers load them from)
            archs = list(dict.fromkeys(k[0] for k in todo if k[1] != "full"))
            futures = {ex.submit(_worker_call, "base_summary", arch): arch for arch in archs}
            for fut in futures:
                self.state.bases[futures[fut]] = self._merge(fut.result())
            # the sweeps
            t0 = time.perf_counter()
            pending: dict = {}
            outstanding: dict[Setting, int] = {}

            def submit(st: Setting) -> None:
                lrs = self._sweep_next(st)
                self.progress.add_total(len(lrs))
                for lr in lrs:
                    pending[ex.submit(_worker_call, "sweep_run", st, lr)] = (st, lr)
                outstanding[st] = len(lrs)

            for st in dict.fromkeys(Setting(*k[:3]) for k in todo):
                submit(st)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    st, lr = pending.pop(fut)
                    self._sweep_done(st, lr, self._merge(fut.result()))
                    outstanding[st] -= 1
                    if not outstanding[st]:
                        submit(st)
            self.state.sweep_seconds += time.perf_counter() - t0
            # the runs: first everything the adamw-guardlr runs do not depend on, then those
            for batch in ([k for k in todo if k[-1] != "adamw-guardlr"], [k for k in todo if k[-1] == "adamw-guardlr"]):
                futures = {}
                for key in batch:
                    rec, lr, base_lr, scale = self.plan_key(key)
                    if rec is not None:
                        self._finish(key, rec)
                    else:
                        futures[ex.submit(_worker_call, "train_record", key, lr, base_lr, scale)] = key
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for fut in done:
                        self._finish(futures.pop(fut), self._merge(fut.result()))
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)  # the running runs end; nothing new starts
            raise
        ex.shutdown(wait=True)

    def _merge(self, answer: tuple) -> object:
        """A worker's (result, its parameter counts): keep the counts, return the result."""
        result, models = answer
        for k, v in models.items():
            self.state.models.setdefault(k, v)
        return result

    def base_summary(self, arch: str) -> dict:
        self._base_state(arch)
        return self.state.bases[arch]

    def _reuse(self, key: RunKey, entry: dict, lr: float) -> dict | None:
        """A run identical to one already made: AdamW at 1x with the sweep's seed is the sweep's
        best run; AdamW at the guard's mean lr when that scale is 1 is plain AdamW."""
        arch, mode, schedule, mult, fault, seed, arm = key
        if arm == "adamw" and mult == 1.0 and fault == "clean" and seed == self.cfg.sweep_seed:
            return _clone(entry["runs"][f"{float(entry['best_lr']):g}"], key, "sweep", sweep=False)
        if arm == "adamw-guardlr":
            guard_rec = self.state.records.get(key[:-1] + ("guard",))
            adamw_rec = self.state.records.get(key[:-1] + ("adamw",))
            if guard_rec and guard_rec.get("guard") and adamw_rec:
                scale = float(guard_rec["guard"]["mean_scale"])
                if abs(scale - 1.0) < 1e-12:
                    return _clone(adamw_rec, key, "adamw", lr_scale_from_guard=scale)
        return None


# ---------------------------------------------------------------------------- worker processes
_WORKER: MatrixRunner | None = None


@contextlib.contextmanager
def _workers_skip_main():
    """Spawned workers normally re-import the parent's ``__main__`` (for ``python -m lbw_guard``
    that module runs the CLI on import). The workers need only this module: while the pool is
    alive, ``__main__`` shows multiprocessing neither a module name nor a file to re-import."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


def _worker_init(cfg_json: dict, threads: int) -> None:
    """A worker process: its own copy of the data (the tokenizer comes from the cache)."""
    import signal

    from .progress import SweepProgress

    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops handing out runs
    torch.set_num_threads(threads)
    cfg = MatrixConfig(**{**cfg_json, "progress": False})
    state = MatrixState(cfg)
    state.data = prepare_matrix_data(cfg)
    _WORKER = MatrixRunner(state, SweepProgress(enabled=False))


def _worker_call(method: str, *args) -> tuple:
    return getattr(_WORKER, method)(*args), dict(_WORKER.state.models)


def _num(x) -> float:
    return math.inf if x is None else float(x)


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "diverged"


def _run_line(rec: dict) -> str:
    text = (f"{rec['arch']} {rec['mode']} {rec['schedule']} {rec['multiple']:g}x {rec['fault']} seed {rec['seed']} "
            f"{rec['arm']}: loss {_fmt(_num(rec['final_loss']))}, {rec['train_seconds']:.1f}s")
    if rec.get("reused"):
        text += f" (same run as {rec['reused']})"
    g = rec.get("guard")
    if g:
        text += (f"; capped {g['capped_fraction']:.1%} skipped {g['skipped_fraction']:.1%} mean scale "
                 f"{g['mean_scale']:.2f} rollbacks {g['rollbacks']}")
    return text


# ---------------------------------------------------------------------------- the document
def _source_fingerprint() -> str:
    from .stress import _source_fingerprint as fp

    return fp()


def metadata(state: MatrixState) -> dict:
    import transformers

    meta = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor() or "unknown", "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if state.cfg.device == "cuda" else "cpu",
        "torch_threads": state.cfg.torch_threads, "workers": state.cfg.workers, "argv": sys.argv,
        "optimizer_source_sha1": _source_fingerprint(),
        "wall_seconds": time.perf_counter() - state.started, "sweep_seconds": state.sweep_seconds,
        "runs_planned": state.total_runs, "runs_finished": len(state.records), "runs_resumed": state.resumed,
        "complete": len(state.records) == state.total_runs, "models": state.models, "lora_bases": state.bases,
    }
    for name in ("peft", "tokenizers", "matplotlib", "rich"):
        try:
            meta[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    if state.data is not None:
        meta["data"] = state.data.facts
        meta["prepare_seconds"] = state.data.seconds
    return meta


def matrix_document(state: MatrixState) -> dict:
    from .matrix_report import summarize_matrix

    runs = state.runs_in_order()
    doc = {"schema": RESULTS_SCHEMA, "meta": metadata(state), "config": state.cfg.to_json(),
           "fingerprint": state.cfg.run_fingerprint(),
           "plan": {"slices": _plan_description(state.cfg), "cells": [
               {"slice": s, "setting": st.id, "multiple": m, "fault": f} for s, st, m, f in cells(state.cfg)]},
           "sweeps": {sid: _sweep_summary(e) for sid, e in state.sweeps.items()}, "runs": runs}
    doc = _jsonable(doc)
    doc["summary"] = _jsonable(summarize_matrix(doc))
    return doc


def _sweep_summary(entry: dict) -> dict:
    """A sweep entry without its runs' curves (those stay in OUT/sweep.json)."""
    keep = ("lr", "final_loss", "diverged", "steps_run", "train_seconds")
    return {**entry, "runs": {k: {f: r.get(f) for f in keep} for k, r in entry["runs"].items()}}


def _plan_description(cfg: MatrixConfig) -> dict:
    n_seeds, n_arms, n_arch = len(cfg.seeds), len(cfg.arms), len(cfg.archs)
    out = {}
    if "lr" in cfg.slices:
        out["lr"] = {"shape": "archs x full x schedules x lr multiples x seeds x arms",
                     "runs": n_arch * len(cfg.lr_schedules) * len(cfg.lr_multiples) * n_seeds * n_arms}
    if "finetune" in cfg.slices:
        out["finetune"] = {"shape": "archs x {lora, lora+} x schedules x lr multiples x seeds x arms",
                           "runs": n_arch * len(cfg.ft_modes) * len(cfg.ft_schedules) * len(cfg.ft_multiples)
                           * n_seeds * n_arms}
    if "faults" in cfg.slices:
        out["faults"] = {"shape": "archs x (faults + clean) x seeds x arms (full, constant, 1x)",
                         "runs": n_arch * (len(cfg.faults) + 1) * n_seeds * n_arms,
                         "note": "the clean run is the lr slice's 1x constant run when both slices run"}
    return out


# ---------------------------------------------------------------------------- entry point
@dataclass
class MatrixOutputs:
    doc: dict | None
    json_path: Path | None
    report_path: Path | None
    plot_paths: list[Path]
    interrupted: bool = False
    finished: int = 0
    total: int = 0

    @property
    def errors(self) -> list[dict]:
        return (self.doc or {}).get("summary", {}).get("errors", [])

    def interrupt_message(self) -> str:
        if not self.finished:
            return "interrupted before any run finished: nothing but the sweep cache was written."
        return (f"interrupted: kept {self.finished} of {self.total} runs (results so far in {self.json_path}; every "
                f"finished run is in {PARTIAL_NAME}). To finish the matrix, run the same command again with --resume.")


def execute_matrix(cfg: MatrixConfig, console=None, resume: bool = False) -> MatrixOutputs:
    """Run the matrix (saving every finished run), then write matrix.json, matrix.md and plots."""
    from rich.console import Console

    from .progress import SweepProgress

    if console is None:  # piped output (CI logs, files): wide enough for the tables
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))
    records, bases, models = load_resume(cfg, resume)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state = MatrixState(cfg, records=dict(records), bases=dict(bases), models=dict(models), resumed=len(records))
    state.sweeps = load_sweeps(cfg)
    try:
        with SweepProgress(Console(stderr=True, log_path=False), enabled=cfg.progress) as progress:
            progress.note("preparing code and prose corpora and the tokenizer")
            state.data = prepare_matrix_data(cfg)
            f = state.data.facts
            progress.note(f"code {f['code']['train_tokens']:,} / prose {f['prose']['train_tokens']:,} training "
                          f"tokens, vocab {f['tokenizer']['vocab_size']}, in {state.data.seconds:.1f}s")
            if state.sweeps:
                progress.note(f"sweep cache: {len(state.sweeps)} settings from {cfg.out_dir / SWEEP_NAME}")
            runner = MatrixRunner(state, progress)
            if cfg.workers > 1:
                runner.run_parallel(cfg.workers, cfg.torch_threads)
            else:
                runner.run()
    except KeyboardInterrupt:
        if state.records:
            save_partial(state)
        out = MatrixOutputs(None, None, None, [], True, len(state.records), state.total_runs)
        if state.records and state.data is not None:
            written = write_matrix_outputs(matrix_document(state), cfg.out_dir, cfg.plots, console)
            out.doc, out.json_path, out.report_path, out.plot_paths = written
        return out
    doc = matrix_document(state)
    written = write_matrix_outputs(doc, cfg.out_dir, cfg.plots, console)
    (cfg.out_dir / PARTIAL_NAME).unlink(missing_ok=True)  # matrix.json now holds every run
    return MatrixOutputs(*written, finished=len(state.records), total=state.total_runs)


def write_matrix_outputs(doc: dict, out: Path, plots: bool, console) -> tuple:
    from .matrix_report import markdown_matrix, print_matrix

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "matrix.json"
    _write_json_atomic(doc, json_path)
    plot_paths: list[Path] = []
    if plots:
        from .matrix_plots import write_matrix_plots

        plot_paths = write_matrix_plots(doc, out)
    report_path = out / "matrix.md"
    report_path.write_text(markdown_matrix(doc, [p.name for p in plot_paths]))
    print_matrix(doc, console)
    console.print(f"matrix: {json_path}  report: {report_path}  plots: "
                  f"{', '.join(p.name for p in plot_paths) or 'none'}")
    return doc, json_path, report_path, plot_paths
