"""Plots of the generalization matrix, drawn from ``matrix.json``'s summary.

- ``matrix_lr_ratio.png``: final loss / best AdamW loss of the sweep against the lr multiple, one
  panel per (architecture, schedule), one line per arm (the 15% target drawn at 1.15).
- ``matrix_finetune_ratio.png``: the same for LoRA and LoRA+.
- ``matrix_faults.png``: each fault run's final loss over its clean run's, per arm and fault, one
  panel per architecture (runs that did not survive drawn as x at the top).
"""

from __future__ import annotations

import math
from pathlib import Path

from .arms import parse_arm
from .faults import LABELS as FAULT_LABELS
from .matrix_report import TARGET_10X, TARGET_FAULT
from .schedules import LABELS as SCHEDULE_LABELS

_COLORS = {"adamw": "#d62728", "adamw-clip1.0": "#ff7f0e", "skipstep": "#8c564b", "zclip": "#9467bd",
           "guard": "#1f77b4", "adamw-guardlr": "#7f7f7f"}
_CEILING = 2.0  # ratios above this (and non-finite ones) are drawn at the ceiling


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(arm: str, i: int) -> str:
    return _COLORS.get(arm, f"C{i % 10}")


def ratio_plot(doc: dict, name: str, path: Path) -> Path | None:
    s = doc["summary"].get(name)
    if not s or not s["rows"]:
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys((r["arch"], r["mode"], r["schedule"]) for r in s["rows"]))
    archs = list(dict.fromkeys(p[0] for p in panels))
    cols = list(dict.fromkeys((p[1], p[2]) for p in panels))
    fig, axes = plt.subplots(len(archs), len(cols), figsize=(3.6 * len(cols), 2.9 * len(archs)), squeeze=False,
                             sharex=True, sharey=True)
    mults = s["multiples"]
    arms = doc["summary"]["arms"]
    for i, arch in enumerate(archs):
        for j, (mode, sched) in enumerate(cols):
            ax = axes[i][j]
            for k, arm in enumerate(arms):
                row = next((r for r in s["rows"] if (r["arch"], r["mode"], r["schedule"], r["arm"])
                            == (arch, mode, sched, arm)), None)
                if row is None:
                    continue
                xs, ys, bad = [], [], []
                for m in mults:
                    c = row["cells"].get(f"{m:g}")
                    if not c:
                        continue
                    ratio = c.get("ratio_to_best")
                    if ratio is None or ratio > _CEILING:
                        bad.append(m)
                        ratio = _CEILING
                    xs.append(m)
                    ys.append(ratio)
                style = dict(lw=2.2, zorder=5) if arm == "guard" else dict(lw=1.1, alpha=0.85)
                ax.plot(xs, ys, marker="o", ms=3.5, color=_color(arm, k), label=parse_arm(arm).label, **style)
                if bad:
                    ax.plot(bad, [_CEILING] * len(bad), ls="none", marker="x", ms=8, mew=2, color=_color(arm, k))
            ax.axhline(TARGET_10X, color="k", ls=":", lw=1)
            ax.axhline(1.0, color="k", lw=0.6, alpha=0.5)
            ax.set_xscale("log")
            ax.set_xticks(mults, [f"{m:g}x" for m in mults])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_ylim(0.9, _CEILING * 1.05)
            mode_text = "" if mode == "full" else {"lora": "LoRA, ", "lora+": "LoRA+, "}.get(mode, mode + ", ")
            ax.set_title(f"{arch}: {mode_text}{SCHEDULE_LABELS.get(sched, sched)}", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("loss / best AdamW")
            if i == len(archs) - 1:
                ax.set_xlabel("lr / best AdamW lr")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Final held-out loss over the sweep's best AdamW loss (dotted: {TARGET_10X:g}; x at "
                 f"{_CEILING:g}: diverged or above)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fault_plot(doc: dict, path: Path) -> Path | None:
    s = doc["summary"].get("faults")
    if not s or not s["rows"]:
        return None
    plt = _pyplot()
    rows = [r for r in s["rows"] if r["fault"] != "clean"]
    if not rows:
        return None
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    arms = doc["summary"]["arms"]
    ncols = min(2, len(archs))
    nrows = math.ceil(len(archs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.5, 1.5 * len(faults)) * ncols, 3.6 * nrows),
                             squeeze=False, sharey=True)
    for extra in range(len(archs), nrows * ncols):
        axes[extra // ncols][extra % ncols].set_visible(False)
    width = 0.8 / max(len(arms), 1)
    for i, arch in enumerate(archs):
        ax = axes[i // ncols][i % ncols]
        for k, arm in enumerate(arms):
            for f_i, fault in enumerate(faults):
                r = next((x for x in rows if (x["arch"], x["fault"], x["arm"]) == (arch, fault, arm)), None)
                if r is None:
                    continue
                ratio = r["ratio_to_clean"]
                died = r["survived"] < r["n"] or ratio is None
                x = f_i + (k - (len(arms) - 1) / 2) * width
                h = _CEILING if died or ratio > _CEILING else ratio
                ax.bar(x, h - 1.0, bottom=1.0, width=width, color=_color(arm, k),
                       label=parse_arm(arm).label if f_i == 0 else None, alpha=0.4 if died else 0.9)
                if died:
                    ax.plot([x], [_CEILING], marker="x", color="k", ms=6, mew=1.5)
        ax.axhline(TARGET_FAULT, color="k", ls=":", lw=1)
        ax.set_xticks(range(len(faults)), [FAULT_LABELS.get(f, f).replace(" at ", "\nat ") for f in faults],
                      fontsize=7)
        ax.set_ylim(0.95, _CEILING * 1.05)
        ax.set_title(arch, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if i % ncols == 0:
            ax.set_ylabel("final loss / clean run")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Faults: final loss over the same arm's clean run (dotted: {TARGET_FAULT:g}; x: did not survive)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_matrix_plots(doc: dict, out_dir: Path) -> list[Path]:
    paths = [ratio_plot(doc, "lr", out_dir / "matrix_lr_ratio.png"),
             ratio_plot(doc, "finetune", out_dir / "matrix_finetune_ratio.png"),
             fault_plot(doc, out_dir / "matrix_faults.png")]
    return [p for p in paths if p is not None]


__all__ = ["write_matrix_plots", "ratio_plot", "fault_plot"]
