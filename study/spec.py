"""The study spec: a user-written YAML file parsed once into frozen, keyword-only dataclasses.

:func:`load_spec` reads the file and :meth:`StudySpec.from_dict` builds the tree. Unknown keys
are rejected with a "did you mean" hint, wrong types and out-of-range values become problems,
and *every* problem is reported together in one :class:`SpecError`, each as
``"<dotted.field>: <rule> (got <value>)"``. :func:`check_against_data` adds the checks that need
the dataset or the machine (delta < 1/n, batch size <= n, GPUs present).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from trainables.config import (
    ACCOUNTANTS,
    DEVICES,
    DROPPING_CRITERIA,
    GRANULARITIES,
    OPTIMIZERS,
    PRUNING_CRITERIA,
    PRUNING_SCOPES,
    ConfigError,
    DataConfig,
    ModelConfig,
    _Checks,
)

METRICS = ("test_accuracy", "best_test_accuracy", "test_loss", "density", "epsilon_spent",
           "wall_time_s", "trial_cost")
MODES = ("max", "min")
SAMPLERS = ("tpe", "random", "nsgaii", "gp")
SCHEDULERS = ("none", "asha")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SEARCH_PARAMS = ("prune_rate", "drop_rate", "clip_norm", "noise_multiplier", "learning_rate",
                 "batch_size", "max_epochs", "epochs")
_POSITIVE = {"low": 0, "low_open": True}
_RATE = {"low": 0, "high": 1, "high_open": True}
_BOUNDS: dict[str, dict[str, Any]] = {
    "prune_rate": _RATE, "drop_rate": _RATE, "clip_norm": _POSITIVE,
    "noise_multiplier": _POSITIVE, "learning_rate": _POSITIVE, "max_epochs": _POSITIVE,
    "epochs": _POSITIVE, "batch_size": {"low": 1, "integer": True},
}
_INTEGER_PARAMS = ("batch_size",)
_SEARCH_DEFAULTS = {"prune_rate": 0.0, "drop_rate": 0.0, "max_epochs": 10}
_MAXIMISED = ("test_accuracy", "best_test_accuracy")


class SpecError(ConfigError):
    """An invalid study spec; ``problems`` lists every problem found."""

    def __str__(self) -> str:
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid study spec ({n} problem{'' if n == 1 else 's'}):\n{lines}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _known(allowed: list[str], data: dict, prefix: str, problems: list[str]) -> dict[str, Any]:
    """The entries of ``data`` whose keys are allowed; a problem (with a hint) for the rest."""
    out = {}
    for key, value in data.items():
        if key in allowed:
            out[key] = value
            continue
        hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append(f"{prefix}{key}: unknown key{extra} (got {value!r})")
    return out


def _head(problem: str) -> str:
    return re.split(r"[.:\[]", problem, maxsplit=1)[0]


def _build(cls: type, kwargs: dict[str, Any], prefix: str, problems: list[str],
           failed: set[str] | frozenset[str] = frozenset()) -> Any:
    """``cls(**kwargs)``, or None with its problems (except those of ``failed`` fields) added."""
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems.extend(prefix + p for p in err.problems if _head(p) not in failed)
    except TypeError as err:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {err}")
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else (
        tuple(value) if isinstance(value, list) else value)


def _not_mapping(prefix: str, value: Any, problems: list[str]) -> None:
    problems.append(f"{prefix.rstrip('.')}: must be a mapping (got {value!r})")


@dataclass(frozen=True, kw_only=True)
class Param:
    """A hyperparameter: fixed ``value``, a ``low``..``high`` range (``log``, ``step``) or
    ``choices``. ``name`` (a :data:`SEARCH_PARAMS` entry) selects the per-parameter bounds."""

    value: float | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[float, ...] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        c = _Checks("")
        forms = (self.value is not None, self.low is not None or self.high is not None,
                 self.choices is not None)
        rule = _BOUNDS.get(self.name, {})
        if sum(forms) != 1:
            c.fail("value", "give exactly one of value, low and high, or choices", self.value)
        elif self.value is not None:
            c.number("value", self.value, **rule)
        elif self.choices is not None:
            self._check_choices(c, rule)
        else:
            self._check_range(c, rule)
        c.done()

    def _check_choices(self, c: _Checks, rule: dict[str, Any]) -> None:
        if not isinstance(self.choices, tuple) or not self.choices:
            c.fail("choices", "must be a non-empty list", self.choices)
            return
        for i, v in enumerate(self.choices):
            c.number(f"choices[{i}]", v, **rule)
        if len(set(self.choices)) != len(self.choices):
            c.fail("choices", "must not repeat a value", list(self.choices))

    def _check_range(self, c: _Checks, rule: dict[str, Any]) -> None:
        for key in ("low", "high"):
            if getattr(self, key) is None:
                c.fail(key, "is required for a range (give both low and high)", None)
            else:
                c.number(key, getattr(self, key), **rule)
        if not isinstance(self.log, bool):
            c.fail("log", "must be true or false", self.log)
        if self.step is not None:
            c.number("step", self.step, low=0.0, low_open=True,
                     integer=self.name in _INTEGER_PARAMS)
            if self.log:
                c.fail("step", "cannot be combined with log: true", self.step)
        if c.problems:
            return
        if self.low >= self.high:
            c.fail("low", f"must be < high = {self.high!r}", self.low)
        if self.log and self.low <= 0:
            c.fail("low", "must be > 0 with log: true", self.low)

    def is_fixed(self) -> bool:
        """Whether this parameter has one fixed value (is not searched)."""
        return self.value is not None

    def distribution_kind(self) -> str:
        """``fixed``, ``categorical``, ``int`` (batch_size, or int bounds with an int step)
        or ``float``."""
        if self.value is not None:
            return "fixed"
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) for v in (self.low, self.high, self.step))
        return "int" if self.name in _INTEGER_PARAMS or ints else "float"

    def max_value(self) -> float:
        """The largest value this parameter can take."""
        return self.value if self.value is not None else (
            max(self.choices) if self.choices is not None else self.high)

    def to_dict(self) -> Any:
        """The YAML form: a scalar, a list of choices, or a range mapping."""
        if self.value is not None:
            return self.value
        if self.choices is not None:
            return list(self.choices)
        out = {"low": self.low, "high": self.high, "log": self.log}
        return out if self.step is None else {**out, "step": self.step}

    @classmethod
    def parse(cls, data: Any, prefix: str, problems: list[str], *, name: str = "") -> Param | None:
        """Build from a scalar (fixed), a list (choices) or a mapping; None if invalid."""
        if isinstance(data, dict):
            keys = ["value", "low", "high", "log", "step", "choices"]
            kwargs = _known(keys, data, prefix, problems)
            if isinstance(kwargs.get("choices"), list):
                kwargs["choices"] = tuple(kwargs["choices"])
            return _build(cls, {**kwargs, "name": name}, prefix, problems)
        if isinstance(data, list):
            kwargs = {"choices": tuple(data)}
        elif _is_number(data):
            kwargs = {"value": data}
        else:
            problems.append(f"{prefix.rstrip('.')}: must be a number, a list of choices or a "
                            f"mapping with low and high (got {data!r})")
            return None
        sub: list[str] = []
        obj = _build(cls, {**kwargs, "name": name}, prefix, sub)
        problems.extend(p.replace(f"{prefix}value:", f"{prefix.rstrip('.')}:", 1) for p in sub)
        return obj


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """Base of the spec sections: strict parsing from YAML data, and back."""

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        return {} if data is None else data

    @classmethod
    def _coerce(cls, key: str, value: Any) -> Any:
        return value

    @classmethod
    def parse(cls, data: Any, prefix: str, problems: list[str]) -> Any:
        """Build the section from YAML data, adding problems; None if it cannot be built."""
        data = cls._normalize(data)
        if not isinstance(data, dict):
            _not_mapping(prefix, data, problems)
            return None
        kwargs = _known(cls._keys(), data, prefix, problems)
        return _build(cls, {k: cls._coerce(k, v) for k, v in kwargs.items()}, prefix, problems)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`parse` accepts."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class SearchSpec(_Spec):
    """The searched (or fixed) training hyperparameters; exactly one of noise_multiplier or
    epochs."""

    prune_rate: Param | None = None
    drop_rate: Param | None = None
    clip_norm: Param | None = None
    noise_multiplier: Param | None = None
    learning_rate: Param | None = None
    batch_size: Param | None = None
    max_epochs: Param | None = None
    epochs: Param | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        for name, value in _SEARCH_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, Param(name=name, value=value))
        for name in SEARCH_PARAMS:
            p = getattr(self, name)
            if p is not None and not isinstance(p, Param):
                c.fail(name, "must be a Param", p)
            elif p is not None and p.name != name:
                try:
                    object.__setattr__(self, name, dataclasses.replace(p, name=name))
                except ConfigError as err:
                    c.problems.extend(f"{name}.{q}" for q in err.problems)
        for name in ("clip_norm", "learning_rate", "batch_size"):
            if getattr(self, name) is None:
                c.fail(name, "is required", None)
        if (self.noise_multiplier is None) == (self.epochs is None):
            c.fail("noise_multiplier", "give exactly one of noise_multiplier (noise decides the "
                   "steps) or epochs (epochs decide the noise)", _plain(self.noise_multiplier))
        c.done()

    @classmethod
    def parse(cls, data: Any, prefix: str, problems: list[str]) -> SearchSpec | None:
        """Build from a mapping of parameter name to scalar, list or range mapping."""
        data = cls._normalize(data)
        if not isinstance(data, dict):
            _not_mapping(prefix, data, problems)
            return None
        kwargs, failed = {}, set()
        for key, raw in _known(cls._keys(), data, prefix, problems).items():
            if raw is not None:
                param = Param.parse(raw, f"{prefix}{key}.", problems, name=key)
                if param is None:
                    failed.add(key)
                else:
                    kwargs[key] = param
        return _build(cls, kwargs, prefix, problems, failed)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, leaving out parameters that are not given."""
        return {k: getattr(self, k).to_dict() for k in SEARCH_PARAMS if getattr(self, k)}


@dataclass(frozen=True, kw_only=True)
class _Choices(_Spec):
    """Sections whose fields are tuples of allowed strings (length 1 = fixed, else searched)."""

    allowed: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        c = _Checks("")
        for name, allowed in self.allowed.items():
            v = getattr(self, name)
            if not isinstance(v, tuple) or not v or not all(isinstance(x, str) for x in v):
                c.fail(name, "must be a string or a non-empty list of strings", v)
                continue
            for i, x in enumerate(v):
                c.choice(name if len(v) == 1 else f"{name}[{i}]", x, allowed)
            if len(set(v)) != len(v):
                c.fail(name, "must not repeat a value", list(v))
        c.done()

    @classmethod
    def _coerce(cls, key: str, value: Any) -> Any:
        return _as_tuple(value)

    def to_dict(self) -> dict[str, Any]:
        """Fixed choices as a string, searched ones as a list."""
        return {k: getattr(self, k)[0] if len(getattr(self, k)) == 1 else list(getattr(self, k))
                for k in self.allowed}


@dataclass(frozen=True, kw_only=True)
class PruningSpec(_Choices):
    """Pre-pruning criterion, scope and granularity (each fixed or searched)."""

    allowed: ClassVar[dict[str, tuple[str, ...]]] = {
        "criterion": PRUNING_CRITERIA, "scope": PRUNING_SCOPES, "granularity": GRANULARITIES}
    criterion: tuple[str, ...] = ("random",)
    scope: tuple[str, ...] = ("global",)
    granularity: tuple[str, ...] = ("unstructured",)


@dataclass(frozen=True, kw_only=True)
class DroppingSpec(_Choices):
    """Gradient-dropping criterion (fixed or searched)."""

    allowed: ClassVar[dict[str, tuple[str, ...]]] = {"criterion": DROPPING_CRITERIA}
    criterion: tuple[str, ...] = ("random",)


@dataclass(frozen=True, kw_only=True)
class PrivacySpec(_Spec):
    """The fixed privacy budget of every trial and the accountant that enforces it."""

    epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "prv"

    def __post_init__(self) -> None:
        c = _Checks("")
        if self.epsilon is None:
            c.fail("epsilon", "is required", None)
        else:
            c.number("epsilon", self.epsilon, low=0.0, low_open=True)
        c.number("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        c.choice("accountant", self.accountant, ACCOUNTANTS)
        c.done()


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(_Spec):
    """The optimiser settings that are not searched."""

    name: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, OPTIMIZERS)
        c.number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        c.number("weight_decay", self.weight_decay, low=0.0)
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
    """One or two metrics to optimise; modes default to max for accuracies, min otherwise."""

    metrics: tuple[str, ...] = ("test_accuracy",)
    modes: tuple[str, ...] | None = None

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
        c.done()

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
    """Trial scheduler: ``none`` or ``asha`` (early stopping by epoch)."""

    name: str = "none"
    grace_period: int = 1
    reduction_factor: float = 3

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, SCHEDULERS)
        c.number("grace_period", self.grace_period, low=1, integer=True)
        c.number("reduction_factor", self.reduction_factor, low=2)
        c.done()

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else super()._normalize(data)


_SECTIONS: dict[str, type[_Spec]] = {
    "privacy": PrivacySpec, "pruning": PruningSpec, "dropping": DroppingSpec,
    "optimizer": OptimizerSpec, "search": SearchSpec, "resources_per_trial": Resources,
    "objective": Objective, "scheduler": Scheduler}
_CONFIGS = {"dataset": DataConfig, "model": ModelConfig}
_CHOICE_PARAMS = {"pruning_criterion": ("pruning", "criterion"),
                  "pruning_scope": ("pruning", "scope"),
                  "pruning_granularity": ("pruning", "granularity"),
                  "dropping_criterion": ("dropping", "criterion")}


def _expand(location: str) -> str:
    return location if "://" in location else os.path.expanduser(location)


@dataclass(frozen=True, kw_only=True)
class StudySpec(_Spec):
    """A whole study: data, model, privacy budget, search space, Ray Tune settings, storage."""

    name: str | None = None
    seed: int = 0
    dataset: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    privacy: PrivacySpec | None = None
    pruning: PruningSpec = field(default_factory=PruningSpec)
    dropping: DroppingSpec = field(default_factory=DroppingSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    search: SearchSpec | None = None
    trials: int | None = None
    max_concurrent: int = 1
    resources_per_trial: Resources = field(default_factory=Resources)
    max_failures: int = 2
    objective: Objective = field(default_factory=Objective)
    sampler: str = "tpe"
    scheduler: Scheduler = field(default_factory=Scheduler)
    storage: str = "~/dpstudy-runs"
    results: str | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            rule = "is required" if self.name is None else (
                f"must match {NAME_PATTERN.pattern} (it names directories)")
            c.fail("name", rule, self.name)
        elif self.results is None:
            object.__setattr__(self, "results", f"results/{self.name}")
        c.number("seed", self.seed, low=0, integer=True)
        c.choice("device", self.device, DEVICES)
        if self.trials is None:
            c.fail("trials", "is required", None)
        else:
            c.number("trials", self.trials, low=1, integer=True)
        c.number("max_concurrent", self.max_concurrent, low=1, integer=True)
        c.number("max_failures", self.max_failures, low=0, integer=True)
        c.choice("sampler", self.sampler, SAMPLERS)
        for key in ("storage", "results") if self.results is not None else ("storage",):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                c.fail(key, "must be a non-empty path or URI string", getattr(self, key))
        sections_ok = True
        for key, typ in {**_SECTIONS, **_CONFIGS}.items():
            if not isinstance(getattr(self, key), typ):
                value, sections_ok = getattr(self, key), False
                c.fail(key, "is required" if value is None else f"must be a {typ.__name__}", value)
        if sections_ok:
            self._cross_check(c)
        c.done()

    def _cross_check(self, c: _Checks) -> None:
        max_epochs = self.search.max_epochs
        if (self.scheduler.name == "asha" and max_epochs is not None and max_epochs.is_fixed()
                and self.scheduler.grace_period > max_epochs.value):
            c.fail("scheduler.grace_period", f"must be <= search.max_epochs = {max_epochs.value}",
                   self.scheduler.grace_period)
        if self.device == "cuda" and self.resources_per_trial.gpu == 0:
            c.fail("device", "cuda needs resources_per_trial.gpu > 0", self.device)
        needs_public = (("pruning.criterion", "snip", self.pruning.criterion, "prune_rate"),
                        ("dropping.criterion", "public-grad", self.dropping.criterion,
                         "drop_rate"))
        for key, criterion, chosen, rate in needs_public:
            searched_rate = getattr(self.search, rate)
            if criterion in chosen and self.dataset.public is None and searched_rate.max_value():
                c.fail(key, f"{criterion} needs dataset.public (public data)", criterion)

    @classmethod
    def from_dict(cls, data: Any) -> StudySpec:
        """Build and validate a spec from parsed YAML; raises :class:`SpecError` with all
        problems."""
        if not isinstance(data, dict):
            raise SpecError([f"spec: must be a mapping of keys to values (got {data!r})"])
        problems: list[str] = []
        kwargs = _known(cls._keys(), data, "", problems)
        failed = set()
        for key, section in _SECTIONS.items():
            kwargs[key] = section.parse(kwargs.get(key), f"{key}.", problems)
            if kwargs[key] is None:
                failed.add(key)
                del kwargs[key]
        for key, config in _CONFIGS.items():
            raw = kwargs.get(key)
            raw = {"name": raw} if isinstance(raw, str) else raw
            if raw is not None and not isinstance(raw, dict):
                _not_mapping(key, raw, problems)
                failed.add(key)
            elif raw is not None:
                try:
                    kwargs[key] = config.from_dict(raw, prefix=f"{key}.")
                except ConfigError as err:
                    problems.extend(err.problems)
                    failed.add(key)
            if key in failed or raw is None:
                kwargs.pop(key, None)
        spec = _build(cls, kwargs, "", problems, failed)
        if problems:
            raise SpecError(problems)
        return spec

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
        out: dict[str, Param | tuple[str, ...]] = {
            k: getattr(self.search, k) for k in SEARCH_PARAMS if getattr(self.search, k)}
        for key, (section, attr) in _CHOICE_PARAMS.items():
            out[key] = getattr(getattr(self, section), attr)
        return out

    def trial_config(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The :class:`~trainables.config.TrialConfig` dict of one trial: sampled ``params``
        (keys of :meth:`parameters`), fixed values from the spec for absent keys."""
        space, params = self.parameters(), dict(params or {})
        unknown = sorted(set(params) - set(space))
        if unknown:
            raise ValueError(f"unknown trial parameters {unknown}; expected {sorted(space)}")
        v: dict[str, Any] = {}
        for key, p in space.items():
            if key in params:
                v[key] = params[key]
            elif isinstance(p, Param) and p.is_fixed():
                v[key] = p.value
            elif isinstance(p, tuple) and len(p) == 1:
                v[key] = p[0]
            else:
                raise ValueError(f"{key} is searched, so params must give a value for it")
        return {
            "seed": self.seed, "device": self.device,
            "dataset": self.dataset.to_dict(), "model": self.model.to_dict(),
            "pruning": {"rate": v["prune_rate"], "criterion": v["pruning_criterion"],
                        "scope": v["pruning_scope"], "granularity": v["pruning_granularity"]},
            "dropping": {"rate": v["drop_rate"], "criterion": v["dropping_criterion"]},
            "privacy": {"epsilon": self.privacy.epsilon, "delta": self.privacy.delta,
                        "accountant": self.privacy.accountant,
                        "noise_multiplier": v.get("noise_multiplier"), "epochs": v.get("epochs")},
            "optim": {**self.optimizer.to_dict(), "learning_rate": v["learning_rate"],
                      "clip_norm": v["clip_norm"], "batch_size": v["batch_size"],
                      "max_epochs": v["max_epochs"]},
        }


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-5`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec YAML file; raises :class:`SpecError`."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: study spec file not found (got {str(path)!r})"]) from None
    except OSError as err:
        raise SpecError([f"{path}: cannot read the study spec ({err.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        what = getattr(err, "problem", None) or str(err)
        raise SpecError([f"{path}: invalid YAML at {where}: {what}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: the top level must be a mapping of keys to values "
                         f"(got {type(data).__name__})"])
    return StudySpec.from_dict(data)


def check_against_data(spec: StudySpec, *, cluster: bool = False) -> None:
    """Checks that need the dataset or this machine: delta < 1/n and batch size <= n for the
    n private training examples, data files present, and GPUs present (unless ``cluster``,
    whose nodes may have GPUs this machine lacks). Raises :class:`SpecError` with all
    problems."""
    from trainables.data import DataUnavailableError, dataset_size

    problems: list[str] = []
    try:
        n = dataset_size(spec.dataset, seed=spec.seed)
    except DataUnavailableError as err:
        problems.append(f"dataset: data files are not available: {err} (got {spec.dataset.name!r})")
        n = None
    except ValueError as err:  # e.g. a public hold-out as large as the data; names its field
        problems.append(str(err) if str(err).startswith("dataset") else f"dataset: {err}")
        n = None
    if n is not None:
        if spec.privacy.delta >= 1 / n:
            problems.append(f"privacy.delta: must be < 1/n = {1 / n:.3g} for n = {n} training "
                            f"examples (got {spec.privacy.delta!r})")
        batch = spec.search.batch_size
        if batch.max_value() > n:
            where = {"fixed": "", "categorical": ".choices"}.get(batch.distribution_kind(), ".high")
            problems.append(f"search.batch_size{where}: must be <= n = {n} training examples "
                            f"(got {batch.max_value()!r})")
    gpu = spec.resources_per_trial.gpu
    if (gpu > 0 or spec.device == "cuda") and not cluster:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"resources_per_trial.gpu: requested {gpu:g} GPUs per trial but no "
                            f"GPU is available on this machine (got {gpu!r})")
    if problems:
        raise SpecError(problems)
