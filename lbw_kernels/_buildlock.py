"""Exclusive use of an extension build directory that survives killed builds.

``torch.utils.cpp_extension.load`` guards a build directory with a ``lock`` file that it creates
and deletes itself (``FileBaton``). A build killed by SIGKILL, the OOM killer or preemption leaves
that file behind, and every later load polls it forever. So lbw-guard first takes an OS lock
(``flock``) on ``lbw_build.lock`` in the same directory: the kernel releases it when its holder
dies, and whoever holds it is the only lbw-guard process that may be building there. A torch
``lock`` it finds was left by a killed build: it is removed, together with the module file that
build may have half written, and the module is rebuilt. The wait for the OS lock is bounded.

The OS lock proves nothing in two cases, which are judged by the age of torch's ``lock`` instead:
a file system without locks (some network file systems), and a previous holder on another
machine (network file systems whose locks are local to each client).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from functools import lru_cache

if os.name == "nt":
    import msvcrt
else:
    import fcntl

log = logging.getLogger("lbw_guard")

LOCK_NAME = "lbw_build.lock"  # the OS lock, and who took it last (for messages)
TORCH_LOCK_NAME = "lock"  # torch's FileBaton
MODULE_SUFFIXES = (".so", ".pyd")
_POLL_SECONDS = 0.2
# flock errors meaning "this file system has no locks", not "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class LockTimeout(Exception):
    """A live process kept the build directory locked for longer than the timeout."""


@contextmanager
def exclusive(build_dir: str, module_name: str, timeout: float, stale_age: float):
    """Hold ``build_dir`` while ``module_name`` is built and loaded there.

    Clears what a killed build left behind first. Raises OSError when the directory cannot be
    used (not a directory, not writable) and LockTimeout when another live process holds it
    (or, where the OS lock proves nothing, a torch ``lock`` younger than ``stale_age`` seconds
    stays) for more than ``timeout`` seconds.
    """
    path = os.path.join(build_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        locked = _acquire(fd, path, module_name, timeout, deadline)
        previous = _read_owner(fd)
        if locked and _same_machine(previous):
            _clear_killed_build(build_dir, module_name, previous, deadline)
        else:
            _wait_for_torch_lock(build_dir, module_name, previous, deadline, stale_age)
        _write_owner(fd)
        yield
    finally:
        os.close(fd)  # releases the OS lock


def remove_module(build_dir: str, module_name: str) -> None:
    """Delete the compiled module, which a failed or killed build may have left half written."""
    for suffix in MODULE_SUFFIXES:
        _remove(os.path.join(build_dir, module_name + suffix))


def module_exists(build_dir: str, module_name: str) -> bool:
    return any(os.path.exists(os.path.join(build_dir, module_name + s)) for s in MODULE_SUFFIXES)


def _acquire(fd: int, path: str, module_name: str, timeout: float, deadline: float) -> bool:
    """Take the OS lock, polling until ``deadline``. False: this file system has no locks."""
    announced = False
    while True:
        try:
            _try_lock(fd)
            return True
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            log.warning("lbw-guard: %s cannot be locked (%s); judging build locks by age", path, exc)
            return False
        holder = _describe(_read_owner(fd))
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"{path} is locked by {holder}, which is building or loading {module_name}, and "
                f"was not released within {timeout:.0f} s. The lock is released when that process "
                "exits: end it if it is stuck, or set LBW_GUARD_BUILD_TIMEOUT (seconds) to wait longer"
            )
        if not announced:
            log.warning("lbw-guard: waiting for %s (%s is building %s)", path, holder, module_name)
            announced = True
        time.sleep(_POLL_SECONDS)


def _try_lock(fd: int) -> None:
    """Lock ``fd`` without blocking; BlockingIOError when another process holds it."""
    if os.name == "nt":
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLK):
                raise BlockingIOError(exc.errno, exc.strerror) from exc
            raise
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _clear_killed_build(
    build_dir: str, module_name: str, previous: dict | None, deadline: float
) -> None:
    # We hold the OS lock, so no lbw-guard process on this machine is building here.
    torch_lock = os.path.join(build_dir, TORCH_LOCK_NAME)
    if not os.path.exists(torch_lock):
        return
    _wait_for_orphans(build_dir, deadline)
    log.warning(
        "lbw-guard: removing the stale build lock %s, left by a build that was killed (%s); "
        "rebuilding %s",
        torch_lock,
        _describe(previous),
        module_name,
    )
    remove_module(build_dir, module_name)
    _remove(torch_lock)


def _wait_for_orphans(build_dir: str, deadline: float) -> None:
    # SIGKILL does not reach the killed process's ninja and compilers: let them finish rather
    # than race them on the same object files. (They stop soon: ninja dies on its closed pipe.)
    announced = False
    while pids := _processes_in(build_dir):
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"processes {pids}, left running by a killed build, are still working in "
                f"{build_dir}: wait for them to finish or end them"
            )
        if not announced:
            log.warning("lbw-guard: waiting for processes %s of a killed build in %s", pids, build_dir)
            announced = True
        time.sleep(_POLL_SECONDS)


def _processes_in(build_dir: str) -> list[int]:
    """Other processes whose working directory is ``build_dir`` (Linux; elsewhere none found)."""
    target = os.path.realpath(build_dir)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    pids = []
    for entry in entries:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == target:
                    pids.append(int(entry))
            except OSError:  # gone, or another user's
                continue
    return pids


def _wait_for_torch_lock(
    build_dir: str, module_name: str, previous: dict | None, deadline: float, stale_age: float
) -> None:
    """Wait for torch's lock to go; remove it once older than a build can take."""
    torch_lock = os.path.join(build_dir, TORCH_LOCK_NAME)
    while True:
        try:
            age = time.time() - os.path.getmtime(torch_lock)
        except FileNotFoundError:
            return
        if age > stale_age:
            log.warning(
                "lbw-guard: removing the build lock %s: it is %.0f s old, older than a build "
                "takes (LBW_GUARD_STALE_LOCK_AGE=%.0f s); rebuilding %s",
                torch_lock,
                age,
                stale_age,
                module_name,
            )
            remove_module(build_dir, module_name)
            _remove(torch_lock)
            return
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"the build lock {torch_lock} ({age:.0f} s old; last taken by {_describe(previous)}) "
                f"is still there. If no build of {module_name} is running, delete it; it is "
                f"removed automatically once older than LBW_GUARD_STALE_LOCK_AGE ({stale_age:.0f} s)"
            )
        time.sleep(_POLL_SECONDS)


def _read_owner(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):  # unreadable or half written: only used in messages
        return None
    return owner if isinstance(owner, dict) else None


def _write_owner(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "machine": _machine_id(),
        "since": time.time(),
    }
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
    except OSError:
        pass


@lru_cache(maxsize=None)
def _machine_id() -> str:
    # The kernel's boot id is shared by all containers of a machine, which also share OS locks.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _same_machine(owner: dict | None) -> bool:
    return owner is None or owner.get("machine") == _machine_id()


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {since}"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
