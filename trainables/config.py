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
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import yaml

from trainables.errors import InputError

DATASETS = ("mnist", "fashion-mnist", "cifar10", "mnist-5k", "idx")
MODELS = ("cnn-mnist", "cnn-cifar10", "resnet18")
PRUNING_CRITERIA = ("random", "magnitude", "snip")
PRUNING_SCOPES = ("global", "layerwise")
GRANULARITIES = ("unstructured", "structured")
DROPPING_CRITERIA = ("random", "magnitude", "public-grad")
ACCOUNTANTS = ("prv", "rdp")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
#: Largest physical batch (examples x augmentation views per forward/backward pass).
MAX_PHYSICAL_BATCH = 65536
MAX_AUGMENTATION_MULTIPLICITY = 64
DEFAULT_VALIDATION_FRACTION = 0.1
# Epsilons the accountants calibrate reliably and quickly: below, RDP cannot reach the
# budget at any noise; above, PRV calibration takes tens of seconds and then overflows.
EPSILON_RANGE = (0.1, 20.0)
#: Deepest nesting of lists and mappings a YAML document may have (specs need about 5).
MAX_YAML_DEPTH = 64
#: Upper bounds of sizes and counts: far above any real use, low enough that a typo (or a
#: hostile value) is refused at once instead of failing deep inside numpy or torch.
MAX_SEED = 2**32 - 1  # numpy's seed range (np.random.seed)
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 2**24
MAX_EXAMPLES = 10**9


class ConfigError(InputError, ValueError):
    """One or more invalid configuration values; ``problems`` lists each one."""

    prefix = ""  # the message is the list of problems (a spec error adds its own header)

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


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


def check_epsilon(c: _Checks, value: Any) -> None:
    """``epsilon`` must be a number within :data:`EPSILON_RANGE`."""
    low, high = EPSILON_RANGE
    c.number("epsilon", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(
            value) and not low <= value <= high:
        c.fail("epsilon", f"must be within the range the accountants support, "
                          f"[{low:g}, {high:g}]", value)


class _Checks:
    """Collects rule violations as ``'<prefix>.<field>: <rule> (got <value>)'``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.problems: list[str] = []

    def fail(self, name: str, rule: str, value: Any) -> None:
        text = repr(value)
        if len(text) > 80:  # e.g. a 1000-digit number: its head and its length
            text = f"{text[:40]}... ({len(text)} characters)"
        self.problems.append(f"{self.prefix}{name}: {rule} (got {text})")

    def number(self, name: str, value: Any, *, low: float | None = None,
               high: float | None = None, low_open: bool = False,
               high_open: bool = False, integer: bool = False) -> None:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(name, "must be an integer" if integer else "must be a number", value)
            return
        if not _finite(value):
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


def _finite(value: int | float) -> bool:
    """Whether ``value`` is finite (any int is: ``math.isfinite`` overflows on huge ones)."""
    return isinstance(value, int) or math.isfinite(value)


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
            elif name in data and data[name] is not None and not isinstance(data[name], sub):
                problems.append(f"{prefix}{name}: must be a mapping of keys to values "
                                f"(got {data.pop(name)!r})")
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
    hints = {"DataConfig": DataConfig, "PublicConfig": PublicConfig,
             "ValidationConfig": ValidationConfig, "ModelConfig": ModelConfig,
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
            c.number("size", self.size, low=1, high=MAX_EXAMPLES, integer=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class ValidationConfig(_Section):
    """Where the validation split (used to select hyperparameters) comes from, other than a
    fraction of the training set: another ``dataset`` (its training split; private data,
    disjoint from the training data), or the ``public`` split (``public: true``), which
    then serves both public-data criteria and selection.
    """

    dataset: DataConfig | None = None
    public: bool = False

    def __post_init__(self) -> None:
        c = _Checks("")
        if not isinstance(self.public, bool):
            c.fail("public", "must be true or false", self.public)
        elif (self.dataset is None) == (not self.public):
            c.fail("dataset", "give exactly one of dataset or public: true", self.dataset)
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
    validation_fraction: float | None = None
    validation: ValidationConfig | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, DATASETS)
        c.number("test_fraction", self.test_fraction, low=0.0, high=1.0, low_open=True,
                 high_open=True)
        if self.validation_fraction is not None:
            c.number("validation_fraction", self.validation_fraction, low=0.0, high=0.5)
            if self.validation is not None and self.validation_fraction:
                c.fail("validation_fraction", "give either validation_fraction or "
                       "validation, not both", self.validation_fraction)
        if (self.validation is not None and self.validation.public
                and self.public is None):
            c.fail("validation.public", "needs dataset.public (the public split)",
                   self.validation.public)
        if self.name == "idx":
            for key in ("train_images", "train_labels"):
                if not getattr(self, key):
                    c.fail(key, "is required for an idx dataset", getattr(self, key))
            has_test = bool(self.test_images) and bool(self.test_labels)
            if not has_test and self.test is None:
                c.fail("test_images", "an idx dataset needs test_images and test_labels, "
                       "or a test dataset", self.test_images)
        c.done()

    @property
    def carved_validation_fraction(self) -> float:
        """The fraction of the training set carved off as the validation split: the given
        ``validation_fraction``, else 0.1 unless ``validation`` names another source."""
        if self.validation_fraction is not None:
            return float(self.validation_fraction)
        return 0.0 if self.validation is not None else DEFAULT_VALIDATION_FRACTION

    @property
    def has_validation(self) -> bool:
        """Whether trials of this dataset get a validation split."""
        return self.validation is not None or self.carved_validation_fraction > 0


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
    validation_noise: float | None = None  # std of the DP validation score's noise (a count)

    def __post_init__(self) -> None:
        c = _Checks("")
        check_epsilon(c, self.epsilon)
        if self.validation_noise is not None:
            c.number("validation_noise", self.validation_noise, low=0.0, low_open=True)
        c.number("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        c.choice("accountant", self.accountant, ACCOUNTANTS)
        if (self.noise_multiplier is None) == (self.epochs is None):
            c.fail("noise_multiplier", "give exactly one of noise_multiplier or epochs",
                   self.noise_multiplier)
        if self.noise_multiplier is not None:
            c.number("noise_multiplier", self.noise_multiplier, low=0.0, low_open=True)
        if self.epochs is not None:
            c.number("epochs", self.epochs, low=0.0, low_open=True, high=MAX_EPOCHS)
        c.done()


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """Optimiser, step size, clipping norm and (expected, logical) batch size.

    ``physical_batch_size`` (None: one pass per step) caps the images one forward/backward
    pass sees: a logical batch is processed in chunks of ``physical_batch_size //
    augmentation_multiplicity`` examples, each with its ``augmentation_multiplicity``
    views, and noised and stepped once. ``augmentation_multiplicity`` K (1 = off) averages
    each example's per-sample gradient over K augmented views before clipping;
    ``ema_decay`` (None = off) keeps an exponential moving average of the parameters
    that evaluation, selection, the audit and release use."""

    section: ClassVar[str] = "optim"
    name: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 256
    max_epochs: float = 10.0
    physical_batch_size: int | None = None
    augmentation_multiplicity: int = 1
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        c = _Checks("")
        c.choice("name", self.name, OPTIMIZERS)
        c.number("augmentation_multiplicity", self.augmentation_multiplicity, low=1,
                 high=MAX_AUGMENTATION_MULTIPLICITY, integer=True)
        if self.physical_batch_size is not None:
            c.number("physical_batch_size", self.physical_batch_size, low=1,
                     high=MAX_PHYSICAL_BATCH, integer=True)
            k = self.augmentation_multiplicity
            if (not c.problems and isinstance(self.physical_batch_size, int)
                    and self.physical_batch_size < k):
                c.fail("physical_batch_size", f"must be >= augmentation_multiplicity = {k} "
                       f"(a pass holds every view of at least one example)",
                       self.physical_batch_size)
        if self.ema_decay is not None:
            c.number("ema_decay", self.ema_decay, low=0.0, high=1.0, low_open=True,
                     high_open=True)
        c.number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        c.number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        c.number("weight_decay", self.weight_decay, low=0.0)
        c.number("clip_norm", self.clip_norm, low=0.0, low_open=True)
        c.number("batch_size", self.batch_size, low=1, high=MAX_BATCH_SIZE, integer=True)
        c.number("max_epochs", self.max_epochs, low=0.0, low_open=True, high=MAX_EPOCHS)
        c.done()


@dataclass(frozen=True, kw_only=True)
class TrialConfig(_Section):
    """Everything one trial needs. ``checkpoint_dir`` enables per-epoch checkpoints.

    ``reproducible_noise`` (research only) seeds the DP noise and batch sampling from
    ``seed`` instead of a secret seed (see :mod:`trainables.randomness`);
    ``deterministic`` asks torch for deterministic algorithms and no TF32;
    ``precision: bf16`` (CUDA only) runs forward and backward under bfloat16 autocast, with
    per-sample gradients, clipping and noise in float32 (:mod:`trainables.precision`)."""

    seed: int = 0
    device: str = "auto"
    reproducible_noise: bool = False
    deterministic: bool = False
    precision: str = "fp32"
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
        c.number("seed", self.seed, low=0, high=MAX_SEED, integer=True)
        c.choice("device", self.device, DEVICES)
        c.choice("precision", self.precision, PRECISIONS)
        if self.precision == "bf16" and self.device == "cpu":
            c.fail("precision", "bf16 needs a CUDA device (device is cpu)", self.precision)
        for flag in ("reproducible_noise", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                c.fail(flag, "must be true or false", getattr(self, flag))
        c.number("eval_batch_size", self.eval_batch_size, low=1, high=MAX_BATCH_SIZE,
                 integer=True)
        if self.dropping.criterion == "public-grad" and self.dropping.rate > 0:
            if self.dataset.public is None:
                c.fail("dropping.criterion", "public-grad needs dataset.public",
                       self.dropping.criterion)
        if self.pruning.criterion == "snip" and self.pruning.rate > 0:
            if self.dataset.public is None:
                c.fail("pruning.criterion", "snip needs dataset.public (it may only look at "
                       "public data)", self.pruning.criterion)
        c.done()
