"""The generalization matrix (``lbw-guard stress --matrix``): CI smoke, resume, CLI checks, and unit
tests of its parts (baseline rules, schedules, faults, LoRA+ groups, plan, targets).

The smoke checks that the files are written and the tables have their structure, never what the
losses are or whether the guard meets its targets (a dozen steps decide nothing, and the tests
must not depend on the guard's tuning).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from lbw_guard.experiments.cli import main
from lbw_guard.experiments.matrix import (MATRIX_ARMS, PARTIAL_NAME, SMOKE, SWEEP_NAME, MatrixConfig, _half_decade,
                                          cells, planned_runs, record_key)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _argv(tmp_path, *extra):
    # The reference backend: no C++ build in CI; the backends' equality is tested elsewhere.
    return ["stress", "--matrix", "--smoke", "--backend", "torch", "--no-progress", "--threads", "1",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("matrix")
    assert main(_argv(tmp_path)) == 0
    return tmp_path


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_smoke_writes_every_run_and_its_metadata(smoke):
    out = smoke / "out"
    doc = _strict(out / "matrix.json")
    assert doc["schema"] == "lbw-guard-matrix/1"
    cfg = MatrixConfig(**{**SMOKE, "smoke": True})
    planned = planned_runs(cfg)
    assert len(doc["runs"]) == len(planned) == len({record_key(r) for r in doc["runs"]})
    assert {record_key(r) for r in doc["runs"]} == set(planned)
    assert set(doc["config"]["arms"]) == set(MATRIX_ARMS) and doc["config"]["smoke"] is True
    meta = doc["meta"]
    for key in ("python", "torch", "transformers", "platform", "cpu_count", "optimizer_source_sha1", "data"):
        assert key in meta
    assert meta["complete"] and meta["runs_finished"] == len(planned)
    for r in doc["runs"]:
        assert r["steps_run"] == cfg.steps or r["diverged"]
        assert isinstance(r["survived"], bool) and r["lr"] > 0 and r["base_lr"] > 0
        assert (r["guard"] is not None) == (r["arm"] == "guard")
        if r["guard"]:
            for key in ("capped_fraction", "skipped_fraction", "partly_skipped_fraction", "frozen_fraction",
                        "mean_scale", "rollbacks"):
                assert key in r["guard"]
            assert 0 <= r["guard"]["capped_fraction"] <= 1 and 0 < r["guard"]["mean_scale"] <= 1
        if r["arm"] in ("skipstep", "zclip") and not r["reused"]:
            assert r["baseline"]["rule"] == r["arm"]
        if r["arm"] == "adamw-guardlr":
            assert 0 < r["lr_scale_from_guard"] <= 1
            assert r["lr"] == pytest.approx(r["base_lr"] * r["multiple"] * r["lr_scale_from_guard"])
        if r["fault"] not in ("clean", "data-switch"):
            assert r["fault_steps"]
    # every setting the matrix needs was swept, and the sweep is cached beside the results
    sweep = _strict(out / SWEEP_NAME)
    assert set(sweep["settings"]) == set(doc["sweeps"]) and all(e["complete"] for e in doc["sweeps"].values())
    assert not (out / PARTIAL_NAME).exists()


def test_smoke_summary_and_report_have_their_structure(smoke):
    out = smoke / "out"
    doc = _strict(out / "matrix.json")
    s = doc["summary"]
    assert set(s["verdict"]) == {"lr-10x", "clean-1x", "faults"}
    for v in s["verdict"].values():
        assert v["status"] in ("PASS", "FAIL", "incomplete", "n/a")
        assert v["cells"] == v["passed"] + v["failed"] + v["not_run"]
    cfg = doc["config"]
    n_lr_rows = len(cfg["archs"]) * len(cfg["lr_schedules"]) * len(cfg["arms"])
    assert len(s["lr"]["rows"]) == n_lr_rows
    assert len(s["lr"]["guard"]) == len(cfg["archs"]) * len(cfg["lr_schedules"]) * len(cfg["lr_multiples"])
    assert len(s["finetune"]["rows"]) == len(cfg["archs"]) * len(cfg["ft_modes"]) * len(cfg["ft_schedules"]) \
        * len(cfg["arms"])
    assert len(s["faults"]["rows"]) == len(cfg["archs"]) * (len(cfg["faults"]) + 1) * len(cfg["arms"])
    for row in s["lr"]["rows"]:
        assert set(row["cells"]) == {f"{m:g}" for m in cfg["lr_multiples"]}
    report = (out / "matrix.md").read_text()
    for heading in ("## Targets", "## How it was run", "## AdamW sweep", "## Slice: learning-rate stress",
                    "## Slice: fine-tuning", "## Slice: faults", "## Plots"):
        assert heading in report
    assert "| arch | schedule | arm | 1x | 10x |" in report
    assert "OLMo-core" in report and "ZClip" in report and "summary()" in report
    for name in ("matrix_lr_ratio.png", "matrix_finetune_ratio.png", "matrix_faults.png"):
        assert f"]({name})" in report
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_resume_keeps_finished_runs_and_reuses_the_sweep(smoke, tmp_path):
    doc = _strict(smoke / "out" / "matrix.json")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(smoke / "out" / SWEEP_NAME, out / SWEEP_NAME)
    cfg = MatrixConfig(**{**SMOKE, "smoke": True, "archs": ("qwen2",), "slices": ("faults",), "out_dir": out,
                          "backend": "torch", "threads": 1})
    planned = set(planned_runs(cfg))
    kept = [r for r in doc["runs"] if record_key(r) in planned][:5]
    partial = {"schema": "lbw-guard-matrix-partial/1", "config": cfg.to_json(), "fingerprint": cfg.run_fingerprint(),
               "runs_planned": len(planned), "bases": {}, "models": {}, "runs": kept}
    (out / PARTIAL_NAME).write_text(json.dumps(partial))
    sweep_before = (out / SWEEP_NAME).read_text()
    argv = _argv(tmp_path, "--archs", "qwen2", "--slices", "faults", "--no-plots")
    assert main(argv) == 2  # an unfinished matrix is never overwritten without --resume
    assert main(argv + ["--resume"]) == 0
    new = _strict(out / "matrix.json")
    assert {record_key(r) for r in new["runs"]} == planned
    by_key = {record_key(r): r for r in new["runs"]}
    for r in kept:  # untouched: not trained again
        assert by_key[record_key(r)]["train_seconds"] == r["train_seconds"]
    assert new["meta"]["runs_resumed"] == len(kept)
    assert (out / SWEEP_NAME).read_text() == sweep_before  # the cached sweep was not rerun
    assert not (out / PARTIAL_NAME).exists()


def test_worker_processes_run_the_same_plan(smoke, tmp_path):
    argv = _argv(tmp_path, "--archs", "qwen2", "--slices", "faults", "--workers", "2", "--no-plots")
    assert main(argv) == 0
    doc = _strict(tmp_path / "out" / "matrix.json")
    cfg = MatrixConfig(**{**SMOKE, "archs": ("qwen2",), "slices": ("faults",)})
    assert {record_key(r) for r in doc["runs"]} == set(planned_runs(cfg))
    assert doc["config"]["workers"] == 2 and doc["meta"]["complete"]
    # the same computation as in one process (same seeds, one thread each): plain AdamW matches exactly
    sequential = {record_key(r): r for r in _strict(smoke / "out" / "matrix.json")["runs"]}
    for r in doc["runs"]:
        if r["arm"] == "adamw":
            assert r["final_loss"] == sequential[record_key(r)]["final_loss"]


def test_resume_from_a_finished_matrix_reuses_its_runs(smoke, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("matrix.json", SWEEP_NAME):
        shutil.copy(smoke / "out" / name, out / name)
    argv = _argv(tmp_path, "--archs", "qwen2", "--slices", "faults", "--no-plots", "--resume")
    assert main(argv) == 0
    doc = _strict(out / "matrix.json")
    cfg = MatrixConfig(**{**SMOKE, "archs": ("qwen2",), "slices": ("faults",)})
    assert {record_key(r) for r in doc["runs"]} == set(planned_runs(cfg))
    assert doc["meta"]["runs_resumed"] == len(doc["runs"])  # nothing trained again


def test_a_run_that_raises_is_recorded_and_the_rest_go_on(smoke, tmp_path, monkeypatch, capsys):
    from lbw_guard.experiments.matrix import MatrixRunner

    real = MatrixRunner.train

    def train(self, key, lr, arm, label):
        if arm == "guard" and key[4] == "spike-1e4":
            raise RuntimeError("kernel says no")
        return real(self, key, lr, arm, label)

    monkeypatch.setattr(MatrixRunner, "train", train)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(smoke / "out" / SWEEP_NAME, out / SWEEP_NAME)
    assert main(_argv(tmp_path, "--archs", "qwen2", "--slices", "faults", "--no-plots")) == 1
    assert "raised an exception" in capsys.readouterr().out
    doc = _strict(out / "matrix.json")
    bad = [r for r in doc["runs"] if r.get("error")]
    assert {r["arm"] for r in bad} == {"guard", "adamw-guardlr"}  # the lr arm has no guard scale to use
    assert all(r["fault"] == "spike-1e4" and not r["survived"] for r in bad)
    assert len(doc["runs"]) == len(planned_runs(MatrixConfig(**{**SMOKE, "archs": ("qwen2",), "slices": ("faults",)})))
    assert any(c["target"] == "faults" and c["passed"] is False for c in doc["summary"]["checks"])
    assert "kernel says no" in (out / "matrix.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--lrs", "1e-3"], "does not apply to --matrix"),
    (["--mode", "lora"], "does not apply to --matrix"),
    (["--archs", "gpt5"], "unknown arch"),
    (["--slices", "lr,speed"], "unknown slice"),
    (["--seeds", "0"], "N >= 1"),
    (["--arms", "adamw,adamw-guardlr"], "needs the guard arm"),
    (["--guard", "nope"], "unknown guard preset"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--workers", str(4 * (os.cpu_count() or 1) + 1)], "per core"),
    (["--seeds", "1000000000"], "N <= 1000"),
])
def test_bad_matrix_arguments_fail_up_front(tmp_path, capsys, extra, message):
    assert main(_argv(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "out" / "matrix.json").exists()


@pytest.mark.parametrize("name", ["matrix.json", "matrix.md", "matrix.partial.json"])
def test_an_output_file_that_is_a_directory_fails_before_any_run(tmp_path, capsys, monkeypatch, name):
    from lbw_guard.experiments import matrix

    def forbidden(*args, **kwargs):
        raise AssertionError("the output paths must be checked before any run")

    monkeypatch.setattr(matrix, "execute_matrix", forbidden)
    (tmp_path / "out" / name).mkdir(parents=True)
    assert main(_argv(tmp_path)) == 2
    out = capsys.readouterr().out
    assert "exists and is not a file" in out and name in out


@pytest.mark.parametrize("flag", [["--slices", "lr"], ["--archs", "gpt2"], ["--workers", "2"],
                                  ["--announce-data-switch"]])
def test_matrix_flags_need_matrix(tmp_path, capsys, flag):
    assert main(["stress", *flag, "--out", str(tmp_path)]) == 2
    assert f"{flag[0]} belongs to --matrix" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the plan
def test_plan_shares_the_clean_cell_and_orders_guard_before_its_lr_arm():
    cfg = MatrixConfig(archs=("qwen2",), seeds=(0, 1))
    runs = planned_runs(cfg)
    assert len(runs) == len(set(runs))
    per_seed_arms = len(cfg.arms) * len(cfg.seeds)
    n_lr = len(cfg.lr_schedules) * len(cfg.lr_multiples) * per_seed_arms
    n_faults = len(cfg.faults) * per_seed_arms  # the clean cell is the lr slice's
    n_ft = len(cfg.ft_modes) * len(cfg.ft_schedules) * len(cfg.ft_multiples) * per_seed_arms
    assert len(runs) == n_lr + n_faults + n_ft
    for key in runs:
        if key[-1] == "adamw-guardlr":
            assert runs.index(key[:-1] + ("guard",)) < runs.index(key)
    slices = {c[0] for c in cells(cfg)}
    assert slices == {"lr", "finetune", "faults"}


def test_half_decade_grid_extension():
    assert _half_decade(3e-2, up=True) == pytest.approx(0.1)
    assert _half_decade(1e-1, up=True) == pytest.approx(0.3)
    assert _half_decade(1e-4, up=False) == pytest.approx(3e-5)
    assert _half_decade(3e-4, up=False) == pytest.approx(1e-4)


# ---------------------------------------------------------------------------- baselines
def test_skipstep_rule_waits_for_its_window_then_skips_outliers():
    from lbw_guard.experiments.baselines import SkipStepRule

    rule = SkipStepRule()
    assert rule.min_values == 64
    gen = torch.Generator().manual_seed(0)
    for i in range(63):
        noise = float(torch.randn((), generator=gen)) * 0.01
        assert rule.take_step(3.0 + noise, 1.0 + noise)
    assert rule.take_step(3.0, 1.0)  # the 64th value: now the rule is armed
    assert not rule.take_step(3.0, 1e4)  # a grad-norm spike: skipped
    assert not rule.take_step(30.0, 1.0)  # a loss spike: skipped
    assert rule.take_step(2.0, 0.5)  # only upward deviations count
    assert not rule.take_step(math.nan, 1.0) and not rule.take_step(3.0, math.inf)
    assert rule.skipped == 4 and len(rule.losses) <= 129
    assert all(math.isfinite(x) for x in rule.losses + rule.grad_norms)  # non-finite values never enter


def test_skipstep_spike_before_the_window_is_full_is_taken():
    from lbw_guard.experiments.baselines import SkipStepRule

    rule = SkipStepRule()
    for _ in range(10):
        rule.take_step(3.0, 1.0)
    assert rule.take_step(3.0, 1e4)


def test_zclip_rule_clips_outliers_to_the_adaptive_threshold():
    from lbw_guard.experiments.baselines import ZClipRule

    rule = ZClipRule()
    norms = [1.0 + 0.1 * ((-1) ** i) for i in range(25)]
    for g in norms:
        assert rule.clip_value(g) is None  # warm-up: collect only
    m0 = sum(norms) / 25
    assert rule.mean == pytest.approx(m0) and rule.var == pytest.approx(sum((g - m0) ** 2 for g in norms) / 25)
    assert rule.clip_value(1.05) is None  # z = 0.5: no clip
    mean, std = rule.mean, rule.var ** 0.5
    g = 100.0
    z = (g - mean) / (std + rule.eps)
    expected = mean + 2.5 ** 2 / z * std
    clip = rule.clip_value(g)
    assert clip == pytest.approx(expected)
    # the EMA took the clipped value, not the spike
    assert rule.mean == pytest.approx(0.97 * mean + 0.03 * expected)
    assert rule.clipped == 1
    assert ZClipRule(max_grad_norm=0.5).clip_value(1.0) == 0.5  # the optional ceiling applies in warm-up too


def test_baseline_arms_step_adamw_through_their_rules():
    from lbw_guard.experiments.arms import Stepper, build_optimizer, parse_arm

    for name in ("skipstep", "zclip", "adamw-guardlr"):
        w = torch.nn.Parameter(torch.ones(4))
        arm = parse_arm(name)
        opt = build_optimizer(arm, [{"params": [w]}], 0.1, (0.9, 0.999), 1e-8, 0.0)
        assert isinstance(opt, torch.optim.AdamW)
        stepper = Stepper(arm, opt, [w])
        loss = (w * 2).sum()
        loss.backward()
        stepper.step(loss)
        assert w.grad is None and not torch.equal(w.detach(), torch.ones(4))
        assert (stepper.stats() is None) == (name == "adamw-guardlr")
    assert parse_arm("skipstep-clip1.0").clip == 1.0 and parse_arm("zclip").label == "ZClip"


# ---------------------------------------------------------------------------- schedules
def test_schedules_are_torch_schedulers_with_their_shapes():
    from lbw_guard.experiments.schedules import SCHEDULES, ScheduleSpec, lr_trace

    assert SCHEDULES == ("constant", "cosine", "restarts", "onecycle")
    steps = 200
    const = lr_trace(ScheduleSpec("constant", steps))
    assert const == [1.0] * steps
    cos = lr_trace(ScheduleSpec("cosine", steps))
    assert cos[0] < 0.1 and max(cos) == pytest.approx(1.0) and cos[-1] < 0.01
    assert cos.index(max(cos)) == ScheduleSpec("cosine", steps).warmup_steps  # warm-up, then the cosine from 1
    restarts = lr_trace(ScheduleSpec("restarts", steps, restart_cycles=4))
    jumps = [i for i in range(1, steps) if restarts[i] > restarts[i - 1] + 0.5]
    assert jumps == [50, 100, 150]  # three restarts back to the full lr
    one = lr_trace(ScheduleSpec("onecycle", steps, onecycle_pct=0.25))
    assert one[0] == pytest.approx(1 / 25) and abs(one.index(max(one)) - 50) <= 1 and one[-1] < 1e-3


def test_scheduler_keeps_per_group_ratios():
    from lbw_guard.experiments.schedules import ScheduleSpec, make_scheduler

    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    for name in ("cosine", "restarts", "onecycle"):
        opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 16e-3}])
        sched = make_scheduler(ScheduleSpec(name, 40), opt)
        for _ in range(17):
            opt.step()
            sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(16 * lrs[0])


# ---------------------------------------------------------------------------- faults and data
def _groups():
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    for p in (w1, w2):
        p.grad = torch.ones_like(p)
    return [{"params": [w2], "name": "embed"}, {"params": [w1], "name": "layer000"}], w1, w2


def test_gradient_faults_fire_at_their_steps_only():
    from lbw_guard.experiments.faults import FaultPlan, fault_steps

    assert fault_steps("spike-1e4", 100) == (40, 70) and fault_steps("random-batch", 100) == (50,)
    assert fault_steps("spike-early", 240) == fault_steps("spike-early", 16) == (0, 6)
    groups, w1, w2 = _groups()
    plan = FaultPlan("spike-1e5", 100)
    plan.bind(groups, 50, 0)
    plan.corrupt_grads(39)
    assert w1.grad.max() == 1
    plan.corrupt_grads(40)
    assert w1.grad.max() == 1e5 and w2.grad.max() == 1e5
    for name, factor, at in (("spike-1e3", 1e3, 70), ("spike-1e4", 1e4, 70), ("spike-1e6", 1e6, 70),
                             ("spike-early", 1e4, 6)):
        groups, w1, w2 = _groups()
        plan = FaultPlan(name, 100)
        plan.bind(groups, 50, 0)
        plan.corrupt_grads(at)
        assert w1.grad.max() == factor and w2.grad.max() == factor and plan.fired == [at]
    groups, w1, w2 = _groups()
    plan = FaultPlan("nan-grad", 100)
    plan.bind(groups, 50, 0)
    plan.corrupt_grads(70)
    assert int(torch.isnan(w1.grad).sum()) == 1 and not torch.isnan(w2.grad).any()  # one element of a layer matrix
    plan = FaultPlan("random-batch", 100)
    plan.bind(groups, 50, 3)
    tokens = torch.zeros(4, 9, dtype=torch.long)
    assert plan.corrupt_batch(49, tokens) is tokens
    rnd = plan.corrupt_batch(50, tokens)
    assert rnd.shape == tokens.shape and rnd.max() < 50 and rnd.float().std() > 0
    again = FaultPlan("random-batch", 100)
    again.bind(groups, 50, 3)
    assert torch.equal(again.corrupt_batch(50, tokens), rnd)  # the same for every arm of a seed
    with pytest.raises(ValueError):
        fault_steps("meteor", 100)


def test_switch_data_draws_prose_then_code():
    from lbw_guard.experiments.data import TokenData
    from lbw_guard.experiments.faults import SwitchData

    prose = TokenData(torch.zeros(500, dtype=torch.long), torch.zeros(100, dtype=torch.long), 10, 16)
    code = TokenData(torch.ones(800, dtype=torch.long), torch.ones(200, dtype=torch.long) * 2, 10, 16)
    data = SwitchData(prose, code, switch_step=6)
    sched = data.batch_schedule(10, 4, seed=1)
    assert sched.shape == (10, 4)
    for step in range(10):
        batch = data.batch(sched[step])
        assert (batch == (0 if step < 6 else 1)).all()  # never a window across the boundary
    assert torch.equal(data.heldout, code.heldout)


def test_prose_corpus_is_english_documentation():
    from lbw_guard.experiments.corpus import load_prose_corpus, pydoc_topics_documents

    docs = pydoc_topics_documents()
    assert len(docs) > 50 and all(name.startswith("pydoc:") for name, _ in docs)
    c = load_prose_corpus()
    assert c.train and c.heldout and not set(c.train) & set(c.heldout)


# ---------------------------------------------------------------------------- models and LoRA+
@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_new_architectures_build_train_and_take_lora_plus(arch):
    from lbw_guard.experiments.lora import lora_model, lora_plus_groups
    from lbw_guard.experiments.models import build_model
    from lbw_guard.experiments.train import layer_param_groups

    model = build_model(arch, "nano", 64, 16, seed=0)
    groups = layer_param_groups(model)
    assert {"layer000"} <= {g["name"] for g in groups}
    x = torch.randint(0, 64, (2, 16))
    assert model(input_ids=x).logits.shape == (2, 16, 64)
    peft_model = lora_model(arch, "nano", model.state_dict(), 64, 16, rank=4, alpha=8, seed=0)
    plus = lora_plus_groups(peft_model, layer_param_groups(peft_model), 16.0)
    b_groups = [g for g in plus if g.get("lr_factor") == 16.0]
    assert b_groups and all(str(g["name"]).endswith(".lora_B") for g in b_groups)
    named = {id(p): n for n, p in peft_model.named_parameters()}
    assert all("lora_B" in named[id(p)] for g in b_groups for p in g["params"])
    assert all("lora_B" not in named[id(p)] for g in plus if g not in b_groups for p in g["params"])


# ---------------------------------------------------------------------------- targets
def _rec(arch, sched, mult, fault, seed, arm, loss, capped=0.0, rollbacks=0, survived=True, mode="full"):
    g = None
    if arm == "guard":
        g = {"capped_fraction": capped, "skipped_fraction": 0.0, "partly_skipped_fraction": 0.0,
             "frozen_fraction": 0.0, "mean_scale": 1.0, "rollbacks": rollbacks, "interventions": 0, "gave_up": 0}
    return {"arch": arch, "mode": mode, "schedule": sched, "multiple": mult, "fault": fault, "seed": seed, "arm": arm,
            "lr": 1e-3 * mult, "final_loss": loss, "survived": survived, "guard": g}


def test_target_checks_pass_and_fail_where_they_should():
    from lbw_guard.experiments.matrix_report import summarize_matrix

    cfg = MatrixConfig(archs=("qwen2",), seeds=(0, 1), arms=("adamw", "guard"), lr_schedules=("constant",),
                       lr_multiples=(1.0, 10.0), slices=("lr", "faults"), faults=("spike-1e4", "nan-grad"))
    runs = []
    for seed in (0, 1):
        runs += [_rec("qwen2", "constant", 1.0, "clean", seed, "adamw", 4.00),
                 _rec("qwen2", "constant", 1.0, "clean", seed, "guard", 4.06, capped=0.005),  # 1.5% over: fails 1%
                 _rec("qwen2", "constant", 10.0, "clean", seed, "adamw", None, survived=False),
                 _rec("qwen2", "constant", 10.0, "clean", seed, "guard", 4.5),  # 1.125 x best: passes 15%
                 _rec("qwen2", "constant", 1.0, "spike-1e4", seed, "adamw", None, survived=False),
                 _rec("qwen2", "constant", 1.0, "spike-1e4", seed, "guard", 4.1),
                 _rec("qwen2", "constant", 1.0, "nan-grad", seed, "adamw", None, survived=False),
                 _rec("qwen2", "constant", 1.0, "nan-grad", seed, "guard", 4.9)]  # 22% worse: fails 10%
    doc = {"config": cfg.to_json(), "runs": runs,
           "sweeps": {"qwen2/full/constant": {"complete": True, "best_lr": 1e-3, "best_loss": 4.0, "runs": {}}}}
    s = summarize_matrix(doc)
    assert s["verdict"]["lr-10x"]["status"] == "PASS"
    assert s["verdict"]["clean-1x"]["status"] == "FAIL"
    assert "guard/AdamW 1.0150" in next(c["detail"] for c in s["checks"] if c["target"] == "clean-1x")
    assert s["verdict"]["faults"] == {"cells": 2, "passed": 1, "failed": 1, "not_run": 0, "status": "FAIL"}
    rows = {(r["fault"], r["arm"]): r for r in s["faults"]["rows"]}
    assert rows[("spike-1e4", "adamw")]["survived"] == 0 and rows[("spike-1e4", "guard")]["within_10pct"] == 2
    cell = next(r for r in s["lr"]["rows"] if r["arm"] == "guard")["cells"]["10"]
    assert cell["ratio_to_best"] == pytest.approx(4.5 / 4.0)
