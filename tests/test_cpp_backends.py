"""The compiled C++ backends against the PyTorch reference.

The CPU backend is built on first use (about 40 s on 2 cores, then cached in the torch
extensions dir). The CUDA backend cannot run without a GPU; here its kernel is compiled
with nvcc and its torch binding is syntax-checked against torch's headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lbw_kernels import contract as C
from lbw_kernels.backends import BackendUnavailable, load_backend
from lbw_kernels.reference import fused_adamw_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Sizes: single elements, a tail shorter than a vector, one crossing the 64K-element chunk
# boundary of the CPU backend, and a few chunks.
SIZES = [1, 3, 4097, 65536 + 17, 150_001]
GROUP_IDS = [0, 1, 1, 2, 3]
NUM_GROUPS = 4
GATED_GROUP = 1  # gate 0: p, m, v must stay untouched


@pytest.fixture(scope="module")
def cpu_module():
    from lbw_kernels.cpp_backend import load_cpp_module

    try:
        return load_cpp_module("cpu")
    except BackendUnavailable as exc:
        pytest.skip(f"cpu backend unavailable here: {exc}")


def make_case(dtype: torch.dtype, seed: int):
    """Fresh random bucket with NaN/inf grads, planted outliers, grad scale and clip != 1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    grad_scale = 1024.0
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    for i, n in enumerate(SIZES):
        params.append((randn(n) * (0.5 + rand(1))).to(dtype))
        v = rand(n) * 1e-3
        g = randn(n) * v.sqrt() * 2
        k = max(1, n // 500)
        idx = torch.randperm(n, generator=gen)[:k]
        g[idx] = v[idx].sqrt() * 1e3 * torch.sign(randn(k))  # far past any outlier bound
        if n > 3:
            g[torch.randperm(n, generator=gen)[:3]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        grads.append((g * grad_scale).to(dtype))
        exp_avgs.append(randn(n) * 1e-2)
        exp_avg_sqs.append(v)
    # Random step counts; tensor 3 is on its first step (outlier scale +inf).
    steps = [torch.tensor(float(s)) for s in torch.randint(2, 200, (len(SIZES),), generator=gen)]
    steps[3] = torch.tensor(1.0)
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    gate = torch.ones(NUM_GROUPS, dtype=torch.float64)
    gate[GATED_GROUP] = 0.0
    coeffs = C.coefficient_table(
        steps,
        torch.tensor(GROUP_IDS),
        lr=f64([1e-2, 3e-3, 1e-3, 5e-2]),
        beta1=f64([0.9, 0.9, 0.8, 0.95]),
        beta2=f64([0.999, 0.99, 0.999, 0.95]),
        eps=f64([1e-8, 1e-6, 1e-8, 1e-8]),
        weight_decay=f64([0.1, 0.0, 0.01, 0.5]),
        gate=gate,
        outlier_factor=5.0,
    )
    inv_grad_scale = torch.tensor(1.0 / grad_scale, dtype=torch.float32)
    clip_coef = torch.tensor(0.37, dtype=torch.float32)
    return params, grads, exp_avgs, exp_avg_sqs, coeffs, inv_grad_scale, clip_coef


def clone_state(case):
    params, grads, m, v, coeffs, inv, clip = case
    return [t.clone() for t in params], grads, [t.clone() for t in m], [t.clone() for t in v], coeffs, inv, clip


def run(step_fn, case):
    params, grads, m, v, coeffs, inv, clip = case
    tel = step_fn(params, grads, m, v, coeffs, GROUP_IDS, NUM_GROUPS, inv, clip)
    return params, m, v, tel


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (x given in fp32)."""
    mbits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    tiny = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]
    _, exp = torch.frexp(x.double().abs())
    return torch.clamp(torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - mbits), min=tiny)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(cpu_module, dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run
    case = make_case(dtype, seed)
    p0 = [t.clone() for t in case[0]]
    m0, v0 = [t.clone() for t in case[2]], [t.clone() for t in case[3]]
    ref_p, ref_m, ref_v, ref_tel = run(fused_adamw_reference, clone_state(case))
    p, m, v, tel = run(cpu_module.fused_adamw, clone_state(case))

    for i in range(len(SIZES)):
        msg = f"seed={seed} tensor={i}"
        # m and v involve no sqrt: exactly the reference's fp32 roundings.
        assert torch.equal(bits(m[i]), bits(ref_m[i])), msg
        assert torch.equal(bits(v[i]), bits(ref_v[i])), msg
        # p: the reference's CPU sqrt (MKL) may differ from IEEE sqrt by an ulp, which moves
        # the update term by an ulp or so; allow 1 ulp of p plus a few ulps of the update.
        pr, pc = ref_p[i].float(), p[i].float()
        tol = ulp(pr, dtype)
        if dtype == torch.float32:
            tol = tol + 2.0**-20 * (pr - p0[i].float()).abs().double()
        err = (pc.double() - pr.double()).abs()
        assert bool((err <= tol).all()), f"{msg}: max p error {err.max().item()}"
        # Masked writes: gated tensors and non-finite grads leave p, m, v bit-exactly alone.
        unwritten = ~torch.isfinite(case[1][i].float() * case[5])
        if GROUP_IDS[i] == GATED_GROUP:
            unwritten[:] = True
        assert torch.equal(bits(p[i])[unwritten], bits(p0[i])[unwritten]), msg
        assert torch.equal(bits(m[i])[unwritten], bits(m0[i])[unwritten]), msg
        assert torch.equal(bits(v[i])[unwritten], bits(v0[i])[unwritten]), msg

    assert tel.dtype == torch.float64 and tel.shape == (NUM_GROUPS, C.NUM_REDUCED_FIELDS)
    # Counts exact; the planted outliers, NaN and infs are really there.
    assert torch.equal(tel[:, 4:], ref_tel[:, 4:]), f"seed={seed}"
    assert tel[:, 4].sum() > 0 and tel[:, 5].sum() > 0
    # Sums: fp32 products summed in fp32 over 32 terms per lane, then in double. grad_dot_update
    # can cancel, so its scale is the Cauchy-Schwarz bound sqrt(sum g^2 * sum u^2).
    scale = ref_tel[:, :4].abs().clone()
    scale[:, 3] = torch.maximum(scale[:, 3], (ref_tel[:, 0] * ref_tel[:, 1]).sqrt())
    err = (tel[:, :4] - ref_tel[:, :4]).abs()
    assert bool((err <= 2e-5 * scale + 1e-30).all()), f"seed={seed}\n{tel}\n{ref_tel}"
    assert bool((tel[GATED_GROUP, [1, 3]] == 0).all())


def test_cpu_deterministic_across_runs_threads_and_isas(cpu_module):
    case = make_case(torch.float32, int(torch.randint(0, 2**31 - 1, ()).item()))
    baseline = run(cpu_module.fused_adamw, clone_state(case))
    threads = torch.get_num_threads()
    configs = []
    detected = cpu_module.isa()
    try:
        for isa in ("base", "avx2", "avx512"):
            if cpu_module.set_isa(isa) != isa:
                continue  # not supported by this CPU
            for nthreads in sorted({1, threads}):
                torch.set_num_threads(nthreads)
                configs.append((isa, nthreads, run(cpu_module.fused_adamw, clone_state(case))))
    finally:
        cpu_module.set_isa(detected)
        torch.set_num_threads(threads)
    assert len(configs) >= 2
    for isa, nthreads, (p, m, v, tel) in configs:
        assert torch.equal(bits(tel), bits(baseline[3])), (isa, nthreads)
        for a, b in zip(p + m + v, baseline[0] + baseline[1] + baseline[2]):
            assert torch.equal(bits(a), bits(b)), (isa, nthreads)


def test_cpu_non_contiguous_and_registry(cpu_module):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    base = torch.randn(300, 70, generator=gen)
    p_nc = base.t()  # non-contiguous view, written back in place
    g = torch.randn(70, 300, generator=gen)
    m, v = torch.zeros(70, 300), torch.rand(70, 300, generator=gen) * 1e-3
    coeffs = C.coefficient_table(
        [torch.tensor(3.0)], torch.tensor([0]), *(torch.tensor([x], dtype=torch.float64) for x in (1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0)), 5.0
    )
    one = torch.tensor(1.0)
    p_old = p_nc.clone()
    ref_p, ref_m, ref_v = p_nc.clone(), m.clone(), v.clone()
    ref_tel = fused_adamw_reference([ref_p], [g], [ref_m], [ref_v], coeffs, [0], 1, one, one)
    step = load_backend("cpu", torch.device("cpu"))
    tel = step([p_nc], [g], [m], [v], coeffs, [0], 1, one, one)
    tol = ulp(ref_p, torch.float32) + 2.0**-20 * (ref_p - p_old).abs().double()
    assert bool(((base.t().double() - ref_p.double()).abs() <= tol).all())
    assert torch.equal(m, ref_m) and torch.equal(v, ref_v)
    assert torch.allclose(tel, ref_tel, rtol=2e-5, atol=0)


def _load_in_subprocess(tmp_path, env_overrides: dict) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        import sys
        from lbw_kernels.backends import BackendUnavailable
        from lbw_kernels.cpp_backend import load_cpp_backend
        try:
            load_cpp_backend("cpu")
        except BackendUnavailable as exc:
            print("UNAVAILABLE:", exc)
            sys.exit(0)
        print("LOADED")
        sys.exit(1)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_missing_compiler_raises_backend_unavailable(tmp_path):
    res = _load_in_subprocess(tmp_path, {"CXX": str(tmp_path / "no-such-c++")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "UNAVAILABLE:" in res.stdout and "not on PATH" in res.stdout, res.stdout


def test_failing_compiler_raises_backend_unavailable(tmp_path):
    # A compiler that exists but fails: the build itself errors out, in a fresh build dir.
    res = _load_in_subprocess(tmp_path, {"CXX": shutil.which("false") or "/bin/false"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "UNAVAILABLE:" in res.stdout and "failed to build" in res.stdout, res.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_cuda_backend_unavailable_on_cpu_torch():
    from lbw_kernels.cpp_backend import load_cpp_backend

    with pytest.raises(BackendUnavailable, match="CPU-only"):
        load_cpp_backend("cuda")


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        found = cand if os.path.exists(cand) else None
    return found


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    from lbw_kernels._build import cuda_build_args

    flags = [f for f in cuda_build_args()["extra_cuda_cflags"] if f != "-lineinfo"]
    cmd = [_nvcc(), "-c", "-std=c++17", "-arch=sm_90", *flags,
           os.path.join(CSRC, "cuda", "fused_adamw_cuda.cu"), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(_nvcc() is None or shutil.which("c++") is None, reason="nvcc or c++ not found")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Syntax-check the torch side of the CUDA backend, even with a CPU build of torch."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    candidates = [
        os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(_nvcc()))), "include"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
        "/usr/local/cuda/include",
    ]
    cuda_inc = next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip("CUDA headers not found")
    incs = include_paths() + [cuda_inc, sysconfig.get_paths()["include"]]
    # CPU wheels lack this one generated header of c10/cuda; an empty one stands in for it.
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in incs):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path / "stub"))
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=lbw_check",
           *(f"-I{d}" for d in incs), os.path.join(CSRC, "cuda", "fused_adamw_cuda_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
