"""Study-level privacy at run time, from a spec and its results (the bounds themselves are
pure functions in :mod:`study.privacy.bounds`).

- :func:`trial_count`: a private-selection study's number of trials, drawn once with a
  fresh OS-entropy seed and recorded in the (private) experiment directory, so ``resume``
  runs the same number and nothing released reveals it;
- :func:`plan_study_budget` / :func:`study_trial_config`: the calibrated per-trial noise of
  ``privacy: {scope: study}``, applied to a trial;
- :func:`study_privacy_of`: both release models for a results table, with the assumption
  checks: what ``status``, the report, the Parquet metadata and ``release`` state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import posixpath
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from study.analysis import selection
from study.privacy.bounds import (
    StudyPrivacy,
    TrialMechanism,
    calibrate_noise,
    composition_epsilon,
    draw_trial_count,
    epsilon_of,
    selection_assumptions,
    selection_epsilon,
    study_privacy,
)
from study.spec.model import SpecError, StudySpec
from study.spec.selection import validation_noise, validation_public
from study.storage.locations import filesystem
from trainables.accounting import BudgetError, cap_steps, epsilon_after, plan_budget
from trainables.config import PrivacyConfig

TRIAL_COUNT_FILE = "dpstudy-trial-count.json"
PRIVACY_METADATA_KEY = "dpstudy.study_privacy"
_BOUNDED = ("batch_size", "epochs", "max_epochs", "noise_multiplier")


# --- the number of trials -------------------------------------------------------------

def trial_count(spec: StudySpec, directory: str) -> int:
    """The drawn number of trials of a private-selection study (``spec.trials`` otherwise):
    read from ``directory`` if recorded there (and checked, :func:`recorded_trial_count`),
    else drawn and recorded."""
    if not spec.selection.private:
        return int(spec.trials)
    recorded = recorded_trial_count(spec, directory)
    if recorded is not None:
        return recorded
    fs, where = filesystem(directory, "storage")
    t = spec.selection.trials
    seed = secrets.randbits(63)  # never derived from anything written out but this file
    count = draw_trial_count(t.distribution, mean=t.mean, shape=t.shape, seed=seed)
    record = json.dumps({"trials": count, "seed": seed, "distribution": t.distribution,
                         "mean": t.mean, "shape": t.shape}).encode()
    fs.create_dir(where, recursive=True)
    path = posixpath.join(where, TRIAL_COUNT_FILE)
    if fs.type_name == "local":  # owner only, whatever the umask (an object store: its policy)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        out = os.fdopen(fd, "wb")
    else:
        out = fs.open_output_stream(path)
    with out:
        out.write(record)
    return count


def recorded_trial_count(spec: StudySpec, directory: str) -> int | None:
    """The count recorded in ``directory`` (None: none yet), refused (``SpecError``) unless
    it is the draw of its recorded seed from the spec's declared distribution: a count
    chosen by hand is a fixed number of trials, which voids the selection bound."""
    fs, where = filesystem(directory, "storage")
    path = posixpath.join(where, TRIAL_COUNT_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read().decode()
    t = spec.selection.trials
    try:
        data = json.loads(raw)
        seed, count = int(data["seed"]), int(data["trials"])
        same = (data["distribution"], data["mean"], data["shape"]) == (
            t.distribution, t.mean, t.shape)
    except (ValueError, KeyError, TypeError):
        same = False
    if not same or draw_trial_count(t.distribution, mean=t.mean, shape=t.shape,
                                    seed=seed) != count:
        raise SpecError([f"{path}: must record the trial count drawn from search.trials "
                         f"with its seed (a count not drawn so voids the selection bound) "
                         f"(got {raw.strip()[:200]})"])
    return count


# --- the possible mechanisms of one trial ---------------------------------------------

def _values(spec: StudySpec, name: str, absent: Any = None) -> list[float] | None:
    """The finite values a search parameter can take (``absent`` if absent; [] continuous)."""
    p = getattr(spec.search, name)
    if p is None:
        return absent
    if p.is_fixed():
        return [p.value]
    return list(p.choices) if p.choices is not None else []


def designs(spec: StudySpec) -> list[tuple[float, float, float | None]]:
    """Every (batch size, epochs or epoch cap, noise multiplier or None) a trial can draw."""
    epochs = _values(spec, "epochs", absent=_values(spec, "max_epochs"))
    noises = _values(spec, "noise_multiplier", absent=[None])
    return [(float(b), float(e), s)
            for b, e, s in itertools.product(_values(spec, "batch_size"), epochs, noises)]


@functools.lru_cache(maxsize=8)
def possible_mechanisms(spec: StudySpec, n: int) -> tuple[TrialMechanism, ...]:
    """Each mechanism one trial can run (under ``scope: study``, at the calibrated noise)."""
    budget = plan_study_budget(spec, n)
    val_noise = validation_noise(spec)
    out = []
    for batch, epochs, sigma in designs(spec):
        q = min(1.0, batch / n)
        if budget is not None:
            steps, sigma = cap_steps(q, epochs), budget.noise_multiplier
        else:
            config = PrivacyConfig(
                epsilon=spec.privacy.epsilon, delta=spec.privacy.delta,
                accountant=spec.privacy.accountant, noise_multiplier=sigma,
                epochs=epochs if spec.search.epochs is not None else None,
                validation_noise=val_noise)
            try:
                plan = plan_budget(config, sample_rate=q, max_epochs=epochs)
            except BudgetError:  # not admissible: no trial runs it
                continue
            steps, sigma = plan.steps, plan.noise_multiplier
        out.append(TrialMechanism(sample_rate=q, noise_multiplier=sigma, steps=steps,
                                  val_noise=val_noise, val_releases=1 if val_noise else 0))
    return tuple(out)


# --- scope: study ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class StudyBudget:
    """The calibrated per-trial noise of a ``scope: study`` study and what it implies."""

    noise_multiplier: float
    n: int
    epsilon: float  # the study bound (selection) the calibration reached
    per_trial_epsilon: float  # the worst trial's own epsilon (dp-accounting RDP)

    def describe(self, spec: StudySpec) -> str:
        """The line printed before running."""
        failed = composition_problems(spec, [])
        if failed:
            return (f"study budget epsilon={spec.privacy.epsilon:g}: withheld: {failed[0]}; "
                    f"per trial: noise multiplier {self.noise_multiplier:.4g}")
        return (f"study budget epsilon={spec.privacy.epsilon:g}, delta={spec.privacy.delta:g} "
                f"(selection bound {self.epsilon:.3f}); per trial: noise multiplier "
                f"{self.noise_multiplier:.4g}, epsilon <= {self.per_trial_epsilon:.3f}")


@functools.lru_cache(maxsize=8)
def plan_study_budget(spec: StudySpec, n: int) -> StudyBudget | None:
    """Calibrate the per-trial noise of a ``scope: study`` spec (None for scope: trial)."""
    if spec.privacy.scope != "study":
        return None
    t, val_noise = spec.selection.trials, validation_noise(spec)
    points = [(min(1.0, b / n), cap_steps(min(1.0, b / n), e)) for b, e, _ in designs(spec)]
    try:
        sigma = calibrate_noise(epsilon=spec.privacy.epsilon, delta=spec.privacy.delta,
                                designs=points, mean=t.mean, shape=t.event_shape,
                                val_noise=val_noise, val_releases=1 if val_noise else 0)
    except ValueError as err:
        raise SpecError([f"privacy.epsilon: {err} (got {spec.privacy.epsilon!r})"]) from None
    mechanisms = [TrialMechanism(sample_rate=q, noise_multiplier=sigma, steps=steps,
                                 val_noise=val_noise, val_releases=1 if val_noise else 0)
                  for q, steps in points]
    spent = selection_epsilon(mechanisms, mean=t.mean, shape=t.event_shape,
                              delta=spec.privacy.delta)
    worst = max(epsilon_of(m.event(), spec.privacy.delta) for m in mechanisms)
    return StudyBudget(noise_multiplier=sigma, n=n, epsilon=spent, per_trial_epsilon=worst)


def study_trial_config(trial: dict[str, Any], budget: StudyBudget) -> dict[str, Any]:
    """A trial config under the study budget: the calibrated noise, all the steps of its
    epochs, and as its own target exactly what its accountant says those cost."""
    privacy, optim = dict(trial["privacy"]), dict(trial["optim"])
    epochs = privacy.pop("epochs") or optim["max_epochs"]
    q = min(1.0, optim["batch_size"] / budget.n)
    noise = privacy.get("validation_noise")
    privacy.update(noise_multiplier=budget.noise_multiplier, epochs=None, epsilon=epsilon_after(
        cap_steps(q, epochs), noise_multiplier=budget.noise_multiplier, sample_rate=q,
        delta=privacy["delta"], accountant=privacy["accountant"],
        releases=(noise,) if noise else ()))
    optim["max_epochs"] = epochs
    return {**trial, "privacy": privacy, "optim": optim}


# --- the study's (epsilon, delta) -----------------------------------------------------

def mechanism_of(row: dict[str, Any]) -> TrialMechanism | None:
    """The mechanism a results row ran (None if it never took a step)."""
    if not row.get("steps") or not row.get("sample_rate") or not row.get("noise_multiplier"):
        return None
    return TrialMechanism(sample_rate=row["sample_rate"],
                          noise_multiplier=row["noise_multiplier"], steps=int(row["steps"]),
                          val_noise=row.get("val_noise"),
                          val_releases=int(row.get("val_releases") or 0))


def assumptions(spec: StudySpec, rows: list[dict[str, Any]],
                audits: list[dict[str, Any]] = ()) -> list[str]:
    """Why the selection bound does not apply to this study's design and runs (empty: it
    applies, once every drawn trial has completed: :func:`completion_problems`)."""
    failed = composition_problems(spec, rows)
    failed += selection_assumptions(
        mode=spec.selection.mode, sampler=spec.sampler, scheduler=spec.scheduler.name,
        scores_private=not validation_public(spec), scores_dp=spec.validation.dp)
    failed += [f"search.{name} is a continuous range: one trial's mechanism has no finite "
               f"worst case (give a fixed value or choices)"
               for name in _BOUNDED if _values(spec, name) == []]
    if any(r.get("stage") == "confirm" for r in rows):
        failed.append("confirmation re-runs are further releases outside the selection")
    if audits:
        failed.append(f"{len(audits)} audit runs (dpstudy audit) re-trained on the private "
                      f"data outside the selection")
    return failed


def composition_problems(spec: StudySpec, rows: list[dict[str, Any]]) -> list[str]:
    """Why not even the composition of every run bounds the study (empty: it does). With
    reproducible noise (the spec's, or any row's) every trial draws the same noise and
    batches from the spec's seed: two trials that differ only in their clip norm cancel the
    noise by a linear combination, so they are not independent mechanisms."""
    if not (spec.reproducible_noise or any(r.get("reproducible_noise") for r in rows)):
        return []
    return ["reproducible_noise is on: every trial draws the same DP noise and batches "
            "from the spec's seed, so trials can cancel each other's noise (neither the "
            "composition nor the selection bound holds; turn reproducible_noise off)"]


def completion_problems(spec: StudySpec, rows: list[dict[str, Any]],
                        drawn: int | None) -> list[str]:
    """Papernot-Steinke bound the best of *all* K drawn runs: a private-selection study
    whose search trials are not exactly its ``drawn`` K, every one completed, has stopped
    early (a stop decided after seeing results is data-dependent) and is not covered."""
    if not spec.selection.private:
        return []
    if drawn is None:
        return ["the drawn number of trials is not known (no dpstudy-trial-count.json)"]
    search = [r for r in rows if selection.is_search(r)]
    completed = sum(1 for r in search if r.get("status") == "completed")
    if len(search) == completed == drawn:
        return []
    return [f"{completed} of the {drawn} drawn search trials completed ({len(search)} "
            f"recorded): the selection bound needs every drawn trial completed, and stopping "
            f"earlier is a data-dependent stop (resume the study to finish them)"]


def study_privacy_of(spec: StudySpec, rows: list[dict[str, Any]], n: int, *,
                     drawn: int | None = None,
                     audits: list[dict[str, Any]] = ()) -> StudyPrivacy:
    """Both release models for the trials in ``rows`` (all stages) and this study's
    ``audits`` (each re-trained on the private data). ``drawn``: a private-selection
    study's verified trial count (default ``spec.trials``, which the runner sets to it)."""
    run = [m for m in map(mechanism_of, [*rows, *audits]) if m is not None]
    failed = assumptions(spec, rows, audits)
    failed += completion_problems(spec, rows, drawn if drawn is not None else spec.trials)
    t = spec.selection.trials  # set whenever nothing failed (private selection)
    not_covered = non_dp_columns(spec) + (("audits.test_accuracy",) if audits else ())
    return study_privacy(run, delta=spec.privacy.delta, failed_assumptions=failed,
                         possible=() if failed else possible_mechanisms(spec, n),
                         mean=t.mean if t else None, shape=t.event_shape if t else None,
                         not_covered=not_covered,
                         composition_failed=composition_problems(spec, rows),
                         audits=sum(1 for a in audits if mechanism_of(a) is not None))


def non_dp_columns(spec: StudySpec) -> tuple[str, ...]:
    """Columns of the results that no accountant covers (computed without noise on private
    data, or on the test data): the training loss and the test metrics always, the plain
    validation scores when the validation split is private. DP scores are covered."""
    columns = ["train_loss", "test_accuracy", "best_test_accuracy", "test_loss"]
    if not validation_public(spec):
        columns += ["val_accuracy", "best_val_accuracy", "val_loss"]
    return tuple(columns)


@functools.lru_cache(maxsize=8)
def train_size(spec: StudySpec) -> int:
    """The number n of private training examples of the spec's dataset."""
    from trainables.data import dataset_size

    return dataset_size(spec.dataset, seed=spec.seed)


def study_privacy_metadata(spec: StudySpec, store: Any) -> dict[str, str]:
    """The Parquet metadata entry stating the (epsilon, delta) of the trials in a results
    store (audits are folded in when the statement is read: :func:`read_study_privacy`)."""
    privacy = study_privacy_of(spec, store.trials().to_pylist(), train_size(spec))
    return {PRIVACY_METADATA_KEY: json.dumps(dataclasses.asdict(privacy))}


def study_audits(results: str, study: str) -> list[dict[str, Any]]:
    """The audit rows (``audits.parquet``) of ``study`` in a results location."""
    from study.storage.audits import read_audits

    try:
        return [r for r in read_audits(results).to_pylist() if r["study"] == study]
    except FileNotFoundError:
        return []


def read_study_privacy(results: str, study: str | None = None) -> StudyPrivacy | None:
    """The study's (epsilon, delta) as recorded in its Parquet metadata (None if absent),
    with the study's audit runs (each re-trained on the private data) composed into the
    composition bound, recomputed over the study's trial rows, and the selection bound
    withdrawn."""
    from study.storage.read import read_metadata, read_trials

    meta = read_metadata(results, study)
    raw = meta.get(PRIVACY_METADATA_KEY)
    if raw is None:
        return None
    fields = {f.name for f in dataclasses.fields(StudyPrivacy)}  # a newer dpstudy's: ignored
    recorded = StudyPrivacy(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in json.loads(raw).items() if k in fields})
    name = study or meta.get("dpstudy.study")
    audits = [a for a in study_audits(results, name) if mechanism_of(a)] if name else []
    if not audits:
        return recorded
    rows = [r for r in read_trials(results).to_pylist() if r["study"] == name]
    run = [m for m in map(mechanism_of, rows + audits) if m is not None]
    reason = (f"{len(audits)} audit runs (dpstudy audit) re-trained on the private data "
              f"outside the selection")
    return dataclasses.replace(
        recorded, audits=len(audits), epsilon_selected=None,
        epsilon_all=(None if recorded.epsilon_all is None
                     else composition_epsilon(run, recorded.delta)),
        failed_assumptions=tuple(dict.fromkeys([*recorded.failed_assumptions, reason])),
        not_covered=tuple(dict.fromkeys([*recorded.not_covered, "audits.test_accuracy"])))
