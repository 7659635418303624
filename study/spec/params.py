"""The search space of a study spec (one :class:`Param` per hyperparameter, the criteria of
:class:`PruningSpec` and :class:`DroppingSpec`), and :class:`Spec`, the base of every spec
section."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_serializer
from pydantic.json_schema import SkipJsonSchema

from study.spec import hyperparameters
from trainables.config import (
    DROPPING_CRITERIA,
    GRANULARITIES,
    MAX_AUGMENTATION_MULTIPLICITY,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    PRUNING_CRITERIA,
    PRUNING_SCOPES,
)
from trainables.validation import (
    Flag,
    Number,
    Problem,
    Section,
    bound_rule,
    fail,
    strings,
)

SEARCH_PARAMS = hyperparameters.names(searched=True)
_POSITIVE = {"gt": 0}
_RATE = {"ge": 0, "lt": 1}
_EPOCHS = {"gt": 0, "le": MAX_EPOCHS}
_BOUNDS: dict[str, dict[str, float]] = {
    "prune_rate": _RATE, "drop_rate": _RATE, "clip_norm": _POSITIVE,
    "noise_multiplier": _POSITIVE, "learning_rate": _POSITIVE, "max_epochs": _EPOCHS,
    "epochs": _EPOCHS, "batch_size": {"ge": 1, "le": MAX_BATCH_SIZE},
    "augmentation_multiplicity": {"ge": 1, "le": MAX_AUGMENTATION_MULTIPLICITY},
    "ema_decay": {"gt": 0, "lt": 1},
}
_INTEGER_PARAMS = ("batch_size", "augmentation_multiplicity")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _required_in_schema(schema: dict[str, Any], cls: type[Spec]) -> None:
    """JSON Schema: fields that default to None only to be reported missing are required."""
    if cls.required:
        schema["required"] = sorted(cls.required)
    for key in cls.required:
        prop = schema["properties"][key]
        prop.pop("default", None)
        parts = [p for p in prop.get("anyOf", []) if p != {"type": "null"}]
        if len(parts) == 1:
            del prop["anyOf"]
            prop.update(parts[0])


class Spec(Section):
    """Base of the spec sections: a section left empty (``null``) takes its defaults."""

    model_config = ConfigDict(json_schema_extra=_required_in_schema)
    not_a_mapping: ClassVar[str] = "must be a mapping"

    @classmethod
    def expand(cls, data: Any) -> Any:
        """An empty section (None) is an empty mapping."""
        return {} if data is None else data


def _as_choices(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise fail("must be a non-empty list")
    return tuple(value)


class Param(Spec):
    """A hyperparameter: fixed ``value``, a ``low``..``high`` range (``log``, ``step``) or
    ``choices``. ``name`` (a :data:`SEARCH_PARAMS` entry) selects the per-parameter bounds."""

    value: Number | None = None
    low: Number | None = None
    high: Number | None = None
    log: Flag = False
    step: Number | None = None
    choices: Annotated[tuple[Number, ...], BeforeValidator(_as_choices)] | None = None
    name: SkipJsonSchema[Literal[("", *SEARCH_PARAMS)]] = Field("", exclude=True)

    @classmethod
    def expand(cls, data: Any) -> Any:
        """A number is a fixed value, a list the choices."""
        if _is_number(data):
            return {"value": data}
        if isinstance(data, list):
            return {"choices": data}
        if not isinstance(data, dict):
            raise fail("must be a number, a list of choices or a mapping with low and high")
        return data

    def problems(self) -> Iterator[Problem]:
        """One form, values within the parameter's bounds, ``low < high``."""
        forms = (self.value is not None, self.low is not None or self.high is not None,
                 self.choices is not None)
        if sum(forms) != 1:
            yield "value", "give exactly one of value, low and high, or choices", self.value
        elif self.choices is not None:
            if not self.choices:
                yield "choices", "must be a non-empty list", self.choices
            yield from self._bounds_problems()
            if len(set(self.choices)) != len(self.choices):
                yield "choices", "must not repeat a value", list(self.choices)
        elif self.value is None:
            yield from self._range_problems()
        else:
            yield from self._bounds_problems()

    def problems_despite(self, failed: set[str]) -> Iterator[Problem]:
        """With a field invalid, only the bounds of the others."""
        return self._bounds_problems()

    def _bounds_problems(self) -> Iterator[Problem]:
        given = [("value", self.value), ("low", self.low), ("high", self.high),
                 *((f"choices[{i}]", v) for i, v in enumerate(self.choices or ()))]
        for key, value in given:
            if value is not None:
                yield from self._bounded(key, value, _BOUNDS.get(self.name, {}))

    def _bounded(self, key: str, value: float, bounds: dict[str, float]) -> Iterator[Problem]:
        if self.name in _INTEGER_PARAMS and not isinstance(value, int):
            yield key, "must be an integer", value
        elif rule := bound_rule(value, **bounds):
            yield key, rule, value

    def _range_problems(self) -> Iterator[Problem]:
        found: list[Problem] = [
            (key, "is required for a range (give both low and high)", None)
            for key in ("low", "high") if getattr(self, key) is None]
        found += self._bounds_problems()
        if self.step is not None:
            found += self._bounded("step", self.step, {"gt": 0.0})
            if self.log:
                found.append(("step", "cannot be combined with log: true", self.step))
        yield from found
        if found:
            return
        if self.low >= self.high:
            yield "low", f"must be < high = {self.high!r}", self.low
        if self.log and self.low <= 0:
            yield "low", "must be > 0 with log: true", self.low

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

    @model_serializer
    def to_dict(self) -> Any:
        """The YAML form: a scalar, a list of choices, or a range mapping."""
        if self.value is not None:
            return self.value
        if self.choices is not None:
            return list(self.choices)
        out = {"low": self.low, "high": self.high, "log": self.log}
        return out if self.step is None else {**out, "step": self.step}


def _named(name: str, raw: Any) -> Any:
    """A parameter's YAML value with its name (which selects its bounds)."""
    raw = Param.expand(raw) if _is_number(raw) or isinstance(raw, list) else raw
    return {"name": name, **raw} if isinstance(raw, dict) else raw


class SearchSpec(Spec):
    """The searched (or fixed) training hyperparameters; exactly one of noise_multiplier or
    epochs."""

    required: ClassVar[tuple[str, ...]] = ("clip_norm", "learning_rate", "batch_size")
    prune_rate: Param | None = Param(name="prune_rate", value=0.0)
    drop_rate: Param | None = Param(name="drop_rate", value=0.0)
    clip_norm: Param | None = None
    noise_multiplier: Param | None = None
    learning_rate: Param | None = None
    batch_size: Param | None = None
    max_epochs: Param | None = Param(name="max_epochs", value=10)
    epochs: Param | None = None
    augmentation_multiplicity: Param | None = None  # K views per example (1 = off)
    ema_decay: Param | None = None  # parameter averaging (None = off)

    @classmethod
    def expand(cls, data: Any) -> Any:
        """Each given parameter named (a parameter set to null keeps its default)."""
        data = super().expand(data)
        if not isinstance(data, dict):
            return data
        return {k: _named(k, v) if k in SEARCH_PARAMS else v
                for k, v in data.items() if v is not None}

    @classmethod
    def relabel(cls, found: list[Problem], raw: Any) -> list[Problem]:
        """A parameter given as one number: its value's problems name the parameter."""
        scalar = {f"{k}.value" for k, v in raw.items() if _is_number(v)} if isinstance(
            raw, dict) else set()
        return [(p.removesuffix(".value") if p in scalar else p, rule, v)
                for p, rule, v in found]

    def problems(self) -> Iterator[Problem]:
        """The required parameters, and exactly one of noise_multiplier or epochs."""
        for key in SEARCH_PARAMS:
            p = getattr(self, key)
            if p is not None and p.name != key:
                yield f"{key}.name", "unknown key", p.name
        yield from super().problems()
        if (self.noise_multiplier is None) == (self.epochs is None):
            yield ("noise_multiplier", "give exactly one of noise_multiplier (noise decides "
                   "the steps) or epochs (epochs decide the noise)",
                   self.noise_multiplier and self.noise_multiplier.to_dict())

    @model_serializer(mode="wrap")
    def _given(self, handler: Any) -> dict[str, Any]:
        """The YAML form, leaving out parameters that are not given."""
        return {k: v for k, v in handler(self).items() if v is not None}


_CHOICE_RULE = "must be a string or a non-empty list of strings"


class CriteriaSpec(Spec):
    """Sections whose fields are tuples of allowed strings (length 1 = fixed, else
    searched), written as one string or a list."""

    def problems(self) -> Iterator[Problem]:
        """No value twice."""
        for name, values in self:
            if len(set(values)) != len(values):
                yield name, "must not repeat a value", list(values)

    @classmethod
    def relabel(cls, found: list[Problem], raw: Any) -> list[Problem]:
        """A criterion given once is named without an index."""
        one = {f"{k}[0]" for k, v in raw.items() if isinstance(v, str) or (
            isinstance(v, list) and len(v) == 1)} if isinstance(raw, dict) else set()
        return [(p.removesuffix("[0]") if p in one else p, rule, v) for p, rule, v in found]

    @model_serializer(mode="wrap")
    def _short(self, handler: Any) -> dict[str, Any]:
        """Fixed choices as a string, searched ones as a list."""
        return {k: v[0] if len(v) == 1 else v for k, v in handler(self).items()}


class PruningSpec(CriteriaSpec):
    """Pre-pruning criterion, scope and granularity (each fixed or searched)."""

    criterion: strings(PRUNING_CRITERIA, _CHOICE_RULE) = ("random",)
    scope: strings(PRUNING_SCOPES, _CHOICE_RULE) = ("global",)
    granularity: strings(GRANULARITIES, _CHOICE_RULE) = ("unstructured",)


class DroppingSpec(CriteriaSpec):
    """Gradient-dropping criterion (fixed or searched)."""

    criterion: strings(DROPPING_CRITERIA, _CHOICE_RULE) = ("random",)


def trial_values(space: dict[str, Param | tuple[str, ...]],
                 params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each parameter of ``space`` in one trial: from ``params`` (sampled values), else its
    fixed value; raises ValueError for an unknown key or a searched one not given."""
    params = params or {}
    unknown = sorted(set(params) - set(space))
    if unknown:
        raise ValueError(f"unknown trial parameters {unknown}; expected {sorted(space)}")
    values: dict[str, Any] = {}
    for key, p in space.items():
        fixed = p.value if isinstance(p, Param) else p[0] if len(p) == 1 else None
        if key not in params and fixed is None:
            raise ValueError(f"{key} is searched, so params must give a value for it")
        values[key] = params.get(key, fixed)
    return values
