"""Shared pieces of the model zoo: argument checks, window arithmetic and the small-input rule.

Small-input rule, followed by every ImageNet-style builder (alexnet, vgg*, nin, googlenet, resnet18/50,
densenet121, squeezenet*): an image whose smaller side is below `SMALL_INPUT_PX` pixels (MNIST 28, CIFAR 32,
scikit-learn digits 8) gets

1. a stride-1 3x3 stem convolution (padding 1, same output channels as the published stem) in place of the
   published strided stem, and no max-pool right after the stem;
2. no pooling layer whose output would be smaller than 1x1 (it becomes `nn.Identity`);
3. global average pooling before the classifier;
4. fully connected hidden layers (AlexNet, VGG) `SMALL_HIDDEN` wide instead of 4096.

Images of `SMALL_INPUT_PX` pixels or more get the published architecture unchanged (the adaptive pooling in
front of each classifier is the identity at 224x224), so every published parameter count holds there.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Callable

from torch import nn

# Below this many pixels on the smaller side the published strided stems would shrink the map to a few
# pixels before the first block (a 7x7/2 conv plus a 3x3/2 pool turns 32x32 into 8x8), so the
# small-input rule above applies. At 64 every published stem and pool schedule still ends at >= 1x1.
SMALL_INPUT_PX = 64

# Under the small-input rule, 4096-wide hidden layers on a 512-feature global pool would hold 19M of a
# small VGG-16's 34M parameters (and most of its gradient traffic); 512 is the classifier width of the
# CIFAR adaptations of VGG (e.g. Zagoruyko, "92.45% on CIFAR-10 in Torch", torch.ch blog, 2015).
SMALL_HIDDEN = 512


def checked(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wraps a model builder so that bad arguments fail with one-line ValueErrors.

    The builder's keyword-only parameters are its metaparameters: any other keyword is rejected with the
    list of valid ones. A class count below 1 and a sample shape that is not made of positive integers are
    rejected too. The builder's `__name__` is its registry name, used in the messages.

    Args:
        builder: `builder(num_classes, in_shape, *, metaparameter=default, ...) -> nn.Module`.

    Returns:
        A builder with the registry signature `(num_classes, in_shape, **metaparameters)`.
    """
    name = builder.__name__
    valid = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]

    @functools.wraps(builder)
    def build(num_classes: int, in_shape: tuple[int, ...], **metaparameters) -> nn.Module:
        unknown = sorted(set(metaparameters) - set(valid))
        if unknown:
            raise ValueError(
                f"model {name} has no metaparameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(valid) or 'none'}"
            )
        classes = _positive_ints((num_classes,))
        if classes is None:
            raise ValueError(f"model {name} needs num_classes >= 1; got {num_classes!r}")
        shape = _positive_ints(tuple(in_shape))
        if not shape:
            raise ValueError(f"model {name} needs a sample shape of positive integers; got {tuple(in_shape)}")
        return builder(classes[0], shape, **metaparameters)

    return build


def _positive_ints(values: tuple) -> tuple[int, ...] | None:
    """`values` as plain ints (numpy integers accepted), or None if any is not an integer >= 1."""
    try:
        ints = tuple(operator.index(v) for v in values if not isinstance(v, bool))
    except TypeError:
        return None
    return ints if len(ints) == len(values) and all(v >= 1 for v in ints) else None


def require_int(model: str, key: str, value: object, minimum: int = 1) -> int:
    """Returns `value` if it is an integer >= `minimum`, else raises a ValueError naming the constraint."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"model {model}: {key} must be an integer >= {minimum}; got {value!r}")
    return value


def image_shape(model: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Returns `in_shape` as (C, H, W), or raises ValueError if it does not describe an image."""
    if len(in_shape) != 3:
        raise ValueError(f"model {model} needs image samples (C, H, W); got shape {tuple(in_shape)}")
    channels, height, width = in_shape
    return channels, height, width


def is_small(hw: tuple[int, int]) -> bool:
    """Whether an input of spatial size `hw` falls under the small-input rule (module docstring)."""
    return min(hw) < SMALL_INPUT_PX


def window_output(size: int, kernel: int, stride: int = 1, padding: int = 0, ceil_mode: bool = False) -> int:
    """Output length along one axis of a convolution or pooling window.

    Follows the shape formula of `torch.nn.MaxPool2d` (and PyTorch's `pooling_output_shape`): with
    `ceil_mode` a last window may run past the border but must start inside the input or left padding.
    """
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def window_hw(
    hw: tuple[int, int], kernel: int, stride: int = 1, padding: int = 0, ceil_mode: bool = False
) -> tuple[int, int]:
    """`window_output` applied to both axes of a (H, W) map."""
    return (
        window_output(hw[0], kernel, stride, padding, ceil_mode),
        window_output(hw[1], kernel, stride, padding, ceil_mode),
    )


def pool_or_skip(
    pool: type[nn.MaxPool2d] | type[nn.AvgPool2d],
    hw: tuple[int, int],
    kernel: int,
    stride: int,
    padding: int = 0,
    ceil_mode: bool = False,
) -> tuple[nn.Module, tuple[int, int]]:
    """A pooling layer and the map size after it, or `nn.Identity` if it would leave less than 1x1.

    Args:
        pool: `nn.MaxPool2d` or `nn.AvgPool2d`.
        hw: (H, W) of the map entering the pool.
        kernel, stride, padding, ceil_mode: as for the pooling layer.
    """
    out = window_hw(hw, kernel, stride, padding, ceil_mode)
    if min(out) < 1:
        return nn.Identity(), hw
    return pool(kernel, stride, padding, ceil_mode=ceil_mode), out


def stem_conv(
    in_channels: int,
    out_channels: int,
    hw: tuple[int, int],
    kernel: int,
    stride: int,
    padding: int,
    bias: bool = True,
) -> tuple[nn.Conv2d, tuple[int, int]]:
    """The first convolution of an ImageNet-style net, and the map size after it.

    Under the small-input rule (decided on the input size `hw`) it is a stride-1 3x3 convolution with
    padding 1, which keeps the map size; otherwise the published `kernel`/`stride`/`padding`.
    """
    if is_small(hw):
        kernel, stride, padding = 3, 1, 1
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias)
    return conv, window_hw(hw, kernel, stride, padding)


def stem_pool(
    small: bool, hw: tuple[int, int], kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> tuple[nn.Module, tuple[int, int]]:
    """The max-pool after an ImageNet-style stem, and the map size after it.

    Args:
        small: whether the network's input falls under the small-input rule; then the pool is skipped
            (`nn.Identity`). Decided on the input, not on `hw`: a 64x64 input leaves a 32x32 stem output.
        hw: (H, W) of the map entering the pool.
        kernel, stride, padding, ceil_mode: the published pooling window.
    """
    if small:
        return nn.Identity(), hw
    return pool_or_skip(nn.MaxPool2d, hw, kernel, stride, padding, ceil_mode)
