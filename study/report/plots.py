"""The figures of a study report (see :mod:`study.report.html`), one function per PNG.

Every ``plot_*`` function takes the trials (and epochs) of one study as pandas frames,
writes one PNG to ``path`` atomically and raises :class:`SkipFigure` with a reason when
there is nothing to draw. matplotlib and optuna are imported lazily; figures are plain
``Figure`` objects (saved by Agg), so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from study.spec import hyperparameters

SEARCHED_PARAMS = hyperparameters.names(reported=True)
HEATMAP_BINS = 5
TOP_CURVES = 5


class SkipFigure(Exception):
    """Raised by a ``plot_*`` function when the data cannot make that figure."""


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.5,
               sharey: bool = False) -> tuple[Any, list]:
    """A figure (no pyplot: PNGs are drawn by Agg) and its ``ncols`` axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0])


def write_atomic(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it onto ``path``."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(fig: Any, path: str) -> None:
    """Write ``fig`` to ``path`` as a PNG atomically."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _by_epsilon(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    groups = df.groupby("epsilon_target", dropna=False, sort=True)
    return [("ε target unknown" if pd.isna(eps) else f"ε target = {eps:g}", g)
            for eps, g in groups]


def _colour_scale(values: pd.Series) -> tuple[Any, Any]:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    vals = values.dropna().astype(float)
    low, high = (vals.min(), vals.max()) if len(vals) else (0.0, 1.0)
    if low == high:
        low, high = low - 0.05, high + 0.05
    return colormaps["viridis"], Normalize(vmin=low, vmax=high)


def _scatter_group(ax: Any, g: pd.DataFrame, x: str, colour: str, scale: tuple) -> None:
    cmap, norm = scale
    for status, filled in (("completed", True), ("stopped", False)):
        s = g[g["status"] == status]
        if s.empty:
            continue
        rgba = [cmap(norm(v)) if pd.notna(v) else (0.6, 0.6, 0.6, 1.0) for v in s[colour]]
        ax.scatter(s[x].astype(float), s["test_accuracy"].astype(float), s=50,
                   facecolors=rgba if filled else "none", edgecolors=rgba, linewidths=1.5,
                   label=f"{status} ({len(s)})" + ("" if filled else ", hollow"))


def plot_accuracy_vs(trials: pd.DataFrame, path: str, x: str, colour: str) -> None:
    """Final test accuracy against ``x``, coloured by ``colour``, one panel per ε target."""
    from matplotlib.cm import ScalarMappable

    df = trials[trials["status"].isin(["completed", "stopped"])]
    df = df.dropna(subset=["test_accuracy", x])
    if df.empty:
        raise SkipFigure(f"no completed or stopped trial has both test_accuracy and {x}")
    groups = _by_epsilon(df)
    fig, axes = new_figure(len(groups), width=5.5, sharey=True)
    scale = _colour_scale(df[colour])
    for ax, (label, g) in zip(axes, groups, strict=True):
        _scatter_group(ax, g, x, colour, scale)
        ax.set(xlabel=x.replace("_", " "), ylabel="final test accuracy", title=label)
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize=8, loc="best")
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            handle.set_edgecolor("0.25")  # neutral legend markers; colour is the colorbar's
            if "hollow" not in text.get_text():
                handle.set_facecolor("0.25")
    fig.colorbar(ScalarMappable(norm=scale[1], cmap=scale[0]), ax=axes,
                 label=colour.replace("_", " "))
    fig.suptitle(f"Test accuracy vs {x.replace('_', ' ')}")
    save_png(fig, path)


def _best_grid(g: pd.DataFrame, rank_by: str = "val_accuracy") -> np.ndarray:
    """Per (prune, drop) bin, the test accuracy of the trial that ``rank_by`` (the
    selection metric, validation by default) prefers: the choice is never made on test."""
    rank_by = rank_by if rank_by in g and g[rank_by].notna().any() else "test_accuracy"
    edges = np.linspace(0.0, 1.0, HEATMAP_BINS + 1)
    grid = np.full((HEATMAP_BINS, HEATMAP_BINS), np.nan)
    chosen = np.full((HEATMAP_BINS, HEATMAP_BINS), -np.inf)
    rows = np.clip(np.digitize(g["prune_rate"].astype(float), edges) - 1, 0, HEATMAP_BINS - 1)
    cols = np.clip(np.digitize(g["drop_rate"].astype(float), edges) - 1, 0, HEATMAP_BINS - 1)
    scores = g[rank_by].astype(float).fillna(-np.inf)
    for r, c, score, acc in zip(rows, cols, scores, g["test_accuracy"].astype(float),
                                strict=True):
        if score > chosen[r, c]:
            chosen[r, c], grid[r, c] = score, acc
    return grid


def plot_heatmap(trials: pd.DataFrame, path: str, rank_by: str = "val_accuracy") -> None:
    """Per (prune rate, drop rate) bin, the test accuracy of the completed trial the
    selection metric ``rank_by`` chooses, one panel per ε."""
    from matplotlib import colormaps

    df = trials[trials["status"] == "completed"]
    df = df.dropna(subset=["test_accuracy", "prune_rate", "drop_rate"])
    if df.empty:
        raise SkipFigure("no completed trial has test_accuracy, prune_rate and drop_rate")
    groups = _by_epsilon(df)
    fig, axes = new_figure(len(groups), width=5.5, height=5.0)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    _, norm = _colour_scale(df["test_accuracy"])
    ticks = np.linspace(0.0, 1.0, HEATMAP_BINS + 1)
    for ax, (label, g) in zip(axes, groups, strict=True):
        grid = _best_grid(g, rank_by)
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", extent=(0, 1, 0, 1),
                          cmap=cmap, norm=norm, aspect="auto")
        half = 0.5 / HEATMAP_BINS
        for (r, c), acc in np.ndenumerate(grid):
            if not math.isnan(acc):
                ax.text(ticks[c] + half, ticks[r] + half, f"{acc:.3f}", ha="center",
                        va="center", fontsize=9, color="white" if norm(acc) < 0.6 else "black")
        ax.set(xticks=ticks, yticks=ticks, xlabel="drop rate (bin)",
               ylabel="prune rate (bin)", title=label)
    fig.colorbar(image, ax=axes, label="test accuracy")
    fig.suptitle(f"Test accuracy of the best trial by {rank_by}\nper prune × drop bin "
                 f"(completed trials)")
    save_png(fig, path)


def plot_pareto(trials: pd.DataFrame, front: pd.DataFrame, objectives: list[tuple[str, str]],
                path: str) -> None:
    """Completed trials as grey dots, the Pareto front highlighted (step line for 2 obj.)."""
    cols = [c for c, _ in objectives]
    done = trials[trials["status"] == "completed"].dropna(subset=cols)
    if front.empty:
        raise SkipFigure("the Pareto front is empty (no completed trial has all objectives)")
    y_col, y_dir = objectives[0]
    x_col, x_dir = objectives[1] if len(objectives) > 1 else ("rank", "min")
    if x_col == "rank":
        done = done.assign(rank=done[y_col].rank(ascending=y_dir == "min", method="first"))
        front = front.assign(rank=front[y_col].rank(ascending=y_dir == "min", method="first"))
    fig, (ax,) = new_figure()
    ax.scatter(done[x_col].astype(float), done[y_col].astype(float), s=25, color="0.65",
               label=f"completed trials ({len(done)})")
    f = front.sort_values(x_col, kind="mergesort")
    fx, fy = f[x_col].astype(float), f[y_col].astype(float)
    if len(objectives) == 2:
        ax.step(fx, fy, where="post" if x_dir == "min" else "pre", color="tab:red", lw=1.5)
    ax.scatter(fx, fy, s=60, color="tab:red", zorder=3, label=f"Pareto front ({len(f)})")
    for tid, px, py in zip(f["trial_id"], fx, fy, strict=True):
        ax.annotate(str(tid), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=f"{x_col} ({x_dir})", ylabel=f"{y_col} ({y_dir})")
    extra = " (first two shown)" if len(objectives) > 2 else ""
    ax.set_title("Pareto front: " + ", ".join(f"{c} {d}" for c, d in objectives) + extra)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def param_importances(trials: pd.DataFrame,
                      metric: str = "val_accuracy") -> tuple[dict[str, float], str]:
    """Optuna importances of the varying searched params for ``metric`` (the selection
    metric; completed trials) and the name of the evaluator that computed them.

    fANOVA first, then PED-ANOVA, then Optuna's default evaluator. Raises
    :class:`SkipFigure` when fewer than 2 trials or no varying param are available.
    """
    import optuna

    metric = metric if metric in trials and trials[metric].notna().any() else "test_accuracy"
    done = trials[trials["status"] == "completed"].dropna(subset=[metric])
    params = [p for p in SEARCHED_PARAMS if p in done and done[p].notna().all()
              and done[p].astype(float).min() < done[p].astype(float).max()]
    if len(done) < 2 or not params:
        raise SkipFigure(f"needs at least 2 completed trials and a searched param that varies "
                         f"and is set in all of them (have {len(done)} completed trial(s), "
                         f"such params: {', '.join(params) or 'none'})")
    dists = {p: optuna.distributions.FloatDistribution(float(done[p].min()), float(done[p].max()))
             for p in params}
    evaluators = {"fANOVA": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
                  "PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator,
                  "Optuna default": lambda: None}
    error: Exception | None = None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
        for _, row in done.iterrows():
            study.add_trial(optuna.trial.create_trial(
                params={p: float(row[p]) for p in params}, distributions=dists,
                value=float(row[metric])))
        for method, make in evaluators.items():
            try:
                found = optuna.importance.get_param_importances(study, evaluator=make())
            except Exception as err:  # noqa: BLE001 - try the next evaluator
                error = err
                continue
            if found and all(math.isfinite(float(v)) for v in found.values()):
                return {k: float(v) for k, v in found.items()}, f"{method}, {metric}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    raise SkipFigure(f"Optuna could not compute importances ({error or 'no finite values'})")


def plot_importances(importances: dict[str, float], method: str, path: str) -> None:
    """Horizontal bar chart of hyperparameter importances (largest on top)."""
    names = sorted(importances, key=importances.get)
    fig, (ax,) = new_figure(height=max(2.5, 0.6 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.3f}", va="center", fontsize=9)
    ax.set(xlabel="importance (normalised to sum to 1)", xlim=(0, 1.1),
           title=f"Hyperparameter importances\n({method})")
    save_png(fig, path)


def plot_learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame, path: str,
                         rank_by: str = "test_accuracy") -> None:
    """Test accuracy after each epoch of every trial, against epochs (left) and against the
    epsilon spent so far (right); the top completed trials by ``rank_by`` (the study's
    selection metric) highlighted."""
    ep = epochs.dropna(subset=["test_accuracy"]).sort_values(["trial_id", "epoch"])
    if ep.empty:
        raise SkipFigure("no epoch rows with a test accuracy")
    rank_by = rank_by if rank_by in trials and trials[rank_by].notna().any() else "test_accuracy"
    done = trials[trials["status"] == "completed"].dropna(subset=[rank_by])
    top = done.sort_values(rank_by, ascending=False, kind="mergesort").head(TOP_CURVES)
    top_ids = list(top["trial_id"])
    panels = [("epoch", "epoch")]
    if "epsilon_spent" in ep and ep["epsilon_spent"].notna().any():
        panels.append(("epsilon_spent", "ε spent"))
    fig, axes = new_figure(len(panels), width=6.0, sharey=True)
    for ax, (x, xlabel) in zip(axes, panels, strict=True):
        for tid, g in ep.groupby("trial_id", sort=False):
            if tid not in top_ids:
                ax.plot(g[x], g["test_accuracy"], color="0.7", lw=1, alpha=0.8)
        for rank, (tid, score) in enumerate(zip(top_ids, top[rank_by], strict=True), 1):
            g = ep[ep["trial_id"] == tid]
            ax.plot(g[x], g["test_accuracy"], marker="o", lw=2,
                    label=f"#{rank} {tid} ({rank_by} {score:.3f})")
        ax.plot([], [], color="0.7", label="other trials")
        ax.set(xlabel=xlabel, ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    if len(panels) > 1:
        targets = trials["epsilon_target"].dropna().unique()
        for eps in targets:
            axes[1].axvline(float(eps), color="tab:red", ls="--", lw=1)
        axes[1].set_title("vs privacy spent (dashed: ε target)", fontsize=10)
    axes[0].set_title("vs epochs", fontsize=10)
    fig.suptitle(f"Learning curves (top {len(top_ids)} completed trials by {rank_by})")
    save_png(fig, path)
