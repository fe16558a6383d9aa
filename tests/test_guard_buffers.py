"""Module buffers watched by the guard (``opt.guard.watch_buffers(model)``,
:mod:`lbw_guard.guard.buffers`): a bad step's forward pass leaves no trace in BatchNorm's
running statistics, a step the guard takes leaves them as plain AdamW would, and a rollback
restores them with the parameters. Every buffer element is compared exactly: the guard only
copies them."""

import math

import pytest
import torch
from torch import nn

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import Guard, GuardConfig

FEATURES, CLASSES = 8, 3


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES))


def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, FEATURES, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def setup(seed: int, guard="default", watch=True, lr=1e-2):
    model = bn_model(seed)
    opt = FusedGuardedAdamW(model.parameters(), lr=lr, guard=guard, backend="torch")
    if watch:
        opt.guard.watch_buffers(model)
    return model, opt, torch.Generator().manual_seed(seed + 1)


def train_step(model, opt, gen, corrupt=None, grad_factor=1.0):
    """One step; ``corrupt`` edits the input batch. Returns the buffers its forward wrote."""
    x, y = batch(gen)
    if corrupt is not None:
        x = corrupt(x)
    loss = nn.functional.cross_entropy(model(x), y)
    written = buffers(model)
    loss.backward()
    if grad_factor != 1.0:
        for p in model.parameters():
            p.grad.mul_(grad_factor)
    opt.step(loss=loss.detach())
    opt.zero_grad()
    return written


def nan_element(x):
    x = x.clone()
    x[3, 2] = math.nan
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_nan_input_batch_leaves_no_trace_in_the_running_statistics(seed):
    model, opt, gen = setup(seed)
    for _ in range(15):
        train_step(model, opt, gen)
    before = buffers(model)
    params = [p.detach().clone() for p in model.parameters()]
    written = train_step(model, opt, gen, corrupt=nan_element)
    assert not all(torch.isfinite(b.float()).all() for b in written)  # the forward poisoned them
    assert same(buffers(model), before)  # every element back, num_batches_tracked included
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))  # the step was skipped
    for _ in range(5):
        train_step(model, opt, gen)
    after = buffers(model)
    assert all(torch.isfinite(b.float()).all() for b in after) and not same(after, before)
    model.eval()
    x, y = batch(gen)
    assert math.isfinite(nn.functional.cross_entropy(model(x), y).item())


def test_without_watching_the_statistics_stay_poisoned():
    """What watch_buffers is for: the same fault, the buffers not registered."""
    model, opt, gen = setup(0, watch=False)
    for _ in range(5):
        train_step(model, opt, gen)
    train_step(model, opt, gen, corrupt=nan_element)
    assert not all(torch.isfinite(b.float()).all() for b in model.buffers())


def test_a_good_step_keeps_what_its_forward_wrote():
    """An outlier batch with finite values is a batch the step takes: its statistics stay, as
    under plain AdamW."""
    model, opt, gen = setup(3)
    for _ in range(5):
        train_step(model, opt, gen)
    written = train_step(model, opt, gen, corrupt=lambda x: 100 * x)
    assert same(buffers(model), written)
    assert opt.guard.watched_buffers == 6


def test_a_non_finite_buffer_alone_is_restored():
    """A running statistic that overflowed while the loss and the gradients stayed finite goes
    back to its value after the last good step; the step itself is taken."""
    model, opt, gen = setup(4)
    for _ in range(5):
        train_step(model, opt, gen)
    before = buffers(model)
    x, y = batch(gen)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model[1].running_var[5] = math.inf
    params = [p.detach().clone() for p in model.parameters()]
    opt.step(loss=loss.detach())
    assert same(buffers(model), before)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_monitor_mode_changes_no_buffer():
    model, opt, gen = setup(5, guard="monitor")
    for _ in range(3):
        train_step(model, opt, gen)
    train_step(model, opt, gen, corrupt=nan_element)
    assert not all(torch.isfinite(b.float()).all() for b in model.buffers())


def test_a_rollback_to_the_start_restores_the_buffers_of_the_start():
    """A x1e4 spike in the first step goes back to the state the run began from
    (``unbounded_spike``): the running statistics go back with the parameters, to their values
    before the first forward pass."""
    model, opt, gen = setup(6)
    start = buffers(model)
    start_params = [p.detach().clone() for p in model.parameters()]
    restored = None
    for step in range(1, 8):
        train_step(model, opt, gen, grad_factor=1e4 if step == 1 else 1.0)
        if restored is None and any(e.action == "rollback" for e in opt.guard.events):
            restored = (buffers(model), [p.detach().clone() for p in model.parameters()])
    backs = [(e.detail["why"], e.detail["to_step"]) for e in opt.guard.events if e.action == "rollback"]
    assert backs == [("unbounded_spike", 0)]
    assert restored is not None and same(restored[0], start)
    assert all(torch.equal(p, q) for p, q in zip(restored[1], start_params))


def test_a_rollback_to_a_snapshot_restores_its_buffers():
    """A rollback to a snapshot taken mid-run: the buffers come back as they were after that
    snapshot's step (taken with the parameters, the same step)."""
    config = GuardConfig(snapshot_interval=5)
    model, opt, gen = setup(7, guard=Guard(config))
    history = {}
    for step in range(1, 31):
        train_step(model, opt, gen)
        history[step] = buffers(model)
    guard = opt.guard
    target = max(guard.controller.recovery.verified_snapshots)
    # what a rollback decided by the controller runs (the snapshot's parameters go back too)
    guard._rollback(target, now=30)
    assert same(buffers(model), history[target])


def test_a_checkpoint_load_forgets_the_buffer_snapshots_and_takes_the_buffers_as_they_are():
    """After load_state_dict no snapshot of the old run is restored into the buffers, and a
    model checkpoint loaded after the optimizer's becomes the good values at the next good step."""
    model, opt, gen = setup(8)
    for _ in range(5):
        train_step(model, opt, gen)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.guard._buffers.snapshots == {}
    with torch.no_grad():
        model[1].running_mean.add_(1.0)  # what loading the model's own checkpoint would write
    written = train_step(model, opt, gen)
    assert same(buffers(model), written)
    before = buffers(model)
    train_step(model, opt, gen, corrupt=nan_element)
    assert same(buffers(model), before)


def test_a_bad_first_step_after_a_load_goes_back_to_the_buffers_at_the_load():
    model, opt, gen = setup(9)
    for _ in range(5):
        train_step(model, opt, gen)
    opt.load_state_dict(opt.state_dict())
    at_load = buffers(model)
    train_step(model, opt, gen, corrupt=nan_element)
    assert same(buffers(model), at_load)
    train_step(model, opt, gen)
    assert all(torch.isfinite(b.float()).all() for b in model.buffers())


@pytest.mark.parametrize("source, message", [
    (3, "torch.nn.Module"),
    ("model", "torch.nn.Module"),
    ([torch.zeros(2), "x"], "item 1 is a str"),
    ([torch.zeros(2).to_sparse()], "only dense buffers"),
])
def test_watch_buffers_refuses_what_it_cannot_restore(source, message):
    _, opt, _ = setup(0, watch=False)
    with pytest.raises(TypeError, match=message):
        opt.guard.watch_buffers(source)
    assert opt.guard.watched_buffers == 0


def test_watching_twice_counts_each_buffer_once():
    model, opt, _ = setup(0)
    opt.guard.watch_buffers(model)
    opt.guard.watch_buffers(list(model.buffers()))
    assert opt.guard.watched_buffers == len(list(model.buffers()))
