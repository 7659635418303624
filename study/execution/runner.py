"""Run and resume studies: a spec becomes a Ray Tune experiment.

``run`` validates everything first (spec, data, the noise range that spends the budget)
and writes nothing on a bad spec. Experiment state lives under ``storage/NAME``, next to
the resolved spec (``dpstudy-spec.yaml``) that ``resume`` reads. Results go to Parquet through
:class:`study.execution.callbacks.StudyCallback`, and once more from the final
``ResultGrid`` so that no trial is ever missing. ``confirm`` re-runs the chosen
configurations over fresh seeds (:mod:`study.analysis.confirm`) as a second Tune
experiment, ``storage/NAME-confirm-<digest>``, restored rather than restarted when an
interrupted confirmation is run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import posixpath
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
from ray import tune

from study.analysis import confirm as confirmation
from study.analysis import selection
from study.execution import cluster, tune_state
from study.execution.callbacks import CONFIRM_KEY, StudyCallback
from study.execution.lock import StudyLock
from study.execution.trackers import tracker_callbacks
from study.execution.trial import dpstudy_trial
from study.privacy import private_selection
from study.search.persisted import experiment_storage
from study.search.space import NoiseBudget, check_space, make_search, noise_budget
from study.spec.model import SpecError, StudySpec, check_against_data, load_spec
from study.spec.selection import selection_metric
from study.storage.experiment import (
    SPEC_FILE,
    exists,
    experiment_dir,
    read_spec,
    results_spec_name,
    save_spec,
)
from study.storage.locations import (
    check_locations,
    filesystem,
    join_location,
    resolve_location,
    resolve_paths,
)
from study.storage.store import ResultsStore
from trainables.errors import InputError
from trainables.randomness import REPRODUCIBLE_NOISE_WARNING


class StudyExistsError(InputError, RuntimeError):
    """``run`` would overwrite an existing experiment."""


class StudyInterruptedError(KeyboardInterrupt):
    """The study was interrupted (Ctrl-C); the message says how to continue it (by default
    ``dpstudy resume DIRECTORY``)."""

    def __init__(self, name: str, directory: str, unfinished: int, *,
                 runs: str = "trial(s)", command: str | None = None) -> None:
        super().__init__(f"[{name}] interrupted with {unfinished} {runs} unfinished; "
                         f"nothing was recorded for them. Continue with: "
                         f"{command or f'dpstudy resume {directory}'}")


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
    """Load and fully validate a spec (its locations resolved, see :func:`resolve_paths`);
    returns it with the noise budget that cuts each trial's noise range to the values that
    spend the privacy budget."""
    spec = resolve_paths(load_spec(spec_path))
    check_against_data(spec, cluster=cluster)
    n = private_selection.train_size(spec)
    budget = noise_budget(spec, n)
    check_space(spec, budget, n)
    return spec, budget


def make_trainable(spec: StudySpec) -> Any:
    """``dpstudy_trial`` bound to the spec (and its study budget), with the spec's
    per-trial resources."""
    resources = {"cpu": spec.resources_per_trial.cpu, "gpu": spec.resources_per_trial.gpu}
    budget = private_selection.plan_study_budget(spec, private_selection.train_size(spec))
    return tune.with_resources(tune.with_parameters(dpstudy_trial, spec=spec, budget=budget),
                               resources)


def make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the primary objective, its clock the fraction of the budget spent (trials are
    compared at equal epsilon, whatever their noise and epochs), or None."""
    if spec.scheduler.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric, mode = spec.objective.primary
    return ASHAScheduler(time_attr="budget_used", metric=metric, mode=mode, max_t=1.0,
                         grace_period=spec.scheduler.grace_budget,
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
    """Run a new study to completion, holding its lock (:class:`study.execution.lock.StudyLock`)."""
    spec = resolve_paths(spec)
    directory = experiment_dir(spec)
    _refuse_existing(spec, directory)
    check_locations(spec)
    created = not exists(directory)
    # refused: another driver has the study (never remove its directory)
    with StudyLock(directory) as lock:
        _refuse_existing(spec, directory)  # another driver may have won the race
        try:
            # drawn (or a recorded count checked) before Ray starts: a count file not drawn
            # from its recorded seed is refused here
            count = private_selection.trial_count(spec, directory)
            cluster.init_ray(address)
            cluster.check_capacity(spec)
            if spec.reproducible_noise:
                print(f"WARNING [{spec.name}]: {REPRODUCIBLE_NOISE_WARNING}", file=sys.stderr,
                      flush=True)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            save_spec(spec, directory)
            save_spec(spec, spec.results_path, results_spec_name(spec.name))
        except BaseException:
            if created:  # nothing ran: leave nothing behind
                lock.release()
                fs, where = filesystem(directory, "storage")
                with contextlib.suppress(OSError):  # not found included
                    fs.delete_dir(where)
            raise
        if count == 0:  # a Poisson draw of 0: the study runs and releases nothing
            print(f"[{spec.name}] the drawn number of trials is 0: nothing to run", flush=True)
            return finish(spec, [], False, directory)
        spec = spec.model_copy(update={"trials": count})
        search = make_search(spec, budget, experiment_storage(directory))
        tuner = tune.Tuner(
            make_trainable(spec),
            tune_config=tune.TuneConfig(search_alg=search, scheduler=make_scheduler(spec),
                                        num_samples=spec.trials, reuse_actors=True),
            run_config=run_config(spec))
        return finish(spec, *_fit(tuner, spec), directory)


def resume(directory: str, *, address: str | None = None) -> Summary:
    """Finish an interrupted study from its experiment directory, holding its lock."""
    directory = resolve_location(directory)  # Tune restores absolute paths and URIs only
    spec = read_spec(directory)
    with StudyLock(directory):
        count = private_selection.trial_count(spec, directory)
        if count == 0:
            return finish(spec, [], False, directory)
        spec = spec.model_copy(update={"trials": count})
        cluster.init_ray(address)
        cluster.check_capacity(spec)
        if not tune.Tuner.can_restore(directory):
            raise SpecError([f"resume: no Tune experiment state in {directory!r} (the study "
                             f"was stopped before its first trial started; run it again)"])
        tuner = restore_tuner(directory, make_trainable(spec))
        return finish(spec, *_fit(tuner, spec), directory)


def restore_tuner(directory: str, trainable: Any) -> Any:
    """``Tuner.restore`` of an interrupted study, after putting back any state file a killed
    driver left truncated (see :mod:`study.execution.tune_state`; Tune would silently start
    over)."""
    fs, where = filesystem(directory, "storage")
    for name in tune_state.repair(fs, where):
        print(f"resume: {name} was damaged by the interruption; restored the driver's copy",
              file=sys.stderr)
    return tune.Tuner.restore(directory, trainable=trainable, resume_unfinished=True,
                              resume_errored=True)


def _refuse_existing(spec: StudySpec, directory: str) -> None:
    if any(exists(posixpath.join(directory, name)) for name in (SPEC_FILE, "tuner.pkl")):
        raise StudyExistsError(f"study {spec.name!r} already exists at {directory}; use "
                               f"'dpstudy resume {directory}' or choose another name")


def _fit(tuner: Any, spec: StudySpec) -> tuple[Any, bool]:
    """``tuner.fit()``, telling an interrupted fit (Ctrl-C) from a finished one; prints
    :func:`time_line` for ``spec`` when the fit returns.

    Tune catches the first SIGINT itself: it saves the experiment state with the running
    trials still RUNNING (so resume continues them), stops them and returns normally. Its
    handler then puts back the handler that was installed before ``fit``; that is how we
    know."""
    sentinel = functools.partial(signal.default_int_handler)  # Python's, but ours to spot
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, sentinel) if main else None
    started = time.perf_counter()
    try:
        grid = tuner.fit()
        print(time_line(spec, grid, time.perf_counter() - started), flush=True)
    finally:
        tune_handles_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0")
        interrupted = main and tune_handles_sigint and signal.getsignal(
            signal.SIGINT) is sentinel
        if main:
            signal.signal(signal.SIGINT, previous)
    return grid, interrupted


def time_line(spec: StudySpec, grid: Any, wall_s: float) -> str:
    """The fit's wall time next to the ideal: the trials' training time (their reported
    ``wall_time_s``, training and evaluation) divided by the concurrency."""
    train = sum(float((r.metrics or {}).get("wall_time_s") or 0.0) for r in grid)
    ideal = train / spec.max_concurrent
    ratio = f" ({wall_s / ideal:.2f}x)" if ideal > 0 else ""
    return (f"[{spec.name}] time: wall {wall_s:.1f} s; trials' training {train:.1f} s / "
            f"concurrency {spec.max_concurrent} = {ideal:.1f} s{ratio}")


def finish(spec: StudySpec, grid: Any, interrupted: bool, directory: str) -> Summary:
    """Record any trial the callback missed, then summarise the study. After Ctrl-C:
    raise :class:`StudyInterruptedError` instead, recording nothing for unfinished trials."""
    callback = StudyCallback(spec)
    callback.setup()
    known = callback.store.trial_ids()
    if interrupted:
        raise StudyInterruptedError(spec.name, directory, max(spec.trials - len(known), 0))
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        # a trial that never reported has no id here; on_trial_error recorded it already
        if trial_id and trial_id not in known:
            error = str(result.error) if result.error else None
            callback.record(trial_id, result.config or {}, result.metrics, error=error)
    rows = [r for r in callback.store.trials().to_pylist() if selection.is_search(r)]
    best = selection.best(rows, *selection_metric(spec))
    count = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed")}
    return Summary(name=spec.name, experiment=directory, results=spec.results_path,
                   best=best, **count)


# --- confirmation across seeds --------------------------------------------------------

def confirm(spec: StudySpec, *, top: int, seeds: int, baseline: str | None = None,
            address: str | None = None) -> tuple[confirmation.Plan, list[dict[str, Any]]]:
    """Re-run the ``top`` configurations (and the baseline) with ``seeds`` fresh seeds;
    rows are read from and written to ``spec.results`` (``dpstudy confirm DIR``: ``DIR``).

    Runs only what is not recorded yet; an interrupted confirmation of the same plan is
    restored from its Tune state (unfinished runs continue from their checkpoints).
    Returns the plan and its summary rows (:func:`study.analysis.confirm.summarise`)."""
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
    """Train the pending runs as a Tune experiment of their own (restored if it exists),
    holding its lock; Ctrl-C raises :class:`StudyInterruptedError` and records nothing
    for unfinished runs."""
    name = f"{spec.name}-confirm-{plan.key}"
    directory = join_location(spec.storage_path, name)
    trainable = make_trainable(spec)
    with StudyLock(directory):
        cluster.init_ray(address)
        if tune.Tuner.can_restore(directory):
            tuner = restore_tuner(directory, trainable)
        else:
            config = dataclasses.replace(
                run_config(spec), name=name,
                callbacks=[StudyCallback(spec, total=len(todo), label=" confirm"),
                           *tracker_callbacks(spec, experiment_dir(spec))])
            tuner = tune.Tuner(
                trainable, param_space={CONFIRM_KEY: tune.grid_search(todo)},
                tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent,
                                            reuse_actors=True),
                run_config=config)
        grid, interrupted = _fit(tuner, spec)
    callback = StudyCallback(spec)
    callback.setup()
    for result in grid:  # record any run the callback missed (a killed driver)
        finished = (result.metrics or {}).get("finished")
        if result.config and CONFIRM_KEY in result.config and (finished or result.error):
            error = str(result.error) if result.error else None
            callback.record(result.config[CONFIRM_KEY]["run_id"], result.config,
                            result.metrics, error=error)
    if interrupted:
        left = len(confirmation.pending(plan, callback.store.trials().to_pylist()))
        raise StudyInterruptedError(
            f"{spec.name} confirm", directory, left, runs="run(s)",
            command=f"dpstudy confirm {spec.results_path} (the same --top/--seeds)")
