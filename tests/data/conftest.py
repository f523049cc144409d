"""Helpers shared by the dataset tests."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from polytrain.data import DataError


@pytest.fixture
def data_error() -> Callable[..., str]:
    """Returns call(fn, *args, **kwargs): runs fn, expects a one-line DataError, returns its message."""

    def call(fn: Callable, *args, **kwargs) -> str:
        with pytest.raises(DataError) as info:
            fn(*args, **kwargs)
        message = str(info.value)
        assert "\n" not in message
        return message

    return call


@pytest.fixture
def normalised() -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Returns norm(train, test): both normalised per channel (axis 1) with float64 statistics of train."""

    def norm(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        train, test = train.astype(np.float64), test.astype(np.float64)
        axes = (0, *range(2, train.ndim)) if train.ndim > 2 else (0, 1)
        mean = train.mean(axis=axes, keepdims=True)
        std = train.std(axis=axes, keepdims=True)
        std[std == 0] = 1
        return (train - mean) / std, (test - mean) / std

    return norm
