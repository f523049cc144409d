"""Work and depth of the convolution algorithms, and Winograd's multiplication counts."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytrain.cost import geometry, workdepth
from polytrain.ops.conv import conv2d
from polytrain.cost.workdepth import conv_work_depth, winograd_multiplications, winograd_tile_reduction

# N, C_in, C_out, H_in, W_in, K_h, K_w
LAYER = (2, 3, 4, 8, 8, 3, 3)


def test_direct_work_is_two_operations_per_multiply_accumulate():
    work, depth = conv_work_depth("direct", *LAYER)
    macs = 2 * 4 * 6 * 6 * 3 * 3 * 3  # N C_out H' W' C_in K_h K_w
    assert work == 2 * macs
    assert depth == math.ceil(math.log2(3)) + 2 * math.ceil(math.log2(3)) == 6


def test_im2col_does_the_arithmetic_of_direct():
    assert conv_work_depth("im2col", *LAYER, stride=2, padding=1) == conv_work_depth("direct", *LAYER, stride=2,
                                                                                     padding=1)


def test_fft_work_matches_its_formula():
    # Padded input 8x8 = 64 points, log2 64 = 6; transforms C_out C_in + N C_in + N C_out = 12 + 6 + 8;
    # pointwise: 8 real operations per frequency, sample, input and output channel.
    work, depth = conv_work_depth("fft", *LAYER)
    assert work == 5 * 64 * 6 * 26 + 8 * 64 * 2 * 3 * 4
    assert depth == 2 * 6 + 2


def test_winograd_work_matches_its_formula_on_one_tile():
    # F(2x2, 3x3) on a 4x4 input: one tile, alpha = 4. Multiply-accumulates: kernel transform
    # alpha r^2 + alpha^2 r = 84, input transform 2 alpha^3 = 128, output transform alpha^2 m + alpha m^2 = 48,
    # products alpha^2 = 16.
    work, depth = conv_work_depth("winograd2", 1, 1, 1, 4, 4, 3, 3)
    assert work == 2 * (84 + 128 + 48 + 16)
    assert depth == 2 * 2 + 4 * 2 + 0


def test_winograd_does_less_work_than_direct_on_wide_layers():
    layer = (8, 64, 64, 32, 32, 3, 3)
    direct, _ = conv_work_depth("direct", *layer, padding=1)
    two, _ = conv_work_depth("winograd2", *layer, padding=1)
    four, _ = conv_work_depth("winograd4", *layer, padding=1)
    assert four < two < direct


def test_fft_work_does_not_grow_with_the_kernel():
    # Everything is transformed at the input's size, so larger kernels are free (Ben-Nun & Hoefler Sec. 6.3:
    # FFT pays off for larger kernels), while direct work grows with K^2.
    small, large = (1, 16, 16, 64, 64, 3, 3), (1, 16, 16, 64, 64, 15, 15)
    ratio_direct = conv_work_depth("direct", *large)[0] / conv_work_depth("direct", *small)[0]
    assert conv_work_depth("fft", *large) == conv_work_depth("fft", *small)
    assert ratio_direct > 15


def test_groups_divide_the_channel_reduction():
    whole, _ = conv_work_depth("direct", 1, 8, 8, 6, 6, 3, 3)
    grouped, depth = conv_work_depth("direct", 1, 8, 8, 6, 6, 3, 3, groups=4)
    assert whole == 4 * grouped and depth == 1 + 2 + 2


@pytest.mark.parametrize("arguments, message", [
    (("winograd2", 1, 1, 1, 8, 8, 5, 5), "needs a 3x3 kernel"),
    (("winograd4", 1, 1, 1, 8, 8, 3, 3, 2), "needs a 3x3 kernel with stride 1"),
    (("strassen", 1, 1, 1, 8, 8, 3, 3), "unknown convolution algorithm 'strassen'; available: direct, fft"),
    (("direct", 1, 3, 4, 8, 8, 3, 3, 1, 0, 1, 2), "channels 3 -> 4 are not divisible by 2 groups"),
    (("direct", 1, 1, 1, 2, 2, 3, 3), "does not fit"),
])
def test_impossible_requests_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        conv_work_depth(*arguments)


def test_textbook_tile_reductions():
    assert winograd_tile_reduction(2, 3) == 2.25
    assert winograd_tile_reduction(4, 3) == 4.0


@pytest.mark.parametrize("algorithm, reduction", [("winograd2", 2.25), ("winograd4", 4.0)])
def test_whole_tiles_reach_the_textbook_reduction(algorithm, reduction):
    count = winograd_multiplications(algorithm, 2, 4, 8, 8, 8, padding=1)
    assert count.direct == 2 * 8 * 8 * 4 * 8 * 9
    assert count.reduction == reduction


def test_partial_tiles_lose_some_of_the_reduction():
    # 7x7 outputs in 4x4 tiles: 2x2 tiles cover 8x8, so 64/49 more multiplications than whole tiles.
    count = winograd_multiplications("winograd4", 1, 2, 2, 7, 7, padding=1)
    assert count.reduction == pytest.approx(4.0 * 49 / 64)


@pytest.mark.parametrize("algorithm", ["winograd2", "winograd4"])
def test_the_implementation_multiplies_as_often_as_counted(algorithm):
    # The transformed-domain products are the one batched matrix product (bmm) in Winograd's forward.
    x, weight = torch.randn(2, 3, 9, 10), torch.randn(5, 3, 3, 3)
    with FlopCounterMode(display=False) as counter:
        conv2d(x, weight, padding=1, algorithm=algorithm)
    bmm_flops = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    assert bmm_flops == 2 * winograd_multiplications(algorithm, 2, 3, 5, 9, 10, padding=1).winograd


@pytest.mark.parametrize("module", [workdepth, geometry])
def test_formulas_are_pure_arithmetic(module):
    # The cost model evaluates them on layer shapes alone: no torch, only the standard library and geometry.
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "operator", "dataclasses", "typing", "polytrain.cost.geometry"}
