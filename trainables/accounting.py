"""Privacy accounting at a fixed budget, on Opacus' accountants (no hand-written math).

DP-SGD with Poisson sampling rate ``q`` and noise multiplier ``sigma`` spends a budget
``epsilon(T)`` after ``T`` steps, increasing in ``T``. A trial is given a target
``(epsilon, delta)`` and one of:

- ``sigma``: it may take the largest ``T`` with ``epsilon(T) <= target``
  (:func:`max_steps`), capped by ``max_epochs``; the noise is then lowered to the smallest
  that still fits those ``T`` steps, so the trial spends its whole budget (to the
  accountant's resolution) instead of leaving a rounding remainder unspent;
- a number of epochs: it gets the smallest ``sigma`` that fits (:func:`noise_for_steps`).

A sigma above :func:`noise_interval`'s upper end reaches the ``max_epochs`` cap before the
budget is spent; the study searches sigma inside that interval only, so every trial that is
not stopped early spends its target epsilon and trials are compared at the same budget.

:func:`plan_budget` is the calibrator; the other functions are pure (they build a throw-away
accountant) so they can be tested and reused alone. The train loop calls
:func:`cached_plan`: :func:`plan_budget`'s result for the same inputs, kept per process and
on disk (a study's trials start in fresh processes, and confirmation runs and resumed
trials repeat a calibration), and checked with the accountant before it is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import opacus
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from trainables import compat, disk_cache
from trainables.config import PrivacyConfig
from trainables.errors import InputError

compat.memoize_rdp()  # exact: each (q, sigma) RDP curve once per process, not per evaluation


class BudgetError(InputError, ValueError):
    """The requested configuration cannot train even one epoch within the budget."""


#: Relative shortfall of the spent epsilon below the target that calibration tolerates.
SPEND_TOLERANCE = 0.005


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """What a trial may do: ``steps`` DP steps at ``noise_multiplier`` and ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # what the accountant says ``steps`` steps cost
    epsilon_target: float
    delta: float
    accountant: str
    validation_noise: float | None = None  # one DP validation release, reserved in the plan

    @property
    def epochs(self) -> float:
        """Expected passes over the data (steps x sample rate)."""
        return self.steps * self.sample_rate


def accountant_for(mechanism: str, *, noise_multiplier: float, sample_rate: float,
                   steps: int, releases: Sequence[float] = ()) -> IAccountant:
    """An Opacus accountant holding ``steps`` steps of one (sigma, q) mechanism, then one
    Gaussian release (sensitivity 1, noise std ``s``) per entry of ``releases``."""
    accountant = create_accountant(mechanism=mechanism)
    if steps > 0:
        accountant.history = [(noise_multiplier, sample_rate, steps)]
    for noise in releases:
        accountant.history.append(release_entry(noise))
    return accountant


def release_entry(noise: float) -> tuple[float, float, int]:
    """The accountant history entry of one Gaussian mechanism of sensitivity 1 and noise
    std ``noise``: Opacus' (noise_multiplier, sample_rate, steps) with sample rate 1."""
    return (float(noise), 1.0, 1)


def epsilon_after(steps: int, *, noise_multiplier: float, sample_rate: float,
                  delta: float, accountant: str = "prv", releases: Sequence[float] = ()) -> float:
    """Epsilon spent by ``steps`` Poisson-subsampled Gaussian steps and the Gaussian
    ``releases`` (0 for nothing)."""
    if steps <= 0 and not releases:
        return 0.0
    acc = accountant_for(accountant, noise_multiplier=noise_multiplier,
                         sample_rate=sample_rate, steps=steps, releases=releases)
    with warnings.catch_warnings():  # PRV at sample rate 1 takes log(0) on a masked branch
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def max_steps(*, target_epsilon: float, delta: float, sample_rate: float,
              noise_multiplier: float, accountant: str = "prv", cap: int,
              releases: Sequence[float] = ()) -> int:
    """Largest ``T <= cap`` with ``epsilon(T) <= target_epsilon`` (0 if none).

    Bisection on T; epsilon is increasing in T. The result is re-checked, so even a
    numerically noisy accountant never yields a T that overspends.
    """

    def fits(t: int) -> bool:
        return epsilon_after(t, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                             delta=delta, accountant=accountant,
                             releases=releases) <= target_epsilon

    if fits(cap):
        return cap
    low, high = 0, cap  # fits(low) holds, fits(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    while low > 0 and not fits(low):
        low -= 1
    return low


def noise_for_steps(*, target_epsilon: float, delta: float, sample_rate: float,
                    steps: int, accountant: str = "prv") -> float:
    """Smallest noise multiplier that fits ``steps`` steps: Opacus' bisection, stopped once
    ``epsilon`` is within ``SPEND_TOLERANCE`` (relative) below the target."""
    tolerance = SPEND_TOLERANCE * min(1.0, target_epsilon)
    with warnings.catch_warnings():  # the search probes tiny sigmas; RDP warns about them
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps,
                                              accountant=accountant,
                                              epsilon_tolerance=tolerance))
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise BudgetError(
                f"privacy.epsilon: the {accountant} accountant cannot reach "
                f"epsilon={target_epsilon:g} at delta={delta:g} for {steps} steps at sample "
                f"rate {sample_rate:.4g} with any noise multiplier ({err}); use a larger "
                f"epsilon or the prv accountant (got {target_epsilon!r})") from None


def cap_steps(sample_rate: float, max_epochs: float) -> int:
    """Most steps ``max_epochs`` allows at ``sample_rate`` (at least one)."""
    return max(1, math.floor(max_epochs / sample_rate + 1e-9))


def noise_interval(*, target_epsilon: float, delta: float, sample_rate: float,
                   max_epochs: float, accountant: str = "prv") -> tuple[float, float]:
    """The noise multipliers that spend the whole budget: ``(low, high)``.

    ``low`` is the smallest sigma that still trains one epoch (or ``max_epochs``, if
    less) within the budget; ``high`` is the smallest sigma that trains ``max_epochs``.
    Any sigma in between spends the budget in at most ``max_epochs``; a larger one hits the
    cap first and leaves budget unspent.
    """
    cap = cap_steps(sample_rate, max_epochs)
    common = {"target_epsilon": target_epsilon, "delta": delta, "sample_rate": sample_rate,
              "accountant": accountant}
    low = noise_for_steps(steps=min(steps_per_epoch(sample_rate), cap), **common)
    return low, max(low, noise_for_steps(steps=cap, **common))


def steps_per_epoch(sample_rate: float) -> int:
    """Steps of one expected pass over the data: ``ceil(1 / q)``."""
    return math.ceil(1.0 / sample_rate - 1e-9)


def plan_budget(config: PrivacyConfig, *, sample_rate: float,
                max_epochs: float) -> PrivacyPlan:
    """The calibrator: steps for a given sigma, or sigma for given epochs.

    Raises :class:`BudgetError` when the noise is too small for one epoch of training.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise BudgetError(f"sample_rate: must be in (0, 1] (got {sample_rate!r})")
    one_epoch = steps_per_epoch(sample_rate)
    common = {"delta": config.delta, "sample_rate": sample_rate,
              "accountant": config.accountant}
    releases = (config.validation_noise,) if config.validation_noise else ()
    if config.epochs is not None:
        steps = max(1, round(config.epochs / sample_rate))
        sigma = noise_for_steps(target_epsilon=config.epsilon, steps=steps, **common)
        if releases:
            sigma = _noise_leaving_room(config, sigma, steps, sample_rate, releases)
    else:
        sigma = float(config.noise_multiplier)
        cap = cap_steps(sample_rate, max_epochs)
        steps = max_steps(target_epsilon=config.epsilon, noise_multiplier=sigma, cap=cap,
                          releases=releases, **common)
        if steps < min(one_epoch, cap):
            _raise_too_little_noise(config, sigma, steps, one_epoch, sample_rate)
    spent = epsilon_after(steps, noise_multiplier=sigma, releases=releases, **common)
    if spent < (1 - SPEND_TOLERANCE) * config.epsilon:  # spend the rounding remainder too
        exact = noise_for_steps(target_epsilon=config.epsilon, steps=steps, **common)
        if releases:
            exact = _noise_leaving_room(config, exact, steps, sample_rate, releases)
        sigma = min(sigma, exact)
        spent = epsilon_after(steps, noise_multiplier=sigma, releases=releases, **common)
    return PrivacyPlan(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                       epsilon=spent, epsilon_target=config.epsilon, delta=config.delta,
                       accountant=config.accountant, validation_noise=config.validation_noise)


#: Bumped whenever :func:`plan_budget` would plan differently for the same inputs.
CALIBRATION_VERSION = 1
_PLANS: dict[str, PrivacyPlan] = {}  # key digest -> plan calibrated in this process


def calibration_key(config: PrivacyConfig, *, sample_rate: float,
                    max_epochs: float) -> dict[str, object]:
    """Everything :func:`plan_budget`'s result depends on (the code's and Opacus' versions
    included), as JSON-serialisable values."""
    return {"version": CALIBRATION_VERSION, "opacus": opacus.__version__,
            "spend_tolerance": SPEND_TOLERANCE, "accountant": config.accountant,
            "epsilon": float(config.epsilon), "delta": float(config.delta),
            "noise_multiplier": config.noise_multiplier, "epochs": config.epochs,
            "validation_noise": config.validation_noise,
            "sample_rate": float(sample_rate), "max_epochs": float(max_epochs)}


def cached_plan(config: PrivacyConfig, *, sample_rate: float,
                max_epochs: float) -> PrivacyPlan:
    """:func:`plan_budget`'s plan, calibrated once per machine for the same inputs.

    A plan read from disk is used only if it is one :func:`plan_budget` could have made for
    these inputs and the accountant confirms what it spends, exactly as recorded and within
    ``config.epsilon`` (one evaluation, not a calibration); otherwise the budget is
    calibrated again and the cached copy replaced. The cache folder is
    :func:`trainables.disk_cache.calibration_dir`."""
    key = calibration_key(config, sample_rate=sample_rate, max_epochs=max_epochs)
    digest = disk_cache.key_digest(key)
    if digest in _PLANS:
        return _PLANS[digest]
    path = os.path.join(disk_cache.calibration_dir(), f"{digest}.json")
    stored = disk_cache.read_json(path)
    plan = _checked(stored, key, config, max_epochs) if isinstance(stored, dict) else None
    if plan is None:
        plan = plan_budget(config, sample_rate=sample_rate, max_epochs=max_epochs)
        disk_cache.write_json(path, {"key": key, "plan": dataclasses.asdict(plan)})
    _PLANS[digest] = plan
    return plan


def _checked(stored: dict, key: dict[str, object], config: PrivacyConfig,
             max_epochs: float) -> PrivacyPlan | None:
    """The stored plan if it fits ``key`` and the accountant confirms its epsilon, or None."""
    try:
        plan = PrivacyPlan(**stored["plan"])
        steps, sigma = int(plan.steps), float(plan.noise_multiplier)
    except (KeyError, TypeError, ValueError):
        return None
    same = (stored.get("key") == key and steps == plan.steps and steps >= 1
            and plan.sample_rate == key["sample_rate"] and plan.accountant == config.accountant
            and plan.epsilon_target == config.epsilon and plan.delta == config.delta
            and plan.validation_noise == config.validation_noise and sigma > 0)
    if not same:
        return None
    if config.epochs is not None:
        fits = steps == max(1, round(config.epochs / plan.sample_rate))
    else:
        fits = sigma <= config.noise_multiplier and steps <= cap_steps(plan.sample_rate,
                                                                       max_epochs)
    releases = (config.validation_noise,) if config.validation_noise else ()
    if not fits:
        return None
    spent = epsilon_after(steps, noise_multiplier=sigma, sample_rate=plan.sample_rate,
                          delta=config.delta, accountant=config.accountant, releases=releases)
    return plan if spent == plan.epsilon and spent <= config.epsilon else None


def _noise_leaving_room(config: PrivacyConfig, sigma: float, steps: int, sample_rate: float,
                        releases: Sequence[float]) -> float:
    """The smallest sigma (0.1% resolution) >= ``sigma`` whose steps and ``releases`` fit
    the budget; :class:`BudgetError` when the releases alone exceed it."""
    def fits(s: float) -> bool:
        return epsilon_after(steps, noise_multiplier=s, sample_rate=sample_rate,
                             delta=config.delta, accountant=config.accountant,
                             releases=releases) <= config.epsilon

    low, high = sigma, sigma
    while not fits(high):
        low, high = high, high * 2
        if high > 1e4 * max(sigma, 1.0):
            raise BudgetError(f"privacy.validation_noise: the validation release alone "
                              f"exceeds epsilon={config.epsilon:g}; use more noise "
                              f"(got {releases[0]!r})")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def _raise_too_little_noise(config: PrivacyConfig, sigma: float, steps: int,
                            one_epoch: int, sample_rate: float) -> None:
    needed = noise_for_steps(target_epsilon=config.epsilon, delta=config.delta,
                             sample_rate=sample_rate, steps=one_epoch,
                             accountant=config.accountant)
    raise BudgetError(
        f"privacy.noise_multiplier: must allow at least one epoch ({one_epoch} steps at "
        f"sample rate {sample_rate:.4g}) within epsilon={config.epsilon:g}, "
        f"delta={config.delta:g} ({config.accountant}); {sigma:g} allows only {steps} "
        f"steps; use a noise multiplier >= {needed:.3f} (got {sigma!r})"
    )
