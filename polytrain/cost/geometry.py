"""Shape arithmetic of a 2-D convolution, shared by the operators and their work/depth formulas.

Pure arithmetic (no torch), so that the cost model can use it on layer shapes alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

# Output tile side m of each registered Winograd algorithm F(m x m, 3 x 3) (Lavin & Gray, CVPR 2016).
WINOGRAD_TILE_M = {"winograd2": 2, "winograd4": 4}


def pair(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    """`value` as an (H, W) pair of integers >= `minimum`; an int applies to both axes.

    Raises:
        ValueError: if `value` is not an int or a pair of ints, or is below `minimum`.
    """
    values = (value, value) if isinstance(value, int) else tuple(value)
    try:
        ints = tuple(operator.index(v) for v in values if not isinstance(v, bool))
    except TypeError:
        ints = ()
    if len(ints) != 2 or len(values) != 2 or min(ints) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or a pair of them; got {value!r}")
    return ints


@dataclass(frozen=True)
class ConvGeometry:
    """Window of a 2-D convolution over (H, W): kernel, stride, zero padding and dilation, each (H, W).

    Follows torch.nn.Conv2d: padding is added on both sides; a dilated kernel spans d * (K - 1) + 1 pixels.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1) -> ConvGeometry:
        """Builds a geometry from ints or (H, W) pairs, checking each (ValueError on a bad value)."""
        return cls(pair(kernel, "kernel size", 1), pair(stride, "stride", 1), pair(padding, "padding", 0),
                   pair(dilation, "dilation", 1))

    def span(self) -> tuple[int, int]:
        """Extent of the dilated kernel, (H, W) pixels."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel))

    def padded_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the input after zero padding."""
        return tuple(size + 2 * p for size, p in zip(in_hw, self.padding))

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the output for an input of `in_hw`; zero or less when the kernel does not fit.

        The shape formula of torch.nn.Conv2d: floor((H + 2p - d (K - 1) - 1) / s) + 1.
        """
        return tuple((padded - span) // s + 1
                     for padded, span, s in zip(self.padded_hw(in_hw), self.span(), self.stride))

    def winograd_violation(self) -> str | None:
        """Why Winograd F(m x m, 3 x 3) cannot compute this window, or None if it can."""
        if self.kernel != (3, 3) or self.stride != (1, 1) or self.dilation != (1, 1):
            return (f"Winograd F(m x m, 3 x 3) needs a 3x3 kernel with stride 1 and dilation 1; got kernel "
                    f"{self.kernel}, stride {self.stride}, dilation {self.dilation}")
        return None
