"""The compiled C++ backends (``backend="cpu"`` and ``backend="cuda"``).

:func:`load_cpp_backend` returns the step function, with the signature of
:func:`lbw_kernels.reference.fused_adamw_reference`. It imports an ahead-of-time built
module (``pip install`` with ``LBW_GUARD_BUILD_EXT=1``, see :mod:`lbw_kernels._build`) when
there is one, and otherwise compiles the sources in ``csrc/`` with
``torch.utils.cpp_extension.load`` and ninja on first use; the result is cached in the
torch extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Every failure becomes :class:`lbw_kernels.backends.BackendUnavailable` whose message says
why and what to do, so a missing compiler never surfaces mid-training as a crash.

Environment:

- ``LBW_GUARD_BUILD_TIMEOUT``: the longest a load waits for another process that is building the
  same module (seconds; default: the expected build time plus 5 minutes).
- ``LBW_GUARD_STALE_LOCK_AGE``: where the build directory cannot be locked reliably (see
  :mod:`lbw_kernels._buildlock`), a torch build lock older than this is taken for a leftover of
  a killed build (seconds; default 600).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import sysconfig
import threading
import time
from typing import Callable

import torch

from . import _buildlock
from ._build import cpu_build_args, cuda_build_args
from .backends import BackendUnavailable

log = logging.getLogger("lbw_guard")

_KINDS = ("cpu", "cuda")
_AOT_MODULES = {"cpu": "lbw_kernels._C_cpu", "cuda": "lbw_kernels._C_cuda"}
# First-compile times measured on 2 cores: for the "compiling" message and the wait timeout.
_EXPECTED_SECONDS = {"cpu": 60, "cuda": 120}
_STALE_LOCK_AGE = 600.0
_HEADER_SUFFIXES = (".h", ".cuh", ".hpp")

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
            raise BackendUnavailable(
                f"{_failed[kind]} [failed earlier in this process; restart it to retry]"
            )
        try:
            module = _import_aot(kind) or _build_on_demand(kind)
        except BackendUnavailable as exc:
            _failed[kind] = str(exc)
            log.warning("lbw-guard: %s", exc)
            raise
        _loaded[kind] = module
        return module


def _import_aot(kind: str):
    name = _AOT_MODULES[kind]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module is there, but something it needs is not
            log.warning("lbw-guard: cannot import the prebuilt %s (%s); building on demand", name, exc)
        return None
    except ImportError as exc:  # e.g. built against another torch
        log.warning("lbw-guard: cannot import the prebuilt %s (%s); building on demand", name, exc)
        return None


def _build_on_demand(kind: str):
    args = _build_args(kind)
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

    # The module name carries a hash of everything the build depends on, so a cached build is
    # never stale and its presence tells whether this call is going to compile.
    name = module_name(kind, args)
    try:
        build_dir = _build_directory(cpp_extension, name)
        with _buildlock.exclusive(build_dir, name, _build_timeout(kind), _stale_lock_age()):
            args = dict(args, sources=_stage_sources(args["sources"], build_dir))
            return _compile_and_load(kind, cpp_extension, name, build_dir, args)
    except OSError as exc:  # _compile_and_load turns its own errors into BackendUnavailable
        raise _unusable_directory(kind, cpp_extension, exc) from exc
    except _buildlock.LockTimeout as exc:
        raise BackendUnavailable(
            f"backend='{kind}' could not be loaded: {exc}; or use backend='torch'"
        ) from exc


def _build_args(kind: str) -> dict:
    if kind == "cuda":
        _check_cuda_toolchain()
        args = cuda_build_args()
    else:
        args = cpu_build_args()
    missing = [s for s in args["sources"] if not os.path.isfile(s)]
    if missing:
        raise BackendUnavailable(
            f"backend='{kind}' is compiled on first use, but its sources are not installed "
            f"({missing[0]} is missing): reinstall lbw-guard from a checkout or sdist, install "
            "it with LBW_GUARD_BUILD_EXT=1 to build it ahead of time, or use backend='torch'"
        )
    return args


def module_name(kind: str, args: dict) -> str:
    """The extension's name: ``lbw_guard_<kind>_<fingerprint>``."""
    return f"lbw_guard_{kind}_{_fingerprint(kind, args)}"


def _compile_and_load(kind: str, cpp_extension, name: str, build_dir: str, args: dict):
    if not _buildlock.module_exists(build_dir, name):
        log.warning(
            "lbw-guard: compiling the %s backend in %s (first use, ~%d s)...",
            kind,
            build_dir,
            _EXPECTED_SECONDS[kind],
        )
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=name, build_directory=build_dir, verbose=False, **args)
    except BaseException as exc:  # build errors arrive as RuntimeError, CalledProcessError, OSError
        # The link may have been cut short: leave no module file that a later run would import.
        _buildlock.remove_module(build_dir, name)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a backend problem
            raise
        log_path = _save_build_log(build_dir, exc)
        raise BackendUnavailable(
            f"backend='{kind}' failed to build in {build_dir}: {_last_lines(exc)}\n"
            f"Full output: {log_path or 'in the exception chain'}. Check the C++ compiler "
            "(CXX, default `c++`) and ninja, or use backend='torch'."
        ) from exc
    elapsed = time.perf_counter() - start
    if elapsed > 5:
        log.info("lbw-guard: the %s backend compiled in %.0f s", kind, elapsed)
    return module


def _build_directory(cpp_extension, name: str) -> str:
    # torch's choice (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_cuZZ/name), created
    # if needed; the helper is private, so fall back to the same layout if it ever moves.
    try:
        return cpp_extension._get_build_directory(name, verbose=False)
    except AttributeError:
        path = os.path.join(_extensions_root(cpp_extension), name)
        os.makedirs(path, exist_ok=True)
        return path


def _extensions_root(cpp_extension) -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()


def _unusable_directory(kind: str, cpp_extension, exc: OSError) -> BackendUnavailable:
    where = "from TORCH_EXTENSIONS_DIR" if os.environ.get("TORCH_EXTENSIONS_DIR") else "the default"
    why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
    return BackendUnavailable(
        f"backend='{kind}' is compiled on first use in the torch extensions directory "
        f"{_extensions_root(cpp_extension)} ({where}), which cannot be used ({why}). "
        "Set TORCH_EXTENSIONS_DIR to a writable "
        "directory, install lbw-guard with LBW_GUARD_BUILD_EXT=1 to build the backend ahead of "
        "time (`LBW_GUARD_BUILD_EXT=1 pip install --no-build-isolation -e .`), or use backend='torch'"
    )


def _stage_sources(sources: list[str], build_dir: str) -> list[str]:
    """Copy the sources and their headers to ``build_dir/src``; return the copies' paths.

    The build commands (build.ninja) name the sources: building from these copies keeps the
    commands the same for every checkout, so checkouts with identical sources share one build
    instead of rebuilding each time another one has used it.
    """
    dest = os.path.join(build_dir, "src")
    os.makedirs(dest, exist_ok=True)
    files = _source_files(sources)
    names = [os.path.basename(p) for p in files]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # one directory holds them all: a second file of a name would replace the first
        raise BackendUnavailable(f"the C++ sources name {clash} twice (in csrc/common and beside the sources)")
    for path in files:
        _copy_if_changed(path, os.path.join(dest, os.path.basename(path)))
    return [os.path.join(dest, os.path.basename(s)) for s in sources]


def _copy_if_changed(src: str, dst: str) -> None:
    # An unchanged copy keeps its mtime, so ninja finds nothing to rebuild.
    with open(src, "rb") as f:
        data = f.read()
    try:
        with open(dst, "rb") as f:
            if f.read() == data:
                return
    except FileNotFoundError:
        pass
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)


def _save_build_log(build_dir: str, exc: BaseException) -> str | None:
    path = os.path.join(build_dir, "lbw_build_error.log")
    try:
        with open(path, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
    except OSError:
        return None
    return path


def _build_timeout(kind: str) -> float:
    return _seconds_from_env("LBW_GUARD_BUILD_TIMEOUT", _EXPECTED_SECONDS[kind] + 300.0)


def _stale_lock_age() -> float:
    return _seconds_from_env("LBW_GUARD_STALE_LOCK_AGE", _STALE_LOCK_AGE)


def _seconds_from_env(var: str, default: float) -> float:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        log.warning("lbw-guard: ignoring %s=%r (not a number of seconds)", var, value)
        return default


def _host_compiler() -> str:
    return os.environ.get("CXX", "c++" if sys.platform != "win32" else "cl")


def _check_host_compiler(kind: str) -> None:
    cxx = _host_compiler()
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


def _source_files(sources: list[str]) -> list[str]:
    """The sources, then the headers next to them and in ``csrc/common`` (which ``sources``
    does not list). Staging puts them all in one directory, where the sources find them."""
    src_dir = os.path.dirname(sources[0])
    header_dirs = [src_dir, os.path.join(os.path.dirname(src_dir), "common")]
    return list(sources) + [
        os.path.join(d, f)
        for d in header_dirs
        if os.path.isdir(d)
        for f in sorted(os.listdir(d))
        if f.endswith(_HEADER_SUFFIXES)
    ]


def _fingerprint(kind: str, args: dict) -> str:
    """Hash of the source contents (not their location), the flags and the toolchain."""
    h = hashlib.sha256()
    for path in _source_files(args["sources"]):
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{os.path.basename(path)}\0{len(data)}\0".encode())
        h.update(data)
    flags = {k: v for k, v in args.items() if k != "sources"}
    h.update(repr(sorted(flags.items())).encode())
    h.update(repr(sorted(_toolchain(kind).items())).encode())
    return h.hexdigest()[:12]


def _toolchain(kind: str) -> dict:
    """What a build depends on besides its sources and flags.

    The torch, Python and compiler paths appear in the build commands, so processes that differ
    in any of them (another venv, another torch) must not share a build: ninja would rebuild
    each time they alternate. The project's location is deliberately absent (see _stage_sources).
    """
    cxx = _host_compiler()
    found = shutil.which(cxx.split()[0])
    info = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "torch_path": os.path.realpath(os.path.dirname(torch.__file__)),
        "python_abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        "python_include": sysconfig.get_paths()["include"],
        "cxx": cxx,
        "cxx_path": os.path.realpath(found) if found else None,
    }
    if kind == "cuda":
        from torch.utils import cpp_extension

        info["cuda_home"] = cpp_extension.CUDA_HOME
    return info


def _last_lines(exc: BaseException, n: int = 6) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])
