"""Report figures about the study as a whole: the privacy-utility curve (one point per trial)
and Optuna's own parallel-coordinate and contour plots of the study the searcher persisted
(:mod:`study.search.persisted`). Like :mod:`study.report.plots`, every ``plot_*`` function
writes one PNG to ``path`` or raises :class:`~study.report.plots.SkipFigure`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pandas as pd

from study.report.plots import SkipFigure, new_figure, save_png

_STATUS_STYLE = {"completed": ("o", "tab:blue"), "stopped": ("^", "tab:orange")}


def plot_privacy_utility(trials: pd.DataFrame, path: str) -> None:
    """Each trial's final test (filled) and validation (hollow) accuracy against the epsilon
    it spent, with the target budget(s) as vertical lines; failed trials excluded."""
    done = trials[trials["status"].isin(list(_STATUS_STYLE))].dropna(
        subset=["epsilon_spent", "test_accuracy"])
    if done.empty:
        raise SkipFigure("no completed or stopped trial has epsilon spent and test accuracy")
    fig, (ax,) = new_figure(width=7.0)
    for status, (marker, colour) in _STATUS_STYLE.items():
        g = done[done["status"] == status]
        if g.empty:
            continue
        ax.scatter(g["epsilon_spent"], g["test_accuracy"], marker=marker, color=colour,
                   label=f"test accuracy ({status}, {len(g)})")
        if "val_accuracy" in g and g["val_accuracy"].notna().any():
            ax.scatter(g["epsilon_spent"], g["val_accuracy"], marker=marker,
                       facecolors="none", edgecolors=colour,
                       label=f"validation accuracy ({status})")
    targets = sorted(done["epsilon_target"].dropna().unique())
    for eps in targets:
        ax.axvline(eps, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"ε target {eps:g} ", (eps, 0.02), xycoords=("data", "axes fraction"),
                    ha="right", va="bottom", fontsize=8, color="grey")
    ax.set(xlabel="epsilon spent (final)", ylabel="accuracy (final)",
           title="Privacy-utility: each trial's accuracy against the epsilon it spent")
    ax.set_xlim(0, 1.1 * max([*targets, float(done["epsilon_spent"].max())]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    save_png(fig, path)


def persisted_study(results_uri: str, name: str) -> Any:
    """The Optuna study persisted for study ``name`` whose results are at ``results_uri``
    (through the spec copy there), or None when there is none to read."""
    from study.search.persisted import load_study
    from study.spec.model import StudySpec
    from study.storage.experiment import results_spec_name
    from trainables.config import read_yaml_file

    spec_file = os.path.join(results_uri, results_spec_name(name))
    if "://" in results_uri or not os.path.isfile(spec_file):
        return None
    spec = StudySpec.from_dict(read_yaml_file(spec_file, "saved spec"))
    return load_study(os.path.join(spec.storage_path, spec.name), spec.name)


def plot_optuna(study: Any, kind: str, path: str) -> None:
    """Optuna's matplotlib ``parallel_coordinate`` or ``contour`` plot of ``study`` (on its
    first objective) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws through pyplot: never a display
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    if study is None:
        raise SkipFigure("no persisted Optuna study for these results (a URI storage, or "
                         "a study run before dpstudy kept one)")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = sorted({p for t in done for p in t.distributions})
    need = 2 if kind == "contour" else 1
    if len(done) < 2 or len(params) < need:
        raise SkipFigure(f"needs at least 2 completed Optuna trials and {need} searched "
                         f"parameter(s) (have {len(done)}, parameters: "
                         f"{', '.join(params) or 'none'})")
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": "objective 1"} if multi else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of optuna's matplotlib module
        plot = getattr(ovm, f"plot_{kind}")
        axes = plot(study, params=params[:4] if kind == "contour" else None, **target)
    fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    try:
        fig.set_size_inches(9, 6 if kind == "parallel_coordinate" else 8)
        fig.set_dpi(100)
        save_png(fig, path)
    finally:
        plt.close(fig)
