"""``dpstudy status``: the studies under a storage root and how far each has got.

Reads only what a study leaves behind (the resolved spec beside Tune's state and the
Parquet results), so it works while a study runs, after it was killed, or from a laptop.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

from study.analysis import selection
from study.spec.model import SpecError, StudySpec
from study.spec.selection import selection_metric
from study.storage.experiment import SPEC_FILE
from study.storage.read import read_trials
from trainables.config import read_yaml_file


def study_status(directory: str) -> str:
    """``NAME  done/total (stopped, failed), remaining, best METRIC VALUE``."""
    from study.privacy.private_selection import recorded_trial_count  # imports torch

    spec = StudySpec.from_dict(read_yaml_file(os.path.join(directory, SPEC_FILE), "saved spec"))
    metric, mode = selection_metric(spec)
    try:
        rows = [r for r in read_trials(spec.results_path).to_pylist()
                if r.get("study") == spec.name and selection.is_search(r)]
    except FileNotFoundError:
        rows = []
    counts = Counter(row["status"] for row in rows)
    total, problem = spec.trials, None
    if total is None:  # the drawn count of a private-selection study, if recorded yet
        try:
            total = recorded_trial_count(spec, directory)
        except SpecError as err:  # not the draw of its recorded seed
            problem = f"trial count refused: {err.problems[0]}"
    remaining = "?" if total is None else str(max(total - len(rows), 0))
    split = spec.objective.selection_split
    warning = " (SELECTED ON TEST: optimistic)" if split == "test" else ""
    if spec.selection.private:
        # its scores are private, and a stop decided after seeing them would be
        # data-dependent (the selection bound needs every drawn trial)
        best_text = "withheld (private selection)"
    elif (best := selection.best(rows, metric, mode)) is None:
        best_text = "-"
    else:
        test = best.get("test_accuracy")
        best_text = (f"{best[metric]:.4f} (test_accuracy "
                     f"{'-' if test is None else f'{test:.4f}'})")
    notes = ([problem] if problem else []) + study_privacy_lines(spec.results_path, spec.name,
                                                                 problem)
    return (f"{spec.name:<24} {len(rows)}/{'?' if total is None else total} finished "
            f"({counts['completed']} completed, {counts['stopped']} stopped early, "
            f"{counts['failed']} failed), {remaining} remaining | "
            f"best {metric} on {split}{warning} {best_text} | epsilon "
            f"{spec.privacy.epsilon:g} ({spec.privacy.scope}) | {directory}"
            + "".join(f"\n    {line}" for line in notes))


def study_privacy_lines(results: str, study: str | None = None,
                        refused: str | None = None) -> list[str]:
    """The study's (epsilon, delta) under both release models, from its Parquet metadata;
    ``refused``: why its trial count no longer checks out (no selection bound then)."""
    from study.privacy.private_selection import read_study_privacy

    try:
        recorded = read_study_privacy(results, study)
    except (OSError, ValueError):
        return []
    if recorded is None:
        return ["study privacy: not recorded (results written before study-level accounting)"]
    if refused and recorded.epsilon_selected is not None:
        recorded = dataclasses.replace(recorded, epsilon_selected=None,
                                       failed_assumptions=(refused,))
    return [f"study privacy, {line}" for line in recorded.lines()]


def results_counts(results: str | None) -> str:
    """``N completed, N stopped, N failed`` from a results location, if readable here."""
    if not results:
        return "results unknown"
    try:
        statuses = read_trials(os.path.expanduser(results)).column("status").to_pylist()
    except (OSError, ValueError):
        return "no results yet"
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("completed", "stopped", "failed"))


def submitted_statuses(address: str) -> list[str]:
    """One line per study submitted to the cluster at ``address``."""
    from study.execution.jobs import list_studies

    return [f"{row['job_id']:<40} {row['study']:<20} {row['status']:<10} "
            f"{results_counts(row['results'])}" for row in list_studies(address)]


def study_statuses(root: str) -> list[str]:
    """One status line per study under ``root`` (each experiment directory there with a
    saved spec), sorted."""
    if not os.path.isdir(root):
        return []
    return [study_status(os.path.join(root, d)) for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, SPEC_FILE))]
