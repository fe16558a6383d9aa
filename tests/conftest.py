"""Test-wide set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
