"""The offline language-modelling (pydoc) and regression (diabetes) datasets, and a short run of each task."""

from __future__ import annotations

import math

import pytest
import torch

import polytrain
from polytrain.config import Experiment
from polytrain.data import DataError, load_dataset
from polytrain.data.text import pydoc_bytes
from polytrain.train.defaults import DATASET_TASKS


def test_pydoc_is_next_byte_prediction_over_contiguous_chunks():
    data = load_dataset("pydoc", context=32, max_bytes=33 * 100)
    assert (data.task, data.num_classes, data.in_shape) == ("language_model", 256, (32,))
    assert len(data.x_train) == 80 and len(data.x_test) == 20  # 100 chunks, the last fifth for test
    assert data.x_train.dtype == torch.int64 and torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    text = torch.tensor(list(pydoc_bytes()[:33 * 100])).view(100, 33)
    assert torch.equal(data.x_train, text[:80, :-1]) and torch.equal(data.y_test, text[80:, 1:])
    assert torch.equal(load_dataset("pydoc", seed=5, context=32, max_bytes=3300).x_test, data.x_test)
    with pytest.raises(DataError, match="expected at least 2"):
        load_dataset("pydoc", context=64, max_bytes=100)


def test_diabetes_is_standardised_with_the_train_split():
    data = load_dataset("diabetes", seed=0)
    assert (data.task, data.num_classes, data.in_shape) == ("regression", 1, (10,))
    assert len(data.y_train) + len(data.y_test) == 442 and data.y_train.shape == (354, 1)
    for split in (data.x_train, data.y_train):
        assert split.mean(0).abs().max() < 1e-5 and (split.std(0, correction=0) - 1).abs().max() < 1e-4
    assert torch.equal(load_dataset("diabetes", seed=0).x_test, data.x_test)
    assert not torch.equal(load_dataset("diabetes", seed=1).x_test, data.x_test)
    assert "mean 151.4, std 77.0" in data.source


@pytest.mark.parametrize("name", sorted(DATASET_TASKS))
def test_the_resolved_task_is_the_datasets_own(name):
    args = {"max_bytes": 3300} if name == "pydoc" else {}
    assert load_dataset(name, **args).task == DATASET_TASKS[name]


@pytest.mark.parametrize("dataset, settings, metric, bound", [
    ("pydoc", dict(model_args={"size": "tiny"}, dataset_args={"context": 32, "max_bytes": 33 * 300}, epochs=4,
                   batch_size=32, lr=1e-2), "perplexity", 40.0),
    ("diabetes", dict(epochs=30), "rmse", 0.85),
])
def test_each_task_trains_through_the_trainer(dataset, settings, metric, bound):
    result = polytrain.train(Experiment(dataset=dataset, **settings))
    assert result.metric == metric and result.final_test_accuracy is None
    assert result.task["name"] == DATASET_TASKS[dataset]
    first, last = result.epochs[0][f"test_{metric}"], result.final_test_metric
    assert math.isfinite(last) and last < bound and last <= first
