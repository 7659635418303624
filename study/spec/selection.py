"""Spec sections of study-level privacy: private selection (``search.mode:
private-selection`` with ``search.trials: {distribution: geometric, mean: 10}``), the DP
validation score (``validation: {noise: 20.0}``, the std of the Gaussian noise on the count of
correct predictions) and ``privacy.scope: study``; :func:`selection_problems` ties them
together."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Le

from study.spec.params import Spec
from trainables.config import Fraction, Positive
from trainables.validation import Number, Problem

MODES = ("optimize", "private-selection")
TRIAL_DISTRIBUTIONS = ("poisson", "geometric", "logarithmic", "truncated-negative-binomial")
SELECTION_METRIC = "val_accuracy_dp"
_BOUNDED = ("batch_size", "epochs", "max_epochs")
MAX_MEAN_TRIALS = 10_000  # of the drawn number of trials


class TrialCount(Spec):
    """The declared distribution of the number of trials (a ``RepeatAndSelectDpEvent``)."""

    required: ClassVar[tuple[str, ...]] = ("mean",)
    distribution: Literal[TRIAL_DISTRIBUTIONS] | None = None
    mean: Annotated[Number, Ge(1.0), Le(MAX_MEAN_TRIALS)] | None = None
    shape: Positive | None = None

    def problems(self) -> Iterator[Problem]:
        """A distribution and its mean; a shape for (and only for) the negative binomial."""
        if self.distribution is None:
            yield "distribution", f"must be one of {', '.join(TRIAL_DISTRIBUTIONS)}", None
        yield from super().problems()
        if self.distribution == "truncated-negative-binomial":
            if self.shape is None:
                yield "shape", "is required for truncated-negative-binomial", None
        elif self.shape is not None:
            yield ("shape", f"only applies to truncated-negative-binomial (the shape of "
                   f"{self.distribution} is fixed)", self.shape)

    @property
    def event_shape(self) -> float:
        """The ``RepeatAndSelectDpEvent`` shape."""
        return {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}.get(
            self.distribution, self.shape)


class SelectionSpec(Spec):
    """``search.mode`` and ``search.trials``."""

    mode: Literal[MODES] = "optimize"
    trials: TrialCount | None = None

    def problems(self) -> Iterator[Problem]:
        """private-selection needs ``trials``; optimize takes none."""
        if self.mode == "private-selection" and self.trials is None:
            yield ("trials", "private-selection needs the distribution of the number of "
                   "trials, e.g. {distribution: geometric, mean: 10}", self.trials)
        elif self.mode == "optimize" and self.trials is not None:
            yield ("trials", "only applies to mode: private-selection (give the top-level "
                   "trials count instead)", self.trials.to_dict())

    @property
    def private(self) -> bool:
        """Whether this is a private-selection study."""
        return self.mode == "private-selection"


class ValidationSpec(Spec):
    """The DP validation score: Gaussian noise of std ``noise`` on the count of correct
    predictions, released once at the end of each trial; or ``share``: the noise whose
    release alone costs that fraction of ``privacy.epsilon`` (at ``privacy.delta``).
    Neither: no DP score."""

    noise: Positive | None = None
    share: Fraction | None = None

    def problems(self) -> Iterator[Problem]:
        """Not both ``noise`` and ``share``."""
        if self.noise is not None and self.share is not None:
            yield "noise", "give either noise or share, not both", self.noise

    @property
    def dp(self) -> bool:
        """Whether trials release a DP validation score."""
        return self.noise is not None or self.share is not None


@functools.lru_cache(maxsize=32)
def share_noise(epsilon: float, delta: float) -> float:
    """The noise multiplier of one Gaussian release (sensitivity 1) that costs ``epsilon``
    at ``delta`` (dp-accounting's calibrator on its RDP accountant)."""
    from dp_accounting import dp_event
    from dp_accounting.mechanism_calibration import calibrate_dp_mechanism
    from dp_accounting.rdp import RdpAccountant

    return float(calibrate_dp_mechanism(RdpAccountant, dp_event.GaussianDpEvent, epsilon,
                                        delta, tol=1e-4))


def validation_noise(spec: Any) -> float | None:
    """The std of a trial's DP score noise on the count (None: no DP score):
    ``validation.noise``, or calibrated from ``validation.share``."""
    validation, privacy = spec.validation, spec.privacy
    if validation.share is None:
        return validation.noise
    return share_noise(validation.share * privacy.epsilon, privacy.delta)


def selection_problems(spec: Any) -> Iterator[Problem]:
    """Rules that tie ``search.mode``, ``privacy.scope``, ``validation``, the sampler, the
    scheduler and the objective together."""
    private = spec.selection.private
    if private:
        if spec.sampler != "random":
            yield ("sampler", "private-selection needs random (independent trials; adaptive "
                   "samplers void the selection bound)", spec.sampler)
        if spec.scheduler.name != "none":
            yield ("scheduler", "private-selection needs none (ASHA compares trials with each "
                   "other)", spec.scheduler.name)
        if not spec.validation.dp and not validation_public(spec):
            yield ("validation.noise", "private-selection on a private validation split "
                   "selects by a DP score; give the noise std on the count of correct "
                   "predictions, or use dataset.validation: {public: true}", None)
        metric = spec.objective.metrics
        if spec.objective.multi or metric[0] not in (SELECTION_METRIC, "val_accuracy"):
            yield ("objective.metrics", f"private-selection selects by "
                   f"{selection_metric(spec)[0]}", list(metric))
    if spec.validation.dp and not spec.dataset.has_validation:
        yield ("validation", "a DP validation score needs a validation split (set "
               "dataset.validation_fraction > 0)", spec.validation.to_dict())
    if spec.privacy.scope == "study":
        if not private:
            yield ("privacy.scope", "study needs search.mode: private-selection (the "
                   "selection bound is what makes a study budget)", "study")
        if spec.search.noise_multiplier is not None:
            yield ("search.noise_multiplier", "with privacy.scope: study the noise is "
                   "calibrated to the study budget; give search.epochs (fixed or choices) "
                   "instead", spec.search.noise_multiplier.to_dict())
        for name in _BOUNDED:
            p = getattr(spec.search, name)
            if p is not None and not p.is_fixed() and p.choices is None:
                yield (f"search.{name}", "with privacy.scope: study must be a fixed value or "
                       "a list of choices (a continuous range has no finite worst case to "
                       "bound)", p.to_dict())


def validation_public(spec: Any) -> bool:
    """Whether trials select on the public split (whose scores cost no privacy)."""
    validation = spec.dataset.validation
    return validation is not None and bool(validation.public)


def selection_metric(spec: Any) -> tuple[str, str]:
    """The metric (and mode) that picks the study's best trial: the DP score when there is
    one, plain validation accuracy on a public split, else the objective."""
    if spec.validation.dp:
        return SELECTION_METRIC, "max"
    if spec.selection.private:
        return "val_accuracy", "max"
    return spec.objective.primary


def selection_label(spec: Any) -> str:
    """What the study selects on, as recorded in each results row."""
    metric = selection_metric(spec)[0]
    return metric if metric != spec.objective.primary[0] else ",".join(spec.objective.metrics)
