"""pytest set-up of the benchmark suite: options, device, collection of bench_*.py, results file.

    pytest benchmarks/ --benchmark-only                       # small sizes on CPU, full on GPU
    pytest benchmarks/ --benchmark-only --bench-sizes=1M,24Mx6 --bench-dtypes=fp32
    LBW_BENCH_SIZES=full pytest benchmarks/ --benchmark-only

At the end of the session every measurement goes to benchmarks/results/<device>-<date>.json
(``--bench-results=PATH`` or ``none``) and the rendered tables are printed.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import common, envinfo, render

HERE = Path(__file__).parent


def pytest_addoption(parser):
    g = parser.getgroup("lbw benchmarks")
    g.addoption("--bench-sizes", default=os.environ.get("LBW_BENCH_SIZES"),
                help="small | full | comma list of cases (default: small on CPU, full on GPU)")
    g.addoption("--bench-dtypes", default=os.environ.get("LBW_BENCH_DTYPES", "fp32,bf16"),
                help="comma list of parameter dtypes: fp32,bf16")
    g.addoption("--bench-device", default=os.environ.get("LBW_BENCH_DEVICE"),
                help="cpu or cuda (default: cuda when available)")
    g.addoption("--bench-threads", type=int, default=int(os.environ.get("LBW_BENCH_THREADS", "0")),
                help="torch CPU threads (default: torch's own choice); recorded in the results")
    g.addoption("--bench-results", default=os.environ.get("LBW_BENCH_RESULTS", "auto"),
                help="results JSON path, 'auto' (benchmarks/results/<device>-<date>.json) or 'none'")
    g.addoption("--bench-note", default=os.environ.get("LBW_BENCH_NOTE", ""),
                help="free text stored in the results file (e.g. 'shared machine, noisy')")


def pytest_collect_file(file_path, parent):
    # Benchmarks live in bench_*.py so that the unit-test run (testpaths=tests) never sees them.
    # A file named on the command line is collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_configure(config):
    dev = _device(config)
    spec = config.getoption("--bench-sizes") or ("full" if dev.type == "cuda" else "small")
    if config.getoption("--bench-threads"):
        torch.set_num_threads(config.getoption("--bench-threads"))
    config._lbw_load_start = _loadavg()
    config._lbw_bench = {
        "device": dev,
        "sizes": spec,
        "cases": common.select_cases(spec),
        "dtypes": common.select_dtypes(config.getoption("--bench-dtypes")),
    }


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return pytestconfig._lbw_bench["device"]


@pytest.fixture(scope="session")
def plan(device) -> common.TimingPlan:
    return common.GPU_PLAN if device.type == "cuda" else common.CPU_PLAN


@pytest.fixture(scope="session")
def copy_bw(device) -> dict:
    """The roofline, shared by every benchmark: bench_copy fills it; otherwise a quick measure."""
    return common.COPY_BW.setdefault(str(device), {})


# ---------------------------------------------------------------- environment
# Kept under their old names: the helpers live in benchmarks.envinfo (shared with gpu_validate).
_cpu_model = envinfo.cpu_model
_loadavg = envinfo.loadavg
_run = envinfo.run
environment = envinfo.environment
versions = envinfo.versions
device_slug = envinfo.device_slug


def build_document(config) -> dict:
    cfg = config._lbw_bench
    dev = cfg["device"]
    info = environment(dev)
    copy = common.COPY_BW.get(str(dev), {})
    return {
        "schema": 2,
        "kind": "benchmark-suite",
        "date": datetime.date.today().isoformat(),
        "device": info,
        "versions": versions(),
        "git_commit": envinfo.git_commit(),
        "git_dirty": envinfo.git_dirty(),
        "sizes": {"preset": cfg["sizes"], "dtypes": cfg["dtypes"],
                  "cases": [{"name": c.name, "tensors": c.tensors, "numel_each": c.numel_each, "numel": c.numel}
                            for c in cfg["cases"]]},
        "note": config.getoption("--bench-note"),
        "load_avg": {"start": getattr(config, "_lbw_load_start", None), "end": _loadavg()},
        "copy_gbps": copy.get("gbps"),
        "results": list(common.RESULTS),
    }


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not common.RESULTS or getattr(config, "workerinput", None) is not None:
        return
    doc = build_document(config)
    config._lbw_doc = doc
    target = config.getoption("--bench-results")
    if target == "none":
        return
    path = Path(target) if target != "auto" else HERE / "results" / f"{device_slug(doc['device'])}-{doc['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    config._lbw_results_path = path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    doc = getattr(config, "_lbw_doc", None)
    if doc is None:
        return
    tr = terminalreporter
    tr.section("lbw-guard benchmark summary")
    tr.write_line(render.render_markdown(doc))
    path = getattr(config, "_lbw_results_path", None)
    if path:
        tr.write_line(f"\nresults written to {path}")
