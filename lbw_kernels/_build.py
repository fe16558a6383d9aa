"""Sources and flags of the C++ backends, shared by the on-demand build
(:mod:`lbw_kernels.cpp_backend`) and the ahead-of-time build (``setup.py`` with
``LBW_GUARD_BUILD_EXT=1`` calls :func:`get_extensions`).

Flags that matter for correctness, not only speed:

- ``-ffp-contract=off`` / ``--fmad=false``: the contract rounds every multiply and add
  separately (as the PyTorch reference does); a fused multiply-add changes the last bit.
- no ``-ffast-math`` / ``--use_fast_math``: the kernels rely on IEEE inf/NaN, sqrt and division.
- ``-fno-math-errno`` only lets sqrt vectorize; it does not change any result.
- the CPU kernels are compiled for the baseline ISA plus AVX2 and AVX-512 variants chosen at run
  time (target pragmas in csrc/cpu/kernel_*.cpp), so the build is portable: no ``-march=native``.
"""

from __future__ import annotations

import os
import sys

import torch


def find_csrc(package_dir: str) -> str:
    """The C++ sources: a copy inside the package in an installed wheel (setup.py puts it
    there), else ``csrc/`` next to the package, in a checkout or an editable install."""
    packaged = os.path.join(package_dir, "csrc")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(package_dir), "csrc")


CSRC = find_csrc(os.path.dirname(os.path.abspath(__file__)))

CPU_SOURCES = (
    "cpu/fused_adamw_cpu.cpp",
    "cpu/kernel_base.cpp",
    "cpu/kernel_avx2.cpp",
    "cpu/kernel_avx512.cpp",
)
CUDA_SOURCES = ("cuda/fused_adamw_cuda_binding.cpp", "cuda/fused_adamw_cuda.cu")


def _openmp_flags() -> list[str]:
    # at::parallel_for is inline and uses `#pragma omp` when torch's backend is OpenMP: without
    # -fopenmp it would silently run on one thread. libgomp is then shared with torch's copy.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _cpu_cflags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/fp:precise"]
    return ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + _openmp_flags()


def cpu_build_args() -> dict:
    """Keyword arguments (less ``name``) for ``torch.utils.cpp_extension.load``."""
    return {
        "sources": [os.path.join(CSRC, s) for s in CPU_SOURCES],
        "extra_cflags": _cpu_cflags(),
        "extra_ldflags": _openmp_flags(),
    }


def _cuda_flags() -> list[str]:
    return ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-lineinfo"]


def cuda_build_args() -> dict:
    """Keyword arguments (less ``name``) for ``torch.utils.cpp_extension.load``."""
    return {
        "sources": [os.path.join(CSRC, s) for s in CUDA_SOURCES],
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": _cuda_flags(),
    }


def get_extensions(with_cuda: bool | None = None) -> list:
    """setuptools extensions for an ahead-of-time build: ``lbw_kernels._C_cpu`` always,
    ``lbw_kernels._C_cuda`` when torch is a CUDA build and nvcc is found (or ``with_cuda``).

    Use with ``cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension}``. Paths are
    relative to the project root, as setuptools requires.
    """
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    root = os.path.dirname(CSRC)

    def rel(paths):
        return [os.path.relpath(os.path.join(CSRC, s), root) for s in paths]

    # Shared headers, by absolute path: ninja compiles from its own directory. (The on-demand
    # build stages them beside the sources instead.)
    common = [os.path.join(CSRC, "common")]

    exts = [
        CppExtension(
            "lbw_kernels._C_cpu",
            rel(CPU_SOURCES),
            include_dirs=common,
            extra_compile_args=_cpu_cflags(),
            extra_link_args=_openmp_flags(),
        )
    ]
    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        exts.append(
            CUDAExtension(
                "lbw_kernels._C_cuda",
                rel(CUDA_SOURCES),
                include_dirs=common,
                extra_compile_args={"cxx": ["-O3"], "nvcc": _cuda_flags()},
            )
        )
    return exts
