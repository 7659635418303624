"""The study spec: a YAML file parsed once into a frozen, validated model.

- :mod:`~study.spec.hyperparameters`: the one table of hyperparameters;
- :mod:`~study.spec.params`: the search space (one :class:`Param` per hyperparameter);
- :mod:`~study.spec.sections`: privacy, optimizer, resources, objective, scheduler, confirm;
- :mod:`~study.spec.selection`: the private-selection and DP-validation sections;
- :mod:`~study.spec.model`: :class:`StudySpec`, :func:`load_spec`, the cross-field rules and
  the checks against the data;
- :mod:`~study.spec.schema`: the spec's JSON Schema (``dpstudy schema``).

Each section is a frozen pydantic model on :class:`trainables.validation.Section`, which
words every problem as ``"<dotted.field>: <rule> (got <value>)"``.
"""

from study.spec.model import SpecError, StudySpec, check_against_data, load_spec

__all__ = ["SpecError", "StudySpec", "check_against_data", "load_spec"]
