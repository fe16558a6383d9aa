"""A fine-tune that starts near its loss floor: where the guard's loss efficiency stands.

Each tiny model (GPT-2 or Llama from a ``transformers`` config, random init) is first trained
with plain AdamW on a low-entropy source (a fixed, peaked Markov chain over 64 tokens) until its
loss is near the source's entropy; then it is fine-tuned on fresh samples of the same source with
plain AdamW and with ``FusedGuardedAdamW`` at several lrs. Near the floor the loss stops
following the first-order prediction of the steps at any lr that is not small, so this is where
the loss efficiency (the start-of-run overshoot rule, ``lbw_guard.guard.governor``) can take a
good lr for a too-high one. The table says, per lr, the guard's held-out loss against AdamW's at
the same lr, its rollbacks (the overshoot's return to the start counts as one) and the share of
steps it capped.

    python -m benchmarks.lowloss_finetune                       # 2 models x 2 sources x 3 seeds (~2 min, 1 core)
    python -m benchmarks.lowloss_finetune --archs gpt2 --seeds 0 --lrs 1e-3

Writes ``results.json`` and ``results.md`` under ``--out``. CPU only; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import torch

from .sweep import guard_accounting, numbers, per_lr_lines, progress_line

VOCAB, SEQ_LEN, BATCH = 64, 64, 8
PRETRAIN_STEPS, PRETRAIN_LR, FINETUNE_STEPS, EVAL_BATCHES = 150, 3e-3, 80, 8
CHAIN_SEED = 1234  # one transition matrix for every run: the source, not the sample, is fixed


def markov_batches(temperature: float, seed: int):
    """Endless batches from a fixed Markov chain whose transition logits are N(0, 1) / temperature
    (lower: more peaked, a lower entropy floor)."""
    logits = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(CHAIN_SEED))
    probs = torch.softmax(logits / temperature, -1)
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.empty(BATCH, SEQ_LEN, dtype=torch.long)
        x[:, 0] = torch.randint(VOCAB, (BATCH,), generator=gen)
        for t in range(1, SEQ_LEN):
            x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=gen).squeeze(1)
        yield x


ARCHS = {  # 2 layers, width 64, random init
    "gpt2": lambda tf: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                        n_positions=SEQ_LEN)),
    "llama": lambda tf: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ_LEN)),
}


def build_model(arch: str, seed: int):
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    return ARCHS[arch](transformers)


def run_key(arch: str, temperature: float, arm: str, lr: float, seed: int) -> str:
    return f"{arch}|{temperature}|{arm}|{lr}|{seed}"


def _train(model, opt, data, steps: int, guarded: bool) -> float:
    """``steps`` language-model steps on ``data`` (the guarded optimizer is given each loss);
    the last training loss."""
    for _ in range(steps):
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step(loss=loss.detach()) if guarded else opt.step()
        opt.zero_grad()
    return loss.item()


def pretrained(arch: str, temperature: float, seed: int, steps: int) -> tuple[dict, float]:
    """The model's state after ``steps`` of plain AdamW at PRETRAIN_LR, and its last training loss."""
    model = build_model(arch, seed)
    last = _train(model, torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR), markov_batches(temperature, seed),
                  steps, guarded=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, last


def finetune(arch: str, state: dict, temperature: float, seed: int, arm: str, lr: float, steps: int,
             backend: str) -> dict:
    """``steps`` of ``arm`` ("adamw" or "guard") from ``state`` on fresh samples; the held-out loss
    (and the guard's accounting)."""
    from lbw_guard import FusedGuardedAdamW

    model = build_model(arch, seed)
    model.load_state_dict(state)
    if arm == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = FusedGuardedAdamW(model.parameters(), lr=lr, backend=backend)
    _train(model, opt, markov_batches(temperature, seed + 100), steps, guarded=arm == "guard")  # fresh samples
    model.eval()
    held_out = markov_batches(temperature, seed + 999)
    with torch.no_grad():
        final = statistics.fmean(model(input_ids=x, labels=x).loss.item()
                                 for x in (next(held_out) for _ in range(EVAL_BATCHES)))
    out = {"final_loss": final if math.isfinite(final) else math.inf}
    if arm == "guard":
        out.update(guard_accounting(opt))
    return out


def table(runs: dict, settings: list[tuple[str, float]], lrs: list[float], seeds: list[int]) -> str:
    lines = ["| model | source temperature | lr | AdamW held-out loss | guard / AdamW | guard runs rolled back "
             "| guard capped (mean) |",
             "|---|---|---|---|---|---|---|"]
    for arch, temp in settings:
        lines += per_lr_lines(runs, lambda arm, lr, s: run_key(arch, temp, arm, lr, s), lrs, seeds,
                              f"| {arch} | {temp:g} |", digits=4)
    return "\n".join(lines)


def run(archs: list[str], temperatures: list[float], lrs: list[float], seeds: list[int], out: pathlib.Path,
        pretrain_steps: int = PRETRAIN_STEPS, finetune_steps: int = FINETUNE_STEPS, backend: str = "cpu",
        progress: bool = True) -> dict:
    """Every (model, source, seed): one pre-training, then AdamW and the guard at each lr; writes
    ``results.json`` and ``results.md`` under ``out`` and returns the runs by key."""
    torch.set_num_threads(1)
    settings = [(a, t) for a in archs for t in temperatures]
    runs, pretrain_loss = {}, {}
    total, done, start = len(settings) * len(seeds) * len(lrs) * 2, 0, time.time()
    for arch, temp in settings:
        for seed in seeds:
            state, pretrain_loss[f"{arch}|{temp}|{seed}"] = pretrained(arch, temp, seed, pretrain_steps)
            for lr in lrs:
                for arm in ("adamw", "guard"):
                    r = runs[run_key(arch, temp, arm, lr, seed)] = finetune(arch, state, temp, seed, arm, lr,
                                                                            finetune_steps, backend)
                    done += 1
                    if progress:
                        print(progress_line(done, total, start, f"{arch} t={temp:g} seed {seed}", arm, lr, r),
                              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "low-loss fine-tune: AdamW and the guard after a plain-AdamW pre-training",
           "torch": torch.__version__, "backend": backend,
           "pretrain": {"steps": pretrain_steps, "lr": PRETRAIN_LR, "last_loss": pretrain_loss},
           "finetune_steps": finetune_steps, "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(table(runs, settings, lrs, seeds) + "\n")
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    p.add_argument("--temperatures", default="0.07,0.15", help="source temperatures (lower: lower loss floor)")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="fine-tuning lrs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backend", default="cpu", choices=("cpu", "torch"), help="the guarded optimizer's backend")
    p.add_argument("--out", default="benchmarks/results/lowloss-finetune")
    args = p.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        p.error(f"--archs: {f'unknown {unknown[0]!r}' if unknown else 'none given'} (use {', '.join(ARCHS)})")
    temps = numbers(p, "--temperatures", args.temperatures)
    lrs = numbers(p, "--lrs", args.lrs)
    seeds = numbers(p, "--seeds", args.seeds, int)
    out = pathlib.Path(args.out)
    run(archs, temps, lrs, seeds, out, backend=args.backend)
    print((out / "results.md").read_text(), end="")


if __name__ == "__main__":
    main()
