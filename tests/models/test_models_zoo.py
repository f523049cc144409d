"""Every registered model builds, runs forward and backward on small inputs, and rejects bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytrain.models import MODELS, build_model
from polytrain.models.common import SMALL_INPUT_PX, window_output
from polytrain.models.recurrent import SequenceClassifier

SEQUENCE_MODELS = {"lstm", "gru"}
ANY_SHAPE_MODELS = {"mlp"}
TOKEN_MODELS = {"gpt"}  # token ids in, logits per position out: tests/models/test_transformer.py
IMAGE_MODELS = sorted(set(MODELS.names()) - SEQUENCE_MODELS - ANY_SHAPE_MODELS - TOKEN_MODELS)
SMALL_IMAGES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


def cases() -> list:
    """(model, sample shape) for every registered model, on the sample shapes it accepts."""
    shapes = {name: SMALL_IMAGES for name in IMAGE_MODELS}
    shapes.update({name: [(40,), (3, 20), (1, 28, 28)] for name in SEQUENCE_MODELS})
    shapes.update({name: [*SMALL_IMAGES, (40,)] for name in ANY_SHAPE_MODELS})
    return [
        pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
        for name in sorted(shapes)
        for shape in shapes[name]
    ]


@pytest.mark.parametrize("name, in_shape", cases())
def test_forward_backward_on_small_input(name, in_shape):
    torch.manual_seed(0)
    model = build_model(name, 3, in_shape)
    logits = model(torch.randn(2, *in_shape))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"


@pytest.mark.parametrize("name", sorted(set(MODELS.names()) - TOKEN_MODELS))
def test_single_class_and_determinism(name):
    in_shape = (40,) if name in SEQUENCE_MODELS else (1, 8, 8)
    torch.manual_seed(1)
    first = build_model(name, 1, in_shape)
    torch.manual_seed(1)
    second = build_model(name, 1, in_shape)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    first.eval()
    assert first(torch.randn(2, *in_shape)).shape == (2, 1)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_rejects_non_image_shape(name):
    with pytest.raises(ValueError) as error:
        build_model(name, 10, (40,))
    assert str(error.value) == f"model {name} needs image samples (C, H, W); got shape (40,)"


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_sequence_model_rejects_4d_shape(name):
    with pytest.raises(
        ValueError, match=rf"^model {name} needs samples shaped \(L,\), \(C, L\) or \(C, H, W\);"
    ):
        build_model(name, 10, (1, 2, 3, 4))


# (model, num_classes, in_shape, metaparameters, regular expression the one-line message matches)
BAD_ARGUMENTS = [
    ("resnet18", 10, (3, 32, 32), {"depth": 1}, r"^model resnet18 has no metaparameter 'depth'; valid: none"),
    (
        "lstm", 10, (40,), {"hidden": 8},
        r"^model lstm has no metaparameter 'hidden'; valid: hidden_size, num_layers$",
    ),
    ("lenet5", 0, (1, 28, 28), {}, r"^model lenet5 needs num_classes >= 1; got 0$"),
    (
        "lenet5", 10, (1, 0, 28), {},
        r"^model lenet5 needs a sample shape of positive integers; got \(1, 0, 28\)$",
    ),
    ("resnet20", 10, (3, 32, 32), {"shortcut": "C"}, r"^model resnet20: shortcut must be one of A, B; got"),
    ("densenet_cifar", 10, (3, 32, 32), {"depth": 50}, r"^model densenet_cifar: depth must be 6n \+ 4"),
    ("mlp", 10, (40,), {"hidden": "512"}, r"^model mlp: hidden must be a sequence of positive widths"),
    ("gru", 10, (40,), {"num_layers": 0}, r"^model gru: num_layers must be an integer >= 1; got 0$"),
]  # fmt: skip


@pytest.mark.parametrize("name, num_classes, in_shape, metaparameters, message", BAD_ARGUMENTS)
def test_bad_arguments_raise_one_line_value_errors(name, num_classes, in_shape, metaparameters, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, num_classes, in_shape, **metaparameters)


def test_mlp_hidden_widths():
    model = build_model("mlp", 4, (40,), hidden=(16, 8, 6))
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [16, 8, 6, 4]
    logistic = build_model("mlp", 4, (40,), hidden=())
    assert [m.out_features for m in logistic if isinstance(m, nn.Linear)] == [4]


@pytest.mark.parametrize(
    "in_shape, steps, features", [((40,), 40, 1), ((3, 20), 20, 3), ((1, 28, 28), 28, 28), ((2, 5, 7), 5, 14)]
)
def test_sequence_layout(in_shape, steps, features):
    model = build_model("lstm", 10, in_shape, hidden_size=8, num_layers=2)
    x = torch.randn(2, *in_shape)
    sequence = model.to_steps(x)
    assert sequence.shape == (2, steps, features)
    assert model.rnn.input_size == features and model.rnn.num_layers == 2
    if len(in_shape) == 3:  # row h of the image is step h: x[n, c, h, w] -> step[n, h, c * W + w]
        last_channel = in_shape[0] - 1
        assert torch.equal(sequence[1, 3, last_channel * in_shape[2] + 2], x[1, last_channel, 3, 2])


def test_sequence_classifier_uses_last_hidden_state_of_top_layer():
    model = build_model("gru", 5, (12,), hidden_size=6, num_layers=2)
    assert isinstance(model, SequenceClassifier)
    x = torch.randn(3, 12)
    outputs, _ = model.rnn(x.unsqueeze(-1))
    torch.testing.assert_close(model(x), model.fc(outputs[:, -1]))


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_window_output_matches_pytorch_pooling(ceil_mode):
    for size in range(1, 12):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for padding in range(kernel // 2 + 1):
                    expected = window_output(size, kernel, stride, padding, ceil_mode)
                    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
                    if expected < 1:
                        with pytest.raises(RuntimeError):
                            pool(torch.zeros(1, 1, size, size))
                    else:
                        assert pool(torch.zeros(1, 1, size, size)).shape[-1] == expected


def test_small_input_rule_swaps_the_stem():
    small = build_model("resnet18", 10, (3, 32, 32))
    assert (small.conv1.kernel_size, small.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)
    with torch.device("meta"):
        large = build_model("resnet18", 10, (3, SMALL_INPUT_PX, SMALL_INPUT_PX))
    assert (large.conv1.kernel_size, large.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("side, num_pools", [(32, 5), (28, 4), (8, 3)])
def test_small_input_rule_skips_pools_below_one_pixel(side, num_pools):
    # VGG halves the map five times: 28 -> 14 -> 7 -> 3 -> 1, a fifth pool would leave 0x0.
    with torch.device("meta"):
        model = build_model("vgg16", 10, (1, side, side))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == num_pools


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("side", [SMALL_INPUT_PX - 1, SMALL_INPUT_PX])
def test_image_models_on_both_sides_of_the_small_input_threshold(name, side):
    # At SMALL_INPUT_PX the published stems and pool schedules must still leave at least 1x1 maps.
    with torch.device("meta"):
        model = build_model(name, 10, (3, side, side))
        assert model(torch.empty(2, 3, side, side)).shape == (2, 10)
