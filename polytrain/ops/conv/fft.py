"""FFT convolution: pointwise products in the frequency domain (Mathieu, Henaff & LeCun, ICLR 2014)."""

from __future__ import annotations

import torch

from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.ops.conv.base import ConvAlgorithm, dilate


@CONV_ALGORITHMS.register("fft")
class FFT(ConvAlgorithm):
    """Correlation computed as a circular convolution with the flipped kernel, by the convolution theorem.

    Both operands are transformed at the input's size (H, W) with real FFTs, the kernel flipped and zero
    padded, multiplied pointwise and summed over input channels (`conv(x, flip(w))[i + K - 1]` is the
    correlation at i; flipping the small real kernel saves conjugating its large transform). The circular
    result equals the linear one at the H - K + 1 positions whose window does not wrap around; the rest is
    cropped. A dilated kernel is transformed with its zeros in place (`dilate`), and a stride s is computed
    as the stride-1 result subsampled every s pixels: the FFT has no cheaper strided form, so strided
    layers cost as much as unstrided ones. Both gradients are the inherited correlations, each computed by
    this same FFT correlation.
    """

    name = "fft"

    def correlate(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) x (O, C, K_h, K_w) -> (N, O, H', W')."""
        size = tuple(x.shape[-2:])
        kernel = dilate(weight.flip(-2, -1), dilation)
        x_freq = torch.fft.rfft2(x)  # (N, C, H, W // 2 + 1), complex
        kernel_freq = torch.fft.rfft2(kernel, s=size)  # (O, C, H, W // 2 + 1)
        y = torch.fft.irfft2(torch.einsum("nchw,ochw->nohw", x_freq, kernel_freq), s=size)  # (N, O, H, W)
        (s_h, s_w), (span_h, span_w) = stride, kernel.shape[-2:]
        return y[:, :, span_h - 1:: s_h, span_w - 1:: s_w]
