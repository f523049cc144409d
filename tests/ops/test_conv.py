"""The convolution entry point: errors, independence from torch's convolution, Winograd's matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.ops.conv import CONV_ALGORITHMS, conv2d, supports
from polytrain.ops.conv.winograd import F2_3, F4_3
from polytrain.cost.geometry import WINOGRAD_TILE_M, ConvGeometry
from polytrain.cost.workdepth import ALGORITHMS


def test_registry_holds_the_five_algorithms_that_workdepth_knows():
    assert CONV_ALGORITHMS.names() == sorted(ALGORITHMS) == ["direct", "fft", "im2col", "winograd2", "winograd4"]


def test_unknown_algorithm_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown convolution algorithm 'winograd3'; available: direct, fft"):
        conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), algorithm="winograd3")


@pytest.mark.parametrize("x_shape, w_shape, window, message", [
    ((1, 3, 8, 8), (4, 2, 3, 3), {}, "input has 3 channels; the weight expects 2 x 1 groups = 2"),
    ((1, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}, "3 output channels are not divisible by 2 groups"),
    ((1, 1, 2, 2), (1, 1, 3, 3), {}, "does not fit a (2, 2) input"),
    ((1, 1, 8, 8), (1, 1, 3, 3), {"stride": 0}, "stride must be an integer >= 1"),
    ((1, 1, 8, 8), (1, 1, 3, 3), {"padding": -1}, "padding must be an integer >= 0"),
    ((1, 8, 8), (1, 1, 3, 3), {}, "conv2d needs a 4-D input"),
])
def test_bad_operands_raise_one_line_errors(x_shape, w_shape, window, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        conv2d(torch.randn(*x_shape), torch.randn(*w_shape), **window)


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS.names())
def test_forward_and_backward_never_call_torchs_convolution(algorithm, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch's convolution was called")

    for module, name in ((F, "conv2d"), (F, "conv_transpose2d"), (torch, "conv2d"), (torch, "conv_transpose2d"),
                         (torch, "convolution")):
        monkeypatch.setattr(module, name, forbidden)
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = conv2d(x, weight, padding=1, algorithm=algorithm)
    assert type(y.grad_fn).__name__ == "ConvFunctionBackward"
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None


def test_supports_reports_each_algorithms_constraints():
    strided = ConvGeometry.of(3, stride=2, padding=1)
    assert [name for name in CONV_ALGORITHMS if supports(name, strided)] == ["direct", "fft", "im2col"]
    assert all(supports(name, ConvGeometry.of(3, padding=1)) for name in CONV_ALGORITHMS)


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS.names())
def test_gradients_flow_only_to_inputs_that_require_them(algorithm):
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3, requires_grad=True)
    conv2d(x, weight, algorithm=algorithm).sum().backward()
    assert x.grad is None
    reference = weight.detach().clone().requires_grad_(True)
    F.conv2d(x, reference).sum().backward()
    assert torch.allclose(weight.grad, reference.grad, atol=1e-4)


@pytest.mark.parametrize("filter_", [F2_3, F4_3], ids=["F(2,3)", "F(4,3)"])
def test_textbook_matrices_compute_the_one_dimensional_correlation(filter_):
    # y = A^T [(G g) * (B^T d)] is y_i = sum_k d_{i+k} g_k exactly when
    # sum_t A^T[i, t] G[t, k] B^T[t, j] = [j == i + k] for every i < m, k < r, j < alpha.
    BT, G, AT = (torch.tensor(matrix, dtype=torch.float64) for matrix in (filter_.BT, filter_.G, filter_.AT))
    trilinear = torch.einsum("it,tk,tj->ikj", AT, G, BT)
    m, r, alpha = filter_.m, filter_.r, filter_.alpha
    expected = torch.zeros(m, r, alpha, dtype=torch.float64)
    for i in range(m):
        for k in range(r):
            expected[i, k, i + k] = 1
    assert torch.allclose(trilinear, expected, atol=1e-14)
    assert (BT.shape, G.shape, AT.shape) == ((alpha, alpha), (alpha, r), (m, alpha))
    assert WINOGRAD_TILE_M[f"winograd{m}"] == m
