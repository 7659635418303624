"""The sections of a study spec other than the search space: privacy budget, optimiser
settings, resources, objective, scheduler and confirmation runs (each a frozen model;
:mod:`trainables.validation` words their problems)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Le

from study.spec.params import Spec
from trainables.config import ACCOUNTANTS, OPTIMIZERS, Epsilon, Fraction, PhysicalBatch, Rate
from trainables.validation import Flag, Integer, Number, Problem, strings

VALIDATION_METRICS = ("val_accuracy", "best_val_accuracy", "val_loss")
TEST_METRICS = ("test_accuracy", "best_test_accuracy", "test_loss")
METRICS = (*VALIDATION_METRICS, *TEST_METRICS, "density", "epsilon_spent", "wall_time_s",
           "trial_cost", "val_accuracy_dp")
MODES = ("max", "min")
SCHEDULERS = ("none", "asha")
MAXIMISED = tuple(m for m in METRICS if "accuracy" in m)
SCOPES = ("trial", "study")
MAX_CONFIRM_SEEDS = 100  # confirmation runs use seeds seed + 1 ... seed + seeds


class PrivacySpec(Spec):
    """The fixed privacy budget of every trial and the accountant that enforces it."""

    required: ClassVar[tuple[str, ...]] = ("epsilon",)
    epsilon: Epsilon | None = None
    delta: Fraction = 1e-5
    accountant: Literal[ACCOUNTANTS] = "prv"
    scope: Literal[SCOPES] = "trial"  # trial: (epsilon, delta) per trial; study: the selection


class OptimizerSpec(Spec):
    """The optimiser settings that are not searched. ``physical_batch_size`` (a resource
    setting, not a hyperparameter: it changes memory, not results) caps the images per
    forward/backward pass; unset, a logical batch is one pass."""

    name: Literal[OPTIMIZERS] = "sgd"
    momentum: Rate = 0.0
    weight_decay: Annotated[Number, Ge(0.0)] = 0.0
    physical_batch_size: PhysicalBatch | None = None


class Resources(Spec):
    """Ray resources per trial (fractions allowed)."""

    cpu: Annotated[Number, Ge(0.0)] = 1
    gpu: Annotated[Number, Ge(0.0)] = 0

    def problems(self) -> Iterator[Problem]:
        """Something to run on."""
        if self.cpu + self.gpu <= 0:
            yield "cpu", "cpu + gpu must be > 0", self.cpu


class Objective(Spec):
    """One or two metrics to optimise; modes default to max for accuracies, min otherwise.

    The search selects on the validation split (``val_accuracy`` by default). Selecting on a
    test metric biases the reported test accuracy upwards, so it needs
    ``allow_test_selection: true``, and the study then says so wherever it reports.
    """

    metrics: strings(METRICS, "must be a list of strings", empty=True) = ("val_accuracy",)
    modes: strings(MODES, "must be a list of strings", empty=True) | None = None
    allow_test_selection: Flag = False

    @classmethod
    def expand(cls, data: Any) -> Any:
        """Modes default to max for accuracies, min otherwise."""
        data = super().expand(data)
        if isinstance(data, dict) and data.get("modes") is None:
            metrics = data.get("metrics", ("val_accuracy",))
            metrics = (metrics,) if isinstance(metrics, str) else metrics
            if isinstance(metrics, (list, tuple)) and all(isinstance(m, str) for m in metrics):
                data = {**data, "modes": ["max" if m in MAXIMISED else "min" for m in metrics]}
        return data

    def problems(self) -> Iterator[Problem]:
        """1 or 2 metrics, one mode each, none twice; a test metric only knowingly."""
        metrics = list(self.metrics)
        if not 1 <= len(metrics) <= 2:
            yield "metrics", "must list 1 or 2 metrics", metrics
        elif self.modes is not None and len(self.modes) != len(metrics):
            yield "modes", f"must give one mode per metric ({len(metrics)})", list(self.modes)
        elif len(set(metrics)) != len(metrics):
            yield "metrics", "must not repeat a metric", metrics
        elif self.selection_split == "test" and not self.allow_test_selection:
            yield ("metrics", "selecting on a test metric biases the reported test accuracy; "
                   "select on a validation metric (e.g. val_accuracy), or set "
                   "objective.allow_test_selection: true to do it knowingly", metrics)

    @property
    def selection_split(self) -> str:
        """``test`` if any metric is a test metric, ``validation`` if any is a validation
        metric, else ``none`` (e.g. density alone)."""
        if any(m in TEST_METRICS for m in self.metrics):
            return "test"
        return "validation" if any(m in VALIDATION_METRICS for m in self.metrics) else "none"

    @property
    def multi(self) -> bool:
        """Whether this is a multi-objective study."""
        return len(self.metrics) > 1

    @property
    def primary(self) -> tuple[str, str]:
        """The first metric and its mode."""
        return self.metrics[0], self.modes[0]


class Scheduler(Spec):
    """Trial scheduler: ``none`` or ``asha`` (early stopping).

    ASHA's clock is the fraction of the privacy budget a trial has spent
    (``budget_used``), not its epochs: trials with different noise multipliers spend their
    budget over different numbers of epochs, and are only comparable at equal epsilon
    spent. A trial may be stopped once it has spent ``grace_budget`` of its epsilon; rungs
    follow at ``grace_budget x reduction_factor^k`` up to the whole budget.
    """

    name: Literal[SCHEDULERS] = "none"
    grace_budget: Fraction = 0.25
    reduction_factor: Annotated[Number, Ge(2)] = 3

    @classmethod
    def relabel(cls, found: list[Problem], raw: Any) -> list[Problem]:
        """A pointed message for the retired ``grace_period``."""
        retired = ("replaced by grace_budget, the fraction of epsilon a trial spends before "
                   "ASHA may stop it (trials are compared at equal budget spent, e.g. "
                   "grace_budget: 0.3)")
        return [(p, retired if p == "grace_period" else rule, v) for p, rule, v in found]


class ConfirmSpec(Spec):
    """Re-run the ``top`` configurations (by the objective on validation) with ``seeds``
    fresh seeds each when the search ends (``dpstudy confirm`` does the same on demand)."""

    top: Annotated[Integer, Ge(1), Le(100)] = 1
    seeds: Annotated[Integer, Ge(2), Le(MAX_CONFIRM_SEEDS)] = 3
