"""A JSON Schema of the study spec (``dpstudy schema``, for editors' YAML language server).

It starts from ``StudySpec.model_json_schema()``, so nothing about a field is written twice,
and adds the YAML short forms: a hyperparameter as a number, a list or a range; ``search.mode``
and ``search.trials`` (the model's ``selection``); a section by its name alone
(:data:`study.spec.model.NAME_SHORTHANDS`); fields reported as required when absent. The schema
is a convenience: :func:`study.spec.model.load_spec` remains the authority (cross-field rules).
"""

from __future__ import annotations

from typing import Any

from study.spec.model import NAME_SHORTHANDS, StudySpec
from trainables.validation import Section

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a study spec file."""
    root = StudySpec.model_json_schema()
    defs = root.pop("$defs")
    sections = _sections(Section)
    for name, schema in [("StudySpec", root), *defs.items()]:
        _mark_required(schema, sections[name].required)
    param = defs["Param"]
    param["properties"].pop("name")
    defs["Param"] = {"description": param.get("description", ""), "anyOf": [
        {"type": "number"}, {"type": "array", "items": {"type": "number"}, "minItems": 1},
        param]}
    selection = defs.pop("SelectionSpec")
    defs["SearchSpec"]["properties"].update(selection["properties"])
    root["properties"].pop("selection")
    root["if"] = {"not": {"properties": {"search": {"properties": {"mode": {
        "const": "private-selection"}}, "required": ["mode"]}}, "required": ["search"]}}
    root["then"] = {"required": ["trials"]}
    for key in NAME_SHORTHANDS:
        prop = root["properties"][key]
        ref = prop["$ref"].rsplit("/", 1)[-1]
        root["properties"][key] = {"anyOf": [
            {"$ref": f"#/$defs/{ref}/properties/name"}, {"$ref": prop["$ref"]}],
            **({"default": prop["default"]} if "default" in prop else {})}
    return _standard({"$schema": SCHEMA_DIALECT, "title": "dpstudy study spec", **root,
                      "$defs": dict(sorted(defs.items()))})


def _sections(base: type) -> dict[str, type]:
    """Every subclass of ``base``, by name."""
    out = {}
    for cls in base.__subclasses__():
        out[cls.__name__] = cls
        out.update(_sections(cls))
    return out


def _mark_required(schema: dict[str, Any], required: tuple[str, ...]) -> None:
    """Fields that default to None only to be reported missing: required, not null."""
    if not required:
        return
    schema["required"] = sorted(required)
    for key in required:
        prop = schema["properties"][key]
        parts = [p for p in prop.get("anyOf", []) if p != {"type": "null"}]
        if len(parts) == 1:
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **parts[0]}
        schema["properties"][key] = {k: v for k, v in prop.items() if k != "default"}


_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum",
             "lt": "exclusiveMaximum"}


def _standard(node: Any) -> Any:
    """Bounds under their JSON Schema names (pydantic writes ``ge`` for a validated int)."""
    if isinstance(node, list):
        return [_standard(n) for n in node]
    if not isinstance(node, dict):
        return node
    typed = "type" in node
    return {(_KEYWORDS.get(k, k) if typed else k): _standard(v) for k, v in node.items()}
