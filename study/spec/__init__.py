"""The study spec: a YAML file parsed once into frozen pydantic models (sections on
:class:`trainables.validation.Section`, which words every problem as
``"<dotted.field>: <rule> (got <value>)"``); :mod:`~study.spec.model` holds :class:`StudySpec`."""

from study.spec.model import SpecError, StudySpec, check_against_data, load_spec

__all__ = ["SpecError", "StudySpec", "check_against_data", "load_spec"]
