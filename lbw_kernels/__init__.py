"""Fused AdamW kernels for lbw-guard: the shared contract, the PyTorch reference, the
torch-foreach fallback and the compiled backends (Triton, CUDA C++, CPU C++)."""

from .contract import GROUP_FIELDS, TENSOR_FIELDS
from .reference import fused_adamw_reference

__all__ = [
    "GROUP_FIELDS",
    "TENSOR_FIELDS",
    "fused_adamw_reference",
]
