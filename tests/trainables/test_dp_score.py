"""DP validation scores: the Gaussian mechanism on the count of correct predictions, its
noise scale, its cost in the accountant and in the trial's plan."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import create_accountant
from scipy import stats

from trainables.accounting import epsilon_after, plan_budget, release_entry
from trainables.config import PrivacyConfig
from trainables.dp_score import dp_accuracy, noisy_count, release_rng


def test_noise_has_the_configured_scale() -> None:
    """20,000 seeded draws: mean = the count, std = the noise (chi-square 99.9% interval),
    and normal (Kolmogorov-Smirnov)."""
    rng = np.random.default_rng(7)
    noise, correct, n = 12.5, 371, 20_000
    draws = np.array([noisy_count(correct, noise, rng) for _ in range(n)])
    assert abs(draws.mean() - correct) < 4 * noise / math.sqrt(n)
    var = draws.var(ddof=1)
    low, high = stats.chi2.ppf([0.0005, 0.9995], n - 1) * noise**2 / (n - 1)
    assert low < var < high
    assert stats.kstest((draws - correct) / noise, "norm").pvalue > 1e-3
    # a wrong scale is caught by the same test
    assert not low < (draws.var(ddof=1) * 1.1**2) < high


def test_release_is_charged_to_the_accountant() -> None:
    for mechanism in ("rdp", "prv"):
        acc = create_accountant(mechanism)
        acc.history = [(1.1, 0.07, 120)]
        before = acc.get_epsilon(delta=1e-5)
        score = dp_accuracy(300, 400, 15.0, acc, rng=np.random.default_rng(0))
        assert 0.0 < score < 1.5
        assert acc.history[-1] == release_entry(15.0) == (15.0, 1.0, 1)
        after = acc.get_epsilon(delta=1e-5)
        assert after > before
        assert after == pytest.approx(epsilon_after(120, noise_multiplier=1.1,
                                                     sample_rate=0.07, delta=1e-5,
                                                     accountant=mechanism,
                                                     releases=(15.0,)))


def test_noise_is_not_reproducible_from_anything_written() -> None:
    assert release_rng().normal() != release_rng().normal()
    with pytest.raises(ValueError, match="validation_noise"):
        noisy_count(3, 0.0, np.random.default_rng(0))


@pytest.mark.parametrize("mode", ["noise", "epochs"])
def test_plan_reserves_the_release_and_still_spends_the_budget(mode: str) -> None:
    common = {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"}
    kind = {"noise_multiplier": 2.0} if mode == "noise" else {"epochs": 3.0}
    plain = plan_budget(PrivacyConfig(**common, **kind), sample_rate=0.07, max_epochs=30)
    with_score = plan_budget(PrivacyConfig(**common, **kind, validation_noise=8.0),
                             sample_rate=0.07, max_epochs=30)
    spent = epsilon_after(with_score.steps, noise_multiplier=with_score.noise_multiplier,
                          sample_rate=0.07, delta=1e-5, accountant="rdp", releases=(8.0,))
    assert with_score.epsilon == pytest.approx(spent)
    assert 0.97 * 2.0 <= spent <= 2.0
    if mode == "noise":
        assert with_score.steps < plain.steps
    else:
        assert with_score.noise_multiplier > plain.noise_multiplier


@pytest.mark.slow
def test_trial_releases_one_dp_score_counted_in_epsilon_spent() -> None:
    from trainables.train import train

    reports: list[dict] = []
    final = train({"seed": 1, "device": "cpu", "dataset": {"name": "mnist-5k"},
                   "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp",
                               "epochs": 1.0, "validation_noise": 10.0},
                   "optim": {"learning_rate": 2.0, "clip_norm": 1.0, "batch_size": 512,
                             "max_epochs": 1}},
                  report=lambda m, _d: reports.append(m))
    assert "val_accuracy_dp" in final and final["val_releases"] == 1
    assert abs(final["val_accuracy_dp"] - final["val_accuracy"]) < 6 * 10.0 / 400
    assert final["epsilon_spent"] <= 3.0
    assert final["epsilon_spent"] == pytest.approx(epsilon_after(
        final["steps"], noise_multiplier=final["noise_multiplier"],
        sample_rate=final["sample_rate"], delta=1e-5, accountant="rdp", releases=(10.0,)))
    assert final["budget_used"] == pytest.approx(final["epsilon_spent"] / 3.0)
