"""``lbw-guard stress``: command-line front end of the stress suite.

``register(subparsers)`` adds the subcommand to the main ``lbw-guard`` parser;
``python -m lbw_guard.experiments`` runs it on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arms import DEFAULT_ARMS
from .config import BACKENDS, DEFAULT_LRS, MODES, SCHEDULES, TOKENIZERS, StressConfig, default_cache_dir
from .models import ARCHITECTURES

# The CI smoke: every arm on the smallest model for a handful of steps.
SMOKE = dict(sizes=("nano",), lrs=(3e-3, 3e-2), steps=12, batch_size=4, seq_len=32, eval_every=6,
             eval_windows=8, vocab_size=512, train_chars=200_000, heldout_chars=30_000, base_steps=10)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="full",
                   help="full-parameter training, or LoRA fine-tuning of a cached base model")
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen2")
    p.add_argument("--sizes", type=_names, default=(),
                   help="model sizes, comma-separated (nano,tiny,small,base,qwen2.5-0.5b,tinyllama-1.1b); "
                        "default tiny on cpu, qwen2.5-0.5b on cuda")
    p.add_argument("--arms", type=_names, default=DEFAULT_ARMS, help=f"default {','.join(DEFAULT_ARMS)}")
    p.add_argument("--lrs", type=_floats, default=(),
                   help=f"learning rates; default {DEFAULT_LRS['full']} (full), {DEFAULT_LRS['lora']} (lora)")
    p.add_argument("--seeds", type=_ints, default=(0,))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--guard", default="default", help="guard preset for the guard arms")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="FusedGuardedAdamW backend for the guard arms")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of seq-len tokens")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=("wikitext-103", "wikitext-2"),
                     help="real data through the optional 'datasets' package (needs network)")
    src.add_argument("--text-file", type=Path, help="any local UTF-8 text corpus")
    p.add_argument("--train-chars", type=int, default=3_000_000)
    p.add_argument("--heldout-chars", type=int, default=300_000)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="",
                   help="default: bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--base-steps", type=int, default=300, help="LoRA base model's pre-training steps")
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--compare-speed", action="store_true",
                   help="also time FusedGuardedAdamW against torch.optim.AdamW(fused=True) at the best lr")
    p.add_argument("--speed-steps", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    p.add_argument("--out", type=Path, default=Path("stress-results"), help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="train nothing: merge results.json files of one setting (e.g. learning rates run "
                        "in parallel) and write the table, report and plots to --out")
    p.add_argument("--smoke", action="store_true",
                   help="a few-step run of every arm on the smallest model (CI); explicit flags still apply")


def config_from_args(args: argparse.Namespace, argv_given: set[str] | None = None) -> StressConfig:
    kw = dict(
        mode=args.mode, arch=args.arch, sizes=args.sizes, arms=args.arms, lrs=args.lrs, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup_steps,
        schedule=args.schedule, weight_decay=args.weight_decay, guard=args.guard, backend=args.backend, eval_every=args.eval_every,
        eval_windows=args.eval_windows, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        corpus=args.dataset or ("text-file" if args.text_file else "stdlib"), text_file=args.text_file,
        train_chars=args.train_chars, heldout_chars=args.heldout_chars, device=args.device,
        precision=args.precision, threads=args.threads, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        base_steps=args.base_steps, base_lr=args.base_lr, compare_speed=args.compare_speed,
        speed_steps=args.speed_steps, out_dir=args.out, progress=not args.no_progress, plots=not args.no_plots,
    )
    if args.cache_dir is not None:
        kw["cache_dir"] = args.cache_dir
    if args.smoke:
        given = argv_given or set()
        for key, value in SMOKE.items():
            if key not in given:
                kw[key] = value
    return StressConfig(**kw)


def _given(argv: list[str] | None) -> set[str]:
    """Config keys the user set explicitly, so --smoke does not override them."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .runner import execute, merge_results, write_outputs

    console = Console()
    if args.merge:
        try:
            sweep = merge_results(args.merge)
        except (OSError, ValueError, KeyError) as exc:
            console.print(f"[red]error:[/red] cannot merge: {exc}")
            return 2
        write_outputs(sweep, args.out, not args.no_plots, console)
        return 0
    try:
        cfg = config_from_args(args, getattr(args, "_given", None) or _given(None))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    try:
        execute(cfg, console)
    except RuntimeError as exc:  # unavailable device, missing optional package, diverged base
        console.print(f"[red]error:[/red] {exc}")
        return 1
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stress", help="learning-rate stress test: AdamW vs clipping vs the guard",
        description="Train a small causal LM under a learning-rate sweep with every arm and report "
                    "final held-out perplexity, time and guard interventions.",
    )
    add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbw_guard.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    args._given = _given(argv)
    return args.func(args)
