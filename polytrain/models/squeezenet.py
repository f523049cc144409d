"""SqueezeNet v1.0 and v1.1 with the design-space metaparameters of Iandola's PhD thesis (UC Berkeley 2016).

Thesis Sec. 5.5.1 (also Iandola et al., "SqueezeNet", arXiv:1602.07360, Sec. 5.1): Fire module i = 0..7
(fire2..fire9) has e_i = base_e + incr_e * floor(i / freq) expand filters, of which e_i * pct3x3 are 3x3
and the rest 1x1, after a squeeze layer of s_i = SR * e_i 1x1 filters. SqueezeNet is base_e = 128,
incr_e = 128, pct3x3 = 0.5, freq = 2, SR = 0.125 (Table 5.1: 1,248,424 parameters).

Bypass variants (thesis Sec. 5.6, Fig. 5.2, Table 5.3):
- "simple": identity bypasses around fire3, fire5, fire7 and fire9; no parameters are added ("4.8MB",
  like vanilla SqueezeNet).
- "complex": the simple bypasses plus a 1x1 convolution bypass around each remaining Fire module (fire2,
  fire4, fire6, fire8), whose input and output channel counts differ. In general: every Fire module gets a
  bypass, an identity where its channel counts match and a 1x1 convolution (with bias, as Caffe's) where
  they do not. For SqueezeNet v1.0 this adds 341,248 parameters: 1,589,672 in all, 6.06 MiB in float32.
  Table 5.3 lists the complex-bypass model as 7.7MB (vanilla: 4.8MB, i.e. 4.76 MiB); neither the thesis
  nor the paper gives a parameter count or layer list that would explain the difference, so 7.7MB is not
  reproduced here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, image_shape, is_small, pool_or_skip, stem_conv, stem_pool

NUM_FIRE = 8
BYPASSES = ("none", "simple", "complex")
# Thesis Sec. 5.6: simple bypasses go around fire3, fire5, fire7, fire9, i.e. Fire indices i = 1, 3, 5, 7.
SIMPLE_BYPASS_FIRES = (1, 3, 5, 7)


class Fire(nn.Module):
    """Fire module (thesis Sec. 5.3.2): 1x1 squeeze, then 1x1 and 3x3 expand filters concatenated, all ReLU.

    An expand layer with 0 filters (pct3x3 of 0 or 1) is left out. Attribute names follow torchvision's
    `Fire` so its checkpoints load.

    Args:
        in_channels: channels entering the module.
        squeeze: s_1x1, squeeze filters.
        expand1x1: e_1x1, 1x1 expand filters.
        expand3x3: e_3x3, 3x3 expand filters (zero-padded by 1 so both expand outputs have the same size).
    """

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1) if expand1x1 else None
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1) if expand3x3 else None
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, expand1x1 + expand3x3, H, W)."""
        s = torch.relu(self.squeeze(x))
        expands = [conv(s) for conv in (self.expand1x1, self.expand3x3) if conv is not None]
        return torch.relu(torch.cat(expands, dim=1))


class Bypass(nn.Module):
    """Adds a bypass path around a Fire module: output = fire(x) + path(x) (thesis Sec. 5.6).

    Args:
        fire: the module bypassed.
        path: `nn.Identity` (a simple bypass, "just a wire") or a 1x1 convolution (a complex bypass).
    """

    def __init__(self, fire: Fire, path: nn.Module) -> None:
        super().__init__()
        self.fire = fire
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        return self.fire(x) + self.path(x)


@dataclass(frozen=True)
class FireMetaparameters:
    """The thesis metaparameters that set the widths of all eight Fire modules (Sec. 5.5.1).

    Attributes:
        base_e: expand filters of the first Fire module.
        incr_e: expand filters added every `freq` Fire modules.
        freq: Fire modules between increases.
        pct3x3: fraction of the expand filters that are 3x3, in [0, 1].
        sr: squeeze ratio, squeeze filters per expand filter, in (0, 1].
    """

    base_e: int = 128
    incr_e: int = 128
    freq: int = 2
    pct3x3: float = 0.5
    sr: float = 0.125

    def widths(self) -> list[tuple[int, int, int]]:
        """(s_1x1, e_1x1, e_3x3) of fire2..fire9; fractional filter counts are rounded half up."""
        widths = []
        for i in range(NUM_FIRE):
            expand = self.base_e + self.incr_e * (i // self.freq)  # e_i = base_e + incr_e * floor(i / freq)
            expand3x3 = math.floor(expand * self.pct3x3 + 0.5)  # e_i,3x3 = e_i * pct3x3
            squeeze = math.floor(self.sr * expand + 0.5)  # s_i,1x1 = SR * e_i
            widths.append((squeeze, expand - expand3x3, expand3x3))
        return widths

    def problem(self) -> str | None:
        """The first constraint these values break, as a message, or None."""
        rules = (
            ("base_e", self.base_e, _is_int(self.base_e) and self.base_e >= 1, "an integer >= 1"),
            ("incr_e", self.incr_e, _is_int(self.incr_e) and self.incr_e >= 0, "an integer >= 0"),
            ("freq", self.freq, _is_int(self.freq) and self.freq >= 1, "an integer >= 1"),
            ("pct3x3", self.pct3x3, _is_real(self.pct3x3) and 0 <= self.pct3x3 <= 1, "a fraction in [0, 1]"),
            ("sr", self.sr, _is_real(self.sr) and 0 < self.sr <= 1, "a fraction in (0, 1]"),
        )
        for key, value, ok, constraint in rules:
            if not ok:
                return f"{key} must be {constraint}; got {value!r}"
        squeeze, _, _ = self.widths()[0]  # fire2 has the fewest expand filters, so the fewest squeeze
        if squeeze < 1:
            return f"sr={self.sr} leaves fire2 round({self.sr} * {self.base_e}) = 0 squeeze filters"
        return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fire_stack(
    name: str, in_channels: int, meta: FireMetaparameters, bypass: str
) -> tuple[list[nn.Module], int]:
    """fire2..fire9, each wrapped in `Bypass` where `bypass` puts one; returns them and their out channels."""
    modules: list[nn.Module] = []
    for i, (squeeze, expand1x1, expand3x3) in enumerate(meta.widths()):
        fire = Fire(in_channels, squeeze, expand1x1, expand3x3)
        same = fire.out_channels == in_channels
        if bypass == "simple" and i in SIMPLE_BYPASS_FIRES:
            if not same:
                raise ValueError(
                    f"model {name}: simple bypass around fire{i + 2} needs equal input and output channels; "
                    f"got {in_channels} -> {fire.out_channels}"
                )
            modules.append(Bypass(fire, nn.Identity()))
        elif bypass == "complex":
            path = nn.Identity() if same else nn.Conv2d(in_channels, fire.out_channels, 1)
            modules.append(Bypass(fire, path))
        else:
            modules.append(fire)
        in_channels = fire.out_channels
    return modules, in_channels


def squeezenet(
    name: str,
    num_classes: int,
    in_shape: tuple[int, ...],
    stem: tuple[int, int, int],
    pool_after: tuple[int, ...],
    meta: FireMetaparameters,
    bypass: str,
) -> nn.Sequential:
    """A SqueezeNet: conv1, 3x3/2 max pool, fire2..fire9 with 3x3/2 max pools, dropout, conv10, global pool.

    Pools round up (`ceil_mode`), as Caffe's did. Weights are initialised as torchvision does (He-uniform
    convolutions, N(0, 0.01) for conv10, zero biases). Small inputs (smaller side < 64 px, see
    `polytrain.models.common`): conv1 becomes 3x3/1 with padding 1, the pool after it is skipped, and pools
    that would leave less than 1x1 are skipped.

    Args:
        name: model name for messages.
        num_classes: output classes (conv10 filters).
        in_shape: (C, H, W).
        stem: (filters, kernel, stride) of the unpadded conv1.
        pool_after: Fire indices i (module fire{i+2}) followed by a max pool.
        meta: Fire module widths.
        bypass: one of `BYPASSES`.
    """
    channels, height, width = image_shape(name, in_shape)
    if bypass not in BYPASSES:
        raise ValueError(f"model {name}: bypass must be one of {', '.join(BYPASSES)}; got {bypass!r}")
    problem = meta.problem()
    if problem:
        raise ValueError(f"model {name}: {problem}")
    fires, fire_channels = fire_stack(name, stem[0], meta, bypass)
    small = is_small((height, width))
    conv1, hw = stem_conv(channels, stem[0], (height, width), kernel=stem[1], stride=stem[2], padding=0)
    pool1, hw = stem_pool(small, hw, 3, 2, ceil_mode=True)
    layers: list[nn.Module] = [conv1, nn.ReLU(inplace=True), pool1]
    for i, fire in enumerate(fires):
        layers.append(fire)
        if i in pool_after:
            pool, hw = pool_or_skip(nn.MaxPool2d, hw, 3, 2, ceil_mode=True)
            layers.append(pool)
    conv10 = nn.Conv2d(fire_channels, num_classes, 1)
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*layers),
            classifier=nn.Sequential(
                nn.Dropout(0.5), conv10, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
        )
    )
    _init_like_torchvision(model, conv10)
    return model


def _init_like_torchvision(model: nn.Module, conv10: nn.Conv2d) -> None:
    """He-uniform convolutions, N(0, 0.01) for conv10, zero biases, as torchvision's SqueezeNet."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if module is conv10:
                nn.init.normal_(module.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_uniform_(module.weight)
            nn.init.zeros_(module.bias)


@MODELS.register("squeezenet1_0")
@checked
def squeezenet1_0(
    num_classes: int,
    in_shape: tuple[int, ...],
    *,
    base_e: int = 128,
    incr_e: int = 128,
    freq: int = 2,
    pct3x3: float = 0.5,
    sr: float = 0.125,
    bypass: str = "none",
) -> nn.Module:
    """SqueezeNet v1.0 (thesis Table 5.1): conv1 7x7/2 96, pools after conv1, fire4 and fire8.

    The defaults give 1,248,424 parameters at (3, 224, 224) with 1000 classes (Table 5.1). See the module
    docstring for the metaparameters and `squeezenet` for the layers and the small-input rule.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
        base_e, incr_e, freq, pct3x3, sr: Fire module widths, see `FireMetaparameters`.
        bypass: "none", "simple" or "complex" (thesis Sec. 5.6).
    """
    meta = FireMetaparameters(base_e, incr_e, freq, pct3x3, sr)
    return squeezenet("squeezenet1_0", num_classes, in_shape, (96, 7, 2), (2, 6), meta, bypass)


@MODELS.register("squeezenet1_1")
@checked
def squeezenet1_1(
    num_classes: int,
    in_shape: tuple[int, ...],
    *,
    base_e: int = 128,
    incr_e: int = 128,
    freq: int = 2,
    pct3x3: float = 0.5,
    sr: float = 0.125,
    bypass: str = "none",
) -> nn.Module:
    """SqueezeNet v1.1: conv1 3x3/2 64, pools after conv1, fire3 and fire5; same Fire modules as v1.0.

    2.4x less computation than v1.0 at the same accuracy (DeepScale/SqueezeNet v1.1 release notes); the
    defaults give 1,235,496 parameters at (3, 224, 224) with 1000 classes (torchvision's
    `SqueezeNet1_1_Weights` metadata). Metaparameters as for `squeezenet1_0`.

    Args:
        num_classes: output classes.
        in_shape: (C, H, W).
        base_e, incr_e, freq, pct3x3, sr: Fire module widths, see `FireMetaparameters`.
        bypass: "none", "simple" or "complex" (thesis Sec. 5.6).
    """
    meta = FireMetaparameters(base_e, incr_e, freq, pct3x3, sr)
    return squeezenet("squeezenet1_1", num_classes, in_shape, (64, 3, 2), (1, 3), meta, bypass)
