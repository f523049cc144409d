"""A regression dataset that needs no download: scikit-learn's bundled diabetes data."""

from __future__ import annotations

import numpy as np
import torch

from polytrain.data import Dataset
from polytrain.data.bundled import _global_rngs_kept
from polytrain.data.prepare import num_test_samples, register_loader


@register_loader("diabetes")
def load_diabetes(*, seed: int, test_fraction: float) -> Dataset:
    """scikit-learn's diabetes data (Efron et al. 2004): 442 patients, 10 features, disease progression after
    a year as the target.

    The split is a seeded random permutation (targets are continuous: nothing to stratify). Features and
    the target are standardised with the train split's mean and std, so the test RMSE is in units of the
    target's train std; `source` states that mean and std (RMSE in original units = RMSE * std).
    """
    with _global_rngs_kept():  # importing scikit-learn draws from python's global RNG
        from sklearn.datasets import load_diabetes as sklearn_diabetes

    data = sklearn_diabetes()
    x, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.float64)[:, None]
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = num_test_samples(len(y), test_fraction)
    train, test = order[num_test:], order[:num_test]
    x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
    y_mean, y_std = float(y[train].mean()), float(y[train].std())

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.float32))

    return Dataset("diabetes", tensor((x[train] - x_mean) / x_std), tensor((y[train] - y_mean) / y_std),
                   tensor((x[test] - x_mean) / x_std), tensor((y[test] - y_mean) / y_std), num_classes=1,
                   synthetic=False, task="regression",
                   source=f"sklearn.datasets.load_diabetes; targets standardised: mean {y_mean:.1f}, std {y_std:.1f}")
