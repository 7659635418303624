"""``dpstudy release``: write out only what a private-selection study's guarantee covers.

The Papernot-Steinke bound covers *the selected result*: the chosen configuration, its
model weights and its DP validation score; ``PRIVATE.txt`` in the release names what must
stay private. The bound is recomputed here from the results, the study's audits and the
checked trial count of the experiment directory; a study it does not cover (interrupted
before all its drawn trials completed, run with a count chosen by hand, audited, ...) is
refused and nothing is written.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.analysis import selection
from study.privacy.private_selection import (
    recorded_trial_count,
    study_audits,
    study_privacy_of,
    train_size,
)
from study.spec import hyperparameters
from study.spec.model import SpecError, StudySpec
from study.spec.selection import selection_metric
from trainables.errors import InputError

CONFIG_KEYS = (*hyperparameters.names(reported=True), "sample_rate", "steps", "epochs",
               *hyperparameters.names(criterion=True), "model", "dataset", "delta",
               "accountant", "val_noise")
NOTE = """What this release contains is covered by the study-level guarantee stated in
release.json (the selection bound of Papernot & Steinke 2022, computed with dp-accounting):
the chosen configuration, its final model weights and its DP validation score.

What must stay private (not covered; releasing it voids or weakens the guarantee):
- the results table (trials.parquet, epochs.parquet): every trial's scores, including the
  non-DP validation and test accuracies, and the number of trials that ran;
- the audits table (audits.parquet): each audit re-trained on the private data (a study
  with audits is not released under the selection bound at all);
- the Tune experiment directory: checkpoints (optimizer state, random generator states from
  which the DP noise could be recomputed), the trial seeds, and dpstudy-trial-count.json;
- any test-set metric of the chosen model (computed on held-out data, not DP).
"""


class ReleaseError(InputError, ValueError):
    """The study cannot be released (its guarantee does not cover a release)."""


@dataclass(frozen=True)
class Release:
    """What :func:`release` wrote."""

    directory: str
    trial_id: str
    score: float
    epsilon: float
    delta: float


def model_weights(experiment: str, trial_id: str) -> dict[str, Any]:
    """The final model weights of ``trial_id`` from its last Tune checkpoint: its parameter
    average when the trial kept one (``optim.ema_decay``), else its trained weights."""
    from trainables import checkpoint

    found = sorted(glob.glob(os.path.join(experiment, f"*{trial_id}*", "checkpoint_*")))
    if not found:
        raise ReleaseError(f"release: no checkpoint of trial {trial_id!r} under "
                           f"{experiment!r} (the experiment directory is needed for the "
                           f"model weights)")
    state = checkpoint.load(found[-1])
    average = (state.get("ema") or {}).get("average") or {}
    return {k: average.get(k, v) for k, v in state["model"].items()}


def release(spec: StudySpec, rows: list[dict[str, Any]], results: str, out: str, *,
            experiment: str) -> Release:
    """Write the chosen configuration, its weights, its DP score and the study's
    (epsilon, delta) into ``out`` (a new or empty directory), atomically."""
    if os.path.isdir(out) and os.listdir(out):
        raise ReleaseError(f"--out: must be a new or empty directory (got {out!r})")
    try:
        drawn = recorded_trial_count(spec, experiment) if spec.selection.private else None
    except SpecError as err:
        raise ReleaseError(f"release: {err.problems[0]}") from None
    privacy = study_privacy_of(spec, rows, train_size(spec), drawn=drawn,
                               audits=study_audits(results, spec.name))
    if privacy.epsilon_selected is None:
        raise ReleaseError("release: the selection bound does not apply to this study, so "
                           "no release is covered by it: "
                           + "; ".join(privacy.failed_assumptions))
    metric, mode = selection_metric(spec)
    best = selection.best(rows, metric, mode)  # the selected trial, by its DP score
    if best is None:
        raise ReleaseError(f"release: no completed trial with a {metric} to release")
    weights = model_weights(experiment, best["trial_id"])
    document = {
        "study": spec.name, "trial_id": best["trial_id"],
        "configuration": {k: best.get(k) for k in CONFIG_KEYS},
        "score": {"metric": metric, "value": best[metric]},
        "study_privacy": {"epsilon": privacy.epsilon_selected, "delta": privacy.delta,
                          "release_model": "only the selected result released",
                          "trials": spec.selection.trials.to_dict()},
    }
    _write(out, document, weights)
    return Release(directory=out, trial_id=best["trial_id"], score=best[metric],
                   epsilon=privacy.epsilon_selected, delta=privacy.delta)


def _write(out: str, document: dict[str, Any], weights: dict[str, Any]) -> None:
    import torch

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".release-", dir=parent,
                                     ignore_cleanup_errors=True) as staging:
        Path(staging, "release.json").write_text(json.dumps(document, indent=2, default=str),
                                                 encoding="utf-8")
        Path(staging, "PRIVATE.txt").write_text(NOTE, encoding="utf-8")
        torch.save(weights, os.path.join(staging, "model.pt"))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(staging, out)  # the staging name is gone: its cleanup does nothing
