"""benchmarks/classifiers.py: the synthetic tasks, a tiny run end to end and its table, and the
argument checks (a few steps per run; the full run is `python -m benchmarks.classifiers`)."""

import json
import math

import pytest
import torch

from benchmarks import classifiers as cls


@pytest.mark.parametrize("task, classes", [("cnn", 2), ("cnn-bn", 4), ("mlp", 10)])
def test_each_task_is_seeded_and_its_model_fits_its_data(task, classes):
    x, y = cls.task_data(task, seed=3)
    x2, y2 = cls.task_data(task, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, cls.task_data(task, seed=4)[0])
    assert len(x) == len(y) == 2 * cls.SAMPLES and y.dtype == torch.long
    assert set(y.tolist()) == set(range(classes))  # every class occurs
    logits = cls.build_model(task, seed=3)(x[:5])
    assert logits.shape == (5, classes)


def test_a_tiny_run_writes_every_run_and_the_table(tmp_path):
    settings, lrs = [("cnn", 8), ("mlp", 4)], [1e-3, 3e-2]
    runs = cls.run(settings, lrs, [0], tmp_path, steps={"cnn": 3, "mlp": 3}, backend="torch", progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["runs"] == json.loads(json.dumps(runs)) and doc["steps"] == {"cnn": 3, "mlp": 3}
    assert sorted(runs) == sorted(cls.run_key(t, b, arm, lr, 0) for t, b in settings for arm in ("adamw", "guard")
                                  for lr in lrs)
    for key, r in runs.items():
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        if "|guard|" in key:
            assert 0.0 <= r["capped_fraction"] <= 1.0 and r["rollbacks"] >= 0
    lines = (tmp_path / "results.md").read_text().splitlines()
    for task, batch in settings:
        adamw = {lr: runs[cls.run_key(task, batch, "adamw", lr, 0)]["final_loss"] for lr in lrs}
        best = min(adamw, key=adamw.get)
        rows = [line for line in lines if line.startswith(f"| {task} | {batch} |")]
        assert len(rows) == len(lrs)
        for lr, row in zip(lrs, rows):
            ratio = runs[cls.run_key(task, batch, "guard", lr, 0)]["final_loss"] / adamw[lr]
            assert f"| {lr:g}{' (best)' if lr == best else ''} | {adamw[lr]:.4f} | {ratio:.3f} |" in row


def test_both_arms_start_from_the_same_model():
    a, b = cls.build_model("cnn-bn", seed=1).state_dict(), cls.build_model("cnn-bn", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, words", [
    (["--settings", "resnet:16"], "--settings"),
    (["--settings", "cnn"], "--settings"),
    (["--settings", "cnn:0"], "--settings"),
    (["--settings", "cnn:16,cnn:16"], "--settings"),
    (["--lrs", "0"], "--lrs"),
    (["--lrs", "fast"], "--lrs"),
    (["--seeds", "1.5"], "--seeds"),
    (["--backend", "cuda"], "--backend"),
    (["--schedule", "linear"], "--schedule"),
])
def test_bad_arguments_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        cls.main(argv)
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("name", [s for s in cls.SCHEDULES if s != "constant"])
def test_each_schedule_moves_the_lr_of_both_arms_alike(name):
    """The scheduler sets the same lr on plain AdamW and on the guarded optimizer, step by step
    (the guard's scale multiplies it inside the kernel and never rewrites ``group["lr"]``)."""
    from lbw_guard import FusedGuardedAdamW

    steps, lr = 40, 1e-2
    lrs = {}
    for arm, cls_ in (("adamw", torch.optim.AdamW), ("guard", FusedGuardedAdamW)):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = cls_([p], lr=lr)
        sched = cls.make_schedule(name, opt, steps)
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(3)
            opt.step(**({"loss": torch.tensor(1.0)} if arm == "guard" else {}))
            sched.step()
        lrs[arm] = seen
    assert lrs["adamw"] == pytest.approx(lrs["guard"], rel=1e-12)
    seen = lrs["adamw"]
    assert max(seen) == pytest.approx(lr, rel=0.05) and min(seen) < 0.5 * lr  # peaks at lr, and moves
    if name == "warmup-cosine":
        assert seen[0] == pytest.approx(0.01 * lr) and seen[4] == pytest.approx(lr)
    if name == "warm-restarts":
        assert seen[10] == pytest.approx(lr) and seen[9] < 0.1 * lr  # a restart every steps // 4


def test_an_unknown_schedule_is_refused():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert cls.make_schedule("constant", opt, 10) is None
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        cls.make_schedule("linear", opt, 10)
