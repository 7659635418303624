"""``dpstudy status``: the studies under a storage root and how far each has got.

Reads only what a study leaves behind (the resolved spec beside Tune's state and the
Parquet results), so it works while a study runs, after it was killed, or from a laptop.
"""

from __future__ import annotations

import os

from study.spec.model import StudySpec
from study.storage.experiment import SPEC_FILE
from trainables.config import read_yaml_file


def find_studies(root: str) -> list[str]:
    """Experiment directories (with a saved spec) directly under ``root``, sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, SPEC_FILE)))


def study_status(directory: str) -> str:
    """``NAME  done/total (stopped, failed), remaining, best METRIC VALUE``."""
    spec = StudySpec.from_dict(read_yaml_file(os.path.join(directory, SPEC_FILE), "saved spec"))
    from study.analysis import selection
    from study.spec.selection import selection_metric

    metric, mode = selection_metric(spec)
    counts = {"completed": 0, "stopped": 0, "failed": 0}
    rows: list[dict] = []
    try:
        from study.storage.read import read_trials

        rows = [r for r in read_trials(spec.results_path).to_pylist()
                if r.get("study") == spec.name and selection.is_search(r)]
    except FileNotFoundError:
        pass
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    finished = sum(counts.values())
    split = spec.objective.selection_split
    warning = " (SELECTED ON TEST: optimistic)" if split == "test" else ""
    total, problem = (spec.trials, None) if spec.trials is not None else \
        recorded_trial_count(spec, directory)
    total_text = "?" if total is None else str(total)
    remaining = "?" if total is None else str(max(total - finished, 0))
    return (f"{spec.name:<24} {finished}/{total_text} finished "
            f"({counts['completed']} completed, {counts['stopped']} stopped early, "
            f"{counts['failed']} failed), {remaining} remaining | "
            f"best {metric} on {split}{warning} {best_text(spec, rows, metric, mode)} | epsilon "
            f"{spec.privacy.epsilon:g} ({spec.privacy.scope}) | {directory}"
            + "".join(f"\n    {line}" for line in ([problem] if problem else [])
                      + study_privacy_lines(spec.results_path, spec.name, problem)))


def best_text(spec: StudySpec, rows: list[dict], metric: str, mode: str) -> str:
    """The best trial's ``VALUE (test_accuracy VALUE)``; for a private-selection study
    ``withheld``: its scores are private, and a stop decided after seeing them would be
    data-dependent (the selection bound needs every drawn trial)."""
    from study.analysis import selection

    if spec.selection.private:
        return "withheld (private selection)"
    best = selection.best(rows, metric, mode)
    value = "-" if best is None else f"{best[metric]:.4f} (test_accuracy " + (
        f"{best['test_accuracy']:.4f})" if best.get("test_accuracy") is not None else "-)")
    return value


def recorded_trial_count(spec: StudySpec, directory: str) -> tuple[int | None, str | None]:
    """The drawn number of trials of a private-selection study, if recorded yet, and why a
    recorded count was refused (not the draw of its recorded seed)."""
    from study.privacy.private_selection import recorded_trial_count as checked
    from study.spec.model import SpecError

    try:
        return checked(spec, directory), None
    except SpecError as err:
        return None, f"trial count refused: {err.problems[0]}"


def study_privacy_lines(results: str, study: str | None = None,
                        refused: str | None = None) -> list[str]:
    """The study's (epsilon, delta) under both release models, from its Parquet metadata;
    ``refused``: why its trial count no longer checks out (no selection bound then)."""
    import dataclasses

    from study.privacy.private_selection import read_study_privacy

    try:
        recorded = read_study_privacy(results, study)
    except (FileNotFoundError, OSError, ValueError):
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
        from study.storage.read import read_trials

        statuses = read_trials(os.path.expanduser(results)).column("status").to_pylist()
    except (FileNotFoundError, OSError, ValueError):
        return "no results yet"
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("completed", "stopped", "failed"))


def submitted_statuses(address: str) -> list[str]:
    """One line per study submitted to the cluster at ``address``."""
    from study.execution.jobs import list_studies

    return [f"{row['job_id']:<40} {row['study']:<20} {row['status']:<10} "
            f"{results_counts(row['results'])}" for row in list_studies(address)]


def study_statuses(root: str) -> list[str]:
    """One status line per study under ``root``."""
    return [study_status(d) for d in find_studies(root)]
