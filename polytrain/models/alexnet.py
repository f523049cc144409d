"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012), single-tower variant."""

from __future__ import annotations

from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import (
    SMALL_HIDDEN,
    checked,
    image_shape,
    is_small,
    pool_or_skip,
    stem_conv,
    stem_pool,
)


@MODELS.register("alexnet")
@checked
def alexnet(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """AlexNet as in torchvision: the one-GPU variant of Krizhevsky 2014 ("One weird trick"), no LRN.

    Convolutions 64-192-384-256-256 (11x11/4, 5x5, 3x3, 3x3, 3x3) with 3x3/2 max pools after the 1st,
    2nd and 5th, a 6x6 adaptive average pool, then dropout/fc 4096/dropout/fc 4096/fc num_classes:
    61,100,840 parameters at (3, 224, 224) with 1000 classes.

    Small inputs (smaller side < 64 px, see `polytrain.models.common`): a 3x3/1 first convolution, no pool
    after it, pools skipped below 1x1, a global average pool (256 features) and 512-wide hidden layers.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape("alexnet", in_shape)
    small = is_small((height, width))
    conv1, hw = stem_conv(channels, 64, (height, width), kernel=11, stride=4, padding=2)
    pool1, hw = stem_pool(small, hw, 3, 2)
    pool2, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2)  # the 5x5 and 3x3 convolutions keep the size
    pool5, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2)
    pooled_side, hidden = (1, SMALL_HIDDEN) if small else (6, 4096)
    return nn.Sequential(
        conv1,
        nn.ReLU(inplace=True),
        pool1,
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(inplace=True),
        pool2,
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        pool5,
        nn.AdaptiveAvgPool2d(pooled_side),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(256 * pooled_side * pooled_side, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
