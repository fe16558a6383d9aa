"""Per-group telemetry of one optimizer step, as device tensors, with derived signals.

The fused kernel reduces, per parameter group (see :mod:`lbw_kernels.contract`):

========================  ===============================================================
``grad_sq``               sum of squared gradients (unscaled, before clipping), finite ones
``update_sq``             sum of squared parameter updates actually applied (fp32)
``param_sq``              sum of squared parameters before the step
``grad_dot_update``       sum of gradient x update (the first-order loss change, g.u)
``outliers``              gradient elements with ``|g| > k * sqrt(v_hat_prev)``
``nonfinite``             gradient elements that were NaN or inf (never written)
``numel``                 elements in the group's parameters that had gradients
========================  ===============================================================

Reading a value on the host (``float(t.grad_norm())``) synchronises with the device; the
guard never does that for the current step, it reads lagged copies instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lbw_kernels.contract import TELEMETRY_FIELDS

_INDEX = {name: i for i, name in enumerate(TELEMETRY_FIELDS)}


@dataclass(frozen=True)
class Telemetry:
    """One step's telemetry: ``values`` is a [num_groups, 7] float64 tensor on the device."""

    values: Tensor

    def field(self, name: str) -> Tensor:
        """A raw field per group, shape [num_groups]."""
        if name not in _INDEX:
            raise KeyError(f"unknown telemetry field {name!r}; fields are {TELEMETRY_FIELDS}")
        return self.values[:, _INDEX[name]]

    def total(self) -> Tensor:
        """Fields summed over all groups, shape [7]."""
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

    def outlier_ratio(self, per_group: bool = False) -> Tensor:
        """Fraction of gradient elements flagged as outliers."""
        return self._pick("outliers", per_group) / self._pick("numel", per_group).clamp_min(1.0)

    def grad_dot_update(self, per_group: bool = False) -> Tensor:
        return self._pick("grad_dot_update", per_group)

    def to_dict(self) -> dict:
        """Host copy as {field: [per-group floats]} (synchronises with the device)."""
        host = self.values.detach().cpu().tolist()
        return {name: [row[i] for row in host] for i, name in enumerate(TELEMETRY_FIELDS)}

