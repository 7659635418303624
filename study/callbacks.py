"""Driver-side Tune callback: record each finished trial in Parquet and show progress.

Rows are written as trials finish (``on_trial_complete`` / ``on_trial_error``), each
followed by an atomic flush, so a killed driver keeps every trial that finished before
it died. Rows are upserted by trial id, so a trial recorded again after a resume is
replaced, never duplicated. The callback is pickled into Tune's experiment state and
restored by ``dpstudy resume``; it therefore holds only plain settings and opens the
results store lazily in :meth:`StudyCallback.setup`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from study.results import ResultsStore
from study.spec import StudySpec

PARAM_COLUMNS = ("prune_rate", "drop_rate", "clip_norm", "learning_rate", "batch_size")
RESULT_COLUMNS = ("sample_rate", "epsilon_target", "epsilon_spent", "delta", "accountant",
                  "steps", "epochs", "density", "test_accuracy", "best_test_accuracy",
                  "test_loss", "wall_time_s", "samples_per_s", "device", "num_params",
                  "trainable_params", "noise_multiplier")
EPOCH_COLUMNS = ("epoch", "test_accuracy", "test_loss", "train_loss", "epsilon_spent",
                 "steps", "wall_time_s", "samples_per_s")


def trial_status(result: dict[str, Any] | None, error: bool) -> str:
    """completed (ran its whole budget), stopped (early, by the scheduler) or failed."""
    if error:
        return "failed"
    return "completed" if result and result.get("finished") else "stopped"


def trial_row(spec: StudySpec, trial_id: str, params: dict[str, Any],
              result: dict[str, Any] | None, *, status: str,
              error: str | None = None) -> dict[str, Any]:
    """One ``trials.parquet`` row from a trial's sampled params and last result."""
    result = result or {}
    config = spec.trial_config(params)
    row: dict[str, Any] = {
        "study": spec.name, "trial_id": trial_id, "status": status, "seed": config["seed"],
        "reproducible_noise": config["reproducible_noise"],
        "noise_multiplier": config["privacy"]["noise_multiplier"],
        "epsilon_target": spec.privacy.epsilon, "delta": spec.privacy.delta,
        "accountant": spec.privacy.accountant,
        "pruning_criterion": config["pruning"]["criterion"],
        "pruning_scope": config["pruning"]["scope"],
        "pruning_granularity": config["pruning"]["granularity"],
        "dropping_criterion": config["dropping"]["criterion"],
        "model": spec.model.name, "dataset": spec.dataset.name,
        "node": result.get("node_ip") or result.get("hostname"), "error": error,
        "finished_at": dt.datetime.now(dt.timezone.utc),
    }
    row.update({"prune_rate": config["pruning"]["rate"], "drop_rate": config["dropping"]["rate"],
                "clip_norm": config["optim"]["clip_norm"],
                "learning_rate": config["optim"]["learning_rate"],
                "batch_size": config["optim"]["batch_size"]})
    row.update({k: result[k] for k in RESULT_COLUMNS if result.get(k) is not None})
    return row


def epoch_rows(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``epochs.parquet`` rows from the ``epoch_history`` a trial reports."""
    history = json.loads((result or {}).get("epoch_history") or "[]")
    return [{k: epoch.get(k) for k in EPOCH_COLUMNS} for epoch in history]


class StudyCallback(Callback):
    """Writes results as trials finish and prints one concise progress line."""

    def __init__(self, spec: StudySpec, *, interval_s: float = 30.0) -> None:
        self.spec = spec
        self.interval_s = interval_s
        self._transient()

    def _transient(self) -> None:
        self.store: ResultsStore | None = None
        self.stream: TextIO = sys.stdout
        self._last_line, self._last_time = "", 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "interval_s": self.interval_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._transient()

    def setup(self, **info: Any) -> None:
        """Open (and merge with) the study's results at experiment start or resume."""
        self.store = ResultsStore(self.spec.results_path, self.spec.name)

    def record(self, trial_id: str, params: dict[str, Any], result: dict[str, Any] | None,
               *, error: str | None = None) -> None:
        """Upsert one trial (and its epochs) and flush atomically."""
        if self.store is None:
            self.setup()
        status = trial_status(result, error is not None)
        row = trial_row(self.spec, trial_id, params, result, status=status, error=error)
        self.store.add_trial(row, epoch_rows(result))
        self.store.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial.trial_id, trial.config, trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        message = _error_text(trial)
        self.record(trial.trial_id, trial.config, trial.last_result, error=message)
        print(f"[{self.spec.name}] trial {trial.trial_id} failed: "
              f"{message.strip().splitlines()[-1] if message.strip() else 'unknown error'}",
              file=self.stream, flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        line = self.progress_line(trials)
        now = time.monotonic()
        if line != self._last_line or now - self._last_time > self.interval_s:
            print(line, file=self.stream, flush=True)
            self._last_line, self._last_time = line, now

    def progress_line(self, trials: list) -> str:
        """``[name] 2/8 done (1 stopped early), 2 running, 0 failed, best ...``."""
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        metric, mode = self.spec.objective.primary
        values = [t.last_result.get(metric) for t in trials
                  if t.last_result and t.last_result.get(metric) is not None]
        best = (max(values) if mode == "max" else min(values)) if values else None
        stopped = sum(1 for t in trials if t.status == "TERMINATED"
                      and not (t.last_result or {}).get("finished"))
        best_text = f"{best:.4f}" if best is not None else "-"
        return (f"[{self.spec.name}] {counts.get('TERMINATED', 0)}/{self.spec.trials} done"
                f" ({stopped} stopped early), {counts.get('RUNNING', 0)} running, "
                f"{counts.get('ERROR', 0)} failed | best {metric} {best_text} | "
                f"epsilon target {self.spec.privacy.epsilon:g}")


def _error_text(trial: Any) -> str:
    error_file = getattr(trial, "error_file", None)
    if error_file:
        try:
            with open(error_file, encoding="utf-8") as f:
                return f.read()[-4000:]
        except OSError:
            pass
    return str(getattr(trial, "error_msg", None) or "trial failed")
