"""torch.distributed.checkpoint (DCP) and FSDP2 checkpoints with the guard's state.

DCP's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` keep only ``"state"`` and
``"param_groups"`` of an optimizer state dict. ``FusedGuardedAdamW.state_dict()`` therefore
also packs ``num_steps`` and the guard state into its first param group (key ``"lbw_guard"``,
one bytes value), which DCP keeps: plain DCP code, Accelerate's and the HF Trainer's FSDP2
checkpoints restore the guard with nothing else to do. The guard's snapshots (per-rank
tensors, only saved with ``snapshots_in_state_dict``) are not in that copy: after such a load
the guard takes new ones.

DCP's ``_init_optim_state`` (which creates an optimizer's states with a zero-lr step on zero
gradients before saving or loading) is recognised by the optimizer and does not count as a
step: no ``num_steps``, no guard record, zero moments.

Two cases need this module:

- ``StateDictOptions(flatten_optimizer_state_dict=True)`` (torchtitan) keeps a param-group
  key per parameter and restores only keys the live param groups have, so the packed copy
  would be saved once per parameter of the first group and never restored. Use
  :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict` from here (same
  signatures as torch's): they keep a single copy under the top-level key ``"lbw_guard"``;
- a ``Stateful`` for ``dcp.save`` / ``dcp.load``: :class:`OptimizerState`.

>>> from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
>>> state = {"model": get_model_state_dict(model), "optim": OptimizerState(model, opt)}
>>> dcp.save(state, checkpoint_id=path)
>>> ...
>>> state = {"model": get_model_state_dict(model), "optim": OptimizerState(model, opt)}
>>> dcp.load(state, checkpoint_id=path)            # calls OptimizerState.load_state_dict
>>> set_model_state_dict(model, state["model"])

DCP checkpoints saved before the packed copy existed lack the ``lbw_guard`` item that the
load template has: load them with ``dcp.load(..., planner=DefaultLoadPlanner(allow_partial_load=True))``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.distributed.checkpoint import state_dict as _dsd
from torch.distributed.checkpoint.stateful import Stateful

from lbw_guard.checkpoint import SECTION_KEY, apply_section, check_section, pack_section

from . import unwrap_optimizer

SECTION = SECTION_KEY
"""Top-level key of the packed sections (one per optimizer) in a flattened state dict."""


def _as_tuple(optimizers) -> tuple:
    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    return tuple(optimizers)


def _flattened(options) -> bool:
    return bool(options is not None and getattr(options, "flatten_optimizer_state_dict", False))


def _section_of(optimizer):
    opt = unwrap_optimizer(optimizer)
    if not hasattr(opt, "num_steps"):
        return None
    guard = getattr(opt, "guard", None)
    if guard is None:
        return pack_section(opt.num_steps, None)
    return pack_section(opt.num_steps, guard.state_dict(), opt._spike_floor_state())


def get_optimizer_state_dict(model: torch.nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                             *, options: _dsd.StateDictOptions | None = None) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` that keeps the
    guard's state once, flattened or not."""
    opts = _as_tuple(optimizers)
    sd = _dsd.get_optimizer_state_dict(model, opts, options=options)
    if _flattened(options):
        suffix = "." + SECTION_KEY
        for key in [k for k in sd if isinstance(k, str) and k.startswith("param_groups.") and k.endswith(suffix)]:
            del sd[key]
        sd[SECTION] = [_section_of(opt) for opt in opts]
    return sd


def set_optimizer_state_dict(model: torch.nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                             optim_state_dict: dict[str, Any], *,
                             options: _dsd.StateDictOptions | None = None) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` that also restores
    ``num_steps`` and the guard state kept by :func:`get_optimizer_state_dict`."""
    opts = _as_tuple(optimizers)
    sd = dict(optim_state_dict)
    sections = sd.pop(SECTION, None)
    checked = []
    if sections is not None:  # checked before torch's setter changes anything
        if not isinstance(sections, (list, tuple)) or len(sections) != len(opts):
            raise ValueError(f"optim_state_dict[{SECTION!r}] must hold one section per optimizer ({len(opts)})")
        checked = [(unwrap_optimizer(opt), check_section(unwrap_optimizer(opt), section))
                   for opt, section in zip(opts, sections) if section is not None]
    for opt, _ in checked:
        opt._section_follows = True  # torch's setter loads the moments; the guard state comes next
    try:
        _dsd.set_optimizer_state_dict(model, opts, sd, options=options)
    finally:
        for opt, _ in checked:
            opt._section_follows = False
    for opt, parsed in checked:
        apply_section(opt, parsed)


class OptimizerState(Stateful):
    """The optimizers' state (moments, ``num_steps``, the guard) as a DCP ``Stateful``: put it
    in the dict given to ``dcp.save`` / ``dcp.load``. ``options`` as for torch's
    ``get_optimizer_state_dict`` (``flatten_optimizer_state_dict`` included)."""

    def __init__(self, model: torch.nn.Module, optimizers, options: _dsd.StateDictOptions | None = None):
        self.model = model
        self.optimizers = _as_tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizers, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizers, state_dict, options=self.options)


__all__ = ["SECTION", "OptimizerState", "get_optimizer_state_dict", "set_optimizer_state_dict"]
