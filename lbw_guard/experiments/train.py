"""One training run: a model, an arm, a learning rate and a seed, measured end to end."""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .arms import Arm, Stepper, build_optimizer
from .data import TokenData
from .guard_stats import GuardRecorder, GuardStats
from .models import count_parameters

# A run whose training loss stayed non-finite this many steps in a row is dead: stop it early.
_DEAD_AFTER = 25


@dataclass
class RunSettings:
    steps: int
    batch_size: int
    warmup_steps: int
    schedule: str
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    guard: str
    backend: str
    eval_every: int
    device: str
    precision: str


@dataclass
class RunResult:
    arm: str
    lr: float
    seed: int
    size: str
    mode: str
    steps_run: int
    final_loss: float  # held-out mean NLL (nats/token); inf when the run diverged
    final_ppl: float
    diverged: bool
    train_losses: list[float]
    eval_curve: list[tuple[int, float]]  # (step, held-out perplexity)
    train_seconds: float
    eval_seconds: float
    tokens_per_second: float
    seconds_per_step: float
    guard: GuardStats | None = None
    trainable_params: int = 0
    backend: str = ""
    extra: dict = field(default_factory=dict)


def layer_param_groups(model: torch.nn.Module) -> list[dict]:
    """Trainable parameters grouped per transformer layer (plus embeddings and the rest).

    Every arm gets the same groups, so the AdamW math is identical; the guard uses them to
    freeze only the layers that carry outliers. (GPT-2's ``wte``/``wpe`` land in "head".)
    """
    groups: dict[str, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        m = re.search(r"(?:layers|\.h)\.(\d+)\.", name)  # Qwen2/Llama/NeoX "layers.N.", GPT-2 "h.N."
        key = f"layer{int(m.group(1)):03d}" if m else ("embed" if "embed" in name else "head")
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "name": k} for k, ps in sorted(groups.items())]


def lr_lambda(settings: RunSettings) -> Callable[[int], float]:
    warm, total = settings.warmup_steps, settings.steps

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if settings.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def _autocast(settings: RunSettings):
    if settings.precision == "bf16":
        return torch.autocast(device_type=settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batch_loss(model: torch.nn.Module, tokens: torch.Tensor, settings: RunSettings) -> torch.Tensor:
    with _autocast(settings):
        logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, windows: torch.Tensor, settings: RunSettings) -> float:
    """Mean next-token NLL over the held-out windows (nats/token); inf if not finite."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(settings.batch_size):
        chunk = chunk.to(settings.device)
        n = chunk[:, 1:].numel()
        total += float(batch_loss(model, chunk, settings)) * n
        count += n
    model.train(was_training)
    nll = total / max(count, 1)
    return nll if math.isfinite(nll) else math.inf


def perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def train_run(
    model: torch.nn.Module,
    arm: Arm,
    lr: float,
    seed: int,
    data: TokenData,
    eval_windows: torch.Tensor,
    settings: RunSettings,
    *,
    size: str = "",
    mode: str = "full",
    on_step: Callable[[int], None] | None = None,
    target_ppl: float | None = None,
    groups: list[dict] | None = None,
    lr_schedule=None,
    fault=None,
) -> RunResult:
    """Train ``model`` in place with ``arm`` at ``lr``; evaluate every ``eval_every`` steps.

    The loss is kept on the device each step (no host sync) and read back in blocks.
    ``target_ppl`` records the training time at which held-out perplexity first reached it.
    ``groups``: parameter groups (default :func:`layer_param_groups`); a group's ``lr_factor``
    multiplies ``lr`` for it (LoRA+). ``lr_schedule``: a :class:`.schedules.ScheduleSpec` (default:
    ``settings.schedule`` through :func:`lr_lambda`). ``fault``: a :class:`.faults.FaultPlan`
    that corrupts batches or gradients at its steps (the same for every arm).
    """
    device = settings.device
    model.to(device).train()
    groups = layer_param_groups(model) if groups is None else groups
    groups = [_with_lr(g, lr) for g in groups]
    params = [p for g in groups for p in g["params"]]
    gave_up: list[int] = []
    guard_spec = _guard_with_hook(settings.guard, gave_up) if arm.guarded else settings.guard
    optimizer = build_optimizer(arm, groups, lr, settings.betas, settings.eps, settings.weight_decay,
                                guard_spec, settings.backend)
    if lr_schedule is not None:
        from .schedules import make_scheduler

        scheduler = make_scheduler(lr_schedule, optimizer)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    stepper = Stepper(arm, optimizer, params)
    recorder = GuardRecorder(optimizer, settings.steps) if arm.guarded else None
    schedule = data.batch_schedule(settings.steps, settings.batch_size, seed)
    if fault is not None:
        fault.bind(groups, data.vocab_size, seed)
    losses = torch.full((settings.steps,), math.nan, device=device)
    eval_curve: list[tuple[int, float]] = []
    train_s = eval_s = 0.0
    time_to_target: float | None = None
    steps_run = 0
    last_nll = math.inf
    # The optimizer's own global RNG use (none today) must not depend on the arm order.
    torch.manual_seed(seed)

    _sync(device)
    t0 = time.perf_counter()
    for step in range(settings.steps):
        tokens = data.batch(schedule[step]).to(device, non_blocking=True)
        if fault is not None:
            tokens = fault.corrupt_batch(step, tokens)
        loss = batch_loss(model, tokens, settings)
        loss.backward()
        if fault is not None:
            fault.corrupt_grads(step)
            if arm.guarded and fault.announce_at(step):
                optimizer.guard.notify_data_change()
        stepper.step(loss)
        if recorder is not None:
            recorder.after_step(step)
        scheduler.step()
        losses[step] = loss.detach()
        steps_run = step + 1
        if on_step is not None:
            on_step(steps_run)
        last = steps_run == settings.steps
        if steps_run % settings.eval_every == 0 or last:
            _sync(device)
            t1 = time.perf_counter()
            train_s += t1 - t0
            last_nll = heldout_nll(model, eval_windows, settings)
            ppl = perplexity(last_nll)
            eval_curve.append((steps_run, ppl))
            if target_ppl is not None and time_to_target is None and ppl <= target_ppl:
                time_to_target = train_s
            t0 = time.perf_counter()
            eval_s += t0 - t1
        if steps_run % _DEAD_AFTER == 0 and not last:
            if not torch.isfinite(losses[steps_run - _DEAD_AFTER : steps_run]).any():
                break  # dead run: finish the clock, skip the rest
    _sync(device)
    train_s += time.perf_counter() - t0

    if eval_curve and eval_curve[-1][0] == steps_run:
        final_nll = last_nll
    else:  # stopped early: evaluate where it stopped
        t1 = time.perf_counter()
        final_nll = heldout_nll(model, eval_windows, settings)
        eval_s += time.perf_counter() - t1
        eval_curve.append((steps_run, perplexity(final_nll)))
    tokens_trained = steps_run * settings.batch_size * data.seq_len
    guard_stats = recorder.finish(steps_run) if recorder is not None else None
    if guard_stats is not None:
        guard_stats.gave_up = len(gave_up)
    params_finite = all(bool(torch.isfinite(p.detach()).all()) for p in params)
    result = RunResult(
        arm=arm.name,
        lr=lr,
        seed=seed,
        size=size,
        mode=mode,
        steps_run=steps_run,
        final_loss=final_nll,
        final_ppl=perplexity(final_nll),
        diverged=not math.isfinite(final_nll) or steps_run < settings.steps,
        train_losses=losses[:steps_run].tolist(),
        eval_curve=eval_curve,
        train_seconds=train_s,
        eval_seconds=eval_s,
        tokens_per_second=tokens_trained / train_s if train_s > 0 else 0.0,
        seconds_per_step=train_s / max(steps_run, 1),
        guard=guard_stats,
        trainable_params=count_parameters(model, trainable_only=True),
        backend=getattr(optimizer, "backend_name", "torch-fused" if arm.optimizer == "adamw-fused" else "torch-foreach"),
    )
    # "survived": finite parameters and a finite final held-out loss (the run may still be bad)
    result.extra["survived"] = params_finite and math.isfinite(final_nll)
    baseline = stepper.stats()
    if baseline is not None:
        result.extra["baseline"] = baseline
    if time_to_target is not None or target_ppl is not None:
        result.extra["time_to_target_s"] = time_to_target
        result.extra["target_ppl"] = target_ppl
    return result


def _with_lr(group: dict, lr: float) -> dict:
    """A copy of ``group`` with its own lr when it has an ``lr_factor`` (LoRA+'s B groups)."""
    g = dict(group)
    if "lr_factor" in g:
        g["lr"] = lr * float(g["lr_factor"])
    return g


def _guard_with_hook(preset_name: str, gave_up: list[int]):
    """The guard of a guard arm, with an ``on_give_up`` hook that counts the give-up and lets the
    guard restart (a user's loop would stop on ``GuardGaveUp``; the sweep records it and goes on)."""
    from lbw_guard.guard import Guard
    from lbw_guard.guard.config import preset

    return Guard(preset(preset_name), on_give_up=lambda exc: gave_up.append(1))


def run_from_json(d: dict) -> RunResult:
    """Rebuild a RunResult from its JSON form (null numbers were non-finite)."""
    def num(x):
        return math.inf if x is None else x

    d = dict(d)
    guard = d.pop("guard", None)
    d["final_loss"], d["final_ppl"] = num(d["final_loss"]), num(d["final_ppl"])
    d["train_losses"] = [math.nan if x is None else x for x in d["train_losses"]]
    d["eval_curve"] = [(int(s), num(p)) for s, p in d["eval_curve"]]
    if guard is not None:
        guard["lr_scale_history"] = [tuple(x) for x in guard["lr_scale_history"]]
        guard["intervention_steps"] = [tuple(x) for x in guard["intervention_steps"]]
        guard = GuardStats(**guard)
    return RunResult(**d, guard=guard)
