"""Images from the user's class-per-folder tree (path/CLASS/*.png) as square RGB arrays; a seeded split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from polytrain.data import DataError, Dataset
from polytrain.data.files import user_dir
from polytrain.data.prepare import positive_int, register_loader, split_dataset

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


@register_loader("imagefolder", path_help="a folder with one sub-folder of images per class")
def load_imagefolder(*, seed: int, test_fraction: float, path: str | os.PathLike, size: int = 32) -> Dataset:
    """Loads every image under path/CLASS/ as RGB (3, size, size); the classes are the sorted folder names.

    Sub-folders of a class folder are searched too; names starting with a dot are skipped. All images are
    decoded into memory at once, so this suits folders of up to some hundred thousand small images.

    Args:
        seed: seed of the stratified train/test split.
        test_fraction: fraction of the images held out for test.
        path: the folder holding one sub-folder per class.
        size: side in pixels that every image is resized to (bilinear).
    """
    size = positive_int("imagefolder", "size", size)
    directory = user_dir("imagefolder", path)
    classes = _class_names(directory)
    files = [_image_files(directory / name) for name in classes]
    labels = np.concatenate([np.full(len(class_files), label) for label, class_files in enumerate(files)])
    images = np.stack([_read_image(file, size) for class_files in files for file in class_files])
    return split_dataset(
        "imagefolder",
        images,
        labels,
        num_classes=len(classes),
        source=str(directory),
        seed=seed,
        test_fraction=test_fraction,
    )


def _class_names(directory: Path) -> list[str]:
    """The sorted names of the class folders: the sub-folders of `directory` that are not hidden."""
    folders = (entry for entry in directory.iterdir() if entry.is_dir())
    classes = sorted(folder.name for folder in folders if not _hidden(folder.name))
    if not classes:
        raise DataError(
            f"empty image folder {directory}: expected one sub-folder per class holding images "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return classes


def _hidden(relative: str | Path) -> bool:
    """Whether a path inside the image folder is hidden (.git, .ipynb_checkpoints, ._x.png), so not data."""
    return any(part.startswith(".") for part in Path(relative).parts)


def _image_files(class_dir: Path) -> list[Path]:
    """The image files under one class folder, in sorted order so that the split is reproducible."""
    candidates = (file for file in class_dir.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)
    files = sorted(file for file in candidates if file.is_file() and not _hidden(file.relative_to(class_dir)))
    if not files:
        raise DataError(f"empty class folder {class_dir}: expected images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path, size: int) -> np.ndarray:
    """Decodes one image as RGB resized to (3, size, size) uint8."""
    # Imported here: Pillow is needed by this loader only (it comes with matplotlib, not with polytrain).
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"corrupt image file {path}: {err}") from None
    return np.asarray(rgb).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
