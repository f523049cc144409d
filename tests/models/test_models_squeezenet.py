"""SqueezeNet against chapter 5 of Iandola's PhD thesis (UC Berkeley 2016): Table 5.1, metaparameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytrain.models import build_model
from polytrain.models.squeezenet import Bypass, Fire


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_squeezenet(name: str = "squeezenet1_0", **metaparameters) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, 1000, (3, 224, 224), **metaparameters)


def fires(model: nn.Module) -> list[Fire]:
    return [m for m in model.modules() if isinstance(m, Fire)]


def expand_filters(i: int, base_e: int = 128, incr_e: int = 128, freq: int = 2) -> int:
    """Thesis Sec. 5.5.1: e_i = base_e + incr_e * floor(i / freq)."""
    return base_e + incr_e * (i // freq)


def test_table_5_1_layer_parameters():
    # Thesis Table 5.1, "#parameter before pruning": conv1, fire2..fire9, conv10.
    model = meta_squeezenet()
    conv1 = model.features[0]
    conv10 = model.classifier[1]
    assert num_params(conv1) == 14_208
    assert [num_params(f) for f in fires(model)] == [
        11_920, 12_432, 45_344, 49_440, 104_880, 111_024, 188_992, 197_184
    ]
    assert num_params(conv10) == 513_000


def test_table_5_1_layer_widths():
    # Thesis Table 5.1 columns s_1x1, e_1x1, e_3x3.
    model = meta_squeezenet()
    widths = [
        (f.squeeze.out_channels, f.expand1x1.out_channels, f.expand3x3.out_channels)
        for f in fires(model)
    ]
    assert widths == [(16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
                      (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]  # fmt: skip


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
@pytest.mark.parametrize("sr", [0.25, 0.5, 0.75, 1.0])
def test_squeeze_ratio_sets_squeeze_filters(name, sr):
    # Thesis Sec. 5.5.1: s_i,1x1 = SR * e_i in every Fire module.
    squeezes = [f.squeeze.out_channels for f in fires(meta_squeezenet(name, sr=sr))]
    assert squeezes == [sr * expand_filters(i) for i in range(8)]


def test_pct3x3_splits_expand_filters():
    # Thesis Sec. 5.5.1: e_i,3x3 = e_i * pct3x3 and e_i,1x1 = e_i * (1 - pct3x3).
    for i, fire in enumerate(fires(meta_squeezenet(pct3x3=0.25))):
        assert fire.expand3x3.out_channels == 0.25 * expand_filters(i)
        assert fire.expand1x1.out_channels == 0.75 * expand_filters(i)


@pytest.mark.parametrize("pct3x3, missing", [(0.0, "expand3x3"), (1.0, "expand1x1")])
def test_pct3x3_extremes_drop_an_expand_layer(pct3x3, missing):
    torch.manual_seed(0)
    model = build_model("squeezenet1_0", 4, (3, 32, 32), pct3x3=pct3x3)
    assert all(getattr(f, missing) is None for f in fires(model))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_base_incr_freq_set_expand_filters():
    model = meta_squeezenet(base_e=64, incr_e=32, freq=3, sr=0.25)
    assert [f.out_channels for f in fires(model)] == [expand_filters(i, 64, 32, 3) for i in range(8)]
    assert [f.out_channels for f in fires(model)] == [64, 64, 64, 96, 96, 96, 128, 128]


def test_thesis_model_sizes():
    # Thesis Sec. 5.5.2 / Fig. 5.3: SR 0.125 (SqueezeNet) is a 4.8MB model, SR 0.5 13MB, SR 0.75 19MB.
    # The thesis does not say MB or MiB; float32 MiB land within 3% of all three.
    for sr, published_mb in [(0.125, 4.8), (0.5, 13), (0.75, 19)]:
        mib = num_params(meta_squeezenet(sr=sr)) * 4 / 2**20
        assert abs(mib - published_mb) / published_mb < 0.03, (sr, mib)


def test_simple_bypass_adds_no_parameters():
    # Thesis Sec. 5.6 and Table 5.3: simple bypass is "just a wire"; the model stays 4.8MB.
    model = meta_squeezenet(bypass="simple")
    assert num_params(model) == 1_248_424
    bypassed = [m for m in model.modules() if isinstance(m, Bypass)]
    assert len(bypassed) == 4 and all(isinstance(b.path, nn.Identity) for b in bypassed)
    assert [fires(model).index(b.fire) + 2 for b in bypassed] == [3, 5, 7, 9]


def test_simple_bypass_adds_the_input():
    torch.manual_seed(0)
    model = build_model("squeezenet1_0", 4, (3, 32, 32), bypass="simple")
    bypass = next(m for m in model.modules() if isinstance(m, Bypass))
    x = torch.randn(2, 128, 8, 8)
    torch.testing.assert_close(bypass(x), bypass.fire(x) + x)


def test_complex_bypass_adds_1x1_convolutions_where_channels_change():
    # Thesis Sec. 5.6: 1x1 convolution bypasses around fire2, fire4, fire6, fire8 (96->128, 128->256,
    # 256->384, 384->512, with biases): 341,248 parameters. Table 5.3 lists the model as 7.7MB, which these
    # layers do not reproduce (1,589,672 float32 parameters are 6.06 MiB); see polytrain.models.squeezenet.
    model = meta_squeezenet(bypass="complex")
    paths = [m.path for m in model.modules() if isinstance(m, Bypass)]
    assert [isinstance(p, nn.Conv2d) for p in paths] == [True, False] * 4
    extra = sum(c_in * c_out + c_out for c_in, c_out in [(96, 128), (128, 256), (256, 384), (384, 512)])
    assert extra == 341_248
    assert num_params(model) == 1_248_424 + extra


# (metaparameters, regular expression the one-line message matches)
INVALID = [
    ({"bypass": "mixed"}, r"^model squeezenet1_0: bypass must be one of none, simple, complex; got 'mixed'$"),
    ({"sr": 0}, r"^model squeezenet1_0: sr must be a fraction in \(0, 1\]; got 0$"),
    ({"pct3x3": 1.5}, r"^model squeezenet1_0: pct3x3 must be a fraction in \[0, 1\]; got 1.5$"),
    ({"freq": 0}, r"^model squeezenet1_0: freq must be an integer >= 1; got 0$"),
    ({"sr": 0.001}, r"^model squeezenet1_0: sr=0.001 leaves fire2 .* = 0 squeeze filters$"),
    (
        {"freq": 1, "bypass": "simple"},
        r"^model squeezenet1_0: simple bypass around fire3 needs equal input and output channels; "
        r"got 128 -> 256$",
    ),
    (
        {"squeeze_ratio": 0.5},
        r"^model squeezenet1_0 has no metaparameter 'squeeze_ratio'; "
        r"valid: base_e, incr_e, freq, pct3x3, sr, bypass$",
    ),
]


@pytest.mark.parametrize("metaparameters, message", INVALID)
def test_invalid_metaparameters(metaparameters, message):
    with pytest.raises(ValueError, match=message):
        build_model("squeezenet1_0", 1000, (3, 224, 224), **metaparameters)
