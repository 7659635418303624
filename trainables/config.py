"""Configuration of one trial: frozen, keyword-only dataclasses validated on creation.

A trial is fully described by a :class:`TrialConfig`. The study service builds one per
trial from the study spec and the sampled hyperparameters (as a plain dict, which is what
Ray Tune carries), and :func:`TrialConfig.from_dict` turns it back into this tree.

Every dataclass checks its own fields in ``__post_init__`` and reports *all* problems at
once as a :class:`ConfigError` whose messages name the field, the rule and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

DATASETS = ("mnist", "fashion-mnist", "cifar10", "mnist-5k", "idx")
MODELS = ("cnn-mnist", "cnn-cifar10", "resnet18")
PRUNING_CRITERIA = ("random", "magnitude", "snip")
PRUNING_SCOPES = ("global", "layerwise")
GRANULARITIES = ("unstructured", "structured")
DROPPING_CRITERIA = ("random", "magnitude", "public-grad")
ACCOUNTANTS = ("prv", "rdp")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """One or more invalid configuration values; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


class _Checks:
    """Collects rule violations as ``'<prefix>.<field>: <rule> (got <value>)'``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.problems: list[str] = []

    def fail(self, name: str, rule: str, value: Any) -> None:
        self.problems.append(f"{self.prefix}{name}: {rule} (got {value!r})")

    def number(self, name: str, value: Any, *, low: float | None = None,
               high: float | None = None, low_open: bool = False,
               high_open: bool = False, integer: bool = False) -> None:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(name, "must be an integer" if integer else "must be a number", value)
            return
        if not math.isfinite(value):
            self.fail(name, "must be finite", value)
            return
        if low is not None and (value < low or (low_open and value == low)):
            self.fail(name, f"must be {'>' if low_open else '>='} {low}", value)
        if high is not None and (value > high or (high_open and value == high)):
            self.fail(name, f"must be {'<' if high_open else '<='} {high}", value)

    def choice(self, name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}", value)

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


T = TypeVar("T", bound="_Section")


@dataclass(frozen=True, kw_only=True)
class _Section:
    """Base of every config section: strict construction from nested dicts."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "") -> T:
        """Build the section from a dict, rejecting unknown keys with a suggestion."""
        data = dict(data or {})
        prefix = prefix or (cls.section + "." if cls.section else "")
        problems: list[str] = []
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in list(data):
            if key not in fields:
                hint = difflib.get_close_matches(str(key), list(fields), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                problems.append(f"{prefix}{key}: unknown key{extra} (got {data.pop(key)!r})")
        for name, sub in _nested_sections(cls).items():
            if isinstance(data.get(name), dict):
                try:
                    data[name] = sub.from_dict(data[name], prefix=f"{prefix}{name}.")
                except ConfigError as err:
                    problems.extend(err.problems)
                    data.pop(name)
        try:
            obj = cls(**data)
        except ConfigError as err:
            problems.extend(p if p.startswith(prefix) else prefix + p for p in err.problems)
        except TypeError as err:
            problems.append(f"{prefix.rstrip('.') or cls.__name__}: {err}")
        if problems:
            raise ConfigError(problems)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


def _nested_sections(cls: type) -> dict[str, type[_Section]]:
    hints = {"DataConfig": DataConfig, "PublicConfig": PublicConfig, "ModelConfig": ModelConfig,
             "PruningConfig": PruningConfig, "DroppingConfig": DroppingConfig,
             "PrivacyConfig": PrivacyConfig, "OptimConfig": OptimConfig}
    out = {}
    for f in dataclasses.fields(cls):
        for name, section in hints.items():
            if isinstance(f.type, str) and f.type.split(" ")[0] == name:
                out[f.name] = section
    return out


@dataclass(frozen=True, kw_only=True)
class PublicConfig(_Section):
    """Public data for selection criteria that may look at public data only.

    Either ``size`` examples held out of the training set (removed from the private data,
    so they are disjoint from it), or the training split of another ``dataset``.
    """

    size: int | None = None
    dataset: DataConfig | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        if (self.size is None) == (self.dataset is None):
            c.fail("size", "give exactly one of size or dataset", self.size)
        if self.size is not None:
            c.number("size", self.size, low=1, integer=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Which dataset to train on; see :mod:`trainables.data` for the registry."""

    section: ClassVar[str] = "dataset"
    name: str = "mnist-5k"
    root: str = "~/.cache/dpstudy/data"
    download: bool = True
    train_images: str | None = None
    train_labels: str | None = None
    test_images: str | None = None
    test_labels: str | None = None
    test: DataConfig | None = None
    test_fraction: float = 0.2
    public: PublicConfig | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, DATASETS)
        c.number("test_fraction", self.test_fraction, low=0.0, high=1.0, low_open=True,
                 high_open=True)
        if self.name == "idx":
            for key in ("train_images", "train_labels"):
                if not getattr(self, key):
                    c.fail(key, "is required for an idx dataset", getattr(self, key))
            has_test = bool(self.test_images) and bool(self.test_labels)
            if not has_test and self.test is None:
                c.fail("test_images", "an idx dataset needs test_images and test_labels, "
                       "or a test dataset", self.test_images)
        c.done()


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """Architecture, width multiplier (CNNs) and optional local weights to start from."""

    section: ClassVar[str] = "model"
    name: str = "cnn-mnist"
    width: float = 1.0
    weights: str | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, MODELS)
        c.number("width", self.width, low=0.0, low_open=True, high=64)
        c.done()


@dataclass(frozen=True, kw_only=True)
class PruningConfig(_Section):
    """Pre-pruning: the fraction of weights removed before DP training, and how."""

    section: ClassVar[str] = "pruning"
    rate: float = 0.0
    criterion: str = "random"
    scope: str = "global"
    granularity: str = "unstructured"

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("rate", self.rate, low=0.0, high=1.0, high_open=True)
        c.choice("criterion", self.criterion, PRUNING_CRITERIA)
        c.choice("scope", self.scope, PRUNING_SCOPES)
        c.choice("granularity", self.granularity, GRANULARITIES)
        c.done()


@dataclass(frozen=True, kw_only=True)
class DroppingConfig(_Section):
    """Gradient dropping: the fraction of trainable coordinates not updated per step."""

    section: ClassVar[str] = "dropping"
    rate: float = 0.0
    criterion: str = "random"

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("rate", self.rate, low=0.0, high=1.0, high_open=True)
        c.choice("criterion", self.criterion, DROPPING_CRITERIA)
        c.done()


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig(_Section):
    """The fixed budget, and either a noise multiplier or a number of epochs.

    With ``noise_multiplier`` the accountant decides how many steps fit in the budget
    (capped by ``OptimConfig.max_epochs``); with ``epochs`` it decides the noise.
    """

    section: ClassVar[str] = "privacy"
    epsilon: float = 3.0
    delta: float = 1e-5
    accountant: str = "prv"
    noise_multiplier: float | None = None
    epochs: float | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("epsilon", self.epsilon, low=0.0, low_open=True)
        c.number("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        c.choice("accountant", self.accountant, ACCOUNTANTS)
        if (self.noise_multiplier is None) == (self.epochs is None):
            c.fail("noise_multiplier", "give exactly one of noise_multiplier or epochs",
                   self.noise_multiplier)
        if self.noise_multiplier is not None:
            c.number("noise_multiplier", self.noise_multiplier, low=0.0, low_open=True)
        if self.epochs is not None:
            c.number("epochs", self.epochs, low=0.0, low_open=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """Optimiser, step size, clipping norm and (expected) batch size."""

    section: ClassVar[str] = "optim"
    name: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 256
    max_epochs: float = 10.0

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, OPTIMIZERS)
        c.number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        c.number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        c.number("weight_decay", self.weight_decay, low=0.0)
        c.number("clip_norm", self.clip_norm, low=0.0, low_open=True)
        c.number("batch_size", self.batch_size, low=1, integer=True)
        c.number("max_epochs", self.max_epochs, low=0.0, low_open=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class TrialConfig(_Section):
    """Everything one trial needs. ``checkpoint_dir`` enables per-epoch checkpoints.

    ``reproducible_noise`` (research only) seeds the DP noise and batch sampling from
    ``seed`` instead of a secret seed (see :mod:`trainables.randomness`);
    ``deterministic`` asks torch for deterministic algorithms and no TF32."""

    seed: int = 0
    device: str = "auto"
    reproducible_noise: bool = False
    deterministic: bool = False
    eval_batch_size: int = 1024
    checkpoint_dir: str | None = None
    dataset: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    dropping: DroppingConfig = field(default_factory=DroppingConfig)
    privacy: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(noise_multiplier=1.0))
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        c = _Checks("")
        c.number("seed", self.seed, low=0, integer=True)
        c.choice("device", self.device, DEVICES)
        for flag in ("reproducible_noise", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                c.fail(flag, "must be true or false", getattr(self, flag))
        c.number("eval_batch_size", self.eval_batch_size, low=1, integer=True)
        if self.dropping.criterion == "public-grad" and self.dropping.rate > 0:
            if self.dataset.public is None:
                c.fail("dropping.criterion", "public-grad needs dataset.public",
                       self.dropping.criterion)
        if self.pruning.criterion == "snip" and self.pruning.rate > 0:
            if self.dataset.public is None:
                c.fail("pruning.criterion", "snip needs dataset.public (it may only look at "
                       "public data)", self.pruning.criterion)
        c.done()
