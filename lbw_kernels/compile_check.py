"""Ahead-of-time GPU compile check of the fused AdamW kernels; no GPU needed.

    python -m lbw_kernels.compile_check --arch 80,90 [--skip-nvcc] [--skip-triton] [--json]

1. Compiles every Triton kernel variant the backend launches (update kernel: fp32 / bf16 /
   fp16 params x aligned / unaligned storage; finish kernel) for each CUDA arch with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and Triton's bundled
   ptxas, with the launch options of :mod:`lbw_kernels.triton_adamw` (warps, no FMA
   contraction) and the specialisation the JIT gives torch allocations (16-byte aligned
   pointers). It prints registers, spills, stack, shared memory, the widest global load and
   store, and the blocks per SM the registers allow; it fails on a compile error, a spill, or
   an update kernel with fewer than ``MIN_BLOCKS_PER_SM`` blocks per SM.
2. Compiles ``csrc/cuda/fused_adamw_cuda.cu`` with ``nvcc -c -Xptxas -v`` (the flags of the
   extension build) for the same archs into a temporary directory and prints its kernels'
   registers and spills; it says it skipped when nvcc is not on PATH.

Exit status: 0 when everything compiled without spills, 1 otherwise, 2 when Triton cannot
compile for CUDA here (no CUDA backend or ptxas).

Triton reads ``TRITON_INTERPRET`` when kernels are decorated, so this module drops it before
importing Triton: run it as its own process (``python -m``), not inside an interpreted
session.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

MIN_BLOCKS_PER_SM = 4  # the update kernel's occupancy target
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
CUDA_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "fused_adamw_cuda.cu"


@dataclass
class Result:
    kernel: str
    variant: str
    arch: int
    ok: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    blocks_per_sm: int | None = None
    load_bits: int | None = None
    store_bits: int | None = None
    min_blocks: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def passed(self) -> bool:
        return (self.ok and self.spills == 0 and self.stack in (0, None)
                and (self.blocks_per_sm is None or self.blocks_per_sm >= self.min_blocks))


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {function: {registers, stack, spill_stores, spill_loads, smem}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line) or _PTXAS_PROPS.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return out


def blocks_per_sm(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256),
    threads, the block limit and shared memory."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else MAX_BLOCKS_PER_SM
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    smem = SHARED_PER_SM.get(arch, 100 * 1024)
    by_smem = smem // (shared + 1024) if shared else MAX_BLOCKS_PER_SM  # 1 KiB reserved
    return min(by_regs, by_threads, MAX_BLOCKS_PER_SM, by_smem)


def _widest(ptx: str, op: str) -> int | None:
    """Widest global ``op`` (ld/st) access in bits in PTX of 16- or 32-bit elements (the
    params, grads and moments; not the 64-bit tables), e.g. 128 for ld.global.v4.b32."""
    best = None
    for m in re.finditer(rf"\b{op}\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        if int(m.group(2)) > 32:
            continue
        bits = int(m.group(1) or 1) * int(m.group(2))
        best = bits if best is None else max(best, bits)
    return best


# --------------------------------------------------------------------------- Triton
def triton_variants():
    """(kernel name, variant label, jit function, signature, constexprs, options, min blocks)
    for every variant ``fused_adamw_triton`` launches on a GPU."""
    import triton.language as tl

    from .triton_adamw import GPU_CONFIG, update_options
    from .triton_finish import finish_kernel, finish_signature
    from .triton_update import update_kernel, update_signature

    cfg = GPU_CONFIG
    out = []
    for name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        for aligned in (True, False):
            out.append(("update", f"{name} {'aligned' if aligned else 'unaligned'}",
                        update_kernel, update_signature(name),
                        {"P_DTYPE": dtype, "ALIGNED": aligned, "BLOCK": cfg.block},
                        {"num_warps": cfg.num_warps, "enable_fp_fusion": False,
                         **update_options(cfg)},
                        MIN_BLOCKS_PER_SM))
    out.append(("finish", "-", finish_kernel, finish_signature(),
                {"ROWS": cfg.rows, "MEMBERS": cfg.members, "GROUPS": cfg.groups},
                {"num_warps": cfg.finish_warps, "enable_fp_fusion": False}, 0))
    return out


def _ast_source(fn, signature: dict, constexprs: dict):
    """An ASTSource for ``fn`` across Triton versions: 3.3+ (3.6 ... 3.9) take a signature
    keyed by argument name with constexprs marked "constexpr" and constexprs by name; 3.0 to
    3.2 took signatures and constants keyed by argument index."""
    import inspect

    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    params = inspect.signature(ASTSource.__init__).parameters
    pointer_idx = [i for i, n in enumerate(names) if signature.get(n, "").startswith("*")]
    if "constexprs" in params:  # triton >= 3.3
        sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_idx}
        return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    # triton 3.0 - 3.2 (best effort): index-keyed signature without the constexprs.
    sig = {i: signature[n] for i, n in enumerate(names) if n not in constexprs}
    consts = {i: constexprs[n] for i, n in enumerate(names) if n in constexprs}
    try:
        from triton.backends.compiler import AttrsDescriptor
        attrs = AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": pointer_idx}})
    except Exception:  # noqa: BLE001 - older layouts: compile without alignment hints
        attrs = None
    return ASTSource(fn=fn, signature=sig, constants=consts, attrs=attrs)


def compile_triton(arch: int, variant) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, label, fn, signature, constexprs, options, min_blocks = variant
    res = Result(kernel=kernel, variant=label, arch=arch, num_warps=options["num_warps"],
                 min_blocks=min_blocks)
    # Triton prints its own ptxas -v log (TRITON_DUMP_PTXAS_LOG) when it compiles; compile
    # even when cached (TRITON_ALWAYS_COMPILE). Without these knobs, ptxas is re-run below.
    knobs = getattr(triton, "knobs", None)
    switches = []
    for group, name in (("nvidia", "dump_ptxas_log"), ("compilation", "always_compile")):
        holder = getattr(knobs, group, None)
        if holder is not None and hasattr(holder, name):
            switches.append((holder, name, getattr(holder, name)))
    log = io.StringIO()
    try:
        src = _ast_source(fn, signature, constexprs)
        for holder, name, _ in switches:
            setattr(holder, name, True)
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options=dict(options))
        finally:
            for holder, name, value in switches:
                setattr(holder, name, value)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        res.error = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
        return res
    res.ok = True
    md = compiled.metadata
    res.shared = int(getattr(md, "shared", 0) or 0)
    ptx = compiled.asm.get("ptx", "")
    res.load_bits = _widest(ptx, "ld")
    res.store_bits = _widest(ptx, "st")
    info = parse_ptxas_log(log.getvalue())
    if not info:  # no log captured: run the bundled ptxas on the PTX ourselves
        info = parse_ptxas_log(_run_ptxas(ptx, arch, options))
        res.notes.append("ptxas re-run on the PTX")
    if info:
        stats = next(iter(info.values()))
        res.registers = stats.get("registers")
        res.stack = stats.get("stack", 0)
        res.spill_stores = stats.get("spill_stores", 0)
        res.spill_loads = stats.get("spill_loads", 0)
    # The metadata has n_regs / n_spills only once the binary is loaded on a GPU.
    for attr, target in (("n_regs", "registers"), ("n_spills", "spill_stores")):
        value = getattr(compiled, attr, None)
        if isinstance(value, int) and getattr(res, target) is None:
            setattr(res, target, value)
    if res.registers is not None:
        res.blocks_per_sm = blocks_per_sm(res.registers, res.num_warps, res.shared, arch)
    else:
        res.ok = False
        res.error = "no register count: ptxas -v output not found"
    return res


def _run_ptxas(ptx: str, arch: int, options: dict) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch).path
    except TypeError:  # older triton: get_ptxas() without an arch
        ptxas = nv.get_ptxas().path
    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={name}", str(src), "-o", str(Path(tmp) / "k.o")]
        if not options.get("enable_fp_fusion", True):
            cmd.insert(1, "--fmad=false")
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def triton_available() -> str | None:
    """None when Triton can compile for CUDA here, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton cannot be imported: {exc}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: run the check in a process without it"
    try:
        from triton.backends import backends
        if "nvidia" not in backends:
            return "triton has no CUDA (nvidia) backend"
        from triton.backends.nvidia import compiler as nv
        try:
            tool = nv.get_ptxas(90)
        except TypeError:
            tool = nv.get_ptxas()
        if tool is None or not tool.path or not os.path.exists(tool.path):
            return "triton's ptxas was not found"
    except Exception as exc:  # noqa: BLE001
        return f"triton cannot compile for CUDA here: {exc}"
    del triton
    return None


# --------------------------------------------------------------------------- nvcc
def _cuda_flags() -> list[str]:
    try:
        from ._build import _cuda_flags as flags
        return list(flags())
    except Exception:  # noqa: BLE001 - the build module is optional here
        return ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-lineinfo"]


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return {n: (lines[i] if i < len(lines) else n) for i, n in enumerate(names)}


def _short_name(name: str) -> str:
    """``void ns::(anonymous namespace)::k<float>(float*, int)`` -> ``ns::k<float>``."""
    name = name.replace("(anonymous namespace)::", "")
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):  # drop the parameter list: the last balanced (...)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name


def compile_nvcc(archs: list[int], source: Path = CUDA_SOURCE) -> tuple[list[Result], str | None]:
    """Results per kernel and arch, and a reason when skipped."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], "nvcc not found on PATH"
    if not source.exists():
        return [], f"{source} does not exist"
    includes = [f"-I{source.parent}"]
    try:  # the torch headers, should the kernel file include them
        from torch.utils.cpp_extension import include_paths
        includes += [f"-I{p}" for p in include_paths()]
    except Exception:  # noqa: BLE001
        pass
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", "-std=c++17", *_cuda_flags(), *gencode, "-Xptxas", "-v", *includes,
               str(source), "-o", str(Path(tmp) / "fused_adamw_cuda.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [line for line in log.splitlines() if "error" in line.lower()][:20]
        first = errors[0].split("error", 1)[-1].lstrip(": ") if errors else "see the log"
        detail = "\n".join(errors or [log[-3000:]])
        error = f"nvcc failed (exit {proc.returncode}): {first}\n{' '.join(cmd)}\n{detail}"
        return [Result(kernel=source.name, variant="nvcc", arch=a, error=error)
                for a in archs], None
    results = []
    # ptxas prints the entries of each arch in turn: split the log at each arch's header.
    chunks: dict[int, list[str]] = {}
    current_arch = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current_arch = int(re.sub(r"\D", "", m.group(2)))
        if current_arch is not None:
            chunks.setdefault(current_arch, []).append(line)
    names = sorted({f for lines in chunks.values() for f in parse_ptxas_log("\n".join(lines))})
    pretty = _demangle(names)
    for arch in archs:
        funcs = parse_ptxas_log("\n".join(chunks.get(arch, [])))
        entries = {f: s for f, s in funcs.items() if "registers" in s}
        if not entries:
            results.append(Result(kernel=source.name, variant="-", arch=arch, ok=True,
                                  notes=["no kernel entries reported by ptxas"]))
        for fname, stats in entries.items():
            label = _short_name(pretty.get(fname, fname))
            results.append(Result(
                kernel=source.name, variant=label, arch=arch, ok=True,
                registers=stats.get("registers"), stack=stats.get("stack", 0),
                spill_stores=stats.get("spill_stores", 0), spill_loads=stats.get("spill_loads", 0),
                shared=stats.get("smem", 0)))
    return results, None


# --------------------------------------------------------------------------- report
def format_table(results: list[Result]) -> str:
    head = ("kernel", "variant", "arch", "regs", "spill st/ld", "stack", "smem", "warps",
            "blocks/SM", "ld/st bits", "status")
    rows = []
    for r in results:
        status = "ok" if r.passed else ("FAIL: " + (r.error.splitlines()[0] if r.error else
                                                  "spills" if r.spills else
                                                  "stack frame" if r.stack else
                                                  f"< {r.min_blocks} blocks/SM"))
        rows.append((r.kernel, r.variant, f"sm_{r.arch}", _s(r.registers),
                     f"{_s(r.spill_stores)}/{_s(r.spill_loads)}", _s(r.stack), _s(r.shared),
                     _s(r.num_warps), _s(r.blocks_per_sm),
                     f"{_s(r.load_bits)}/{_s(r.store_bits)}", status))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _s(x) -> str:
    return "-" if x is None else str(x)


def run(archs: list[int], triton_kernels: bool = True, nvcc: bool = True,
        jobs: int = 1) -> dict:
    """Run the check; returns a JSON-able report with ``ok``."""
    report: dict = {"archs": archs, "triton": [], "nvcc": [], "skipped": {}}
    if triton_kernels:
        why = triton_available()
        if why:
            report["skipped"]["triton"] = why
        else:
            import triton
            report["triton_version"] = triton.__version__
            work = [(arch, v) for arch in archs for v in triton_variants()]
            if jobs > 1 and len(work) > 1:
                from concurrent.futures import ProcessPoolExecutor
                import multiprocessing as mp
                with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init) as pool:
                    futures = [pool.submit(_compile_index, arch, i) for arch, i in
                               ((arch, i) for arch in archs
                                for i in range(len(triton_variants())))]
                    report["triton"] = [f.result() for f in futures]
            else:
                report["triton"] = [compile_triton(arch, v) for arch, v in work]
    if nvcc:
        results, why = compile_nvcc(archs)
        report["nvcc"] = results
        if why:
            report["skipped"]["nvcc"] = why
    everything = report["triton"] + report["nvcc"]
    report["ok"] = all(r.passed for r in everything) and (
        "triton" not in report["skipped"] or not triton_kernels)
    return report


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_index(arch: int, index: int) -> Result:
    return compile_triton(arch, triton_variants()[index])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbw_kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help="comma-separated CUDA compute capabilities (default: 80,90)")
    parser.add_argument("--skip-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--skip-nvcc", action="store_true", help="skip the CUDA sources")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel Triton compiles (processes)")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.replace(" ", "").split(",") if a]
    report = run(archs, triton_kernels=not args.skip_triton, nvcc=not args.skip_nvcc,
                 jobs=args.jobs)
    if args.json:
        out = dict(report)
        out["triton"] = [dict(asdict(r), passed=r.passed) for r in report["triton"]]
        out["nvcc"] = [dict(asdict(r), passed=r.passed) for r in report["nvcc"]]
        print(json.dumps(out, indent=1))
    else:
        if report["triton"]:
            print(f"Triton {report.get('triton_version', '?')} kernels "
                  f"(lbw_kernels.triton_update / triton_finish):")
            print(format_table(report["triton"]))
        if report["nvcc"]:
            print(f"\nnvcc: {CUDA_SOURCE.relative_to(CUDA_SOURCE.parents[2])}:")
            print(format_table(report["nvcc"]))
        for what, why in report["skipped"].items():
            print(f"\n{what}: skipped ({why})")
        for r in report["triton"] + report["nvcc"]:
            if r.error:
                print(f"\n{r.kernel} [{r.variant}] sm_{r.arch}:\n{r.error}")
        print("\nOK" if report["ok"] else "\nFAILED")
    if "triton" in report["skipped"] and not args.skip_triton:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
