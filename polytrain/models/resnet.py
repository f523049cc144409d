"""Residual networks (He, Zhang, Ren & Sun, CVPR 2016): ImageNet ResNet-18/50 and CIFAR ResNet-20/56/110."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, image_shape, is_small, stem_conv, stem_pool

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016 Sec. 3.3): subsample by `stride`, zero-pad the new channels.

    Parameter-free; the CIFAR ResNets of Sec. 4.2 use it wherever the dimensions increase.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C + extra_channels, ceil(H / stride), ceil(W / stride))."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # pads the channel dim at its end


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option B shortcut (He et al. 2016 Sec. 3.3): strided 1x1 convolution and batch norm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def make_shortcut(in_channels: int, out_channels: int, stride: int, option: str) -> nn.Module | None:
    """The shortcut of a residual block: None (identity) when the shape is kept, else option A or B."""
    if stride == 1 and in_channels == out_channels:
        return None
    if option == "A":
        return PadShortcut(stride, out_channels - in_channels)
    return projection(in_channels, out_channels, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or shortcut path (He et al. 2016 Fig. 5 left).

    Attribute names follow torchvision (conv1, bn1, conv2, bn2, downsample) so its checkpoints load.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, option: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(in_channels, planes, stride, option)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + identity, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with batch norm and a shortcut (He et al. 2016 Fig. 5 right).

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5"); this does not change the
    parameter count. Attribute names follow torchvision so its checkpoints load.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, option: str = "B") -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = make_shortcut(in_channels, out_channels, stride, option)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, 4 * planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + identity, inplace=True)


Block = type[BasicBlock] | type[Bottleneck]


def stage(
    block: Block, in_channels: int, planes: int, num_blocks: int, stride: int, option: str
) -> tuple[nn.Sequential, int]:
    """`num_blocks` residual blocks, the first with `stride`; returns them and their output channels."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(block(in_channels, planes, stride if index == 0 else 1, option))
        in_channels = planes * block.expansion
    return nn.Sequential(*blocks), in_channels


def resnet(
    stem: OrderedDict[str, nn.Module],
    in_channels: int,
    block: Block,
    widths: tuple[int, ...],
    num_blocks: tuple[int, ...],
    option: str,
    num_classes: int,
) -> nn.Sequential:
    """Stages of residual blocks after `stem` (stride 2 from the second stage on), global pool and fc.

    Convolutions are He-normal (fan-out; He et al. 2015, as torchvision), batch norms scale 1, shift 0.

    Args:
        stem: named layers before the first stage (extended in place); names follow torchvision.
        in_channels: channels the stem produces.
        block: `BasicBlock` or `Bottleneck`.
        widths: planes per stage.
        num_blocks: blocks per stage.
        option: shortcut option where the shape changes, "A" (zero padding) or "B" (projection).
        num_classes: output classes.
    """
    for index, (planes, count) in enumerate(zip(widths, num_blocks)):
        stride = 1 if index == 0 else 2
        stem[f"layer{index + 1}"], in_channels = stage(block, in_channels, planes, count, stride, option)
    stem.update(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_channels, num_classes))
    model = nn.Sequential(stem)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def imagenet_resnet(
    name: str, block: Block, num_blocks: tuple[int, ...], num_classes: int, in_shape: tuple[int, ...]
) -> nn.Sequential:
    """An ImageNet ResNet (He et al. 2016 Table 1) as in torchvision, with the small-input rule.

    Stem conv 7x7/2 64 + batch norm + 3x3/2 max pool, four stages of 64/128/256/512 planes, global average
    pool, fc. Projection shortcuts (option B) where the shape changes. Small inputs (smaller side < 64 px,
    see `polytrain.models.common`): a 3x3/1 stem and no max pool; the stride-2 3x3 convolutions never
    shrink a map below 1x1, so nothing else changes. Module names match torchvision's, so its state dicts
    load into the ImageNet configuration.

    Args:
        name: model name for messages.
        block: `BasicBlock` or `Bottleneck`.
        num_blocks: blocks per stage.
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape(name, in_shape)
    small = is_small((height, width))
    conv1, hw = stem_conv(channels, 64, (height, width), kernel=7, stride=2, padding=3, bias=False)
    maxpool, _ = stem_pool(small, hw, 3, 2, padding=1)
    stem = OrderedDict(conv1=conv1, bn1=nn.BatchNorm2d(64), relu=nn.ReLU(inplace=True), maxpool=maxpool)
    return resnet(stem, 64, block, (64, 128, 256, 512), num_blocks, "B", num_classes)


@MODELS.register("resnet18")
@checked
def resnet18(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """ResNet-18: 11,689,512 parameters at (3, 224, 224) with 1000 classes. See `imagenet_resnet`."""
    return imagenet_resnet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, in_shape)


@MODELS.register("resnet50")
@checked
def resnet50(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """ResNet-50: 25,557,032 parameters at (3, 224, 224) with 1000 classes. See `imagenet_resnet`."""
    return imagenet_resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, in_shape)


def cifar_resnet(
    name: str, depth: int, num_classes: int, in_shape: tuple[int, ...], option: str
) -> nn.Module:
    """A CIFAR ResNet of `depth` = 6n + 2 layers (He et al. 2016 Sec. 4.2).

    Conv 3x3 16 + batch norm, three stages of n basic blocks with 16/32/64 filters on 32/16/8 maps (for
    32x32 inputs), global average pool, fc. Any image size works: the stride-2 convolutions of stages 2
    and 3 never shrink a map below 1x1.

    Parameters with 10 classes, option A / B: ResNet-20 269,722 / 272,474; ResNet-56 853,018 / 855,770;
    ResNet-110 1,727,962 / 1,730,714 (the paper's Table 6 rounds them to 0.27M, 0.85M, 1.7M). Option B
    adds two 1x1 projections with batch norm (16->32 and 32->64), 2,752 parameters.

    Args:
        name: model name for messages.
        depth: 6n + 2.
        num_classes: output classes.
        in_shape: (C, H, W).
        option: "A" for parameter-free zero-padding shortcuts (the paper's CIFAR choice) or "B" for
            projection shortcuts where the shape changes.
    """
    channels, _, _ = image_shape(name, in_shape)
    if option not in SHORTCUTS:
        raise ValueError(f"model {name}: shortcut must be one of {', '.join(SHORTCUTS)}; got {option!r}")
    stem = OrderedDict(
        conv1=nn.Conv2d(channels, 16, 3, 1, 1, bias=False), bn1=nn.BatchNorm2d(16), relu=nn.ReLU(inplace=True)
    )
    n = (depth - 2) // 6
    return resnet(stem, 16, BasicBlock, (16, 32, 64), (n, n, n), option, num_classes)


@MODELS.register("resnet20")
@checked
def resnet20(num_classes: int, in_shape: tuple[int, ...], *, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-20 (n=3), `shortcut` "A" or "B". See `cifar_resnet`."""
    return cifar_resnet("resnet20", 20, num_classes, in_shape, shortcut)


@MODELS.register("resnet56")
@checked
def resnet56(num_classes: int, in_shape: tuple[int, ...], *, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-56 (n=9), `shortcut` "A" or "B". See `cifar_resnet`."""
    return cifar_resnet("resnet56", 56, num_classes, in_shape, shortcut)


@MODELS.register("resnet110")
@checked
def resnet110(num_classes: int, in_shape: tuple[int, ...], *, shortcut: str = "A") -> nn.Module:
    """CIFAR ResNet-110 (n=18), `shortcut` "A" or "B". See `cifar_resnet`."""
    return cifar_resnet("resnet110", 110, num_classes, in_shape, shortcut)
