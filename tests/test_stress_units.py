"""Unit tests of the stress suite's parts: corpus split, tokenizer, data, arms, config, report."""

from __future__ import annotations

import math

import pytest
import torch

from lbw_guard.experiments.arms import DEFAULT_ARMS, Stepper, build_optimizer, parse_arm
from lbw_guard.experiments.config import StressConfig
from lbw_guard.experiments.corpus import load_corpus, split_documents, stdlib_documents
from lbw_guard.experiments.data import TokenData
from lbw_guard.experiments.report import false_positives, summarize
from lbw_guard.experiments.tokenizer import bpe_tokenizer, byte_tokenizer
from lbw_guard.experiments.train import RunResult


def test_split_is_document_level_deterministic_and_within_budget():
    docs = [(f"pkg/mod{i}.py", f"x = {i}\n" * (i % 7 + 1)) for i in range(400)]
    train, held = split_documents(docs, 10, 10**9, 10**9)
    assert not set(train) & set(held)
    assert len(train) + len(held) == 400
    assert 15 <= len(held) <= 70  # about 10 %
    # reordering the input does not change the split
    train2, held2 = split_documents(list(reversed(docs)), 10, 10**9, 10**9)
    assert (train2, held2) == (train, held)
    small, _ = split_documents(docs, 10, 100, 10**9)
    assert sum(map(len, small)) < 100 + max(map(len, (d for _, d in docs)))


def test_stdlib_corpus_has_no_file_in_both_splits():
    names = {text: name for name, text in stdlib_documents()}
    corpus = load_corpus(train_chars=300_000, heldout_chars=50_000)
    train_names = {names[t] for t in corpus.train}
    held_names = {names[t] for t in corpus.heldout}
    assert train_names and held_names and not train_names & held_names
    assert corpus.train_chars >= 300_000 and corpus.heldout_chars >= 50_000
    assert load_corpus(train_chars=300_000, heldout_chars=50_000).fingerprint == corpus.fingerprint


def test_bpe_tokenizer_is_cached_and_byte_tokenizer_is_lossless(tmp_path):
    docs = ["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50]
    tok = bpe_tokenizer(docs, 600, tmp_path, "k1")
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    again = bpe_tokenizer(docs, 600, tmp_path, "k1")
    assert torch.equal(tok.encode_documents(docs), again.encode_documents(docs))
    ids = tok.encode_documents(docs)
    assert ids.max() < tok.vocab_size and (ids == tok.eos_id).sum() == 2
    b = byte_tokenizer()
    ids = b.encode_documents(["héllo"])
    assert bytes(ids[:-1].tolist()).decode("utf-8") == "héllo" and ids[-1] == b.eos_id


def test_batch_schedule_is_a_function_of_the_seed():
    data = TokenData(torch.arange(1000) % 50, torch.arange(300) % 50, 50, 16)
    a, b, c = data.batch_schedule(5, 4, 0), data.batch_schedule(5, 4, 0), data.batch_schedule(5, 4, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    batch = data.batch(a[0])
    assert batch.shape == (4, 17) and ((batch[:, 1:] - batch[:, :-1]) % 50 == 1).all()
    windows = data.eval_windows(100)
    assert windows.shape[1] == 17 and windows.shape[0] == 300 // 17


def test_arm_parsing_and_labels():
    assert [parse_arm(a).label for a in DEFAULT_ARMS] == [
        "AdamW", "AdamW + clip 1.0", "AdamW + clip 0.5", "guard", "guard + clip 1.0"]
    assert parse_arm("guard-clip1.0").guarded and not parse_arm("adamw").guarded
    for bad in ("sgd", "adamw-clip", "adamw-clip0", "guard-clip-1"):
        with pytest.raises(ValueError):
            parse_arm(bad)


def test_clipped_adamw_arm_clips_before_the_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(10))
    arm = parse_arm("adamw-clip0.5")
    opt = build_optimizer(arm, [{"params": [w]}], 0.1, (0.9, 0.999), 1e-8, 0.0)
    assert isinstance(opt, torch.optim.AdamW)
    loss = (w * torch.full((10,), 100.0)).sum()
    loss.backward()
    seen = {}
    orig = opt.step
    opt.step = lambda: (seen.setdefault("norm", w.grad.norm().item()), orig())[1]
    Stepper(arm, opt, [w]).step(loss)
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4)
    assert w.grad is None  # zeroed after the step


@pytest.mark.parametrize("bad", [
    dict(mode="sgd"), dict(lrs=(0.0,)), dict(arms=("adamw", "adamw")), dict(sizes=("huge",)),
    dict(steps=0), dict(warmup_steps=500), dict(corpus="text-file"), dict(seeds=(-1,)),
    dict(tokenizer="bpe", vocab_size=100), dict(arms=("rmsprop",)),
])
def test_config_rejects_bad_values_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="stress config|arm"):
        StressConfig(**bad)


def test_config_defaults_are_the_calibrated_ones():
    cfg = StressConfig()
    assert cfg.sizes == ("tiny",) and len(cfg.lrs) >= 3 and cfg.arms == DEFAULT_ARMS
    assert StressConfig(mode="lora").lrs != () and StressConfig(device="cuda").precision == "bf16"


def _run(arm, lr, ppl, seed=0, interventions=0):
    from lbw_guard.experiments.guard_stats import GuardStats

    g = GuardStats(interventions=interventions) if parse_arm(arm).guarded else None
    return RunResult(arm=arm, lr=lr, seed=seed, size="s", mode="full", steps_run=100, final_loss=math.log(ppl),
                     final_ppl=ppl, diverged=not math.isfinite(ppl), train_losses=[1.0] * 100, eval_curve=[],
                     train_seconds=1.0, eval_seconds=0.1, tokens_per_second=1.0, seconds_per_step=0.01, guard=g)


def test_a_difference_under_one_percent_is_a_tie():
    runs = [_run("adamw", 1e-3, 50.0), _run("adamw", 1e-2, 500.0), _run("guard", 1e-3, 50.2),
            _run("guard", 1e-2, 499.0)]
    v = summarize(runs)["verdicts"][0]
    assert [w["lr"] for w in v["ties"]] == [1e-3, 1e-2] and not v["wins"] and not v["losses"]
    from lbw_guard.experiments.report import verdict_lines

    lines = verdict_lines({"summary": summarize(runs)})
    assert any("does not beat AdamW" in line for line in lines)
    assert any("lr 0.01: the best guard arm ends at 10.0x" in line for line in lines)


def test_verdicts_say_where_the_guard_wins_and_loses():
    runs = [_run("adamw", 1e-3, 50.0), _run("adamw-clip1.0", 1e-3, 49.0), _run("guard", 1e-3, 52.0, interventions=3),
            _run("adamw", 1e-2, 600.0), _run("adamw-clip1.0", 1e-2, math.inf), _run("guard", 1e-2, 60.0)]
    s = summarize(runs)
    v = s["verdicts"][0]
    assert v["stress_reached"] and v["adamw_best_ppl"] == 50.0
    assert [w["lr"] for w in v["wins"]] == [1e-2] and [w["lr"] for w in v["losses"]] == [1e-3]
    assert v["wins"][0]["guard_over_adamw_best"] == pytest.approx(1.2)
    assert s["cells"]["s"]["adamw-clip1.0"]["0.01"]["diverged"] == 1
    fp = false_positives(runs)
    assert fp["per_arm"]["guard"]["interventions"] == 3  # only the clean lr counts
    assert fp["per_arm"]["guard"]["per_1000_steps"] == pytest.approx(30.0)


def test_text_file_corpus_is_cut_into_documents_and_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "word " * 200 for i in range(200)))
    corpus = load_corpus("text-file", text_file=path, train_chars=10**9, heldout_chars=10**9)
    assert corpus.name == "file-corpus.txt" and len(corpus.train) > len(corpus.heldout) > 0
    assert sum(map(len, corpus.train + corpus.heldout)) >= len(path.read_text()) - 2 * 200


@pytest.mark.parametrize("n_docs", [2, 3, 5, 40])
@pytest.mark.parametrize("heldout_percent", [1, 10, 99])
def test_any_corpus_of_two_or_more_documents_splits(n_docs, heldout_percent):
    # Small corpora can hash every document into one split; one then moves to the other side.
    import random

    tag = random.getrandbits(64)
    docs = [(f"doc-{tag}-{i}", f"text {i}") for i in range(n_docs)]
    train, held = split_documents(docs, heldout_percent, 10**9, 10**9)
    assert train and held and not set(train) & set(held)
    assert sorted(train + held) == sorted(text for _, text in docs)
    with pytest.raises(ValueError, match="too small to split"):
        split_documents(docs[:1], heldout_percent, 10**9, 10**9)


def test_text_file_split_does_not_depend_on_where_the_file_lies(tmp_path):
    text = "\n\n".join(f"paragraph {i} " + "word " * 200 for i in range(200))
    splits = []
    for folder in ("a", "b/c"):
        path = tmp_path / folder / "corpus.txt"
        path.parent.mkdir(parents=True)
        path.write_text(text)
        corpus = load_corpus("text-file", text_file=path, train_chars=10**9, heldout_chars=10**9)
        splits.append((corpus.train, corpus.heldout, corpus.fingerprint))
    assert splits[0] == splits[1]


def test_datasets_stays_optional():
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(RuntimeError, match="optional 'datasets' package"):
            load_corpus("wikitext-103")
