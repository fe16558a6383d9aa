"""The stress suite's configuration: one validated dataclass, with the calibrated defaults.

DEFAULT_LRS were chosen once from measurement (the calibration note below), not tuned per arm:
every arm runs the same learning rates.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lbw_kernels.backends import BACKEND_NAMES

from ..guard.config import PRESETS as GUARD_PRESETS
from .arms import DEFAULT_ARMS, parse_arm
from .data import MAX_SEED
from .models import ARCHITECTURES, SIZES

MODES = ("full", "lora")
TOKENIZERS = ("bpe", "byte")
SCHEDULES = ("constant", "cosine")
BACKENDS = ("auto",) + BACKEND_NAMES
CORPORA = ("stdlib", "text-file", "wikitext-103", "wikitext-2")

# Calibration, measured once with plain AdamW (tiny Qwen2, BPE-4096 on the Python 3.11 stdlib,
# 200 constant-LR steps of 16 x 128 tokens, seed 0); final held-out perplexity:
#   lr 1e-3: 126.7   3e-3: 97.3 (best)   1e-2: 145.2   3e-2: 438.9 (4.5x)   1e-1: 605.7 (6.2x)
# So the default sweep spans the best rate, a rate AdamW still trains (the false-positive check)
# and one where its final perplexity is >= 5x its best. The same rates serve every arm.
# The LoRA rates are a first guess, not yet calibrated (LoRA adapters tolerate higher rates).
DEFAULT_LRS = {"full": (3e-3, 1e-2, 1e-1), "lora": (1e-3, 1e-2, 3e-2)}
DEFAULT_SIZES = {"cpu": ("tiny",), "cuda": ("qwen2.5-0.5b",)}
# Written into the output directory after every finished run, so an interrupt keeps them.
PARTIAL_NAME = "results.partial.json"


def default_cache_dir() -> Path:
    base = os.environ.get("LBW_GUARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lbw_guard"
    )
    return Path(base)


class StressConfigError(ValueError):
    """An invalid StressConfig value; ``field`` names the setting (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"stress config: {message}")


def config_json(config) -> dict:
    """A config dataclass as JSON values (paths as strings, tuples as lists)."""
    d = asdict(config)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, tuple):
            d[k] = list(v)
    return d


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class StressConfig:
    """Everything one ``lbw-guard stress`` invocation does. Empty tuples mean "the default"."""

    mode: str = "full"
    arch: str = "qwen2"
    sizes: tuple[str, ...] = ()
    arms: tuple[str, ...] = DEFAULT_ARMS
    lrs: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 0
    schedule: str = "constant"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    guard: str = "default"
    backend: str = "auto"  # FusedGuardedAdamW backend for the guard arms
    eval_every: int = 50
    eval_windows: int = 64
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    corpus: str = "stdlib"
    text_file: Path | None = None
    train_chars: int = 3_000_000
    heldout_chars: int = 300_000
    device: str = "cpu"
    precision: str = ""  # "" = bf16 autocast on cuda, fp32 on cpu
    threads: int = 0  # 0 = leave torch's setting alone
    lora_rank: int = 8
    lora_alpha: int = 16
    base_steps: int = 300
    base_lr: float = 3e-3
    compare_speed: bool = False
    speed_steps: int = 0  # 0 = same as steps
    cache_dir: Path = field(default_factory=default_cache_dir)
    out_dir: Path = Path("stress-results")
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise StressConfigError(field, msg)

        need(self.mode in MODES, "mode", f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.arch in ARCHITECTURES, "arch", f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        need(self.device in ("cpu", "cuda"), "device", f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not self.sizes:
            self.sizes = DEFAULT_SIZES[self.device]
        if not self.lrs:
            self.lrs = DEFAULT_LRS[self.mode]
        self.sizes = tuple(self.sizes)
        self.arms = tuple(self.arms)
        self.lrs = tuple(float(x) for x in self.lrs)
        self.seeds = tuple(int(s) for s in self.seeds)
        for s in self.sizes:
            need(s in SIZES, "sizes", f"unknown size {s!r}; choose from {', '.join(SIZES)}")
        need(len(set(self.sizes)) == len(self.sizes), "sizes", f"sizes must be distinct, got {self.sizes}")
        need(len(self.arms) > 0 and len(set(self.arms)) == len(self.arms), "arms",
             "arms must be non-empty and distinct")
        for a in self.arms:
            try:
                parse_arm(a)
            except ValueError as exc:
                raise StressConfigError("arms", str(exc)) from None
        need(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
             "seeds must be non-empty and distinct")
        need(all(0 <= s < MAX_SEED for s in self.seeds), "seeds", f"seeds must be in [0, {MAX_SEED})")
        need(len(set(self.lrs)) == len(self.lrs), "lrs", f"learning rates must be distinct, got {self.lrs}")
        need(all(math.isfinite(x) and x > 0 for x in self.lrs), "lrs",
             f"learning rates must be positive, got {self.lrs}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "lora_rank", "lora_alpha"):
            need(getattr(self, name) >= 1, name, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.seq_len >= 8, "seq_len", "seq_len must be >= 8")
        need(0 <= self.warmup_steps < self.steps, "warmup_steps",
             f"warmup_steps must be in [0, steps) = [0, {self.steps}), got {self.warmup_steps}")
        need(self.schedule in SCHEDULES, "schedule", f"schedule must be one of {SCHEDULES}")
        need(0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1, "betas", f"betas must be in [0, 1), got {self.betas}")
        need(_finite(self.eps) and self.eps > 0, "eps", f"eps must be > 0, got {self.eps}")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        need(self.guard in GUARD_PRESETS, "guard",
             f"unknown guard preset {self.guard!r}; choose one of {', '.join(GUARD_PRESETS)}")
        need(self.backend in BACKENDS, "backend", f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(self.tokenizer in TOKENIZERS, "tokenizer", f"tokenizer must be one of {TOKENIZERS}")
        need(self.tokenizer == "byte" or self.vocab_size >= 512, "vocab_size", "vocab_size must be >= 512 for BPE")
        need(self.corpus in CORPORA, "corpus", f"corpus must be one of {CORPORA}")
        need(self.corpus != "text-file" or self.text_file is not None, "text_file",
             "corpus 'text-file' needs text_file")
        if self.text_file is not None:
            self.text_file = Path(self.text_file)
            need(self.text_file.is_file(), "text_file",
                 f"text file {self.text_file} " + ("is a directory; pass a file" if self.text_file.is_dir()
                                                   else "is not a regular file" if self.text_file.exists()
                                                   else "does not exist"))
        need(self.train_chars > 0 and self.heldout_chars > 0, "train_chars", "character budgets must be positive")
        if not self.precision:
            self.precision = "bf16" if self.device == "cuda" else "fp32"
        need(self.precision in ("fp32", "bf16"), "precision", "precision must be 'fp32' or 'bf16'")
        need(self.threads >= 0, "threads", "threads must be >= 0")
        need(self.base_steps >= 1, "base_steps", f"base_steps must be >= 1, got {self.base_steps}")
        need(_finite(self.base_lr) and self.base_lr > 0, "base_lr", f"base_lr must be positive, got {self.base_lr}")
        need(self.speed_steps >= 0, "speed_steps", "speed_steps must be >= 0")
        self.cache_dir = Path(self.cache_dir)
        self.out_dir = Path(self.out_dir)

    def to_json(self) -> dict:
        return config_json(self)
