"""A trial's worker process imports the trial, not the driver's machinery."""

from __future__ import annotations

import os
import subprocess
import sys

from study.execution import callbacks, runner, trial


def test_the_trainable_lives_in_the_light_trial_module() -> None:
    assert callbacks.CONFIRM_KEY is trial.CONFIRM_KEY  # one definition
    assert runner.dpstudy_trial is trial.dpstudy_trial
    assert trial.dpstudy_trial.__module__ == "study.execution.trial"


def test_importing_the_trial_leaves_the_driver_machinery_out() -> None:
    """Ray imports the trainable's module in every fresh trial process: Optuna, trackers
    (MLflow), the study-level bounds (dp-accounting) and torchvision cost seconds there."""
    heavy = ("optuna", "mlflow", "dp_accounting", "torchvision", "study.execution.runner",
             "study.execution.callbacks", "study.privacy.private_selection")
    code = ("import sys, study.execution.trial, study.spec.model; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == ""
