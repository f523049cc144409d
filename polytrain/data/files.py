"""File checks shared by the loaders of user files: the folder, the expected files, plain or gzipped bytes."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from polytrain.data import DataError


def user_dir(dataset: str, path: str | os.PathLike) -> Path:
    """Returns `path` (with ~ expanded) as a Path, or raises a DataError if it is not a folder."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        state = "is not a folder" if directory.exists() else "does not exist"
        raise DataError(f"dataset {dataset} path {directory} {state}")
    return directory


def existing_file(directory: Path, name: str, *, what: str, expected: str, gzipped_ok: bool = False) -> Path:
    """Returns directory/name, or directory/name.gz when `gzipped_ok`, whichever exists first.

    Args:
        directory: the folder the user named with path=.
        name: file name without .gz.
        what: the kind of file, for the message ("MNIST", "CIFAR-10").
        expected: the files the folder should hold, for the message.
        gzipped_ok: also accept a gzipped copy.

    Raises:
        DataError: neither exists; the message names the file and what was expected.
    """
    candidates = [directory / name, directory / f"{name}.gz"] if gzipped_ok else [directory / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = f"{directory / name}(.gz)" if gzipped_ok else str(directory / name)
    raise DataError(f"missing {what} file {shown}: expected {expected}")


def read_bytes(path: Path) -> bytes:
    """Reads a whole file, decompressing it when its name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"corrupt gzip file {path}: {err}") from None
