"""im2col + GEMM: lower the input to a matrix of patches and multiply by the weight matrix."""

from __future__ import annotations

import torch

from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.ops.conv.base import ConvAlgorithm, window
from polytrain.cost.geometry import ConvGeometry


def im2col(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Every receptive field of the (already padded) input as a column: (N, C, H, W) -> (C K_h K_w, N H' W').

    Rows are ordered (c, u, v), matching `weight.reshape(O, -1)`; columns (n, i, j), so that the whole
    batch is one GEMM whose operands need no further transposing copies (torch.matmul of a matrix with
    a batch of (C K_h K_w, H' W') matrices transposes them into one, measured 19 ms of 40 ms at
    32x16x32x32). Built as a strided view of x (windows along H and W, every d-th pixel of each for the
    dilation) and materialised by one copy.
    """
    (k_h, k_w), (s_h, s_w), (d_h, d_w) = geometry.kernel, geometry.stride, geometry.dilation
    span_h, span_w = geometry.span()
    windows = x.unfold(2, span_h, s_h).unfold(3, span_w, s_w)[..., ::d_h, ::d_w]  # (N, C, H', W', K_h, K_w)
    return windows.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * k_h * k_w, -1)


def col2im(columns: torch.Tensor, n: int, geometry: ConvGeometry, in_hw: tuple[int, int],
           out_hw: tuple[int, int]) -> torch.Tensor:
    """The adjoint of `im2col`, padding dropped: (C K_h K_w, N H' W') -> (N, C, H, W).

    Each column entry is added back to the pixel it was copied from, so overlapping patches sum (what
    `F.fold` computes). One strided add per kernel offset.
    """
    (k_h, k_w), (p_h, p_w), (h, w) = geometry.kernel, geometry.padding, in_hw
    patches = columns.view(-1, k_h, k_w, n, *out_hw)  # (C, K_h, K_w, N, H', W')
    image = columns.new_zeros(n, patches.shape[0], *geometry.padded_hw(in_hw))
    for u in range(k_h):
        for v in range(k_w):
            window(image, u, v, geometry.stride, geometry.dilation, out_hw).add_(patches[:, u, v].transpose(0, 1))
    return image[:, :, p_h: p_h + h, p_w: p_w + w]


@CONV_ALGORITHMS.register("im2col")
class Im2col(ConvAlgorithm):
    """Convolution as one matrix multiplication over unrolled patches (Chellapilla et al. 2006; Caffe).

    The patch matrix `im2col(x)` is (N, C K_h K_w, H' W'); the output is the weight matrix (O, C K_h K_w)
    times it. The backward is the textbook pair: the input gradient is col2im of W^T dY, the weight
    gradient is dY times the patch matrix transposed (recomputed rather than kept from the forward, as
    Caffe does, to hold K_h K_w times less memory between the passes).
    """

    name = "im2col"

    def correlate(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) x (O, C, K_h, K_w) -> (N, O, H', W')."""
        geometry = ConvGeometry(tuple(weight.shape[-2:]), stride, (0, 0), dilation)
        out_hw = geometry.output_hw(tuple(x.shape[-2:]))
        y = weight.reshape(weight.shape[0], -1) @ im2col(x, geometry)  # (O, N H' W')
        return y.view(weight.shape[0], x.shape[0], *out_hw).transpose(0, 1).contiguous()

    def grad_input(self, grad_y: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                   in_hw: tuple[int, int]) -> torch.Tensor:
        """col2im(W^T dY): each patch's gradient added back where the patch came from."""
        grad_columns = weight.reshape(weight.shape[0], -1).t() @ _output_matrix(grad_y)  # (C K_h K_w, N H' W')
        return col2im(grad_columns, grad_y.shape[0], geometry, in_hw, tuple(grad_y.shape[-2:]))

    def grad_weight(self, x_padded: torch.Tensor, grad_y: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
        """dY (O, N H' W') times the patch matrix transposed: the sum over the batch is in the GEMM."""
        grad = _output_matrix(grad_y) @ im2col(x_padded, geometry).t()  # (O, C K_h K_w)
        return grad.view(grad_y.shape[1], x_padded.shape[1], *geometry.kernel)


def _output_matrix(grad_y: torch.Tensor) -> torch.Tensor:
    """(N, O, H', W') -> (O, N H' W'), the layout of the forward's GEMM output."""
    return grad_y.transpose(0, 1).reshape(grad_y.shape[1], -1)
