"""Tracing and formulas: what becomes a row, what is not counted, and the per-layer arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polytrain.cost import model_cost, registered_model_cost
from polytrain.cost.layers import adaptive_window_counts
from polytrain.models import build_model
from polytrain.cost.workdepth import conv_work_depth


def kinds(cost) -> list[str]:
    return [row.kind for row in cost.layers]


def test_additions_and_concatenations_in_forward_code_are_rows():
    """Residual sums, shortcut padding, Fire and Inception concatenations and dense-block concatenations
    are written in forward(), not as modules; module hooks alone would miss them."""
    assert kinds(registered_model_cost("resnet20")).count("add") == 9
    assert kinds(registered_model_cost("resnet20")).count("pad") == 2  # option-A shortcuts at 16->32, 32->64
    assert kinds(registered_model_cost("googlenet")).count("cat") == 9
    assert kinds(registered_model_cost("densenet_cifar")).count("cat") == 48  # one per dense layer
    bypassed = registered_model_cost("squeezenet1_0", model_args={"bypass": "simple"})
    assert kinds(bypassed).count("add") == 4 and kinds(bypassed).count("cat") == 8
    assert not any(registered_model_cost(name).total.not_counted for name in ("resnet20", "googlenet"))


class Scale(nn.Module):
    """A parameterised layer with no cost formula."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Sine(nn.Module):
    """A parameter-free layer whose function has no formula."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


def test_layers_without_formula_are_listed_not_counted_never_zero():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), Sine(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    cost = model_cost(model, (3, 8, 8), 4)
    rows = {row.name: row for row in cost.layers}
    assert not rows["1"].counted and rows["1"].params == 8 and "Scale" in rows["1"].note
    assert not rows["2.sin"].counted and "sin" in rows["2.sin"].note
    assert cost.total.not_counted == ("1", "2.sin")
    assert cost.total.params == sum(p.numel() for p in model.parameters())
    assert rows["0"].counted and rows["4"].counted


def test_views_make_no_rows_and_copies_make_zero_arithmetic_rows():
    """The LSTM reads a (C, H, W) image as H steps of C*W features: permute (a view), then flatten, which
    must copy the permuted tensor. The (L,) signal of MNIST-1D only needs an unsqueeze (a view)."""
    image = registered_model_cost("lstm", input_shape=(3, 8, 8))
    assert kinds(image) == ["copy", "LSTM", "Linear"]
    copy = image.layers[0]
    assert copy.flops_forward == 0 and copy.activation_bytes == 3 * 8 * 8 * 4
    assert kinds(registered_model_cost("lstm")) == ["LSTM", "Linear"]


def test_model_is_left_as_it_was():
    model = build_model("resnet20", 10, (3, 32, 32)).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model_cost(model, (3, 32, 32), 4)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before[name], t) and t.device.type == "cpu" for name, t in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_arithmetic_is_per_sample_and_bytes_scale_with_batch():
    one, four = registered_model_cost("resnet18", batch_size=1), registered_model_cost("resnet18", batch_size=4)
    assert (one.total.macs_forward, one.total.flops_backward) == (four.total.macs_forward, four.total.flops_backward)
    assert four.total.activation_bytes == 4 * one.total.activation_bytes
    assert four.total.work == 4 * one.total.work


def test_dtype_sets_the_bytes_per_element():
    single = registered_model_cost("resnet20", batch_size=2)
    half = registered_model_cost("resnet20", batch_size=2, dtype=torch.float16)
    assert half.total.weight_bytes * 2 == single.total.weight_bytes
    assert half.total.activation_bytes * 2 == single.total.activation_bytes
    assert half.total.macs_forward == single.total.macs_forward


@pytest.mark.parametrize("groups, stride, padding, dilation", [(1, 1, 1, 1), (4, 2, 1, 1), (2, 1, 2, 2), (8, 3, 0, 1)])
def test_convolution_with_groups_stride_padding_and_dilation(groups, stride, padding, dilation):
    """A convolution after another one (so its input needs a gradient) against FlopCounterMode on real
    tensors, Iandola's eq. 4.3 with C_in / groups, and the direct algorithm's depth from polytrain.ops.

    FlopCounterMode counts a grouped convolution's weight gradient `groups` times over: its
    conv_backward_flop treats the gradient as one convolution over all C_in channels ("details involving
    ... groups ... I skip", torch/utils/flop_counter.py), while each group's C_out / groups filters only
    see C_in / groups channels. No zoo model has grouped convolutions.
    """
    conv = nn.Conv2d(8, 16, 3, stride, padding, dilation, groups)
    x = torch.randn(2, 8, 13, 11, requires_grad=True)
    flops = FlopCounterMode(display=False)
    with flops:
        conv(x).sum().backward()
    row = model_cost(nn.Sequential(nn.Conv2d(8, 8, 1), conv), (8, 13, 11), 2).layers[1]
    assert row.macs_backward == 2 * row.macs_forward  # input and weight gradients, as many MACs each
    weight_gradient_overcount = (groups - 1) * row.macs_forward
    assert flops.get_total_flops() == 2 * 2 * (row.macs_forward + row.macs_backward + weight_gradient_overcount)
    out_h, out_w = row.output_shape[2:]
    assert row.macs_forward == 16 * out_h * out_w * (8 // groups) * 9
    work, reduction_depth = conv_work_depth("direct", 2, 8, 16, 13, 11, 3, 3, stride, padding, dilation, groups)
    assert work == 2 * 2 * row.macs_forward  # polytrain.ops counts the products alone
    assert row.depth == reduction_depth + 2  # the product level and the bias addition
    assert row.work == 2 * (2 * row.macs_forward + 16 * out_h * out_w)  # batch 2, bias additions included


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 0, True),
                                                                (3, 1, 1, True)])
def test_pooling_windows_are_counted_element_by_element(kernel, stride, padding, ceil_mode):
    """Average pooling with divisor 1 and padding excluded sums ones over each window's in-bounds elements:
    an independent count of what max and average pooling read, border windows of ceil_mode included."""
    x = torch.ones(1, 1, 13, 10)
    elements = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad=False, divisor_override=1)
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    row = model_cost(pool, (1, 13, 10)).layers[0]
    assert row.flops_forward == int(elements.sum())
    average = model_cost(nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode), (1, 13, 10)).layers[0]
    assert average.flops_forward == 2 * int(elements.sum())


def test_adaptive_pooling_windows_follow_pytorch():
    # [floor(o * n / k), ceil((o + 1) * n / k)): 7 -> 3 windows [0, 3), [2, 5), [4, 7); 10 -> 4 of 3.
    assert adaptive_window_counts(7, 3) == [3, 3, 3]
    assert adaptive_window_counts(10, 4) == [3, 3, 3, 3]
    assert adaptive_window_counts(6, 6) == [1] * 6


def test_depth_is_the_longest_path_and_parallelism_is_work_over_depth():
    """Inception's four branches run side by side: the network is shallower than the sum of its layers.
    LeNet-5 is a chain: its depth is the sum."""
    googlenet = registered_model_cost("googlenet")
    assert googlenet.total.depth < sum(row.depth for row in googlenet.layers)
    lenet = registered_model_cost("lenet5")
    assert lenet.total.depth == sum(row.depth for row in lenet.layers)
    assert math.isclose(googlenet.total.average_parallelism, googlenet.total.work / googlenet.total.depth)


def test_a_tensor_feeding_two_layers_has_its_gradients_summed():
    """A residual block's input feeds its first convolution and the shortcut addition: backward adds the
    two gradients, one FLOP per element, counted at the layer that produced the input (the stem's ReLU)."""
    rows = registered_model_cost("resnet20").layers
    stem_relu = rows[2]
    assert stem_relu.name == "relu"
    assert stem_relu.flops_backward == 2 * 16 * 32 * 32  # the ReLU mask and the sum of two gradients
