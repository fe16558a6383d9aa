"""Triton backend of the fused guarded AdamW step (contract: :mod:`lbw_kernels.contract`).

One call updates one bucket with two launches:

1. ``_adamw_tiles_kernel``: one program per tile of ``BLOCK`` elements of one tensor, for
   every tensor of the bucket at once. A cached device table holds each tensor's data
   pointers (p, g, m, v) and numel; a cached tile table holds (tensor index, start) per
   program, ordered group by group. The kernel updates p, m, v and writes the tile's six
   telemetry partial sums (fp64) to row ``pid`` of a [num_tiles, 8] buffer.
2. ``_reduce_kernel``: one program per group sums that group's contiguous tile rows in a
   fixed order, so telemetry is bit-identical from run to run.

Everything the step depends on (coefficients, grad scale, clip coefficient, gate) is read
from device memory inside the kernels: no host sync, and the two launches can be captured
in a CUDA graph once the tables are cached.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import contract as C

_GPU_BLOCK = 2048  # elements per program on a GPU: 8 per thread with 8 warps
_GPU_WARPS = 8
# The interpreter runs each program as numpy calls, so fewer, larger programs are faster.
_INTERPRET_BLOCK = 8192
_PARTIAL_COLS = 8  # the six reduced fields, padded to a power of two
_REDUCE_ROWS = 64  # tile rows the reduce kernel sums per loop iteration
_TABLE_COLS = 5  # p, g, m, v data pointers, numel
_CACHE_SIZE = 16  # table entries kept per cache (a few buckets, a few grad layouts each)

_P_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_size(device: torch.device) -> int:
    return _INTERPRET_BLOCK if device.type == "cpu" else _GPU_BLOCK


@triton.jit
def _round_to(x, P_DTYPE: tl.constexpr):
    """fp32 -> P_DTYPE, round to nearest even like torch's ``.to(dtype)``.

    bf16 is rounded by hand: the interpreter's own fp32->bf16 cast truncates, and the
    integer version costs a few ALU ops in a memory-bound kernel on the GPU.
    """
    if P_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = tl.full(bits.shape, 0x7FC0, tl.uint32)  # torch's canonical bf16 NaN
        out = tl.where(x != x, quiet_nan, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(P_DTYPE)


@triton.jit
def _tile_step(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs, numel, c_ptr, inv_scale, clip,
               P_DTYPE: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Update one tile and return its partial sums. ``MASKED`` is False for full tiles so
    that their loads and stores carry no per-element bounds mask and can be vectorised."""
    step_size = tl.load(c_ptr + 0)
    bc2_sqrt = tl.load(c_ptr + 1)
    decay = tl.load(c_ptr + 2)
    one_minus_beta1 = tl.load(c_ptr + 3)
    beta2 = tl.load(c_ptr + 4)
    one_minus_beta2 = tl.load(c_ptr + 5)
    eps = tl.load(c_ptr + 6)
    outlier_scale = tl.load(c_ptr + 7)
    # Broadcast to a tensor: a uniform mask keeps stores vectorisable (and the interpreter
    # cannot '&' a scalar bool with a tensor).
    gate_on = (tl.zeros([BLOCK], dtype=tl.float32) + tl.load(c_ptr + 8)) != 0.0

    if MASKED:
        in_bounds = offs < numel
        p = tl.load(p_ptrs, mask=in_bounds, other=0.0)
        g = tl.load(g_ptrs, mask=in_bounds, other=0.0)
        m = tl.load(m_ptrs, mask=in_bounds, other=0.0)
        v = tl.load(v_ptrs, mask=in_bounds, other=0.0)
    else:
        in_bounds = tl.full([BLOCK], 1, tl.int1)
        p = tl.load(p_ptrs)
        g = tl.load(g_ptrs)
        m = tl.load(m_ptrs)
        v = tl.load(v_ptrs)

    # Same operations in the same order as the reference; sqrt_rn/div_rn (and no FMA
    # contraction, see the launcher) keep results bit-identical to torch's IEEE ops.
    p32 = p.to(tl.float32)
    g_raw = g.to(tl.float32) * inv_scale
    finite = (tl.abs(g_raw) < float("inf")) & in_bounds  # false for NaN and +-inf
    g_raw = tl.where(finite, g_raw, 0.0)
    g_used = g_raw * clip
    outlier = finite & (tl.abs(g_raw) > outlier_scale * tl.sqrt_rn(v))

    m_new = m + one_minus_beta1 * (g_used - m)
    v_new = v * beta2 + one_minus_beta2 * g_used * g_used
    denom = tl.div_rn(tl.sqrt_rn(v_new), bc2_sqrt) + eps
    p_new = p32 * decay - step_size * tl.div_rn(m_new, denom)

    written = finite & gate_on
    u = tl.where(written, p_new - p32, 0.0)

    # Unwritten elements get their loaded bits stored back (a select, no arithmetic), so
    # they stay bit-exact while the store mask stays uniform; a gated tensor stores nothing.
    store_mask = in_bounds & gate_on
    tl.store(p_ptrs, tl.where(written, _round_to(p_new, P_DTYPE), p), mask=store_mask)
    tl.store(m_ptrs, tl.where(written, m_new, m), mask=store_mask)
    tl.store(v_ptrs, tl.where(written, v_new, v), mask=store_mask)

    # fp32 * fp32 is exact in fp64, so only the summation order differs from the reference.
    g64 = g_raw.to(tl.float64)
    u64 = u.to(tl.float64)
    p64 = tl.where(in_bounds, p32, 0.0).to(tl.float64)
    grad_sq = tl.sum(g64 * g64, axis=0)
    update_sq = tl.sum(u64 * u64, axis=0)
    param_sq = tl.sum(p64 * p64, axis=0)
    grad_dot_update = tl.sum(g64 * u64, axis=0)
    outliers = tl.sum(outlier.to(tl.int32), axis=0).to(tl.float64)
    nonfinite = tl.sum((in_bounds & ~finite).to(tl.int32), axis=0).to(tl.float64)
    return grad_sq, update_sq, param_sq, grad_dot_update, outliers, nonfinite


@triton.jit
def _adamw_tiles_kernel(tensor_tab, tile_tab, coeffs, inv_scale_ptr, clip_ptr, partials,
                        P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                        TABLE_COLS: tl.constexpr, NUM_COEFFS: tl.constexpr,
                        PARTIAL_COLS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tile_tab + 2 * pid)
    start = tl.load(tile_tab + 2 * pid + 1)
    row = tensor_tab + t * TABLE_COLS
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 4)
    offs = start + tl.arange(0, BLOCK)  # int64: start is int64
    p_ptrs = p_ptr + offs
    g_ptrs = g_ptr + offs
    m_ptrs = m_ptr + offs
    v_ptrs = v_ptr + offs
    if ALIGNED:
        # The host checked every base pointer is 16-byte aligned, and tiles start at
        # multiples of BLOCK: telling the compiler lets it emit 16-byte vector accesses.
        p_ptrs = tl.multiple_of(p_ptrs, 16)
        g_ptrs = tl.multiple_of(g_ptrs, 16)
        m_ptrs = tl.multiple_of(m_ptrs, 16)
        v_ptrs = tl.multiple_of(v_ptrs, 16)
    c_ptr = coeffs + t * NUM_COEFFS
    inv_scale = tl.load(inv_scale_ptr)
    clip = tl.load(clip_ptr)
    if start + BLOCK <= numel:
        s0, s1, s2, s3, s4, s5 = _tile_step(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs, numel, c_ptr,
                                            inv_scale, clip, P_DTYPE, BLOCK, False)
    else:
        s0, s1, s2, s3, s4, s5 = _tile_step(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs, numel, c_ptr,
                                            inv_scale, clip, P_DTYPE, BLOCK, True)
    out = partials + pid * PARTIAL_COLS
    tl.store(out + 0, s0)
    tl.store(out + 1, s1)
    tl.store(out + 2, s2)
    tl.store(out + 3, s3)
    tl.store(out + 4, s4)
    tl.store(out + 5, s5)


@triton.jit
def _reduce_kernel(partials, group_tiles, out, NUM_FIELDS: tl.constexpr,
                   PARTIAL_COLS: tl.constexpr, ROWS: tl.constexpr):
    """Group ``pid`` owns tile rows [group_tiles[pid], group_tiles[pid + 1])."""
    gid = tl.program_id(0)
    lo = tl.load(group_tiles + gid)
    hi = tl.load(group_tiles + gid + 1)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, PARTIAL_COLS)
    acc = tl.zeros([PARTIAL_COLS], dtype=tl.float64)
    for first in range(lo, hi, ROWS):  # fixed order: deterministic
        r = first + rows
        x = tl.load(partials + r[:, None] * PARTIAL_COLS + cols[None, :],
                    mask=(r < hi)[:, None], other=0.0)
        acc += tl.sum(x, axis=0)
    tl.store(out + gid * NUM_FIELDS + cols, acc, mask=cols < NUM_FIELDS)


def _host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without a blocking (sync-flagged) copy."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class _Layout:
    """Tile table, ordered group by group, and each group's tile range (static per bucket)."""

    def __init__(self, numels: list[int], group_ids: list[int], num_groups: int, block: int,
                 device: torch.device):
        bad = [g for g in group_ids if not 0 <= g < num_groups]
        if bad:
            raise ValueError(f"group ids {sorted(set(bad))} outside [0, {num_groups})")
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        gids = torch.tensor(group_ids, dtype=torch.int64)
        order = torch.argsort(gids, stable=True)  # tensors of group 0 first, then group 1 ...
        counts_sorted = counts[order]
        tensor_of_tile = torch.repeat_interleave(order, counts_sorted)
        num_tiles = int(counts.sum())
        # Tile k of a tensor starts at k * block: k = global tile index - tensor's first tile.
        first_tile = torch.cumsum(counts_sorted, 0) - counts_sorted
        k = torch.arange(num_tiles, dtype=torch.int64) - torch.repeat_interleave(
            first_tile, counts_sorted)
        tiles = torch.stack([tensor_of_tile, k * block], dim=1).contiguous()
        per_group = torch.zeros(num_groups, dtype=torch.int64).index_add_(0, gids, counts)
        group_tiles = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_group, 0)])
        self.num_tiles = num_tiles
        self.tiles = _host_to_device(tiles, device)
        self.group_tiles = _host_to_device(group_tiles, device)


# Keyed on data_ptr()s, numels, dtype, device and block size: a table is rebuilt exactly
# when some storage moved (e.g. load_state_dict replaced the state tensors). Entries stay
# alive while cached, which a captured CUDA graph relies on.
_layout_cache: OrderedDict = OrderedDict()
_pointer_cache: OrderedDict = OrderedDict()
# Counts of table builds, for tests and debugging.
cache_stats = {"layout_builds": 0, "pointer_builds": 0}


def _cached(cache: OrderedDict, key, build):
    entry = cache.get(key)
    if entry is None:
        entry = build()
        cache[key] = entry
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return entry


def clear_caches() -> None:
    _layout_cache.clear()
    _pointer_cache.clear()


def _check_call(params, grads, exp_avgs, exp_avg_sqs, coeffs, group_ids):
    """Cheap checks done on every call; returns (device, param dtype)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(group_ids) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and group_ids differ in length")
    if coeffs.dtype != torch.float32 or tuple(coeffs.shape) != (n, C.NUM_COEFFS):
        raise ValueError(f"coeffs must be float32 of shape [{n}, {C.NUM_COEFFS}], got "
                         f"{coeffs.dtype} {tuple(coeffs.shape)}")
    device = coeffs.device
    if device.type == "cuda" and _interpreting():
        raise ValueError("TRITON_INTERPRET is set: the interpreted kernel needs CPU tensors")
    if device.type == "cpu" and not _interpreting():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton backend does not support device {device}")
    dtype = params[0].dtype if n else torch.float32
    if dtype not in _P_DTYPES:
        raise ValueError(f"unsupported param dtype {dtype}; expected fp32, bf16 or fp16")
    return device, dtype


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs, device, dtype):
    """Per-tensor checks, done when the pointer table is (re)built: a cached table means
    these very storages were checked before."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if x.device != device:
                raise ValueError(f"tensor {i}: {name} is on {x.device}, coeffs on {device}")
            if x.numel() != p.numel():
                raise ValueError(f"tensor {i}: {name} has {x.numel()} elements, param "
                                 f"{p.numel()}")
        if p.dtype != dtype or g.dtype != dtype:
            raise ValueError(f"tensor {i}: param/grad dtypes {p.dtype}/{g.dtype}; the bucket's "
                             f"param dtype is {dtype}")
        if m.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(f"tensor {i}: exp_avg/exp_avg_sq must be float32")
        for name, x in (("param", p), ("exp_avg", m), ("exp_avg_sq", v)):
            if not x.is_contiguous():
                raise ValueError(f"tensor {i}: {name} is not contiguous; the Triton backend "
                                 f"updates it in place through a flat pointer")


def fused_adamw_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    coeffs: Tensor,
    group_ids: list[int],
    num_groups: int,
    inv_grad_scale: Tensor,
    clip_coef: Tensor,
) -> Tensor:
    """Same signature and semantics as :func:`lbw_kernels.reference.fused_adamw_reference`."""
    device, dtype = _check_call(params, grads, exp_avgs, exp_avg_sqs, coeffs, group_ids)
    # A non-contiguous grad is read through a contiguous copy (a fresh pointer each call).
    if not all(map(Tensor.is_contiguous, grads)):
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    numels = tuple(map(Tensor.numel, params))
    # All p pointers, then all g, m, v: map() keeps this cheap for models with many tensors.
    ptr = Tensor.data_ptr
    ptrs = (*map(ptr, params), *map(ptr, grads), *map(ptr, exp_avgs), *map(ptr, exp_avg_sqs))

    contiguous = Tensor.is_contiguous
    if not all(all(map(contiguous, xs)) for xs in (params, exp_avgs, exp_avg_sqs)):
        # A non-contiguous view can share a cached data_ptr; this raises, naming it.
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs, device, dtype)

    def build_pointers():
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs, device, dtype)
        return _build_pointers(ptrs, numels, device)

    tensor_tab, aligned = _cached(_pointer_cache, (device, dtype, ptrs, numels), build_pointers)
    block = _block_size(device)
    layout = _cached(
        _layout_cache, (device, block, num_groups, numels, tuple(group_ids)),
        lambda: _build_layout(numels, group_ids, num_groups, block, device))

    out = torch.empty(num_groups, C.NUM_REDUCED_FIELDS, dtype=torch.float64, device=device)
    if layout.num_tiles == 0:  # nothing to update; every group sums to zero
        return out.zero_()
    partials = torch.empty(layout.num_tiles, _PARTIAL_COLS, dtype=torch.float64, device=device)
    opts = {}
    if device.type == "cuda":
        # No FMA contraction: m + b*(g - m) etc. must round like torch's separate ops.
        opts = {"num_warps": _GPU_WARPS, "enable_fp_fusion": False}
    _adamw_tiles_kernel[(layout.num_tiles,)](
        tensor_tab, layout.tiles, coeffs.contiguous(), inv_grad_scale.to(torch.float32),
        clip_coef.to(torch.float32), partials,
        P_DTYPE=_P_DTYPES[dtype], ALIGNED=aligned, BLOCK=block, TABLE_COLS=_TABLE_COLS,
        NUM_COEFFS=C.NUM_COEFFS, PARTIAL_COLS=_PARTIAL_COLS, **opts)
    _reduce_kernel[(num_groups,)](
        partials, layout.group_tiles, out, NUM_FIELDS=C.NUM_REDUCED_FIELDS,
        PARTIAL_COLS=_PARTIAL_COLS, ROWS=_REDUCE_ROWS, **opts)
    return out


def _build_layout(numels, group_ids, num_groups, block, device) -> _Layout:
    cache_stats["layout_builds"] += 1
    return _Layout(numels, group_ids, num_groups, block, device)


def _build_pointers(ptrs, numels, device) -> tuple[Tensor, bool]:
    cache_stats["pointer_builds"] += 1
    n = len(numels)
    host = torch.empty(n, _TABLE_COLS, dtype=torch.int64)
    host[:, :4] = torch.tensor(ptrs, dtype=torch.int64).reshape(4, n).t()
    host[:, 4] = torch.tensor(numels, dtype=torch.int64)
    # numel-0 tensors have no tiles, so their (possibly null) pointers never matter.
    used = host[:, 4] > 0
    aligned = bool((host[used, :4] % 16 == 0).all())
    return _host_to_device(host, device), aligned
