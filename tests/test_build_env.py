"""The on-demand build of the C++ backends in hostile environments, without compiling.

``torch.utils.cpp_extension.load`` is replaced by a fake that records its call and writes a
module file, so each test checks what happens around a build (locks left by killed builds,
unusable extensions directories, failed builds, the module name's fingerprint, packaging)
in well under a second. The real build is covered by tests/test_cpp_backends.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from lbw_kernels import _build, _buildlock, cpp_backend
from lbw_kernels.backends import BackendUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_flock = pytest.mark.skipif(os.name == "nt", reason="the holder process uses fcntl.flock")


@pytest.fixture
def ext_root(monkeypatch, tmp_path):
    """A fresh TORCH_EXTENSIONS_DIR and fresh per-process state; compiling is refused."""
    monkeypatch.setattr(cpp_backend, "_loaded", {})
    monkeypatch.setattr(cpp_backend, "_failed", {})
    monkeypatch.setattr(cpp_backend, "_import_aot", lambda kind: None)
    monkeypatch.setattr(cpp_backend, "_check_host_compiler", lambda kind: None)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", _refuse_to_compile)
    for var in ("LBW_GUARD_BUILD_TIMEOUT", "LBW_GUARD_STALE_LOCK_AGE"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _refuse_to_compile(**kwargs):
    raise AssertionError("this test must not reach cpp_extension.load")


def module_name() -> str:
    return cpp_backend.module_name("cpu", _build.cpu_build_args())


def make_build_dir(ext_root) -> str:
    path = ext_root / module_name()
    path.mkdir(parents=True)
    return str(path)


def install_fake_load(monkeypatch, fail: BaseException | None = None) -> list:
    """cpp_extension.load stand-in: checks that torch's lock is free, then 'builds'."""
    calls = []

    def load(name, build_directory, verbose, sources, **kwargs):
        module_file = os.path.join(build_directory, name + ".so")
        calls.append(
            {"name": name, "build_directory": build_directory, "sources": sources,
             "module_was_there": os.path.exists(module_file)}
        )
        baton = FileBaton(os.path.join(build_directory, "lock"))
        assert baton.try_acquire(), "torch's lock is still held: the real load would wait forever"
        try:
            with open(module_file, "wb") as f:
                f.write(b"half written" if fail else b"module")
            if fail is not None:
                raise fail
        finally:
            baton.release()
        return SimpleNamespace(fused_adamw="step", name=name)

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


HOLDER = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys, time
    build_dir, machine, torch_lock, module, seconds = json.loads(sys.argv[1])
    fd = os.open(os.path.join(build_dir, "lbw_build.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "machine": machine, "since": time.time()}).encode())
    if torch_lock:  # as inside cpp_extension.load, halfway through linking
        open(os.path.join(build_dir, "lock"), "w").close()
        open(os.path.join(build_dir, module + ".so"), "wb").write(b"half written")
    print("ready", flush=True)
    time.sleep(seconds)
    """
)


def start_holder(build_dir: str, *, torch_lock: bool, seconds: float) -> subprocess.Popen:
    """Another lbw-guard process holding the build directory (a python without torch: fast)."""
    arg = json.dumps([build_dir, _buildlock._machine_id(), torch_lock, module_name(), seconds])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, arg], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ------------------------------------------------------------------ killed builds and lock waits


@needs_flock
def test_killed_build_lock_is_removed_and_module_rebuilt(ext_root, monkeypatch, caplog):
    build_dir = make_build_dir(ext_root)
    holder = start_holder(build_dir, torch_lock=True, seconds=60)
    os.kill(holder.pid, signal.SIGKILL)  # OOM killer, preemption
    holder.wait()
    calls = install_fake_load(monkeypatch)

    module = cpp_backend.load_cpp_module("cpu")

    assert module.name == module_name() and len(calls) == 1
    assert not calls[0]["module_was_there"], "the killed build's half-written module was kept"
    assert "stale build lock" in caplog.text and os.path.join(build_dir, "lock") in caplog.text
    assert f"pid {holder.pid}" in caplog.text
    # Built from copies in the build directory, so the build commands name no checkout.
    assert all(s.startswith(os.path.join(build_dir, "src") + os.sep) for s in calls[0]["sources"])
    assert not os.path.exists(os.path.join(build_dir, "lock"))


@needs_flock
def test_live_build_times_out_with_a_clear_message(ext_root, monkeypatch):
    build_dir = make_build_dir(ext_root)
    monkeypatch.setenv("LBW_GUARD_BUILD_TIMEOUT", "0.5")
    holder = start_holder(build_dir, torch_lock=False, seconds=60)
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            cpp_backend.load_cpp_module("cpu")
        assert time.monotonic() - start < 5
    finally:
        stop(holder)
    msg = str(info.value)
    assert os.path.join(build_dir, "lbw_build.lock") in msg and f"pid {holder.pid}" in msg
    assert "LBW_GUARD_BUILD_TIMEOUT" in msg and "backend='torch'" in msg
    # The failure is remembered for this process, and says so.
    with pytest.raises(BackendUnavailable, match="failed earlier in this process"):
        cpp_backend.load_cpp_module("cpu")


@needs_flock
def test_waits_for_a_live_build_to_finish(ext_root, monkeypatch):
    build_dir = make_build_dir(ext_root)
    holder = start_holder(build_dir, torch_lock=False, seconds=0.5)
    calls = install_fake_load(monkeypatch)
    try:
        assert cpp_backend.load_cpp_module("cpu").name == module_name()
        assert holder.poll() is not None, "loaded while the other process still held the lock"
    finally:
        stop(holder)
    assert len(calls) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds orphans through /proc")
def test_waits_for_compilers_a_killed_build_left_running(ext_root, monkeypatch, caplog):
    build_dir = make_build_dir(ext_root)
    open(os.path.join(build_dir, "lock"), "w").close()  # the killed build's torch lock
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], cwd=build_dir)
    calls = install_fake_load(monkeypatch)
    try:
        cpp_backend.load_cpp_module("cpu")
        assert orphan.poll() is not None, "rebuilt while the killed build's compiler still ran"
    finally:
        stop(orphan)
    assert len(calls) == 1 and "of a killed build" in caplog.text


@pytest.mark.parametrize("age, removed", [(7200, True), (0, False)])
def test_without_os_locks_torch_lock_is_judged_by_age(ext_root, monkeypatch, caplog, age, removed):
    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_buildlock, "_try_lock", no_locks)
    monkeypatch.setenv("LBW_GUARD_BUILD_TIMEOUT", "0.3")
    build_dir = make_build_dir(ext_root)
    torch_lock = os.path.join(build_dir, "lock")
    open(torch_lock, "w").close()
    os.utime(torch_lock, (time.time() - age,) * 2)
    calls = install_fake_load(monkeypatch)
    if removed:
        cpp_backend.load_cpp_module("cpu")
        assert len(calls) == 1 and "older than a build takes" in caplog.text
    else:
        with pytest.raises(BackendUnavailable) as info:
            cpp_backend.load_cpp_module("cpu")
        assert torch_lock in str(info.value) and "delete it" in str(info.value)
        assert os.path.exists(torch_lock) and not calls


def test_lock_of_a_build_on_another_machine_is_not_broken_while_fresh(ext_root, monkeypatch):
    # A network file system whose OS locks are local to each client: our lock proves nothing.
    build_dir = make_build_dir(ext_root)
    with open(os.path.join(build_dir, "lbw_build.lock"), "w") as f:
        json.dump({"pid": 1, "host": "node7", "machine": "another-machine", "since": time.time()}, f)
    torch_lock = os.path.join(build_dir, "lock")
    open(torch_lock, "w").close()
    monkeypatch.setenv("LBW_GUARD_BUILD_TIMEOUT", "0.3")
    with pytest.raises(BackendUnavailable, match="node7"):
        cpp_backend.load_cpp_module("cpu")
    assert os.path.exists(torch_lock)


# ------------------------------------------------------------------ failed builds


def test_failed_build_leaves_no_module_and_releases_the_lock(ext_root, monkeypatch):
    error = RuntimeError("Error building extension 'x':\n[1/2] c++ ...\nfatal error: boom.h: missing")
    calls = install_fake_load(monkeypatch, fail=error)
    with pytest.raises(BackendUnavailable) as info:
        cpp_backend.load_cpp_module("cpu")
    build_dir = calls[0]["build_directory"]
    msg = str(info.value)
    assert "failed to build" in msg and "boom.h" in msg and "backend='torch'" in msg
    log_path = os.path.join(build_dir, "lbw_build_error.log")
    assert log_path in msg and "boom.h" in open(log_path).read()
    assert not _buildlock.module_exists(build_dir, calls[0]["name"])
    with _buildlock.exclusive(build_dir, calls[0]["name"], timeout=0.1, stale_age=600):
        pass  # free again at once


def test_interrupted_build_leaves_no_module_and_is_not_remembered(ext_root, monkeypatch):
    calls = install_fake_load(monkeypatch, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        cpp_backend.load_cpp_module("cpu")
    assert not _buildlock.module_exists(calls[0]["build_directory"], calls[0]["name"])
    assert cpp_backend._failed == {}


# ------------------------------------------------------------------ unusable extensions directory


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


def _read_only(path):
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


root_ignores_permissions = pytest.mark.skipif(IS_ROOT, reason="root ignores permissions")

UNUSABLE = {
    # name: (set up the environment, return the path the message must name)
    "extensions dir is a file": lambda mp, tmp, ext: _set_ext(mp, _file(tmp)),
    "extensions dir under a file": lambda mp, tmp, ext: _set_ext(mp, _file(tmp) / "ext"),
    "HOME under a file": lambda mp, tmp, ext: _set_home(mp, _file(tmp) / "home"),
    "read-only extensions dir": lambda mp, tmp, ext: _set_ext(mp, _read_only(tmp / "ro")),
    "read-only build dir": lambda mp, tmp, ext: _read_only(ext / module_name()),
}


def _set_ext(monkeypatch, path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(path))
    return path


def _set_home(monkeypatch, path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(name, marks=root_ignores_permissions if "read-only" in name else ())
        for name in UNUSABLE
    ],
)
def test_unusable_extensions_dir_raises_backend_unavailable(ext_root, monkeypatch, tmp_path, case):
    path = UNUSABLE[case](monkeypatch, tmp_path, ext_root)
    try:
        with pytest.raises(BackendUnavailable) as info:
            cpp_backend.load_cpp_module("cpu")
    finally:
        if path.is_dir():  # let tmp_path be cleaned up
            path.chmod(0o755)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "TORCH_EXTENSIONS_DIR" in msg and "LBW_GUARD_BUILD_EXT=1" in msg and "backend='torch'" in msg


@pytest.mark.filterwarnings("ignore::UserWarning")  # the optimizer says it falls back
def test_default_constructor_falls_back_when_extensions_dir_is_unusable(
    ext_root, monkeypatch, tmp_path
):
    from lbw_guard import FusedGuardedAdamW

    _set_ext(monkeypatch, _file(tmp_path) / "ext")
    # backend="auto" (the default) must fall back, not crash; the guard plays no part here.
    opt = FusedGuardedAdamW([torch.nn.Parameter(torch.zeros(4))], guard=None)
    assert opt.backend_name not in ("cpu", "cuda")  # a plain-PyTorch fallback


# ------------------------------------------------------------------ module name fingerprint


def _checkout(tmp_path, name: str) -> dict:
    """Build arguments for a copy of csrc/cpu (and the shared csrc/common) at another place."""
    src = tmp_path / name / "csrc" / "cpu"
    for part in ("cpu", "common"):
        shutil.copytree(os.path.join(_build.CSRC, part), tmp_path / name / "csrc" / part)
    args = _build.cpu_build_args()
    args["sources"] = [str(src / os.path.basename(s)) for s in args["sources"]]
    return args


def test_fingerprint_tracks_the_torch_build(monkeypatch):
    args = _build.cpu_build_args()
    base = cpp_backend._fingerprint("cpu", args)
    changes = [
        (torch, "__version__", "2.99.0+cpu"),
        (torch, "__file__", "/another/venv/site-packages/torch/__init__.py"),
        (torch.version, "git_version", "0" * 40),
        (torch.version, "cuda", "12.9"),
    ]
    for obj, attr, value in changes:
        with monkeypatch.context() as m:
            m.setattr(obj, attr, value)
            assert cpp_backend._fingerprint("cpu", args) != base, attr
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        assert cpp_backend._fingerprint("cpu", args) != base, "CXX"
    assert cpp_backend._fingerprint("cpu", args) == base


def test_fingerprint_ignores_where_the_checkout_is(tmp_path):
    a, b = _checkout(tmp_path, "a"), _checkout(tmp_path, "b")
    here = cpp_backend._fingerprint("cpu", _build.cpu_build_args())
    assert cpp_backend._fingerprint("cpu", a) == cpp_backend._fingerprint("cpu", b) == here
    header = os.path.join(os.path.dirname(b["sources"][0]), "kernel_api.h")
    with open(header, "a") as f:
        f.write("\n// changed\n")
    assert cpp_backend._fingerprint("cpu", b) != here


def test_checkouts_share_the_staged_sources(tmp_path):
    a, b = _checkout(tmp_path, "a"), _checkout(tmp_path, "b")
    build_dir = str(tmp_path / "build")
    staged = cpp_backend._stage_sources(a["sources"], build_dir)
    assert sorted(os.listdir(os.path.join(build_dir, "src"))) == sorted(
        os.path.basename(p) for p in cpp_backend._source_files(a["sources"])
    )
    old = time.time() - 3600
    for p in staged:
        os.utime(p, (old, old))
    assert cpp_backend._stage_sources(b["sources"], build_dir) == staged
    assert all(os.path.getmtime(p) == old for p in staged), "rewritten: ninja would rebuild"


def test_a_header_name_in_both_directories_is_refused(tmp_path):
    """Staging puts the sources and every header in one directory: a header of the same name
    beside the sources and in csrc/common would silently replace one with the other."""
    a = _checkout(tmp_path, "a")
    shutil.copy(os.path.join(_build.CSRC, "common", "check_message.h"), os.path.dirname(a["sources"][0]))
    with pytest.raises(BackendUnavailable, match="check_message.h"):
        cpp_backend._stage_sources(a["sources"], str(tmp_path / "build"))


# ------------------------------------------------------------------ packaging


def test_wheel_carries_its_own_sources(tmp_path):
    pkg = tmp_path / "site-packages" / "lbw_kernels"
    pkg.mkdir(parents=True)
    assert _build.find_csrc(str(pkg)) == str(tmp_path / "site-packages" / "csrc")  # a checkout
    (pkg / "csrc").mkdir()
    assert _build.find_csrc(str(pkg)) == str(pkg / "csrc")  # a wheel (setup.py copies it in)
    assert _build.CSRC == os.path.join(ROOT, "csrc")


def test_dependencies():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["dependencies"] == ["torch>=2.11,<2.14", "ninja"]
    extras = project["optional-dependencies"]
    assert [r.split(";")[0] for r in extras["triton"]] == ["triton>=3.6"]
    dev = [r.split(";")[0].strip() for r in extras["dev"]]
    for needed in ("triton>=3.6", "numpy", "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "expecttest"):
        assert needed in dev
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        script = f.read()
    assert '".[hf,stress,dev]"' in script
    assert '-c "$constraints"' in script  # the installed torch is pinned while the extras install
