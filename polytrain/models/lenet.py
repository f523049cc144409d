"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, Proc. IEEE 1998)."""

from __future__ import annotations

import math

from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, image_shape

# LeNet-5 was designed for 32x32 inputs; LeCun et al. 1998 Sec. II.B put the 28x28 MNIST digits in a
# 32x32 field so that stroke end-points can reach the centre of the top feature detectors.
LENET_INPUT_PX = 32


@MODELS.register("lenet5")
@checked
def lenet5(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """LeNet-5: conv 5x5 x6, pool, conv 5x5 x16, pool, fc 120, fc 84, fc num_classes.

    The modern reading of LeCun et al. 1998 Fig. 2: C3 fully connected to S2 (the paper's Table I wires
    only 60 of its 96 map pairs), ReLU instead of the scaled tanh, parameter-free 2x2 max pooling instead
    of trainable subsampling, and a linear output layer instead of RBF units. That gives 61,706 parameters
    at (1, 32, 32) with 10 classes (the paper's variant has 60,840).

    A side shorter than 32 pixels is zero-padded inside the first convolution by ceil((32 - side) / 2) on
    each border, so a 28x28 image is seen like the paper's 32x32 field (and fc 120 again sees 16x5x5);
    larger images are not padded and fc 120 sees every map position.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape("lenet5", in_shape)
    pad_h, pad_w = (max(0, math.ceil((LENET_INPUT_PX - side) / 2)) for side in (height, width))
    # Two 5x5 valid convolutions (-4 each), each followed by a 2x2/2 pool (floor halving).
    out_h = ((height + 2 * pad_h - 4) // 2 - 4) // 2
    out_w = ((width + 2 * pad_w - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=(pad_h, pad_w)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * out_h * out_w, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
