"""PNG plots of a stress sweep: loss curves, final perplexity vs learning rate, guard activity."""

from __future__ import annotations

import math
from pathlib import Path

from .arms import parse_arm

_COLORS = {"adamw": "#d62728", "adamw-clip1.0": "#ff7f0e", "adamw-clip0.5": "#bcbd22",
           "guard": "#1f77b4", "guard-clip1.0": "#17becf"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _ema(values: list, alpha: float = 0.1) -> list[float]:
    out, avg = [], None
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(math.nan)
            continue
        avg = v if avg is None else avg + alpha * (v - avg)
        out.append(avg)
    return out


def _color(arm: str, i: int) -> str:
    return _COLORS.get(arm, f"C{i % 10}")


def loss_curves(doc: dict, path: Path) -> Path:
    """Training loss (EMA) per arm, one panel per (size, lr), first seed."""
    plt = _pyplot()
    s = doc["summary"]
    seed = doc["config"]["seeds"][0]
    fig, axes = plt.subplots(len(s["sizes"]), len(s["lrs"]), figsize=(4.2 * len(s["lrs"]), 3.3 * len(s["sizes"])),
                             squeeze=False, sharey=True)
    for i, size in enumerate(s["sizes"]):
        for j, lr in enumerate(s["lrs"]):
            ax = axes[i][j]
            for k, arm in enumerate(s["arms"]):
                for r in doc["runs"]:
                    if r["size"] == size and r["lr"] == lr and r["arm"] == arm and r["seed"] == seed:
                        ax.plot(range(1, len(r["train_losses"]) + 1), _ema(r["train_losses"]),
                                label=parse_arm(arm).label, color=_color(arm, k), lw=1.2)
            ax.set_title(f"{size}, lr {lr:g}", fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("training loss (EMA, nats/token)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Training loss per arm (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ppl_vs_lr(doc: dict, path: Path) -> Path:
    """Mean final perplexity against learning rate on log axes; diverged runs drawn as x at the top."""
    plt = _pyplot()
    s = doc["summary"]
    fig, axes = plt.subplots(1, len(s["sizes"]), figsize=(5.5 * len(s["sizes"]), 4.2), squeeze=False)
    finite = [c["mean_ppl"] for size in s["sizes"] for arm in s["arms"]
              for c in s["cells"][size][arm].values() if c["mean_ppl"] is not None]
    ceiling = max(finite) * 2 if finite else 10.0
    for i, size in enumerate(s["sizes"]):
        ax = axes[0][i]
        for k, arm in enumerate(s["arms"]):
            cells = s["cells"][size][arm]
            xs = [c["lr"] for c in cells.values()]
            ys = [c["mean_ppl"] if c["mean_ppl"] is not None else ceiling for c in cells.values()]
            errs = [c["std_ppl"] or 0.0 for c in cells.values()]
            ax.errorbar(xs, ys, yerr=errs, marker="o", label=parse_arm(arm).label, color=_color(arm, k),
                        lw=1.3, capsize=3, alpha=0.9)
            for c in cells.values():
                if c["mean_ppl"] is None:
                    ax.plot([c["lr"]], [ceiling], marker="x", color=_color(arm, k), ms=10, mew=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(s["lrs"], [f"{lr:g}" for lr in s["lrs"]])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final held-out perplexity")
        ax.set_title(f"{size} (x at top: diverged)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def guard_timeline(doc: dict, path: Path) -> Path | None:
    """The guard's LR scale over time per guarded run of the first seed, with its interventions."""
    plt = _pyplot()
    seed = doc["config"]["seeds"][0]
    runs = [r for r in doc["runs"] if r.get("guard") and r["seed"] == seed]
    if not runs:
        return None
    lrs = doc["summary"]["lrs"]
    sizes = doc["summary"]["sizes"]
    fig, axes = plt.subplots(len(sizes), len(lrs), figsize=(4.2 * len(lrs), 3.3 * len(sizes)), squeeze=False,
                             sharey=True)
    markers = {}
    for i, size in enumerate(sizes):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for k, r in enumerate(x for x in runs if x["size"] == size and x["lr"] == lr):
                g = r["guard"]
                hist = sorted((int(a), b) for a, b in g["lr_scale_history"]) or [(0, 1.0)]
                steps = [h[0] for h in hist] + [r["steps_run"]]
                scales = [h[1] for h in hist] + [hist[-1][1]]
                color = _color(r["arm"], k + 3)
                ax.step(steps, scales, where="post", color=color, label=parse_arm(r["arm"]).label, lw=1.3)
                for step, action in g["intervention_steps"]:
                    m = markers.setdefault(action, "v^os*Dp"[len(markers) % 7])
                    ax.plot([step], [1.05 + 0.04 * k], marker=m, color=color, ms=5, ls="none")
            ax.set_title(f"{size}, lr {lr:g}", fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("LR scale (markers: interventions)")
            ax.set_ylim(0, 1.2)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, ls="none", color="k", label=a) for a, m in markers.items()]
    line_handles, _ = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles=line_handles + handles, fontsize=7)
    fig.suptitle(f"Guard LR scale and interventions (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict, out_dir: Path) -> list[Path]:
    paths = [loss_curves(doc, out_dir / "loss_curves.png"), ppl_vs_lr(doc, out_dir / "ppl_vs_lr.png")]
    timeline = guard_timeline(doc, out_dir / "guard_timeline.png")
    if timeline is not None:
        paths.append(timeline)
    return paths
