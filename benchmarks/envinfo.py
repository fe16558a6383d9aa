"""Where a measurement was taken: device, versions, CPU model, threads, load average, commit.

Shared by the pytest-benchmark suite (conftest), the interleaved CPU targets
(``benchmarks.cpu_targets``) and ``benchmarks.gpu_validate``, so every results file says the
same things about its machine. Imports nothing but torch and the standard library.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: CPU timings on a shared machine are only as good as its idle time."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(dev: torch.device) -> dict:
    info = {"type": dev.type, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        info["memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
        drv = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = drv.splitlines()[0] if drv else None
    else:
        info["name"] = f"CPU: {info['cpu_model']}"
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "pytest_benchmark", "lbw_guard"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package: just not reported
            pass
    out["platform"] = sys.platform
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return out


def device_slug(info: dict) -> str:
    """``cpu`` or the GPU's name, lower-case with dashes (``h100-80gb-hbm3``)."""
    if info["type"] != "cuda":
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", info["name"].lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_commit() -> str | None:
    return run(["git", "-C", str(HERE), "rev-parse", "HEAD"])


def git_dirty() -> bool | None:
    """Whether the working tree differs from the commit (read-only ``git status``)."""
    out = run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"])
    return None if out is None and git_commit() is None else bool(out)


def today() -> str:
    return datetime.date.today().isoformat()


def header(dev: torch.device) -> dict:
    """The common head of every results document."""
    return {
        "date": today(),
        "device": environment(dev),
        "versions": versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }
