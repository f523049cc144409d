"""CIFAR-10 and CIFAR-100 from the user's python-version batches, unpickled safely; the official split."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from polytrain.data import DataError, Dataset
from polytrain.data.files import existing_file, user_dir
from polytrain.data.prepare import normalised_dataset, register_loader

_PIXELS_PER_IMAGE = 3 * 32 * 32  # a row of 'data': 1024 red, then 1024 green, then 1024 blue bytes


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled uint8 array needs, keyed by the (module, name) a pickle may spell them as.

    numpy 1 pickles (the CIFAR files themselves) say numpy.core, numpy 2 pickles numpy._core; protocol 5
    rebuilds arrays with _frombuffer instead of _reconstruct. The functions are taken from numpy's own
    pickling, so neither the private modules nor numpy 2's deprecated numpy.core alias are imported.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _RefusedGlobal(Exception):
    """A pickle asked for a global outside _ALLOWED_GLOBALS; the message is its dotted name."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays: every other global is refused.

    Unpickling runs whatever callable a pickle names, so a downloaded file must not name any but these.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


@register_loader("cifar10", path_help="the cifar-10-batches-py folder")
def load_cifar10(*, seed: int, test_fraction: float, path: str | os.PathLike) -> Dataset:
    """Loads CIFAR-10: 50,000 train and 10,000 test images (3, 32, 32), 10 classes.

    The official split is used, so `seed` and `test_fraction` change nothing.

    Args:
        seed: unused; the split is the official one.
        test_fraction: unused; the split is the official one.
        path: the cifar-10-batches-py folder, holding data_batch_1 ... data_batch_5 and test_batch.
    """
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    return _load_cifar("cifar10", path, train_files, "test_batch", label_key="labels", num_classes=10)


@register_loader("cifar100", path_help="the cifar-100-python folder")
def load_cifar100(*, seed: int, test_fraction: float, path: str | os.PathLike) -> Dataset:
    """Loads CIFAR-100 with its 100 fine labels: 50,000 train and 10,000 test images (3, 32, 32).

    The official split is used, so `seed` and `test_fraction` change nothing.

    Args:
        seed: unused; the split is the official one.
        test_fraction: unused; the split is the official one.
        path: the cifar-100-python folder, holding train and test.
    """
    return _load_cifar("cifar100", path, ["train"], "test", label_key="fine_labels", num_classes=100)


def _load_cifar(
    name: str,
    path: str | os.PathLike,
    train_files: list[str],
    test_file: str,
    *,
    label_key: str,
    num_classes: int,
) -> Dataset:
    """Reads and concatenates the train batches and the test batch of a CIFAR folder."""
    directory = user_dir(name, path)
    what = f"CIFAR-{num_classes}"
    files = [*train_files, test_file]
    expected = f"the {what} python batches {', '.join(files)}"
    paths = [existing_file(directory, file, what=what, expected=expected) for file in files]
    batches = [_read_batch(file, label_key, num_classes) for file in paths]
    x_train = np.concatenate([x for x, _ in batches[:-1]])
    y_train = np.concatenate([y for _, y in batches[:-1]])
    x_test, y_test = batches[-1]
    return normalised_dataset(
        name, x_train, y_train, x_test, y_test, num_classes=num_classes, source=str(directory)
    )


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR batch: images (N, 3, 32, 32) uint8 and labels (N,) int64, each checked."""
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"corrupt CIFAR file {path}: expected a dict, got {type(batch).__name__}")
    # encoding="bytes" (as the CIFAR page says) turns the files' Python 2 str keys into bytes.
    batch = {k.decode("ascii", "replace") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            found = ", ".join(map(str, batch)) or "none"
            raise DataError(f"corrupt CIFAR file {path}: missing key '{key}' (found: {found})")
    data = batch["data"]
    is_pixels = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (is_pixels and data.shape[1] == _PIXELS_PER_IMAGE):
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"corrupt CIFAR file {path}: 'data' should be a uint8 array (N, 3072), got {found}")
    labels = np.asarray(batch[label_key])
    in_range = labels.dtype.kind in "iu" and np.all((labels >= 0) & (labels < num_classes))
    if not (labels.shape == (len(data),) and in_range):
        raise DataError(
            f"corrupt CIFAR file {path}: '{label_key}' should be {len(data)} integers in 0..{num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _unpickle(path: Path) -> object:
    """Unpickles a CIFAR batch with _CifarUnpickler, turning any failure into a one-line DataError."""
    data = path.read_bytes()
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise DataError(
            f"refused CIFAR file {path}: it references the global {refused}, but a CIFAR batch holds only "
            "dicts, lists, bytes, ints and numpy arrays"
        ) from None
    # A corrupt pickle can fail in almost any way (UnpicklingError, EOFError, ValueError, TypeError, ...).
    except Exception as err:
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
