"""A JSON Schema of the study spec, generated from the spec's own dataclasses.

:func:`spec_schema` walks the fields and type hints of :class:`~study.spec.model.StudySpec` and
every section it holds (down to :mod:`trainables.config`), so the schema follows the code:
nothing about a field is written twice. What the type hints do not say is asked of the
classes themselves:

- allowed strings (``enum``): a field is set to a value no rule accepts and the
  ``"<field>: must be one of a, b, c"`` problem its ``__post_init__`` reports is read back;
- required fields: a section is built with no arguments and its ``"<field>: is required"``
  problems are read back;
- the short forms the parser accepts: a hyperparameter (:class:`~study.spec.params.Param`) as a
  number, a list of choices or a range mapping; a tuple of strings as one string; a section
  named in :data:`study.spec.model.NAME_SHORTHANDS` as its name alone.

``dpstudy schema`` prints it; editors with the YAML language server use it to complete and
check specs as they are typed (see README, "Editor support"). Validation against the schema
is a convenience for editors: :func:`study.spec.model.load_spec` remains the authority (it also
checks cross-field rules such as ``low < high``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from study.spec.model import NAME_SHORTHANDS, StudySpec
from study.spec.params import Param
from trainables.config import ConfigError

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_PROBE = "\x00"  # a value no rule accepts
_SCALARS = {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
            str: {"type": "string"}, type(None): {"type": "null"}}


def spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a study spec file."""
    defs: dict[str, Any] = {}
    root = _object_schema(StudySpec, defs)
    _selection_under_search(root, defs)
    return {"$schema": SCHEMA_DIALECT, "title": "dpstudy study spec", **root,
            "$defs": dict(sorted(defs.items()))}


def _selection_under_search(root: dict[str, Any], defs: dict[str, Any]) -> None:
    """``StudySpec.selection`` is written in YAML as ``search.mode`` and ``search.trials``
    (see :meth:`StudySpec.from_dict`): move its properties there."""
    root["properties"].pop("selection", None)
    # trials is required unless search.mode is private-selection (which draws it)
    root["required"] = [r for r in root.get("required", []) if r != "trials"]
    root["if"] = {"not": {"properties": {"search": {"properties": {"mode": {
        "const": "private-selection"}}, "required": ["mode"]}}, "required": ["search"]}}
    root["then"] = {"required": ["trials"]}
    selection = defs.pop("SelectionSpec", None)
    if selection is not None and "SearchSpec" in defs:
        defs["SearchSpec"]["properties"].update(selection["properties"])


def _problems(cls: type, **kwargs: Any) -> list[str]:
    """The problems ``cls(**kwargs)`` reports (none if it builds)."""
    try:
        cls(**kwargs)
    except ConfigError as err:
        return err.problems
    except (TypeError, AttributeError):
        return []
    return []


def _required(cls: type) -> list[str]:
    """Fields ``cls`` reports as required when built with no arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    found = (re.match(r"^(\w+): is required", p) for p in _problems(cls))
    return sorted({m.group(1) for m in found if m and m.group(1) in names})


def _enum(cls: type, name: str, as_tuple: bool) -> list[str] | None:
    """The strings field ``name`` of ``cls`` accepts, read from its "must be one of"
    problem; None if it has no such rule."""
    probe = (_PROBE,) if as_tuple else _PROBE
    pattern = re.compile(rf"^{re.escape(name)}(\[0\])?: must be one of (.*) \(got ")
    for problem in _problems(cls, **{name: probe}):
        match = pattern.match(problem)
        if match:
            return match.group(2).split(", ")
    return None


def _doc(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def _default(f: dataclasses.Field) -> dict[str, Any]:
    value = f.default
    if value is dataclasses.MISSING or value is None:
        return {}
    return {"default": list(value) if isinstance(value, tuple) else value}


def _param_schema() -> dict[str, Any]:
    """A hyperparameter: a fixed number, a list of choices, or a range mapping."""
    hints = typing.get_type_hints(Param)
    keys = [f.name for f in dataclasses.fields(Param) if f.init and f.name != "name"]
    mapping = {"type": "object", "additionalProperties": False,
               "properties": {k: _type_schema(hints[k], Param, k, {}) for k in keys}}
    return {"description": _doc(Param), "anyOf": [
        {"type": "number"}, {"type": "array", "items": {"type": "number"}, "minItems": 1},
        mapping]}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """An object schema of a spec section or config dataclass (fields from type hints)."""
    hints = typing.get_type_hints(cls)
    props, required = {}, _required(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        prop = _type_schema(hints[f.name], cls, f.name, defs)
        if f.name in required:  # "X | None = None" only to report it missing
            prop = _without_null(prop)
        if cls is StudySpec and f.name in NAME_SHORTHANDS:
            prop = {"anyOf": [_name_of(hints[f.name], defs), prop]}
        props[f.name] = {**prop, **_default(f)}
    out: dict[str, Any] = {"type": "object", "description": _doc(cls),
                           "additionalProperties": False, "properties": props}
    return {**out, "required": required} if required else out


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    parts = [p for p in schema.get("anyOf", [schema]) if p != {"type": "null"}]
    return parts[0] if len(parts) == 1 else {**schema, "anyOf": parts}


def _name_of(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of a section's ``name`` field (a section given by name alone)."""
    cls = next(a for a in _members(hint) if dataclasses.is_dataclass(a))
    _ref(cls, defs)
    return {"$ref": f"#/$defs/{cls.__name__}/properties/name"}


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _ref(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """A ``$ref`` to ``cls`` in ``defs``, adding its schema the first time."""
    if cls.__name__ not in defs:
        defs[cls.__name__] = {}  # placeholder first: sections may nest themselves
        defs[cls.__name__] = _param_schema() if cls is Param else _object_schema(cls, defs)
    return {"$ref": f"#/$defs/{cls.__name__}"}


def _type_schema(hint: Any, owner: type, name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one field's type hint."""
    members = _members(hint)
    if len(members) > 1:
        parts = [_type_schema(m, owner, name, defs) for m in members]
        return {"anyOf": parts}
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if item is str:  # the parser takes one string for a 1-tuple
            enum = _enum(owner, name, as_tuple=True)
            one = {"type": "string", **({"enum": enum} if enum else {})}
            return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
        return {"type": "array", "items": _type_schema(item, owner, name, defs), "minItems": 1}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _ref(hint, defs)
    if hint in _SCALARS:
        schema = dict(_SCALARS[hint])
        if hint is str:
            enum = _enum(owner, name, as_tuple=False)
            schema.update({"enum": enum} if enum else {})
        return schema
    raise TypeError(f"spec schema: no JSON Schema for {owner.__name__}.{name}: {hint!r}")
