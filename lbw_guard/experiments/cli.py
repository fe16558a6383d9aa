"""``lbw-guard stress``: command-line front end of the stress suite.

``register(subparsers)`` adds the subcommand to the main ``lbw-guard`` parser;
``python -m lbw_guard.experiments`` runs it on its own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

from .arms import DEFAULT_ARMS
from .config import (BACKENDS, DEFAULT_LRS, DEFAULT_SIZES, GUARD_PRESETS, MODES, PARTIAL_NAME, SCHEDULES, TOKENIZERS,
                     StressConfig, StressConfigError, default_cache_dir)
from .models import ARCHITECTURES, SIZES

PROG = "lbw-guard stress"
INTERRUPTED = 130  # the shell's code for a SIGINT

# The CI smoke: every arm on the smallest model for a handful of steps.
SMOKE = dict(sizes=("nano",), lrs=(3e-3, 3e-2), steps=12, batch_size=4, seq_len=32, eval_every=6,
             eval_windows=8, vocab_size=512, train_chars=200_000, heldout_chars=30_000, base_steps=10)


def _split(text: str, flag: str | None = None, example: str | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:  # an explicit empty value is a mistake, not "the default" (argparse names the flag)
        hint = f" (e.g. {flag} {example})" if flag else ""
        raise argparse.ArgumentTypeError(f"empty list {text!r}: give at least one value{hint} "
                                         "or leave the flag out for the default")
    return items


def _floats(text: str) -> tuple[float, ...]:
    items = _split(text, "--lrs", "3e-3,1e-2")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    items = _split(text, "--seeds", "0,1,2")
    try:
        return tuple(int(x) for x in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(_split(text))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="full",
                   help="full-parameter training, or LoRA fine-tuning of a cached base model")
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen2", help="model architecture")
    p.add_argument("--sizes", type=_names, default=None,
                   help=f"model sizes, comma-separated ({','.join(SIZES)}); "
                        f"default {','.join(DEFAULT_SIZES['cpu'])} on cpu, {','.join(DEFAULT_SIZES['cuda'])} on cuda")
    p.add_argument("--arms", type=_names, default=",".join(DEFAULT_ARMS),
                   help="optimizer arms, comma-separated: adamw, adamw-fused, guard, guard-off, "
                        "optionally with -clipG (e.g. adamw-clip0.5)")
    p.add_argument("--lrs", type=_floats, default=None,
                   help="learning rates, comma-separated; default "
                        + " (full), ".join(",".join(f"{x:g}" for x in DEFAULT_LRS[m]) for m in MODES) + " (lora)")
    p.add_argument("--seeds", type=_ints, default="0", help="seeds, comma-separated")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule after warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (every arm)")
    p.add_argument("--guard", default="default", metavar="PRESET",
                   help=f"guard preset for the guard arms: {', '.join(GUARD_PRESETS)}")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="FusedGuardedAdamW backend for the guard arms")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of seq-len tokens")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe", help="BPE trained on the corpus, or bytes")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=("wikitext-103", "wikitext-2"),
                     help="real data through the optional 'datasets' package (needs network); "
                          "default: the Python standard library's sources")
    src.add_argument("--text-file", type=Path, help="any local UTF-8 text corpus")
    p.add_argument("--train-chars", type=int, default=3_000_000, help="training corpus budget (characters)")
    p.add_argument("--heldout-chars", type=int, default=300_000, help="held-out corpus budget (characters)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="",
                   help="default: bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (--mode lora)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (--mode lora)")
    p.add_argument("--base-steps", type=int, default=300, help="LoRA base model's pre-training steps")
    p.add_argument("--base-lr", type=float, default=3e-3, help="LoRA base model's pre-training learning rate")
    p.add_argument("--compare-speed", action="store_true",
                   help="also time FusedGuardedAdamW against torch.optim.AdamW(fused=True) at the best lr")
    p.add_argument("--speed-steps", type=int, default=0, help="steps of the speed comparison (0: --steps)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"tokenizers and LoRA bases; default {default_cache_dir()}")
    p.add_argument("--out", type=Path, default=Path("stress-results"), help="output directory")
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted sweep: skip the runs already in OUT/{PARTIAL_NAME} "
                        "(same settings; the learning rates, seeds, arms and sizes may grow). With --matrix: "
                        "the runs of OUT/matrix.partial.json, or of a finished OUT/matrix.json (to add slices, "
                        "seeds or architectures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="train nothing: merge results.json files of one setting (e.g. learning rates run "
                        "in parallel) and write the table, report and plots to --out")
    p.add_argument("--smoke", action="store_true",
                   help="a few-step run of every arm on the smallest model (CI); explicit flags still apply")
    m = p.add_argument_group("generalization matrix (--matrix)")
    m.add_argument("--matrix", action="store_true",
                   help="run the generalization matrix instead of the lr sweep: slices of architectures x schedules "
                        "x lr multiples of each setting's best AdamW lr, LoRA/LoRA+ fine-tuning and injected faults, "
                        "every arm and baseline, several seeds; writes matrix.json, matrix.md and plots to --out "
                        "(default matrix-results). With --matrix, --seeds N means N seeds (0..N-1), a comma list "
                        "names them; --smoke is a CI-sized matrix")
    m.add_argument("--slices", type=_names, default=None,
                   help="matrix slices, comma-separated: lr, finetune, faults (default: all)")
    m.add_argument("--archs", type=_names, default=None,
                   help=f"matrix architectures, comma-separated (default: {','.join(ARCHITECTURES)})")
    m.add_argument("--workers", type=int, default=1,
                   help="matrix runs side by side in this many processes (each with --threads torch threads, "
                        "default 1): on a CPU, tiny models train faster as parallel runs than with more threads")
    m.add_argument("--announce-data-switch", action="store_true",
                   help="matrix data-switch fault: call guard.notify_data_change() at the switch (default: the "
                        "guard is not told)")


def config_from_args(args: argparse.Namespace, argv_given: set[str] | None = None) -> StressConfig:
    kw = dict(
        mode=args.mode, arch=args.arch, sizes=args.sizes or (), arms=args.arms, lrs=args.lrs or (), seeds=args.seeds,
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


# ---------------------------------------------------------------------------- checks before any work
# The flag that sets each StressConfig field, where it is not "--" + the field with dashes.
FLAGS = {"out_dir": "--out", "text_file": "--text-file", "corpus": "--dataset",
         "train_chars": "--train-chars/--heldout-chars", "size": "--smoke", "lr_multiples": "--matrix",
         "ft_multiples": "--matrix", "sweep_lrs_full": "--matrix", "sweep_lrs_lora": "--matrix",
         "lr_schedules": "--matrix", "ft_schedules": "--matrix", "ft_modes": "--matrix", "faults": "--matrix"}


def flag_of(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def missing_package(names: list[str]) -> str | None:
    """The first of ``names`` that cannot be imported (an optional extra not installed)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def required_packages(cfg: StressConfig | None, plots: bool) -> list[str]:
    names = ["rich"]  # console output and progress bars
    if cfg is not None:
        names.append("transformers")  # the models
        if cfg.tokenizer == "bpe":
            names.append("tokenizers")
        if cfg.mode == "lora":
            names.append("peft")
    if plots:
        names.append("matplotlib")
    return names


def _missing_message(name: str) -> str:
    extra = "data" if name == "datasets" else "stress"
    return (f"the optional package '{name}' is not installed; install the stress suite's extras: "
            f"pip install 'lbw-guard-fused[{extra}]'")


def writable_dir_problem(path: Path, flag: str) -> str | None:
    """Create ``path`` if needed and check a file can be written there (before any training)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return (f"{flag} {path}: cannot create or write this directory ({exc.strerror or exc}); "
                f"choose another with {flag} DIR")
    return None


def setup_problem(cfg: StressConfig) -> str | None:
    """What would make the sweep fail after its data preparation, found before it."""
    missing = missing_package(required_packages(cfg, cfg.plots))
    if missing:
        return _missing_message(missing)
    if cfg.corpus.startswith("wikitext") and missing_package(["datasets"]):
        return _missing_message("datasets")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu"
    return writable_dir_problem(cfg.out_dir, "--out") or writable_dir_problem(cfg.cache_dir, "--cache-dir")


def fail(message: str, code: int = 2) -> int:
    """One line, no traceback; exit code 2 for bad input (on stdout, with the command's other output)."""
    print(f"{PROG}: error: {message}")
    return code


# ---------------------------------------------------------------------------- the command
def run_command(args: argparse.Namespace) -> int:
    if args.matrix:
        return matrix_command(args)
    for flag in ("slices", "archs"):
        if getattr(args, flag) is not None:
            return fail(f"--{flag} belongs to --matrix (add --matrix, or use --arch for the lr sweep)")
    if args.announce_data_switch or args.workers != 1:
        return fail(f"{'--announce-data-switch' if args.announce_data_switch else '--workers'} belongs to --matrix")
    if args.merge:
        return merge_command(args)
    try:
        cfg = config_from_args(args, _given(getattr(args, "argv", None)))
    except StressConfigError as exc:
        return fail(f"{flag_of(exc.field)}: {exc.message}")
    except ValueError as exc:
        return fail(str(exc))
    problem = setup_problem(cfg)
    if problem:
        return fail(problem)

    from .runner import execute, load_resume

    try:
        resumed = load_resume(cfg, args.resume)
    except ValueError as exc:
        return fail(str(exc))
    try:
        outputs = execute(cfg, resumed=resumed)
    except ImportError as exc:  # an optional package imported deep inside (the checks above missed it)
        return fail(_missing_message((exc.name or str(exc)).split(".")[0]))
    except ValueError as exc:  # the data did not fit the settings (e.g. a corpus too small to split)
        return fail(str(exc))
    except RuntimeError as exc:  # a diverged LoRA base, a failing backend
        return fail(str(exc), code=1)
    if outputs.interrupted:
        print(outputs.interrupt_message())
        return INTERRUPTED
    return 0


def merge_command(args: argparse.Namespace) -> int:
    missing = missing_package(required_packages(None, not args.no_plots))
    if missing:
        return fail(_missing_message(missing))
    problem = writable_dir_problem(args.out, "--out")
    if problem:
        return fail(problem)

    from rich.console import Console

    from .runner import merge_results, write_outputs

    try:
        sweep = merge_results(args.merge)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return fail(f"--merge: cannot merge: {exc}")
    write_outputs(sweep, args.out, not args.no_plots, Console())
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "stress", help="learning-rate stress test: AdamW vs clipping vs the guard (--matrix: generalization matrix)",
        description="Train a small causal LM under a learning-rate sweep with every arm and report "
                    "final held-out perplexity, time and guard interventions. With --matrix, run the "
                    "generalization matrix instead: architectures x schedules x lr multiples, LoRA/LoRA+ "
                    "fine-tuning and injected faults against AdamW, clipping, SkipStep and ZClip.",
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import HelpFormatter, Parser

    parser = Parser(prog="python -m lbw_guard.experiments", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else 0
    args.argv = argv
    return args.func(args)


# ---------------------------------------------------------------------------- the matrix
# Flags of the lr sweep that mean nothing to the matrix (it chooses these itself).
MATRIX_REJECTS = {
    "mode": "the matrix runs full, LoRA and LoRA+ in its slices",
    "arch": "use --archs",
    "sizes": "the matrix uses one size",
    "lrs": "the matrix finds each setting's best AdamW lr with its own sweep",
    "schedule": "the matrix runs every schedule in its slices",
    "warmup_steps": "the matrix's warmup + cosine schedule warms up over 10% of the run",
    "compare_speed": "not part of the matrix",
    "speed_steps": "not part of the matrix",
    "merge": "not part of the matrix",
    "dataset": "the matrix trains on the stdlib's code and pydoc prose",
    "text_file": "the matrix trains on the stdlib's code and pydoc prose",
    "tokenizer": "the matrix uses one BPE trained on code and prose",
}
MAX_MATRIX_SEEDS = 1000
MAX_WORKERS_PER_CORE = 4

# argparse dest -> MatrixConfig field, for the flags the matrix takes
MATRIX_FIELDS = {
    "slices": "slices", "archs": "archs", "arms": "arms", "steps": "steps", "batch_size": "batch_size",
    "seq_len": "seq_len", "vocab_size": "vocab_size", "eval_every": "eval_every", "eval_windows": "eval_windows",
    "train_chars": "train_chars", "heldout_chars": "heldout_chars", "guard": "guard", "backend": "backend",
    "threads": "threads", "cache_dir": "cache_dir", "out": "out_dir", "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha", "base_steps": "base_steps", "base_lr": "base_lr", "weight_decay": "weight_decay",
    "device": "device", "precision": "precision", "announce_data_switch": "announce_data_switch",
    "workers": "workers",
}


def matrix_config_from_args(args: argparse.Namespace, given: set[str]):
    """The MatrixConfig of the flags given (unset flags keep the matrix's own defaults)."""
    from .matrix import SMOKE, MatrixConfig

    for dest, why in MATRIX_REJECTS.items():
        if dest in given and (dest != "merge" or args.merge):
            raise StressConfigError(dest, f"does not apply to --matrix ({why})")
    kw: dict = {}
    if args.smoke:
        kw.update(SMOKE, smoke=True)
    for dest, name in MATRIX_FIELDS.items():
        if dest in given:
            kw[name] = getattr(args, dest)
    if "seeds" in given:
        seeds = args.seeds
        if len(seeds) == 1:
            if seeds[0] < 1:
                raise StressConfigError("seeds", f"--seeds N with --matrix needs N >= 1, got {seeds[0]}")
            if seeds[0] > MAX_MATRIX_SEEDS:  # each seed is a whole matrix: days of CPU time
                raise StressConfigError("seeds", f"--seeds N with --matrix takes N <= {MAX_MATRIX_SEEDS}, got "
                                                 f"{seeds[0]}; give a comma list to choose seeds")
            seeds = tuple(range(seeds[0]))
        kw["seeds"] = seeds
    if "workers" in given:
        cores = os.cpu_count() or 1
        if args.workers > MAX_WORKERS_PER_CORE * cores:  # each worker holds its own torch (~0.5 GB)
            raise StressConfigError("workers", f"--workers {args.workers} is more than {MAX_WORKERS_PER_CORE} per "
                                               f"core on this machine ({cores} cores); one per core is fastest")
    if args.no_progress:
        kw["progress"] = False
    if args.no_plots:
        kw["plots"] = False
    return MatrixConfig(**kw)


def matrix_command(args: argparse.Namespace) -> int:
    from .matrix import execute_matrix, load_resume

    given = _given(getattr(args, "argv", None))
    try:
        cfg = matrix_config_from_args(args, given)
    except StressConfigError as exc:
        return fail(f"{flag_of(exc.field)}: {exc.message}")
    except ValueError as exc:
        return fail(str(exc))
    names = ["rich", "transformers", "tokenizers"] + (["peft"] if "finetune" in cfg.slices else [])
    missing = missing_package(names + (["matplotlib"] if cfg.plots else []))
    if missing:
        return fail(_missing_message(missing))
    if missing_package(["pydoc_data.topics"]) and ("finetune" in cfg.slices or "data-switch" in cfg.faults):
        return fail("the matrix's prose corpus needs the standard library's pydoc_data package, which this Python "
                    "does not have")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return fail("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    problem = writable_dir_problem(cfg.out_dir, "--out") or writable_dir_problem(cfg.cache_dir, "--cache-dir")
    if problem:
        return fail(problem)
    try:
        load_resume(cfg, args.resume)
    except ValueError as exc:
        return fail(str(exc))
    try:
        outputs = execute_matrix(cfg, resume=args.resume)
    except ImportError as exc:
        return fail(_missing_message((exc.name or str(exc)).split(".")[0]))
    except ValueError as exc:
        return fail(str(exc))
    except RuntimeError as exc:
        return fail(str(exc), code=1)
    if outputs.interrupted:
        print(outputs.interrupt_message())
        return INTERRUPTED
    if outputs.errors:
        print(f"{PROG}: {len(outputs.errors)} matrix run(s) raised an exception; they are recorded as failed runs "
              "in matrix.json and listed in matrix.md")
        return 1
    return 0
