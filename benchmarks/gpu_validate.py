"""Validate FusedGuardedAdamW on one GPU in one command, and write what was measured.

    PYTHONPATH=. python -m benchmarks.gpu_validate                 # H100/H200: < 8 min
    PYTHONPATH=. python -m benchmarks.gpu_validate --quick         # smaller sizes, fewer reps
    PYTHONPATH=. python -m benchmarks.gpu_validate --sections steps,e2e --budget steps=300
    python -m benchmarks.gpu_validate --dry-run                    # no GPU: the logic on tiny CPU sizes

Sections, in order (``--sections`` picks some), each with a hard time budget (a section over
its budget is stopped, recorded as ``timeout`` with what it had measured, and the script goes
on; a section that raises is recorded as ``failed`` with its traceback):

- ``env``: device, driver, versions, free memory; starts building the C++ extensions (cpu,
  cuda) in background processes so that the later sections find them built;
- ``tests``: the test files whose CUDA variants skip without a GPU (tests/test_triton_backend.py,
  tests/test_cpp_backends.py, tests/test_optimizer.py): the ``gpu``-marked tests, then the
  ``cuda`` variants, then (full mode, time permitting) the rest of those files, with pass/fail
  counts and the failing test ids;
- ``correctness``: FusedGuardedAdamW on CUDA tensors against ``torch.optim.AdamW`` for every
  backend (triton, cuda, foreach, torch) and dtype (fp32, bf16, fp16), on aligned storage and on
  parameters and gradients that start one element into their storage (misaligned); the guard on
  CUDA tensors (a non-finite loss skips the step, NaN gradient elements are not written, a x1e4
  spike is bounded, everything stays finite);
- ``sync``: a guarded training loop (a small transformer on CUDA) for backends triton and cuda
  under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up that takes the guard past its
  own warm-up and its first snapshot: zero host syncs in the steady state, for the optimizer step
  alone and for the whole loop; any sync is reported with its Python stack (a second pass in
  ``warn`` mode collects every sync site);
- ``graph``: a guarded step captured in a CUDA graph (static grads and loss, warm-up on a side
  stream, ``torch.cuda.graph``), replayed as ``opt.before_replay(); g.replay(); opt.after_replay()``
  against the same steps run eagerly: params must match;
- ``steps``: step time at 1M, 16M, 1000x64K, 256M and 1B params, fp32 and bf16, for triton and
  cuda (guard None, guard default, max_grad_norm=1.0; telemetry is always on) against torch fused
  AdamW and torch fused + clip_grad_norm_: CUDA events, medians of interleaved repetitions, bytes
  per param for ours and torch's side by side, as a share of the copy bandwidth measured for the
  same bytes. Sizes that do not fit in memory are skipped, and the results say so;
- ``host``: host time per step over a Qwen2-shaped list of 290 small tensors, and top-level ops
  per step (torch.profiler) for 12 tensors in 2 groups;
- ``e2e``: a Qwen2.5-0.5B-shaped bf16-autocast training step (transformers ``Qwen2Config``,
  random init) with torch fused AdamW, FusedGuardedAdamW guard=None and guard="default",
  interleaved, median step times and the guard's overhead.

Results: ``benchmarks/results/cuda-<gpu>-<date>.json`` and ``.md`` next to it (rewritten after
every section, so an interrupted run keeps what it measured). ``--dry-run`` runs every section's
logic on tiny sizes (on the CPU without a GPU, with the CPU backends; sections that need CUDA say
"skipped: no CUDA") and writes to a temporary directory unless ``--out`` is given: it checks
imports and API drift, it measures nothing worth keeping.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import envinfo, roofline
from benchmarks import interleave as il

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_triton_backend.py", "tests/test_cpp_backends.py", "tests/test_optimizer.py")
TOTAL_BUDGET_S = 460.0  # the whole run on one H100, imports and writing included: under 8 minutes
GRACE_S = 5.0  # a section's hard stop comes this long after its budget


class SectionTimeout(BaseException):
    """Raised by the alarm when a section overruns its budget (BaseException: no section's
    ``except Exception`` swallows it)."""


class Skip(Exception):
    """A section that cannot run here (says why)."""


@dataclass
class Ctx:
    device: torch.device
    dry: bool
    quick: bool
    out_dir: Path
    doc: dict
    t0: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf
    section: str = ""
    notes: list = field(default_factory=list)
    builds: dict = field(default_factory=dict)
    status: str | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lbw-gpu-validate-logs-")))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def backends(self) -> list[str]:
        """Our backends that the timing sections measure."""
        return ["triton", "cuda"] if self.cuda else ["cpu"]

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {self.section}: {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.log(msg)

    def add(self, row: dict) -> dict:
        row = {"section": self.section, **row}
        self.doc["results"].append(row)
        return row


# ============================================================================ helpers
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # the guard's snapshots live in pinned host memory, which torch caches: give it back
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
            fn = getattr(torch._C, name, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
                break


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def quiet_build(**kw):
    """Build an optimizer variant with warnings (fallbacks are reported by ``il.build``) muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return il.build(**kw)


def start_build(ctx: Ctx, kind: str) -> None:
    """Build (or import) a C++ extension in a background process; the build cache is shared."""
    log = ctx.log_dir / f"build-{kind}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = f"from lbw_kernels.cpp_backend import load_cpp_module; load_cpp_module({kind!r}); print('built {kind}')"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    ctx.builds[kind] = {"proc": proc, "start": time.perf_counter(), "log": log}


def wait_build(ctx: Ctx, kind: str, max_wait: float) -> str | None:
    """None when the background build of ``kind`` finished well (or none was started), else why not."""
    b = ctx.builds.get(kind)
    if b is None:
        return None
    proc = b["proc"]
    try:
        proc.wait(timeout=max(0.0, max_wait))
    except subprocess.TimeoutExpired:
        return f"the {kind} extension is still building ({time.perf_counter() - b['start']:.0f} s so far)"
    b.setdefault("seconds", round(time.perf_counter() - b["start"], 1))
    if proc.returncode != 0:
        tail = b["log"].read_text()[-1500:] if b["log"].exists() else ""
        return f"building the {kind} extension failed (rc {proc.returncode}): {tail}"
    return None


def usable_backends(ctx: Ctx, names: list[str], wait: float = 0.0) -> list[str]:
    """The backends of ``names`` that load here (noting why the others do not)."""
    out = []
    for b in names:
        why = wait_build(ctx, b, wait) if b in ("cuda", "cpu") else None
        if why is None:
            why = il.backend_unavailable(b, ctx.device)
        if why:
            ctx.note(f"backend {b} not available: {why[:300]}")
        else:
            out.append(b)
    return out


# ============================================================================ sections
def sec_env(ctx: Ctx) -> None:
    d = ctx.doc["device"]
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info(ctx.device)
        d["free_gib_at_start"] = round(free / 2**30, 1)
        smi = envinfo.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                           "--format=csv,noheader"])
        d["nvidia_smi"] = smi
        ctx.log(f"{d['name']}, {gib(total)} ({gib(free)} free), CUDA {torch.version.cuda}, driver {d.get('driver')}")
        if not ctx.dry:
            for kind in ("cuda", "cpu"):
                start_build(ctx, kind)
            ctx.log("building the C++ extensions (cuda, cpu) in the background")
    else:
        ctx.log(f"{d['name']}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads (no CUDA: dry run)")
    try:
        import triton

        ctx.log(f"triton {triton.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    except Exception as exc:  # noqa: BLE001
        ctx.note(f"triton not importable: {exc}")


# ---------------------------------------------------------------------------- tests
_OUTCOME = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_COLLECTED = re.compile(r"(\d+) tests? collected")


def parse_pytest(text: str) -> dict:
    """Counts and failing ids from ``pytest -v`` output (a run cut short counts what it printed)."""
    counts: Counter = Counter()
    failed = []
    for line in text.splitlines():
        m = _OUTCOME.match(line.strip())
        if m:
            counts[m.group(2)] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    # errors in collection or teardown appear only in the summary lines
    for m in re.finditer(r"^(?:ERROR|FAILED) (\S+::\S+|\S+\.py)", text, re.M):
        if m.group(1) not in failed:
            failed.append(m.group(1))
    collected = _COLLECTED.search(text)
    return {"passed": counts["PASSED"], "failed": counts["FAILED"], "errors": counts["ERROR"] + (
        sum(1 for f in failed if f.endswith(".py"))), "skipped": counts["SKIPPED"], "xfail": counts["XFAIL"],
        "xpass": counts["XPASS"], "failed_tests": failed,
        "collected": int(collected.group(1)) if collected else None}


def pytest_run(ctx: Ctx, name: str, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--no-header", "-rfE", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = ctx.log_dir / f"pytest-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
    t0 = time.perf_counter()
    status = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
        finally:
            if proc.poll() is None:  # timed out, or the section's alarm interrupted the wait
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    text = log.read_text(errors="replace")
    res = parse_pytest(text)
    if status is None:
        status = {0: "passed", 5: "nothing collected"}.get(rc, "failed" if rc == 1 else f"error (rc {rc})")
    row = ctx.add({"group": "tests", "name": name, "status": status, "rc": rc,
                   "seconds": round(time.perf_counter() - t0, 1),
                   "command": "pytest " + " ".join(a for a in args), **res, "log": str(log), "tail": text[-2500:]})
    ctx.log(f"{name}: {status}, {res['passed']} passed, {res['failed']} failed, {res['errors']} errors, "
            f"{res['skipped']} skipped in {row['seconds']} s")
    return row


def sec_tests(ctx: Ctx) -> None:
    files = list(TEST_FILES)
    if ctx.dry or not ctx.cuda:
        row = pytest_run(ctx, "collect only", ["--collect-only", "-q", *files], min(60.0, ctx.left()))
        ctx.status = "skipped"
        raise Skip(("no CUDA: " if not ctx.cuda else "dry run: ") +
                   f"collected the GPU test files only ({row['collected']} tests), to catch import errors")
    runs = [("gpu-marked", ["-v", "-m", "gpu", *files], False),
            ("cuda variants", ["-v", "-m", "not gpu", "-k", "cuda", *files], True),
            ("rest of the files", ["-v", "-m", "not gpu", "-k", "not cuda", *files], False)]
    if ctx.quick:
        runs = runs[:2]
    bad = 0
    for name, args, needs_build in runs:
        if ctx.left() < 15:
            ctx.note(f"not run for lack of time: {name}")
            ctx.status = "partial"
            continue
        if needs_build:
            why = wait_build(ctx, "cuda", ctx.left() - 60)
            if why:
                ctx.note(why[:300])
        row = pytest_run(ctx, name, args, ctx.left() - 3)
        bad += row["failed"] + row["errors"] + (row["status"] == "timeout")
    if bad:
        ctx.status = "failed"


# ---------------------------------------------------------------------------- correctness
def _place(values: list[torch.Tensor], dtype, offset: int) -> list[torch.Tensor]:
    """Copies of ``values`` in ``dtype`` laid out in one buffer, each starting ``offset``
    elements after the previous one ends (offset 1: every tensor misaligned)."""
    if offset == 0:
        return [v.to(dtype).clone() for v in values]
    total = sum(v.numel() + offset for v in values)
    buf = torch.empty(total, dtype=dtype, device=values[0].device)
    out, pos = [], offset
    for v in values:
        view = buf[pos:pos + v.numel()].view(v.shape)
        view.copy_(v.to(dtype))
        out.append(view)
        pos += v.numel() + offset
    return out


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]


def compare_with_adamw(backend: str, dtype, offset: int, shapes, steps: int, device) -> dict:
    """Max over elements of |ours - ref| / (|ref| + max|ref|) after ``steps`` steps, guard None.
    The reference is fp32 torch.optim.AdamW whose params are rounded to ``dtype`` each step."""
    from lbw_guard import FusedGuardedAdamW

    gen = torch.Generator(device=device).manual_seed(0)
    init = [torch.randn(s, generator=gen, device=device) for s in shapes]
    ours = [torch.nn.Parameter(t) for t in _place(init, dtype, offset)]
    ref = [t.to(dtype).float().clone().requires_grad_() for t in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FusedGuardedAdamW(_groups(ours), lr=1e-3, guard=None, backend=backend)
    if opt.backend_name != backend:
        raise il.Unavailable(f"backend {backend!r} fell back to {opt.backend_name!r}")
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, device=device) for s in shapes]
        for p, g in zip(ours, _place(grads, dtype, offset)):
            p.grad = g
        for q, g in zip(ref, grads):
            q.grad = g.to(dtype).float()
        opt.step()
        ref_opt.step()
        if dtype != torch.float32:
            with torch.no_grad():
                for q in ref:
                    q.copy_(q.to(dtype).float())
    err = 0.0
    for p, q in zip(ours, ref):
        a, e = p.detach().double(), q.detach().double()
        scale = e.abs().max().clamp_min(1e-30)
        err = max(err, float(((a - e).abs() / (e.abs() + scale)).max()))
    return {"max_err": err, "storage_offset_elems": offset,
            "misaligned": any(p.data_ptr() % 16 for p in ours)}


def guard_on_device(backend: str, device) -> list[dict]:
    """The guard on ``device``: checks that need no knowledge of its thresholds."""
    from lbw_guard import FusedGuardedAdamW

    gen = torch.Generator(device=device).manual_seed(1)
    shapes = [(128, 96), (96,), (4097,), (64, 64)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FusedGuardedAdamW(params, lr=1e-3, guard="default", backend=backend)
    rows = []

    def grads(scale=1e-2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device) * scale

    for i in range(30):
        grads()
        opt.step(loss=torch.full((), 2.0 - 0.01 * i, device=device))
    base = dict(backend=backend, dtype="fp32", storage="aligned", guard="default")

    before = [p.detach().clone() for p in params]
    grads()
    opt.step(loss=torch.full((), math.inf, device=device))
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    skipped = bool(opt.step_was_skipped)
    rows.append({**base, "steps": opt.num_steps, "ok": unchanged and skipped,
                 "note": f"loss=inf: step skipped on the device={skipped}, params unchanged={unchanged}"})

    grads()
    nan_mask = torch.zeros(shapes[0], dtype=torch.bool, device=device)
    nan_mask[::7, ::5] = True
    params[0].grad[nan_mask] = math.nan
    before = params[0].detach().clone()
    opt.step(loss=torch.full((), 1.7, device=device))
    kept = torch.equal(before[nan_mask], params[0].detach()[nan_mask])
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    nonfinite = opt.telemetry.to_dict()["nonfinite"]
    rows.append({**base, "steps": opt.num_steps, "ok": kept and finite,
                 "note": f"NaN grad elements: not written={kept}, params finite={finite}, telemetry nonfinite={nonfinite}"})

    grads()
    params[2].grad[:100] *= 1e4
    before = params[2].detach().clone()
    opt.step(loss=torch.full((), 1.69, device=device))
    move = float((params[2].detach() - before).abs().max())
    spikes = opt.telemetry.to_dict()["spikes"]
    for _ in range(5):
        grads()
        opt.step(loss=torch.full((), 1.68, device=device))
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    bounded = move < 0.1  # lr 1e-3: an unbounded spike moves by ~lr too, but never by 1e-1
    rows.append({**base, "steps": opt.num_steps, "ok": finite and bounded and sum(spikes) > 0,
                 "note": f"x1e4 spike: {int(sum(spikes))} elements over the bound, max |dp| {move:.2e}, "
                         f"finite after 5 more steps={finite}, regime {opt.guard.regime}"})
    return rows


def sec_correctness(ctx: Ctx) -> None:
    if ctx.cuda:
        names = usable_backends(ctx, ["triton", "cuda", "foreach", "torch"], wait=max(0.0, ctx.left() - 25))
        shapes = [(1,), (3,), (64, 67), (4097,), (300, 501), ((1 << 20) + 3,)]
    else:
        names = usable_backends(ctx, ["cpu", "foreach", "torch"])
        shapes = [(1,), (3,), (64, 67), (4097,)]
    steps = 3 if ctx.dry else 6 if ctx.quick else 10
    tols = {"fp32": 1e-5, "bf16": 8e-3, "fp16": 1e-3}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    failures = 0
    for b in names:
        for dn, dtype in dtypes.items():
            for storage, offset in (("aligned", 0), ("offset+1", 1)):
                if ctx.left() < 3:
                    ctx.note("out of time: remaining correctness checks not run")
                    ctx.status = "partial"
                    return
                row = {"group": "correctness", "backend": b, "dtype": dn, "storage": storage, "guard": "None",
                       "steps": steps, "tol": tols[dn]}
                try:
                    res = compare_with_adamw(b, dtype, offset, shapes, steps, ctx.device)
                    row.update(res, ok=res["max_err"] <= tols[dn])
                except il.Unavailable as exc:
                    row.update(ok=None, note=str(exc))
                except Exception as exc:  # noqa: BLE001 - recorded, the matrix goes on
                    row.update(ok=False, note=f"{type(exc).__name__}: {exc}"[:500],
                               traceback=traceback.format_exc()[-3000:])
                failures += row["ok"] is False
                ctx.add(row)
        ctx.log(f"{b}: " + ", ".join(f"{r['dtype']}/{r['storage']} {fmt_err(r)}"
                                     for r in ctx.doc["results"] if r.get("group") == "correctness"
                                     and r.get("backend") == b and r.get("guard") == "None"))
    for b in [n for n in names if n in ("triton", "cuda", "cpu")]:
        try:
            for r in guard_on_device(b, ctx.device):
                failures += r["ok"] is False
                ctx.add({"group": "correctness", **r})
                ctx.log(f"guard {b}: {'ok' if r['ok'] else 'FAILED'}: {r['note']}")
        except Exception as exc:  # noqa: BLE001
            failures += 1
            ctx.add({"group": "correctness", "backend": b, "dtype": "fp32", "storage": "aligned", "guard": "default",
                     "ok": False, "note": f"{type(exc).__name__}: {exc}"[:500],
                     "traceback": traceback.format_exc()[-3000:]})
    if failures:
        ctx.status = "failed"


def fmt_err(r: dict) -> str:
    if r.get("ok") is None:
        return "n/a"
    return f"{r.get('max_err', float('nan')):.1e}{'' if r['ok'] else ' FAIL'}"


# ---------------------------------------------------------------------------- sync
class TinyTransformer(torch.nn.Module):
    """Two pre-norm blocks (SDPA attention, GELU MLP) on float inputs: nothing in it syncs."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.inp = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict({
                "n1": torch.nn.LayerNorm(d), "qkv": torch.nn.Linear(d, 3 * d), "o": torch.nn.Linear(d, d),
                "n2": torch.nn.LayerNorm(d), "up": torch.nn.Linear(d, 4 * d), "down": torch.nn.Linear(4 * d, d)}))
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        x = self.inp(x)
        B, T, D = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
            a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2), is_causal=True)
            x = x + blk["o"](a.transpose(1, 2).reshape(B, T, D))
            x = x + blk["down"](torch.nn.functional.gelu(blk["up"](blk["n2"](x))))
        return self.out(x)


def collect_syncs(fn, n: int) -> list[dict]:
    """Every host sync torch reports in ``warn`` mode while ``fn`` runs ``n`` times, with stacks."""
    sites: dict[str, dict] = {}

    def hook(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=14)[:-1])
        key = f"{message}"[:200] + "|" + stack[-400:]
        s = sites.setdefault(key, {"message": str(message)[:300], "count": 0, "stack": stack[-2500:]})
        s["count"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return list(sites.values())


def run_error_mode(fn, n: int) -> str | None:
    """None if ``n`` calls of ``fn`` run under set_sync_debug_mode("error"), else the traceback."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            fn()
        return None
    except RuntimeError:
        return traceback.format_exc()[-4000:]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def sec_sync(ctx: Ctx) -> None:
    from lbw_guard import FusedGuardedAdamW

    names = usable_backends(ctx, ctx.backends, wait=max(0.0, ctx.left() - 20))
    warmup, steady = (3, 3) if ctx.dry else (30, 25 if ctx.quick else 40)
    bad = 0
    for b in names:
        torch.manual_seed(0)
        model = TinyTransformer().to(ctx.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = FusedGuardedAdamW(model.parameters(), lr=1e-3, guard="default", backend=b)
        from benchmarks.op_count import snapshot_counter

        snaps = snapshot_counter(opt)
        x = torch.randn(8, 64, 128, device=ctx.device)
        y = torch.randn(8, 64, 128, device=ctx.device)
        state = {}

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            state["loss"] = loss.detach()

        def step():
            opt.step(loss=state["loss"])

        def loop():
            fwd_bwd()
            step()

        for _ in range(warmup):
            loop()
        sync(ctx.device)
        row = {"group": "sync-check", "backend": b, "model": "tiny transformer 2x128, batch 8x64",
               "warmup": warmup, "steps": steady, "regime": opt.guard.regime}
        if not ctx.cuda:
            for _ in range(steady):
                loop()
            row.update(ok=None, syncs=None, first_sync="-", note="CPU dry run: the loop ran; the sync check needs CUDA")
            ctx.add(row)
            continue
        s0 = snaps[0]
        # 1. the optimizer step alone, error mode (forward/backward outside the check)
        step_errors = []
        for _ in range(steady):
            fwd_bwd()
            tb = run_error_mode(step, 1)
            if tb:
                step_errors.append(tb)
                break
        # 2. the whole loop, error mode
        loop_error = run_error_mode(loop, steady)
        # 3. warn mode: every sync site, step alone and whole loop
        step_sites = []
        for _ in range(steady // 2):
            fwd_bwd()
            step_sites += collect_syncs(step, 1)
        loop_sites = collect_syncs(loop, steady // 2)
        syncs = sum(s["count"] for s in step_sites)
        first = step_errors[0] if step_errors else (loop_error or "-")
        ok = not step_errors and loop_error is None and syncs == 0
        bad += not ok
        try:
            ra = row["run_ahead"] = run_ahead(ctx.device, model, opt, fwd_bwd, step)
            row["run_ahead_text"] = ", ".join(
                f"{k.replace('_', ' ')}: {v['host_ms']:g} ms for 5 steps while the GPU is busy {v['gpu_busy_ms']:g} ms"
                + (" (waited)" if v["waited"] else "") for k, v in ra.items())
        except Exception as exc:  # noqa: BLE001 - informational
            row["run_ahead_text"] = f"not measured: {type(exc).__name__}: {exc}"[:300]
        row.update(ok=ok, syncs=syncs, loop_syncs=sum(s["count"] for s in loop_sites), error_mode_step=not step_errors,
                   error_mode_loop=loop_error is None, first_sync=first if first == "-" else first[-1500:],
                   sync_sites_step=step_sites[:5], sync_sites_loop=loop_sites[:5], snapshots_in_window=snaps[0] - s0,
                   regime_after=opt.guard.regime)
        ctx.add(row)
        ctx.log(f"{b}: step syncs {syncs}, loop syncs {row['loop_syncs']}, error mode step/loop "
                f"{row['error_mode_step']}/{row['error_mode_loop']}, snapshots in window {row['snapshots_in_window']}; "
                f"{row['run_ahead_text']}")
        state.clear()
        free_memory()
    if not ctx.cuda:
        ctx.status = "skipped"
        raise Skip("no CUDA: the guarded loop ran on the CPU; the sync check needs CUDA")
    if bad:
        ctx.status = "failed"


def run_ahead(device, model, guarded, fwd_bwd, step, n: int = 5) -> dict:
    """How far the host runs ahead of a busy GPU: while the GPU sleeps ~0.2 s, the host issues
    ``n`` optimizer steps (guarded, then an unguarded optimizer of the same model). Syncs that
    the debug mode does not report (an event wait) show here: a step that waits for the GPU
    takes as long as the sleep. The guard reads the record of ``lag`` steps ago, so a guarded
    host can run at most about ``lag`` steps ahead; an unguarded one never waits."""
    from lbw_guard import FusedGuardedAdamW

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FusedGuardedAdamW(model.parameters(), lr=1e-3, guard=None, backend=guarded.backend_name)
    fwd_bwd()
    plain.step()
    for name, fn in (("guard", step), ("no_guard", plain.step)):
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(int(4e8))  # ~0.2-0.3 s at 1.5-2 GHz
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        sync(device)
        out[name] = {"host_ms": round(host_ms, 2), "gpu_busy_ms": round(start.elapsed_time(end), 1),
                     "waited": host_ms > 0.5 * start.elapsed_time(end)}
    return out


# ---------------------------------------------------------------------------- graph
def graph_check(backend: str, dtype, device, warm: int, replays: int) -> dict:
    """Eager steps vs the same steps replayed from a captured guarded step."""
    from lbw_guard import FusedGuardedAdamW

    shapes = [(256, 256), (256,), (1000, 64), (4097,), (64, 3, 3, 3)]
    gen = torch.Generator(device=device).manual_seed(3)
    init = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    total = warm + replays
    grads = [[(torch.randn(s, generator=gen, device=device) * 1e-2).to(dtype) for s in shapes] for _ in range(total)]
    losses = [torch.full((), 3.0 - 0.01 * i, device=device) for i in range(total)]

    def make():
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ps, FusedGuardedAdamW(_groups(ps), lr=1e-3, guard="default", backend=backend)

    pe, oe = make()
    for i in range(total):
        for p, g in zip(pe, grads[i]):
            p.grad = g.clone()
        oe.step(loss=losses[i])

    pg, og = make()
    for p in pg:
        p.grad = torch.zeros_like(p)
    static_loss = torch.zeros((), device=device)

    def load(i):
        for p, g in zip(pg, grads[i]):
            p.grad.copy_(g)
        static_loss.copy_(losses[i])

    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warm):
            load(i)
            og.step(loss=static_loss)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step(loss=static_loss)
    for i in range(warm, total):
        load(i)
        og.before_replay()
        graph.replay()
        og.after_replay()
    sync(device)
    err = 0.0
    exact = True
    for a, b in zip(pg, pe):
        exact &= torch.equal(a.detach(), b.detach())
        scale = b.detach().double().abs().max().clamp_min(1e-30)
        err = max(err, float((a.detach().double() - b.detach().double()).abs().max() / scale))
    return {"max_err": err, "bit_identical": exact, "num_steps": (og.num_steps, oe.num_steps),
            "regime": (og.guard.regime, oe.guard.regime), "scale": (og.guard.scale, oe.guard.scale)}


def sec_graph(ctx: Ctx) -> None:
    if not ctx.cuda:
        ctx.status = "skipped"
        raise Skip("no CUDA: CUDA-graph capture needs a GPU")
    names = usable_backends(ctx, ctx.backends, wait=max(0.0, ctx.left() - 15))
    warm, replays = 3, 15 if ctx.quick or ctx.dry else 40
    bad = 0
    for b in names:
        for dn, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            row = {"group": "graph-check", "backend": b, "dtype": dn, "replays": replays, "warmup": warm, "tol": 1e-6}
            try:
                res = graph_check(b, dtype, ctx.device, warm, replays)
                row.update(res, ok=res["max_err"] <= 1e-6 and res["num_steps"][0] == res["num_steps"][1],
                           note=f"bit-identical={res['bit_identical']}, steps {res['num_steps']}, regime {res['regime']}")
            except Exception as exc:  # noqa: BLE001
                row.update(ok=False, note=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-3000:])
            bad += row["ok"] is False
            ctx.add(row)
            ctx.log(f"{b} {dn}: {'ok' if row['ok'] else 'FAILED'}: {row.get('note')}")
            free_memory()
    if bad:
        ctx.status = "failed"


# ---------------------------------------------------------------------------- steps
SIZES = {"1M": (1, 1 << 20), "16M": (1, 1 << 24), "1000x64K": (1000, 1 << 16), "256M": (16, 1 << 24),
         "1B": (64, 1 << 24)}
DRY_SIZES = {"64K": (1, 1 << 16), "16x4K": (16, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def state_bytes(v: il.Variant, numel: int, dtype) -> int:
    """Optimizer state of a variant: ours fp32 moments; torch's in the parameter dtype."""
    return numel * (8 if v.impl == "lbw" else 2 * roofline.itemsize(dtype))


def plan_groups(variants: list[str], numel: int, dtype, free: int) -> tuple[list[list[str]], bool, str | None]:
    """Variant groups that fit in ``free`` bytes (each with the torch baselines), whether params
    are shared between the variants of a group, and why nothing fits (or None)."""
    s = roofline.itemsize(dtype)
    pg = 2 * numel * s
    parsed = {n: il.Variant.parse(n) for n in variants}
    budget = 0.8 * free - (4 << 30 if free > (16 << 30) else 0)  # headroom: workspaces, copy buffers

    def need(group, share):
        states = sum(state_bytes(parsed[n], numel, dtype) for n in group)
        return states + (pg if share else pg * len(group))

    def fit(group):
        if need(group, False) <= 0.25 * budget:
            return False  # small: every variant on its own tensors (no cache sharing between them)
        return True if need(group, True) <= budget else None

    share = fit(variants)
    if share is not None:
        return [variants], share, None
    base = [n for n in variants if parsed[n].impl == "torch"]
    backends = list(dict.fromkeys(parsed[n].backend for n in variants if parsed[n].impl == "lbw"))
    groups = [base + [n for n in variants if parsed[n].impl == "lbw" and parsed[n].backend == b] for b in backends]
    if all(fit(g) is not None for g in groups):
        return groups, True, None
    return [], True, f"needs {gib(need(groups[0] if groups else variants, True))} per group, {gib(free)} free"


def copy_ms(device, nbytes: float, cap: int, reps: int) -> tuple[float, float]:
    """(ms to move ``nbytes`` with copy_, bytes actually moved in the measurement): a copy of
    nbytes/2 (read + write = nbytes), capped at ``cap`` moved and scaled linearly beyond."""
    moved = int(min(nbytes, cap)) // 8 * 8
    n = max(1, moved // 8)
    src = torch.ones(n, device=device)
    dst = torch.empty(n, device=device)
    res = il.interleave({"copy": lambda: dst.copy_(src)}, device, reps=reps, warmup=3,
                        min_rep_s=1e-3 if device.type == "cuda" else 0)
    return res["copy"]["ms_per_step"] * (nbytes / (n * 8)), n * 8


def measure_size(ctx: Ctx, case: str, count: int, numel_each: int, dn: str, variants: list[str]) -> None:
    dtype = DTYPES[dn]
    numel = count * numel_each
    free_memory()
    groups, share, why = plan_groups(variants, numel, dtype, free_bytes(ctx.device))
    if why:
        msg = f"{case} {dn}: skipped, does not fit in memory ({why})"
        ctx.doc.setdefault("skipped_sizes", []).append(msg)
        ctx.note(msg)
        return
    reps = 3 if ctx.dry else 6 if ctx.quick else 15
    warmup = 2 if ctx.dry else 5 if ctx.quick else 25
    from benchmarks.common import Spy

    rows = []
    for group in groups:
        if ctx.left() < 10:
            ctx.note(f"{case} {dn}: out of time before group {group}")
            ctx.status = "partial"
            break
        t0 = time.perf_counter()
        base = il.make_params(count, numel_each, ctx.device, dtype) if share else None
        steps, spies, opts = {}, {}, {}
        for i, v in enumerate(group):
            params = base if share else il.make_params(count, numel_each, ctx.device, dtype, seed=i)
            try:
                opts[v], steps[v] = quiet_build(variant=v, params=params)
                if v.startswith("lbw"):
                    spies[v] = Spy(opts[v])
            except il.Unavailable as exc:
                rows.append({"group": "optimizer-step", "case": case, "dtype": dn, "skipped": str(exc),
                             **il.Variant.parse(v).fields()})
        deadline = time.perf_counter() + max(5.0, ctx.left() - 15)
        res = il.interleave(steps, ctx.device, reps=reps, warmup=warmup,
                            min_rep_s=2e-3 if ctx.cuda else 0.0, deadline=deadline)
        fused = res.get("torch-fused")
        fused_clip = res.get("torch-fused+clip")
        for v, r in res.items():
            var = il.Variant.parse(v)
            if var.impl == "lbw":
                prepass = spies[v].prepass_per_step()
                bpp = roofline.lbw_bytes_per_param(dtype, prepass=prepass)
                extra = {"prepass_per_step": prepass, **spies[v].guard_fields()}
            else:
                bpp = roofline.torch_adamw_bytes_per_param(dtype, clip=var.clip)
                extra = {}
            rows.append({"group": "optimizer-step", "case": case, "numel": numel, "tensors": count, "dtype": dn,
                         **var.fields(), **il.drop_samples(r), "bytes_per_param": bpp,
                         "torch_bytes_per_param": roofline.torch_adamw_bytes_per_param(dtype, clip=var.clip),
                         "lbw_bytes_per_param": roofline.lbw_bytes_per_param(dtype, prepass=1 if var.clip else 0),
                         "gbps": roofline.gbps(bpp, numel, r["ms_per_step"]),
                         "fused_ms_in_group": fused["ms_per_step"] if fused else None,
                         "fused_clip_ms_in_group": fused_clip["ms_per_step"] if fused_clip else None,
                         "shared_params": share, "interleaved_with": group, **extra})
        ctx.log(f"{case} {dn} [{', '.join(group)}]: " + ", ".join(
            f"{v} {r['ms_per_step']:.3g}" for v, r in res.items()) + f" ms ({time.perf_counter() - t0:.1f} s)")
        del steps, spies, opts, base, res
        free_memory()
    # the roofline: copy_ of the same bytes, after the optimizers are gone
    cap = (4 << 30) if ctx.cuda else (256 << 20)
    cache = {}
    for r in rows:
        if "ms_per_step" not in r:
            continue
        nbytes = r["bytes_per_param"] * numel
        if nbytes not in cache:
            cache[nbytes] = copy_ms(ctx.device, nbytes, cap, 5 if ctx.dry else 10)
        ms, moved = cache[nbytes]
        r.update(roofline_ms=ms, copy_bytes_measured=moved, pct_copy=100.0 * ms / r["ms_per_step"])
    for r in rows:
        ctx.add(r)


def sec_steps(ctx: Ctx) -> None:
    sizes = DRY_SIZES if ctx.dry else {k: v for k, v in SIZES.items() if not (ctx.quick and k == "1B")}
    names = usable_backends(ctx, ctx.backends, wait=max(0.0, min(60.0, ctx.left() - 30)))
    if not names:
        raise RuntimeError("none of our backends is available: " + "; ".join(ctx.notes[-2:]))
    variants = ["torch-fused", "torch-fused+clip"] + [f"lbw-{b}{x}" for b in names for x in ("", "+guard", "+clip")]
    # the device's copy bandwidth (a big copy), for the header
    big = (2 << 30) if ctx.cuda else (64 << 20)
    ms, moved = copy_ms(ctx.device, big, big, 5 if ctx.dry else 10)
    ctx.doc["copy_gbps"] = big / (ms * 1e-3) / 1e9
    ctx.log(f"copy_ bandwidth {ctx.doc['copy_gbps']:.0f} GB/s ({gib(big)} moved)")
    for case, (count, each) in sizes.items():
        for dn in DTYPES:
            if ctx.left() < 12:
                msg = f"{case} {dn}: not measured, out of time"
                ctx.doc.setdefault("skipped_sizes", []).append(msg)
                ctx.note(msg)
                ctx.status = "partial"
                continue
            measure_size(ctx, case, count, each, dn, variants)


# ---------------------------------------------------------------------------- host
def sec_host(ctx: Ctx) -> None:
    from benchmarks import cpu_targets, op_count

    if not ctx.cuda:
        for r in cpu_targets.measure_host_time(quick=True, backend="cpu", log=ctx.log):
            ctx.add(r)
        rows = op_count.measure(ctx.device, ["cpu"], steps=3, warmup=3)
        for r in rows:
            ctx.add(r)
        return
    names = usable_backends(ctx, ctx.backends, wait=0.0)
    shapes = il.transformer_like_shapes(layers=24, hidden=64, vocab=1024)
    numel = sum(torch.Size(s).numel() for s in shapes)
    steps = {}
    loss = torch.full((), 2.5, device=ctx.device)
    for i, v in enumerate(["torch-fused"] + [f"lbw-{b}{x}" for b in names for x in ("", "+guard")]):
        params = il.make_params(0, 0, ctx.device, seed=i, shapes=shapes)
        try:
            _, steps[v] = quiet_build(variant=v, params=params, loss=loss)
        except il.Unavailable as exc:
            ctx.add({"group": "host-time", "case": "qwen-like-290", "skipped": str(exc), **il.Variant.parse(v).fields()})
    res = il.interleave(steps, ctx.device, reps=40 if ctx.quick else 100, warmup=25, min_rep_s=0.0,
                        deadline=time.perf_counter() + max(3.0, ctx.left() - 10))
    for v, r in res.items():
        ctx.add({"group": "host-time", "case": "qwen-like-290", "tensors": len(shapes), "numel": numel,
                 **il.Variant.parse(v).fields(), "host_ms": r["host_ms_per_step"], "device_ms": r["ms_per_step"],
                 "wall_ms": None, "reps": r["reps"]})
    ctx.log("host ms/step: " + ", ".join(f"{v} {r['host_ms_per_step']:.3f}" for v, r in res.items()))
    if ctx.left() > 5:
        for r in op_count.measure(ctx.device, names + ["foreach"], steps=10, warmup=25):
            ctx.add(r)


# ---------------------------------------------------------------------------- e2e
QWEN = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
QWEN_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6)


def qwen_model(spec: dict, device: torch.device):
    """A randomly initialised Qwen2 causal LM of shape ``spec`` (QWEN or QWEN_TINY) on ``device``."""
    import transformers

    cfg = transformers.Qwen2Config(max_position_embeddings=4096, **spec)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.Qwen2ForCausalLM(cfg)


def sec_e2e(ctx: Ctx) -> None:
    from benchmarks.common import Spy
    from lbw_guard import FusedGuardedAdamW

    if ctx.dry:
        spec, name, shapes = QWEN_TINY, "qwen2-tiny (dry run)", [(2, 32)]
    else:
        spec, name, shapes = QWEN, "qwen2.5-0.5b-shape", [(4, 1024), (2, 1024), (1, 1024)]
    model = qwen_model(spec, ctx.device)
    cfg = model.config
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    ctx.log(f"{name}: {n_params / 1e6:.3g}M params (fp32 master weights, bf16 autocast on CUDA)")
    opts = {"torch-fused": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts["lbw"] = FusedGuardedAdamW(params, lr=1e-5, weight_decay=0.01, guard=None)
        opts["lbw+guard"] = FusedGuardedAdamW(params, lr=1e-5, weight_decay=0.01, guard="default")
    spy = Spy(opts["lbw+guard"])
    # Single steps of a ~140 ms training step vary by tens of ms on the H100 (10 reps gave a
    # guard overhead of +1% in one run and +15% in the next): 30 reps make the median hold.
    reps = 2 if ctx.dry else 5 if ctx.quick else 30
    warmup = 1 if ctx.dry else 5 if ctx.quick else 22
    for batch, seq in shapes:
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=ctx.device)

        def make_step(opt, ours):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
                    loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                if ours:
                    opt.step(loss=loss.detach())
                else:
                    opt.step()
            return step

        steps = {k: make_step(o, k != "torch-fused") for k, o in opts.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = il.interleave(steps, ctx.device, reps=reps, warmup=warmup,
                                    deadline=time.perf_counter() + max(5.0, ctx.left() - 8), min_reps=2)
        except torch.cuda.OutOfMemoryError:
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            steps = None
            free_memory()
            ctx.note(f"batch {batch}x{seq} does not fit: out of memory; trying a smaller batch")
            continue
        for v, r in res.items():
            ctx.add({"group": "end-to-end", "case": name, "dtype": "bf16-autocast" if ctx.cuda else "fp32",
                     "variant": v, **il.drop_samples(r), "batch": batch, "seq": seq, "params_m": n_params / 1e6,
                     "backend": getattr(opts[v], "backend_name", "fused"),
                     **(spy.guard_fields() if v == "lbw+guard" else {})})
        g, u, f = (res[k]["ms_per_step"] for k in ("lbw+guard", "lbw", "torch-fused"))
        ctx.log(f"batch {batch}x{seq}: torch fused {f:.1f} ms, lbw {u:.1f} ms, lbw+guard {g:.1f} ms: guard "
                f"{100 * (g / u - 1):+.2f}% vs lbw, {100 * (g / f - 1):+.2f}% vs torch fused "
                f"({spy.snapshots} snapshots, regime {opts['lbw+guard'].guard.regime})")
        if warmup < 21:
            ctx.note("the guard was still in its warm-up (20 records) during the timed steps: no snapshots")
        break
    else:
        raise RuntimeError("no batch size fits in memory")


# ============================================================================ driver
SECTIONS = {  # name: (function, budget full, budget quick, budget dry run), seconds
    "env": (sec_env, 10, 10, 10),
    "tests": (sec_tests, 130, 90, 40),
    "correctness": (sec_correctness, 35, 25, 25),
    "sync": (sec_sync, 30, 20, 15),
    "graph": (sec_graph, 25, 20, 10),
    "steps": (sec_steps, 120, 60, 25),
    "host": (sec_host, 25, 15, 25),
    "e2e": (sec_e2e, 75, 45, 40),
}


def _alarm(signum, frame):
    raise SectionTimeout()


def run_section(ctx: Ctx, name: str, budget: float) -> dict:
    fn = SECTIONS[name][0]
    ctx.section, ctx.status, ctx.notes = name, None, []
    start = time.perf_counter()
    ctx.deadline = start + budget
    info = {"budget_s": round(budget, 1)}
    ctx.log(f"start (budget {budget:.0f} s)")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + GRACE_S)
    try:
        fn(ctx)
        info["status"] = ctx.status or "ok"
    except SectionTimeout:
        info["status"] = "timeout"
        info["traceback"] = traceback.format_exc()[-3000:]
    except Skip as exc:
        info["status"] = ctx.status or "skipped"
        ctx.notes.insert(0, f"skipped: {exc}" if info["status"] == "skipped" else str(exc))
    except Exception:  # noqa: BLE001 - recorded; the next section runs
        info["status"] = "failed"
        info["traceback"] = traceback.format_exc()[-6000:]
        print(info["traceback"], file=sys.stderr, flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
        with contextlib.suppress(Exception):
            sync(ctx.device)
        free_memory()
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["note"] = " | ".join(ctx.notes)[:2000]
    ctx.log(f"{info['status']} in {info['seconds']} s")
    return info


def results_paths(ctx: Ctx) -> tuple[Path, Path]:
    info = ctx.doc["device"]
    slug = ("dryrun-" if ctx.dry else "") + ("cuda-" + envinfo.device_slug(info) if info["type"] == "cuda" else "cpu")
    suffix = "-quick" if ctx.quick and not ctx.dry else ""
    base = ctx.out_dir / f"{slug}-{ctx.doc['date']}{suffix}"
    return base.with_suffix(".json"), base.with_suffix(".md")


def write(ctx: Ctx) -> tuple[Path, Path]:
    from benchmarks import render

    ctx.doc["load_avg"]["end"] = envinfo.loadavg()
    ctx.doc["wall_s"] = round(time.perf_counter() - ctx.t0, 1)
    builds = {k: {"seconds": b.get("seconds"), "rc": b["proc"].poll()} for k, b in ctx.builds.items()}
    ctx.doc["builds"] = builds
    js, md = results_paths(ctx)
    js.write_text(json.dumps(ctx.doc, indent=1, default=str) + "\n")
    md.write_text(render.render_markdown(ctx.doc) + "\n")
    return js, md


def parse_budgets(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            if name not in SECTIONS:
                raise ValueError
            out[name] = float(value)
            if not (math.isfinite(out[name]) and out[name] > 0):
                raise ValueError
        except ValueError:
            raise SystemExit(f"--budget expects SECTION=SECONDS (seconds > 0) with SECTION in {list(SECTIONS)}, "
                             f"got {item!r}") from None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_validate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (no 1B), fewer repetitions, shorter budgets")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; on the CPU without a GPU; checks the logic only")
    ap.add_argument("--sections", default="", help=f"comma list of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--out", type=Path, help="results directory (default: benchmarks/results; a temporary "
                                             "directory for --dry-run)")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS", help="a section's budget")
    ap.add_argument("--note", default="", help="free text kept in the results file")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.total_budget) and args.total_budget > 0):
        ap.error(f"--total-budget must be a number of seconds > 0, got {args.total_budget}")

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_validate: no CUDA device here. Run it on the GPU machine, or use --dry-run to check the "
              "logic on tiny CPU sizes.", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    budgets = parse_budgets(args.budget)
    device = torch.device("cuda" if cuda else "cpu")
    if args.dry_run and not cuda:
        # One thread: on a shared CPU, OpenMP regions of two threads stall for tens of ms when
        # a core is taken by another job, and the dry run must stay fast.
        torch.set_num_threads(1)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="lbw-gpu-validate-")) if args.dry_run else envinfo.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    doc = {"schema": 2, "kind": "gpu-validate", "mode": mode, **envinfo.header(device),
           "sizes": {"preset": mode}, "note": args.note, "load_avg": {"start": envinfo.loadavg(), "end": None},
           "sections": {}, "results": []}
    if args.dry_run:
        doc["note"] = ("dry run: tiny sizes" + (" on the CPU with the CPU backends" if not cuda else "") +
                       "; a check of the script's logic, not a measurement. " + args.note).strip()
    ctx = Ctx(device=device, dry=args.dry_run, quick=args.quick, out_dir=out_dir, doc=doc)
    column = 3 if args.dry_run else 2 if args.quick else 1
    total_deadline = ctx.t0 + args.total_budget
    print(f"gpu_validate ({mode}) on {doc['device']['name']}: sections {', '.join(sections)}; "
          f"results in {out_dir}", flush=True)
    for name in sections:
        own = budgets.get(name, SECTIONS[name][column])
        left = total_deadline - time.perf_counter() - GRACE_S
        budget = min(own, left) if name not in budgets else own
        if budget < 3:
            doc["sections"][name] = {"status": "not run", "seconds": 0, "budget_s": 0,
                                     "note": "the total budget was spent before this section"}
            print(f"{name}: not run (total budget spent)", flush=True)
            continue
        doc["sections"][name] = run_section(ctx, name, budget)
        write(ctx)
    for kind, b in ctx.builds.items():  # never leave a build running behind us
        if b["proc"].poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(b["proc"].pid, signal.SIGTERM)
            doc["sections"].setdefault("env", {}).setdefault("note", "")
            doc["sections"]["env"]["note"] += f" | the {kind} extension build was still running at the end: stopped"
    js, md = write(ctx)
    print("\n" + "\n".join(f"{n:12s} {s['status']:10s} {s['seconds']:6.1f} s  {s.get('note', '')[:150]}"
                           for n, s in doc["sections"].items()))
    print(f"\nresults: {js}\ntable:   {md}  (total {doc['wall_s']} s)", flush=True)
    failed = [n for n, s in doc["sections"].items() if s["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
