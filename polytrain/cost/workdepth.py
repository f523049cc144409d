"""Work and depth of each convolution algorithm, and Winograd's multiplication count: pure formulas.

Work is the number of scalar arithmetic operations (a multiply-accumulate counts 2); depth is the length of
the longest dependency chain in the PRAM sense (a tree reduction of n values has depth ceil(log2 n)).

Source: Ben-Nun & Hoefler, "Demystifying Parallel and Distributed Deep Learning", ACM CSUR 2019, Sec. 6.3
and its table of the work-depth characteristics of convolution implementations. The copy of the survey in
this project's seed text has the table's cells stripped, so the formulas below are the published table as
we read it, checked against a first-principles count; where the two part, the comment at the formula says
which one we follow and why. The table's notation: N batch, C_in / C_out channels, H x W input, H' x W'
output, K_y x K_x kernel; for Winograd m x m output tiles, r x r kernels, alpha = m + r - 1 the transformed
tile side, P = N * ceil(H'/m) * ceil(W'/m) tiles.

Depth follows the table: it counts the levels of the reduction and transform trees and omits the O(1)
levels of the elementwise products, so a 1x1 convolution of one channel has depth 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from polytrain.cost.geometry import WINOGRAD_TILE_M, ConvGeometry

# Real operations per point of a complex FFT of n points, per log2(n): radix-2 Cooley-Tukey does
# n/2 log2 n butterflies of 10 real operations (one complex multiply, two complex adds), the 5 n log2 n
# count FFTW's benchmarks use to convert time to flop rates. The survey's table leaves this constant as c.
FFT_OPS_PER_POINT_LOG = 5.0

# Real operations of a complex multiply-accumulate: 4 multiplies and 2 adds for the product, 2 adds into
# the accumulator.
COMPLEX_MAC_OPS = 8

ALGORITHMS = ("direct", "im2col", "fft", *WINOGRAD_TILE_M)


class LayerShape(NamedTuple):
    """One convolution layer: batch, channels, input size, window and groups."""

    N: int
    C_in: int
    C_out: int
    in_hw: tuple[int, int]
    geometry: ConvGeometry
    groups: int

    @property
    def out_hw(self) -> tuple[int, int]:
        """(H', W')."""
        return self.geometry.output_hw(self.in_hw)

    @property
    def C_in_per_group(self) -> int:
        """Input channels each output channel reads (C_in / groups)."""
        return self.C_in // self.groups


class MultiplicationCount(NamedTuple):
    """Elementwise multiplications of Winograd's transformed domain against those of direct convolution."""

    winograd: int
    direct: int

    @property
    def reduction(self) -> float:
        """How many times fewer multiplications Winograd does (direct / winograd)."""
        return self.direct / self.winograd


def _clog2(n: float) -> int:
    """ceil(log2 n), the depth of a tree reduction over n values (0 for n <= 1)."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def layer_shape(N, C_in, C_out, H_in, W_in, K_h, K_w, stride=1, padding=0, dilation=1, groups=1) -> LayerShape:
    """Checks a layer's arguments and bundles them; ValueError on an impossible layer."""
    geometry = ConvGeometry.of((K_h, K_w), stride, padding, dilation)
    for name, value in (("N", N), ("C_in", C_in), ("C_out", C_out), ("H_in", H_in), ("W_in", W_in),
                        ("groups", groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if C_in % groups or C_out % groups:
        raise ValueError(f"channels {C_in} -> {C_out} are not divisible by {groups} groups")
    shape = LayerShape(N, C_in, C_out, (H_in, W_in), geometry, groups)
    if min(shape.out_hw) < 1:
        raise ValueError(f"a {geometry.span()} kernel (dilated) does not fit a {(H_in, W_in)} input padded by "
                         f"{geometry.padding}")
    return shape


def direct_work_depth(shape: LayerShape) -> tuple[float, int]:
    """Direct convolution (and im2col, which does the same arithmetic as one GEMM).

    Survey table, rows "Direct" and "im2col": W = N C_out H' W' C_in K_y K_x multiply-accumulates (x2 for
    scalar operations), D = ceil(log2 C_in) + ceil(log2 K_y) + ceil(log2 K_x): each output is a reduction
    over channels and kernel rows and columns. im2col's lowering copies data but does no arithmetic, which
    is why the survey gives both rows the same work and depth (Sec. 6.3).
    """
    out_h, out_w = shape.out_hw
    k_h, k_w = shape.geometry.kernel
    macs = shape.N * shape.C_out * out_h * out_w * shape.C_in_per_group * k_h * k_w
    return 2.0 * macs, _clog2(shape.C_in_per_group) + _clog2(k_h) + _clog2(k_w)


def fft_work_depth(shape: LayerShape, ops_per_point_log: float = FFT_OPS_PER_POINT_LOG) -> tuple[float, int]:
    """FFT convolution: transform inputs and kernels, multiply pointwise summing channels, transform back.

    Survey table, row "FFT": W = c H W log2(H W) (C_out C_in + N C_in + N C_out) + H W N C_in C_out,
    D = 2 ceil(log2 H W) + ceil(log2 C_in): C_out C_in kernel transforms, N C_in input transforms and
    N C_out inverse transforms of H x W points, then one complex multiply-accumulate per frequency, input
    channel and (sample, output channel). H x W here is the padded input, the size our `fft` algorithm
    transforms at; the pointwise term is counted in real operations (`COMPLEX_MAC_OPS` each), as the
    transforms are. The depth is the forward transform, the channel reduction and the inverse transform
    (the kernel transforms run beside the input transforms). Strides are computed at stride 1 and
    subsampled, so they do not reduce the work.
    """
    points = math.prod(shape.geometry.padded_hw(shape.in_hw))
    c_in = shape.C_in_per_group
    transforms = shape.C_out * c_in + shape.N * shape.C_in + shape.N * shape.C_out
    work = (ops_per_point_log * points * math.log2(points) * transforms
            + COMPLEX_MAC_OPS * points * shape.N * c_in * shape.C_out)
    return work, 2 * _clog2(points) + _clog2(c_in)


def winograd_tiles(shape: LayerShape, m: int) -> int:
    """P, the number of m x m output tiles over the batch: N ceil(H'/m) ceil(W'/m)."""
    out_h, out_w = shape.out_hw
    return shape.N * math.ceil(out_h / m) * math.ceil(out_w / m)


def winograd_work_depth(shape: LayerShape, m: int) -> tuple[float, int]:
    """Winograd minimal filtering F(m x m, r x r) over m x m output tiles (Lavin & Gray 2016).

    Survey table, row "Winograd": per tile, alpha (r^2 + alpha r + 2 alpha^2 + alpha m + m^2) for the three
    transforms G g G^T (alpha r^2 + alpha^2 r), B^T d B (2 alpha^3) and A^T M A (alpha^2 m + alpha m^2),
    plus C_out C_in P for the products. Read literally, the table charges each transform once; from first
    principles each is applied to every operand it transforms, so we count C_out C_in kernel transforms,
    N C_in ceil(H'/m) ceil(W'/m) input-tile transforms, as many output-tile transforms per output channel,
    and alpha^2 multiply-accumulates per tile, input and output channel (the batched GEMMs of Lavin & Gray
    Sec. 4). Transforms are counted as dense matrix products, as in the survey; the textbook matrices'
    zeros and ones would make them cheaper. All multiply-accumulates count 2.

    Depth, survey table: 2 ceil(log2 r) + 4 ceil(log2 alpha) + ceil(log2 C_in): the kernel transform (two
    reductions of length r), the input and output transforms (two of length alpha each) and the channel
    reduction, on one path as the table has it.
    """
    r = shape.geometry.kernel[0]
    alpha = m + r - 1
    tiles = winograd_tiles(shape, m)
    c_in = shape.C_in_per_group
    transform_macs = (shape.C_out * c_in * (alpha * r * r + alpha * alpha * r)
                      + tiles * shape.C_in * 2 * alpha**3
                      + tiles * shape.C_out * (alpha * alpha * m + alpha * m * m))
    product_macs = tiles * shape.C_out * c_in * alpha * alpha
    return 2.0 * (transform_macs + product_macs), 2 * _clog2(r) + 4 * _clog2(alpha) + _clog2(c_in)


def _winograd_m(algorithm: str, shape: LayerShape) -> int:
    """The tile side of Winograd `algorithm`; ValueError if it cannot compute `shape`."""
    violation = shape.geometry.winograd_violation()
    if violation:
        raise ValueError(violation)
    return WINOGRAD_TILE_M[algorithm]


def conv_work_depth(algorithm: str, N: int, C_in: int, C_out: int, H_in: int, W_in: int, K_h: int, K_w: int,
                    stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                    dilation: int | tuple[int, int] = 1, groups: int = 1) -> tuple[float, int]:
    """Work (scalar operations) and depth of one forward convolution computed by `algorithm`.

    Args:
        algorithm: "direct", "im2col", "fft", "winograd2" (F(2x2,3x3)) or "winograd4" (F(4x4,3x3)).
        N: batch size.
        C_in, C_out: input and output channels.
        H_in, W_in: input size before padding.
        K_h, K_w: kernel size.
        stride, padding, dilation: as for torch.nn.Conv2d, an int or an (H, W) pair.
        groups: channel groups; each output channel reads C_in / groups input channels.

    Returns:
        (work, depth) for the whole batch; see the module docstring for the units.

    Raises:
        ValueError: for an unknown algorithm, an impossible layer, or a shape the algorithm cannot compute
            (Winograd needs a 3x3 kernel, stride 1 and dilation 1).
    """
    shape = layer_shape(N, C_in, C_out, H_in, W_in, K_h, K_w, stride, padding, dilation, groups)
    if algorithm in ("direct", "im2col"):
        return direct_work_depth(shape)
    if algorithm == "fft":
        return fft_work_depth(shape)
    if algorithm in WINOGRAD_TILE_M:
        return winograd_work_depth(shape, _winograd_m(algorithm, shape))
    raise ValueError(f"unknown convolution algorithm '{algorithm}'; available: {', '.join(sorted(ALGORITHMS))}")


def winograd_tile_reduction(m: int, r: int) -> float:
    """Multiplications saved per tile by F(m x m, r x r): (m r)^2 / (m + r - 1)^2 (Lavin & Gray 2016 Sec. 4).

    Direct convolution spends m^2 r^2 multiplications on an m x m output tile, Winograd (m + r - 1)^2:
    2.25 for F(2x2, 3x3), 4 for F(4x4, 3x3).
    """
    return (m * r) ** 2 / (m + r - 1) ** 2


def winograd_multiplications(algorithm: str, N: int, C_in: int, C_out: int, H_in: int, W_in: int,
                             padding: int | tuple[int, int] = 1, groups: int = 1) -> MultiplicationCount:
    """Elementwise multiplications of Winograd `algorithm` on a 3x3, stride-1 layer, against direct's.

    Winograd multiplies alpha^2 transformed values per tile, input and output channel; direct convolution
    r^2 per output pixel and channel pair. Transforms are not counted (they are additions and constant
    scalings, amortised over channels; Lavin & Gray Sec. 4). Partial tiles at the border are computed
    whole, so the layer's reduction is at most `winograd_tile_reduction(m, 3)`, reached when m divides
    H' and W'.

    Args:
        algorithm: "winograd2" or "winograd4".
        N, C_in, C_out, H_in, W_in, padding, groups: the layer, as for `conv_work_depth`.
    """
    if algorithm not in WINOGRAD_TILE_M:
        raise ValueError(f"'{algorithm}' is not a Winograd algorithm; available: {', '.join(WINOGRAD_TILE_M)}")
    m = WINOGRAD_TILE_M[algorithm]
    shape = layer_shape(N, C_in, C_out, H_in, W_in, 3, 3, 1, padding, 1, groups)
    alpha = m + 2
    channel_pairs = shape.C_out * shape.C_in_per_group
    out_h, out_w = shape.out_hw
    return MultiplicationCount(winograd=winograd_tiles(shape, m) * channel_pairs * alpha * alpha,
                               direct=N * out_h * out_w * channel_pairs * 9)
