"""The ahead-of-time GPU compile check (``python -m lbw_kernels.compile_check``) without a GPU.

It compiles every Triton kernel variant for sm_90 with Triton's bundled ptxas, and the CUDA
sources with nvcc when nvcc is on PATH, in a subprocess without TRITON_INTERPRET (Triton
reads it when kernels are decorated). Set LBW_COMPILE_CHECK_ARCHS=80,90 to check more archs
(each arch adds ~20 s on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbw_kernels import compile_check as cc

ROOT = Path(__file__).resolve().parent.parent
ARCHS = os.environ.get("LBW_COMPILE_CHECK_ARCHS", "90")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lbw_kernels.compile_check", "--arch", ARCHS, "--json",
         "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"compile_check printed no JSON report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data["returncode"] = proc.returncode
    return data


def _describe(rows):
    return "\n".join(f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: regs {r['registers']}, "
                     f"spills {r['spill_stores']}/{r['spill_loads']}, blocks/SM "
                     f"{r['blocks_per_sm']} {r['error']}" for r in rows)


def test_triton_kernels_compile_without_spills(report):
    if "triton" in report["skipped"]:
        pytest.skip(f"Triton cannot compile for CUDA here: {report['skipped']['triton']}")
    rows = report["triton"]
    archs = [int(a) for a in ARCHS.split(",")]
    assert len(rows) == 7 * len(archs)  # update: 3 dtypes x aligned/unaligned; finish
    bad = [r for r in rows if not r["passed"]]
    assert not bad, "Triton kernels failed the compile check:\n" + _describe(bad)
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, _describe([r])
        if r["kernel"] == "update":
            assert r["blocks_per_sm"] >= cc.MIN_BLOCKS_PER_SM, _describe([r])
            if "unaligned" not in r["variant"]:  # the ALIGNED variants vectorise to 16 bytes
                assert r["load_bits"] == 128 and r["store_bits"] == 128, _describe([r])


def test_cuda_sources_compile_without_spills(report):
    if "nvcc" in report["skipped"]:
        pytest.skip(f"nvcc check skipped: {report['skipped']['nvcc']}")
    rows = report["nvcc"]
    assert rows, "nvcc reported no kernels"
    bad = [r for r in rows if not r["passed"]]
    assert not bad, ("csrc/cuda/fused_adamw_cuda.cu failed the compile check:\n"
                     + _describe(bad))


def test_exit_status_matches_the_report(report):
    if "triton" in report["skipped"]:
        assert report["returncode"] == 2
    else:
        assert report["returncode"] == (0 if report["ok"] else 1)


# --------------------------------------------------------------------------- parsing
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8lbw_cuda12_GLOBAL__N_16kernelIfEEvPfi' for 'sm_90'
ptxas info    : Function properties for _ZN8lbw_cuda12_GLOBAL__N_16kernelIfEEvPfi
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 64 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'update_kernel' for 'sm_90a'
ptxas info    : Function properties for update_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 32 bytes smem, 456 bytes cmem[0]
"""


def test_parse_ptxas_log():
    info = cc.parse_ptxas_log(PTXAS_LOG)
    assert info["update_kernel"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0,
                                     "registers": 128, "smem": 32}
    k = info["_ZN8lbw_cuda12_GLOBAL__N_16kernelIfEEvPfi"]
    assert (k["registers"], k["spill_stores"], k["spill_loads"], k["stack"]) == (255, 8, 4, 16)


def test_occupancy_and_names():
    assert cc.blocks_per_sm(128, 4, 32, 90) == 4
    assert cc.blocks_per_sm(80, 4, 32, 90) == 6
    assert cc.blocks_per_sm(32, 4, 0, 80) == 16  # the thread limit
    assert cc._short_name("void lbw_cuda::(anonymous namespace)::k<float>(float*, int)") \
        == "lbw_cuda::k<float>"
    ptx = "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nld.global.b64 %rd2, [%rd3];\n" \
          "@%p1 st.global.v2.b32 [%rd4], {%r5, %r6};"
    assert cc._widest(ptx, "ld") == 128 and cc._widest(ptx, "st") == 64


def test_failing_results_are_reported():
    ok = cc.Result(kernel="k", variant="v", arch=90, ok=True, registers=64, spill_stores=0,
                   spill_loads=0, stack=0, num_warps=4, blocks_per_sm=8, min_blocks=4)
    spilled = cc.Result(kernel="k", variant="v", arch=90, ok=True, registers=255,
                        spill_stores=8, spill_loads=4, stack=16, num_warps=4, blocks_per_sm=2)
    broken = cc.Result(kernel="k", variant="v", arch=80, error="nvcc failed (exit 1)")
    assert ok.passed and not spilled.passed and not broken.passed
    table = cc.format_table([ok, spilled, broken])
    assert "FAIL: spills" in table and "FAIL: nvcc failed" in table


def test_nvcc_failure_is_reported(tmp_path):
    """A CUDA source that does not compile fails the check with nvcc's first error."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH")
    src = tmp_path / "broken.cu"
    src.write_text("__global__ void k(float* x) { x[0] = undefined_thing; }\n")
    results, why = cc.compile_nvcc([90], src)
    assert why is None and len(results) == 1 and not results[0].passed
    assert 'identifier "undefined_thing" is undefined' in results[0].error.splitlines()[0]
