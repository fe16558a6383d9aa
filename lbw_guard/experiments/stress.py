"""The learning-rate stress sweep: arms x learning rates x seeds (x model sizes), then a report."""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


def run_sweep(cfg: StressConfig, progress: SweepProgress) -> dict:
    """Run every (size, seed, lr, arm) of ``cfg`` and return the results document (JSON-ready)."""
    _check_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    progress.note("preparing corpus and tokenizer")
    prep = prepare_data(cfg)
    progress.note(
        f"corpus {prep.corpus.name}: {len(prep.corpus.train)} train / {len(prep.corpus.heldout)} held-out "
        f"documents, {prep.data.train.numel():,} / {prep.data.heldout.numel():,} tokens "
        f"({prep.tokenizer.kind}, vocab {prep.tokenizer.vocab_size}) in {prep.prepare_seconds:.1f}s"
    )
    settings = run_settings(cfg)
    arms = [parse_arm(a) for a in cfg.arms]
    runs: list[RunResult] = []
    models: dict[str, dict] = {}
    bases: dict[str, dict] = {}
    total_runs = len(cfg.sizes) * len(cfg.seeds) * len(cfg.lrs) * len(arms)
    progress.start_sweep(total_runs)

    for size in cfg.sizes:
        base_state = None
        if cfg.mode == "lora":
            base_settings = run_settings(cfg, steps=cfg.base_steps, lr_warmup=0)
            with progress.run(f"LoRA base {size} (AdamW lr {cfg.base_lr:g})", cfg.base_steps) as tick:
                base_state, bases[size] = base_model_state(
                    cfg.arch, size, prep.data, prep.data_key, prep.eval_windows, base_settings,
                    cfg.base_lr, cfg.cache_dir, on_step=tick)
        for seed in cfg.seeds:
            for lr in cfg.lrs:
                for arm in arms:
                    model = _make_model(cfg, size, seed, prep, base_state)
                    if size not in models:
                        models[size] = {
                            "total_params": count_parameters(model),
                            "trainable_params": count_parameters(model, trainable_only=True),
                        }
                    label = f"{size} seed {seed} lr {lr:g} {arm.label}"
                    with progress.run(label, cfg.steps) as tick:
                        result = train_run(model, arm, lr, seed, prep.data, prep.eval_windows, settings,
                                           size=size, mode=cfg.mode, on_step=tick)
                    runs.append(result)
                    progress.finish_run(result)
                    del model

    speed = None
    if cfg.compare_speed:
        speed = compare_speed(cfg, prep, runs, progress)
    return {
        "meta": _meta(cfg, prep, models, bases, time.perf_counter() - started),
        "config": cfg.to_json(),
        "runs": runs,
        "speed": speed,
    }


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
