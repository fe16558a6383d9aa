"""Render benchmark results files as markdown, check the targets, compare two files.

    python -m benchmarks.render benchmarks/results/cpu-2025-01-01.json
    python -m benchmarks.render A.json B.json                 # side by side, B/A ratios
    python -m benchmarks.render A.json --readme benchmarks/README.md   # update the README table

Pure Python over the JSON dict (no torch), so it runs anywhere and is unit tested.
Targets are ratios between measurements of the same run; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

# Variant names the suite uses for the baselines.
FUSED, FUSED_CLIP = "torch-fused", "torch-fused+clip"
BIG = 1 << 28  # the GPU targets apply from 256M parameters up

# Backends whose speed is a product promise (the torch backend is the reference oracle).
PRIMARY = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
GOALS = {
    "cuda": {"step_vs_fused": 1.0, "clip_speedup": 1.25, "pct_copy": 90.0},
    "cpu": {"step_vs_fused": 1.0, "clip_speedup": 1.4, "pct_copy": None},
}
E2E_OVERHEAD_GOAL_PCT = 1.0


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def fmt(x, digits: int = 3) -> str:
    """Three significant figures, '-' for missing values."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def rows_of(doc: dict, group: str) -> list[dict]:
    return [r for r in doc.get("results", []) if r.get("group") == group]


def key(row: dict) -> tuple:
    case = row.get("case") if row.get("groups") is None else f"{row.get('case')}/{row['groups']}g"
    return (row.get("group"), case, row.get("dtype"), row.get("variant"))


def _by_case(doc: dict) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows_of(doc, "optimizer-step"):
        out.setdefault((r["case"], r["dtype"]), {})[r["variant"]] = r
    return out


def device_type(doc: dict) -> str:
    return doc.get("device", {}).get("type", "cpu")


def targets(doc: dict) -> list[dict]:
    """Every target the run can speak to: name, case, dtype, value, goal, met."""
    dev = device_type(doc)
    goals = GOALS.get(dev, GOALS["cpu"])
    out = []
    for (case, dtype), variants in _by_case(doc).items():
        for v in variants.values():
            if v.get("impl") != "lbw" or v.get("backend") not in PRIMARY.get(dev, ()):
                continue
            big_enough = dev != "cuda" or v.get("numel", 0) >= BIG
            plain = not v.get("guard") and not v.get("clip")
            if plain and FUSED in variants and big_enough:
                ratio = v["ms_per_step"] / variants[FUSED]["ms_per_step"]
                out.append(_target("step time / torch fused", case, dtype, v, ratio, "<=", goals["step_vs_fused"]))
            if plain and goals["pct_copy"] is not None and big_enough and v.get("pct_copy") is not None:
                out.append(_target("% of copy bandwidth", case, dtype, v, v["pct_copy"], ">=", goals["pct_copy"]))
            if v.get("clip") and not v.get("guard") and FUSED_CLIP in variants:
                speedup = variants[FUSED_CLIP]["ms_per_step"] / v["ms_per_step"]
                out.append(_target("speed-up vs fused + clip_grad_norm_", case, dtype, v, speedup, ">=",
                                   goals["clip_speedup"]))
    for r in e2e_overheads(doc):
        if r["vs"] == FUSED:
            out.append(_target("end-to-end overhead % vs torch fused", r["case"], r["dtype"], r, r["overhead_pct"],
                               "<", E2E_OVERHEAD_GOAL_PCT))
    return out


def _target(name, case, dtype, row, value, op, goal) -> dict:
    met = value <= goal if op == "<=" else value >= goal if op == ">=" else value < goal
    return {"target": name, "case": case, "dtype": dtype, "variant": row.get("variant"),
            "value": value, "goal": f"{op} {goal:g}", "met": met}


def e2e_overheads(doc: dict) -> list[dict]:
    """Guarded end-to-end step time against torch fused AdamW and against our unguarded step."""
    rows = rows_of(doc, "end-to-end")
    by = {(r["case"], r["dtype"], r["variant"]): r for r in rows}
    out = []
    for (case, dtype, variant), r in by.items():
        if variant != "lbw+guard":
            continue
        for base in (FUSED, "lbw"):
            b = by.get((case, dtype, base))
            if b:
                pct = (r["ms_per_step"] / b["ms_per_step"] - 1.0) * 100.0
                out.append({"case": case, "dtype": dtype, "variant": variant, "vs": base, "overhead_pct": pct})
    return out


def render_env(doc: dict) -> str:
    d, v = doc.get("device", {}), doc.get("versions", {})
    parts = [f"**{d.get('name', '?')}**"]
    if d.get("type") == "cuda":
        parts.append(f"driver {d.get('driver', '?')}, CUDA {d.get('cuda', '?')}")
    parts.append(f"{d.get('cpu_count', '?')} CPUs ({d.get('cpu_model', '?')}), "
                 f"{d.get('torch_threads', '?')} torch threads")
    vers = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "transformers", "pytest_benchmark") if k in v)
    lines = [" · ".join(parts), "", f"{vers}; {doc.get('date', '?')}, commit {str(doc.get('git_commit', '?'))[:10]}, "
             f"sizes `{doc.get('sizes', {}).get('preset', '?')}`."]
    if doc.get("copy_gbps"):
        lines.append(f"Measured copy bandwidth (roofline): **{doc['copy_gbps']:.1f} GB/s**.")
    la = doc.get("load_avg") or {}
    if la.get("start") or la.get("end"):
        lines.append(f"Load average (1/5/15 min) at start {la.get('start')}, at end {la.get('end')}.")
    if doc.get("note"):
        lines.append(f"Note: {doc['note']}")
    return "\n".join(lines)


def render_steps(doc: dict) -> str:
    rows = []
    for (case, dtype), variants in _by_case(doc).items():
        base = variants.get(FUSED)
        for name, r in variants.items():
            ref = variants.get(FUSED_CLIP) if r.get("clip") else base
            vs = r["ms_per_step"] / ref["ms_per_step"] if ref else None
            rows.append([case, dtype, name, r.get("backend", "-"), r["ms_per_step"], r.get("ms_stddev"),
                         r.get("bytes_per_param"), r.get("gbps"), r.get("pct_copy"), vs])
    return table(["case", "dtype", "variant", "backend", "ms/step", "± sd", "B/param", "GB/s", "% copy",
                  "x torch ref"], rows)


def render_targets(doc: dict) -> str:
    rows = [[t["target"], t["case"], t["dtype"], t["variant"], t["value"], t["goal"], "met" if t["met"] else "MISSED"]
            for t in targets(doc)]
    if not rows:
        return "(no targets measurable)"
    return table(["target", "case", "dtype", "variant", "measured", "goal", ""], rows)


def guard_rows(doc: dict) -> list[dict]:
    """Guard host cost per case: time inside the guard calls, and guarded minus unguarded step."""
    rows = rows_of(doc, "guard-host")
    plain = {(r["case"], r.get("groups")): r for r in rows if r.get("variant") == "no-guard"}
    out = []
    for r in rows:
        if r.get("variant") != "guard":
            continue
        base = plain.get((r["case"], r.get("groups")))
        delta = (r["ms_per_step"] - base["ms_per_step"]) * 1e3 if base else None
        out.append({**r, "step_delta_us": delta, "unguarded_ms": base["ms_per_step"] if base else None})
    return out


def render_guard(doc: dict) -> str:
    rows = [[r["case"], r.get("groups"), r.get("backend", "-"), r.get("unguarded_ms"), r["ms_per_step"],
             r.get("step_delta_us"), r.get("guard_host_us"), r.get("before_step_us"), r.get("after_step_us")]
            for r in guard_rows(doc)]
    header = ["case", "groups", "backend", "no guard ms", "guard ms", "delta µs", "in guard µs/step",
              "before_step µs", "after_step µs"]
    return table(header, rows) if rows else "(not measured: the guard was not available)"


def render_e2e(doc: dict) -> str:
    rows = [[r["case"], r["dtype"], r["variant"], r["ms_per_step"], r.get("ms_stddev"), r.get("params_m")]
            for r in rows_of(doc, "end-to-end")]
    over = [[o["case"], o["dtype"], f"{o['variant']} vs {o['vs']}", o["overhead_pct"]] for o in e2e_overheads(doc)]
    text = table(["model", "dtype", "optimizer", "ms/step", "± sd", "params (M)"], rows) if rows else "(not measured)"
    if over:
        text += "\n\n" + table(["model", "dtype", "comparison", "overhead %"], over)
    return text


def render_markdown(doc: dict) -> str:
    return "\n\n".join([
        render_env(doc),
        "#### Targets (ratios within this run)", render_targets(doc),
        "#### Optimizer step", render_steps(doc),
        "`x torch ref`: step time over torch fused AdamW (over fused + clip_grad_norm_ for clipping variants).",
        "#### Guard controller, host side", render_guard(doc),
        "#### End-to-end training step", render_e2e(doc),
    ])


def compare(a: dict, b: dict) -> list[dict]:
    """Measurements present in both files, with B/A step-time ratios."""
    bk = {key(r): r for r in b.get("results", [])}
    out = []
    for r in a.get("results", []):
        o = bk.get(key(r))
        if o and r.get("ms_per_step") and o.get("ms_per_step"):
            out.append({"key": key(r), "a_ms": r["ms_per_step"], "b_ms": o["ms_per_step"],
                        "ratio": o["ms_per_step"] / r["ms_per_step"]})
    return out


def render_comparison(a: dict, b: dict) -> str:
    na, nb = a.get("device", {}).get("name", "A"), b.get("device", {}).get("name", "B")
    rows = [[*c["key"], c["a_ms"], c["b_ms"], c["ratio"]] for c in compare(a, b)]
    ta = {(t["target"], t["case"], t["dtype"], t["variant"]): t for t in targets(a)}
    tb = {(t["target"], t["case"], t["dtype"], t["variant"]): t for t in targets(b)}
    trows = [[*k, t["goal"], ta[k]["value"] if k in ta else None, tb[k]["value"] if k in tb else None]
             for k, t in {**ta, **tb}.items()]
    return "\n\n".join([
        f"A: {na} ({a.get('date', '?')}) · B: {nb} ({b.get('date', '?')})",
        table(["group", "case", "dtype", "variant", "A ms", "B ms", "B/A"], rows) if rows else "(nothing in common)",
        table(["target", "case", "dtype", "variant", "goal", "A", "B"], trows) if trows else "",
    ]).rstrip()


def update_readme(readme: Path, rendered: str) -> None:
    """Replace the text between the results markers (appending them if absent)."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n{rendered}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="one results file, or two to compare (A B)")
    ap.add_argument("--readme", type=Path, help="write the rendering between the results markers of this file")
    args = ap.parse_args(argv)
    docs = [load(f) for f in args.files]
    if len(docs) == 1:
        text = render_markdown(docs[0])
    elif len(docs) == 2:
        text = render_comparison(*docs)
    else:
        ap.error("give one or two results files")
    if args.readme:
        update_readme(args.readme, text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
