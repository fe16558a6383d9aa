"""Triton backend of the fused guarded AdamW step (contract v2: :mod:`lbw_kernels.contract`).

One call updates one bucket with two launches and no host synchronisation:

1. :func:`.triton_update.update_kernel`, one program per chunk (a run of whole tiles of one
   tensor): one pass over p, g, m, v; the step-wide checks, gates and coefficients are
   derived on the device from the control table and the device scalars; each program
   writes one row of float64 telemetry partials;
2. :func:`.triton_finish.finish_kernel`, one program per tensor plus one: per-tensor sums
   (fixed order), signals, group fields (last program of each group to arrive), applied
   gates, invalid flags, globals, and the step counters advanced by the applied gate.

The host work per call is a few checks, cache lookups keyed on the tensors' data pointers,
numels, group ids, kinds and step pointers, and the two launches. Tables are built and
uploaded, and scratch (partials, per-tensor rows, group counters) allocated, only when the
layout or a storage changes; cached entries stay alive (and entries created during CUDA-graph
capture are never evicted), so a captured graph keeps valid buffers.

Validation (lengths, dtypes, devices, shapes, strides and density, fp32 moments and steps,
control/tensor_out/record_out shapes, group ids and kinds) happens before anything is
launched; per-tensor checks run when a pointer table is built (a cached table means these
storages were checked). A param, its grad and moments must share strides and be
non-overlapping and dense (contiguous, channels_last, ...): they are processed as flat
arrays over their storage.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton.language as tl
from torch import Tensor

from . import contract as C
from .triton_common import HAS_GRAD_NORM, HAS_LOSS, interpreting
from .triton_finish import SCRATCH_COLS, TENSOR_COLS, finish_kernel
from .triton_update import CHUNK_COLS, PARTIAL_COLS, update_kernel

_P_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SCALAR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_KINDS = (C.KIND_OTHER, C.KIND_MATRIX, C.KIND_ZERO_INIT)
_MAX_CHUNK = 1 << 30  # elements per chunk: int32 offsets inside a program
_CACHE_SIZE = 32  # entries kept per cache (a few buckets, a few grad layouts each)


@dataclass(frozen=True)
class LaunchConfig:
    """Block and grid choices of one device kind (see :func:`chunk_tiles`)."""

    block: int  # elements per tile (update kernel)
    num_warps: int  # update kernel
    max_registers: int  # update kernel's register cap (ptxas maxnreg), 0: none
    finish_warps: int
    rows: int  # partial rows the finish kernel sums per step
    members: int  # group members it sums per step
    groups: int  # groups the globals program handles per step
    fixed_chunk_tiles: int = 0  # > 0: every chunk is this many tiles (the interpreter)
    min_chunk_tiles: int = 8  # below this a program's set-up is not amortised ...
    blocks_per_sm: int = 4  # ... unless the GPU would not get one full wave
    max_waves: int = 8  # beyond this, chunks grow instead of the grid
    max_rows_per_tensor: int = 1024  # bounds the finish kernel's loop per tensor


# GPU: 512-element tiles over 4 warps = 4 elements per thread (one 16-byte vector per fp32
# array, 8 bytes for bf16/fp16 params and grads). The IEEE div/sqrt sequences (their slow
# paths are calls) put the loop at ~124-128 registers; capping at 128 (no spills, see
# ``python -m lbw_kernels.compile_check``) guarantees 4 blocks (16 warps) per SM on sm_80 and
# sm_90, ~32 KB of loads in flight per SM. Chunks: 4 blocks per SM, up to 8 waves.
GPU_CONFIG = LaunchConfig(block=512, num_warps=4, max_registers=128, finish_warps=4, rows=64,
                          members=32, groups=32)
# The interpreter runs each program as numpy calls on whole tiles: larger tiles are faster;
# two tiles per chunk keep several chunks (and partial tiles) per tensor in the tests.
INTERPRET_CONFIG = LaunchConfig(block=2048, num_warps=4, max_registers=0, finish_warps=4, rows=64, members=32,
                                groups=32, fixed_chunk_tiles=2)


def update_options(cfg: LaunchConfig) -> dict:
    """Compile options of the update kernel beyond num_warps (shared with compile_check)."""
    return {"maxnreg": cfg.max_registers} if cfg.max_registers else {}


def _config(device: torch.device) -> LaunchConfig:
    return INTERPRET_CONFIG if device.type == "cpu" else GPU_CONFIG


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_tiles(total_tiles: int, max_tensor_tiles: int, cfg: LaunchConfig, num_sms: int) -> int:
    """Tiles per chunk for a bucket: enough programs for a full GPU (``blocks_per_sm`` per
    SM), at most ``max_waves`` waves of them, each at least ``min_chunk_tiles`` tiles when
    there are enough, and at most ``max_rows_per_tensor`` chunks per tensor."""
    if cfg.fixed_chunk_tiles:
        return cfg.fixed_chunk_tiles
    slots = num_sms * cfg.blocks_per_sm
    tiles = -(-total_tiles // (slots * cfg.max_waves))
    tiles = max(tiles, min(cfg.min_chunk_tiles, -(-total_tiles // slots)))
    tiles = max(tiles, -(-max_tensor_tiles // cfg.max_rows_per_tensor), 1)
    return min(tiles, _MAX_CHUNK // cfg.block)


# --------------------------------------------------------------------------- caches
class _Entry:
    __slots__ = ("value", "pinned")

    def __init__(self, value):
        self.value = value
        self.pinned = False


_struct_cache: dict = {}  # layout key -> _Struct
_call_cache: dict = {}  # layout key + pointers -> (_Struct, _Pointers)
_consts_cache: dict = {}
# Counts of table builds, for tests and debugging.
cache_stats = {"struct_builds": 0, "pointer_builds": 0}


def _cached(cache: dict, key, build, pin: bool):
    """``cache[key]``, built on a miss. A hit costs one hash and one comparison of the key
    (no reordering); on overflow the oldest unpinned entries go (an entry used while a CUDA
    graph was being captured is pinned: the graph holds its buffers' addresses)."""
    entry = cache.get(key)
    if entry is None:
        entry = _Entry(build())
        cache[key] = entry
        if len(cache) > _CACHE_SIZE:
            for old_key in [k for k, e in cache.items() if not e.pinned][:-1]:
                if len(cache) <= _CACHE_SIZE:
                    break
                del cache[old_key]
    if pin:
        entry.pinned = True
    return entry.value


def clear_caches() -> None:
    """Drop every cached table and scratch buffer (not while a captured graph uses them)."""
    _struct_cache.clear()
    _call_cache.clear()
    _consts_cache.clear()


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without a blocking (sync-flagged) copy."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class _Struct:
    """What depends on the bucket's layout only (numels, groups, kinds): chunks, scratch."""

    num_chunks: int
    chunk_tensor: Tensor  # host int64 [num_chunks]
    chunk_start: Tensor  # host int64 [num_chunks], elements from the tensor's start
    chunk_len: Tensor  # host int64 [num_chunks]
    row_lo: Tensor  # host int64 [T]
    chunks_per_tensor: Tensor  # host int64 [T]
    group_size: Tensor  # host int64 [T]: tensors of the tensor's group in this bucket
    group_offsets: Tensor  # device int64 [G + 1]
    members: Tensor  # device int64 [max(T, 1)]: tensor indices, group by group
    partials: Tensor  # device float64 [max(num_chunks, 1), PARTIAL_COLS]
    scratch: Tensor  # device float64 [max(T, 1), SCRATCH_COLS]
    counters: Tensor  # device int32 [max(G, 1)], zero between launches
    host: Tensor  # the uploaded host table (kept alive until the copy is done)


def _build_struct(numels: tuple, group_ids: tuple, kinds: tuple, num_groups: int,
                  device: torch.device, cfg: LaunchConfig) -> _Struct:
    cache_stats["struct_builds"] += 1
    T = len(numels)
    for i, (gid, kind) in enumerate(zip(group_ids, kinds)):
        if not isinstance(gid, numbers.Integral) or not 0 <= gid < num_groups:
            raise ValueError(f"tensor {i}: group id {gid!r} outside [0, {num_groups})")
        if not isinstance(kind, numbers.Integral) or kind not in _KINDS:
            raise ValueError(f"tensor {i}: kind {kind!r} is not one of KIND_OTHER, KIND_MATRIX, "
                             f"KIND_ZERO_INIT {_KINDS}")
    block = cfg.block
    n = torch.tensor(numels, dtype=torch.int64)
    tiles = (n + block - 1) // block
    ct = chunk_tiles(int(tiles.sum()), int(tiles.max()) if T else 0, cfg, _num_sms(device))
    chunk_elems = ct * block
    per_tensor = (n + chunk_elems - 1) // chunk_elems
    row_lo = torch.cumsum(per_tensor, 0) - per_tensor
    num_chunks = int(per_tensor.sum())
    chunk_tensor = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), per_tensor)
    k = torch.arange(num_chunks, dtype=torch.int64) - torch.repeat_interleave(row_lo, per_tensor)
    chunk_start = k * chunk_elems
    chunk_len = torch.clamp(n[chunk_tensor] - chunk_start, max=chunk_elems)

    gids = torch.tensor(group_ids, dtype=torch.int64)
    counts = torch.bincount(gids, minlength=num_groups) if T else torch.zeros(
        num_groups, dtype=torch.int64)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    members = torch.argsort(gids, stable=True) if T else torch.zeros(0, dtype=torch.int64)
    # One upload; the members start 16-byte aligned (the JIT specialises on alignment).
    G1 = num_groups + 1 + (num_groups + 1) % 2
    host = torch.zeros(G1 + max(T, 1), dtype=torch.int64)
    host[:num_groups + 1] = offsets
    host[G1:G1 + T] = members
    dev = _upload(host, device)
    return _Struct(
        num_chunks=num_chunks, chunk_tensor=chunk_tensor, chunk_start=chunk_start,
        chunk_len=chunk_len, row_lo=row_lo, chunks_per_tensor=per_tensor,
        group_size=counts[gids] if T else torch.zeros(0, dtype=torch.int64),
        group_offsets=dev[:num_groups + 1], members=dev[G1:],
        partials=torch.empty(max(num_chunks, 1), PARTIAL_COLS, dtype=torch.float64,
                             device=device),
        scratch=torch.empty(max(T, 1), SCRATCH_COLS, dtype=torch.float64, device=device),
        counters=torch.zeros(max(num_groups, 1), dtype=torch.int32, device=device),
        host=host)


def _dense(x: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one storage span exactly once."""
    if x.numel() == 0:
        return True
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, device, dtype) -> None:
    """Per-tensor checks, done when a pointer table is (re)built."""
    seen_steps: dict[int, int] = {}
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v),
                        ("step", s)):
            if not isinstance(x, Tensor):
                raise ValueError(f"tensor {i}: {name} is not a tensor")
            if x.device != device:
                raise ValueError(f"tensor {i}: {name} is on {x.device}, the control table on "
                                 f"{device}")
        if p.dtype != dtype or g.dtype != dtype:
            raise ValueError(f"tensor {i}: param/grad dtypes {p.dtype}/{g.dtype}; the bucket's "
                             f"param dtype is {dtype}")
        if m.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(f"tensor {i}: exp_avg/exp_avg_sq are {m.dtype}/{v.dtype}, not "
                             f"float32")
        for name, x in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if x.shape != p.shape or x.stride() != p.stride():
                raise ValueError(f"tensor {i}: {name} has shape {tuple(x.shape)} and strides "
                                 f"{x.stride()}, the param {tuple(p.shape)} and {p.stride()}")
        if not _dense(p):
            raise ValueError(f"tensor {i}: the param (strides {p.stride()}, shape "
                             f"{tuple(p.shape)}) is not non-overlapping and dense")
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"tensor {i}: the step must be a 0-d float32 tensor, got "
                             f"{s.dtype} of shape {tuple(s.shape)}")
        j = seen_steps.setdefault(s.data_ptr(), i)
        if j != i:
            raise ValueError(f"tensor {i}: shares its step tensor with tensor {j}")


@dataclass
class _Pointers:
    chunks: Tensor  # device int64 [max(num_chunks, 1), CHUNK_COLS]
    tensors: Tensor  # device int64 [max(T, 1), TENSOR_COLS]
    aligned: bool
    host: Tensor


def _build_pointers(struct: _Struct, ptrs: tuple, numels: tuple, group_ids: tuple,
                    kinds: tuple, esize: int, device: torch.device) -> _Pointers:
    cache_stats["pointer_builds"] += 1
    T = len(numels)
    nc = struct.num_chunks
    addr = torch.tensor(ptrs, dtype=torch.int64).reshape(5, T)  # p, g, m, v, step
    ct, start = struct.chunk_tensor, struct.chunk_start
    chunks = torch.zeros(max(nc, 1), CHUNK_COLS, dtype=torch.int64)
    if nc:
        chunks[:nc, 0] = addr[0, ct] + start * esize
        chunks[:nc, 1] = addr[1, ct] + start * esize
        chunks[:nc, 2] = addr[2, ct] + start * 4
        chunks[:nc, 3] = addr[3, ct] + start * 4
        chunks[:nc, 4] = struct.chunk_len
        chunks[:nc, 5] = addr[4, ct]
        chunks[:nc, 6] = torch.tensor(group_ids, dtype=torch.int64)[ct]
        chunks[:nc, 7] = ct
    aligned = bool((chunks[:nc, :4] % 16 == 0).all())
    tensors = torch.zeros(max(T, 1), TENSOR_COLS, dtype=torch.int64)
    if T:
        tensors[:T, 0] = struct.row_lo
        tensors[:T, 1] = struct.row_lo + struct.chunks_per_tensor
        tensors[:T, 2] = torch.tensor(group_ids, dtype=torch.int64)
        tensors[:T, 3] = torch.tensor(kinds, dtype=torch.int64)
        tensors[:T, 4] = addr[4]
        tensors[:T, 5] = torch.tensor(numels, dtype=torch.int64)
        tensors[:T, 6] = struct.group_size
    host = torch.cat([chunks, tensors])
    dev = _upload(host, device)
    rows = chunks.shape[0]
    return _Pointers(chunks=dev[:rows], tensors=dev[rows:], aligned=aligned, host=host)


def _consts(device: torch.device) -> tuple[Tensor, Tensor]:
    """Device fp32 0 and 1: found_inf and grad_scale when none is given (same effect), and
    placeholders for an absent loss or grad norm (the flags say they are absent)."""
    consts = _consts_cache.get(device)
    if consts is None:  # two allocations: 16-byte aligned, like the scalars callers pass
        consts = _consts_cache[device] = (
            torch.zeros((), dtype=torch.float32, device=device),
            torch.ones((), dtype=torch.float32, device=device))
    return consts


def _scalar(x, name: str, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.numel() != 1:
        raise ValueError(f"{name} must hold one element, got shape {tuple(x.shape)}")
    if x.device != device:  # slow path: a copy per call (the reference accepts it too)
        x = x.detach().to(device, non_blocking=True)
    if x.dtype not in _SCALAR_DTYPES:
        x = x.to(torch.float32)
    return x


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if interpreting():
            raise ValueError("TRITON_INTERPRET is set: the interpreted kernels need CPU tensors")
    elif device.type == "cpu":
        if not interpreting():
            raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")
    else:
        raise ValueError(f"the Triton backend does not support device {device}")


def fused_adamw_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    group_ids: list[int],
    kinds: list[int],
    control: Tensor,
    tensor_out: Tensor,
    record_out: Tensor,
    *,
    loss: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    grad_norm: Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Same signature and semantics as :func:`lbw_kernels.reference.fused_adamw_reference`."""
    T = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(group_ids)
            == len(kinds) == T):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs, steps, group_ids and kinds "
                         "differ in length")
    if not isinstance(control, Tensor) or control.dtype != torch.float64 or control.dim() != 2 \
            or control.shape[1] != C.NUM_CONTROL or control.shape[0] < 1:
        raise ValueError(f"control must be a float64 tensor of shape [G + 1, {C.NUM_CONTROL}]")
    if not control.is_contiguous():
        raise ValueError("control must be contiguous")
    device = control.device
    _check_device(device)
    G = control.shape[0] - 1
    if tensor_out.dtype != torch.float64 or tuple(tensor_out.shape) != (T, C.NUM_TENSOR_FIELDS) \
            or tensor_out.device != device or not tensor_out.is_contiguous():
        raise ValueError(f"tensor_out must be a contiguous float64 tensor of shape "
                         f"[{T}, {C.NUM_TENSOR_FIELDS}] on {device}, got {tensor_out.dtype} "
                         f"{tuple(tensor_out.shape)} on {tensor_out.device}")
    size = C.record_layout(G).size
    if record_out.dtype != torch.float64 or tuple(record_out.shape) != (size,) \
            or record_out.device != device or not record_out.is_contiguous():
        raise ValueError(f"record_out must be a contiguous float64 tensor of shape [{size}] on "
                         f"{device}, got {record_out.dtype} {tuple(record_out.shape)} on "
                         f"{record_out.device}")
    dtype = params[0].dtype if T else torch.float32
    if dtype not in _P_DTYPES:
        raise ValueError(f"unsupported param dtype {dtype}; expected fp32, bf16 or fp16")
    zero, one = _consts(device)
    flags = 0
    if loss is not None:
        loss = _scalar(loss, "loss", device)
        flags |= HAS_LOSS.value
    if grad_norm is not None:
        grad_norm = _scalar(grad_norm, "grad_norm", device)
        flags |= HAS_GRAD_NORM.value
    found_inf = zero if found_inf is None else _scalar(found_inf, "found_inf", device)
    grad_scale = one if grad_scale is None else _scalar(grad_scale, "grad_scale", device)
    if isinstance(group_ids, Tensor):
        group_ids = group_ids.tolist()
    if isinstance(kinds, Tensor):
        kinds = kinds.tolist()

    cfg = _config(device)
    pin = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    numels = tuple(map(Tensor.numel, params))
    group_ids, kinds = tuple(group_ids), tuple(kinds)
    ptr = Tensor.data_ptr
    ptrs = (*map(ptr, params), *map(ptr, grads), *map(ptr, exp_avgs), *map(ptr, exp_avg_sqs),
            *map(ptr, steps))
    skey = (device, dtype, G, numels, group_ids, kinds, cfg)

    def build():
        struct = _cached(_struct_cache, skey,
                         lambda: _build_struct(numels, group_ids, kinds, G, device, cfg), pin)
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, device, dtype)
        esize = torch.empty((), dtype=dtype).element_size()
        return struct, _build_pointers(struct, ptrs, numels, group_ids, kinds, esize, device)

    struct, tables = _cached(_call_cache, (skey, ptrs), build, pin)

    opts, update_opts = {}, {}
    guard = contextlib.nullcontext()
    if device.type == "cuda":
        # No FMA contraction: m + b * (g - m) etc. must round like torch's separate ops.
        opts = {"enable_fp_fusion": False}
        update_opts = dict(opts, **update_options(cfg))
        guard = torch.cuda.device(device)
    with guard:
        if struct.num_chunks:
            update_kernel[(struct.num_chunks,)](
                tables.chunks, control, tensor_out, struct.partials,
                zero if loss is None else loss, found_inf, grad_scale,
                zero if grad_norm is None else grad_norm, G, flags,
                P_DTYPE=_P_DTYPES[dtype], ALIGNED=tables.aligned, BLOCK=cfg.block,
                num_warps=cfg.num_warps, **update_opts)
        finish_kernel[(T + 1,)](
            tables.tensors, struct.group_offsets, struct.members, struct.partials,
            struct.scratch, struct.counters, control, tensor_out, record_out,
            zero if loss is None else loss, found_inf, zero if grad_norm is None else grad_norm,
            T, G, flags, int(bool(accumulate)),
            ROWS=cfg.rows, MEMBERS=cfg.members, GROUPS=cfg.groups,
            num_warps=cfg.finish_warps, **opts)
