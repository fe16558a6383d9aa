"""benchmarks/heldout.py: the held-out scenario harness picks the best lr from its own sweep
and judges the guard against it (a few steps per run; the full run is `python -m benchmarks.heldout`)."""

import json

import pytest

pytest.importorskip("transformers")
from benchmarks import heldout  # noqa: E402


def test_sweep_picks_the_best_lr_and_judges_the_guard_against_it(tmp_path):
    rows = heldout.run(["opt-const"], seeds=[0], multiples=[1.0, 10.0], steps=3, out=tmp_path, guard_config=None,
                       backend="torch", workers=1, progress=False)
    runs = json.loads((tmp_path / "heldout.json").read_text())["runs"]
    sweep = {lr: runs[heldout.Job("opt-const", "adamw", lr, 0).key]["final_loss"]
             for lr in heldout.SCENARIOS["opt-const"].sweep}
    best_lr = min(sweep, key=sweep.get)
    assert [r["multiple"] for r in rows] == [1.0, 10.0]
    for r in rows:
        assert r["lr"] == pytest.approx(best_lr * r["multiple"])
        guard = runs[heldout.Job("opt-const", "guard", r["lr"], 0).key]
        assert r["guard"] == guard["final_loss"]
        assert r["guard_vs_best"] == pytest.approx(guard["final_loss"] / sweep[best_lr])
        assert r["guard_vs_adamw"] == pytest.approx(guard["final_loss"] / r["adamw"])
        assert 0.0 <= r["capped_fraction"] <= 1.0 and r["rollbacks"] == 0
    assert rows[0]["target_met"] == (rows[0]["guard_vs_adamw"] <= 1.01 and rows[0]["capped_fraction"] < 0.01)
    assert rows[1]["target_met"] == (rows[1]["guard_vs_best"] <= 1.15)
    assert "| opt-const | 0 |" in (tmp_path / "heldout.md").read_text()


def test_two_seeds_add_a_mean_table(tmp_path):
    rows = heldout.run(["mlp-const"], seeds=[0, 1], multiples=[10.0], steps=2, out=tmp_path, guard_config=None,
                       backend="torch", workers=1, progress=False)
    text = (tmp_path / "heldout.md").read_text()
    mean = sum(r["guard_vs_best"] for r in rows) / 2
    assert "## Mean over seeds [0, 1]" in text and "| mlp-const | 10 | " in text
    assert f"{mean:.3f}" in text.split("## Mean over seeds")[1]


def test_late_cut_runs_are_adamw_at_the_multiple_then_at_3x(tmp_path):
    """K = 0 is AdamW at 3x from the start; K >= steps is AdamW at the multiple throughout."""
    steps = 3
    rows = heldout.run(["opt-const"], seeds=[0], multiples=[3.0, 10.0], steps=steps, out=tmp_path, guard_config=None,
                       backend="torch", workers=1, progress=False, late_cuts=[0, 1, steps])
    by_multiple = {r["multiple"]: r for r in rows}
    assert "late_cut" not in by_multiple[3.0]
    cut = by_multiple[10.0]["late_cut"]
    best_loss = by_multiple[10.0]["adamw"] / by_multiple[10.0]["adamw_vs_best"]
    assert cut[0] * best_loss == pytest.approx(by_multiple[3.0]["adamw"], rel=1e-5)
    assert cut[steps] * best_loss == pytest.approx(by_multiple[10.0]["adamw"], rel=1e-9)
    assert cut[1] * best_loss not in (pytest.approx(by_multiple[3.0]["adamw"]), pytest.approx(by_multiple[10.0]["adamw"]))
    text = (tmp_path / "heldout.md").read_text()
    assert "then at 3x" in text and f"| opt-const | 0 | 10 | {by_multiple[10.0]['adamw_vs_best']:.3f} |" in text
    within = lambda v: f"{int(v <= 1.15)}/1"  # noqa: E731
    assert (f"AdamW {within(by_multiple[10.0]['adamw_vs_best'])}, guard {within(by_multiple[10.0]['guard_vs_best'])}, "
            f"K = 0 {within(cut[0])}, K = 1 {within(cut[1])}, K = {steps} {within(cut[steps])}.") in text


def test_results_of_other_settings_are_never_overwritten(tmp_path, capsys):
    heldout.run(["opt-const"], seeds=[0], multiples=[1.0], steps=2, out=tmp_path, guard_config=None,
                backend="torch", workers=1, progress=False)
    before = (tmp_path / "heldout.json").read_text()
    with pytest.raises(SystemExit):
        heldout.main(["--scenarios", "opt-const", "--steps", "3", "--out", str(tmp_path), "--no-progress"])
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "heldout.json").read_text() == before


@pytest.mark.parametrize("argv, words", [
    (["--scenarios", "nope"], "--scenarios"),
    (["--steps", "1"], "--steps"),
    (["--multiples", "0"], "--multiples"),
    (["--late-cut", "-1"], "--late-cut"),
    (["--late-cut", "x"], "--late-cut"),
    (["--guard-config", '{"omega_low": -1}'], "omega_low"),
])
def test_bad_arguments_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        heldout.main(argv)
    assert words in capsys.readouterr().err
