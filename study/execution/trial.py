"""The Tune function trainable of a study: what each trial's worker process runs.

Ray imports this module (by reference, through the pickled trainable) in every fresh trial
process, so it imports only what a trial needs: the spec model that builds the trial
config and the trial itself (:mod:`trainables.tune_trainable`). The driver's machinery
(Optuna, the Parquet store, trackers, the study-level privacy bounds) stays out of the
trial processes: importing it took seconds per process before the first step. A study
budget (``privacy.scope: study``) brings its module along when it is unpickled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainables.tune_trainable import run_trial

if TYPE_CHECKING:
    from study.privacy.private_selection import StudyBudget
    from study.spec.model import StudySpec

#: Key of a confirmation run's description (``{"params", "seed", ...}``) in its Tune config
#: (see :mod:`study.analysis.confirm`); defined here, in the light module the trial imports.
CONFIRM_KEY = "confirm_run"


def dpstudy_trial(config: dict[str, Any], spec: StudySpec,
                  budget: StudyBudget | None = None) -> None:
    """The Tune function trainable: sampled params (or a confirmation run: params and a
    seed) -> trial config (under the study budget, if any) -> one DP trial."""
    resources = spec.resources_per_trial
    if CONFIRM_KEY in config:
        run = config[CONFIRM_KEY]
        trial = spec.trial_config(run["params"], seed=run["seed"])
    else:
        trial = spec.trial_config(config)
    if budget is not None:
        from study.privacy.private_selection import study_trial_config

        trial = study_trial_config(trial, budget)
    run_trial(trial, cost_per_second=resources.cpu + resources.gpu)
