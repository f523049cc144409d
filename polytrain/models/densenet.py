"""DenseNet-BC (Huang, Liu, van der Maaten & Weinberger, CVPR 2017): ImageNet DenseNet-121 and CIFAR nets."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import (
    checked,
    image_shape,
    is_small,
    pool_or_skip,
    require_int,
    stem_conv,
    stem_pool,
)

# Huang et al. 2017 Sec. 3: bottleneck layers produce 4k feature maps, transitions keep a fraction
# theta = 0.5 of them ("compression"); together they make the "-BC" variant.
BOTTLENECK_WIDTH = 4
COMPRESSION = 0.5


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, 4k)-BN-ReLU-Conv(3x3, k); its k new maps are concatenated to its input.

    Attribute names follow torchvision's `_DenseLayer` so its checkpoints load.

    Args:
        in_channels: channels entering the layer.
        growth_rate: k, the new channels it adds.
    """

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        width = BOTTLENECK_WIDTH * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C + growth_rate, H, W)."""
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], dim=1)


def dense_block(in_channels: int, num_layers: int, growth_rate: int) -> tuple[nn.Sequential, int]:
    """`num_layers` dense layers; returns them and their output channels, in_channels + num_layers * k."""
    layers = OrderedDict(
        (f"denselayer{index + 1}", DenseLayer(in_channels + index * growth_rate, growth_rate))
        for index in range(num_layers)
    )
    return nn.Sequential(layers), in_channels + num_layers * growth_rate


def transition(in_channels: int, hw: tuple[int, int]) -> tuple[nn.Sequential, int, tuple[int, int]]:
    """BN-ReLU-Conv(1x1) to floor(theta * in_channels) maps, then 2x2/2 average pooling (Huang Sec. 3).

    The pool is skipped if it would leave less than 1x1. Returns the layer, its output channels and the
    map size after it.
    """
    out_channels = int(COMPRESSION * in_channels)
    pool, hw = pool_or_skip(nn.AvgPool2d, hw, 2, 2)
    layers = OrderedDict(
        norm=nn.BatchNorm2d(in_channels),
        relu=nn.ReLU(inplace=True),
        conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
        pool=pool,
    )
    return nn.Sequential(layers), out_channels, hw


def densenet(
    stem: OrderedDict[str, nn.Module],
    stem_channels: int,
    hw: tuple[int, int],
    block_sizes: tuple[int, ...],
    growth_rate: int,
    num_classes: int,
) -> nn.Sequential:
    """Dense blocks joined by transitions after `stem`, then BN-ReLU, global average pool and fc.

    Module names follow torchvision's DenseNet (features.denseblock1..., features.norm5, classifier).

    Args:
        stem: named layers before the first dense block; extended in place.
        stem_channels: channels the stem produces.
        hw: (H, W) of the stem's output.
        block_sizes: dense layers per block.
        growth_rate: k.
        num_classes: output classes.
    """
    channels = stem_channels
    for index, size in enumerate(block_sizes):
        stem[f"denseblock{index + 1}"], channels = dense_block(channels, size, growth_rate)
        if index + 1 < len(block_sizes):
            stem[f"transition{index + 1}"], channels, hw = transition(channels, hw)
    stem.update(norm5=nn.BatchNorm2d(channels), relu5=nn.ReLU(inplace=True))
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(stem),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(channels, num_classes),
        )
    )
    _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """He-normal convolutions (fan-in), batch norm scale 1 and shift 0, zero fc bias, as torchvision."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


@MODELS.register("densenet121")
@checked
def densenet121(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """DenseNet-121 (Huang et al. 2017 Table 1, k=32): 7,978,856 parameters at (3, 224, 224), 1000 classes.

    Stem conv 7x7/2 64 + BN-ReLU + 3x3/2 max pool, dense blocks of 6, 12, 24, 16 layers. Small inputs
    (smaller side < 64 px, see `polytrain.models.common`): a 3x3/1 stem and no max pool; transition
    pools that would leave less than 1x1 are skipped.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape("densenet121", in_shape)
    small = is_small((height, width))
    conv0, hw = stem_conv(channels, 64, (height, width), kernel=7, stride=2, padding=3, bias=False)
    pool0, hw = stem_pool(small, hw, 3, 2, padding=1)
    stem = OrderedDict(conv0=conv0, norm0=nn.BatchNorm2d(64), relu0=nn.ReLU(inplace=True), pool0=pool0)
    return densenet(stem, 64, hw, (6, 12, 24, 16), 32, num_classes)


@MODELS.register("densenet_cifar")
@checked
def densenet_cifar(
    num_classes: int, in_shape: tuple[int, ...], *, depth: int = 100, growth_rate: int = 12
) -> nn.Module:
    """CIFAR DenseNet-BC (Huang et al. 2017 Sec. 3 "Implementation Details"); default depth 100, k=12.

    Conv 3x3 with 2k maps, three dense blocks of (depth - 4) / 6 bottleneck layers joined by compressing
    transitions, BN-ReLU, global average pool, fc. Depth 100 with k=12 is the 0.8M-parameter model of
    Table 2 (exactly 769,162 parameters with 10 classes). Any image size works: transition pools that
    would leave less than 1x1 are skipped.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
        depth: 6n + 4 with n >= 1 (n bottleneck layers of two convolutions per block, plus the first
            convolution, two transitions and the classifier).
        growth_rate: k, maps added by each layer.
    """
    channels, height, width = image_shape("densenet_cifar", in_shape)
    require_int("densenet_cifar", "depth", depth, minimum=10)
    if (depth - 4) % 6:
        raise ValueError(f"model densenet_cifar: depth must be 6n + 4 (10, 16, ..., 100, ...); got {depth}")
    require_int("densenet_cifar", "growth_rate", growth_rate)
    stem = OrderedDict(conv0=nn.Conv2d(channels, 2 * growth_rate, 3, padding=1, bias=False))
    return densenet(stem, 2 * growth_rate, (height, width), ((depth - 4) // 6,) * 3, growth_rate, num_classes)
