"""Measured accuracy of every backend against torch.optim.AdamW (the figures in the notes).

fp32: FusedGuardedAdamW(guard=None) and torch.optim.AdamW on the same gradients for 200 steps.
bf16/fp16 params (fp32 moments): against fp32 AdamW whose parameters are rounded to the
dtype after every step (the same arithmetic torch would do with fp32 master weights).
Prints, per backend and dtype: the max elementwise relative error (elements below 1e-3 of
the tensor's scale are measured against that floor), the max error over the tensor's scale
(max |ref|), and the normwise relative error.

    TRITON_INTERPRET=1 python -m benchmarks.accuracy      # Triton through the interpreter on CPU
"""

from __future__ import annotations

import os

import torch

from lbw_guard import FusedGuardedAdamW
from lbw_kernels.backends import BackendUnavailable, load_backend

SIZES = (1, 3, 4097, 70_000)


def errors(ours, ref):
    worst_elem, worst_scaled, num, den = 0.0, 0.0, 0.0, 0.0
    for p, q in zip(ours, ref):
        p, q = p.detach().double(), q.detach().double()
        scale = q.abs().max().clamp_min(1e-30)
        worst_elem = max(worst_elem, float(((p - q).abs() / q.abs().clamp_min(1e-3 * scale)).max()))
        worst_scaled = max(worst_scaled, float((p - q).abs().max() / scale))
        num += float((p - q).square().sum())
        den += float(q.square().sum())
    return worst_elem, worst_scaled, (num / den) ** 0.5


def run(backend: str, dtype: torch.dtype, steps: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in SIZES]
    ref = [p.detach().float().clone().requires_grad_() for p in ours]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]  # noqa: E731
    opt = FusedGuardedAdamW(groups(ours), lr=1e-3, guard=None, backend=backend)
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-3)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g, g.float()
        opt.step()
        torch_opt.step()
        if dtype != torch.float32:
            with torch.no_grad():
                for q in ref:
                    q.copy_(q.to(dtype).float())
    return errors(ours, ref)


def main() -> None:
    print(f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print("| backend | dtype | steps | max elementwise rel. error | max error / tensor scale | normwise rel. error |")
    print("|---|---|---|---|---|---|")
    for backend in ("torch", "triton", "cpu"):
        try:
            load_backend(backend, torch.device("cpu"))
        except BackendUnavailable as exc:
            print(f"| {backend} | - | - | unavailable: {exc} | |")
            continue
        for dtype, steps in ((torch.float32, 200), (torch.bfloat16, 50), (torch.float16, 50)):
            elem, scaled, norm = run(backend, dtype, steps)
            print(f"| {backend} | {str(dtype).split('.')[-1]} | {steps} | {elem:.2e} | {scaled:.2e} | {norm:.2e} |")


if __name__ == "__main__":
    main()
