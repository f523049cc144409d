"""Loaders of user files (MNIST IDX, CIFAR batches, image folders) on tiny files written by the tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polytrain.data import load_dataset
from polytrain.data.prepare import seeded_split

RNG = np.random.default_rng(0)


# MNIST IDX ----------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one big-endian uint32 per dimension, then the bytes."""
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, gzipped: bool) -> dict[str, np.ndarray]:
    """Writes 6 train and 3 test images of 5x4 pixels (not square, to catch a transpose) with labels."""
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([2, 6, 0], dtype=np.uint8),
    }
    directory.mkdir(exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array, 0x803 if array.ndim == 3 else 0x801)
        if gzipped:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_idx_pixels_and_labels_are_decoded_exactly(tmp_path, normalised, gzipped):
    arrays = write_mnist(tmp_path, gzipped)
    ds = load_dataset("mnist", path=tmp_path)
    assert ds.in_shape == (1, 5, 4) and ds.num_classes == 10 and not ds.synthetic
    expected_train, expected_test = normalised(
        arrays["train-images-idx3-ubyte"][:, None], arrays["t10k-images-idx3-ubyte"][:, None]
    )
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert ds.y_train.tolist() == [3, 1, 4, 1, 5, 9] and ds.y_test.tolist() == [2, 6, 0]
    assert ds.y_train.dtype == torch.int64 and ds.x_train.dtype == torch.float32


def test_mnist_uses_the_official_split_whatever_the_seed(tmp_path):
    write_mnist(tmp_path, gzipped=False)
    first = load_dataset("mnist", path=str(tmp_path), seed=0, test_fraction=0.2)
    other = load_dataset("mnist", path=str(tmp_path), seed=9, test_fraction=0.5)
    assert torch.equal(first.x_test, other.x_test) and torch.equal(first.y_train, other.y_train)


def test_missing_mnist_file_names_it_and_the_expected_files(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    message = data_error(load_dataset, "mnist", path=tmp_path)
    assert message == (
        f"missing MNIST file {tmp_path}/t10k-labels-idx1-ubyte(.gz): expected the IDX files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        "(plain or .gz)"
    )


def test_truncated_idx_file_gives_expected_and_actual_sizes(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])  # header 16 bytes + 6 * 5 * 4 pixels = 136 bytes
    message = data_error(load_dataset, "mnist", path=tmp_path)
    assert message == f"corrupt IDX file {images}: truncated: expected 136 bytes, got 100"


def test_idx_file_shorter_than_its_header_is_truncated(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:6])
    message = data_error(load_dataset, "mnist", path=tmp_path)
    assert message == f"corrupt IDX file {labels}: truncated: expected at least 8 bytes, got 6"


def test_idx_file_with_wrong_magic_is_refused(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8), 0x801)))  # a labels file
    message = data_error(load_dataset, "mnist", path=tmp_path)
    assert message == f"corrupt IDX file {images}: magic 0x00000801 is not 0x00000803 (images)"


def test_label_count_must_match_image_count(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(5, np.uint8), 0x801))
    message = data_error(load_dataset, "mnist", path=tmp_path)
    assert message == f"MNIST file {labels} has 5 labels but {tmp_path}/train-images-idx3-ubyte has 6 images"


def test_labels_must_be_digits(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([1, 12, 0]), 0x801))
    assert data_error(load_dataset, "mnist", path=tmp_path) == (
        f"corrupt IDX file {labels}: label 12 is not a digit 0-9"
    )


def test_corrupt_gzip_is_refused(tmp_path, data_error):
    write_mnist(tmp_path, gzipped=True)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:30])
    assert data_error(load_dataset, "mnist", path=tmp_path).startswith(f"corrupt gzip file {images}: ")


# CIFAR ------------------------------------------------------------------------------------------------


def cifar_batch(num_images: int, label_key: str, num_classes: int) -> dict:
    return {
        "data": RNG.integers(0, 256, (num_images, 3072), dtype=np.uint8),
        label_key: RNG.integers(0, num_classes, num_images).tolist(),
    }


def python2_pickle(batch: dict) -> bytes:
    """Pickles {'data': uint8 array, 'labels': list} as Python 2 and numpy 1 wrote the real CIFAR files.

    Python 3 cannot write this format (its strings become unicode, numpy 2 names numpy._core), so it is
    assembled opcode by opcode: protocol 2, Python 2 str as BINSTRING, globals from numpy.core.
    """

    def string(raw: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(raw)) + raw

    data = batch["data"]
    shape = b"".join(b"J" + struct.pack("<i", n) for n in data.shape) + b"\x86"  # 2 ints, TUPLE2
    array = (
        # _reconstruct(ndarray, (0,), 'b'), then BUILD with (1, shape, dtype, False, raw bytes)
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        b"(K\x01" + shape + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype('|u1') state
        b"\x89" + string(data.tobytes()) + b"tb"
    )
    labels = b"](" + b"".join(b"K" + bytes([label]) for label in batch["labels"]) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + labels + b"u."


def write_cifar10(directory: Path) -> dict[str, dict]:
    """Writes the CIFAR-10 batches in the format of the real files (see python2_pickle)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(2 if name != "test_batch" else 3, "labels", 10) for name in names}
    directory.mkdir(exist_ok=True)
    for name, batch in batches.items():
        (directory / name).write_bytes(python2_pickle(batch))
    return batches


def write_cifar100(directory: Path) -> dict[str, dict]:
    """Writes CIFAR-100 train and test batches as Python 3 would today: str keys, protocol 5."""
    batches = {name: cifar_batch(n, "fine_labels", 100) for name, n in (("train", 4), ("test", 2))}
    directory.mkdir(exist_ok=True)
    for name, batch in batches.items():
        batch["coarse_labels"] = [label // 5 for label in batch["fine_labels"]]
        (directory / name).write_bytes(pickle.dumps(batch, protocol=5))
    return batches


def images(batches: list[dict]) -> np.ndarray:
    return np.concatenate([batch["data"] for batch in batches]).reshape(-1, 3, 32, 32)


def test_cifar10_pixels_and_labels_are_decoded_exactly(tmp_path, normalised):
    batches = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", path=tmp_path, seed=3)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert ds.in_shape == (3, 32, 32) and ds.num_classes == 10
    expected_train, expected_test = normalised(images(train), images([batches["test_batch"]]))
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert ds.y_train.tolist() == [label for batch in train for label in batch["labels"]]
    assert ds.y_test.tolist() == batches["test_batch"]["labels"]


def test_cifar100_uses_fine_labels(tmp_path, normalised):
    batches = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", path=tmp_path)
    assert ds.num_classes == 100 and ds.in_shape == (3, 32, 32)
    expected_train, expected_test = normalised(images([batches["train"]]), images([batches["test"]]))
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert ds.y_train.tolist() == batches["train"]["fine_labels"]
    assert ds.y_test.tolist() == batches["test"]["fine_labels"]


def test_missing_cifar_file_names_it_and_the_expected_files(tmp_path, data_error):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    assert data_error(load_dataset, "cifar10", path=tmp_path) == (
        f"missing CIFAR-10 file {tmp_path}/data_batch_3: expected the CIFAR-10 python batches "
        "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"
    )


@pytest.mark.parametrize("module_name", ["os\nsystem", "builtins\neval", "numpy\nload"])
def test_pickle_with_a_foreign_global_is_refused_unrun(tmp_path, data_error, module_name):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    # Protocol 0 by hand: push the global, call it with one string argument.
    payload = f"c{module_name}\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / "test_batch").write_bytes(payload)
    message = data_error(load_dataset, "cifar10", path=tmp_path)
    dotted = module_name.replace("\n", ".")
    assert message.startswith(f"refused CIFAR file {tmp_path}/test_batch: it references the global {dotted},")
    assert not marker.exists()


PIXELS = np.zeros((2, 3072), np.uint8)


def test_cifar_batch_without_labels_is_refused(tmp_path, data_error):
    write_cifar10(tmp_path)
    batch = tmp_path / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"batch_label": b"x"}))
    assert data_error(load_dataset, "cifar10", path=tmp_path) == (
        f"corrupt CIFAR file {batch}: missing key 'labels' (found: data, batch_label)"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([1, 2], "expected a dict, got list"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "'data' should be a uint8 array"),
        ({b"data": PIXELS, b"labels": [0, 10]}, "'labels' should be 2 integers in 0..9"),
        ({b"data": PIXELS, b"labels": [0]}, "'labels' should be 2 integers in 0..9"),
        ({b"data": PIXELS, b"labels": ["a", "b"]}, "'labels' should be 2 integers in 0..9"),
    ],
)
def test_cifar_batch_with_wrong_contents_is_refused(tmp_path, data_error, content, problem):
    write_cifar10(tmp_path)
    batch = tmp_path / "test_batch"
    batch.write_bytes(pickle.dumps(content))
    message = data_error(load_dataset, "cifar10", path=tmp_path)
    assert message.startswith(f"corrupt CIFAR file {batch}: {problem}")


def test_truncated_cifar_pickle_is_corrupt(tmp_path, data_error):
    write_cifar100(tmp_path)
    batch = tmp_path / "train"
    batch.write_bytes(batch.read_bytes()[:200])
    assert data_error(load_dataset, "cifar100", path=tmp_path).startswith(f"corrupt CIFAR file {batch}: ")


# Image folders -----------------------------------------------------------------------------------------


def write_image_folder(directory: Path) -> tuple[list[np.ndarray], list[int]]:
    """Writes 4x4 RGB PNG and BMP images (lossless) of three classes, a grey one, and files to skip.

    Returns:
        the images (3, 4, 4) and labels in sorted class/file order, which is the loader's order.
    """
    counts = {"cat": 3, "dog": 4, "emu": 3}
    images, labels = [], []
    for label, name in enumerate(sorted(counts)):
        (directory / name / "more").mkdir(parents=True)
        for i in range(counts[name]):
            pixels = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            suffix = ".BMP" if i == 1 else ".png"
            # Sorted order: img_0.png, img_1.BMP, more/img_2.png, ...
            folder = directory / name / ("more" if i >= 2 else "")
            Image.fromarray(pixels).save(folder / f"img_{i}{suffix}", format="BMP" if i == 1 else "PNG")
            images.append(pixels.transpose(2, 0, 1))
            labels.append(label)
    grey = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(grey).save(directory / "emu" / "z_grey.png")
    images.append(np.stack([grey] * 3))
    labels.append(2)
    (directory / "emu" / "notes.txt").write_text("not an image")
    (directory / ".hidden").mkdir()
    Image.fromarray(grey).save(directory / ".hidden" / "x.png")
    (directory / "dog" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(grey).save(directory / "dog" / ".ipynb_checkpoints" / "x.png")
    return images, labels


def test_image_folder_pixels_and_labels_are_decoded_exactly(tmp_path, normalised):
    images, labels = write_image_folder(tmp_path)
    ds = load_dataset("imagefolder", path=tmp_path, size=4, seed=1, test_fraction=0.25)
    assert ds.num_classes == 3 and ds.in_shape == (3, 4, 4)
    x, y = np.stack(images), np.array(labels)
    train, test = seeded_split(y, seed=1, test_fraction=0.25)
    assert (len(ds.x_train), len(ds.x_test)) == (8, 3)
    expected_train, expected_test = normalised(x[train], x[test])
    np.testing.assert_allclose(ds.x_train.numpy(), expected_train, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-5)
    assert ds.y_train.tolist() == y[train].tolist() and ds.y_test.tolist() == y[test].tolist()


def test_image_folder_resizes_to_size(tmp_path):
    write_image_folder(tmp_path)
    Image.fromarray(RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "cat" / "big.png")
    ds = load_dataset("imagefolder", path=tmp_path, size="6")
    assert ds.in_shape == (3, 6, 6) and len(ds.x_train) + len(ds.x_test) == 12


def test_empty_image_folder_is_refused(tmp_path, data_error):
    (tmp_path / ".git").mkdir()
    message = data_error(load_dataset, "imagefolder", path=tmp_path)
    assert message.startswith(f"empty image folder {tmp_path}: expected one sub-folder per class")


def test_class_folder_without_images_is_refused(tmp_path, data_error):
    write_image_folder(tmp_path)
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "readme.txt").write_text("no images")
    message = data_error(load_dataset, "imagefolder", path=tmp_path)
    assert message.startswith(f"empty class folder {tmp_path}/fox: expected images (.bmp, .gif, .jpeg, .jpg")


def test_corrupt_image_is_refused(tmp_path, data_error):
    write_image_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    message = data_error(load_dataset, "imagefolder", path=tmp_path)
    assert message.startswith(f"corrupt image file {tmp_path}/cat/broken.png: ")


def test_too_few_images_for_a_split_are_refused(tmp_path, data_error):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "b.png")
    message = data_error(load_dataset, "imagefolder", path=tmp_path, test_fraction=0.2)
    assert message == (
        "test_fraction 0.2 of 2 samples gives 0 test and 2 train samples; both splits need at least one"
    )
