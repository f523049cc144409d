"""Winograd minimal filtering F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016).

F(m, r) computes m outputs of an r-tap correlation from alpha = m + r - 1 inputs with alpha
multiplications: y = A^T [(G g) * (B^T d)]. Nested, F(m x m, r x r) turns an alpha x alpha input tile d
and an r x r kernel g into an m x m output tile, Y = A^T [(G g G^T) * (B^T d B)] A, with alpha^2
multiplications where direct convolution needs m^2 r^2 (Lavin & Gray Sec. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.ops.conv.base import ConvAlgorithm
from polytrain.cost.geometry import ConvGeometry


@dataclass(frozen=True)
class MinimalFilter:
    """The transform matrices of F(m, r): B^T (alpha x alpha), G (alpha x r), A^T (m x alpha)."""

    m: int
    r: int
    BT: tuple[tuple[float, ...], ...]
    G: tuple[tuple[float, ...], ...]
    AT: tuple[tuple[float, ...], ...]

    @property
    def alpha(self) -> int:
        """Input tile side, m + r - 1."""
        return self.m + self.r - 1

    def nested(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B^T (x) B^T, G (x) G and A^T (x) A^T (Kronecker products) in `like`'s dtype and device.

        With a tile flattened row-major into a vector, the two-sided transform L d L^T is (L (x) L) vec(d),
        so each 2-D transform of all tiles at once is one matrix product.
        """
        matrices = (torch.tensor(rows, dtype=like.dtype, device=like.device)
                    for rows in (self.BT, self.G, self.AT))
        return tuple(torch.kron(matrix, matrix) for matrix in matrices)


# Lavin & Gray 2016 Sec. 4, F(2x2, 3x3): interpolation points 0, 1, -1 and infinity.
F2_3 = MinimalFilter(
    m=2, r=3,
    BT=((1, 0, -1, 0),
        (0, 1, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0, -1)),
    G=((1, 0, 0),
       (1 / 2, 1 / 2, 1 / 2),
       (1 / 2, -1 / 2, 1 / 2),
       (0, 0, 1)),
    AT=((1, 1, 1, 0),
        (0, 1, -1, -1)),
)

# Lavin & Gray 2016 Sec. 4, F(4x4, 3x3): interpolation points 0, 1, -1, 2, -2 and infinity (alpha = 6 points;
# +-1/2 join them only in F(6x6, 3x3)).
F4_3 = MinimalFilter(
    m=4, r=3,
    BT=((4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)),
    G=((1 / 4, 0, 0),
       (-1 / 6, -1 / 6, -1 / 6),
       (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6),
       (1 / 24, -1 / 12, 1 / 6),
       (0, 0, 1)),
    AT=((1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 0),
        (0, 1, 1, 4, 4, 0),
        (0, 1, -1, 8, -8, 1)),
)


class Winograd(ConvAlgorithm):
    """Convolution over m x m output tiles by F(m x m, 3 x 3); 3x3 kernels, stride 1, dilation 1 only.

    Forward (Lavin & Gray Sec. 4): transform every kernel, U = G g G^T, and every overlapping
    alpha x alpha input tile, V = B^T d B (tiles step by m); at each of the alpha^2 positions sum U V over
    the input channels, which is one GEMM (O x C times C x tiles) per position; transform each result
    back, Y = A^T M A, and crop the last partial tiles. Tiles are flattened into vectors, so the
    transforms are products with Kronecker matrices (`MinimalFilter.nested`) and the layout
    (alpha^2, channels, tiles) feeds the batched GEMM without copies.

    Input gradient: the inherited full correlation with the flipped kernel, itself 3x3 at stride 1, so the
    same F(m x m, 3 x 3). Weight gradient: a correlation whose "kernel" is the m x m gradient tile and
    whose output is the 3 x 3 weight, i.e. F(3 x 3, m x m) on the same alpha x alpha input tiles. By the
    transposition principle F(r, m) uses F(m, r)'s matrices with A and G exchanged:
    dW = G^T [(A dY A^T) * (B^T d B)] G, summed over tiles and the batch in the transformed domain, where
    it is again one GEMM per position. (Derivation: F(m, r) is exact when sum_t A[t, i] G[t, k] B^T[t, j]
    = [j == i + k], which is symmetric in the output index i and the kernel index k.)
    """

    def __init__(self, filter_: MinimalFilter) -> None:
        self.filter = filter_
        self.name = f"winograd{filter_.m}"

    def check(self, geometry: ConvGeometry) -> None:
        """Raises ValueError unless the kernel is 3x3 with stride 1 and dilation 1."""
        violation = geometry.winograd_violation()
        if violation:
            raise ValueError(violation)

    def _tiles_hw(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """Output tiles along H and W, the last ones partial: ceil(H' / m), ceil(W' / m)."""
        return tuple(math.ceil(size / self.filter.m) for size in out_hw)

    def _input_tiles(self, x: torch.Tensor, nested_BT: torch.Tensor, tiles_hw: tuple[int, int]) -> torch.Tensor:
        """Transformed input tiles, (N, C, H, W) -> (alpha^2, C, N T_h T_w).

        The input is zero padded at the bottom and right so that the last partial tiles are whole.
        """
        m, alpha = self.filter.m, self.filter.alpha
        need_h, need_w = ((t - 1) * m + alpha for t in tiles_hw)
        x = F.pad(x, (0, need_w - x.shape[-1], 0, need_h - x.shape[-2]))
        tiles = x.unfold(2, alpha, m).unfold(3, alpha, m)  # (N, C, T_h, T_w, alpha, alpha), a view
        rows = tiles.transpose(0, 1).reshape(-1, alpha * alpha)  # (C N T_h T_w, alpha^2)
        return (nested_BT @ rows.mT).view(alpha * alpha, x.shape[1], -1)

    def correlate(self, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) x (O, C, 3, 3) -> (N, O, H - 2, W - 2)."""
        self.check(ConvGeometry(tuple(weight.shape[-2:]), stride, (0, 0), dilation))
        nested_BT, nested_G, nested_AT = self.filter.nested(x)
        m, (n, out_channels) = self.filter.m, (x.shape[0], weight.shape[0])
        out_hw = (x.shape[-2] - 2, x.shape[-1] - 2)
        tiles_h, tiles_w = self._tiles_hw(out_hw)
        V = self._input_tiles(x, nested_BT, (tiles_h, tiles_w))  # (alpha^2, C, P)
        U = (nested_G @ weight.flatten(2).flatten(0, 1).mT).view(-1, out_channels, x.shape[1])  # (alpha^2, O, C)
        M = U @ V  # (alpha^2, O, P): one GEMM per transformed position
        Y = (nested_AT @ M.flatten(1)).view(m, m, out_channels, n, tiles_h, tiles_w)
        Y = Y.permute(3, 2, 4, 0, 5, 1).reshape(n, out_channels, tiles_h * m, tiles_w * m)
        return Y[:, :, :out_hw[0], :out_hw[1]]

    def grad_weight(self, x_padded: torch.Tensor, grad_y: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
        """F(3 x 3, m x m): dW = G^T [sum over tiles of (A dY A^T) * (B^T d B)] G, (O, C, 3, 3)."""
        nested_BT, nested_G, nested_AT = self.filter.nested(x_padded)
        m, out_channels = self.filter.m, grad_y.shape[1]
        out_h, out_w = grad_y.shape[-2:]
        tiles_h, tiles_w = self._tiles_hw((out_h, out_w))
        V = self._input_tiles(x_padded, nested_BT, (tiles_h, tiles_w))  # (alpha^2, C, P)
        grad_y = F.pad(grad_y, (0, tiles_w * m - out_w, 0, tiles_h * m - out_h))
        grad_tiles = grad_y.unfold(2, m, m).unfold(3, m, m)  # (N, O, T_h, T_w, m, m)
        rows = grad_tiles.transpose(0, 1).reshape(-1, m * m)  # (O P, m^2)
        U = (nested_AT.mT @ rows.mT).view(-1, out_channels, V.shape[-1])  # (alpha^2, O, P)
        M = U @ V.mT  # (alpha^2, O, C): one GEMM per position, summing samples and tiles
        grad = nested_G.mT @ M.flatten(1)  # (9, O C)
        return grad.view(3, 3, out_channels, -1).permute(2, 3, 0, 1)


@CONV_ALGORITHMS.register("winograd2")
def winograd2() -> Winograd:
    """F(2x2, 3x3): 16 multiplications per 2x2 output tile instead of 36 (2.25x fewer)."""
    return Winograd(F2_3)


@CONV_ALGORITHMS.register("winograd4")
def winograd4() -> Winograd:
    """F(4x4, 3x3): 36 multiplications per 4x4 output tile instead of 144 (4x fewer)."""
    return Winograd(F4_3)
