"""``dpstudy status``: the studies under a storage root and how far each has got.

Reads only what a study leaves behind (the resolved spec beside Tune's state and the
Parquet results), so it works while a study runs, after it was killed, or from a laptop.
"""

from __future__ import annotations

import os

from study.spec import StudySpec
from trainables.config import read_yaml_file

SPEC_FILE = "dpstudy-spec.yaml"


def find_studies(root: str) -> list[str]:
    """Experiment directories (with a saved spec) directly under ``root``, sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, SPEC_FILE)))


def study_status(directory: str) -> str:
    """``NAME  done/total (stopped, failed), remaining, best METRIC VALUE``."""
    spec = StudySpec.from_dict(read_yaml_file(os.path.join(directory, SPEC_FILE), "saved spec"))
    metric, mode = spec.objective.primary
    counts = {"completed": 0, "stopped": 0, "failed": 0}
    best = None
    try:
        from study.results import read_trials

        for row in read_trials(spec.results_path).to_pylist():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            value = row.get(metric)
            if row["status"] == "completed" and value is not None:
                better = best is None or (value > best if mode == "max" else value < best)
                best = value if better else best
    except FileNotFoundError:
        pass
    finished = sum(counts.values())
    best_text = f"{best:.4f}" if best is not None else "-"
    return (f"{spec.name:<24} {finished}/{spec.trials} finished "
            f"({counts['completed']} completed, {counts['stopped']} stopped early, "
            f"{counts['failed']} failed), {max(spec.trials - finished, 0)} remaining | "
            f"best {metric} {best_text} | epsilon {spec.privacy.epsilon:g} | {directory}")


def results_counts(results: str | None) -> str:
    """``N completed, N stopped, N failed`` from a results location, if readable here."""
    if not results:
        return "results unknown"
    try:
        from study.results import read_trials

        statuses = read_trials(os.path.expanduser(results)).column("status").to_pylist()
    except (FileNotFoundError, OSError, ValueError):
        return "no results yet"
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("completed", "stopped", "failed"))


def submitted_statuses(address: str) -> list[str]:
    """One line per study submitted to the cluster at ``address``."""
    from study.jobs import list_studies

    return [f"{row['job_id']:<40} {row['study']:<20} {row['status']:<10} "
            f"{results_counts(row['results'])}" for row in list_studies(address)]


def study_statuses(root: str) -> list[str]:
    """One status line per study under ``root``."""
    return [study_status(d) for d in find_studies(root)]
