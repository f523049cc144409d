"""The gradient checker, and every custom operator passing it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.ops.conv import CONV_ALGORITHMS, conv2d
from polytrain.ops.gradcheck import gradcheck, relative_error

# Central differences with eps = 1e-6 in float64 agree with an exact gradient to ~1e-9 relative.
PASS = 1e-6


def small_operands(c_in=2, c_out=3, hw=(5, 6), kernel=3, groups=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(2, c_in, *hw, generator=generator, dtype=torch.float64),
               torch.randn(c_out, c_in // groups, kernel, kernel, generator=generator, dtype=torch.float64),
               torch.randn(c_out, generator=generator, dtype=torch.float64))
    return [t.requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS.names())
def test_every_algorithm_passes_the_gradient_checker(algorithm):
    errors = gradcheck(lambda x, w, b: conv2d(x, w, b, padding=1, algorithm=algorithm), small_operands())
    assert len(errors) == 3 and max(errors) < PASS


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "fft"])
def test_strided_dilated_grouped_convolutions_pass_the_gradient_checker(algorithm):
    def conv(x, w, b):
        return conv2d(x, w, b, stride=2, padding=2, dilation=2, groups=2, algorithm=algorithm)

    assert max(gradcheck(conv, small_operands(c_in=4, c_out=4, hw=(7, 6), groups=2))) < PASS


class WrongBackward(torch.autograd.Function):
    """x^2 with the gradient of x^3 in its backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x * x


def test_a_wrong_backward_fails():
    x = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(WrongBackward.apply, [x])[0] > 0.1


def test_errors_are_per_input_and_skip_inputs_without_grad():
    x, w, b = small_operands()
    b.requires_grad_(False)
    errors = gradcheck(lambda x, w, b: conv2d(x, w, b, algorithm="im2col"), [x, w, b])
    assert len(errors) == 2 and max(errors) < PASS


def test_agrees_with_torch_gradcheck_on_torchs_convolution():
    operands = small_operands(c_in=1, c_out=2, hw=(4, 4))
    assert max(gradcheck(F.conv2d, operands)) < PASS
    assert torch.autograd.gradcheck(F.conv2d, operands, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_needs_float64_and_some_input_with_grad():
    with pytest.raises(ValueError, match="needs float64 inputs; input 0 is torch.float32"):
        gradcheck(torch.sin, [torch.randn(3, requires_grad=True)])
    with pytest.raises(ValueError, match="at least one input with requires_grad"):
        gradcheck(torch.sin, [torch.randn(3, dtype=torch.float64)])


def test_relative_error_is_scaled_by_the_larger_gradient():
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.2])) == pytest.approx(0.2 / 2.2)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
