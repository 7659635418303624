"""Spec sections of study-level privacy: private selection and DP validation scores.

In YAML::

    search:
      mode: private-selection          # default: optimize (adaptive search, fixed trials)
      trials: {distribution: geometric, mean: 10}   # poisson | geometric | logarithmic |
                                                     # truncated-negative-binomial (+ shape)
      ...the searched parameters...
    validation: {noise: 20.0}          # std of the Gaussian noise on the count of correct
                                       # validation predictions (the DP score)
    privacy: {scope: study, epsilon: 3, delta: 1e-5}   # budget of the whole selection

:func:`selection_problems` holds the cross-section rules (private selection needs random
search, no ASHA, a DP score; ``scope: study`` needs private selection and a finite worst
case for noise, batch size and epochs), each ``"<field>: <rule> (got <value>)"``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from study.spec.params import _Spec
from trainables.config import _Checks

MODES = ("optimize", "private-selection")
TRIAL_DISTRIBUTIONS = ("poisson", "geometric", "logarithmic", "truncated-negative-binomial")
SELECTION_METRIC = "val_accuracy_dp"
_BOUNDED = ("batch_size", "epochs", "max_epochs")
MAX_MEAN_TRIALS = 10_000  # of the drawn number of trials


@dataclass(frozen=True, kw_only=True)
class TrialCount(_Spec):
    """The declared distribution of the number of trials (a ``RepeatAndSelectDpEvent``)."""

    distribution: str | None = None
    mean: float | None = None
    shape: float | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("distribution", self.distribution, TRIAL_DISTRIBUTIONS)
        if self.mean is None:
            c.fail("mean", "is required", None)
        else:
            c.number("mean", self.mean, low=1.0, high=MAX_MEAN_TRIALS)
        if self.distribution == "truncated-negative-binomial":
            if self.shape is None:
                c.fail("shape", "is required for truncated-negative-binomial", None)
            else:
                c.number("shape", self.shape, low=0.0, low_open=True)
        elif self.shape is not None:
            c.fail("shape", f"only applies to truncated-negative-binomial (the shape of "
                   f"{self.distribution} is fixed)", self.shape)
        c.done()

    @property
    def event_shape(self) -> float:
        """The ``RepeatAndSelectDpEvent`` shape."""
        return {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}.get(
            self.distribution, self.shape)


@dataclass(frozen=True, kw_only=True)
class SelectionSpec(_Spec):
    """``search.mode`` and ``search.trials``."""

    mode: str = "optimize"
    trials: TrialCount | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("mode", self.mode, MODES)
        if self.mode == "private-selection" and not isinstance(self.trials, TrialCount):
            c.fail("trials", "private-selection needs the distribution of the number of "
                   "trials, e.g. {distribution: geometric, mean: 10}", self.trials)
        elif self.mode == "optimize" and self.trials is not None:
            c.fail("trials", "only applies to mode: private-selection (give the top-level "
                   "trials count instead)", self.trials.to_dict())
        c.done()

    @classmethod
    def _values(cls, data: dict[str, Any], prefix: str,
                problems: list[str]) -> tuple[dict[str, Any], set[str]]:
        out, failed = dict(data), set()
        if data.get("trials") is not None:
            out["trials"] = TrialCount.parse(data["trials"], f"{prefix}trials.", problems)
            if out["trials"] is None:
                failed.add("trials")
                out.pop("trials")
        return out, failed

    @property
    def private(self) -> bool:
        """Whether this is a private-selection study."""
        return self.mode == "private-selection"


@dataclass(frozen=True, kw_only=True)
class ValidationSpec(_Spec):
    """The DP validation score: Gaussian noise of std ``noise`` on the count of correct
    predictions, released once at the end of each trial; or ``share``: the noise whose
    release alone costs that fraction of ``privacy.epsilon`` (at ``privacy.delta``).
    Neither: no DP score."""

    noise: float | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        if self.noise is not None and self.share is not None:
            c.fail("noise", "give either noise or share, not both", self.noise)
        if self.noise is not None:
            c.number("noise", self.noise, low=0.0, low_open=True)
        if self.share is not None:
            c.number("share", self.share, low=0.0, high=1.0, low_open=True, high_open=True)
        c.done()

    @property
    def dp(self) -> bool:
        """Whether trials release a DP validation score."""
        return self.noise is not None or self.share is not None

    def noise_for(self, epsilon: float, delta: float) -> float | None:
        """The noise std on the count: ``noise``, or calibrated from ``share``."""
        if self.share is None:
            return self.noise
        return share_noise(self.share * epsilon, delta)


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
    """The std of a trial's DP score noise (None: no DP score)."""
    return spec.validation.noise_for(spec.privacy.epsilon, spec.privacy.delta)


def selection_problems(spec: Any) -> list[str]:
    """Rules that tie ``search.mode``, ``privacy.scope``, ``validation``, the sampler, the
    scheduler and the objective together."""
    out: list[str] = []
    private = spec.selection.private
    if private:
        if spec.sampler != "random":
            out.append(f"sampler: private-selection needs random (independent trials; "
                       f"adaptive samplers void the selection bound) (got {spec.sampler!r})")
        if spec.scheduler.name != "none":
            out.append(f"scheduler: private-selection needs none (ASHA compares trials "
                       f"with each other) (got {spec.scheduler.name!r})")
        if not spec.validation.dp and not validation_public(spec):
            out.append("validation.noise: private-selection on a private validation split "
                       "selects by a DP score; give the noise std on the count of correct "
                       "predictions, or use dataset.validation: {public: true} (got None)")
        metric = spec.objective.metrics
        if spec.objective.multi or metric[0] not in (SELECTION_METRIC, "val_accuracy"):
            out.append(f"objective.metrics: private-selection selects by "
                       f"{selection_metric(spec)[0]} (got {list(metric)!r})")
    if spec.validation.dp and not spec.dataset.has_validation:
        out.append(f"validation: a DP validation score needs a validation split (set "
                   f"dataset.validation_fraction > 0) (got {spec.validation.to_dict()!r})")
    if spec.privacy.scope == "study":
        if not private:
            out.append("privacy.scope: study needs search.mode: private-selection (the "
                       "selection bound is what makes a study budget) (got 'study')")
        if spec.search.noise_multiplier is not None:
            out.append(f"search.noise_multiplier: with privacy.scope: study the noise is "
                       f"calibrated to the study budget; give search.epochs (fixed or "
                       f"choices) instead (got {spec.search.noise_multiplier.to_dict()!r})")
        for name in _BOUNDED:
            p = getattr(spec.search, name)
            if p is not None and not p.is_fixed() and p.choices is None:
                out.append(f"search.{name}: with privacy.scope: study must be a fixed value "
                           f"or a list of choices (a continuous range has no finite worst "
                           f"case to bound) (got {p.to_dict()!r})")
    return out


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
