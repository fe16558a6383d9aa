"""Fused AdamW kernels for lbw-guard: the shared contract, the PyTorch reference and the
compiled backends (Triton, CUDA C++, CPU C++)."""

from .contract import NUM_REDUCED_FIELDS, NUM_TELEMETRY_FIELDS, TELEMETRY_FIELDS
from .reference import fused_adamw_reference

__all__ = [
    "NUM_REDUCED_FIELDS",
    "NUM_TELEMETRY_FIELDS",
    "TELEMETRY_FIELDS",
    "fused_adamw_reference",
]
