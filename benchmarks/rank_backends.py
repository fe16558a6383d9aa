"""Write lbw_kernels/backend_ranking.json from committed benchmark results.

``backend="auto"`` takes the fastest backend per device type from that file, so the choice
follows measurements rather than a guess. Takes the pytest-benchmark suite's results files and
``benchmarks.gpu_validate``'s (both have ``optimizer-step`` rows; a dry run is refused). For each
results file, backends are ranked by the geometric mean of their plain-step time over the cases
every ranked backend ran; a device type with no results keeps its entry in the file unchanged.

    python -m benchmarks.rank_backends benchmarks/results/cpu-2026-11-21.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RANKING = Path(__file__).resolve().parent.parent / "lbw_kernels" / "backend_ranking.json"


def rank(results: dict) -> tuple[list[str], str]:
    """Backends of one results file, fastest first, and a line saying on what basis."""
    times: dict[str, dict[tuple, float]] = {}
    for row in results["results"]:
        variant = row.get("variant", "")
        if row.get("group") != "optimizer-step" or not variant.startswith("lbw-") or "+" in variant \
                or "ms_per_step" not in row:
            continue
        times.setdefault(variant[len("lbw-"):], {})[(row["case"], row.get("dtype"))] = row["ms_per_step"]
    if not times:
        raise ValueError("no plain FusedGuardedAdamW step results in this file")
    common = set.intersection(*(set(t) for t in times.values()))
    if not common:
        raise ValueError(f"the backends {sorted(times)} share no benchmark case")
    geo = {b: math.exp(sum(math.log(t[c]) for c in common) / len(common)) for b, t in times.items()}
    order = sorted(geo, key=geo.get)
    basis = ", ".join(f"{b} {geo[b]:.3g} ms" for b in order)
    cases = ", ".join(f"{c}/{d}" for c, d in sorted(common))
    return order, f"geometric-mean plain step time over {cases}: {basis}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    ranking = json.loads(RANKING.read_text())
    for path in args.results:
        results = json.loads(path.read_text())
        if results.get("mode") == "dry-run":
            parser.error(f"{path} is a dry run (tiny sizes, a check of the script): it ranks nothing")
        device_type = results["device"]["type"]
        order, basis = rank(results)
        if "torch" not in order:  # the reference is always the last resort
            order.append("torch")
        ranking[device_type] = {"order": order, "measured_in": f"benchmarks/results/{path.name}", "basis": basis}
        print(f"{device_type}: {order}  ({basis})")
    RANKING.write_text(json.dumps(ranking, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
