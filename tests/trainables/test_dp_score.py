"""DP validation scores: the Gaussian mechanism on the count of correct predictions, its
noise scale, its cost in the accountant and in the trial's plan."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from scipy import stats

from trainables.accounting import epsilon_after, plan_budget, release_entry
from trainables.config import DataConfig, PrivacyConfig
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


def write_idx(path: Path, array: np.ndarray) -> Path:
    """A gzip IDX file holding the uint8 ``array``."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


def gaussian_renyi(order: float, mean_p: float, std_p: float, mean_q: float,
                   std_q: float) -> float:
    """D_order(N(mean_p, std_p^2) || N(mean_q, std_q^2)), the closed form (Gil et al. 2013)."""
    var = order * std_q**2 + (1 - order) * std_p**2
    if var <= 0:  # the divergence is infinite at this order
        return math.inf
    return (math.log(std_q / std_p) + math.log(std_q**2 / var) / (2 * (order - 1))
            + order * (mean_p - mean_q) ** 2 / (2 * var))


def test_released_score_has_the_renyi_divergence_of_a_sensitivity_1_count(
        tmp_path: Path) -> None:
    """Neighbouring training sets D and D + x, x drawn into the validation split: the DP
    scores they release (noised count over the split's public nominal size) are at most
    as far apart, order by order, as dp-accounting's GaussianDpEvent(noise) says a
    sensitivity-1 count is. Dividing by the split's own size (which x changes) is not."""
    from dp_accounting.dp_event import GaussianDpEvent

    from study.privacy.bounds import StudyRdpAccountant
    from trainables.data import Split, load_datasets, validation_indices

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (100, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 100)
    for _ in range(1000):  # a new example with label 0 that the hash puts in validation
        x = rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)
        held = validation_indices(Split(torch.from_numpy(x[:, None]), torch.zeros(1,
                                  dtype=torch.int64)), 0.5)[1]
        if len(held):
            break
    loaded = []
    for name, (xs, ys) in {"d": (images, labels), "dx": (np.concatenate([images, x]),
                                                           np.r_[labels, 0])}.items():
        paths = {k: str(write_idx(tmp_path / f"{name}-{k}", a)) for k, a in
                 (("train_images", xs), ("train_labels", ys), ("test_images", images[:5]),
                  ("test_labels", labels[:5]))}
        loaded.append(load_datasets(DataConfig(name="idx", validation_fraction=0.5, **paths)))
    d, dx = loaded
    assert len(dx.validation) == len(d.validation) + 1  # x is in the validation split
    # a fixed model, "always class 0": x adds one correct prediction
    correct = [int((s.validation.labels == 0).sum()) for s in (d, dx)]
    assert correct[1] == correct[0] + 1
    noise, orders = 10.0, [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
    accountant = StudyRdpAccountant(orders=orders)
    accountant.compose(GaussianDpEvent(noise))
    allowed = accountant.rdp_curve()

    def divergences(sizes: list[int]) -> np.ndarray:
        (m0, m1), (c0, c1) = sizes, correct
        return np.array([max(gaussian_renyi(a, c0 / m0, noise / m0, c1 / m1, noise / m1),
                             gaussian_renyi(a, c1 / m1, noise / m1, c0 / m0, noise / m0))
                         for a in orders])

    released = divergences([d.nominal_validation, dx.nominal_validation])
    assert np.all(released <= allowed * (1 + 1e-9)), (released, allowed)
    split_sizes = divergences([len(d.validation), len(dx.validation)])
    assert np.any(split_sizes > allowed * 1.05)  # the old denominator leaks more
    # and the released score is the noised count over that public size
    acc = create_accountant("rdp")
    score = dp_accuracy(correct[0], d.nominal_validation, noise, acc,
                        rng=np.random.default_rng(1))
    draw = np.random.default_rng(1).normal(0.0, noise)
    assert score == pytest.approx((correct[0] + draw) / d.nominal_validation)
