"""Validation shared by the trial config and the study spec: frozen pydantic models whose
problems are reported all at once, each as ``"<dotted.field>: <rule> (got <value>)"``.

:class:`Section` is the base of every config and spec section. Its one wrap validator is
the one place that words problems: it turns pydantic's errors into the rules' words
(:func:`translate`: ``must be > 0``, ``must be one of a, b``, ``unknown key; did you mean
'x'?``), runs the section's cross-field rules (:meth:`Section.problems`, which pydantic would
skip when any field fails) on the fields that passed, and raises the lot as one error that
the enclosing section prefixes with its field name. :class:`ConfigError` carries the lines.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trainables.errors import InputError

#: One problem: the dotted field (relative to a section), the rule and the value.
Problem = tuple[str, str, Any]
_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_TESTS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


class ConfigError(InputError, ValueError):
    """One or more invalid configuration values; ``problems`` lists each one."""

    prefix = ""  # the message is the list of problems (a spec error adds its own header)

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


def fail(rule: str, **got: Any) -> PydanticCustomError:
    """The error a validator raises for a value that breaks ``rule`` (in these words);
    ``got=`` names the value shown when it is not the one given."""
    return PydanticCustomError("dpstudy", rule, got or None)


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail("must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail("must be finite")
    return value


def _only(kind: type, rule: str) -> BeforeValidator:
    """Refuse anything but a ``kind`` (a bool is no int) with ``rule``."""

    def check(value: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise fail(rule)
        return value

    return BeforeValidator(check)


#: A finite int or float, kept as given (bools are not numbers); bounds with ``Field``.
Number = Annotated[int | float, BeforeValidator(_number), WithJsonSchema({"type": "number"})]
#: An int of any size (not a bool, not a float).
Integer = Annotated[int, _only(int, "must be an integer")]
Flag = Annotated[bool, _only(bool, "must be true or false")]
Text = Annotated[str, _only(str, "must be a string")]


def strings(allowed: tuple[str, ...], rule: str, *, empty: bool = False,
            items: bool = False) -> Any:
    """A tuple of ``allowed`` strings, given as one string or a list (``rule`` otherwise;
    an empty list only if ``empty``; an item not a string too unless ``items``); a wrong
    one is ``<field>[i]: must be one of ...``."""

    def as_tuple(value: Any) -> tuple[str, ...]:
        value = (value,) if isinstance(value, str) else value
        if (not isinstance(value, (list, tuple)) or (not value and not empty)
                or not (items or all(isinstance(v, str) for v in value))):
            raise fail(rule, got=tuple(value) if isinstance(value, list) else value)
        return tuple(value)

    one = {"type": "string", "enum": list(allowed)}
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
    return Annotated[tuple[Literal[allowed], ...], BeforeValidator(as_tuple),
                     WithJsonSchema(schema)]


def bound_rule(value: float, **bounds: float) -> str | None:
    """The rule ``value`` breaks among ``gt``/``ge``/``lt``/``le`` bounds (None if none)."""
    for key, limit in bounds.items():
        if not _TESTS[key](value, limit):
            return f"must be {_SIGNS[key]} {limit}"
    return None


def join(prefix: str, path: str) -> str:
    """``prefix.path`` (``prefix[i]`` for an index; either may be empty)."""
    if not prefix or not path:
        return prefix or path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def head(path: str) -> str:
    """The first field of a dotted path."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def shorten(value: Any) -> str:
    """``repr(value)``, or its head and length when longer than 80 characters."""
    try:
        text = repr(value)
    except ValueError:  # an int longer than Python converts to text
        return "an integer of more than 4300 digits"
    return text if len(text) <= 80 else f"{text[:40]}... ({len(text)} characters)"


def line(problem: Problem, prefix: str = "") -> str:
    """A problem as one line, ``prefix.field: rule (got value)``."""
    path, rule, value = problem
    return f"{join(prefix.rstrip('.'), path)}: {rule} (got {shorten(value)})"


def _rule(error: Any, model: type[BaseModel]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bound = [f"must be {sign} {ctx[key]}" for key, sign in _SIGNS.items() if key in ctx]
    if bound:
        return bound[0]
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1)
        return "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
    return {"missing": "is required"}.get(kind, error["msg"])  # (custom rules: their words)


def translate(err: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """The problems of a pydantic error raised while validating ``model``."""
    out: list[Problem] = []
    for error in err.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        path = path.removeprefix(".")
        if error["type"] == "problems":
            out += [(join(path, p), rule, v) for p, rule, v in error["ctx"]["found"]]
        else:
            value = (error["ctx"]["got"] if "got" in (error.get("ctx") or {}) else
                     None if error["type"] == "missing" else error["input"])
            out.append((path, _rule(error, model), value))
    return out


class _RaisesConfigError(type(BaseModel)):
    """Direct construction, ``Section(**kwargs)``, raises :class:`ConfigError` (pydantic
    never calls this for nested sections: it validates them without ``__call__``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise ConfigError([line(p) for p in translate(err, cls)]) from None


class Section(BaseModel, metaclass=_RaisesConfigError):
    """Base of every config and spec section: frozen, unknown keys refused, all problems
    reported together. Subclasses add short forms (:meth:`expand`) and cross-field rules
    (:meth:`problems`); ``required`` fields default to None and are reported when absent.

    ``Section(**kwargs)``, :meth:`from_dict` and :meth:`to_dict` are thin wrappers around
    pydantic's constructor, ``model_validate`` and ``model_dump`` that raise
    :class:`ConfigError` instead of pydantic's ``ValidationError``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    section: ClassVar[str] = ""  # the prefix of :meth:`from_dict`'s problems
    not_a_mapping: ClassVar[str] = "must be a mapping of keys to values"
    required: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str | None = None) -> Any:
        """Build and validate from plain (YAML) data; :class:`ConfigError` lists every
        problem, prefixed with ``prefix`` (default: the section's name)."""
        prefix = cls.section if prefix is None else prefix
        try:
            return cls.model_validate({} if data is None else data)
        except ValidationError as err:
            raise ConfigError([line(p, prefix) for p in translate(err, cls)]) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable data that :meth:`from_dict` accepts."""
        return self.model_dump(mode="json")

    @classmethod
    def expand(cls, data: Any) -> Any:
        """The mapping a short form stands for (``data`` itself by default)."""
        return data

    @classmethod
    def relabel(cls, found: list[Problem], raw: Any) -> list[Problem]:
        """Problems as named for the form the user wrote (unchanged by default)."""
        return found

    def problems_despite(self, failed: set[str]) -> Iterator[Problem]:
        """The rules to report when the fields ``failed`` (now at their defaults) did not
        validate: :meth:`problems` by default."""
        return self.problems()

    def problems(self) -> Iterator[Problem]:
        """Cross-field rules: each broken one as ``(field, rule, value)``."""
        for name in self.required:
            if getattr(self, name) is None:
                yield name, "is required", None

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, cls):
            return data
        raw, data = data, cls.expand(data)
        if not isinstance(data, dict):
            raise fail(cls.not_a_mapping)
        try:
            model = handler(data)
        except ValidationError as err:
            found = translate(err, cls)
            failed = {head(p[0]) for p in found}
            try:  # the rules, on the fields that passed (the others at their defaults)
                rest = handler({k: v for k, v in data.items() if k not in failed})
                found += [p for p in rest.problems_despite(failed) if head(p[0]) not in failed]
            except ValidationError:
                pass
        else:
            found = list(model.problems())
            if not found:
                return model
        raise PydanticCustomError("problems", "{count} problems",
                                  {"count": len(found), "found": cls.relabel(found, raw)})


def problems_of(cls: type[Section], data: Any, prefix: str) -> list[Problem]:
    """The problems of ``data`` as a ``cls`` section, their fields under ``prefix``."""
    try:
        cls.model_validate(data)
    except ValidationError as err:
        return [(join(prefix, p), rule, v) for p, rule, v in translate(err, cls)]
    return []
