"""Search space: define-by-run suggestions, the one-epoch noise floor, and early-stopped
trials kept out of a multi-objective Pareto front."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from study.space import StudySearch, check_space, noise_floor, suggest
from study.spec import SpecError, StudySpec
from trainables.accounting import epsilon_after, steps_per_epoch

SPEC: dict[str, Any] = {
    "name": "space", "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"},
    "pruning": {"criterion": ["random", "magnitude"]},
    "search": {"prune_rate": {"low": 0.0, "high": 0.9}, "drop_rate": [0.0, 0.5],
               "clip_norm": {"low": 0.1, "high": 4.0, "log": True},
               "noise_multiplier": {"low": 0.3, "high": 3.0},
               "learning_rate": 1.0, "batch_size": {"low": 128, "high": 512},
               "max_epochs": 5},
    "trials": 4,
}


def spec(**search: Any) -> StudySpec:
    data = copy.deepcopy(SPEC)
    data["search"].update(search)
    return StudySpec.from_dict(data)


def test_noise_floor_allows_exactly_one_epoch() -> None:
    s = spec()
    floor = noise_floor(s, 4000)
    for batch in (128, 512):
        q = batch / 4000
        eps = epsilon_after(steps_per_epoch(q), noise_multiplier=floor, sample_rate=q,
                            delta=1e-5, accountant="rdp")
        assert eps <= 1.0
    assert 0.3 < floor < 3.0


def test_noise_range_below_the_floor_is_rejected() -> None:
    s = spec(noise_multiplier={"low": 0.1, "high": 0.2})
    with pytest.raises(SpecError, match="search.noise_multiplier: must reach at least"):
        check_space(s, noise_floor(s, 4000))


def test_suggest_samples_searched_params_within_bounds() -> None:
    s = spec()
    floor = noise_floor(s, 4000)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        suggest(trial, space=s.parameters(), floor=floor)
        p = trial.params
        assert floor <= p["noise_multiplier"] <= 3.0
        assert 0.0 <= p["prune_rate"] <= 0.9 and p["drop_rate"] in (0.0, 0.5)
        assert isinstance(p["batch_size"], int) and 128 <= p["batch_size"] <= 512
        assert p["pruning_criterion"] in ("random", "magnitude")
        assert "learning_rate" not in p  # fixed values are not searched
        config = s.trial_config(p)
        assert config["optim"]["learning_rate"] == 1.0
        study.tell(trial, 0.5)


@pytest.mark.parametrize("multi,expected", [(True, TrialState.PRUNED),
                                            (False, TrialState.COMPLETE)])
def test_trial_stopped_early_is_pruned_for_multi_objective(multi: bool,
                                                           expected: TrialState) -> None:
    s = spec()
    search = StudySearch(space=lambda t: suggest(t, space=s.parameters(), floor=1.0),
                         metric=["test_accuracy", "density"] if multi else "test_accuracy",
                         mode=["max", "min"] if multi else "max", seed=0)
    search.suggest("stopped")
    search.suggest("finished")
    partial = {"test_accuracy": 0.99, "density": 0.01, "finished": False}
    search.on_trial_complete("stopped", result=partial)
    search.on_trial_complete("finished", result={"test_accuracy": 0.8, "density": 0.5,
                                                 "finished": True})
    states = [t.state for t in search._ot_study.trials]
    assert states == [expected, TrialState.COMPLETE]
    if multi:
        front = search._ot_study.best_trials
        assert [t.values for t in front] == [[0.8, 0.5]]
