"""Figures of the trade-off benchmark (PNG, matplotlib Agg), one function per figure.

Search-trial figures use completed search trials at epsilon 3 (every one spent its budget);
the effect figure uses the confirmed configurations (mean over seeds, 95% intervals).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from study.report import plots as study_plots


def _figure(ncols: int, width: float = 5.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False, sharey=True)[0])


def _save(fig, path: Path) -> str:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return str(path)


def _search(df: pd.DataFrame) -> pd.DataFrame:
    done = df[(df["stage"] == "search") & (df["status"] == "completed")]
    done = done[done["epsilon_target"] == 3.0].copy()
    done["width"] = done["study"].str.extract(r"-w([0-9.]+)-")[0].astype(float)
    return done


def accuracy_vs(df: pd.DataFrame, x: str, path: Path) -> str | None:
    """Test accuracy of completed search trials against ``x``, one panel per width."""
    done = _search(df).dropna(subset=[x, "test_accuracy"])
    if done.empty:
        return None
    widths = sorted(done["width"].unique())
    fig, axes = _figure(len(widths))
    for ax, width in zip(axes, widths, strict=True):
        g = done[done["width"] == width]
        for arm, h in g.groupby(g["study"].str.extract(r"eps[0-9.]+-(.*)$")[0]):
            ax.scatter(h[x], h["test_accuracy"], s=30, label=arm)
        ax.set(title=f"width {width:g}x, ε = 3", xlabel=x.replace("_", " "),
               ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def effect_vs_width(rows: list[dict], path: Path) -> str | None:
    """Paired difference to the baseline (95% CI) per arm against model width (ε = 3)."""
    have = [r for r in rows if r["epsilon"] == 3.0 and "diff_vs_baseline" in r
            and not math.isnan(r.get("diff_ci95_low", math.nan))]
    if not have:
        return None
    fig, (ax,) = _figure(1, width=6.5)
    arms = sorted({r["arm"] for r in have})
    for i, arm in enumerate(arms):
        pts = sorted((r for r in have if r["arm"] == arm), key=lambda r: r["width"])
        xs = [r["width"] * (1 + 0.03 * (i - len(arms) / 2)) for r in pts]
        ys = [100 * r["diff_vs_baseline"] for r in pts]
        err = [[100 * (r["diff_vs_baseline"] - r["diff_ci95_low"]) for r in pts],
               [100 * (r["diff_ci95_high"] - r["diff_vs_baseline"]) for r in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=arm)
    ax.axhline(0, color="0.3", lw=1)
    ax.set(xscale="log", xlabel="CNN width multiplier", ylabel="accuracy − baseline (points)",
           title="Effect against model width (ε = 3; 95% CI over paired seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def draw(df: pd.DataFrame, rows: list[dict], out_dir: Path) -> dict[str, str]:
    """Every figure that the data allows; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return {}
    figures = {
        "accuracy vs prune rate": accuracy_vs(df, "prune_rate", out_dir / "acc_vs_prune.png"),
        "accuracy vs drop rate": accuracy_vs(df, "drop_rate", out_dir / "acc_vs_drop.png"),
        "accuracy vs density": accuracy_vs(df, "density", out_dir / "acc_vs_density.png"),
        "effect vs width": effect_vs_width(rows, out_dir / "effect_vs_width.png"),
    }
    both = df[df["study"].str.endswith("-eps3-both") & (df["stage"] == "search")]
    for study, g in both.groupby("study"):
        path = out_dir / f"heatmap_{study}.png"
        try:
            study_plots.plot_heatmap(g, str(path))
            figures[f"prune × drop heat map ({study})"] = str(path)
        except study_plots.SkipFigure:
            pass
    return {k: v for k, v in figures.items() if v}
