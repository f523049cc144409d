"""How a run reads its samples: bundled tensors in memory, or any map-style torch Dataset through a DataLoader.

`RunData` is what the trainer sees of a run's data, whichever way it is held:

- `TensorData`: a `Dataset` held in memory (the bundled datasets); a step's samples are one indexing of the
  train tensors, the fastest path there is for data that fits in memory.
- `LoaderData`: a pair of map-style `torch.utils.data.Dataset`s (the user's own, or `Streamed` loaders such
  as `arrays`, which memory-maps .npy files) read through `torch.utils.data.DataLoader` with worker
  processes, its batches chosen by the same ShardedBatchSampler (as the loader's batch_sampler). Datasets
  larger than memory stream from disk; the same seed gives the same batches, hence the same weights, as
  holding them in memory.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from polytrain.data import DataError, Dataset
from polytrain.data.files import existing_file, user_dir
from polytrain.data.prepare import num_test_samples, register_loader
from polytrain.data.sampler import ShardedBatchSampler

EVAL_BATCH = 1024
ARRAY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")


@dataclass(frozen=True)
class Streamed:
    """What a registered loader returns for data read sample by sample rather than held in memory.

    Attributes: as Dataset's, with `train` and `test` map-style torch datasets in place of the tensors.
    """

    name: str
    train: TorchDataset
    test: TorchDataset
    num_classes: int | None
    source: str
    task: str = "classification"
    synthetic: bool = False


class RunData:
    """A run's train and test samples (see the module docstring); subclasses say how they are read.

    Attributes:
        name, source, synthetic, task: as Dataset's.
        num_classes: the model's outputs (None for a user's dataset that does not say; then the user's own
            model factory must know).
        in_shape: one sample's shape.
        num_train, num_test: split sizes.
    """

    name: str
    source: str
    synthetic: bool
    task: str
    num_classes: int | None
    in_shape: tuple[int, ...]
    num_train: int
    num_test: int

    def train_batches(self, sampler: ShardedBatchSampler, epoch: int,
                      start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, samples, targets) of this rank's shard of each step of `epoch` from `start_step`."""
        raise NotImplementedError

    def test_batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(samples, targets) of the test samples [start, stop), in batches of EVAL_BATCH."""
        raise NotImplementedError

    def describe(self) -> dict:
        """result.json's `dataset`."""
        return {"name": self.name, "synthetic": self.synthetic, "source": self.source, "task": self.task,
                "num_train": self.num_train, "num_test": self.num_test, "in_shape": list(self.in_shape),
                "num_classes": self.num_classes, "read": self.read}

    read = "memory"


class TensorData(RunData):
    """A Dataset held in memory: each step indexes the train tensors directly."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.name, self.source, self.synthetic, self.task = data.name, data.source, data.synthetic, data.task
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.num_train, self.num_test = len(data.y_train), len(data.y_test)

    def train_batches(self, sampler, epoch, start_step):
        for indices in sampler.epoch(epoch, start_step=start_step):
            yield indices, self.data.x_train[indices], self.data.y_train[indices]

    def test_batches(self, start, stop):
        for first in range(start, stop, EVAL_BATCH):
            last = min(stop, first + EVAL_BATCH)
            yield self.data.x_test[first:last], self.data.y_test[first:last]


def _one_thread(worker_id: int) -> None:
    """DataLoader workers decode samples; torch threads of their own would fight the trainer's for cores."""
    torch.set_num_threads(1)


class LoaderData(RunData):
    """Map-style train and test datasets read through DataLoaders with `workers` worker processes each.

    The train loader's batch_sampler is the run's ShardedBatchSampler; the loader keeps its workers
    between epochs (persistent_workers), so an epoch starts without forking them again.
    """

    read = "dataloader"

    def __init__(self, name: str, train: TorchDataset, test: TorchDataset, *, num_classes: int | None,
                 source: str, task: str, synthetic: bool = False, workers: int = 1) -> None:
        for split, dataset in (("train", train), ("test", test)):
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise DataError(f"the {split} data is a {type(dataset).__name__}; expected a map-style "
                                f"torch.utils.data.Dataset (with __getitem__ and __len__)")
            if len(dataset) == 0:
                raise DataError(f"the {split} data of {name} is empty")
        self.train, self.test, self.workers = train, test, workers
        self.name, self.source, self.synthetic, self.task = name, source, synthetic, task
        self.num_classes = num_classes
        first = train[0]
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            raise DataError(f"{name}[0] is a {type(first).__name__}; expected a (sample, target) pair")
        self.in_shape = tuple(torch.as_tensor(first[0]).shape)
        self.num_train, self.num_test = len(train), len(test)
        self._loaders: dict = {}  # built once: train loaders by global batch, test loaders by share

    def _options(self) -> dict[str, Any]:
        if self.workers == 0:
            return {}
        # Ranks started by `spawn` would spawn their readers too (seconds each: torch imported again); forked
        # readers start at once and only read samples.
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        return {"num_workers": self.workers, "persistent_workers": True, "worker_init_fn": _one_thread,
                "multiprocessing_context": context}

    def train_batches(self, sampler, epoch, start_step):
        # One loader per batch size (a schedule may change it between epochs), built once.
        loader = self._loaders.get(sampler.global_batch_size)
        if loader is None:
            loader = DataLoader(self.train, batch_sampler=sampler, **self._options())
            self._loaders[sampler.global_batch_size] = loader
        loader.batch_sampler.set_epoch(epoch, start_step)
        steps = sampler.epoch(epoch, start_step=start_step)
        for indices, (x, y) in zip(steps, loader):
            yield indices, x, y

    def test_batches(self, start, stop):
        if start >= stop:
            return
        loader = self._loaders.get((start, stop))  # a replica evaluates the same share every epoch
        if loader is None:
            loader = DataLoader(Subset(self.test, range(start, stop)), batch_size=EVAL_BATCH, **self._options())
            self._loaders[(start, stop)] = loader
        yield from loader


def _dataset_classes(dataset: TorchDataset) -> int | None:
    """The classes a user's dataset declares (`num_classes`, or torchvision's `classes` list), if any."""
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return None


def run_data(data: Any, *, name: str | None = None, seed: int = 0, test_fraction: float = 0.2,
             task: str = "classification", workers: int = 1) -> RunData:
    """The RunData of what a run was given: a Dataset, a Streamed, a torch Dataset (split into train and
    test by a permutation from `seed`, `test_fraction` held out) or a (train, test) pair of them."""
    if isinstance(data, Dataset):
        return TensorData(data)
    if isinstance(data, Streamed):
        return LoaderData(data.name, data.train, data.test, num_classes=data.num_classes, source=data.source,
                          task=data.task, synthetic=data.synthetic, workers=workers)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DataError(f"data is a sequence of {len(data)}; expected a dataset or a (train, test) pair")
        train, test = data
        whole = train
    else:
        permutation = np.random.default_rng(seed).permutation(len(data))
        num_test = num_test_samples(len(data), test_fraction)
        train, test = Subset(data, permutation[num_test:].tolist()), Subset(data, permutation[:num_test].tolist())
        whole = data
    label = name or type(whole).__name__
    return LoaderData(label, train, test, num_classes=_dataset_classes(whole), source=f"user dataset {label}",
                      task=task, workers=workers)


class NpyArrays(TorchDataset):
    """Samples and targets of two .npy files, memory-mapped: a sample is read from disk when it is asked for."""

    def __init__(self, x_path: Path, y_path: Path) -> None:
        self.x_path, self.y_path = x_path, y_path
        self.x, self.y = _load_npy(x_path), _load_npy(y_path)
        if len(self.x) != len(self.y):
            raise DataError(f"{x_path} holds {len(self.x)} samples but {y_path} {len(self.y)} targets; "
                            f"expected one target per sample")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.x[index])), torch.from_numpy(np.array(self.y[index]))

    def __getstate__(self) -> dict:  # memory maps do not pickle; spawned readers map the files again
        return {"x_path": self.x_path, "y_path": self.y_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["x_path"], state["y_path"])


def _load_npy(path: Path) -> np.ndarray:
    """Memory-maps one .npy file of numbers with at least one axis, or raises a DataError naming the file."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":  # the .npy magic; np.load would take anything else for a pickle
            raise DataError(f"corrupt .npy file {path}: no .npy header; expected an array saved by numpy.save")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # truncated, bad header, Python objects
        raise DataError(f"corrupt .npy file {path}: {str(err).strip().splitlines()[0]}; expected an array of "
                        f"numbers saved by numpy.save") from None
    if array.ndim == 0:
        raise DataError(f".npy file {path} holds a single value; expected an array with one row per sample")
    return array


def _check_arrays(train: NpyArrays, test: NpyArrays, task: str, num_classes: int) -> None:
    """Train and test agree in their shapes; classification targets are labels 0..num_classes-1."""
    for kind in ("x", "y"):
        train_shape, test_shape = getattr(train, kind).shape[1:], getattr(test, kind).shape[1:]
        if train_shape != test_shape:
            raise DataError(f"{getattr(test, f'{kind}_path')} rows are {test_shape} but those of "
                            f"{getattr(train, f'{kind}_path')} {train_shape}; expected the same shape")
    if task != "classification":
        return
    for split in (train, test):
        labels = split.y
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{split.y_path} holds {labels.dtype} targets of shape {labels.shape[1:]} per sample; "
                            f"classification expects one integer label per sample")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise DataError(f"{split.y_path} holds labels {int(labels.min())}..{int(labels.max())}; expected "
                            f"0..{num_classes - 1} for {num_classes} classes")


@register_loader("arrays", path_help="a folder with x_train.npy, y_train.npy, x_test.npy and y_test.npy")
def load_arrays(*, seed: int, test_fraction: float, path: str | os.PathLike, task: str = "classification",
                num_classes: int | None = None) -> Streamed:
    """Streams samples from .npy files, memory-mapped, through DataLoader workers (larger than memory is fine).

    The folder holds x_train.npy, y_train.npy, x_test.npy and y_test.npy, already prepared (normalised)
    as the model wants them: they are read as they are. The split is the files'; `seed` and
    `test_fraction` do not apply.

    Args:
        path: the folder.
        task: the files' task (classification, regression, language_model).
        num_classes: the model's outputs (default for classification: the largest train label + 1).
    """
    directory = user_dir("arrays", path)
    expected = ", ".join(ARRAY_FILES)
    files = [existing_file(directory, name, what="arrays", expected=expected) for name in ARRAY_FILES]
    train, test = NpyArrays(files[0], files[1]), NpyArrays(files[2], files[3])
    if num_classes is None:  # classes from the labels; a regression's outputs from the targets' shape
        num_classes = int(np.max(train.y)) + 1 if task == "classification" else int(np.prod(train.y.shape[1:]))
    _check_arrays(train, test, task, num_classes)
    return Streamed("arrays", train, test, num_classes, source=str(directory), task=task)
