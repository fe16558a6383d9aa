"""One step's telemetry as device tensors, with derived signals.

The fused pass reduces, per parameter group (see :mod:`lbw_kernels.contract`):

==================  ==================================================================
``grad_sq``         sum of squared gradients (unscaled, before clipping), finite elements
``update_sq``       sum of squared parameter updates actually applied
``param_sq``        sum of squared parameters before the step
``grad_dot_update`` sum of gradient x update: the first-order loss change of the step
``grad_dot_prev``   sum of gradient x the previous step's normalised direction
``prev_sq``         squared norm of that direction
``moment1_sq``      sum of m^2 before the step (raw)
``moment2_sum``     sum of v before the step (raw)
``spikes``          gradient elements over the per-element bound k * sqrt(v_hat)
``nonfinite``       gradient elements that were NaN or inf
``numel``           elements of the group's parameters that had gradients
``omega_*``         the governor's oscillation signal over the group's matrices
``cos_*``           cosine of the gradient with the previous direction, over matrices
``ratio_*``         squared update/param ratio per matrix
==================  ==================================================================

Reading a value on the host (``float(t.grad_norm())``) synchronises with the device; the guard
never does that for the current step, it reads lagged copies instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lbw_kernels import contract as C

_INDEX = {name: i for i, name in enumerate(C.GROUP_FIELDS)}


@dataclass(frozen=True)
class Telemetry:
    """One step's telemetry: ``record`` is the flat float64 device record of the step."""

    record: Tensor
    num_groups: int
    per_tensor: tuple[Tensor, ...] = ()
    """Per bucket: ``[T, NUM_TENSOR_FIELDS]`` sums of each tensor (in bucket order)."""

    @property
    def values(self) -> Tensor:
        """``[num_groups, NUM_GROUP_FIELDS]`` group fields."""
        layout = C.record_layout(self.num_groups)
        return self.record[layout.group_fields].view(self.num_groups, C.NUM_GROUP_FIELDS)

    @property
    def applied_gate(self) -> Tensor:
        """``[num_groups]``: 1.0 where the step was applied to the group, 0.0 where skipped."""
        return self.record[C.record_layout(self.num_groups).applied_gate]

    @property
    def loss(self) -> Tensor:
        """The loss the step checked (NaN when none was given)."""
        return self.record[C.record_layout(self.num_groups).globals][C.R_LOSS]

    def field(self, name: str) -> Tensor:
        """A raw field per group, shape [num_groups]."""
        if name not in _INDEX:
            raise KeyError(f"unknown telemetry field {name!r}; fields are {C.GROUP_FIELDS}")
        return self.values[:, _INDEX[name]]

    def total(self) -> Tensor:
        """Fields summed over all groups, shape [NUM_GROUP_FIELDS]."""
        return self.values.sum(dim=0)

    def _pick(self, name: str, per_group: bool) -> Tensor:
        return self.field(name) if per_group else self.total()[_INDEX[name]]

    def grad_norm(self, per_group: bool = False) -> Tensor:
        """L2 norm of the (unscaled, unclipped) gradient; global unless ``per_group``."""
        return self._pick("grad_sq", per_group).sqrt()

    def update_norm(self, per_group: bool = False) -> Tensor:
        return self._pick("update_sq", per_group).sqrt()

    def param_norm(self, per_group: bool = False) -> Tensor:
        return self._pick("param_sq", per_group).sqrt()

    def update_param_ratio(self, per_group: bool = False) -> Tensor:
        """||update|| / ||param||: how far the step moved the weights, relatively."""
        return self.update_norm(per_group) / self.param_norm(per_group).clamp_min(1e-30)

    def spike_ratio(self, per_group: bool = False) -> Tensor:
        """Fraction of gradient elements over the per-element bound."""
        return self._pick("spikes", per_group) / self._pick("numel", per_group).clamp_min(1.0)

    def omega(self, per_group: bool = False) -> Tensor:
        """Geometric mean over matrices of Adam's normalised momentum energy against its
        white-noise level (about 1: noise; well below 1: successive gradients cancel)."""
        count = self._pick("omega_count", per_group)
        return torch.exp(self._pick("omega_log_sum", per_group) / count.clamp_min(1.0))

    def to_dict(self) -> dict:
        """Host copy as {field: [per-group floats]} (synchronises with the device)."""
        host = self.values.detach().cpu().tolist()
        out = {name: [row[i] for row in host] for i, name in enumerate(C.GROUP_FIELDS)}
        out["applied_gate"] = self.applied_gate.detach().cpu().tolist()
        return out
