"""The search space of a study spec, and the strict parsing all spec sections share.

:class:`Param` is one hyperparameter (a fixed value, a range or choices, within per-parameter
bounds); :class:`SearchSpec` holds the numeric ones, :class:`PruningSpec` and
:class:`DroppingSpec` the criteria. :func:`trial_space` flattens them into the trial
parameters and :func:`trial_values` resolves one trial's values. :class:`_Spec` and the helpers
parse YAML strictly, collecting ``"<dotted.field>: <rule> (got <value>)"`` problems; they are
the base of :mod:`study.spec.model`, which this module never imports.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from study.spec import hyperparameters
from trainables.config import (
    DROPPING_CRITERIA,
    GRANULARITIES,
    MAX_AUGMENTATION_MULTIPLICITY,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    PRUNING_CRITERIA,
    PRUNING_SCOPES,
    ConfigError,
    _Checks,
)

SEARCH_PARAMS = hyperparameters.names(searched=True)
_POSITIVE = {"low": 0, "low_open": True}
_RATE = {"low": 0, "high": 1, "high_open": True}
_EPOCHS = {**_POSITIVE, "high": MAX_EPOCHS}
_BOUNDS: dict[str, dict[str, Any]] = {
    "prune_rate": _RATE, "drop_rate": _RATE, "clip_norm": _POSITIVE,
    "noise_multiplier": _POSITIVE, "learning_rate": _POSITIVE, "max_epochs": _EPOCHS,
    "epochs": _EPOCHS, "batch_size": {"low": 1, "high": MAX_BATCH_SIZE, "integer": True},
    "augmentation_multiplicity": {"low": 1, "high": MAX_AUGMENTATION_MULTIPLICITY,
                                  "integer": True},
    "ema_decay": {"low": 0, "high": 1, "low_open": True, "high_open": True},
}
_INTEGER_PARAMS = ("batch_size", "augmentation_multiplicity")
_SEARCH_DEFAULTS = {"prune_rate": 0.0, "drop_rate": 0.0, "max_epochs": 10}


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
    """The top-level field a problem is about."""
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
    """``value`` as plain YAML data (``to_dict`` of specs, lists for tuples)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _as_tuple(value: Any) -> Any:
    """A string as a 1-tuple and a list as a tuple; anything else unchanged."""
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
    def _values(cls, data: dict[str, Any], prefix: str,
                problems: list[str]) -> tuple[dict[str, Any], set[str]]:
        """The constructor arguments from the known ``data``, and the fields that failed."""
        return {k: cls._coerce(k, v) for k, v in data.items()}, set()

    @classmethod
    def parse(cls, data: Any, prefix: str, problems: list[str]) -> Any:
        """Build the section from YAML data, adding problems; None if it cannot be built."""
        data = cls._normalize(data)
        if not isinstance(data, dict):
            _not_mapping(prefix, data, problems)
            return None
        known = _known(cls._keys(), data, prefix, problems)
        kwargs, failed = cls._values(known, prefix, problems)
        return _build(cls, kwargs, prefix, problems, failed)

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
    augmentation_multiplicity: Param | None = None  # K views per example (1 = off)
    ema_decay: Param | None = None  # parameter averaging (None = off)

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
    def _values(cls, data: dict[str, Any], prefix: str,
                problems: list[str]) -> tuple[dict[str, Any], set[str]]:
        """Each given parameter parsed as a :class:`Param` (a scalar, list or range mapping)."""
        kwargs, failed = {}, set()
        for key, raw in data.items():
            if raw is not None:
                param = Param.parse(raw, f"{prefix}{key}.", problems, name=key)
                if param is None:
                    failed.add(key)
                else:
                    kwargs[key] = param
        return kwargs, failed

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


def trial_space(search: SearchSpec, pruning: PruningSpec,
                dropping: DroppingSpec) -> dict[str, Param | tuple[str, ...]]:
    """Every trial parameter: a :class:`Param` per given search parameter, and a tuple of
    allowed strings per criterion (length 1 = fixed)."""
    out: dict[str, Param | tuple[str, ...]] = {
        k: getattr(search, k) for k in SEARCH_PARAMS if getattr(search, k)}
    return {**out, "pruning_criterion": pruning.criterion, "pruning_scope": pruning.scope,
            "pruning_granularity": pruning.granularity, "dropping_criterion": dropping.criterion}


def trial_values(space: dict[str, Param | tuple[str, ...]],
                 params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each parameter of ``space`` in one trial: from ``params`` (sampled values), else its
    fixed value; raises ValueError for an unknown key or a searched one not given."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(space))
    if unknown:
        raise ValueError(f"unknown trial parameters {unknown}; expected {sorted(space)}")
    values: dict[str, Any] = {}
    for key, p in space.items():
        if key in params:
            values[key] = params[key]
        elif isinstance(p, Param) and p.is_fixed():
            values[key] = p.value
        elif isinstance(p, tuple) and len(p) == 1:
            values[key] = p[0]
        else:
            raise ValueError(f"{key} is searched, so params must give a value for it")
    return values
