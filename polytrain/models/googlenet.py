"""GoogLeNet / Inception v1 (Szegedy et al., CVPR 2015) as torchvision defines it, without aux classifiers."""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, image_shape, is_small, pool_or_skip, stem_conv, stem_pool

# Szegedy et al. 2015 Table 1, per Inception module: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_3 = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64))
INCEPTION_4 = (
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
)
INCEPTION_5 = ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Module:
    """Convolution without bias, batch norm (eps 0.001, as torchvision's GoogLeNet), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels, eps=0.001),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """An Inception module (Szegedy et al. 2015 Fig. 2b): four branches concatenated along channels.

    The "5x5" branch uses a 3x3 convolution, as torchvision's GoogLeNet does (a slip kept for its
    pretrained weights, pytorch/vision PR #906); the published 6,624,904 parameters count it that way.

    Args:
        in_channels: input channels.
        widths: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), a row of Table 1.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        c1, c3_reduce, c3, c5_reduce, c5, pool_proj = widths
        self.branch1 = conv_bn(in_channels, c1, 1)
        self.branch2 = nn.Sequential(conv_bn(in_channels, c3_reduce, 1), conv_bn(c3_reduce, c3, 3, padding=1))
        self.branch3 = nn.Sequential(conv_bn(in_channels, c5_reduce, 1), conv_bn(c5_reduce, c5, 3, padding=1))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv_bn(in_channels, pool_proj, 1)
        )
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H, W)."""
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


def inception_stage(in_channels: int, rows: tuple[tuple[int, ...], ...]) -> tuple[nn.Sequential, int]:
    """Inception modules built from rows of Table 1, chained; returns them and their output channels."""
    modules = []
    for widths in rows:
        modules.append(Inception(in_channels, widths))
        in_channels = modules[-1].out_channels
    return nn.Sequential(*modules), in_channels


@MODELS.register("googlenet")
@checked
def googlenet(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """GoogLeNet with batch norm after every convolution and no auxiliary classifiers (torchvision's).

    Stem conv 7x7/2 64, 3x3/2 max pool, conv 1x1 64, conv 3x3 192, pool, Inception 3a-3b, pool, 4a-4e,
    2x2/2 pool, 5a-5b, global average pool, dropout 0.2, fc: 6,624,904 parameters at (3, 224, 224) with
    1000 classes (torchvision's `GoogLeNet_Weights.IMAGENET1K_V1` metadata). Pools round up (`ceil_mode`),
    as Caffe's did. Weights are N(0, 0.01) truncated at +-2, as torchvision initialises them.

    Small inputs (smaller side < 64 px, see `polytrain.models.common`): a 3x3/1 stem convolution, no pool
    after it, and pools that would leave less than 1x1 skipped.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape("googlenet", in_shape)
    small = is_small((height, width))
    conv1, hw = stem_conv(channels, 64, (height, width), kernel=7, stride=2, padding=3, bias=False)
    pool1, hw = stem_pool(small, hw, 3, 2, ceil_mode=True)
    pool2, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2, ceil_mode=True)
    pool3, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2, ceil_mode=True)
    pool4, hw = pool_or_skip(nn.MaxPool2d, hw, 2, 2, ceil_mode=True)
    stage3, width3 = inception_stage(192, INCEPTION_3)
    stage4, width4 = inception_stage(width3, INCEPTION_4)
    stage5, width5 = inception_stage(width4, INCEPTION_5)
    model = nn.Sequential(
        nn.Sequential(conv1, nn.BatchNorm2d(64, eps=0.001), nn.ReLU(inplace=True)),
        pool1,
        conv_bn(64, 64, 1),
        conv_bn(64, 192, 3, padding=1),
        pool2,
        stage3,
        pool3,
        stage4,
        pool4,
        stage5,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(width5, num_classes),
    )
    _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """Truncated N(0, 0.01) weights in [-2, 2] for convolutions and the classifier, as torchvision's."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-2, b=2)
