"""``python -m benchmarks.gpu_validate --dry-run``: the GPU validation script imports and runs its
logic here (tiny sizes; on the CPU with the CPU backends when there is no GPU), so that an import
error or an API drift shows up in CI rather than on the GPU machine. ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "tests", "correctness", "sync", "graph", "steps", "host", "e2e"]


def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine: the interpreter is never timed
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_validate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_validate")
    proc = run(["--dry-run", "--out", str(out)])
    files = sorted(out.glob("dryrun-*.json"))
    assert files, f"no results file written\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(files[-1].read_text()), files[-1]


def test_dry_run_runs_every_section_without_failing(dry_run):
    proc, doc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(doc["sections"]) == SECTIONS
    for name, s in doc["sections"].items():
        assert s["status"] in ("ok", "skipped"), (name, s)
    if not torch.cuda.is_available():
        for name in ("tests", "sync", "graph"):
            assert doc["sections"][name]["status"] == "skipped"
            assert "no CUDA" in doc["sections"][name]["note"]
    assert doc["kind"] == "gpu-validate" and doc["mode"] == "dry-run"
    assert doc["versions"]["torch"] == torch.__version__


def test_dry_run_exercises_each_measurement(dry_run):
    _, doc, path = dry_run
    groups = {r["group"] for r in doc["results"]}
    assert {"tests", "correctness", "sync-check", "optimizer-step", "host-time", "op-count", "end-to-end"} <= groups
    correctness = [r for r in doc["results"] if r["group"] == "correctness"]
    assert correctness and all(r["ok"] is not False for r in correctness), [r for r in correctness if not r["ok"]]
    assert {r["storage"] for r in correctness} == {"aligned", "offset+1"}
    assert {r["dtype"] for r in correctness} == {"fp32", "bf16", "fp16"}
    steps = [r for r in doc["results"] if r["group"] == "optimizer-step" and "ms_per_step" in r]
    assert {r["variant"].split("+")[0] for r in steps} >= {"torch-fused", "lbw-" + ("triton" if torch.cuda.is_available()
                                                                                     else "cpu")}
    assert all(r["bytes_per_param"] and r["pct_copy"] > 0 for r in steps)
    tests = [r for r in doc["results"] if r["group"] == "tests"]
    assert tests and tests[0]["collected"] and tests[0]["collected"] > 100  # the GPU test files import
    md = path.with_suffix(".md").read_text()
    assert "Dry run" in md and "Sections" in md and "Correctness" in md


def test_without_a_gpu_a_real_run_refuses_and_points_to_the_dry_run():
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    proc = run(["--sections", "env"], timeout=60)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_sections_and_budgets_are_checked(tmp_path):
    proc = run(["--dry-run", "--sections", "env,nope", "--out", str(tmp_path)], timeout=60)
    assert proc.returncode != 0 and "nope" in proc.stderr
    proc = run(["--dry-run", "--sections", "env", "--budget", "env=x", "--out", str(tmp_path)], timeout=60)
    assert proc.returncode != 0


def test_step_stalls_times_every_step_of_both_configurations(capsys):
    """``benchmarks.step_stalls --tiny``: one time per step for each configuration, the first
    step reported apart; a bad ``--steps`` is refused by name."""
    from benchmarks import step_stalls

    assert step_stalls.main(["--tiny", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu,") and "4 steps per configuration" in lines[0]
    for guard, summary, per_step in ((None, lines[1], lines[2]), ("default", lines[3], lines[4])):
        assert summary.startswith(f"guard={guard}: first step ")
        times = [float(t.rstrip("*")) for t in per_step.split()]
        assert len(times) == 4 and all(t > 0 for t in times)
    with pytest.raises(SystemExit):
        step_stalls.main(["--tiny", "--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
