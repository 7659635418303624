"""Accounting at a fixed budget: steps from sigma, sigma from epochs, never overspend."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainables import accounting, disk_cache
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


# --- calibrations kept per process and on disk ------------------------------------------

CACHED_CASES = [
    {"noise_multiplier": 1.05},                      # steps from sigma, sigma lowered
    {"noise_multiplier": 4.0},                       # the epoch cap comes first
    {"epochs": 2.0},                                 # sigma from epochs
    {"noise_multiplier": 1.2, "validation_noise": 8.0},  # one DP release reserved
]


@pytest.fixture
def plan_cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty calibration cache: on disk under ``tmp_path``, none in this process."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(accounting, "_PLANS", {})
    return tmp_path / "calibrations"


@pytest.mark.parametrize("kind", CACHED_CASES)
def test_cached_plan_is_exactly_a_fresh_calibration(plan_cache, monkeypatch, kind) -> None:
    config = PrivacyConfig(epsilon=3.0, delta=1e-5, **kind)
    common = {"sample_rate": Q, "max_epochs": 3}
    fresh = plan_budget(config, **common)
    assert accounting.cached_plan(config, **common) == fresh  # calibrated, then stored
    assert len(list(plan_cache.glob("*.json"))) == 1
    monkeypatch.setattr(accounting, "_PLANS", {})  # a fresh process: read from disk
    calls = []
    monkeypatch.setattr(accounting, "plan_budget", lambda *a, **k: calls.append(a))
    from_disk = accounting.cached_plan(config, **common)
    assert from_disk == fresh and not calls  # checked with the accountant, not recalibrated
    assert from_disk.epsilon <= config.epsilon


def test_cached_plan_keys_on_every_input(plan_cache) -> None:
    config = PrivacyConfig(epsilon=3.0, delta=1e-5, noise_multiplier=1.05, accountant="rdp")
    first = accounting.cached_plan(config, sample_rate=Q, max_epochs=3)
    other = accounting.cached_plan(config, sample_rate=Q, max_epochs=1)
    assert other == plan_budget(config, sample_rate=Q, max_epochs=1) != first
    assert len(list(plan_cache.glob("*.json"))) == 2


@pytest.mark.parametrize("tamper", [
    lambda p: p.update(noise_multiplier=p["noise_multiplier"] * 0.8),  # overspends
    lambda p: p.update(epsilon=p["epsilon"] - 0.1),                    # misreports
    lambda p: p.update(steps=p["steps"] + 1),                          # overspends
    lambda p: p.update(sample_rate=p["sample_rate"] / 2),
    lambda p: p.pop("steps"),
])
def test_a_cached_plan_that_does_not_check_out_is_calibrated_again(plan_cache, monkeypatch,
                                                                   tamper) -> None:
    config = PrivacyConfig(epsilon=3.0, delta=1e-5, noise_multiplier=1.05, accountant="rdp")
    fresh = accounting.cached_plan(config, sample_rate=Q, max_epochs=3)
    [path] = plan_cache.glob("*.json")
    stored = json.loads(path.read_text())
    tamper(stored["plan"])
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(accounting, "_PLANS", {})
    assert accounting.cached_plan(config, sample_rate=Q, max_epochs=3) == fresh
    assert json.loads(path.read_text())["plan"] == dataclasses.asdict(fresh)  # replaced
    path.write_text("{not json")
    monkeypatch.setattr(accounting, "_PLANS", {})
    assert accounting.cached_plan(config, sample_rate=Q, max_epochs=3) == fresh


def test_cached_plan_works_without_a_writable_cache(tmp_path, monkeypatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(blocked))  # a file: no folder under it
    monkeypatch.setattr(accounting, "_PLANS", {})
    config = PrivacyConfig(epsilon=3.0, delta=1e-5, epochs=2.0, accountant="rdp")
    assert accounting.cached_plan(config, sample_rate=Q, max_epochs=3) == plan_budget(
        config, sample_rate=Q, max_epochs=3)


def test_the_rdp_memo_leaves_every_calibration_unchanged(monkeypatch) -> None:
    """Opacus' own ``compute_rdp`` (no memo) plans exactly what the memoised one does."""
    from opacus.accountants.analysis import rdp

    config = PrivacyConfig(epsilon=3.0, delta=1e-5, noise_multiplier=1.05)
    memoised = plan_budget(config, sample_rate=Q, max_epochs=2)
    monkeypatch.setattr(rdp, "compute_rdp", rdp.compute_rdp.__wrapped__)
    assert plan_budget(config, sample_rate=Q, max_epochs=2) == memoised
