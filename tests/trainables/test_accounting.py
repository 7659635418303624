"""Accounting at a fixed budget: steps from sigma, sigma from epochs, never overspend."""

from __future__ import annotations

import pytest

from trainables.accounting import (
    BudgetError,
    epsilon_after,
    max_steps,
    noise_for_steps,
    plan_budget,
    steps_per_epoch,
)
from trainables.config import PrivacyConfig

Q = 256 / 4000


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_max_steps_is_the_largest_t_within_budget(accountant: str) -> None:
    common = {"noise_multiplier": 1.0, "sample_rate": Q, "delta": 1e-5,
              "accountant": accountant}
    t = max_steps(target_epsilon=3.0, cap=2000, **{k: v for k, v in common.items()})
    assert 0 < t < 2000
    assert epsilon_after(t, **common) <= 3.0
    assert epsilon_after(t + 1, **common) > 3.0


def test_max_steps_respects_the_cap() -> None:
    t = max_steps(target_epsilon=50.0, delta=1e-5, sample_rate=Q, noise_multiplier=2.0,
                  accountant="rdp", cap=30)
    assert t == 30


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_round_trip_sigma_from_steps_then_steps_from_sigma(accountant: str) -> None:
    steps = 160
    sigma = noise_for_steps(target_epsilon=4.0, delta=1e-5, sample_rate=Q, steps=steps,
                            accountant=accountant)
    eps = epsilon_after(steps, noise_multiplier=sigma, sample_rate=Q, delta=1e-5,
                        accountant=accountant)
    assert eps <= 4.0
    assert eps == pytest.approx(4.0, abs=0.05)
    back = max_steps(target_epsilon=4.0, delta=1e-5, sample_rate=Q, noise_multiplier=sigma,
                     accountant=accountant, cap=10 * steps)
    assert steps <= back <= steps * 1.1


def test_plan_with_noise_spends_at_most_target_and_matches_accountant() -> None:
    config = PrivacyConfig(epsilon=3.0, delta=1e-5, accountant="prv", noise_multiplier=1.1)
    plan = plan_budget(config, sample_rate=Q, max_epochs=100)
    assert plan.epsilon <= 3.0
    assert plan.epsilon == epsilon_after(plan.steps, noise_multiplier=1.1, sample_rate=Q,
                                         delta=1e-5, accountant="prv")
    assert plan.steps >= steps_per_epoch(Q)
    assert plan.epochs == pytest.approx(plan.steps * Q)


def test_plan_with_epochs_calibrates_noise() -> None:
    config = PrivacyConfig(epsilon=2.0, delta=1e-5, accountant="rdp", epochs=5)
    plan = plan_budget(config, sample_rate=Q, max_epochs=10)
    assert plan.steps == round(5 / Q)
    assert plan.epsilon <= 2.0
    assert plan.epsilon == pytest.approx(2.0, abs=0.02)
    assert plan.noise_multiplier > 0.5


def test_max_epochs_caps_the_steps() -> None:
    config = PrivacyConfig(epsilon=8.0, delta=1e-5, noise_multiplier=2.0)
    plan = plan_budget(config, sample_rate=Q, max_epochs=2)
    assert plan.steps == int(2 / Q)
    assert plan.epsilon < 8.0


def test_too_little_noise_for_one_epoch_is_a_clear_error() -> None:
    config = PrivacyConfig(epsilon=0.5, delta=1e-5, noise_multiplier=0.3)
    with pytest.raises(BudgetError) as err:
        plan_budget(config, sample_rate=Q, max_epochs=10)
    message = str(err.value)
    assert "privacy.noise_multiplier" in message
    assert "at least one epoch" in message
    assert "0.3" in message
