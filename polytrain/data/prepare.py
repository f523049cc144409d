"""Steps every loader shares: argument checks, the seeded train/test split and train-only normalisation."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import numpy as np
import torch

from polytrain.data import DATASETS, DataError, Dataset

Loader = Callable[..., Dataset]


def register_loader(name: str, *, path_help: str | None = None) -> Callable[[Loader], Loader]:
    """Registers a loader in DATASETS under `name`, checking the arguments of every call first.

    The loader declares its dataset arguments as keyword-only parameters after `seed` and `test_fraction`;
    the registered wrapper has the registry signature `(*, seed, test_fraction, **kwargs)` and turns argument
    mistakes into one-line DataErrors before the loader runs.

    Args:
        name: registry name.
        path_help: for loaders of user files, what `path=` should point to; makes `path` required.
    """

    def register(load: Loader) -> Loader:
        valid = [key for key in inspect.signature(load).parameters if key not in ("seed", "test_fraction")]

        @functools.wraps(load)
        def checked(*, seed: int, test_fraction: float, **kwargs) -> Dataset:
            check_test_fraction(test_fraction)
            for key in kwargs:
                if key not in valid:
                    raise DataError(
                        f"dataset {name} takes no argument '{key}'; valid: {', '.join(valid) or 'none'}"
                    )
            if path_help is not None and kwargs.get("path") is None:
                raise DataError(f"dataset {name} needs path=DIR ({path_help})")
            return load(seed=seed, test_fraction=test_fraction, **kwargs)

        return DATASETS.register(name)(checked)

    return register


def check_test_fraction(test_fraction: object) -> None:
    """Raises a DataError unless `test_fraction` is a number strictly between 0 and 1."""
    is_number = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
    if not (is_number and 0 < test_fraction < 1):
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def positive_int(dataset: str, key: str, value: object) -> int:
    """Returns `value` as an int > 0; decimal strings pass too, as values may come from a command line."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DataError(f"dataset {dataset} {key}={value!r} is not a positive integer")
    return value


def num_test_samples(num_samples: int, test_fraction: float) -> int:
    """Number of test samples, round(num_samples * test_fraction); both splits must be non-empty."""
    num_test = round(num_samples * test_fraction)
    if not 0 < num_test < num_samples:
        raise DataError(
            f"test_fraction {test_fraction} of {num_samples} samples gives {num_test} test and "
            f"{num_samples - num_test} train samples; both splits need at least one"
        )
    return num_test


def seeded_split(y: np.ndarray, *, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits sample indices into train and test, stratified by class and fixed by `seed`.

    The test split holds round(N * test_fraction) samples, shared among the classes in proportion to their
    sizes (largest remainders get the leftover samples, like scikit-learn's StratifiedShuffleSplit). Both
    index arrays follow one permutation from numpy.random.default_rng(seed), so neither is sorted by class.

    Returns:
        (train_indices, test_indices) into `y`.
    """
    num_test = num_test_samples(len(y), test_fraction)
    permutation = np.random.default_rng(seed).permutation(len(y))
    permuted = y[permutation]
    classes, counts = np.unique(y, return_counts=True)
    is_test = np.zeros(len(y), dtype=bool)
    for label, class_count, class_test in zip(classes, counts, _shares(counts, num_test)):
        # Any fixed ranks within a class pick a uniform random subset of it. Evenly spaced ranks, not the
        # first ones, keep test picks spread over the permutation, so neither split starts with few classes.
        ranks = np.arange(class_count)
        picked = (ranks + 1) * class_test // class_count > ranks * class_test // class_count
        is_test[np.flatnonzero(permuted == label)[picked]] = True
    return permutation[~is_test], permutation[is_test]


def _shares(counts: np.ndarray, total: int) -> np.ndarray:
    """Divides `total` among classes in proportion to `counts`, by largest remainder."""
    exact = counts * total / counts.sum()
    shares = np.floor(exact).astype(np.int64)
    # Stable sort: equal remainders go to the lower class label, so the result depends on nothing but counts.
    by_remainder = np.argsort(-(exact - shares), kind="stable")
    shares[by_remainder[: total - shares.sum()]] += 1
    return shares


def split_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    source: str,
    seed: int,
    test_fraction: float,
) -> Dataset:
    """Builds a normalised Dataset from all samples `x` (N, *in_shape) and labels `y` with seeded_split."""
    train, test = seeded_split(y, seed=seed, test_fraction=test_fraction)
    return normalised_dataset(
        name, x[train], y[train], x[test], y[test], num_classes=num_classes, source=source
    )


def normalised_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    source: str,
) -> Dataset:
    """Builds a Dataset of float32 samples normalised per channel with mean and std of the train split only.

    The channel axis is the first axis of a sample (N, C, ...); a sample with one axis (N, L) is one channel.
    The test split is normalised with the train statistics so that nothing about it leaks into training.
    """
    # np.array copies, so normalising in place below never writes into the caller's arrays.
    train = torch.from_numpy(np.array(x_train, dtype=np.float32, order="C"))
    test = torch.from_numpy(np.array(x_test, dtype=np.float32, order="C"))
    dims = tuple(d for d in range(train.dim()) if d != 1) if train.dim() > 2 else tuple(range(train.dim()))
    std, mean = torch.std_mean(train, dim=dims, correction=0, keepdim=True)
    # A channel constant over the whole train split has std 0: centre it rather than divide by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Dataset(
        name=name,
        x_train=train.sub_(mean).div_(std),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=test.sub_(mean).div_(std),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        synthetic=False,
        source=source,
    )
