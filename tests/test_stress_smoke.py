"""CI smoke of ``lbw-guard stress``: every arm on the smallest model for a few steps.

Checks that the results JSON, the markdown report and the plots are written and well formed,
not what the perplexities are (a dozen steps decide nothing).
"""

from __future__ import annotations

import json
import math

import pytest

from lbw_guard.experiments.arms import DEFAULT_ARMS, parse_arm
from lbw_guard.experiments.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _common(tmp_path):
    # The reference backend: no C++ build in CI; the backends' equality is tested elsewhere.
    return ["--smoke", "--backend", "torch", "--no-progress", "--threads", "1",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]


def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w = matplotlib.image.imread(path).shape[:2]
    assert h > 100 and w > 100


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stress")
    assert main(["stress", *_common(tmp_path)]) == 0
    return tmp_path / "out"


def test_results_json_is_strict_and_complete(full_run):
    text = (full_run / "results.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["schema"] == "lbw-guard-stress/1"
    lrs = doc["config"]["lrs"]
    assert len(doc["runs"]) == len(DEFAULT_ARMS) * len(lrs)
    assert {(r["arm"], r["lr"]) for r in doc["runs"]} == {(a, lr) for a in DEFAULT_ARMS for lr in lrs}
    for r in doc["runs"]:
        assert r["steps_run"] == doc["config"]["steps"] or r["diverged"]
        assert (r["final_ppl"] is None) == (r["final_loss"] is None)
        if r["final_ppl"] is not None:
            assert r["final_ppl"] > 1 and math.isclose(math.log(r["final_ppl"]), r["final_loss"], rel_tol=1e-9)
        assert r["train_seconds"] > 0 and r["tokens_per_second"] > 0
        assert len(r["train_losses"]) == r["steps_run"] and r["eval_curve"][-1][0] == r["steps_run"]
        if parse_arm(r["arm"]).guarded:
            g = r["guard"]
            for key in ("skipped_steps", "rollbacks", "frozen_group_steps", "interventions", "lr_scale_history"):
                assert key in g
            assert g["lr_scale_history"][0] == [0, 1.0]
            assert all(0 < s <= 1 for _, s in g["lr_scale_history"])
        else:
            assert r["guard"] is None
    cells = doc["summary"]["cells"]["nano"]
    assert set(cells) == set(DEFAULT_ARMS) and all(len(c) == len(lrs) for c in cells.values())
    assert doc["meta"]["corpus"]["train_tokens"] > 0 and doc["meta"]["models"]["nano"]["total_params"] > 0


def test_report_and_plots_are_written(full_run):
    report = (full_run / "report.md").read_text()
    assert "## Final held-out perplexity" in report and "## Verdict" in report
    for arm in DEFAULT_ARMS:
        assert f"| {parse_arm(arm).label} |" in report
    for name in ("loss_curves.png", "ppl_vs_lr.png", "guard_timeline.png"):
        assert f"]({name})" in report
        _check_png(full_run / name)


def test_lora_mode_caches_its_base_model_and_compares_speed(tmp_path):
    argv = ["stress", *_common(tmp_path), "--mode", "lora", "--arms", "adamw,guard", "--lrs", "0.01",
            "--steps", "4", "--eval-every", "2", "--base-steps", "4", "--compare-speed", "--no-plots"]
    assert main(argv) == 0
    bases = list((tmp_path / "cache" / "lora-base").glob("*.pt"))
    assert len(bases) == 1
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    m = doc["meta"]["models"]["nano"]
    assert 0 < m["trainable_params"] < m["total_params"]
    assert doc["meta"]["lora_base"]["nano"]["steps"] == 4
    speed = doc["speed"]["arms"]
    assert set(speed) == {"adamw-fused", "guard-off", "guard"}
    assert speed["adamw-fused"]["step_time_ratio_vs_torch_fused"] == pytest.approx(1.0)
    # a second run reuses the cached base model
    stamp = bases[0].stat().st_mtime_ns
    assert main(argv) == 0
    assert bases[0].stat().st_mtime_ns == stamp


def test_bad_arguments_exit_with_status_2(tmp_path, capsys):
    assert main(["stress", *_common(tmp_path), "--lrs", "-1"]) == 2
    assert "learning rates must be positive" in capsys.readouterr().out


def test_merge_rebuilds_one_report_from_parts(full_run, tmp_path, capsys):
    doc = json.loads((full_run / "results.json").read_text())
    parts = []
    for lr in doc["config"]["lrs"]:  # split the smoke run into one file per learning rate
        part = dict(doc, runs=[r for r in doc["runs"] if r["lr"] == lr], config=dict(doc["config"], lrs=[lr]))
        path = tmp_path / f"part{lr}.json"
        path.write_text(json.dumps(part))
        parts.append(str(path))
    assert main(["stress", "--merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["summary"]["cells"] == doc["summary"]["cells"]
    assert merged["meta"]["wall_seconds"] == pytest.approx(doc["meta"]["wall_seconds"] * len(parts))
    _check_png(tmp_path / "merged" / "ppl_vs_lr.png")
    capsys.readouterr()
    # a part given twice would read as two seeds agreeing: refused
    assert main(["stress", "--merge", parts[0], parts[0], "--out", str(tmp_path / "twice"), "--no-plots"]) == 2
    captured = capsys.readouterr()
    assert "merge each run once" in captured.out + captured.err
