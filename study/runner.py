"""Run and resume studies: a spec becomes a Ray Tune experiment.

``run`` validates everything first (spec, data, the noise range that spends the budget)
and writes nothing on a bad spec. It then builds a ``Tuner``: ``OptunaSearch``
(define-by-run, seeded) behind a ``ConcurrencyLimiter``, an optional ``ASHAScheduler``,
``tune.with_resources``, ``FailureConfig(max_failures)`` and ``CheckpointConfig``.
Experiment state lives under ``storage/NAME``, next to the resolved spec
(``dpstudy-spec.yaml``) that ``resume`` reads. Results go to Parquet through
:class:`study.callbacks.StudyCallback`, and once more from the final ``ResultGrid`` so that
no trial is ever missing. ``confirm`` re-runs the chosen configurations over fresh seeds
(:mod:`study.confirm`) as a second Tune experiment, ``storage/NAME-confirm-<digest>``,
restored rather than restarted when an interrupted confirmation is run again.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import optuna
import pyarrow.fs as pafs
import yaml
from ray import tune

from study import confirm as confirmation
from study import selection
from study.callbacks import CONFIRM_KEY, StudyCallback
from study.optuna_storage import experiment_storage
from study.space import NoiseBudget, check_space, make_search, noise_budget
from study.spec import SpecError, StudySpec, check_against_data, load_spec
from study.status import SPEC_FILE
from study.trackers import tracker_callbacks
from trainables.data import dataset_size
from trainables.tune_trainable import run_trial


class StudyExistsError(RuntimeError):
    """``run`` would overwrite an existing experiment."""


@dataclass(frozen=True)
class Summary:
    """What a finished (or resumed) study reports back."""

    name: str
    experiment: str
    results: str
    completed: int
    stopped: int
    failed: int
    best: dict[str, Any] | None


# --- preparation (nothing written) -----------------------------------------------------

def prepare(spec_path: str, *, cluster: bool = False) -> tuple[StudySpec, NoiseBudget | None]:
    """Load and fully validate a spec; returns it with the noise budget that cuts each
    trial's noise range to the values that spend the privacy budget."""
    spec = load_spec(spec_path)
    check_against_data(spec, cluster=cluster)
    budget = noise_budget(spec, dataset_size(spec.dataset, seed=spec.seed))
    check_space(spec, budget)
    return spec, budget


def experiment_dir(spec: StudySpec) -> str:
    """``storage/NAME`` (a local path or a URI)."""
    base = spec.storage_path
    return posixpath.join(base, spec.name) if "://" in base else os.path.join(base, spec.name)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _exists(path: str) -> bool:
    fs, where = _filesystem(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def save_spec(spec: StudySpec, directory: str, name: str = SPEC_FILE) -> None:
    """Write the resolved spec next to Tune's experiment state (or, named after the study,
    into its results directory, where ``dpstudy confirm RESULTS`` finds it)."""
    fs, where = _filesystem(directory)
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(posixpath.join(where, name)) as out:
        out.write(yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())


def results_spec_name(study: str) -> str:
    """File name of a study's spec copy in its results directory."""
    return f"{study}.{SPEC_FILE}"


def find_spec(location: str, study: str | None = None) -> StudySpec:
    """The spec of a study from its experiment directory (``STORAGE/NAME``) or its results
    directory (``study`` picks one when several studies share it)."""
    fs, where = _filesystem(location)
    if fs.get_file_info(posixpath.join(where, SPEC_FILE)).type == pafs.FileType.File:
        return read_spec(location)
    suffix = "." + SPEC_FILE
    infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    names = sorted(i.base_name.removesuffix(suffix) for i in infos
                   if i.base_name.endswith(suffix))
    if study is not None and study not in names:
        raise SpecError([f"study: no spec of study {study!r} in {location!r} (found: "
                         f"{', '.join(names) or 'none'})"])
    if study is None and len(names) != 1:
        found = "no study spec" if not names else f"several studies ({', '.join(names)}); " \
            "pass --study"
        raise SpecError([f"results: {location!r} holds {found} (got {location!r})"])
    with fs.open_input_stream(posixpath.join(where, results_spec_name(study or names[0]))) as f:
        return StudySpec.from_dict(yaml.safe_load(f.read().decode()))


def read_spec(directory: str) -> StudySpec:
    """The spec saved by :func:`save_spec` in an experiment directory."""
    fs, where = _filesystem(directory)
    path = posixpath.join(where, SPEC_FILE)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise SpecError([f"resume: {directory!r} is not a dpstudy experiment directory "
                         f"(no {SPEC_FILE})"])
    with fs.open_input_stream(path) as f:
        return StudySpec.from_dict(yaml.safe_load(f.read().decode()))


# --- Ray ------------------------------------------------------------------------------

def init_ray(address: str | None = None) -> None:
    """Connect to a cluster at ``address``, or start an embedded one on 127.0.0.1."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        return
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only) must be set before Ray is
    # imported; the CLI does that for local runs.
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")


def dpstudy_trial(config: dict[str, Any], spec: StudySpec) -> None:
    """The Tune function trainable: sampled params (or a confirmation run: params and a
    seed) -> trial config -> one DP trial."""
    resources = spec.resources_per_trial
    if CONFIRM_KEY in config:
        run = config[CONFIRM_KEY]
        trial = spec.trial_config(run["params"], seed=run["seed"])
    else:
        trial = spec.trial_config(config)
    run_trial(trial, cost_per_second=resources.cpu + resources.gpu)


def make_trainable(spec: StudySpec) -> Any:
    """``dpstudy_trial`` bound to the spec, with the spec's per-trial resources."""
    resources = {"cpu": spec.resources_per_trial.cpu, "gpu": spec.resources_per_trial.gpu}
    return tune.with_resources(tune.with_parameters(dpstudy_trial, spec=spec), resources)


def make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the primary objective (epochs as time), or None."""
    if spec.scheduler.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric, mode = spec.objective.primary
    p = spec.search.max_epochs or spec.search.epochs
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                         max_t=max(1, math.ceil(p.max_value())),
                         grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def run_config(spec: StudySpec) -> tune.RunConfig:
    """Where state lives, how failures retry, what checkpoints are kept, who listens."""
    return tune.RunConfig(
        name=spec.name, storage_path=spec.storage_path, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[StudyCallback(spec), *tracker_callbacks(spec, experiment_dir(spec))])


# --- run and resume -------------------------------------------------------------------

def run(spec: StudySpec, budget: NoiseBudget | None, *,
        address: str | None = None) -> Summary:
    """Run a new study to completion."""
    directory = experiment_dir(spec)
    if _exists(posixpath.join(directory, SPEC_FILE)) or _exists(
            posixpath.join(directory, "tuner.pkl")):
        raise StudyExistsError(f"study {spec.name!r} already exists at {directory}; use "
                               f"'dpstudy resume {directory}' or choose another name")
    init_ray(address)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    save_spec(spec, directory)
    save_spec(spec, spec.results_path, results_spec_name(spec.name))
    tuner = tune.Tuner(
        make_trainable(spec),
        tune_config=tune.TuneConfig(search_alg=make_search(spec, budget,
                                                           experiment_storage(directory)),
                                    scheduler=make_scheduler(spec), num_samples=spec.trials,
                                    reuse_actors=True),
        run_config=run_config(spec))
    return _finish(spec, tuner.fit(), directory)


def resume(directory: str, *, address: str | None = None) -> Summary:
    """Finish an interrupted study from its experiment directory."""
    spec = read_spec(directory)
    init_ray(address)
    if not tune.Tuner.can_restore(directory):
        raise SpecError([f"resume: no Tune experiment state in {directory!r} (the study "
                         f"was stopped before its first trial started; run it again)"])
    tuner = tune.Tuner.restore(directory, trainable=make_trainable(spec),
                               resume_unfinished=True, resume_errored=True)
    return _finish(spec, tuner.fit(), directory)


def _finish(spec: StudySpec, grid: Any, directory: str) -> Summary:
    """Record any trial the callback missed, then summarise the study."""
    callback = StudyCallback(spec)
    callback.setup()
    known = callback.store.trial_ids()
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        # a trial that never reported has no id here; on_trial_error recorded it already
        if trial_id and trial_id not in known:
            error = str(result.error) if result.error else None
            callback.record(trial_id, result.config or {}, result.metrics, error=error)
    rows = [r for r in callback.store.trials().to_pylist() if selection.is_search(r)]
    best = selection.best(rows, *spec.objective.primary)
    count = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed")}
    return Summary(name=spec.name, experiment=directory, results=spec.results_path,
                   best=best, **count)


# --- confirmation across seeds --------------------------------------------------------

def confirm(spec: StudySpec, *, top: int, seeds: int, baseline: str | None = None,
            address: str | None = None) -> tuple[confirmation.Plan, list[dict[str, Any]]]:
    """Re-run the ``top`` configurations (and the baseline) with ``seeds`` fresh seeds.

    Runs only what is not recorded yet; an interrupted confirmation of the same plan is
    restored from its Tune state (unfinished runs continue from their checkpoints).
    Returns the plan and its summary rows (:func:`study.confirm.summarise`).
    """
    from study.results import ResultsStore

    metric, mode = spec.objective.primary
    rows = ResultsStore(spec.results_path, spec.name).trials().to_pylist()
    plan = confirmation.plan(rows, metric=metric, mode=mode, top=top, seeds=seeds,
                             base_seed=spec.seed, baseline_id=baseline)
    todo = confirmation.pending(plan, rows)
    if todo:
        _run_confirmation(spec, plan, todo, address)
        rows = ResultsStore(spec.results_path, spec.name).trials().to_pylist()
    return plan, confirmation.summarise(plan, rows)


def _run_confirmation(spec: StudySpec, plan: confirmation.Plan, todo: list[dict[str, Any]],
                      address: str | None) -> None:
    init_ray(address)
    name = f"{spec.name}-confirm-{plan.key}"
    directory = posixpath.join(spec.storage_path, name) if "://" in spec.storage_path else (
        os.path.join(spec.storage_path, name))
    trainable = make_trainable(spec)
    if tune.Tuner.can_restore(directory):
        tuner = tune.Tuner.restore(directory, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        config = tune.RunConfig(
            name=name, storage_path=spec.storage_path, verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[StudyCallback(spec, total=len(todo), label=" confirm"),
                       *tracker_callbacks(spec, experiment_dir(spec))])
        tuner = tune.Tuner(
            trainable, param_space={CONFIRM_KEY: tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent,
                                        reuse_actors=True),
            run_config=config)
    grid = tuner.fit()
    callback = StudyCallback(spec)
    callback.setup()
    for result in grid:  # record any run the callback missed (a killed driver)
        finished = (result.metrics or {}).get("finished")
        if result.config and CONFIRM_KEY in result.config and (finished or result.error):
            error = str(result.error) if result.error else None
            callback.record(result.config[CONFIRM_KEY]["run_id"], result.config,
                            result.metrics, error=error)

