"""Reading YAML input (trial configs, study specs, ``--set`` overrides) safely.

:class:`SafeYamlLoader` refuses what would make a few bytes of YAML cost gigabytes or a
crash (aliases, deep nesting), or silently mean something else (duplicate keys);
:func:`load_yaml` and :func:`read_yaml_file` turn every failure into one
:class:`~trainables.validation.ConfigError` line naming the source and the line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from trainables.validation import ConfigError

#: Deepest nesting of lists and mappings a YAML document may have (specs need about 5).
MAX_YAML_DEPTH = 64


class SafeYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (an alias "bomb" expands a few
    hundred bytes into gigabytes), duplicate keys (at any depth: the later one would win
    silently) and nesting deeper than :data:`MAX_YAML_DEPTH` (which would end in a
    RecursionError), and reads ``1e-5`` (no dot) as a float."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (&name, *name) are not allowed; write "
                "the values out", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels of lists or "
                "mappings", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # unhashable: the base class says so
                    continue
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line "
                        f"{earlier.start_mark.line + 1}, again at line "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        """An int, or one line for one longer than Python converts (4300 digits)."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(node.value)} characters is too long",
                node.start_mark) from None


SafeYamlLoader.add_constructor("tag:yaml.org,2002:int", SafeYamlLoader.construct_yaml_int)


SafeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML with :class:`SafeYamlLoader`; a :class:`ConfigError` naming ``source`` and
    the line on bad input."""
    try:
        return yaml.load(text, Loader=SafeYamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        what = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{source}: invalid YAML at {where}: {what}"]) from None


def read_yaml_file(path: str, what: str) -> Any:
    """Read and parse a YAML file; a :class:`ConfigError` naming the file if it is missing,
    unreadable, not UTF-8 or not valid YAML."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: {what} file not found (got {path!r})"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the {what} ({err.strerror})"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: the {what} must be UTF-8 text (byte {err.start} is "
                           f"{raw[err.start:err.start + 1]!r})"]) from None
    return load_yaml(text, path)
