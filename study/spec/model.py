"""The study spec: a user-written YAML file parsed once into frozen, keyword-only dataclasses.

:func:`load_spec` reads the file and :meth:`StudySpec.from_dict` builds the tree: the sections
here (privacy, optimizer, resources, objective, scheduler) and the search space from
:mod:`study.spec.params` (whose names are re-exported). Unknown keys get a "did you mean" hint, and
*every* problem is reported together in one :class:`SpecError`, each as
``"<dotted.field>: <rule> (got <value>)"``. :func:`check_against_data` adds the checks that
need the dataset or the machine (delta < 1/n, batch size <= n, GPUs present).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.spec.params import (
    DroppingSpec,
    Param,
    PruningSpec,
    SearchSpec,
    _as_tuple,
    _build,
    _known,
    _not_mapping,
    _Spec,
    trial_space,
    trial_values,
)
from study.spec.selection import SelectionSpec, ValidationSpec, selection_problems
from trainables.config import (
    ACCOUNTANTS,
    DEVICES,
    MAX_PHYSICAL_BATCH,
    MAX_SEED,
    OPTIMIZERS,
    PRECISIONS,
    ConfigError,
    DataConfig,
    ModelConfig,
    _Checks,
    check_epsilon,
    read_yaml_file,
)

VALIDATION_METRICS = ("val_accuracy", "best_val_accuracy", "val_loss")
TEST_METRICS = ("test_accuracy", "best_test_accuracy", "test_loss")
METRICS = (*VALIDATION_METRICS, *TEST_METRICS, "density", "epsilon_spent", "wall_time_s",
           "trial_cost", "val_accuracy_dp")
MODES = ("max", "min")
SAMPLERS = ("tpe", "random", "nsgaii", "gp")
SCHEDULERS = ("none", "asha")
LOGGERS = ("mlflow", "tensorboard")  # Ray Tune's own experiment-tracker callbacks
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAXIMISED = ("val_accuracy", "best_val_accuracy", "test_accuracy", "best_test_accuracy",
              "val_accuracy_dp")
SCOPES = ("trial", "study")
MAX_TRIALS = 100_000
MAX_CONFIRM_SEEDS = 100  # confirmation runs use seeds seed + 1 ... seed + seeds
#: a study's seed leaves room for its confirmation seeds within numpy's seed range
MAX_STUDY_SEED = MAX_SEED - MAX_CONFIRM_SEEDS
MAX_CONCURRENT = 10_000
MAX_FAILURES = 1_000


class SpecError(ConfigError):
    """An invalid study spec; ``problems`` lists every problem found."""

    def __str__(self) -> str:
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid study spec ({n} problem{'' if n == 1 else 's'}):\n{lines}"


@dataclass(frozen=True, kw_only=True)
class PrivacySpec(_Spec):
    """The fixed privacy budget of every trial and the accountant that enforces it."""

    epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "prv"
    scope: str = "trial"  # trial: (epsilon, delta) per trial; study: for the whole selection

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("scope", self.scope, SCOPES)
        if self.epsilon is None:
            c.fail("epsilon", "is required", None)
        else:
            check_epsilon(c, self.epsilon)
        c.number("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        c.choice("accountant", self.accountant, ACCOUNTANTS)
        c.done()


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(_Spec):
    """The optimiser settings that are not searched. ``physical_batch_size`` (a resource
    setting, not a hyperparameter: it changes memory, not results) caps the images per
    forward/backward pass; unset, a logical batch is one pass."""

    name: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, OPTIMIZERS)
        c.number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        c.number("weight_decay", self.weight_decay, low=0.0)
        if self.physical_batch_size is not None:
            c.number("physical_batch_size", self.physical_batch_size, low=1,
                     high=MAX_PHYSICAL_BATCH, integer=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class Resources(_Spec):
    """Ray resources per trial (fractions allowed)."""

    cpu: float = 1
    gpu: float = 0

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("cpu", self.cpu, low=0.0)
        c.number("gpu", self.gpu, low=0.0)
        if not c.problems and self.cpu + self.gpu <= 0:
            c.fail("cpu", "cpu + gpu must be > 0", self.cpu)
        c.done()


@dataclass(frozen=True, kw_only=True)
class Objective(_Spec):
    """One or two metrics to optimise; modes default to max for accuracies, min otherwise.

    The search selects on the validation split (``val_accuracy`` by default). Selecting on a
    test metric biases the reported test accuracy upwards, so it needs
    ``allow_test_selection: true``, and the study then says so wherever it reports.
    """

    metrics: tuple[str, ...] = ("val_accuracy",)
    modes: tuple[str, ...] | None = None
    allow_test_selection: bool = False

    def __post_init__(self) -> None:
        c = _Checks("")
        if self.modes is None and isinstance(self.metrics, tuple):
            modes = tuple("max" if m in _MAXIMISED else "min" for m in self.metrics)
            object.__setattr__(self, "modes", modes)
        for name, allowed in (("metrics", METRICS), ("modes", MODES)):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v):
                c.fail(name, "must be a list of strings", v)
                continue
            for i, x in enumerate(v):
                c.choice(f"{name}[{i}]", x, allowed)
        if not c.problems and not 1 <= len(self.metrics) <= 2:
            c.fail("metrics", "must list 1 or 2 metrics", list(self.metrics))
        if not c.problems and len(self.modes) != len(self.metrics):
            c.fail("modes", f"must give one mode per metric ({len(self.metrics)})",
                   list(self.modes))
        if not c.problems and len(set(self.metrics)) != len(self.metrics):
            c.fail("metrics", "must not repeat a metric", list(self.metrics))
        if not isinstance(self.allow_test_selection, bool):
            c.fail("allow_test_selection", "must be true or false", self.allow_test_selection)
        elif not c.problems and self.selection_split == "test" and not self.allow_test_selection:
            c.fail("metrics", "selecting on a test metric biases the reported test accuracy; "
                   "select on a validation metric (e.g. val_accuracy), or set "
                   "objective.allow_test_selection: true to do it knowingly",
                   list(self.metrics))
        c.done()

    @property
    def selection_split(self) -> str:
        """``test`` if any metric is a test metric, ``validation`` if any is a validation
        metric, else ``none`` (e.g. density alone)."""
        if any(m in TEST_METRICS for m in self.metrics):
            return "test"
        return "validation" if any(m in VALIDATION_METRICS for m in self.metrics) else "none"

    @classmethod
    def _coerce(cls, key: str, value: Any) -> Any:
        return _as_tuple(value)

    @property
    def multi(self) -> bool:
        """Whether this is a multi-objective study."""
        return len(self.metrics) > 1

    @property
    def primary(self) -> tuple[str, str]:
        """The first metric and its mode."""
        return self.metrics[0], self.modes[0]


@dataclass(frozen=True, kw_only=True)
class Scheduler(_Spec):
    """Trial scheduler: ``none`` or ``asha`` (early stopping).

    ASHA's clock is the fraction of the privacy budget a trial has spent
    (``budget_used``), not its epochs: trials with different noise multipliers spend their
    budget over different numbers of epochs, and are only comparable at equal epsilon
    spent. A trial may be stopped once it has spent ``grace_budget`` of its epsilon; rungs
    follow at ``grace_budget x reduction_factor^k`` up to the whole budget.
    """

    name: str = "none"
    grace_budget: float = 0.25
    reduction_factor: float = 3

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, SCHEDULERS)
        c.number("grace_budget", self.grace_budget, low=0.0, high=1.0, low_open=True,
                 high_open=True)
        c.number("reduction_factor", self.reduction_factor, low=2)
        c.done()

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else super()._normalize(data)

    @classmethod
    def parse(cls, data: Any, prefix: str, problems: list[str]) -> Any:
        """As :meth:`_Spec.parse`, with a pointed message for the retired ``grace_period``."""
        if isinstance(data, dict) and "grace_period" in data:
            data = dict(data)
            problems.append(f"{prefix}grace_period: replaced by grace_budget, the fraction of "
                            f"epsilon a trial spends before ASHA may stop it (trials are "
                            f"compared at equal budget spent, e.g. grace_budget: 0.3) "
                            f"(got {data.pop('grace_period')!r})")
        return super().parse(data, prefix, problems)


@dataclass(frozen=True, kw_only=True)
class ConfirmSpec(_Spec):
    """Re-run the ``top`` configurations (by the objective on validation) with ``seeds``
    fresh seeds each when the search ends (``dpstudy confirm`` does the same on demand)."""

    top: int = 1
    seeds: int = 3

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("top", self.top, low=1, high=100, integer=True)
        c.number("seeds", self.seeds, low=2, high=MAX_CONFIRM_SEEDS, integer=True)
        c.done()


_SECTIONS: dict[str, type[_Spec]] = {
    "privacy": PrivacySpec, "pruning": PruningSpec, "dropping": DroppingSpec,
    "optimizer": OptimizerSpec, "search": SearchSpec, "resources_per_trial": Resources,
    "objective": Objective, "scheduler": Scheduler, "validation": ValidationSpec}
_CONFIGS = {"dataset": DataConfig, "model": ModelConfig}
# sections that may be given by their name alone (``scheduler: asha``, ``model: resnet18``)
NAME_SHORTHANDS = ("dataset", "model", "scheduler")


def _expand(location: str) -> str:
    return location if "://" in location else os.path.expanduser(location)


def _parse_config(config: type, data: Any, key: str, problems: list[str]) -> Any:
    """A :class:`DataConfig` or :class:`ModelConfig` from a name or a mapping; None (with its
    problems added) if invalid."""
    data = {"name": data} if isinstance(data, str) else data
    if not isinstance(data, dict):
        _not_mapping(key, data, problems)
        return None
    try:
        return config.from_dict(data, prefix=f"{key}.")
    except ConfigError as err:
        problems.extend(err.problems)
        return None


@dataclass(frozen=True, kw_only=True)
class StudySpec(_Spec):
    """A whole study: data, model, privacy budget, search space, Ray Tune settings, storage."""

    name: str | None = None
    seed: int = 0
    dataset: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    reproducible_noise: bool = False
    deterministic: bool = False
    precision: str = "fp32"
    privacy: PrivacySpec | None = None
    pruning: PruningSpec = field(default_factory=PruningSpec)
    dropping: DroppingSpec = field(default_factory=DroppingSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    search: SearchSpec | None = None
    selection: SelectionSpec = field(default_factory=SelectionSpec)  # YAML: search.mode/trials
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    trials: int | None = None
    max_concurrent: int = 1
    resources_per_trial: Resources = field(default_factory=Resources)
    max_failures: int = 2
    objective: Objective = field(default_factory=Objective)
    sampler: str | None = None  # default: tpe, or random in private-selection mode
    scheduler: Scheduler = field(default_factory=Scheduler)
    storage: str = "~/dpstudy-runs"
    results: str | None = None
    confirm: ConfirmSpec | None = None
    baseline_trial: bool = True
    loggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        c = _Checks("")
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            rule = "is required" if self.name is None else (
                f"must match {NAME_PATTERN.pattern} (it names directories)")
            c.fail("name", rule, self.name)
        elif self.results is None:
            object.__setattr__(self, "results", f"results/{self.name}")
        c.number("seed", self.seed, low=0, high=MAX_STUDY_SEED, integer=True)
        c.choice("device", self.device, DEVICES)
        c.choice("precision", self.precision, PRECISIONS)
        for flag in ("reproducible_noise", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                c.fail(flag, "must be true or false", getattr(self, flag))
        private_selection = isinstance(self.selection, SelectionSpec) and self.selection.private
        if self.sampler is None:
            object.__setattr__(self, "sampler", "random" if private_selection else "tpe")
        if self.trials is None and not private_selection:
            c.fail("trials", "is required", None)
        elif self.trials is not None:
            c.number("trials", self.trials, low=1, high=MAX_TRIALS, integer=True)
        c.number("max_concurrent", self.max_concurrent, low=1, high=MAX_CONCURRENT,
                 integer=True)
        c.number("max_failures", self.max_failures, low=0, high=MAX_FAILURES, integer=True)
        c.choice("sampler", self.sampler, SAMPLERS)
        if not isinstance(self.baseline_trial, bool):
            c.fail("baseline_trial", "must be true or false", self.baseline_trial)
        if not isinstance(self.loggers, tuple):
            c.fail("loggers", f"must be a list of {', '.join(LOGGERS)}", self.loggers)
        else:
            for i, logger in enumerate(self.loggers):
                c.choice(f"loggers[{i}]", logger, LOGGERS)
        for key in ("storage", "results") if self.results is not None else ("storage",):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                c.fail(key, "must be a non-empty path or URI string", getattr(self, key))
        sections_ok = True
        for key, typ in {**_SECTIONS, **_CONFIGS, "selection": SelectionSpec}.items():
            if not isinstance(getattr(self, key), typ):
                value, sections_ok = getattr(self, key), False
                c.fail(key, "is required" if value is None else f"must be a {typ.__name__}", value)
        if self.confirm is not None and not isinstance(self.confirm, ConfirmSpec):
            c.fail("confirm", "must be a mapping with top and seeds", self.confirm)
        if sections_ok:
            self._cross_check(c)
        c.done()

    def _cross_check(self, c: _Checks) -> None:
        uses_validation = any(m in VALIDATION_METRICS for m in self.objective.metrics)
        if uses_validation and not self.dataset.has_validation:
            c.fail("objective.metrics", "selecting on a validation metric needs a validation "
                   "split: set dataset.validation_fraction > 0 or dataset.validation",
                   list(self.objective.metrics))
        if self.device == "cuda" and self.resources_per_trial.gpu == 0:
            c.fail("device", "cuda needs resources_per_trial.gpu > 0", self.device)
        if self.precision == "bf16" and (self.device == "cpu"
                                         or self.resources_per_trial.gpu == 0):
            c.fail("precision", "bf16 needs a CUDA device: device auto or cuda, and "
                   "resources_per_trial.gpu > 0", self.precision)
        views = self.search.augmentation_multiplicity
        physical = self.optimizer.physical_batch_size
        if physical is not None and views is not None and physical < views.max_value():
            c.fail("optimizer.physical_batch_size", f"must be >= the largest "
                   f"search.augmentation_multiplicity = {views.max_value():g} (a pass holds "
                   f"every view of at least one example)", physical)
        if self.device == "cpu" and self.resources_per_trial.gpu > 0:
            c.fail("device", f"cpu would leave the resources_per_trial.gpu = "
                   f"{self.resources_per_trial.gpu:g} reserved for each trial unused; use auto "
                   f"or cuda, or set gpu: 0", self.device)
        needs_public = (("pruning.criterion", "snip", self.pruning.criterion, "prune_rate"),
                        ("dropping.criterion", "public-grad", self.dropping.criterion,
                         "drop_rate"))
        for key, criterion, chosen, rate in needs_public:
            searched_rate = getattr(self.search, rate)
            if criterion in chosen and self.dataset.public is None and searched_rate.max_value():
                c.fail(key, f"{criterion} needs dataset.public (public data)", criterion)
        for problem in selection_problems(self):
            c.problems.append(problem)

    @classmethod
    def from_dict(cls, data: Any) -> StudySpec:
        """Build and validate a spec from parsed YAML; raises :class:`SpecError` with all
        problems."""
        if not isinstance(data, dict):
            raise SpecError([f"spec: must be a mapping of keys to values (got {data!r})"])
        problems: list[str] = []
        data = dict(data)
        if isinstance(data.get("search"), dict):  # search.mode / search.trials: SelectionSpec
            search = dict(data["search"])
            picked = {k: search.pop(k) for k in ("mode", "trials") if k in search}
            data["search"], data["selection"] = search, picked
            if picked.get("mode") == "private-selection" and data.get("trials") is not None:
                problems.append(f"trials: private-selection draws the number of trials from "
                                f"search.trials; remove trials (got {data.pop('trials')!r})")
        kwargs = _known([k for k in cls._keys()], data, "", problems)
        kwargs["selection"] = SelectionSpec.parse(kwargs.get("selection"), "search.", problems)
        for key, section in _SECTIONS.items():
            kwargs[key] = section.parse(kwargs.get(key), f"{key}.", problems)
        for key, config in _CONFIGS.items():
            raw = kwargs.pop(key, None)
            if raw is not None:
                kwargs[key] = _parse_config(config, raw, key, problems)
        if "loggers" in kwargs:
            kwargs["loggers"] = _as_tuple(kwargs["loggers"])
        if kwargs.get("confirm") is not None:
            kwargs["confirm"] = ConfirmSpec.parse(kwargs["confirm"], "confirm.", problems)
            if kwargs["confirm"] is None:
                kwargs.pop("confirm")
        failed = {k for k, v in kwargs.items()
                  if v is None and k in {**_SECTIONS, **_CONFIGS, "selection": None}}
        kwargs = {k: v for k, v in kwargs.items() if k not in failed}
        spec = _build(cls, kwargs, "", problems, failed)
        if problems:
            raise SpecError(problems)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The YAML form; ``selection`` goes back inside ``search`` (mode, trials)."""
        out = super().to_dict()
        selection = out.pop("selection")
        if self.selection.private:
            out["search"] = {**out["search"], **selection}
        return out

    @property
    def storage_path(self) -> str:
        """``storage`` with ``~`` expanded unless it is a URI."""
        return _expand(self.storage)

    @property
    def results_path(self) -> str:
        """``results`` with ``~`` expanded unless it is a URI."""
        return _expand(self.results)

    def parameters(self) -> dict[str, Param | tuple[str, ...]]:
        """Every trial parameter (the keys :meth:`trial_config` takes): a :class:`Param` for
        numbers, a tuple of allowed strings for criteria (length 1 = fixed)."""
        return trial_space(self.search, self.pruning, self.dropping)

    def trial_config(self, params: dict[str, Any] | None = None, *,
                     seed: int | None = None) -> dict[str, Any]:
        """The :class:`~trainables.config.TrialConfig` dict of one trial: sampled ``params``
        (keys of :meth:`parameters`), fixed values from the spec for absent keys; ``seed``
        replaces the spec's seed (a confirmation run)."""
        v = trial_values(self.parameters(), params)
        return {
            "seed": self.seed if seed is None else seed, "device": self.device,
            "reproducible_noise": self.reproducible_noise, "deterministic": self.deterministic,
            "precision": self.precision,
            "dataset": self.dataset.to_dict(), "model": self.model.to_dict(),
            "pruning": {"rate": v["prune_rate"], "criterion": v["pruning_criterion"],
                        "scope": v["pruning_scope"], "granularity": v["pruning_granularity"]},
            "dropping": {"rate": v["drop_rate"], "criterion": v["dropping_criterion"]},
            "privacy": {"epsilon": self.privacy.epsilon, "delta": self.privacy.delta,
                        "accountant": self.privacy.accountant,
                        "validation_noise": self.validation.noise_for(
                            self.privacy.epsilon, self.privacy.delta),
                        "noise_multiplier": v.get("noise_multiplier"), "epochs": v.get("epochs")},
            "optim": {**self.optimizer.to_dict(), "learning_rate": v["learning_rate"],
                      "clip_norm": v["clip_norm"], "batch_size": v["batch_size"],
                      "max_epochs": v["max_epochs"],
                      "augmentation_multiplicity": v.get("augmentation_multiplicity", 1),
                      "ema_decay": v.get("ema_decay")},
        }


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec YAML file (UTF-8, no anchors or aliases); raises
    :class:`SpecError` naming the file, or the fields, at fault."""
    try:
        data = read_yaml_file(str(Path(path).expanduser()), "study spec")
    except ConfigError as err:
        raise SpecError([p.replace(str(Path(path).expanduser()), str(path), 1)
                         for p in err.problems]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: the top level must be a mapping of keys to values "
                         f"(got {type(data).__name__})"])
    return StudySpec.from_dict(data)


def check_against_data(spec: StudySpec, *, cluster: bool = False) -> None:
    """Checks that need the dataset or this machine: delta < 1/n and batch size <= n for the
    n private training examples, data files present, and the CPUs and GPUs a trial asks for
    present (unless ``cluster``, whose nodes may have what this machine lacks). Raises
    :class:`SpecError` with all problems."""
    from trainables.data import DataUnavailableError, dataset_size

    problems: list[str] = []
    n = None
    try:
        n = dataset_size(spec.dataset, seed=spec.seed)
    except DataUnavailableError as err:
        problems.append(f"dataset: data files are not available: {err} (got {spec.dataset.name!r})")
    except ValueError as err:  # e.g. a public hold-out as large as the data; names its field
        problems.append(str(err) if str(err).startswith("dataset") else f"dataset: {err}")
    if n is not None:
        if spec.privacy.delta >= 1 / n:
            problems.append(f"privacy.delta: must be < 1/n = {1 / n:.3g} for n = {n} training "
                            f"examples (got {spec.privacy.delta!r})")
        batch = spec.search.batch_size
        if batch.max_value() > n:
            where = {"fixed": "", "categorical": ".choices"}.get(batch.distribution_kind(), ".high")
            problems.append(f"search.batch_size{where}: must be <= n = {n} training examples "
                            f"(got {batch.max_value()!r})")
    if "mlflow" in spec.loggers:
        problems.extend(_mlflow_problems(spec, cluster))
    cpus = os.cpu_count() or 1
    if spec.resources_per_trial.cpu > cpus and not cluster:
        problems.append(f"resources_per_trial.cpu: each trial asks for "
                        f"{spec.resources_per_trial.cpu:g} CPUs but this machine has {cpus}; "
                        f"its trials would wait forever (got {spec.resources_per_trial.cpu!r})")
    gpu = spec.resources_per_trial.gpu
    if (gpu > 0 or spec.device == "cuda") and not cluster:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"resources_per_trial.gpu: requested {gpu:g} GPUs per trial but no "
                            f"GPU is available on this machine (got {gpu!r})")
    if problems:
        raise SpecError(problems)


def _mlflow_problems(spec: StudySpec, cluster: bool) -> list[str]:
    """``loggers: [mlflow]`` needs the package (here, unless the study runs on a cluster),
    and a tracking URI that is not a file in a URI storage."""
    import importlib.util

    if not cluster and importlib.util.find_spec("mlflow") is None:
        return ["loggers: mlflow is not installed; pip install 'dpstudy[trackers]' "
                "(got 'mlflow')"]
    if "://" in spec.storage and not os.environ.get("MLFLOW_TRACKING_URI"):
        return [f"loggers: mlflow with a URI storage needs MLFLOW_TRACKING_URI (a tracking "
                f"server); its default SQLite file lives in a local experiment directory "
                f"(got storage {spec.storage!r})"]
    return []
