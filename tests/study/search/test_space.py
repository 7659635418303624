"""Search space: budget-exact noise ranges, define-by-run suggestions, the baseline trial,
and early-stopped trials kept out of a multi-objective Pareto front."""

from __future__ import annotations

import copy
import random
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from study.search.space import (
    NoiseBudget,
    StudySearch,
    baseline_point,
    check_space,
    noise_budget,
    suggest,
)
from study.spec.model import Param, SpecError, StudySpec
from trainables.accounting import epsilon_after, plan_budget, steps_per_epoch
from trainables.config import PrivacyConfig

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
N = 3600


def spec(**search: Any) -> StudySpec:
    data = copy.deepcopy(SPEC)
    data["search"].update(search)
    return StudySpec.from_dict(data)


def test_noise_interval_spends_the_budget_between_one_and_max_epochs() -> None:
    budget = noise_budget(spec(), N)
    for batch in (128, 512):
        q = batch / N
        low, high = budget.interval(batch, 5)
        assert 0 < low < high
        one = epsilon_after(steps_per_epoch(q), noise_multiplier=low, sample_rate=q,
                            delta=1e-5, accountant="rdp")
        cap = epsilon_after(int(5 / q), noise_multiplier=high, sample_rate=q, delta=1e-5,
                            accountant="rdp")
        assert 0.99 <= one <= 1.0 and 0.99 <= cap <= 1.0
    assert budget.interval(512, 5)[0] > budget.interval(128, 5)[0]  # grows with q


def test_noise_range_missing_the_interval_is_rejected_naming_field_and_interval() -> None:
    s = spec(noise_multiplier={"low": 0.1, "high": 0.2})
    with pytest.raises(SpecError) as info:
        check_space(s, noise_budget(s, N))
    assert all(p.startswith("search.noise_multiplier: must reach into [")
               for p in info.value.problems)
    assert "(got [0.1, 0.2])" in info.value.problems[0]
    too_much = spec(noise_multiplier={"low": 20.0, "high": 30.0})
    with pytest.raises(SpecError, match="spend epsilon=1 .* in one to max_epochs=5 epochs"):
        check_space(too_much, noise_budget(too_much, N))
    check_space(spec(), noise_budget(spec(), N))  # the default range overlaps: no error


def test_epochs_mode_has_no_noise_budget() -> None:
    s = StudySpec.from_dict({**copy.deepcopy(SPEC), "search": {
        **{k: v for k, v in SPEC["search"].items() if k != "noise_multiplier"},
        "epochs": 2}})
    assert noise_budget(s, N) is None
    check_space(s, None)


def test_suggest_cuts_noise_to_the_interval_of_each_trials_batch_size() -> None:
    s = spec()
    budget = noise_budget(s, N)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        suggest(trial, space=s.parameters(), budget=budget)
        p = trial.params
        low, high = budget.interval(p["batch_size"], 5)
        assert max(0.3, low) <= p["noise_multiplier"] <= min(3.0, high)
        assert 0.0 <= p["prune_rate"] <= 0.9 and p["drop_rate"] in (0.0, 0.5)
        assert isinstance(p["batch_size"], int) and 128 <= p["batch_size"] <= 512
        assert p["pruning_criterion"] in ("random", "magnitude")
        assert "learning_rate" not in p  # fixed values are not searched
        assert s.trial_config(p)["optim"]["learning_rate"] == 1.0
        study.tell(trial, 0.5)


def test_noise_choices_outside_the_interval_are_not_suggested() -> None:
    batch = {"low": 200, "high": 256}
    low, high = noise_budget(spec(), N).common_interval(Param(name="batch_size", **batch),
                                                        Param(value=5))
    assert low < high
    inside = [round(low + (high - low) * f, 4) for f in (0.25, 0.75)]
    s = spec(noise_multiplier=[0.1, *inside, 50.0], batch_size=batch)
    budget = noise_budget(s, N)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(10):
        trial = study.ask()
        suggest(trial, space=s.parameters(), budget=budget)
        seen.add(trial.params["noise_multiplier"])
        study.tell(trial, 0.5)
    assert seen == set(inside)
    with pytest.raises(SpecError, match="at least one choice must spend"):
        check_space(spec(noise_multiplier=[0.1, 50.0]), budget)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_random_specs_every_trial_spends_97_to_100_percent(accountant: str) -> None:
    """For random sigma ranges and batch sizes, a trial with the suggested noise spends
    [0.97, 1.0] of its target (what every completed trial of a study then records)."""
    rng = random.Random(accountant)
    for _ in range(2 if accountant == "prv" else 5):
        low = rng.uniform(0.3, 1.5)
        data = copy.deepcopy(SPEC)
        data["privacy"].update(accountant=accountant, epsilon=rng.choice([0.5, 1.0, 3.0, 8.0]))
        data["search"].update(noise_multiplier={"low": low, "high": low + rng.uniform(0.5, 4)},
                              batch_size={"low": 64, "high": 1024},
                              max_epochs=rng.choice([2, 3, 6]))
        s = StudySpec.from_dict(data)
        budget = noise_budget(s, N)
        try:
            check_space(s, budget)
        except SpecError:
            continue  # the range misses the interval: rejected before any trial runs
        sampler = optuna.samplers.RandomSampler(seed=rng.randrange(10**6))
        study = optuna.create_study(sampler=sampler)
        trial = study.ask()
        suggest(trial, space=s.parameters(), budget=budget)
        p = trial.params
        plan = plan_budget(PrivacyConfig(epsilon=s.privacy.epsilon, delta=1e-5,
                                         accountant=accountant,
                                         noise_multiplier=p["noise_multiplier"]),
                           sample_rate=p["batch_size"] / N,
                           max_epochs=data["search"]["max_epochs"])
        assert 0.97 <= plan.epsilon / plan.epsilon_target <= 1.0, (p, plan)


def test_baseline_point_is_plain_dp_sgd_when_zero_rates_are_allowed() -> None:
    assert baseline_point(spec()) == {"prune_rate": 0.0, "drop_rate": 0.0}
    assert baseline_point(spec(prune_rate={"low": 0.1, "high": 0.9})) == {"drop_rate": 0.0}
    assert baseline_point(spec(prune_rate=0.5, drop_rate=0.5)) == {}
    off = StudySpec.from_dict({**copy.deepcopy(SPEC), "baseline_trial": False})
    assert baseline_point(off) == {}


def test_first_trial_of_a_search_is_the_baseline() -> None:
    s = spec()
    search = StudySearch(space=lambda t: suggest(t, space=s.parameters(),
                                                  budget=NoiseBudget(1.0, 1e-5, "rdp", N)),
                         points_to_evaluate=[baseline_point(s)], metric="val_accuracy",
                         mode="max", seed=0)
    first = search.suggest("t1")
    assert first["prune_rate"] == 0.0 and first["drop_rate"] == 0.0
    second = search.suggest("t2")
    assert "noise_multiplier" in second


@pytest.mark.parametrize("multi,expected", [(True, TrialState.PRUNED),
                                            (False, TrialState.COMPLETE)])
def test_trial_stopped_early_is_pruned_for_multi_objective(multi: bool,
                                                           expected: TrialState) -> None:
    s = spec()
    search = StudySearch(space=lambda t: suggest(t, space=s.parameters()),
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
