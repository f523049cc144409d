"""MNIST from the user's IDX files (LeCun's format, plain or gzipped), with the official train/test split."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from polytrain.data import DataError, Dataset
from polytrain.data.files import existing_file, read_bytes, user_dir
from polytrain.data.prepare import normalised_dataset, register_loader

# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_KINDS = ("images-idx3-ubyte", "labels-idx1-ubyte")
_FILE_NAMES = [f"{prefix}-{kind}" for prefix in ("train", "t10k") for kind in _KINDS]
_EXPECTED = f"the IDX files {', '.join(_FILE_NAMES)} (plain or .gz)"


@register_loader("mnist", path_help="a folder with the MNIST IDX files")
def load_mnist(*, seed: int, test_fraction: float, path: str | os.PathLike) -> Dataset:
    """Loads MNIST from IDX files: 60,000 train and 10,000 test images (1, 28, 28), 10 classes.

    The official split is used, so `seed` and `test_fraction` change nothing. Any digit data set in the same
    files (Fashion-MNIST, KMNIST) loads too.

    Args:
        seed: unused; the split is the official one.
        test_fraction: unused; the split is the official one.
        path: folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
            t10k-labels-idx1-ubyte, each plain or with .gz.
    """
    directory = user_dir("mnist", path)
    x_train, y_train = _read_split(directory, "train")
    x_test, y_test = _read_split(directory, "t10k")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(
            f"MNIST files in {directory} disagree: train images are {x_train.shape[1:]} pixels, "
            f"test images {x_test.shape[1:]}"
        )
    # (N, H, W) -> (N, 1, H, W): one grey channel.
    return normalised_dataset(
        "mnist", x_train[:, None], y_train, x_test[:, None], y_test, num_classes=10, source=str(directory)
    )


def _read_split(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the images (N, H, W) and labels (N,) of one split, checking that they match."""
    images_path, labels_path = (
        existing_file(directory, f"{prefix}-{kind}", what="MNIST", expected=_EXPECTED, gzipped_ok=True)
        for kind in _KINDS
    )
    images = read_idx(images_path, IMAGES_MAGIC, "images")
    labels = read_idx(labels_path, LABELS_MAGIC, "labels")
    if len(labels) != len(images):
        raise DataError(
            f"MNIST file {labels_path} has {len(labels)} labels but {images_path} has {len(images)} images"
        )
    if labels.max(initial=0) > 9:
        raise DataError(f"corrupt IDX file {labels_path}: label {labels.max()} is not a digit 0-9")
    return images, labels


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Reads an IDX file of unsigned bytes, checking its magic number and that its size matches its header.

    Args:
        path: the file, gunzipped on the fly when its name ends in .gz.
        magic: the expected magic number, which also gives the number of dimensions (its last byte).
        what: what the file holds, for messages ("images", "labels").

    Returns:
        uint8 array with the dimensions from the header.
    """
    data = read_bytes(path)
    num_dims = magic & 0xFF
    header_bytes = 4 + 4 * num_dims  # magic and one big-endian uint32 per dimension
    found = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found != magic:
        raise DataError(f"corrupt IDX file {path}: magic 0x{found:08x} is not 0x{magic:08x} ({what})")
    if len(data) < header_bytes:
        raise DataError(
            f"corrupt IDX file {path}: truncated: expected at least {header_bytes} bytes, got {len(data)}"
        )
    dims = struct.unpack(f">{num_dims}I", data[4:header_bytes])
    expected_bytes = header_bytes + math.prod(dims)
    if len(data) != expected_bytes:
        problem = "truncated: expected" if len(data) < expected_bytes else "trailing data: expected"
        raise DataError(f"corrupt IDX file {path}: {problem} {expected_bytes} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims)
