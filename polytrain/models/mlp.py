"""Multilayer perceptron over flattened samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked


@MODELS.register("mlp")
@checked
def mlp(num_classes: int, in_shape: tuple[int, ...], *, hidden: Sequence[int] = (512, 256)) -> nn.Module:
    """Flattens each sample, then fully connected layers of widths `hidden` with ReLU, then the classifier.

    Works for any sample shape. `hidden=()` gives multinomial logistic regression.

    Args:
        num_classes: output classes.
        in_shape: any sample shape; its elements are the input features.
        hidden: widths of the hidden layers, input side first.
    """
    widths = _widths(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(in_shape)
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _widths(hidden: Sequence[int]) -> tuple[int, ...]:
    """`hidden` as a tuple of ints, or a ValueError naming the constraint."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden
    ):
        raise ValueError(
            f"model mlp: hidden must be a sequence of positive widths like (512, 256); got {hidden!r}"
        )
    return tuple(hidden)
