"""The interleaved CPU targets and the op count, inside the pytest-benchmark run.

pytest-benchmark times one test after another, so its ratios mix in the machine's drift; the
targets of "One pass, few launches, GPU-ready" are measured here with every variant stepped in
turn in one process (:mod:`benchmarks.cpu_targets`, :mod:`benchmarks.interleave`). The rows
land in the same results file as the rest of the suite. On a GPU only the op count runs here
(``python -m benchmarks.gpu_validate`` measures the GPU step times interleaved).
"""

from __future__ import annotations

import warnings

from benchmarks import common, cpu_targets, op_count


def test_interleaved_targets(benchmark, device):
    benchmark.group = "targets (interleaved)"
    rows: list[dict] = []

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device.type == "cpu":
                rows.extend(cpu_targets.measure_all(log=lambda m: None))
            else:
                rows.extend(op_count.measure(device, op_count.default_backends(device)))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is None or getattr(benchmark.stats, "stats", None) is None:
        return  # --benchmark-disable: nothing measured
    common.RESULTS.extend(rows)
