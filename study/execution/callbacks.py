"""Driver-side Tune callback: record each finished trial in Parquet and show progress.

Each finished trial is written as its own part file, after the end of the controller step
(``on_step_end``), which follows Tune's snapshot of that step: a trial is in Parquet only once
Tune's state says it ended, so a resume does not run it again (a trial recorded again
replaces its row). Writes run on a background thread (:class:`Writer`) so they never block
Tune's controller; a driver killed before the writer finished loses nothing, as the next run
or resume records every ended trial Parquet lacks. The callback is pickled into Tune's
experiment state, so it holds only plain settings and opens the store in :meth:`setup`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from study.execution.trial import CONFIRM_KEY
from study.execution.tune_state import StateBackup
from study.privacy.private_selection import study_privacy_metadata
from study.spec import hyperparameters
from study.spec.model import StudySpec
from study.spec.selection import selection_label
from study.storage.schema import EPOCHS_SCHEMA
from study.storage.store import ResultsStore

RESULT_COLUMNS = ("sample_rate", "epsilon_target", "epsilon_spent", "budget_used", "delta",
                  "accountant", "steps", "epochs", "density", "val_accuracy",
                  "best_val_accuracy", "val_loss", "test_accuracy", "best_test_accuracy",
                  "test_loss", "wall_time_s", "samples_per_s", "device", "num_params",
                  "trainable_params", "noise_multiplier", "val_accuracy_dp", "val_noise",
                  "val_releases")
EPOCH_COLUMNS = tuple(n for n in EPOCHS_SCHEMA.names if n not in ("study", "trial_id"))


def reported_config(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trial config a trial resolved and reported with its results
    (:data:`trainables.tune_trainable.CONFIG_KEY`), or None if it never reported."""
    from trainables.tune_trainable import CONFIG_KEY

    text = (result or {}).get(CONFIG_KEY)
    return json.loads(text) if text else None


def trial_row(spec: StudySpec, trial_id: str, params: dict[str, Any],
              result: dict[str, Any] | None, *, status: str,
              error: str | None = None) -> dict[str, Any]:
    """One ``trials.parquet`` row from a trial's Tune config and last result.

    The Tune config is the sampled params of a search trial, or a confirmation run
    (``{CONFIRM_KEY: {"config_id", "seed", "params"}}``), recorded under a row id derived
    from its configuration and seed so that it is never recorded twice. The hyperparameters
    are those of the trial config the trial reported (:func:`reported_config`): what it
    trained with; a trial that failed before its first report has none.
    """
    result = result or {}
    stage, config_id, seed = "search", trial_id, spec.seed
    if CONFIRM_KEY in params:
        run = params[CONFIRM_KEY]
        stage, config_id, seed, params = "confirm", run["config_id"], run["seed"], run["params"]
        trial_id = run["run_id"]
    row: dict[str, Any] = {
        "study": spec.name, "trial_id": trial_id, "status": status, "seed": seed,
        "stage": stage, "config_id": config_id, "params": json.dumps(params, sort_keys=True),
        "selection_metric": selection_label(spec),
        "selection_split": spec.objective.selection_split,
        "reproducible_noise": spec.reproducible_noise,
        "epsilon_target": spec.privacy.epsilon, "delta": spec.privacy.delta,
        "accountant": spec.privacy.accountant,
        "model": spec.model.name, "dataset": spec.dataset.name,
        # resource settings of the study, not searched
        "physical_batch_size": spec.optimizer.physical_batch_size, "precision": spec.precision,
        "node": result.get("node_ip") or result.get("hostname"), "error": error,
        "finished_at": dt.datetime.now(dt.timezone.utc),
    }
    config = reported_config(result)
    if config is not None:
        row.update(hyperparameters.recorded_values(config))
    row.update({k: result[k] for k in RESULT_COLUMNS if result.get(k) is not None})
    return row


Finished = tuple[str, dict, "dict | None", "str | None"]  # trial id, config, result, error


class Writer:
    """One daemon thread (started at the first item) that runs ``write(item)`` for each
    submitted item, in order. A daemon: a write that hangs (an object store that stopped
    answering) never keeps the interpreter from exiting; a row it did not write is
    recorded by the next ``finish`` or resume.

    The first exception stops nothing: later items are still written, and :meth:`wait`
    raises it once everything submitted so far has been attempted."""

    def __init__(self, write: Callable[[Finished], None]) -> None:
        self._write = write
        self._queue: queue.Queue[Finished] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, item: Finished) -> None:
        """Queue ``item`` for writing; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="dpstudy-parquet-writer")
            self._thread.start()
        self._queue.put(item)

    def wait(self) -> None:
        """Block until every submitted item was written; re-raise the first write's
        exception."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._write(item)
            except BaseException as err:  # noqa: BLE001 - kept for wait() to raise
                self._error = self._error or err
            finally:
                self._queue.task_done()


class StudyCallback(Callback):
    """Writes results as trials finish and prints one concise progress line."""

    interval_s = 30.0  # the progress line is printed again at least this often

    def __init__(self, spec: StudySpec, *, total: int | None = None, label: str = "") -> None:
        self.spec = spec
        self.total = spec.trials if total is None else total
        self.label = label
        # not pickled into Tune's experiment state (see __getstate__)
        self.store: ResultsStore | None = None
        self._finished: list[Finished] = []
        self._writer = Writer(lambda finished: self.record(*finished))
        self.stream: TextIO = sys.stdout
        self._last_line, self._last_time = "", 0.0
        self.backup: StateBackup | None = None
        self.events = True  # a trial started, reported, checkpointed or ended since a backup

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "total": self.total, "label": self.label}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # older pickles: no total or label (their defaults), an interval_s (now fixed)
        self.__init__(state["spec"], total=state.get("total"), label=state.get("label", ""))

    def setup(self, **info: Any) -> None:
        """Open (and merge with) the study's results at experiment start or resume."""
        self.store = ResultsStore(self.spec.results_path, self.spec.name)

    def record(self, trial_id: str, params: dict[str, Any], result: dict[str, Any] | None,
               error: str | None = None) -> None:
        """Upsert one trial (and its epochs, from the ``epoch_history`` it reports) and flush
        atomically."""
        if self.store is None:
            self.setup()
        # completed (ran its whole budget), stopped (early, by the scheduler) or failed
        status = ("failed" if error is not None
                  else "completed" if result and result.get("finished") else "stopped")
        row = trial_row(self.spec, trial_id, params, result, status=status, error=error)
        history = json.loads((result or {}).get("epoch_history") or "[]")
        self.store.add_trial(row, [{k: epoch.get(k) for k in EPOCH_COLUMNS} for epoch in history])
        self.store.metadata.update(study_privacy_metadata(self.spec, self.store))
        self.store.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events = True
        # a confirmation run that ended before finishing its budget was interrupted, not
        # stopped by a scheduler (confirmation has none): it is not an outcome to record
        if CONFIRM_KEY not in trial.config or (trial.last_result or {}).get("finished"):
            self._finished.append((trial.trial_id, dict(trial.config),
                                   dict(trial.last_result or {}), None))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events = True
        message = str(getattr(trial, "error_msg", None) or "trial failed")
        if getattr(trial, "error_file", None):  # the whole traceback, if it can be read
            with contextlib.suppress(OSError):
                message = Path(trial.error_file).read_text(encoding="utf-8")[-4000:]
        self._finished.append((trial.trial_id, dict(trial.config), dict(trial.last_result or {}),
                               message))
        print(f"[{self.spec.name}] trial {trial.trial_id} failed: "
              f"{message.strip().splitlines()[-1] if message.strip() else 'unknown error'}",
              file=self.stream, flush=True)

    def write_finished(self) -> None:
        """Hand the trials that ended in this step (after Tune's snapshot of it) to the
        writer thread; returns without waiting for the write."""
        while self._finished:
            self._writer.submit(self._finished.pop(0))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.write_finished()
        self.show_progress(trials, final=True)  # the last trial may end between two steps
        self._writer.wait()  # every trial handed to the writer is in Parquet

    def get_state(self) -> None:
        """Called by Tune right after it wrote its experiment state to the driver's staging
        folder: back that state up whole (see :mod:`study.execution.tune_state`). Returns
        None: this callback has no state of its own to save. Tune snapshots every controller
        step in which a trial changed (:func:`trainables.compat.snapshot_on_change`), and at
        the end; only steps with trial events are backed up (its state holds timestamps)."""
        if self.backup is not None and self.events:
            self.events = False
            try:
                self.backup.save()
            except OSError as err:
                print(f"[{self.spec.name}] warning: could not back up Tune's state: {err}",
                      file=sys.stderr, flush=True)

    def _trial_event(self, *args: Any, **info: Any) -> None:
        self.events = True

    on_trial_start = on_trial_result = on_checkpoint = _trial_event

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.backup is None and trials:
            storage = trials[0].storage  # the experiment's storage, the same for every trial
            self.backup = StateBackup(storage.experiment_driver_staging_path,
                                      storage.storage_filesystem, storage.experiment_fs_path)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.write_finished()
        self.show_progress(trials)

    def show_progress(self, trials: list, *, final: bool = False) -> None:
        """Print the progress line when it changed, or every ``interval_s`` while nothing
        does (not again at the end of the study if it is already shown)."""
        line = self.progress_line(trials)
        now = time.monotonic()
        if line != self._last_line or (not final and now - self._last_time > self.interval_s):
            print(line, file=self.stream, flush=True)
            self._last_line, self._last_time = line, now

    def progress_line(self, trials: list) -> str:
        """``[name] 2/8 done (1 stopped early), 2 running, 0 failed, best ...`` where best is
        over the trials that completed (withheld in a private-selection study, whose
        scores are private until the release)."""
        counts = collections.Counter(t.status for t in trials)
        metric, mode = self.spec.objective.primary
        ended = [t.last_result or {} for t in trials if t.status == "TERMINATED"]
        # completed trials only (they spent the whole budget): what the study would select;
        # a running trial's latest epoch can go down again, a stopped one spent less
        values = [r[metric] for r in ended if r.get("finished") and r.get(metric) is not None]
        stopped = sum(not r.get("finished") for r in ended)
        best_text = f"{(max if mode == 'max' else min)(values):.4f}" if values else "-"
        if self.spec.selection.private:  # counts only: scores seen mid-study invite a stop
            best_text = "withheld (private selection)"
        return (f"[{self.spec.name}{self.label}] {counts['TERMINATED']}/{self.total} done"
                f" ({stopped} stopped early), {counts['RUNNING']} running, "
                f"{counts['ERROR']} failed | best {metric} {best_text} | "
                f"epsilon target {self.spec.privacy.epsilon:g}")
