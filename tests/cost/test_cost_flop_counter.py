"""The cost model against `torch.utils.flop_counter.FlopCounterMode`, forward and backward, on every zoo model.

FlopCounterMode counts only matrix products and convolutions (2 FLOPs per multiply-accumulate) of the ops
autograd actually runs, so it must agree exactly with 2 x our MACs, forward and backward. Our FLOPs count
more, and legitimately: bias additions (FlopCounterMode counts addmm and convolution as their products
only), batch norm, activations, pooling, residual additions, dropout, the recurrent cells' elementwise
gates, and the gradient sums where a tensor feeds several layers; FlopCounterMode has no formula for any
of those ops.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polytrain.cost import NATURAL_INPUTS, model_cost, registered_model_cost
from polytrain.cost.model import UNCOSTED
from polytrain.models import MODELS, build_model

BATCH = 2


def counted_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FlopCounterMode's (forward, backward) FLOPs of one training step of `model` on `x`."""
    forward = FlopCounterMode(display=False)
    with forward:
        y = model(x)
    backward = FlopCounterMode(display=False)
    with backward:
        y.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("name", [name for name in MODELS.names() if name not in UNCOSTED])
def test_macs_agree_with_flop_counter_forward_and_backward(name):
    """Meta tensors: shapes only, and every op still dispatched (the LSTM decomposes into matrix products)."""
    shape, classes = NATURAL_INPUTS[name]
    with torch.device("meta"):
        model = build_model(name, classes, shape)
    cost = registered_model_cost(name, batch_size=BATCH)
    forward, backward = counted_flops(model, torch.empty(BATCH, *shape, device="meta"))
    assert forward == 2 * BATCH * cost.total.macs_forward
    assert backward == 2 * BATCH * cost.total.macs_backward


def test_first_layer_has_no_input_gradient_as_in_autograd():
    """The data needs no gradient, so autograd skips the first convolution's input gradient (FlopCounterMode
    sees convolution_backward with output_mask[0] False); later layers compute both gradients."""
    rows = [row for row in registered_model_cost("lenet5").layers if row.kind == "Conv2d"]
    assert rows[0].macs_backward == rows[0].macs_forward
    assert rows[1].macs_backward == 2 * rows[1].macs_forward


def test_bias_additions_are_flops_that_flop_counter_leaves_out():
    fc = nn.Linear(300, 100)
    forward, backward = counted_flops(fc, torch.randn(BATCH, 300))
    row = model_cost(fc, (300,), BATCH).layers[0]
    assert forward == BATCH * 2 * row.macs_forward  # the product, 2 * B * in * out
    assert row.flops_forward == 2 * row.macs_forward + 100  # plus one bias addition per output
    assert backward == BATCH * 2 * row.macs_backward
    assert row.flops_backward == 2 * row.macs_backward + 100  # plus the bias gradient's batch sum


def test_elementwise_layers_are_counted_where_flop_counter_sees_nothing():
    """Batch norm, ReLU, pooling and residual additions: FlopCounterMode counts them as 0; we count them
    by their conventions, and the difference is exactly the sum of those rows."""
    cost = registered_model_cost("resnet20", batch_size=BATCH)
    elementwise = {"BatchNorm2d", "ReLU", "relu", "add", "AdaptiveAvgPool2d"}
    rows = cost.layers
    assert {row.kind for row in rows if row.macs_forward == 0 and row.flops_forward > 0} == elementwise
    bias_free_products = sum(2 * row.macs_forward for row in rows)
    others = sum(row.flops_forward for row in rows if row.kind in elementwise)
    fc_bias = next(row for row in rows if row.kind == "Linear").output_shape[-1]
    assert cost.total.flops_forward == bias_free_products + others + fc_bias


def test_flop_counter_misses_the_cpu_lstm_kernel():
    """On real CPU tensors a float32 nn.LSTM runs oneDNN's fused kernel (aten.mkldnn_rnn_layer), for which
    FlopCounterMode has no formula: it counts only the classifier. On the meta device the same LSTM
    decomposes into matrix products and agrees with us (test above)."""
    shape, classes = NATURAL_INPUTS["lstm"]
    model = build_model("lstm", classes, shape)
    forward, _ = counted_flops(model, torch.randn(BATCH, *shape))
    rows = {row.kind: row for row in registered_model_cost("lstm", batch_size=BATCH).layers}
    assert forward == 2 * BATCH * rows["Linear"].macs_forward
    assert rows["LSTM"].macs_forward > 0
