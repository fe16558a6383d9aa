"""The compiled C++ backends (``backend="cpu"`` and ``backend="cuda"``).

:func:`load_cpp_backend` returns the step function, with the signature of
:func:`lbw_kernels.reference.fused_adamw_reference`. It imports an ahead-of-time built
module (``pip install`` with ``LBW_GUARD_BUILD_EXT=1``, see :mod:`lbw_kernels._build`) when
there is one, and otherwise compiles the sources in ``csrc/`` with
``torch.utils.cpp_extension.load`` and ninja on first use; the result is cached in the
torch extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Every failure becomes :class:`lbw_kernels.backends.BackendUnavailable` whose message says
why and what to do, so a missing compiler never surfaces mid-training as a crash.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import threading
import time
from typing import Callable

import torch

from ._build import cpu_build_args, cuda_build_args
from .backends import BackendUnavailable

log = logging.getLogger("lbw_guard")

_KINDS = ("cpu", "cuda")
_AOT_MODULES = {"cpu": "lbw_kernels._C_cpu", "cuda": "lbw_kernels._C_cuda"}
# First-compile times measured on 2 cores; only used for the "compiling" message.
_EXPECTED_SECONDS = {"cpu": 60, "cuda": 120}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def load_cpp_backend(kind: str) -> Callable:
    """Return the fused step of the ``"cpu"`` or ``"cuda"`` C++ backend, building it if needed.

    Raises BackendUnavailable when it cannot be built or loaded here. A failure is remembered
    for the life of the process, so later calls fail fast instead of recompiling.
    """
    return load_cpp_module(kind).fused_adamw


def load_cpp_module(kind: str):
    """The extension module itself (``fused_adamw``; the cpu one also has ``isa``/``set_isa``)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise BackendUnavailable(_failed[kind])
        try:
            module = _import_aot(kind) or _build_on_demand(kind)
        except BackendUnavailable as exc:
            _failed[kind] = str(exc)
            raise
        _loaded[kind] = module
        return module


def _import_aot(kind: str):
    try:
        return importlib.import_module(_AOT_MODULES[kind])
    except ImportError:
        return None


def _build_on_demand(kind: str):
    if kind == "cuda":
        _check_cuda_toolchain()
        args = cuda_build_args()
    else:
        args = cpu_build_args()
    _check_host_compiler(kind)
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # pragma: no cover - broken torch install
        raise BackendUnavailable(f"backend='{kind}': torch.utils.cpp_extension: {exc}") from exc
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise BackendUnavailable(
            f"backend='{kind}' is built on first use with ninja, which is not installed: "
            "`pip install ninja`, or use backend='torch'"
        ) from exc

    # The module name carries a hash of the sources and flags, so a cached build is never
    # stale and its presence tells whether this call is going to compile.
    name = f"lbw_guard_{kind}_{_fingerprint(args)}"
    build_dir = _build_directory(cpp_extension, name)
    if not any(f.startswith(name) and f.endswith((".so", ".pyd")) for f in os.listdir(build_dir)):
        log.warning(
            "lbw-guard: compiling the %s backend (first use, ~%d s)...",
            kind,
            _EXPECTED_SECONDS[kind],
        )
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=name, build_directory=build_dir, verbose=False, **args)
    except Exception as exc:  # build errors arrive as RuntimeError, CalledProcessError, OSError
        raise BackendUnavailable(
            f"backend='{kind}' failed to build in {build_dir}: {_last_lines(exc)}\n"
            "Check the C++ compiler (CXX, default `c++`) and ninja, or use backend='torch'. "
            f"Run torch.utils.cpp_extension.load(..., verbose=True) on csrc/{kind} for the full log."
        ) from exc
    elapsed = time.perf_counter() - start
    if elapsed > 5:
        log.info("lbw-guard: the %s backend compiled in %.0f s", kind, elapsed)
    return module


def _build_directory(cpp_extension, name: str) -> str:
    # torch's own choice (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_cuZZ/name);
    # the helper is private, so fall back to the same layout if it ever moves.
    try:
        return cpp_extension._get_build_directory(name, verbose=False)
    except AttributeError:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "torch_extensions"
        )
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        return path


def _check_host_compiler(kind: str) -> None:
    cxx = os.environ.get("CXX", "c++" if sys.platform != "win32" else "cl")
    if shutil.which(cxx.split()[0]) is None:
        raise BackendUnavailable(
            f"backend='{kind}' must be compiled on first use, but the C++ compiler {cxx!r} "
            "(from $CXX, default `c++`) is not on PATH: install g++ or clang++ (or point CXX "
            "at one), install the wheel built with LBW_GUARD_BUILD_EXT=1, or use backend='torch'"
        )


def _check_cuda_toolchain() -> None:
    if torch.version.cuda is None:
        raise BackendUnavailable(
            f"backend='cuda' needs a CUDA build of torch, but torch {torch.__version__} is "
            "CPU-only: install a CUDA wheel of torch, or use backend='torch' or 'triton'"
        )
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise BackendUnavailable(
            "backend='cuda' must be compiled on first use, but no CUDA toolkit (nvcc) was "
            "found: set CUDA_HOME, or use backend='triton'"
        )


def _fingerprint(args: dict) -> str:
    h = hashlib.sha256()
    for path in args["sources"]:
        with open(path, "rb") as f:
            h.update(f.read())
    src_dir = os.path.dirname(args["sources"][0])
    for fname in sorted(os.listdir(src_dir)):  # headers are not in `sources`
        if fname.endswith((".h", ".cuh")):
            with open(os.path.join(src_dir, fname), "rb") as f:
                h.update(f.read())
    h.update(repr(sorted((k, v) for k, v in args.items() if k != "sources")).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def _last_lines(exc: BaseException, n: int = 6) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])
