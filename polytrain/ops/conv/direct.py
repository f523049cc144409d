"""Direct convolution: the defining sum, looped over kernel offsets."""

from __future__ import annotations

import torch

from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.ops.conv.base import ConvAlgorithm, window
from polytrain.cost.geometry import ConvGeometry


@CONV_ALGORITHMS.register("direct")
class Direct(ConvAlgorithm):
    """The seven nested loops of the definition (n, o, c, i, j, u, v), with all but u, v vectorised.

    For each kernel offset (u, v), the shifted input window times w[:, :, u, v] is accumulated over the
    input channels into every output pixel at once. Both gradients loop over the same offsets: the input
    gradient is the forward loop transposed (a transposed convolution: each window receives grad_y times
    w[:, :, u, v]^T, so no multiplications are spent on the zeros a strided full correlation would insert),
    the weight gradient reduces grad_y times each window over the batch and the output pixels.
    """

    name = "direct"

    def correlate(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) x (O, C, K_h, K_w) -> (N, O, H', W')."""
        k_h, k_w = weight.shape[-2:]
        out_hw = ConvGeometry((k_h, k_w), stride, (0, 0), dilation).output_hw(tuple(x.shape[-2:]))
        y = x.new_zeros(x.shape[0], weight.shape[0], *out_hw)
        for u in range(k_h):
            for v in range(k_w):
                y += torch.einsum("nchw,oc->nohw", window(x, u, v, stride, dilation, out_hw), weight[:, :, u, v])
        return y

    def grad_input(self, grad_y: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                   in_hw: tuple[int, int]) -> torch.Tensor:
        """Scatters grad_y times w[:, :, u, v]^T back into each offset's window, then drops the padding."""
        out_hw = tuple(grad_y.shape[-2:])
        grad = grad_y.new_zeros(grad_y.shape[0], weight.shape[1], *geometry.padded_hw(in_hw))
        for u in range(geometry.kernel[0]):
            for v in range(geometry.kernel[1]):
                patch = window(grad, u, v, geometry.stride, geometry.dilation, out_hw)  # a view into grad
                patch += torch.einsum("nohw,oc->nchw", grad_y, weight[:, :, u, v])
        (p_h, p_w), (h, w) = geometry.padding, in_hw
        return grad[:, :, p_h: p_h + h, p_w: p_w + w]

    def grad_weight(self, x_padded: torch.Tensor, grad_y: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
        """dL/dw[:, :, u, v] = sum over n, i, j of grad_y[n, :, i, j] x window(u, v)[n, :, i, j]."""
        k_h, k_w = geometry.kernel
        out_hw = tuple(grad_y.shape[-2:])
        grad = x_padded.new_empty(grad_y.shape[1], x_padded.shape[1], k_h, k_w)
        for u in range(k_h):
            for v in range(k_w):
                patch = window(x_padded, u, v, geometry.stride, geometry.dilation, out_hw)
                grad[:, :, u, v] = torch.einsum("nohw,nchw->oc", grad_y, patch)
        return grad
