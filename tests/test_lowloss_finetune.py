"""benchmarks/lowloss_finetune.py: the Markov source, a tiny run end to end and its table, and the
argument checks (a few steps per run; the full run is `python -m benchmarks.lowloss_finetune`)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
from benchmarks import lowloss_finetune as llf  # noqa: E402


def _bigram_entropy(temperature: float, batches: int = 6) -> float:
    """Empirical conditional entropy (nats) of the next token given the previous one."""
    counts = torch.zeros(llf.VOCAB, llf.VOCAB)
    data = llf.markov_batches(temperature, seed=0)
    for _ in range(batches):
        x = next(data)
        counts.index_put_((x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)), torch.ones(x[:, 1:].numel()), accumulate=True)
    rows = counts.sum(1, keepdim=True)
    p = counts / rows.clamp_min(1)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(1)
    return float((h * rows.squeeze(1)).sum() / rows.sum())


def test_the_source_is_seeded_and_a_lower_temperature_has_a_lower_floor():
    a, b = llf.markov_batches(0.07, seed=3), llf.markov_batches(0.07, seed=3)
    first = next(a)
    assert first.shape == (llf.BATCH, llf.SEQ_LEN) and first.dtype == torch.long
    assert torch.equal(first, next(b))
    assert not torch.equal(first, next(llf.markov_batches(0.07, seed=4)))
    assert 0 <= int(first.min()) and int(first.max()) < llf.VOCAB
    low, high = _bigram_entropy(0.07), _bigram_entropy(0.15)
    assert low < high < math.log(llf.VOCAB)


def test_a_tiny_run_writes_every_run_and_the_table(tmp_path):
    runs = llf.run(["gpt2"], [0.15], [1e-3, 3e-3], [0], tmp_path, pretrain_steps=3, finetune_steps=4,
                   backend="torch", progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["runs"] == json.loads(json.dumps(runs))
    assert sorted(runs) == sorted(f"gpt2|0.15|{arm}|{lr}|0" for arm in ("adamw", "guard") for lr in (1e-3, 3e-3))
    for key, r in runs.items():
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        if "|guard|" in key:
            assert 0.0 <= r["capped_fraction"] <= 1.0 and r["rollbacks"] >= 0
    adamw = {lr: runs[f"gpt2|0.15|adamw|{lr}|0"]["final_loss"] for lr in (1e-3, 3e-3)}
    best = min(adamw, key=adamw.get)
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| gpt2 |")]
    assert len(rows) == 2
    for lr, row in zip((1e-3, 3e-3), rows):
        ratio = runs[f"gpt2|0.15|guard|{lr}|0"]["final_loss"] / adamw[lr]
        assert f"| {lr:g}{' (best)' if lr == best else ''} | {adamw[lr]:.4f} | {ratio:.4f} |" in row


def test_the_fine_tune_starts_from_the_pretrained_state():
    state, loss = llf.pretrained("llama", 0.15, seed=0, steps=2)
    fresh = llf.build_model("llama", seed=0).state_dict()
    assert math.isfinite(loss)
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh)  # two AdamW steps moved it


@pytest.mark.parametrize("argv, words", [
    (["--archs", "opt"], "--archs"),
    (["--archs", ","], "--archs"),
    (["--lrs", "0"], "--lrs"),
    (["--lrs", "1e-3,nan"], "--lrs"),
    (["--lrs", "fast"], "--lrs"),
    (["--temperatures", "-1"], "--temperatures"),
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", "1.5"], "--seeds"),
    (["--backend", "cuda"], "--backend"),
])
def test_bad_arguments_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        llf.main(argv)
    assert words in capsys.readouterr().err
