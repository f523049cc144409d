"""Conformance battery: every registered convolution algorithm equals torch.nn.functional.conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.ops.conv import CONV_ALGORITHMS, conv2d
from polytrain.cost.geometry import ConvGeometry
from polytrain.ops.gradcheck import relative_error

# (N, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups): strides 1 and 2, padding 0-2,
# channels 1/3/8, batches 1/2/5, kernels 1/3/5, non-square inputs and kernels, dilation, groups.
CASES = [
    (1, 1, 1, (5, 5), 1, 1, 0, 1, 1),
    (2, 3, 8, (7, 9), 3, 1, 1, 1, 1),
    (5, 8, 3, (6, 5), 3, 1, 0, 1, 1),
    (2, 3, 3, (8, 6), 3, 1, 2, 1, 1),
    (2, 3, 8, (13, 14), 3, 1, 1, 1, 1),
    (2, 3, 8, (9, 7), 3, 2, 1, 1, 1),
    (1, 8, 8, (10, 11), 5, 1, 2, 1, 1),
    (2, 3, 1, (11, 8), 5, 2, 0, 1, 1),
    (1, 3, 8, (9, 9), 1, 2, 0, 1, 1),
    (2, 3, 3, (9, 10), (3, 5), (2, 1), (1, 2), 1, 1),
    (2, 4, 6, (9, 8), 3, 1, 2, 2, 1),
    (2, 8, 8, (7, 6), 3, 1, 1, 1, 2),
    (1, 8, 8, (6, 7), 3, 2, 1, 1, 8),
]

WINOGRAD_CONSTRAINT = r"Winograd F\(m x m, 3 x 3\) needs a 3x3 kernel with stride 1 and dilation 1"

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def case_id(case) -> str:
    n, c_in, c_out, hw, k, s, p, d, g = case
    return f"n{n}-c{c_in}-o{c_out}-{hw[0]}x{hw[1]}-k{k}-s{s}-p{p}-d{d}-g{g}"


def supported(algorithm: str, case) -> bool:
    _, _, _, _, k, s, p, d, _ = case
    return algorithm not in ("winograd2", "winograd4") or ConvGeometry.of(k, s, p, d).winograd_violation() is None


def operands(case, dtype):
    n, c_in, c_out, hw, k, _, _, _, g = case
    generator = torch.Generator().manual_seed(0)
    kernel = (k, k) if isinstance(k, int) else k
    tensors = (torch.randn(n, c_in, *hw, generator=generator, dtype=dtype),
               torch.randn(c_out, c_in // g, *kernel, generator=generator, dtype=dtype),
               torch.randn(c_out, generator=generator, dtype=dtype))
    return [t.requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS.names())
def test_forward_and_backward_equal_torch(algorithm, case, dtype):
    x, weight, bias = operands(case, dtype)
    _, _, _, _, _, stride, padding, dilation, groups = case
    window = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if not supported(algorithm, case):
        with pytest.raises(ValueError, match=WINOGRAD_CONSTRAINT):
            conv2d(x, weight, bias, algorithm=algorithm, **window)
        return
    ours = conv2d(x, weight, bias, algorithm=algorithm, **window)
    reference = F.conv2d(x, weight, bias, **window)
    grad_y = torch.randn(reference.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(ours, (x, weight, bias), grad_y)
    reference_grads = torch.autograd.grad(reference, (x, weight, bias), grad_y)
    assert ours.shape == reference.shape
    for label, got, want in zip(("output", "grad input", "grad weight", "grad bias"),
                                (ours, *grads), (reference, *reference_grads)):
        assert relative_error(got, want) < TOLERANCE[dtype], label


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "fft"])
def test_general_algorithms_take_every_window(algorithm):
    assert all(supported(algorithm, case) for case in CASES)
    x, weight = torch.randn(1, 4, 9, 9), torch.randn(4, 2, 3, 3)
    window = dict(stride=2, padding=2, dilation=2, groups=2)
    assert relative_error(conv2d(x, weight, algorithm=algorithm, **window), F.conv2d(x, weight, **window)) < 1e-4
