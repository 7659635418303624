"""Configuration of one trial: frozen pydantic models validated on creation.

The study service builds one :class:`TrialConfig` per trial from the spec and the sampled
hyperparameters, as the plain dict Ray Tune carries; :meth:`TrialConfig.from_dict` turns it
back into this tree, or raises a :class:`ConfigError` listing every problem
(:mod:`trainables.validation` words them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, ClassVar, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, Field

from trainables.validation import ConfigError as ConfigError
from trainables.validation import Flag, Integer, Number, Problem, Section, Text, fail
from trainables.yaml_input import load_yaml as load_yaml
from trainables.yaml_input import read_yaml_file as read_yaml_file

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
#: Upper bounds of sizes and counts: far above any real use, low enough that a typo (or a
#: hostile value) is refused at once instead of failing deep inside numpy or torch.
MAX_SEED = 2**32 - 1  # numpy's seed range (np.random.seed)
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 2**24
MAX_EXAMPLES = 10**9


def _epsilon_range(value: float) -> float:
    low, high = EPSILON_RANGE
    if not low <= value <= high:
        raise fail(f"must be within the range the accountants support, [{low:g}, {high:g}]")
    return value


#: A privacy budget epsilon: a number within :data:`EPSILON_RANGE`.
Epsilon = Annotated[Number, AfterValidator(_epsilon_range)]
Positive = Annotated[Number, Gt(0.0)]
Fraction = Annotated[Number, Gt(0.0), Lt(1.0)]  # open interval (0, 1)
Rate = Annotated[Number, Ge(0.0), Lt(1.0)]
Epochs = Annotated[Number, Gt(0.0), Le(MAX_EPOCHS)]
BatchSize = Annotated[Integer, Ge(1), Le(MAX_BATCH_SIZE)]
PhysicalBatch = Annotated[Integer, Ge(1), Le(MAX_PHYSICAL_BATCH)]
Views = Annotated[Integer, Ge(1), Le(MAX_AUGMENTATION_MULTIPLICITY)]


class PublicConfig(Section):
    """Public data for selection criteria that may look at public data only.

    Either ``size`` examples held out of the training set (removed from the private data,
    so they are disjoint from it), or the training split of another ``dataset``.
    """

    size: Annotated[Integer, Ge(1), Le(MAX_EXAMPLES)] | None = None
    dataset: DataConfig | None = None

    def problems(self) -> Iterator[Problem]:
        """Exactly one of ``size`` or ``dataset``."""
        if (self.size is None) == (self.dataset is None):
            yield "size", "give exactly one of size or dataset", self.size


class ValidationConfig(Section):
    """Where the validation split (used to select hyperparameters) comes from, other than a
    fraction of the training set: another ``dataset`` (its training split; private data,
    disjoint from the training data), or the ``public`` split (``public: true``), which
    then serves both public-data criteria and selection.
    """

    dataset: DataConfig | None = None
    public: Flag = False

    def problems(self) -> Iterator[Problem]:
        """Exactly one of ``dataset`` or ``public: true``."""
        if (self.dataset is None) == (not self.public):
            yield "dataset", "give exactly one of dataset or public: true", self.dataset


class DataConfig(Section):
    """Which dataset to train on; see :mod:`trainables.data` for the registry."""

    section: ClassVar[str] = "dataset"
    name: Literal[DATASETS] = "mnist-5k"
    root: Text = "~/.cache/dpstudy/data"
    download: Flag = True
    train_images: Text | None = None
    train_labels: Text | None = None
    test_images: Text | None = None
    test_labels: Text | None = None
    test: DataConfig | None = None
    test_fraction: Fraction = 0.2
    public: PublicConfig | None = None
    validation_fraction: Annotated[Number, Ge(0.0), Le(0.5)] | None = None
    validation: ValidationConfig | None = None

    def problems(self) -> Iterator[Problem]:
        """One validation source; a public validation split needs ``public``; an idx
        dataset needs its files."""
        if self.validation is not None and self.validation_fraction:
            yield ("validation_fraction", "give either validation_fraction or validation, "
                   "not both", self.validation_fraction)
        if self.validation is not None and self.validation.public and self.public is None:
            yield "validation.public", "needs dataset.public (the public split)", True
        if self.name == "idx":
            for key in ("train_images", "train_labels"):
                if not getattr(self, key):
                    yield key, "is required for an idx dataset", getattr(self, key)
            if not (self.test_images and self.test_labels) and self.test is None:
                yield ("test_images", "an idx dataset needs test_images and test_labels, or "
                       "a test dataset", self.test_images)

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


class ModelConfig(Section):
    """Architecture, width multiplier (CNNs) and optional local weights to start from."""

    name: Literal[MODELS] = "cnn-mnist"
    width: Annotated[Number, Gt(0.0), Le(64)] = 1.0
    weights: Text | None = None


class PruningConfig(Section):
    """Pre-pruning: the fraction of weights removed before DP training, and how."""

    rate: Rate = 0.0
    criterion: Literal[PRUNING_CRITERIA] = "random"
    scope: Literal[PRUNING_SCOPES] = "global"
    granularity: Literal[GRANULARITIES] = "unstructured"


class DroppingConfig(Section):
    """Gradient dropping: the fraction of trainable coordinates not updated per step."""

    rate: Rate = 0.0
    criterion: Literal[DROPPING_CRITERIA] = "random"


class PrivacyConfig(Section):
    """The fixed budget, and either a noise multiplier or a number of epochs.

    With ``noise_multiplier`` the accountant decides how many steps fit in the budget
    (capped by ``OptimConfig.max_epochs``); with ``epochs`` it decides the noise.
    """

    epsilon: Epsilon = 3.0
    delta: Fraction = 1e-5
    accountant: Literal[ACCOUNTANTS] = "prv"
    noise_multiplier: Positive | None = None
    epochs: Epochs | None = None
    validation_noise: Positive | None = None  # std of the DP validation score's noise

    def problems(self) -> Iterator[Problem]:
        """Exactly one of ``noise_multiplier`` or ``epochs``."""
        if (self.noise_multiplier is None) == (self.epochs is None):
            yield ("noise_multiplier", "give exactly one of noise_multiplier or epochs",
                   self.noise_multiplier)


class OptimConfig(Section):
    """Optimiser, step size, clipping norm and (expected, logical) batch size.

    ``physical_batch_size`` (None: one pass per step) caps the images one forward/backward
    pass sees: a logical batch is processed in chunks of ``physical_batch_size //
    augmentation_multiplicity`` examples, each with its ``augmentation_multiplicity``
    views, and noised and stepped once. ``augmentation_multiplicity`` K (1 = off) averages
    each example's per-sample gradient over K augmented views before clipping;
    ``ema_decay`` (None = off) keeps an exponential moving average of the parameters
    that evaluation, selection, the audit and release use."""

    name: Literal[OPTIMIZERS] = "sgd"
    learning_rate: Positive = 1.0
    momentum: Rate = 0.0
    weight_decay: Annotated[Number, Ge(0.0)] = 0.0
    clip_norm: Positive = 1.0
    batch_size: BatchSize = 256
    max_epochs: Epochs = 10.0
    physical_batch_size: PhysicalBatch | None = None
    augmentation_multiplicity: Views = 1
    ema_decay: Fraction | None = None

    def problems(self) -> Iterator[Problem]:
        """A physical batch holds every view of at least one example."""
        k = self.augmentation_multiplicity
        if self.physical_batch_size is not None and self.physical_batch_size < k:
            yield ("physical_batch_size", f"must be >= augmentation_multiplicity = {k} (a "
                   f"pass holds every view of at least one example)", self.physical_batch_size)


class TrialConfig(Section):
    """Everything one trial needs. ``checkpoint_dir`` enables per-epoch checkpoints.

    ``reproducible_noise`` (research only) seeds the DP noise and batch sampling from
    ``seed`` instead of a secret seed (see :mod:`trainables.randomness`);
    ``deterministic`` asks torch for deterministic algorithms and no TF32;
    ``precision: bf16`` (CUDA only) runs forward and backward under bfloat16 autocast, with
    per-sample gradients, clipping and noise in float32 (:mod:`trainables.precision`)."""

    seed: Annotated[Integer, Ge(0), Le(MAX_SEED)] = 0
    device: Literal[DEVICES] = "auto"
    reproducible_noise: Flag = False
    deterministic: Flag = False
    precision: Literal[PRECISIONS] = "fp32"
    eval_batch_size: BatchSize = 1024
    checkpoint_dir: Text | None = None
    dataset: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    dropping: DroppingConfig = Field(default_factory=DroppingConfig)
    privacy: PrivacyConfig = Field(default_factory=lambda: PrivacyConfig(noise_multiplier=1.0))
    optim: OptimConfig = Field(default_factory=OptimConfig)

    def problems(self) -> Iterator[Problem]:
        """bf16 needs CUDA; the public-data criteria need public data."""
        if self.precision == "bf16" and self.device == "cpu":
            yield "precision", "bf16 needs a CUDA device (device is cpu)", self.precision
        for section, criterion, why in (("dropping", "public-grad", ""),
                                        ("pruning", "snip", " (it may only look at public data)")):
            chosen = getattr(self, section)
            if chosen.criterion == criterion and chosen.rate > 0 and self.dataset.public is None:
                yield f"{section}.criterion", f"{criterion} needs dataset.public{why}", criterion
