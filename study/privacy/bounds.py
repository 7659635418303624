"""Study-level privacy: what the whole tuning costs, computed with ``dp-accounting``.

Every trial is a DP mechanism on the private data (:class:`TrialMechanism`); a study runs
many and selects one. Both release models are bounded with ``RdpAccountant`` (no
hand-written privacy math): *everything released* (:func:`composition_epsilon`) is the
composition of every trial run; *only the selected result released*
(:func:`selection_epsilon`) is Papernot & Steinke's (ICLR 2022) bound of the best of a
*random* number K of independent runs (``RepeatAndSelectDpEvent``), under the assumptions
:func:`selection_assumptions` checks, each trial bounded by the worst mechanism it may run
(:class:`WorstOfDpEvent`). :func:`calibrate_noise` is the one calibrator: the per-trial
noise multiplier such that the selection bound meets a study budget (E, D).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import attr
import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from trainables.compat import RdpComposeHook, truncated_negative_binomial_gamma

# name -> RepeatAndSelectDpEvent shape (None: the spec's own ``shape``, in (0, inf))
DISTRIBUTIONS: dict[str, float | None] = {
    "poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0,
    "truncated-negative-binomial": None}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WorstOfDpEvent(dp_event.DpEvent):
    """One of ``events``, chosen independently of the data: bounded by the pointwise
    maximum of their RDP curves (Renyi divergence is quasi-convex), which
    :class:`StudyRdpAccountant` composes."""

    events: Sequence[dp_event.DpEvent]


class StudyRdpAccountant(RdpComposeHook, RdpAccountant):
    """``RdpAccountant`` that also composes :class:`WorstOfDpEvent` (each sub-event on a
    fresh accountant with the same orders, then the maximum order by order); everything
    else, ``RepeatAndSelectDpEvent`` around a ``WorstOfDpEvent`` included, is the library's."""

    def compose_event(self, event: dp_event.DpEvent, count: int, do_compose: bool):
        if not isinstance(event, WorstOfDpEvent):
            return self.library_compose(event, count, do_compose)
        curves = []
        for sub in event.events:
            acc = StudyRdpAccountant(orders=self.orders,
                                     neighboring_relation=self.neighboring_relation)
            error = acc.compose_event(sub, 1, True)
            if error is not None:
                return error
            curves.append(acc.rdp_curve())
        if do_compose:
            self.add_rdp(count * np.max(np.stack(curves), axis=0))
        return None


@dataclass(frozen=True, kw_only=True)
class TrialMechanism:
    """What one trial does to the private data: ``steps`` DP-SGD steps
    (``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))``), then
    ``val_releases`` Gaussian releases of a count (sensitivity 1) with noise std
    ``val_noise``."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    val_noise: float | None = None
    val_releases: int = 0

    def event(self) -> dp_event.DpEvent:
        """The trial's ``DpEvent``."""
        sgd = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(self.sample_rate,
                                           dp_event.GaussianDpEvent(self.noise_multiplier)),
            self.steps)
        if not self.val_releases:
            return sgd
        if not self.val_noise or self.val_noise <= 0:  # a count released without noise
            return dp_event.ComposedDpEvent([sgd, dp_event.NonPrivateDpEvent()])
        score = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(self.val_noise),
                                             self.val_releases)
        return dp_event.ComposedDpEvent([sgd, score])


def distribution_shape(distribution: str, shape: float | None = None) -> float:
    """The ``RepeatAndSelectDpEvent`` shape of a named trial-count distribution."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution: must be one of {', '.join(DISTRIBUTIONS)} "
                         f"(got {distribution!r})")
    fixed = DISTRIBUTIONS[distribution]
    if fixed is not None:
        return fixed
    if shape is None or not 0 < shape < math.inf:
        raise ValueError(f"shape: truncated-negative-binomial needs a shape in (0, inf) "
                         f"(got {shape!r})")
    return float(shape)


def epsilon_of(event: dp_event.DpEvent, delta: float) -> float:
    """Epsilon of ``event`` at ``delta`` (RDP accounting). dp-accounting drops, with a
    warning, the few orders whose series does not converge (a conservative choice); the
    warnings are silenced here."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc = StudyRdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def worst_of(mechanisms: Sequence[TrialMechanism]) -> dp_event.DpEvent:
    """The event bounding a data-independent choice among ``mechanisms``."""
    events = list({m: m.event() for m in mechanisms}.values())
    return events[0] if len(events) == 1 else WorstOfDpEvent(events)


def composition_epsilon(mechanisms: Sequence[TrialMechanism], delta: float) -> float:
    """*Everything released*: epsilon of the composition of every trial run."""
    if not mechanisms:
        return 0.0
    return epsilon_of(dp_event.ComposedDpEvent([m.event() for m in mechanisms]), delta)


def selection_epsilon(mechanisms: Sequence[TrialMechanism], *, mean: float, shape: float,
                      delta: float) -> float:
    """*Only the selected result released*: the Papernot-Steinke bound of the best of a
    random number of independent runs of one trial, which may be any of ``mechanisms``."""
    event = dp_event.RepeatAndSelectDpEvent(worst_of(mechanisms), float(mean), float(shape))
    return epsilon_of(event, delta)


def draw_trial_count(distribution: str, *, mean: float, shape: float | None,
                     seed: int) -> int:
    """The number of trials of a private-selection study, drawn (seeded) from the declared
    distribution, parameterised exactly as ``RepeatAndSelectDpEvent`` is: Poisson(mean)
    (may be 0), or a truncated negative binomial (geometric: shape 1, logarithmic:
    shape 0) whose parameter gamma ``dp-accounting`` derives from the mean."""
    rng = np.random.default_rng([seed, 0x5E1EC7])
    eta = distribution_shape(distribution, shape)
    if eta == math.inf:
        return int(rng.poisson(mean))
    if mean == 1:
        return 1
    gamma = truncated_negative_binomial_gamma(eta, mean)
    if eta == 0:
        return int(rng.logseries(1.0 - gamma))
    if eta == 1:
        return int(rng.geometric(gamma))
    while True:  # negative binomial conditioned on K > 0
        k = int(rng.negative_binomial(eta, gamma))
        if k > 0:
            return k


def selection_assumptions(*, mode: str, sampler: str, scheduler: str,
                          scores_private: bool, scores_dp: bool) -> list[str]:
    """Why the selection bound does *not* apply to a study (empty: it applies): it needs
    independent trials, a drawn number of them, no cross-trial early stopping, and
    selection scores that are DP or computed on public data."""
    failed = []
    if sampler != "random":
        failed.append(f"trials are not independent: sampler {sampler!r} adapts to earlier "
                      f"trials' scores (only random search keeps them independent)")
    if mode != "private-selection":
        failed.append("the number of trials is fixed, not drawn from a declared "
                      "distribution (use search.mode: private-selection)")
    if scheduler != "none":
        failed.append(f"scheduler {scheduler!r} stops trials by comparing them with each "
                      f"other (cross-trial early stopping)")
    if scores_private and not scores_dp:
        failed.append("the selection score is computed on private validation data without "
                      "noise (it is not DP; set validation.noise)")
    return failed


@dataclass(frozen=True, kw_only=True)
class StudyPrivacy:
    """The (epsilon, delta) of a study under both release models. A bound is None when an
    assumption it needs failed: ``failed_assumptions`` for the selection bound,
    ``composition_failed`` for the composition bound (which then withholds both)."""

    delta: float
    trials: int
    epsilon_all: float | None
    epsilon_selected: float | None
    failed_assumptions: tuple[str, ...] = ()
    #: results columns computed on private data without noise: the composition bound holds
    #: for the table only without them
    not_covered: tuple[str, ...] = ()
    #: why even the composition of every run does not bound the study (empty: it does)
    composition_failed: tuple[str, ...] = ()
    #: audit runs (``dpstudy audit``) composed into ``epsilon_all``
    audits: int = 0

    def lines(self) -> list[str]:
        """Human-readable statement of both bounds."""
        runs = f"{self.trials} trials" + (f" and {self.audits} audit runs" if self.audits
                                          else "")
        if self.epsilon_all is None:
            reason = "; ".join(self.composition_failed)
            return [f"everything released: bound withheld: {reason}",
                    f"only the selected result released: bound withheld: {reason}"]
        out = [f"everything released: epsilon {self.epsilon_all:.3f}, delta {self.delta:g} "
               f"(composition of {runs})"]
        if self.epsilon_selected is not None:
            out.append(f"only the selected result released: epsilon "
                       f"{self.epsilon_selected:.3f}, delta {self.delta:g} "
                       f"(Papernot-Steinke selection bound)")
        else:
            out.append("only the selected result released: bound does not apply: "
                       + "; ".join(self.failed_assumptions))
        if self.not_covered:
            out.append(f"everything released: not covered: {', '.join(self.not_covered)} "
                       f"(computed on private or test data without noise); the bound holds "
                       f"for the models, the DP scores and the tables without these columns")
        return out


def study_privacy(run: Sequence[TrialMechanism], *, delta: float,
                  failed_assumptions: Sequence[str],
                  possible: Sequence[TrialMechanism] = (), mean: float | None = None,
                  shape: float | None = None, not_covered: Sequence[str] = (),
                  composition_failed: Sequence[str] = (), audits: int = 0) -> StudyPrivacy:
    """Both bounds of a study: the composition of ``run`` (trials, then ``audits`` audit
    runs) and, when no assumption failed, the selection bound over the ``possible``
    mechanisms of one trial (default: those run). ``composition_failed`` withholds both."""
    selected = None
    if (not composition_failed and not failed_assumptions and mean is not None
            and (possible or run)):
        selected = selection_epsilon(list(possible or run), mean=mean, shape=shape,
                                     delta=delta)
    return StudyPrivacy(
        delta=delta, trials=len(run) - audits, epsilon_selected=selected,
        epsilon_all=None if composition_failed else composition_epsilon(run, delta),
        failed_assumptions=tuple(failed_assumptions or composition_failed),
        not_covered=tuple(not_covered), composition_failed=tuple(composition_failed),
        audits=audits)


def calibrate_noise(*, epsilon: float, delta: float, designs: Sequence[tuple[float, int]],
                    mean: float, shape: float, val_noise: float | None = None,
                    val_releases: int = 0, tolerance: float = 1e-3) -> float:
    """The calibrator of ``privacy: {scope: study}``: the smallest noise multiplier sigma
    (to ``tolerance`` relative) such that the best of a random number of trials, each one
    of the ``designs`` (sample rate, steps) at sigma, is (``epsilon``, ``delta``)-DP.
    Raises ``ValueError`` when even the validation releases alone exceed the budget."""

    def spent(sigma: float) -> float:
        mechanisms = [TrialMechanism(sample_rate=q, noise_multiplier=sigma, steps=t,
                                     val_noise=val_noise, val_releases=val_releases)
                      for q, t in designs]
        return selection_epsilon(mechanisms, mean=mean, shape=shape, delta=delta)

    high = 1.0
    while spent(high) > epsilon:
        high *= 2
        if high > 1e4:
            raise ValueError(f"the study budget {epsilon:g} cannot be met even "
                             f"with noise multiplier 1e4 (the validation releases or the "
                             f"number of trials cost too much)")
    low = high / 2
    while spent(low) <= epsilon and low > 1e-3:
        high, low = low, low / 2
    while (high - low) / high > tolerance:  # spent(low) > epsilon >= spent(high)
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high
