"""A standalone HTML or Markdown report of one study: summary, tables and the PNG figures of
:mod:`study.report.plots` and :mod:`study.report.study_plots`, embedded by relative path."""

from __future__ import annotations

import datetime as dt
import functools
import html
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study.analysis import confirm, selection
from study.analysis.query import pareto_front, parse_pareto, to_frame
from study.report import plots, study_plots
from study.report.privacy import audit_blocks, facts_table, noise_note, privacy_blocks
from study.spec import hyperparameters
from study.spec.sections import MAXIMISED
from study.storage.read import read_epochs, read_trials
from study.storage.schema import EPOCHS_SCHEMA

FORMATS = ("html", "md")
HYPERPARAMS = hyperparameters.names(reported=True)
TOP_COLUMNS = ("trial_id", "status", *HYPERPARAMS, "epsilon_spent", "budget_used", "density",
               "val_accuracy", "test_accuracy")
FIGURES = {  # file stem -> one-sentence caption, in page order
    "accuracy_vs_prune_rate": "Final test accuracy against prune rate, coloured by drop rate "
                              "(filled: completed, hollow: stopped early; failed excluded).",
    "accuracy_vs_drop_rate": "Final test accuracy against drop rate, coloured by prune rate "
                             "(filled: completed, hollow: stopped early; failed excluded).",
    "prune_drop_heatmap": "In each prune rate × drop rate bin, the test accuracy of the "
                          "completed trial the selection metric prefers (blank: no trial).",
    "pareto_front": "Completed trials (grey) and their Pareto front (red) for the chosen "
                    "objectives.",
    "param_importances": "Optuna importances of the searched hyperparameters that vary, for "
                         "the selection metric of completed trials.",
    "learning_curves": "Test accuracy after each epoch for every trial, against epochs and "
                       "against the epsilon spent so far; the best completed trials by the "
                       "selection metric highlighted.",
    "privacy_utility": "Privacy-utility: each trial's final test (filled) and validation "
                       "(hollow) accuracy against the epsilon it spent (dashed: the target).",
    "optuna_parallel_coordinate": "Optuna's parallel-coordinate plot of the persisted Optuna "
                                  "study: each completed trial's searched values and "
                                  "objective.",
    "optuna_contour": "Optuna's contour plot of the objective over pairs of searched "
                      "parameters (the first four), from the persisted Optuna study.",
}
_CSS = ("body{font-family:sans-serif;margin:2em auto;max-width:75em;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}"
        "figcaption{color:#444;font-style:italic}")


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`build_report`: the page, the figures (stem -> path) and,
    for every figure not drawn, the reason (stem -> text)."""

    page: str
    figures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _cell(value: object) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, pd.Timestamp):
        return value.isoformat(timespec="seconds")
    return str(value)


def _values(df: pd.DataFrame, column: str) -> str:
    found = sorted({_cell(v) for v in df[column].dropna()})
    return ", ".join(found) if found else "-"


def selection_of(trials: pd.DataFrame) -> tuple[str, str, str]:
    """(metric, mode, split) the study selected on, from its rows' ``selection_metric`` and
    ``selection_split`` (files written before they existed: test accuracy, on test)."""
    metrics = trials["selection_metric"].dropna() if "selection_metric" in trials else []
    splits = trials["selection_split"].dropna() if "selection_split" in trials else []
    metric = str(metrics.iloc[0]).split(",")[0] if len(metrics) else "test_accuracy"
    split = str(splits.iloc[0]) if len(splits) else "test"
    return metric, "max" if metric in MAXIMISED else "min", split


def selection_banner(trials: pd.DataFrame) -> str:
    """One sentence naming the split the study selected on (a warning for test)."""
    metric, _, split = selection_of(trials)
    if split == "test":
        return (f"Selection was made on the TEST split ({metric}): the best test accuracy "
                f"below is optimistically biased, since the same data chose and scored it.")
    return (f"Selection was made on the {split} split ({metric}); test accuracy is reported "
            f"only, never used to choose. Validation scores on private data are not "
            f"themselves differentially private.")


def summary_rows(trials: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, value) rows summarising a study's trials frame (``TRIALS_SCHEMA`` columns)."""
    metric, mode, split = selection_of(trials)
    if "stage" in trials:
        trials = trials[trials["stage"].isna() | (trials["stage"] == "search")]
    counts = trials["status"].value_counts()
    rows = [("Study", _values(trials, "study")),
            ("Dataset / model", f"{_values(trials, 'dataset')} / {_values(trials, 'model')}")]
    rows += [(f"Trials {s}", str(int(counts.get(s, 0)))) for s in ("completed", "stopped",
                                                                   "failed")]
    rows += [("Epsilon target", _values(trials, "epsilon_target")),
             ("Delta", _values(trials, "delta")), ("Accountant", _values(trials, "accountant")),
             ("Selected on", f"{metric} ({split} split)"), ("DP noise", noise_note(trials))]
    done = trials[trials["status"] == "completed"]
    if "budget_used" in done and done["budget_used"].notna().any():
        used = done["budget_used"].dropna()
        rows.append(("Budget used (completed)", f"{used.min():.3f} to {used.max():.3f}"))
    best = selection.best(trials.to_dict("records"), metric, mode)
    if best is None:
        return [*rows, ("Best trial", "- (no completed trial yet)")]
    params = ", ".join(f"{p}={_cell(best[p])}" for p in HYPERPARAMS if p in best)
    scores = ", ".join(f"{k} {_cell(best[k])}" for k in dict.fromkeys(
        (metric, "val_accuracy", "test_accuracy")) if k in best)
    return [*rows, (f"Best by {metric}", f"trial {best['trial_id']}: {scores}"),
            ("Best hyperparameters", params)]


def _md_text(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(_md_text(str(c)) for c in df.columns) + " |",
             "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_md_text(_cell(v)) for v in row) + " |"
              for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


def render_markdown_summary(trials_df: pd.DataFrame) -> str:
    """The summary of :func:`summary_rows` as a Markdown pipe table (for the CLI)."""
    return _md_table(facts_table(summary_rows(to_frame(trials_df)))) + "\n"


def confirm_table(trials: pd.DataFrame) -> pd.DataFrame | None:
    """The confirmation summary (:func:`study.analysis.confirm.summarise`) of the runs recorded in
    ``trials``, or None when the study has none."""
    metric, mode, _ = selection_of(trials)
    rows = trials.to_dict("records")
    plan = confirm.recorded_plan(rows, metric=metric, mode=mode)
    return None if plan is None else pd.DataFrame(confirm.summarise(plan, rows))


def _load(uri: str, study: str | None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    trials = to_frame(read_trials(uri))
    epochs_uri = uri.rsplit("/", 1)[0] if uri.endswith(".parquet") else uri
    try:
        epochs = to_frame(read_epochs(epochs_uri))
    except FileNotFoundError:
        epochs = to_frame(EPOCHS_SCHEMA.empty_table())
    names = sorted(trials["study"].unique())
    if study is None and len(names) > 1:
        raise ValueError(f"{uri!r} holds several studies ({', '.join(names)}); pass study=")
    if study is not None and names and study not in names:
        raise ValueError(f"no study {study!r} in {uri!r}; found: {', '.join(names)}")
    name = study or (names[0] if names else os.path.basename(uri.rstrip("/")) or uri)
    return (trials[trials["study"] == name].reset_index(drop=True),
            epochs[epochs["study"] == name].reset_index(drop=True), name)


def _draw(trials: pd.DataFrame, epochs: pd.DataFrame, front: pd.DataFrame,
          objectives: list[tuple[str, str]], page: str,
          optuna_study: Callable[[], object]) -> ReportFiles:
    metric = selection_of(trials)[0]
    draw = {
        "accuracy_vs_prune_rate": lambda p: plots.plot_accuracy_vs(trials, p, "prune_rate",
                                                                   "drop_rate"),
        "accuracy_vs_drop_rate": lambda p: plots.plot_accuracy_vs(trials, p, "drop_rate",
                                                                  "prune_rate"),
        "prune_drop_heatmap": lambda p: plots.plot_heatmap(trials, p, metric),
        "pareto_front": lambda p: plots.plot_pareto(trials, front, objectives, p),
        "param_importances": lambda p: plots.plot_importances(
            *plots.param_importances(trials, metric), p),
        "learning_curves": lambda p: plots.plot_learning_curves(trials, epochs, p, metric),
        "privacy_utility": lambda p: study_plots.plot_privacy_utility(trials, p),
        "optuna_parallel_coordinate": lambda p: study_plots.plot_optuna(
            optuna_study(), "parallel_coordinate", p),
        "optuna_contour": lambda p: study_plots.plot_optuna(optuna_study(), "contour", p),
    }
    files = ReportFiles(page=page)
    for stem in FIGURES:
        path = os.path.join(os.path.dirname(page), f"{stem}.png")
        try:
            draw[stem](path)
            files.figures[stem] = path
        except plots.SkipFigure as why:
            files.skipped[stem] = str(why)
            if os.path.exists(path):  # a stale figure of an earlier run
                os.remove(path)
    return files


def _blocks(name: str, uri: str, trials: pd.DataFrame, front: pd.DataFrame,
            objectives: list[tuple[str, str]], files: ReportFiles,
            confirmed: pd.DataFrame | None = None) -> list[tuple]:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    metric, mode, _ = selection_of(trials)
    ranked = trials.assign(_partial=trials["status"] != "completed")
    top = ranked.sort_values(["_partial", metric], ascending=[True, mode == "min"],
                             kind="mergesort", na_position="last").head(10)
    obj_cols = [c for c, _ in objectives]
    front_cols = list(dict.fromkeys(["trial_id", *obj_cols, "prune_rate", "drop_rate",
                                     "epsilon_spent"]))
    failed = trials[trials["status"] == "failed"]
    blocks: list[tuple] = [("h1", f"Study report: {name}"),
                           ("p", selection_banner(trials)),
                           ("p", f"Results: {uri} - generated {now}"),
                           ("h2", "Summary"), ("table", facts_table(summary_rows(trials))),
                           *privacy_blocks(uri, name),
                           ("h2", f"Top 10 trials by {metric} (completed first)"),
                           ("table", top[[c for c in TOP_COLUMNS if c in top]]),
                           ("h2", "Pareto front (" + ", ".join(f"{c} {d}" for c, d in
                                                               objectives) + ")"),
                           ("table", front[front_cols]) if len(front) else
                           ("p", "No completed trial has all the objectives yet.")]
    if len(failed):
        blocks += [("h2", "Failed trials"), ("table", failed[["trial_id", "error"]])]
    if confirmed is not None:
        blocks += [("h2", "Confirmation across seeds"),
                   ("p", "The chosen configurations re-trained with fresh seeds: test "
                         "accuracy mean, standard deviation and 95% t-interval, and the "
                         "paired difference to the baseline (prune 0, drop 0) over the same "
                         "seeds."), ("table", confirmed)]
    blocks.append(("h2", "Figures"))
    if (trials["status"] == "completed").sum() == 0:
        blocks.append(("p", "No completed trials yet: the figures below show stopped trials "
                            "only." if files.figures else
                            "Nothing to plot yet: the study has no completed trials."))
    for stem, caption in FIGURES.items():
        if stem in files.figures:
            blocks.append(("figure", f"{stem}.png", caption))
        elif stem in files.skipped:
            blocks.append(("p", f"{stem}.png not drawn: {files.skipped[stem]}."))
    return blocks + audit_blocks(uri, name)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                   + "</tr>\n" for row in df.itertuples(index=False, name=None))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


#: block kind -> its (HTML, Markdown) template, filled with the block's escaped arguments
_TEMPLATES = {"h1": ("<h1>{}</h1>", "# {}"), "h2": ("<h2>{}</h2>", "## {}"),
              "p": ("<p>{}</p>", "{}"),
              "figure": ('<figure><img src="{0}" alt="{1}"><figcaption>{1}</figcaption></figure>',
                         "![{1}]({0})\n\n*{1}*")}


def _render(blocks: list[tuple], title: str, fmt: str) -> str:
    md = fmt == "md"
    escape, table = (_md_text, _md_table) if md else (html.escape, _html_table)
    body = [table(args[0]) if kind == "table" else _TEMPLATES[kind][md].format(*map(escape, args))
            for kind, *args in blocks]
    if md:
        return "\n\n".join(body) + "\n"
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>",
                      "</head>", "<body>", *body, "</body>", "</html>", ""])


def build_report(results_uri: str, out_dir: str, *, study: str | None = None,
                 pareto: list[tuple[str, str]] | None = None, fmt: str = "html"
                 ) -> ReportFiles:
    """Write the figures and ``report.<fmt>`` of one study into local ``out_dir``.

    ``results_uri`` is a results directory (local path or pyarrow.fs URI) or its
    ``trials.parquet``; ``study`` is required only when it holds several studies.
    ``pareto`` defaults to ``parse_pareto("accuracy,density")``; ``fmt`` is ``html`` or
    ``md``. A figure that cannot be drawn is listed in ``ReportFiles.skipped`` and noted
    on the page; a study without completed trials still gets a page.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}: expected one of {', '.join(FORMATS)}")
    everything, epochs, name = _load(results_uri, study)
    trials = everything.loc[[selection.is_search(r) for r in everything.to_dict("records")]]
    epochs = epochs[epochs["trial_id"].isin(trials["trial_id"])]
    objectives = list(pareto) if pareto else parse_pareto("accuracy,density")
    if "val_accuracy" in trials and trials["val_accuracy"].isna().all():
        objectives = [("test_accuracy", d) if c == "val_accuracy" else (c, d)
                      for c, d in objectives]  # results without a validation split
    front = pareto_front(trials, objectives)
    os.makedirs(out_dir, exist_ok=True)
    files = _draw(trials, epochs, front, objectives, os.path.join(out_dir, f"report.{fmt}"),
                  functools.cache(lambda: study_plots.persisted_study(results_uri, name)))
    blocks = _blocks(name, results_uri, trials, front, objectives, files,
                     confirm_table(everything))
    text = _render(blocks, f"Study report: {name}", fmt)
    plots.write_atomic(files.page, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return files
