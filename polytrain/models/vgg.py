"""VGG-16 and VGG-19 (Simonyan & Zisserman, ICLR 2015), configurations D and E without batch norm."""

from __future__ import annotations

from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import SMALL_HIDDEN, checked, image_shape, is_small, pool_or_skip

POOL = "M"
# Simonyan & Zisserman 2015 Table 1: output channels of each 3x3 convolution, "M" a 2x2/2 max pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "vgg19": (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),
}  # fmt: skip


@MODELS.register("vgg16")
@checked
def vgg16(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """VGG-16 (configuration D): 138,357,544 parameters at (3, 224, 224) with 1000 classes. See `vgg`."""
    return vgg("vgg16", num_classes, in_shape)


@MODELS.register("vgg19")
@checked
def vgg19(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """VGG-19 (configuration E): 143,667,240 parameters at (3, 224, 224) with 1000 classes. See `vgg`."""
    return vgg("vgg19", num_classes, in_shape)


def vgg(name: str, num_classes: int, in_shape: tuple[int, ...]) -> nn.Sequential:
    """A VGG net as in torchvision: 3x3 convolutions, a 7x7 adaptive average pool, fc 4096, fc 4096, fc K.

    Small inputs (smaller side < 64 px, see `polytrain.models.common`): pools that would leave less than
    1x1 are skipped, and a global average pool (512 features) feeds 512-wide hidden layers. VGG has no
    strided stem, so its first convolution is unchanged. Weights are initialised as torchvision does
    (He-normal fan-out convolutions, N(0, 0.01) linear layers, zero biases).

    Args:
        name: "vgg16" or "vgg19" (a key of `CONFIGS`).
        num_classes: output classes.
        in_shape: (C, H, W).
    """
    channels, height, width = image_shape(name, in_shape)
    hw = (height, width)
    small = is_small(hw)
    layers: list[nn.Module] = []
    for item in CONFIGS[name]:
        if item == POOL:
            pool, hw = pool_or_skip(nn.MaxPool2d, hw, 2, 2)
            layers.append(pool)
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    pooled_side, hidden = (1, SMALL_HIDDEN) if small else (7, 4096)
    model = nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(pooled_side),
        nn.Flatten(),
        nn.Linear(channels * pooled_side * pooled_side, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions and N(0, 0.01) linear weights, zero biases, as torchvision's VGG."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
