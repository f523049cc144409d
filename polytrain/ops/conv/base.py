"""What a convolution algorithm provides, and the backward pass any of them gets for free.

"Convolution" here is what torch.nn.functional.conv2d computes, a cross-correlation:
y[n, o, i, j] = sum over c, u, v of x_pad[n, c, i s_h + u d_h, j s_w + v d_w] * w[o, c, u, v].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polytrain.cost.geometry import ConvGeometry


def dilate(t: torch.Tensor, factors: tuple[int, int]) -> torch.Tensor:
    """Inserts `factor - 1` zeros between neighbouring elements of the last two dims of `t`.

    (..., H, W) -> (..., (H - 1) f_h + 1, (W - 1) f_w + 1): a stride-s gradient map becomes the input of a
    stride-1 correlation, a kernel becomes the dilated kernel it acts as.
    """
    if factors == (1, 1):
        return t
    f_h, f_w = factors
    h, w = t.shape[-2:]
    out = t.new_zeros(*t.shape[:-2], (h - 1) * f_h + 1, (w - 1) * f_w + 1)
    out[..., ::f_h, ::f_w] = t
    return out


def window(x: torch.Tensor, u: int, v: int, stride: tuple[int, int], dilation: tuple[int, int],
           out_hw: tuple[int, int]) -> torch.Tensor:
    """The pixels kernel offset (u, v) meets at every output position: (N, C, H, W) -> (N, C, H', W').

    x[:, :, i s_h + u d_h, j s_w + v d_w] for i < H', j < W', as a strided view.
    """
    (s_h, s_w), (d_h, d_w), (out_h, out_w) = stride, dilation, out_hw
    return x[:, :, u * d_h: u * d_h + (out_h - 1) * s_h + 1: s_h, v * d_w: v * d_w + (out_w - 1) * s_w + 1: s_w]


def pad_input(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H + 2 p_h, W + 2 p_w), zero padded."""
    p_h, p_w = geometry.padding
    return F.pad(x, (p_w, p_w, p_h, p_h)) if p_h or p_w else x


class ConvAlgorithm:
    """One way to compute a convolution and its two gradients, for one channel group.

    A subclass implements `correlate`; the base derives both gradients from it, each as another
    correlation (so an algorithm's backward runs on the same algorithm). A subclass overrides a gradient
    where its family has a better formulation (im2col's col2im, Winograd's F(3x3, m x m)), and `check`
    where it cannot compute every window.
    """

    name = "convolution"

    def check(self, geometry: ConvGeometry) -> None:
        """Raises ValueError if this algorithm cannot compute `geometry`; the base computes every one."""

    def correlate(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """Unpadded correlation: (N, C, H, W) x (O, C, K_h, K_w) -> (N, O, H', W')."""
        raise NotImplementedError

    def grad_input(self, grad_y: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                   in_hw: tuple[int, int]) -> torch.Tensor:
        """Gradient with respect to the (unpadded) input: a "full" correlation, i.e. a transposed convolution.

        dL/dx_pad[a] = sum_u grad_y_up[a - u d] w[u], with grad_y_up the gradient spread out to stride 1
        (`dilate`). That is a stride-1 correlation of grad_y_up, zero padded by d (K - 1) on both sides,
        with the kernel flipped and its input/output channels swapped. Starting p rows later and ending
        where the input ends (a negative pad crops) gives the gradient of the unpadded input directly.

        Args:
            grad_y: (N, O, H', W').
            weight: (O, C, K_h, K_w).
            geometry: the forward window.
            in_hw: (H, W) of the forward input.

        Returns:
            (N, C, H, W).
        """
        spread = dilate(grad_y, geometry.stride)
        pads = []
        for size, span, p, spread_size in zip(in_hw, geometry.span(), geometry.padding, spread.shape[-2:]):
            # Rows of the padded input past the last window's reach get gradient 0: pad them in at the end.
            beyond = size + 2 * p - (spread_size + span - 1)
            pads.append((span - 1 - p, span - 1 - p + beyond))
        (top, bottom), (left, right) = pads
        flipped = weight.flip(2, 3).transpose(0, 1)  # (C, O, K_h, K_w)
        return self.correlate(F.pad(spread, (left, right, top, bottom)), flipped, (1, 1), geometry.dilation)

    def grad_weight(self, x_padded: torch.Tensor, grad_y: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
        """Gradient with respect to the weight: the correlation of the input with the output gradient.

        dL/dw[o, c, u, v] = sum over n, i, j of x_pad[n, c, i s + u d, ...] grad_y[n, o, i, j]: a correlation
        with batch and channels swapped (the channels c act as the batch, the samples n as the channels
        summed over), grad_y as the kernel dilated by the stride, and the kernel offsets stepping by the
        dilation. A last partial step can reach one offset past K; it is cropped.

        Args:
            x_padded: (N, C, H + 2 p_h, W + 2 p_w).
            grad_y: (N, O, H', W').
            geometry: the forward window.

        Returns:
            (O, C, K_h, K_w).
        """
        k_h, k_w = geometry.kernel
        grad = self.correlate(x_padded.transpose(0, 1), grad_y.transpose(0, 1), geometry.dilation,
                              geometry.stride)  # (C, O, >= K_h, >= K_w)
        return grad[:, :, :k_h, :k_w].transpose(0, 1)
