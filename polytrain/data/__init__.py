"""Datasets (real and synthetic), file loaders and the rank-sharding sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.registry import Registry

DATASETS: Registry = Registry("dataset")


class DataError(ValueError):
    """A dataset file is missing or corrupt, or a dataset argument is invalid (one-line message)."""


@dataclass(frozen=True)
class Dataset:
    """A dataset held in memory, already split into train and test.

    Attributes:
        name: registry name.
        x_train: samples (N_train, *in_shape): float32 normalised with statistics of the train split, or
            int64 token ids (language models).
        y_train: targets (N_train, ...): int64 class labels (N_train,) for classification, float32 values
            (N_train, outputs) for regression, int64 next tokens (N_train, T) for language models.
        x_test: samples (N_test, *in_shape), prepared like x_train.
        y_test: targets of the test samples, like y_train.
        num_classes: number of classes; the model's outputs per sample (regression) or per position
            (the vocabulary of a language model).
        synthetic: True when the data is generated noise rather than real samples.
        source: where the data came from (package file, user path, generator).
        task: the registered task (polytrain.tasks: loss and metric) the dataset is for.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    synthetic: bool
    source: str
    task: str = "classification"

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2, **kwargs):
    """Loads the registered dataset `name` with a fixed, seeded train/test split: a Dataset in memory, or a
    polytrain.data.loading.Streamed for data read sample by sample."""
    return DATASETS.get(name)(seed=seed, test_fraction=test_fraction, **kwargs)


# Imported last: each module registers its loaders in DATASETS, which must exist by then.
from polytrain.data import bundled, cifar, imagefolder, loading, mnist_idx, regression, synthetic, text  # noqa: E402, F401
