"""benchmarks/heldout.py: the held-out scenario harness picks the best lr from its own sweep
and judges the guard against it (a few steps per run; the full run is `python -m benchmarks.heldout`)."""

import json
import math

import pytest
import torch

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


def test_the_fused_reference_is_the_optimizer_without_a_guard(tmp_path):
    """--fused-reference: FusedGuardedAdamW(guard=None) at each multiple, set against AdamW (the noise
    floor under the 1x target); it equals a run of that optimizer made here."""
    steps = 3
    rows = heldout.run(["opt-const"], seeds=[0], multiples=[1.0, 10.0], steps=steps, out=tmp_path, guard_config=None,
                       backend="torch", workers=1, progress=False, fused_reference=True)
    runs = json.loads((tmp_path / "heldout.json").read_text())["runs"]
    for r in rows:
        fused = runs[heldout.Job("opt-const", "fused", r["lr"], 0).key]
        assert set(fused) == {"final_loss"}
        assert r["fused_vs_adamw"] == pytest.approx(fused["final_loss"] / r["adamw"])
    job = heldout.Job("opt-const", "fused", rows[0]["lr"], 0)
    again = heldout.train(job, steps, None, "torch")
    assert again["final_loss"] == pytest.approx(runs[job.key]["final_loss"], rel=1e-6)
    text = (tmp_path / "heldout.md").read_text()
    assert "| fused, no guard / AdamW |" in text and f"| {rows[0]['fused_vs_adamw']:.4f} |" in text
    within = sum(r["fused_vs_adamw"] <= 1.01 for r in rows[:1])
    assert ("At 1x, at most 1% above AdamW (the target's test): the fused optimizer without a guard in "
            f"{within} of 1 runs") in text


def test_without_the_fused_reference_the_table_has_no_such_column(tmp_path):
    heldout.run(["opt-const"], seeds=[0], multiples=[1.0], steps=2, out=tmp_path, guard_config=None,
                backend="torch", workers=1, progress=False)
    assert "fused" not in (tmp_path / "heldout.md").read_text()


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
    (["--faults", "spike-1e4,nope"], "--faults"),
    (["--faults", "nan-grad", "--multiples", "10"], "--multiples"),
    (["--seeds", "0,0"], "--seeds"),
    (["--multiples", "1,1"], "--multiples"),
    (["--scenarios", "opt-const,opt-const"], "--scenarios"),
    (["--backend", "bogus"], "--backend"),
])
def test_bad_arguments_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        heldout.main(argv)
    assert words in capsys.readouterr().err


def test_the_sets_partition_the_scenarios():
    first, second, third = heldout.SETS["first"], heldout.SETS["second"], heldout.SETS["third"]
    assert len(first) == len(second) == len(third) == 10
    assert len(set(first) | set(second) | set(third)) == 30
    assert first + second + third == heldout.SETS["all"] == list(heldout.SCENARIOS)


@pytest.mark.parametrize("name", heldout.SETS["second"] + heldout.SETS["third"])
def test_every_scenario_of_the_second_and_third_sets_trains(name):
    """Two steps each: the model, the adapters, the groups and the schedule are built and step."""
    result = heldout.train(heldout.Job(name, "adamw", heldout.SCENARIOS[name].sweep[1], 0), steps=2,
                           guard_config=None, backend="torch")
    assert math.isfinite(result["final_loss"]) and 0.0 < result["final_loss"] < 10.0


def test_loraplus_groups_put_only_the_b_matrices_at_16x_the_lr():
    import peft
    model = peft.get_peft_model(heldout.build_model("gpt2", 0), peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    a_group, b_group = heldout.param_groups(model, "lora+", 2e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert a_group["lr"] == 2e-4 and b_group["lr"] == pytest.approx(2e-4 * heldout.LORAPLUS_RATIO)
    assert a_group["params"] and all("lora_A" in names[id(p)] for p in a_group["params"])
    assert b_group["params"] and all("lora_B" in names[id(p)] for p in b_group["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(a_group["params"]) + len(b_group["params"]) == len(trainable)


@pytest.mark.parametrize("kind, expected", [
    # lr multipliers at steps 0, 30, 60, 80 and 200 of a 240-step run (warm-up: 24 steps)
    ("cyclic", [0.1, 1.0, 0.1, 0.7, 0.7]),
    ("inv_sqrt", [0.0, (24 / 30) ** 0.5, (24 / 60) ** 0.5, (24 / 80) ** 0.5, (24 / 200) ** 0.5]),
    ("wsd", [0.0, 1.0, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 8 / 48))]),
    ("steplr", [1.0, 1.0, 1.0, 0.3, 0.09]),
    ("torch_restarts", [1.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 20 / 60)), 0.5 * (1 + math.cos(math.pi * 20 / 60))]),
    ("exponential", [1.0, 0.99 ** 30, 0.99 ** 60, 0.99 ** 80, 0.99 ** 200]),
    # the third set's: cosines over the 216 steps after the warm-up
    ("cosine_min_lr", [0.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 216)),
                       0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 36 / 216)),
                       0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 56 / 216)),
                       0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 176 / 216))]),
    ("constant_warmup", [0.0, 1.0, 1.0, 1.0, 1.0]),
    ("torch_warmup_cosine", [0.01, 0.5 * (1 + math.cos(math.pi * 6 / 216)), 0.5 * (1 + math.cos(math.pi * 36 / 216)),
                             0.5 * (1 + math.cos(math.pi * 56 / 216)), 0.5 * (1 + math.cos(math.pi * 176 / 216))]),
])
def test_the_schedules(kind, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = heldout.make_schedule(opt, kind, 240)
    seen = {}
    for step in range(201):
        seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
    assert [seen[s] for s in (0, 30, 60, 80, 200)] == pytest.approx(expected, abs=1e-6)


def test_a_committed_table_is_kept_without_out_and_rewritten_with_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(heldout, "run", lambda *args, **kwargs: calls.append(kwargs["write_table"]) or [])
    heldout.main(["--scenarios", "third", "--seeds", "0"])
    assert "left as it is" in capsys.readouterr().out
    heldout.main(["--scenarios", "third", "--out", heldout.OUT["third"]])
    heldout.main(["--scenarios", "opt-const"])
    assert calls == [False, True, True]


def test_an_unreadable_results_file_and_an_unwritable_out_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "heldout.json").write_text('{"settings": {"steps": 2')  # cut off mid-write
    with pytest.raises(SystemExit):
        heldout.main(["--scenarios", "opt-const", "--out", str(tmp_path), "--no-progress"])
    assert "heldout.json" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        heldout.main(["--scenarios", "opt-const", "--out", str(blocker / "sub"), "--no-progress"])
    assert "--out" in capsys.readouterr().err


def test_each_set_writes_to_its_own_folder(monkeypatch):
    """A run of other scenarios never replaces a set's committed table."""
    seen = []
    monkeypatch.setattr(heldout, "run", lambda names, seeds, multiples, steps, out, *args, **kwargs:
                        seen.append((names, str(out))) or [])
    for argv in ([], ["--scenarios", "second"], ["--scenarios", "third"], ["--scenarios", "opt-const"],
                 ["--scenarios", "all"], ["--scenarios", "second", "--out", "elsewhere"]):
        heldout.main(argv)
    assert seen == [(heldout.SETS["first"], heldout.OUT["first"]), (heldout.SETS["second"], heldout.OUT["second"]),
                    (heldout.SETS["third"], heldout.OUT["third"]), (["opt-const"], heldout.OTHER_OUT),
                    (heldout.SETS["all"], heldout.OTHER_OUT), (heldout.SETS["second"], "elsewhere")]


def test_fault_runs_are_the_guard_with_the_fault_injected(tmp_path):
    """--faults: the guard at the best lr with each fault of the stress matrix, against its clean run."""
    steps = 5  # the gradient faults fire at steps 2 and 3, the random batch at step 2
    rows = heldout.run(["opt-const"], seeds=[0], multiples=[1.0, 10.0], steps=steps, out=tmp_path, guard_config=None,
                       backend="torch", workers=1, progress=False, faults=["nan-grad", "random-batch"])
    runs = json.loads((tmp_path / "heldout.json").read_text())["runs"]
    one, ten = rows
    assert "faults" not in ten and list(one["faults"]) == ["nan-grad", "random-batch"]
    for fault, ratio in one["faults"].items():
        run = runs[heldout.Job("opt-const", f"guard+{fault}", one["lr"], 0).key]
        assert ratio == pytest.approx(run["final_loss"] / one["guard"]) and math.isfinite(ratio)
        assert run["final_loss"] != one["guard"]  # the fault fired and changed the run (and a NaN did not spread)
    text = (tmp_path / "heldout.md").read_text()
    assert "## Faults at the best lr" in text and "| opt-const | 0 | " + " | ".join(
        f"{v:.4f}" for v in one["faults"].values()) + " |" in text
    assert f"Within 10% of the clean run: {sum(v <= 1.10 for v in one['faults'].values())} of 2" in text


def test_the_third_sets_corpora_are_prose_about_code_and_source():
    docstrings, source = heldout.corpus("docstrings").decode(), heldout.corpus("asyncio").decode()
    assert len(docstrings) > 500_000 and len(source) > 300_000
    assert source.count("async def ") > 100 > 10 * docstrings.count("async def ") and "Return " in docstrings
    letters = sum(c.isalpha() or c.isspace() for c in docstrings) / len(docstrings)
    assert letters > 0.9  # prose: letters and spaces, little punctuation
    with pytest.raises(ValueError, match="unknown corpus"):
        heldout.corpus("nope")
