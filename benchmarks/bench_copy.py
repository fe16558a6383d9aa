"""The roofline: the device's copy bandwidth, measured first so every step can be set against it."""

from __future__ import annotations

from benchmarks import common, roofline

# Large enough to leave every cache behind (H100 L2: 50 MB; CPU L3: tens of MB).
COPY_BYTES = {"cuda": 1 << 31, "cpu": 1 << 28}


def test_copy_bandwidth(benchmark, device, plan, copy_bw):
    benchmark.group = "roofline"
    src, dst = roofline.copy_buffers(device, COPY_BYTES[device.type])
    timing = common.time_steps(benchmark, lambda: dst.copy_(src), device, plan)
    if timing is None:
        return
    moved = roofline.copy_bytes(src.numel())
    gbps = moved / (timing["ms_per_step"] * 1e-3) / 1e9
    copy_bw.update({"gbps": gbps, "bytes": moved, "how": "pytest-benchmark median of copy_"})
    common.record(benchmark, "roofline", timing, case=f"copy {moved >> 20} MiB moved", dtype="fp32",
                  variant="copy_", bytes_moved=moved, gbps=gbps, pct_copy=100.0)


def ensure_copy_bw(copy_bw: dict, device) -> float:
    """The copy bandwidth of this run; measured quickly here if bench_copy was deselected."""
    if "gbps" not in copy_bw:
        copy_bw.update({"gbps": roofline.quick_copy_gbps(device, COPY_BYTES[device.type]),
                        "bytes": 2 * COPY_BYTES[device.type], "how": "median of 10 timed copy_"})
    return copy_bw["gbps"]
