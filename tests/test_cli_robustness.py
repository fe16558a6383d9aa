"""``lbw-guard stress`` on bad input and interrupted sweeps: one-line errors before any work,
finished runs kept, resumable.

Training is replaced by a fake that returns a result at once wherever only the plumbing is
under test, so these tests run in seconds.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lbw_guard.cli import main
from lbw_guard.experiments import stress
from lbw_guard.experiments.guard_stats import GuardStats
from lbw_guard.experiments.train import RunResult
from lbw_guard.guard.config import PRESETS

STRESS_EXTRA = "pip install 'lbw-guard-fused[stress]'"


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the sweep gets as far as preparing data or training."""
    def forbidden(*args, **kwargs):
        raise AssertionError("validation must happen before any data preparation or training")

    monkeypatch.setattr(stress, "prepare_data", forbidden)
    monkeypatch.setattr(stress, "train_run", forbidden)


def _base(tmp_path) -> list[str]:
    return ["stress", "--smoke", "--no-progress", "--no-plots", "--backend", "torch",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]


def _assert_one_line_error(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- bad flags
BAD_FLAGS = [
    # (extra argv, text the one-line error must contain: the flag, and what is wrong or the fix)
    (["--guard", "bogus"], "--guard"),
    (["--lrs", ","], "--lrs"),
    (["--lrs", ""], "--lrs"),
    (["--seeds", ","], "--seeds"),
    (["--arms", ","], "--arms"),
    (["--arms", " , ,"], "--arms"),
    (["--sizes", ","], "--sizes"),
    (["--lrs", "nan"], "--lrs"),
    (["--lrs", "inf"], "--lrs"),
    (["--lrs", "0"], "--lrs"),
    (["--lrs", "-1"], "--lrs"),
    (["--lrs", "1e-3,x"], "--lrs"),
    (["--lrs", "1e-3,1e-3"], "--lrs"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", "one"], "--seeds"),
    (["--arms", "sgd"], "--arms"),
    (["--arms", "adamw,adamw"], "--arms"),
    (["--arms", "adamw-clip0"], "--arms"),
    (["--sizes", "huge"], "--sizes"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--steps", "nan"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "4"], "--seq-len"),
    (["--warmup-steps", "500"], "--warmup-steps"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--base-lr", "nan"], "--base-lr"),
    (["--base-lr", "0"], "--base-lr"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-windows", "0"], "--eval-windows"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size"),
    (["--threads", "-1"], "--threads"),
    (["--speed-steps", "-1"], "--speed-steps"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--train-chars", "0"], "--train-chars"),
    (["--text-file", "/nonexistent/corpus.txt"], "--text-file"),
    (["--mode", "sgd"], "--mode"),
    (["--device", "tpu"], "--device"),
    (["--precision", "fp16"], "--precision"),
    (["--backend", "nope"], "--backend"),
    (["--schedule", "linear"], "--schedule"),
    (["--dataset", "wikitext-2", "--text-file", "x.txt"], "--text-file"),
    (["--bogus-flag"], "--bogus-flag"),
]


@pytest.mark.parametrize("extra,fragment", BAD_FLAGS, ids=[" ".join(a) or "empty" for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_exit_2_before_any_work(tmp_path, capsys, no_work, extra, fragment):
    assert main([*_base(tmp_path), *extra]) == 2
    _assert_one_line_error(capsys, fragment)
    assert not (tmp_path / "out").exists()  # nothing created either


def test_unknown_guard_preset_lists_the_presets(tmp_path, capsys, no_work):
    assert main([*_base(tmp_path), "--guard", "bogus"]) == 2
    line = _assert_one_line_error(capsys, "--guard", "'bogus'")
    assert all(name in line for name in PRESETS)


def test_an_empty_list_is_an_error_not_the_default(tmp_path, capsys, no_work):
    assert main([*_base(tmp_path), "--lrs", ","]) == 2
    _assert_one_line_error(capsys, "--lrs", "empty", "leave the flag out for the default")


@pytest.mark.parametrize("where", ["--out", "--cache-dir"])
def test_an_unwritable_directory_fails_up_front(tmp_path, capsys, no_work, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = _base(tmp_path)
    argv[argv.index(where) + 1] = str(blocker / "sub")
    assert main(argv) == 2
    _assert_one_line_error(capsys, where, str(blocker / "sub"), f"choose another with {where}")


def test_out_that_is_a_file_fails_up_front(tmp_path, capsys, no_work):
    argv = _base(tmp_path)
    (tmp_path / "out").write_text("a file")
    assert main(argv) == 2
    _assert_one_line_error(capsys, "--out")


@pytest.mark.parametrize("name", ["results.json", "report.md", "results.partial.json"])
def test_an_output_file_that_is_a_directory_fails_up_front(tmp_path, capsys, no_work, name):
    (tmp_path / "out" / name).mkdir(parents=True)
    assert main(_base(tmp_path)) == 2
    _assert_one_line_error(capsys, "--out", name, "is not a file")


@pytest.mark.parametrize("package,extra", [
    ("rich", []), ("transformers", []), ("tokenizers", ["--tokenizer", "bpe"]), ("peft", ["--mode", "lora"]),
    ("matplotlib", None),  # None: with plots
])
def test_a_missing_optional_package_names_it_and_the_extra(tmp_path, capsys, monkeypatch, no_work, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # what "not installed" looks like to import
    argv = _base(tmp_path) + (extra or [])
    if extra is None:
        argv.remove("--no-plots")
    assert main(argv) == 2
    _assert_one_line_error(capsys, f"'{package}'", STRESS_EXTRA)


def test_a_missing_datasets_package_names_the_data_extra(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main([*_base(tmp_path), "--dataset", "wikitext-2"]) == 2
    _assert_one_line_error(capsys, "'datasets'", "lbw-guard-fused[data]")


def test_merge_without_matplotlib_and_with_bad_files(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["stress", "--merge", str(bad), "--out", str(tmp_path / "m"), "--no-plots"]) == 2
    _assert_one_line_error(capsys, "--merge")
    bad.write_bytes(b"\xff\xfe")
    assert main(["stress", "--merge", str(bad), "--out", str(tmp_path / "m"), "--no-plots"]) == 2
    _assert_one_line_error(capsys, "--merge")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["stress", "--merge", str(bad), "--out", str(tmp_path / "m")]) == 2
    _assert_one_line_error(capsys, "'matplotlib'", STRESS_EXTRA)


# ---------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv,shown", [
    (["--help"], ["stress", "replay"]),
    (["stress", "--help"], ["(default: 200)", "(default: stress-results)", "(default: default)",
                            ", ".join(PRESETS)]),
    (["replay", "--help"], ["(default: the config the trace recorded", "--run N"]),
])
def test_help_shows_defaults(capsys, argv, shown):
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for text in shown:
        assert text in out


# ---------------------------------------------------------------------------- interrupts and resume
def _fake_result(arm: str, lr: float, seed: int, size: str) -> RunResult:
    guarded = arm.startswith("guard")
    ppl = 10.0 + 100 * lr
    return RunResult(arm=arm, lr=lr, seed=seed, size=size, mode="full", steps_run=12, final_loss=math.log(ppl),
                     final_ppl=ppl, diverged=False, train_losses=[2.0] * 12, eval_curve=[(6, ppl), (12, ppl)],
                     train_seconds=0.01, eval_seconds=0.01, tokens_per_second=1000.0, seconds_per_step=0.001,
                     guard=GuardStats(lr_scale_history=[(0, 1.0)]) if guarded else None, backend="torch")


class FakeTraining:
    """Stands in for train_run: returns at once; raises ``exc`` on call number ``fail_at``."""

    def __init__(self, fail_at: int | None = None, exc: BaseException | None = None):
        self.calls, self.fail_at, self.exc = [], fail_at, exc

    def __call__(self, model, arm, lr, seed, data, eval_windows, settings, *, size, mode, on_step=None,
                 target_ppl=None):
        self.calls.append((size, seed, lr, arm.name))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.exc
        return _fake_result(arm.name, lr, seed, size)


@pytest.fixture
def sweep_argv(tmp_path, monkeypatch):
    """A --smoke sweep (5 arms x 2 learning rates) on a small text file, with fake training."""
    corpus = tmp_path / "corpus.txt"
    # ~200 documents of ~4K characters: the hash split (of names that include tmp_path) always
    # puts some in the held-out set
    corpus.write_text("\n\n".join(f"paragraph {i}: " + "some words here " * 260 for i in range(200)))
    monkeypatch.setattr(stress, "_make_model", lambda *a, **k: torch.nn.Linear(2, 2))
    return [*_base(tmp_path), "--text-file", str(corpus), "--tokenizer", "byte"]


def _install(monkeypatch, fake: FakeTraining) -> FakeTraining:
    monkeypatch.setattr(stress, "train_run", fake)
    return fake


def test_ctrl_c_keeps_finished_runs_and_resume_finishes_the_sweep(tmp_path, capsys, monkeypatch, sweep_argv):
    out = tmp_path / "out"
    _install(monkeypatch, FakeTraining(fail_at=4, exc=KeyboardInterrupt()))
    assert main(sweep_argv) == 130
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    message = [line for line in text.out.splitlines() if line.startswith("interrupted")]
    assert len(message) == 1 and "kept 3 of 10 runs" in message[0] and "--resume" in message[0]
    assert str(out / "results.json") in message[0] and str(out / "results.partial.json") in message[0]
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 3 and doc["meta"]["complete"] is False and doc["meta"]["runs_planned"] == 10
    assert "Unfinished sweep: 3 of 10 runs" in (out / "report.md").read_text()
    assert len(json.loads((out / "results.partial.json").read_text())["runs"]) == 3

    # starting over by accident would overwrite the finished runs: refused up front
    fresh = _install(monkeypatch, FakeTraining())
    assert main(sweep_argv) == 2
    _assert_one_line_error(capsys, "--resume", "results.partial.json")
    assert fresh.calls == []

    # --resume runs only the 7 missing runs, then the partial file is no longer needed
    rest = _install(monkeypatch, FakeTraining())
    assert main([*sweep_argv, "--resume"]) == 0
    assert len(rest.calls) == 7
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 10 and doc["meta"]["complete"] is True and doc["meta"]["runs_resumed"] == 3
    assert len({(r["arm"], r["lr"]) for r in doc["runs"]}) == 10
    assert not (out / "results.partial.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path, capsys, monkeypatch, sweep_argv):
    _install(monkeypatch, FakeTraining(fail_at=2, exc=KeyboardInterrupt()))
    assert main(sweep_argv) == 130
    capsys.readouterr()
    assert main([*sweep_argv, "--resume", "--steps", "13"]) == 2
    _assert_one_line_error(capsys, "--resume", "steps")


def test_resume_with_fewer_runs_planned_is_refused_rather_than_losing_finished_ones(tmp_path, capsys, monkeypatch,
                                                                                   sweep_argv):
    _install(monkeypatch, FakeTraining(fail_at=4, exc=KeyboardInterrupt()))
    assert main(sweep_argv) == 130  # adamw and adamw-clip1.0 (and more) finished
    capsys.readouterr()
    fake = _install(monkeypatch, FakeTraining())
    assert main([*sweep_argv, "--resume", "--arms", "adamw,guard"]) == 2
    _assert_one_line_error(capsys, "--resume", "does not plan")
    assert fake.calls == [] and len(json.loads((tmp_path / "out" / "results.partial.json").read_text())["runs"]) == 3


def test_resume_on_a_finished_sweep_of_other_settings_is_refused(tmp_path, capsys, monkeypatch, sweep_argv):
    _install(monkeypatch, FakeTraining())
    assert main(sweep_argv) == 0
    capsys.readouterr()
    fake = _install(monkeypatch, FakeTraining())
    assert main([*sweep_argv, "--resume", "--steps", "13"]) == 2
    _assert_one_line_error(capsys, "--resume", "finished sweep", "steps")
    assert fake.calls == [] and len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 10


@pytest.mark.parametrize("flag", ["--step", "--arm", "--lr"])
def test_an_abbreviated_option_is_refused_not_silently_dropped(tmp_path, capsys, no_work, sweep_argv, flag):
    assert main([*sweep_argv, flag, "30"]) == 2
    _assert_one_line_error(capsys, flag)


def test_a_crash_keeps_the_runs_finished_before_it(tmp_path, capsys, monkeypatch, sweep_argv):
    _install(monkeypatch, FakeTraining(fail_at=3, exc=RuntimeError("boom")))
    assert main(sweep_argv) == 1
    assert "boom" in capsys.readouterr().out
    partial = json.loads((tmp_path / "out" / "results.partial.json").read_text())
    assert [(r["arm"], r["lr"]) for r in partial["runs"]] == [("adamw", 3e-3), ("adamw-clip1.0", 3e-3)]


def test_ctrl_c_before_any_run_writes_nothing(tmp_path, capsys, monkeypatch, sweep_argv):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(stress, "prepare_data", interrupted)
    assert main(sweep_argv) == 130
    assert "nothing was written" in capsys.readouterr().out
    assert not (tmp_path / "out" / "results.json").exists()


def test_resume_without_a_partial_file_starts_fresh(tmp_path, capsys, monkeypatch, sweep_argv):
    fake = _install(monkeypatch, FakeTraining())
    assert main([*sweep_argv, "--resume"]) == 0
    assert len(fake.calls) == 10


def test_a_corrupt_partial_file_is_one_line_error(tmp_path, capsys, no_work, sweep_argv):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.partial.json").write_text('{"schema": "lbw-guard-stress-partial/1", "runs": [1]')
    assert main([*sweep_argv, "--resume"]) == 2
    _assert_one_line_error(capsys, "--resume", "results.partial.json")


def test_smoke_respects_explicit_flags_in_process(tmp_path, capsys, monkeypatch, sweep_argv):
    """main(argv) must read the explicit flags from argv, not from sys.argv (pytest's)."""
    fake = _install(monkeypatch, FakeTraining())
    assert main([*sweep_argv, "--arms", "adamw,guard", "--lrs", "0.01"]) == 0
    assert sorted(c[3] for c in fake.calls) == ["adamw", "guard"] and {c[2] for c in fake.calls} == {0.01}


def test_progress_lines_have_no_source_path_suffix(tmp_path, capsys, monkeypatch, sweep_argv):
    _install(monkeypatch, FakeTraining())
    argv = [a for a in sweep_argv if a != "--no-progress"] + ["--arms", "adamw"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "preparing corpus" in err and "adamw: ppl" in err  # the progress log is there ...
    assert ".py:" not in err  # ... without rich's "progress.py:NN" suffixes


def test_a_corpus_too_small_to_split_is_one_line_error(tmp_path, capsys, monkeypatch, sweep_argv):
    small = tmp_path / "small.txt"
    small.write_text("one paragraph only")
    argv = list(sweep_argv)
    argv[argv.index("--text-file") + 1] = str(small)
    fake = _install(monkeypatch, FakeTraining())
    assert main(argv) == 2
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err and fake.calls == []
    assert [line for line in text.out.splitlines() if "error:" in line][0].count("corpus too small") == 1
