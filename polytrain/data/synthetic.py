"""Synthetic data for throughput work: standard normal samples of any shape with uniform random labels."""

from __future__ import annotations

import torch

from polytrain.data import DataError, Dataset
from polytrain.data.prepare import num_test_samples, positive_int, register_loader


@register_loader("synthetic")
def load_synthetic(
    *,
    seed: int,
    test_fraction: float,
    shape: tuple[int, ...] | str = (3, 32, 32),
    num_classes: int = 10,
    num_samples: int = 1024,
) -> Dataset:
    """Generates random samples from a torch.Generator seeded with `seed`; nothing in them can be learned.

    The samples are drawn from N(0, 1), which is already what normalisation produces, and are independent,
    so the test split is drawn after the train split instead of permuting and normalising.

    Args:
        seed: seed of the generator.
        test_fraction: fraction of the samples in the test split.
        shape: shape of one sample, as a tuple or a "C,H,W" string.
        num_classes: number of classes the labels are drawn from.
        num_samples: number of samples in both splits together.
    """
    in_shape = _parse_shape(shape)
    num_classes = positive_int("synthetic", "num_classes", num_classes)
    num_samples = positive_int("synthetic", "num_samples", num_samples)
    num_test = num_test_samples(num_samples, test_fraction)
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((count, *in_shape), generator=generator)
        return x, torch.randint(num_classes, (count,), generator=generator)

    x_train, y_train = draw(num_samples - num_test)
    x_test, y_test = draw(num_test)
    return Dataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        synthetic=True,
        source=f"torch.randn with seed {seed}",
    )


def _parse_shape(shape: tuple[int, ...] | str) -> tuple[int, ...]:
    """Returns the sample shape from a tuple or list of positive ints or a "C,H,W" string."""
    try:
        dims = tuple(int(d) for d in shape.split(",")) if isinstance(shape, str) else tuple(shape)
    except (TypeError, ValueError):
        dims = ()
    if not (dims and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise DataError(
            f"dataset synthetic shape={shape!r} is not positive ints like (3, 32, 32) or '3,32,32'"
        )
    return dims
