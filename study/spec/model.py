"""The study spec: :class:`StudySpec`, read by :func:`load_spec` into frozen pydantic models
that report every problem together in one :class:`SpecError`; :func:`check_against_data` adds
the checks that need the dataset or the machine."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Le
from pydantic import BeforeValidator, field_validator

from study.spec.hyperparameters import HYPERPARAMETERS
from study.spec.params import (
    SEARCH_PARAMS,
    DroppingSpec,
    Param,
    PruningSpec,
    SearchSpec,
    Spec,
    trial_values,
)
from study.spec.sections import (
    MAX_CONFIRM_SEEDS,
    VALIDATION_METRICS,
    ConfirmSpec,
    Objective,
    OptimizerSpec,
    PrivacySpec,
    Resources,
    Scheduler,
)
from study.spec.selection import SelectionSpec, ValidationSpec, selection_problems, validation_noise
from trainables.config import (
    DEVICES,
    MAX_SEED,
    PRECISIONS,
    ConfigError,
    DataConfig,
    ModelConfig,
    read_yaml_file,
)
from trainables.validation import Flag, Integer, Problem, Section, fail, problems_of, strings

SAMPLERS = ("tpe", "random", "nsgaii", "gp")
LOGGERS = ("mlflow", "tensorboard")  # Ray Tune's own experiment-tracker callbacks
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_TRIALS = 100_000
#: a study's seed leaves room for its confirmation seeds within numpy's seed range
MAX_STUDY_SEED = MAX_SEED - MAX_CONFIRM_SEEDS
MAX_CONCURRENT = 10_000
MAX_FAILURES = 1_000
_REMOVE_TRIALS = "private-selection draws the number of trials from search.trials; remove trials"
# sections that may be given by their name alone (``scheduler: asha``, ``model: resnet18``)
NAME_SHORTHANDS = ("dataset", "model", "scheduler")


class SpecError(ConfigError):
    """An invalid study spec; ``problems`` lists every problem found."""

    def __str__(self) -> str:
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid study spec ({n} problem{'' if n == 1 else 's'}):\n{lines}"


def _study_name(value: Any) -> Any:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise fail(f"must match {NAME_PATTERN.pattern} (it names directories)")
    return value


def _location(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise fail("must be a non-empty path or URI string")
    return value


Location = Annotated[str, BeforeValidator(_location)]


class StudySpec(Spec):
    """A whole study: data, model, privacy budget, search space, Ray Tune settings, storage.

    ``selection`` is written in YAML as ``search.mode`` and ``search.trials``."""

    required: ClassVar[tuple[str, ...]] = ("name", "privacy", "search")
    name: Annotated[str, BeforeValidator(_study_name)] | None = None
    seed: Annotated[Integer, Ge(0), Le(MAX_STUDY_SEED)] = 0
    dataset: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    device: Literal[DEVICES] = "auto"
    reproducible_noise: Flag = False
    deterministic: Flag = False
    precision: Literal[PRECISIONS] = "fp32"
    privacy: PrivacySpec | None = None
    pruning: PruningSpec = PruningSpec()
    dropping: DroppingSpec = DroppingSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    search: SearchSpec | None = None
    selection: SelectionSpec = SelectionSpec()  # YAML: search.mode/trials
    validation: ValidationSpec = ValidationSpec()
    trials: Annotated[Integer, Ge(1), Le(MAX_TRIALS)] | None = None
    max_concurrent: Annotated[Integer, Ge(1), Le(MAX_CONCURRENT)] = 1
    resources_per_trial: Resources = Resources()
    max_failures: Annotated[Integer, Ge(0), Le(MAX_FAILURES)] = 2
    objective: Objective = Objective()
    sampler: Literal[SAMPLERS] | None = None  # default: tpe, or random in private selection
    scheduler: Scheduler = Scheduler()
    storage: Location = "~/dpstudy-runs"
    results: Location | None = None
    confirm: ConfirmSpec | None = None
    baseline_trial: Flag = True
    loggers: strings(LOGGERS, f"must be a list of {', '.join(LOGGERS)}", empty=True,
                     items=True) = ()

    @classmethod
    def expand(cls, data: Any) -> Any:
        """``search.mode``/``search.trials`` into ``selection``; the default sampler and
        results location."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("search"), dict):
            search = dict(data["search"])
            data["selection"] = {k: search.pop(k) for k in ("mode", "trials") if k in search}
            data["search"] = search
        selection = data.get("selection")
        private = isinstance(selection, dict) and selection.get("mode") == "private-selection"
        if data.get("sampler") is None:
            data["sampler"] = "random" if private else "tpe"
        name = data.get("name")
        if data.get("results") is None and isinstance(name, str) and NAME_PATTERN.match(name):
            data["results"] = f"results/{name}"
        return data

    @classmethod
    def relabel(cls, found: list[Problem], raw: Any) -> list[Problem]:
        """``selection`` is written as ``search.mode`` and ``search.trials``; top-level
        ``trials`` are refused in private selection even when ``search.trials`` is invalid."""
        found = [(re.sub(r"^selection\b", "search", p), rule, v) for p, rule, v in found]
        search = raw.get("search") if isinstance(raw, dict) else None
        if (isinstance(search, dict) and search.get("mode") == "private-selection"
                and raw.get("trials") is not None and all(p != "trials" for p, _, _ in found)):
            found.append(("trials", _REMOVE_TRIALS, raw["trials"]))
        return found

    @field_validator(*NAME_SHORTHANDS, mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        """A section given by its name alone (:data:`NAME_SHORTHANDS`)."""
        if isinstance(value, str):
            return {"name": value}
        if value is not None and not isinstance(value, (dict, Section)):
            raise fail("must be a mapping")
        return {} if value is None else value

    def problems(self) -> Iterator[Problem]:
        """Required fields and sections, and the rules that tie sections together."""
        for key, section in (("privacy", PrivacySpec), ("search", SearchSpec)):
            if getattr(self, key) is None:
                yield from problems_of(section, {}, key)
        if self.name is None:
            yield "name", "is required", None
        if self.trials is None and not self.selection.private:
            yield "trials", "is required", None
        elif self.trials is not None and self.selection.private:
            yield "trials", _REMOVE_TRIALS, self.trials
        if self.privacy is not None and self.search is not None:
            yield from self._cross_problems()
            yield from selection_problems(self)

    def _cross_problems(self) -> Iterator[Problem]:
        uses_validation = any(m in VALIDATION_METRICS for m in self.objective.metrics)
        if uses_validation and not self.dataset.has_validation:
            yield ("objective.metrics", "selecting on a validation metric needs a validation "
                   "split: set dataset.validation_fraction > 0 or dataset.validation",
                   list(self.objective.metrics))
        gpu = self.resources_per_trial.gpu
        if self.device == "cuda" and gpu == 0:
            yield "device", "cuda needs resources_per_trial.gpu > 0", self.device
        if self.precision == "bf16" and (self.device == "cpu" or gpu == 0):
            yield ("precision", "bf16 needs a CUDA device: device auto or cuda, and "
                   "resources_per_trial.gpu > 0", self.precision)
        views = self.search.augmentation_multiplicity
        physical = self.optimizer.physical_batch_size
        if physical is not None and views is not None and physical < views.max_value():
            yield ("optimizer.physical_batch_size", f"must be >= the largest "
                   f"search.augmentation_multiplicity = {views.max_value():g} (a pass holds "
                   f"every view of at least one example)", physical)
        if self.device == "cpu" and gpu > 0:
            yield ("device", f"cpu would leave the resources_per_trial.gpu = {gpu:g} reserved "
                   f"for each trial unused; use auto or cuda, or set gpu: 0", self.device)
        needs_public = (("pruning.criterion", "snip", self.pruning.criterion, "prune_rate"),
                        ("dropping.criterion", "public-grad", self.dropping.criterion,
                         "drop_rate"))
        for key, criterion, chosen, rate in needs_public:
            searched_rate = getattr(self.search, rate)
            if criterion in chosen and self.dataset.public is None and searched_rate.max_value():
                yield key, f"{criterion} needs dataset.public (public data)", criterion

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str | None = None) -> StudySpec:
        """Build and validate a spec from parsed YAML; :class:`SpecError` lists every problem."""
        if not isinstance(data, dict):
            raise SpecError([f"spec: must be a mapping of keys to values (got {data!r})"])
        try:
            return super().from_dict(data, prefix=prefix)
        except ConfigError as err:
            raise SpecError(err.problems) from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form; ``selection`` goes back inside ``search`` (mode, trials)."""
        out = super().to_dict()
        selection = out.pop("selection")
        if self.selection.private:
            out["search"] = {**out["search"], **selection}
        return out

    @property
    def storage_path(self) -> str:
        """``storage`` with ``~`` expanded unless it is a URI."""
        return self.storage if "://" in self.storage else os.path.expanduser(self.storage)

    @property
    def results_path(self) -> str:
        """``results`` with ``~`` expanded unless it is a URI."""
        return self.results if "://" in self.results else os.path.expanduser(self.results)

    def parameters(self) -> dict[str, Param | tuple[str, ...]]:
        """Every trial parameter (the keys :meth:`trial_config` takes): a :class:`Param` per
        given search parameter, a tuple of allowed strings per criterion (length 1 = fixed)."""
        space = {k: p for k in SEARCH_PARAMS if (p := getattr(self.search, k)) is not None}
        return {**space, **{h.name: getattr(getattr(self, h.section), h.key)
                            for h in HYPERPARAMETERS if h.criterion}}

    def trial_config(self, params: dict[str, Any] | None = None, *,
                     seed: int | None = None) -> dict[str, Any]:
        """The :class:`~trainables.config.TrialConfig` dict of one trial: sampled ``params``
        (keys of :meth:`parameters`), fixed values from the spec for absent keys; ``seed``
        replaces the spec's seed (a confirmation run)."""
        values = trial_values(self.parameters(), params)
        config = {
            "seed": self.seed if seed is None else seed, "device": self.device,
            "reproducible_noise": self.reproducible_noise, "deterministic": self.deterministic,
            "precision": self.precision,
            "dataset": self.dataset.to_dict(), "model": self.model.to_dict(),
            "pruning": {}, "dropping": {},
            "privacy": {"epsilon": self.privacy.epsilon, "delta": self.privacy.delta,
                        "accountant": self.privacy.accountant,
                        "validation_noise": validation_noise(self)},
            "optim": self.optimizer.to_dict(),
        }
        for h in HYPERPARAMETERS:  # a parameter not given is off: None, or 1 view per example
            default = 1 if h.name == "augmentation_multiplicity" else None
            config[h.section][h.key] = values.get(h.name, default)
        return config


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec YAML file (UTF-8, no anchors or aliases); raises
    :class:`SpecError` naming the file, or the fields, at fault."""
    try:
        data = read_yaml_file(str(Path(path).expanduser()), "study spec")
    except ConfigError as err:
        raise SpecError([p.replace(str(Path(path).expanduser()), str(path), 1)
                         for p in err.problems]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: the top level must be a mapping of keys to values "
                         f"(got {type(data).__name__})"])
    return StudySpec.from_dict(data)


def check_against_data(spec: StudySpec, *, cluster: bool = False) -> None:
    """Checks that need the dataset or this machine: delta < 1/n and batch size <= n for the
    n private training examples, data files present, and the CPUs and GPUs a trial asks for
    present (unless ``cluster``, whose nodes may have what this machine lacks). Raises
    :class:`SpecError` with all problems."""
    from trainables.data import dataset_size
    from trainables.errors import DataUnavailableError

    problems: list[str] = []
    n = None
    try:
        n = dataset_size(spec.dataset, seed=spec.seed)
    except DataUnavailableError as err:
        problems.append(f"dataset: data files are not available: {err} (got {spec.dataset.name!r})")
    except ValueError as err:  # e.g. a public hold-out as large as the data; names its field
        problems.append(str(err) if str(err).startswith("dataset") else f"dataset: {err}")
    if n is not None:
        if spec.privacy.delta >= 1 / n:
            problems.append(f"privacy.delta: must be < 1/n = {1 / n:.3g} for n = {n} training "
                            f"examples (got {spec.privacy.delta!r})")
        batch = spec.search.batch_size
        if batch.max_value() > n:
            where = {"fixed": "", "categorical": ".choices"}.get(batch.distribution_kind(), ".high")
            problems.append(f"search.batch_size{where}: must be <= n = {n} training examples "
                            f"(got {batch.max_value()!r})")
    if "mlflow" in spec.loggers:
        problems.extend(_mlflow_problems(spec, cluster))
    cpus = os.cpu_count() or 1
    if spec.resources_per_trial.cpu > cpus and not cluster:
        problems.append(f"resources_per_trial.cpu: each trial asks for "
                        f"{spec.resources_per_trial.cpu:g} CPUs but this machine has {cpus}; "
                        f"its trials would wait forever (got {spec.resources_per_trial.cpu!r})")
    gpu = spec.resources_per_trial.gpu
    if (gpu > 0 or spec.device == "cuda") and not cluster:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"resources_per_trial.gpu: requested {gpu:g} GPUs per trial but no "
                            f"GPU is available on this machine (got {gpu!r})")
    if problems:
        raise SpecError(problems)


def _mlflow_problems(spec: StudySpec, cluster: bool) -> list[str]:
    """``loggers: [mlflow]`` needs the package (here, unless the study runs on a cluster),
    and a tracking URI that is not a file in a URI storage."""
    import importlib.util

    if not cluster and importlib.util.find_spec("mlflow") is None:
        return ["loggers: mlflow is not installed; pip install 'dpstudy[trackers]' "
                "(got 'mlflow')"]
    if "://" in spec.storage and not os.environ.get("MLFLOW_TRACKING_URI"):
        return [f"loggers: mlflow with a URI storage needs MLFLOW_TRACKING_URI (a tracking "
                f"server); its default SQLite file lives in a local experiment directory "
                f"(got storage {spec.storage!r})"]
    return []
