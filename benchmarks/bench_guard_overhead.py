"""The guard controller's own host-side cost per step, in microseconds.

A small parameter set (1M params in 8 tensors) keeps the device work short, so the guard's
host work is visible. Two figures per case: the time spent inside Guard.before_step and
Guard.after_step (measured directly around those calls), and guarded minus unguarded step
time (the render computes it from the two rows).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks import common

TENSORS, NUMEL_EACH = 8, 1 << 17


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("guarded", [False, True], ids=["no-guard", "guard"])
def test_guard_host_cost(benchmark, guarded, groups, device, plan):
    from lbw_guard import FusedGuardedAdamW

    benchmark.group = f"guard host cost, {groups} group(s)"
    if guarded and (why := common.guard_unavailable()):
        pytest.skip(why)
    params = common.make_params(TENSORS, NUMEL_EACH, device)
    per_group = TENSORS // groups
    param_groups = [{"params": params[i * per_group:(i + 1) * per_group]} for i in range(groups)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FusedGuardedAdamW(param_groups, lr=1e-3, guard="default" if guarded else None)
    spy = common.Spy(opt)
    loss = torch.ones((), device=device)  # a loss makes the guard's loss path part of the cost
    timing = common.time_steps(benchmark, lambda: opt.step(loss=loss), device, plan)
    common.record(benchmark, "guard-host", timing, case=f"{TENSORS}x{NUMEL_EACH >> 10}K", groups=groups,
                  variant="guard" if guarded else "no-guard", backend=opt.backend_name,
                  numel=TENSORS * NUMEL_EACH, **spy.guard_fields())
