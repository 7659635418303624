"""Experiment trackers: the spec's ``loggers`` as Ray Tune's own logger callbacks.

- ``mlflow``: one MLflow run per trial in the experiment named after the study, with the
  sampled values and the whole configuration the trial resolved as parameters, and every
  number it reports as metrics. Tracking URI: ``MLFLOW_TRACKING_URI``, else SQLite in the
  experiment directory. A trial resumed after a killed driver logs into its earlier run.
- ``tensorboard``: event files in each trial's directory under ``STORAGE/NAME``.
"""

from __future__ import annotations

import os
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback

from study.execution.callbacks import reported_config
from study.spec.model import StudySpec

MLFLOW_DB = "mlflow.db"
TRIAL_ID_TAG = "dpstudy.trial_id"


def tracking_uri(experiment: str) -> str:
    """``MLFLOW_TRACKING_URI``, else SQLite in the (local) experiment directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(
        os.path.abspath(os.path.expanduser(experiment)), MLFLOW_DB)


class StudyMLflowCallback(MLflowLoggerCallback):
    """``MLflowLoggerCallback`` that also logs the trial's resolved configuration and tags
    the run with the study and the trial id (the ``trial_id`` of the Parquet results)."""

    def __init__(self, spec: StudySpec, experiment: str) -> None:
        super().__init__(tracking_uri=tracking_uri(experiment), experiment_name=spec.name,
                         tags={"dpstudy.study": spec.name})
        self.spec = spec
        self.configured: set[Any] = set()  # trials whose reported config is logged

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks; mlflow is a module
        return {"spec": self.spec, "tracking_uri": self.tracking_uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], "")
        self.tracking_uri = state["tracking_uri"]

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:  # its run logged before a resume, if any
            from mlflow.tracking import MlflowClient

            runs = MlflowClient(tracking_uri=self.tracking_uri).search_runs(
                experiment_ids=[self.mlflow_util.experiment_id],
                filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'")
            if runs:
                self._trial_runs[trial] = runs[0].info.run_id
        self.tags = {**self.tags, TRIAL_ID_TAG: trial.trial_id}
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        config = reported_config(result)
        if config is not None and trial not in self.configured:
            self.configured.add(trial)  # the same config with every report, and on resume
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=config)
        super().log_trial_result(iteration, trial, result)


def tracker_callbacks(spec: StudySpec, experiment: str) -> list[Any]:
    """The Tune callbacks of the spec's ``loggers``, in order."""
    makers = {"mlflow": lambda: StudyMLflowCallback(spec, experiment),
              "tensorboard": TBXLoggerCallback}
    return [makers[name]() for name in spec.loggers]
