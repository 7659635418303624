"""A JSON Schema of the study spec (``dpstudy schema``, for editors' YAML language server).

It starts from ``StudySpec.model_json_schema()``, so nothing about a field is written twice,
and adds the YAML short forms: a hyperparameter as a number, a list or a range; ``search.mode``
and ``search.trials`` (the model's ``selection``); a section by its name alone
(:data:`study.spec.model.NAME_SHORTHANDS`); each section marks its own required fields
(:class:`study.spec.params.Spec`). The schema is a convenience: :func:`load_spec` remains the
authority (cross-field rules).
"""

from __future__ import annotations

from typing import Any

from study.spec.model import NAME_SHORTHANDS, StudySpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a study spec file."""
    root = StudySpec.model_json_schema()
    defs = root.pop("$defs")
    param = defs["Param"]
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


_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum",
             "lt": "exclusiveMaximum"}


def _standard(node: Any) -> Any:
    """Bounds under their JSON Schema names (pydantic writes ``ge`` for a validated int);
    an object's ``required`` right after its ``type``, where the schema has always had it."""
    if isinstance(node, list):
        return [_standard(n) for n in node]
    if not isinstance(node, dict):
        return node
    typed = "type" in node
    items = [(k, v) for k, v in node.items() if not (typed and k == "required")]
    if typed and "required" in node:
        items.insert([k for k, _ in items].index("type") + 1, ("required", node["required"]))
    return {(_KEYWORDS.get(k, k) if typed else k): _standard(v) for k, v in items}
