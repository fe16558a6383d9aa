"""benchmarks/classifier_faults.py: when each fault fires, what it corrupts (and nothing else), a
tiny run end to end and its table, and the argument checks (the full run is
`python -m benchmarks.classifier_faults`)."""

import json
import math

import pytest
import torch

from benchmarks import classifier_faults as cf


def test_faults_fire_where_the_stress_matrix_puts_them():
    assert cf.fault_steps("clean", 100) == frozenset()
    assert cf.fault_steps("spike-1e4", 100) == {40, 70}
    assert cf.fault_steps("nan-loss", 150) == {60, 105}
    assert cf.fault_steps("random-labels", 80) == {40}
    assert cf.fault_steps("nan-input", 150) == {75}
    assert cf.fault_steps("lr-x100", 3) == {1}
    assert cf.fault_steps("spike-early", 100) == {0, 6}
    assert cf.fault_steps("spike-early", 5) == {0}
    with pytest.raises(ValueError, match="unknown fault 'spike-1e9'"):
        cf.fault_steps("spike-1e9", 10)


def _model_with_grads(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("name", list(cf.FAULTS))
def test_each_fault_corrupts_what_it_names_at_its_steps_only(name):
    steps, lr = 10, 1e-3
    fault = cf.Fault(name, steps, seed=3)
    for step in range(steps):
        model = _model_with_grads(step)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        before = [p.grad.clone() for p in model.parameters()]
        x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
        x2, y2 = fault.batch(step, x, y)
        loss = torch.tensor(1.5)
        seen = fault.before_step(step, model, opt, lr, loss)
        after = [p.grad for p in model.parameters()]
        fires = step in fault.at
        if not fires:
            assert x2 is x and y2 is y and seen is loss
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            assert all(g["lr"] == lr for g in opt.param_groups)
            continue
        grads_same = all(torch.equal(a, b) for a, b in zip(after, before))
        if name in cf.SPIKE_FACTORS:
            for a, b in zip(after, before):
                torch.testing.assert_close(a, b * cf.SPIKE_FACTORS[name], rtol=0, atol=0)
        elif name in ("nan-grad", "inf-grad"):
            bad = after[0] if name == "nan-grad" else after[-1]
            flat = bad.view(-1)
            assert (math.isnan if name == "nan-grad" else math.isinf)(flat[0].item())
            assert torch.isfinite(flat[1:]).all()
            assert sum(int((~torch.isfinite(a)).sum()) for a in after) == 1
        elif name == "zero-grad":
            assert all(not a.any() for a in after)
        else:
            assert grads_same
        if name == "nan-loss":
            assert math.isnan(seen.item())
        else:
            assert seen is loss
        if name == "random-labels":
            assert torch.equal(x2, x) and not torch.equal(y2, y) and 0 <= int(y2.min()) and int(y2.max()) <= 2
        elif name == "outlier-input":
            assert torch.equal(x2, 100 * x) and y2 is y
        elif name == "nan-input":
            flat, orig = x2.view(-1), x.view(-1)
            assert math.isnan(flat[0].item()) and torch.equal(flat[1:], orig[1:]) and y2 is y
            assert torch.isfinite(orig).all()  # the batch given is not changed
        else:
            assert x2 is x and y2 is y
        assert all(g["lr"] == (100 * lr if name == "lr-x100" else lr) for g in opt.param_groups)


def test_a_tiny_run_writes_every_run_and_the_table(tmp_path):
    settings, faults, seeds = [("mlp", 4, 3e-3), ("cnn", 8, 1e-2)], ["spike-1e6", "nan-grad"], [0]
    steps = {"mlp": 4, "cnn": 4}
    runs = cf.run(settings, faults, seeds, tmp_path, steps=steps, backend="torch", workers=1, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["runs"] == json.loads(json.dumps(runs)) and doc["steps"] == steps
    assert sorted(runs) == sorted(cf.run_key(t, b, arm, f, 0) for t, b, _ in settings for arm in ("adamw", "guard")
                                  for f in ("clean", *faults))
    for (task, batch, _), fault in ((s, f) for s in settings for f in faults):
        # a NaN gradient element ends plain AdamW non-finite; the guard stays finite through every fault
        adamw = runs[cf.run_key(task, batch, "adamw", fault, 0)]["final_loss"]
        assert (adamw == math.inf) == (fault == "nan-grad")
        assert math.isfinite(runs[cf.run_key(task, batch, "guard", fault, 0)]["final_loss"])
    text = (tmp_path / "results.md").read_text()
    within = 0
    for task, batch, lr in settings:
        for fault in faults:
            guard = cf.ratios(runs, task, batch, "guard", fault, seeds)[0]
            adamw = cf.ratios(runs, task, batch, "adamw", fault, seeds)[0]
            within += (guard <= 1.1) + (adamw <= 1.1)
            adamw_cell = f"{adamw:.3f} / {adamw:.3f}" if math.isfinite(adamw) else "0 of 1 finite"
            assert f"| {task} | {batch} | {lr:g} | {fault} | {guard:.3f} / {guard:.3f} | {adamw_cell} |" in text
    n_guard = sum(cf.ratios(runs, t, b, "guard", f, seeds)[0] <= 1.1 for t, b, _ in settings for f in faults)
    assert f"guard {n_guard} of 4, plain AdamW {within - n_guard} of 4." in text


@pytest.mark.parametrize("argv, words", [
    (["--settings", "cnn:16"], "--settings"),
    (["--settings", "cnn:16:fast"], "--settings"),
    (["--settings", "cnn:16:0"], "--settings"),
    (["--settings", "cnn:16:1e-3:2"], "--settings"),
    (["--settings", "resnet:16:1e-3"], "--settings"),
    (["--settings", "cnn:16:1e-3,cnn:16:1e-2"], "--settings"),
    (["--faults", "spike-1e9"], "--faults"),
    (["--faults", "nan-grad,nan-grad"], "--faults"),
    (["--seeds", "x"], "--seeds"),
    (["--workers", "0"], "--workers"),
    (["--backend", "cuda"], "--backend"),
])
def test_bad_arguments_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        cf.main(argv)
    assert words in capsys.readouterr().err
