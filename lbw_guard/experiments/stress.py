"""The learning-rate stress sweep: arms x learning rates x seeds (x model sizes), then a report."""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .arms import parse_arm
from .config import StressConfig
from .corpus import Corpus, load_corpus
from .data import TokenData
from .lora import base_model_state, lora_model
from .models import build_model, count_parameters
from .progress import SweepProgress
from .tokenizer import TextTokenizer, bpe_tokenizer, byte_tokenizer
from .train import RunResult, RunSettings, train_run

SPEED_ARMS = ("adamw-fused", "guard-off", "guard")
# --compare-speed's target: the held-out perplexity within this factor of the sweep's best AdamW.
SPEED_TARGET_FACTOR = 1.10


@dataclass
class Prepared:
    corpus: Corpus
    tokenizer: TextTokenizer
    data: TokenData
    eval_windows: torch.Tensor
    data_key: str
    prepare_seconds: float


def prepare_data(cfg: StressConfig) -> Prepared:
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.corpus, text_file=cfg.text_file, train_chars=cfg.train_chars,
                         heldout_chars=cfg.heldout_chars)
    if cfg.tokenizer == "byte":
        tok = byte_tokenizer()
    else:
        tok = bpe_tokenizer(corpus.train, cfg.vocab_size, cfg.cache_dir, corpus.fingerprint)
    data = TokenData(tok.encode_documents(corpus.train), tok.encode_documents(corpus.heldout),
                     tok.vocab_size, cfg.seq_len)
    key = f"{corpus.fingerprint}-{tok.kind}-{tok.vocab_size}"
    return Prepared(corpus, tok, data, data.eval_windows(cfg.eval_windows), key, time.perf_counter() - t0)


def run_settings(cfg: StressConfig, steps: int | None = None, lr_warmup: int | None = None) -> RunSettings:
    return RunSettings(
        steps=steps or cfg.steps, batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps if lr_warmup is None else lr_warmup,
        schedule=cfg.schedule, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        guard=cfg.guard, backend=cfg.backend, eval_every=cfg.eval_every, device=cfg.device, precision=cfg.precision,
    )


def _check_device(cfg: StressConfig) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")


RunKey = tuple[str, int, float, str]


def planned_runs(cfg: StressConfig) -> list[RunKey]:
    """Every (size, seed, lr, arm) of the sweep, in the order they run."""
    return [(size, seed, lr, arm) for size in cfg.sizes for seed in cfg.seeds for lr in cfg.lrs for arm in cfg.arms]


def run_key(r: RunResult) -> RunKey:
    return (r.size, r.seed, r.lr, r.arm)


@dataclass
class SweepState:
    """What a sweep has finished so far: enough to write its results after an interrupt.

    ``runs`` may start with runs of an earlier, interrupted invocation (``--resume``).
    """

    cfg: StressConfig
    runs: list[RunResult] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)
    prep: Prepared | None = None
    speed: dict | None = None
    resumed: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def total_runs(self) -> int:
        return len(planned_runs(self.cfg))

    def document(self) -> dict:
        """The results document of the runs finished so far (needs the prepared data's facts)."""
        assert self.prep is not None, "no data prepared yet"
        order = {key: i for i, key in enumerate(planned_runs(self.cfg))}
        runs = sorted(self.runs, key=lambda r: order.get(run_key(r), len(order)))
        meta = _meta(self.cfg, self.prep, self.models, self.bases, time.perf_counter() - self.started)
        meta.update(runs_planned=self.total_runs, runs_finished=len(runs), runs_resumed=self.resumed,
                    complete=len(runs) == self.total_runs)
        return {"meta": meta, "config": self.cfg.to_json(), "runs": runs, "speed": self.speed}


def run_sweep(cfg: StressConfig, progress: SweepProgress, state: SweepState | None = None,
              on_run: Callable[[SweepState], None] | None = None) -> dict:
    """Run every (size, seed, lr, arm) of ``cfg`` and return the results document (JSON-ready).

    Runs already in ``state`` are skipped; ``on_run(state)`` is called after each finished run
    (to save it), and ``state`` holds everything finished if the sweep is interrupted.
    """
    state = state or SweepState(cfg)
    _check_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress.note("preparing corpus and tokenizer")
    prep = state.prep = prepare_data(cfg)
    progress.note(
        f"corpus {prep.corpus.name}: {len(prep.corpus.train)} train / {len(prep.corpus.heldout)} held-out "
        f"documents, {prep.data.train.numel():,} / {prep.data.heldout.numel():,} tokens "
        f"({prep.tokenizer.kind}, vocab {prep.tokenizer.vocab_size}) in {prep.prepare_seconds:.1f}s"
    )
    settings = run_settings(cfg)
    arms = {a: parse_arm(a) for a in cfg.arms}
    done = {run_key(r) for r in state.runs}
    todo = [key for key in planned_runs(cfg) if key not in done]
    progress.start_sweep(state.total_runs, completed=state.total_runs - len(todo))
    if done:
        progress.note(f"resuming: {len(done)} of {state.total_runs} runs already done")

    base_state, base_size = None, None
    for size, seed, lr, arm_name in todo:
        arm = arms[arm_name]
        if cfg.mode == "lora" and base_size != size:  # once per size, and only if a run needs it
            base_settings = run_settings(cfg, steps=cfg.base_steps, lr_warmup=0)
            with progress.run(f"LoRA base {size} (AdamW lr {cfg.base_lr:g})", cfg.base_steps) as tick:
                base_state, state.bases[size] = base_model_state(
                    cfg.arch, size, prep.data, prep.data_key, prep.eval_windows, base_settings,
                    cfg.base_lr, cfg.cache_dir, on_step=tick)
            base_size = size
        model = _make_model(cfg, size, seed, prep, base_state)
        if size not in state.models:
            state.models[size] = {
                "total_params": count_parameters(model),
                "trainable_params": count_parameters(model, trainable_only=True),
            }
        label = f"{size} seed {seed} lr {lr:g} {arm.label}"
        with progress.run(label, cfg.steps) as tick:
            result = train_run(model, arm, lr, seed, prep.data, prep.eval_windows, settings,
                               size=size, mode=cfg.mode, on_step=tick)
        del model
        state.runs.append(result)
        progress.finish_run(result)
        if on_run is not None:
            on_run(state)

    if cfg.compare_speed:
        state.speed = compare_speed(cfg, prep, state.runs, progress)
    return state.document()


def _make_model(cfg: StressConfig, size: str, seed: int, prep: Prepared, base_state: dict | None):
    if cfg.mode == "lora":
        return lora_model(cfg.arch, size, base_state, prep.data.vocab_size, cfg.seq_len,
                          cfg.lora_rank, cfg.lora_alpha, seed)
    return build_model(cfg.arch, size, prep.data.vocab_size, cfg.seq_len, seed)


def _best_adamw_lr(runs: list[RunResult], size: str) -> tuple[float, float] | None:
    """(lr, mean final ppl) of plain AdamW's best learning rate for ``size``."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r.size == size and r.arm == "adamw":
            by_lr.setdefault(r.lr, []).append(r.final_ppl)
    if not by_lr:
        return None
    lr, ppls = min(by_lr.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return lr, sum(ppls) / len(ppls)


def compare_speed(cfg: StressConfig, prep: Prepared, runs: list[RunResult], progress: SweepProgress) -> dict:
    """FusedGuardedAdamW (guard on and off) against torch's fused AdamW at the best learning rate."""
    size, seed = cfg.sizes[0], cfg.seeds[0]
    best = _best_adamw_lr(runs, size)
    lr = best[0] if best else cfg.lrs[0]
    target = best[1] * SPEED_TARGET_FACTOR if best and math.isfinite(best[1]) else None
    steps = cfg.speed_steps or cfg.steps
    settings = run_settings(cfg, steps=steps)
    base_state = None
    if cfg.mode == "lora":
        base_state, _ = base_model_state(cfg.arch, size, prep.data, prep.data_key, prep.eval_windows,
                                         run_settings(cfg, steps=cfg.base_steps, lr_warmup=0),
                                         cfg.base_lr, cfg.cache_dir)
    results = {}
    for name in SPEED_ARMS:
        model = _make_model(cfg, size, seed, prep, base_state)
        with progress.run(f"speed: {name} lr {lr:g}", steps) as tick:
            r = train_run(model, parse_arm(name), lr, seed, prep.data, prep.eval_windows, settings,
                          size=size, mode=cfg.mode, on_step=tick, target_ppl=target)
        results[name] = r
    ref = results["adamw-fused"].seconds_per_step
    return {
        "size": size, "lr": lr, "seed": seed, "steps": steps, "target_ppl": target,
        "target_rule": f"{SPEED_TARGET_FACTOR:g} x the sweep's best plain-AdamW final perplexity",
        "arms": {
            name: {
                "seconds_per_step": r.seconds_per_step,
                "step_time_ratio_vs_torch_fused": r.seconds_per_step / ref if ref > 0 else None,
                "time_to_target_s": r.extra.get("time_to_target_s"),
                "final_ppl": r.final_ppl,
                "tokens_per_second": r.tokens_per_second,
                "backend": r.backend,
            }
            for name, r in results.items()
        },
        "note": "seconds per step include forward and backward, not only the optimizer step",
    }


def _source_fingerprint() -> str:
    """A hash of the optimizer and guard sources, so a result names the guard version it measured."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha1()
    for path in sorted([root / "optimizer.py", *sorted((root / "guard").glob("*.py"))]):
        if path.exists():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _meta(cfg: StressConfig, prep: Prepared, models: dict, bases: dict, wall: float) -> dict:
    import transformers

    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else (platform.processor() or "cpu"),
        "torch_threads": torch.get_num_threads(),
        "corpus": {
            "name": prep.corpus.name, "fingerprint": prep.corpus.fingerprint,
            "train_documents": len(prep.corpus.train), "heldout_documents": len(prep.corpus.heldout),
            "train_tokens": prep.data.train.numel(), "heldout_tokens": prep.data.heldout.numel(),
            "eval_tokens": int(prep.eval_windows[:, 1:].numel()),
        },
        "tokenizer": {"kind": prep.tokenizer.kind, "vocab_size": prep.tokenizer.vocab_size},
        "models": models,
        "wall_seconds": wall,
        "argv": sys.argv,
        "optimizer_source_sha1": _source_fingerprint(),
    }
    if bases:
        meta["lora_base"] = bases
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    return meta
