"""2-D convolution computed four ways, forward and backward: direct, im2col + GEMM, FFT and Winograd.

`conv2d(x, weight, ..., algorithm=NAME)` equals `torch.nn.functional.conv2d` and is differentiable; its
backward runs on the same algorithm (never on torch's convolution). The algorithms are registered in
`CONV_ALGORITHMS` by name: `direct`, `im2col`, `fft`, `winograd2` (F(2x2,3x3)) and `winograd4`
(F(4x4,3x3)).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from polytrain.ops.conv.base import ConvAlgorithm, pad_input
from polytrain.cost.geometry import ConvGeometry
from polytrain.registry import Registry

CONV_ALGORITHMS: Registry = Registry("convolution algorithm")


def _per_group(groups: int, out_dim: int, compute, *operands: tuple[torch.Tensor, int]) -> torch.Tensor:
    """Applies `compute` to each channel group and concatenates the results along `out_dim`.

    Args:
        groups: number of groups.
        out_dim: the dim of the results that the groups tile.
        compute: called with one slice of each operand.
        operands: (tensor, dim) pairs; each tensor is split into `groups` equal slices along its dim.
    """
    if groups == 1:
        return compute(*(t for t, _ in operands))
    slices = zip(*(t.chunk(groups, dim) for t, dim in operands))
    return torch.cat([compute(*parts) for parts in slices], dim=out_dim)


class ConvFunction(torch.autograd.Function):
    """Convolution whose forward and both gradients are computed by one `ConvAlgorithm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                algorithm: ConvAlgorithm, geometry: ConvGeometry, groups: int) -> torch.Tensor:
        """(N, C, H, W), (O, C / groups, K_h, K_w), (O,) or None -> (N, O, H', W')."""
        ctx.save_for_backward(x, weight)
        ctx.algorithm, ctx.geometry, ctx.groups = algorithm, geometry, groups

        def correlate(x_group, weight_group):
            return algorithm.correlate(x_group, weight_group, geometry.stride, geometry.dilation)

        y = _per_group(groups, 1, correlate, (pad_input(x, geometry), 1), (weight, 0))
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        """Gradients of x, weight and bias (None where not needed); the other arguments get None."""
        x, weight = ctx.saved_tensors
        algorithm, geometry, groups = ctx.algorithm, ctx.geometry, ctx.groups
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = _per_group(
                groups, 1, lambda g, w: algorithm.grad_input(g, w, geometry, tuple(x.shape[-2:])),
                (grad_y, 1), (weight, 0))
        if need_weight:
            grad_weight = _per_group(
                groups, 0, lambda g, xg: algorithm.grad_weight(xg, g, geometry),
                (grad_y, 1), (pad_input(x, geometry), 1))
        if need_bias:
            grad_bias = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
                    groups: int) -> None:
    """Raises a one-line ValueError, with the arithmetic, for operands torch's conv2d would reject."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d needs a 4-D input (N, C, H, W) and weight (O, C/groups, K_h, K_w); got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} output channels are not divisible by {groups} groups")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"input has {x.shape[1]} channels; the weight expects {weight.shape[1]} x {groups} "
                         f"groups = {weight.shape[1] * groups}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    if min(geometry.output_hw(tuple(x.shape[-2:]))) < 1:
        raise ValueError(f"a {geometry.span()} kernel (dilated) does not fit a {tuple(x.shape[-2:])} input "
                         f"padded by {geometry.padding}")


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1, algorithm: str = "im2col") -> torch.Tensor:
    """`torch.nn.functional.conv2d` computed by the registered convolution `algorithm`, forward and backward.

    Args:
        x: (N, C, H, W).
        weight: (O, C / groups, K_h, K_w).
        bias: (O,) or None.
        stride, padding, dilation: an int or an (H, W) pair, as for torch (padding is zeros on both sides).
        groups: channel groups.
        algorithm: a name in `CONV_ALGORITHMS`.

    Returns:
        (N, O, H', W').

    Raises:
        ValueError: for an unknown algorithm, operands that do not fit together, or a window the algorithm
            cannot compute (Winograd: only 3x3 kernels at stride 1 and dilation 1).
    """
    geometry = ConvGeometry.of(tuple(weight.shape[-2:]), stride, padding, dilation)
    _check_operands(x, weight, bias, geometry, groups)
    method = CONV_ALGORITHMS.get(algorithm)()
    method.check(geometry)
    return ConvFunction.apply(x, weight, bias, method, geometry, groups)


def supports(algorithm: str, geometry: ConvGeometry) -> bool:
    """Whether the registered `algorithm` can compute a convolution with this window."""
    try:
        CONV_ALGORITHMS.get(algorithm)().check(geometry)
    except ValueError:
        return False
    return True


# Imported last, once CONV_ALGORITHMS exists, so that each algorithm's registration runs on import.
from polytrain.ops.conv import direct, fft, im2col, winograd  # noqa: E402,F401
