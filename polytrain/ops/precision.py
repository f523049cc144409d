"""Reduced-precision number formats and rounding to them, to nearest or stochastically.

Gupta et al. 2015, *Deep Learning with Limited Numerical Precision*, train with weights stored in 16-bit
fixed point while arithmetic runs in 32 bits. An update w - lr·g smaller than half the format's spacing
is lost by rounding to nearest, but survives in expectation under stochastic rounding (their eq. 2),
which rounds up with probability equal to the distance from the value below:
E[round(x)] = x. `quantize_parameters_` applies this after each optimizer step.

Formats (`parse_format`):

- ``fp32``: no rounding; tensors are returned unchanged.
- ``fp16``, ``bf16``: IEEE half precision and bfloat16. Nearest is torch's own cast (ties to even,
  overflow to ±inf). Stochastic rounds to one of the two neighbouring representable values; past the
  largest finite value it overflows to ±inf like the cast does (x between the largest finite value and
  the next power of two becomes inf with probability proportional to its distance from the largest).
  ±inf and NaN pass through.
- ``fixed:IL.FL``: Gupta's <IL, FL>: IL integer bits including the sign, FL fractional bits, so values
  k·2^-FL in [-2^(IL-1), 2^(IL-1) - 2^-FL]. Values outside saturate to the bounds, as in Gupta §3 (±inf
  too); NaN passes through so that a divergence stays visible. Nearest breaks ties to even
  (torch.round), like the IEEE casts; Gupta's eq. 1 breaks them downwards, the only difference.

Stochastic rounding draws every random number from the given generator, so a generator seeded per step
(`rounding_generator`) makes runs and resumed runs reproducible. The probability of rounding up is exact
when the fraction (x - lo) / (hi - lo) is a multiple of 2^-24 (the resolution of float32 uniforms;
2^-53 for float64 inputs): for float32 inputs always in bf16, for |x| >= 2^-25 in fp16 and for
|x| >= 2^-FL / 2 in fixed point. Below that it is off by less than 2^-24.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

RoundingMode = Literal["nearest", "stochastic"]
ROUNDING_MODES = ("nearest", "stochastic")
FORMAT_KINDS = ("fp32", "fp16", "bf16", "fixed")
# The largest fixed-point word whose values are all exact in float32: a 25-bit two's complement integer
# has magnitudes up to 2^24, the width of float32's significand (implicit bit included).
MAX_FIXED_WORD_BITS = 25
_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FIXED_SPEC = re.compile(r"fixed:(\d+)\.(\d+)")
_SPEC_FORMS = "fp32, fp16, bf16 or fixed:IL.FL (e.g. fixed:2.14)"
# float32 bit mask keeping sign, exponent and the 7 mantissa bits that bfloat16 stores (0xFFFF0000).
_BFLOAT16_BITS = -(1 << 16)


@dataclass(frozen=True)
class NumberFormat:
    """A number format that tensors are rounded to; `str()` gives back its spec.

    Attributes:
        kind: one of FORMAT_KINDS.
        integer_bits: IL of fixed:IL.FL, the sign bit included; 0 for the floating formats.
        fractional_bits: FL of fixed:IL.FL; 0 for the floating formats.
    """

    kind: str
    integer_bits: int = 0
    fractional_bits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise ValueError(f"unknown number format kind {self.kind!r}; expected {', '.join(FORMAT_KINDS)}")
        if self.kind == "fixed":
            _check_fixed_bits(self.integer_bits, self.fractional_bits)
        elif self.integer_bits or self.fractional_bits:
            raise ValueError(f"{self.kind} has no integer or fractional bits to set (only fixed:IL.FL does)")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.integer_bits}.{self.fractional_bits}"
        return self.kind

    @property
    def resolution(self) -> float:
        """Fixed point's spacing eps = 2^-FL."""
        return 2.0 ** -self.fractional_bits

    @property
    def min_value(self) -> float:
        """Fixed point's lower bound -2^(IL-1)."""
        return -(2.0 ** (self.integer_bits - 1))

    @property
    def max_value(self) -> float:
        """Fixed point's upper bound 2^(IL-1) - eps."""
        return 2.0 ** (self.integer_bits - 1) - self.resolution


def _check_fixed_bits(integer_bits: int, fractional_bits: int) -> None:
    if integer_bits < 1:
        raise ValueError(f"fixed:{integer_bits}.{fractional_bits} needs at least 1 integer bit (the sign)")
    if fractional_bits < 0:
        raise ValueError(f"fixed:{integer_bits}.{fractional_bits} has negative fractional bits")
    if integer_bits + fractional_bits > MAX_FIXED_WORD_BITS:
        raise ValueError(f"fixed:{integer_bits}.{fractional_bits} has {integer_bits} + {fractional_bits} = "
                         f"{integer_bits + fractional_bits} bits; at most {MAX_FIXED_WORD_BITS} keep every "
                         f"value exact in float32")


def parse_format(spec: str) -> NumberFormat:
    """Parses "fp32", "fp16", "bf16" or "fixed:IL.FL" (e.g. "fixed:2.14", Gupta's <2, 14>).

    Raises:
        ValueError: for any other spec, naming the valid forms.
    """
    if spec in _FLOAT_DTYPES or spec == "fp32":
        return NumberFormat(spec)
    match = _FIXED_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"unknown number format {spec!r}; expected {_SPEC_FORMS}")
    return NumberFormat("fixed", int(match[1]), int(match[2]))


def round_to(x: torch.Tensor, fmt: NumberFormat | str, mode: RoundingMode,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Rounds `x` to values representable in `fmt`, keeping x's dtype (float32 or float64).

    Args:
        x: the tensor to round; not modified.
        fmt: the format, or its spec for `parse_format`.
        mode: "nearest", or "stochastic" (unbiased: rounds up with probability (x - lo) / (hi - lo)).
        generator: source of all random numbers in stochastic mode (torch's default one if None).

    Returns:
        A new tensor, or `x` itself for fp32.

    Raises:
        ValueError: for an unknown mode or format spec.
        TypeError: for an x that is not float32 or float64.
    """
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; expected {' or '.join(ROUNDING_MODES)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"round_to rounds float32 or float64 tensors, not {x.dtype}")
    if fmt.kind == "fp32":
        return x
    if fmt.kind == "fixed":
        return _round_fixed(x, fmt, mode, generator)
    dtype = _FLOAT_DTYPES[fmt.kind]
    if mode == "nearest":
        return x.to(dtype).to(x.dtype)
    if dtype is torch.bfloat16 and x.dtype is torch.float32:
        return _stochastic_bfloat16(x, generator)
    return _stochastic_float(x, dtype, generator)


def _round_fixed(x: torch.Tensor, fmt: NumberFormat, mode: RoundingMode,
                 generator: torch.Generator | None) -> torch.Tensor:
    # Gupta §3: values outside the range saturate to its bounds, which lie on the grid.
    x = x.clamp(fmt.min_value, fmt.max_value)
    if mode == "nearest":
        return torch.round(x / fmt.resolution) * fmt.resolution  # ties to even
    return _stochastic_to_grid(x, fmt.resolution, generator)


def _stochastic_to_grid(x: torch.Tensor, spacing: torch.Tensor | float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Rounds x to a multiple of the power of two `spacing`: up with probability (x - down) / spacing.

    Gupta eq. 2 writes this as floor(x/eps + u) with u ~ U[0, 1); comparing u with the fraction instead
    avoids the float rounding of x/eps + u, which would bias the result when x/eps is large.
    """
    scaled = x / spacing  # exact: dividing by a power of two
    down = scaled.floor()
    uniform = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.where(uniform < scaled - down, down + 1, down) * spacing


def _stochastic_float(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic rounding to the floating-point type `dtype` via the spacing of its values around x."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x)  # |x| in [2^(exponent-1), 2^exponent)
    # Spacing eps·2^e in the binade [2^e, 2^(e+1)); below the smallest normal `tiny` the subnormals keep
    # the spacing eps·tiny (fp16: 2^-24).
    spacing = torch.ldexp(torch.full_like(x, info.eps), (exponent - 1).clamp(min=round(math.log2(info.tiny))))
    rounded = _stochastic_to_grid(x, spacing, generator)
    # IEEE overflow, as the nearest cast does: past the largest finite value lies infinity.
    rounded = torch.where(rounded.abs() > info.max, rounded.sign() * math.inf, rounded)
    return torch.where(x.isfinite(), rounded, x)


def _stochastic_bfloat16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic rounding of float32 to bfloat16: add 16 random bits to the bit pattern and truncate them.

    bfloat16 is float32 without the low 16 mantissa bits, so adding r ~ U{0, ..., 2^16 - 1} carries into
    bfloat16's last bit with probability low16 / 2^16 = (|x| - lo) / (hi - lo), exactly. The bit pattern
    is sign and magnitude, so the magnitude is rounded and negatives mirror positives; a carry out of the
    mantissa steps into the next binade, or from the largest bfloat16 into inf, just as the value does;
    inf + r truncates back to inf. Working on bits also keeps float32 subnormals (bfloat16's subnormals)
    out of floating-point arithmetic, which the trainer flushes to zero.
    """
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    rounded = ((x.view(torch.int32) + noise) & _BFLOAT16_BITS).view(torch.float32)
    # A NaN's payload plus r may carry anywhere, even through the sign bit; bfloat16 keeps a plain NaN.
    return torch.where(x.isnan(), math.nan, rounded)


@torch.no_grad()
def quantize_parameters_(params: nn.Module | Iterable[torch.Tensor], fmt: NumberFormat | str,
                         mode: RoundingMode, generator: torch.Generator | None = None) -> None:
    """Rounds every floating-point parameter to `fmt` in place, so that weights are stored in it.

    Called after each optimizer step: the update w - lr·g is computed in full precision, then rounded.
    With stochastic rounding an update smaller than half the spacing survives in expectation; rounding
    to nearest drops it (Gupta et al. 2015, §3). Buffers (batch-norm statistics), gradients and the
    optimizer's state keep full precision. Parameters are rounded in order, each drawing its random
    numbers from `generator`.

    Args:
        params: a module (its `parameters()`) or the tensors themselves.
        fmt: the format, or its spec for `parse_format`.
        mode: "nearest" or "stochastic".
        generator: source of all random numbers in stochastic mode (torch's default one if None).
    """
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    for tensor in tensors:
        if tensor.is_floating_point():
            rounded = round_to(tensor, fmt, mode, generator)
            if rounded is not tensor:
                tensor.copy_(rounded)


def rounding_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for the rounding after optimizer step `step` of a run with seed `seed`.

    A generator derived from (seed, step) needs no state in checkpoints, so a resumed run rounds exactly
    as an uninterrupted one. torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so
    a combination such as seed·2^32 + step would give every step the same stream; a 32-bit hash of the
    seed plus the step keeps the first 2^32 steps of a run apart and different seeds apart.
    """
    offset = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")
    return torch.Generator().manual_seed((offset + step) % (1 << 32))
