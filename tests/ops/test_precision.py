"""Rounding to fixed point, fp16 and bf16, to nearest and stochastically (Gupta et al. 2015)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from polytrain.ops.precision import (NumberFormat, parse_format, quantize_parameters_, round_to,
                                     rounding_generator)

FORMATS = ["fixed:2.14", "fixed:8.8", "fixed:1.24", "fixed:25.0", "fp16", "bf16"]
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SIGMAS = 5  # bound of every statistical test; the seeds are fixed, so the tests are deterministic
DRAWS = 20_000  # stochastic roundings of each value in the statistical tests


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Runs each test on one intra-op thread (the tensors are small and the machine's two cores shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wide_values(dtype: torch.dtype) -> torch.Tensor:
    """Both signs, magnitudes log-uniform in [2^-30, 2^20] (fp16 subnormals and overflow included)."""
    g = seeded(1)
    magnitudes = torch.exp2(torch.empty(20_000, dtype=torch.float64).uniform_(-30, 20, generator=g))
    signs = torch.randint(0, 2, magnitudes.shape, generator=g) * 2 - 1
    return (signs * magnitudes).to(dtype)


def assert_representable(y: torch.Tensor, fmt: NumberFormat) -> None:
    if fmt.kind == "fixed":
        steps = y / fmt.resolution
        assert torch.equal(steps, steps.round())
        assert fmt.min_value <= y.min() and y.max() <= fmt.max_value
        return
    dtype = FLOAT_DTYPES[fmt.kind]
    assert torch.equal(y.to(dtype).to(y.dtype), y)
    if fmt.kind == "bf16" and y.dtype == torch.float32:
        assert not (y.view(torch.int32) & 0xFFFF).any()  # bfloat16 is float32's high 16 bits


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", FORMATS)
def test_results_are_representable_and_rounding_them_again_changes_nothing(spec, dtype, mode):
    fmt = parse_format(spec)
    y = round_to(wide_values(dtype), fmt, mode, seeded())
    assert y.dtype == dtype
    assert_representable(y, fmt)
    assert torch.equal(round_to(y, fmt, mode, seeded(1)), y)


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_nearest_is_torchs_own_cast(spec):
    x = wide_values(torch.float32)
    assert torch.equal(round_to(x, spec, "nearest"), x.to(FLOAT_DTYPES[spec]).to(torch.float32))


def test_fixed_point_nearest_rounds_ties_to_even():
    eps = 2.0 ** -8
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51]) * eps
    assert round_to(x, "fixed:8.8", "nearest").div(eps).tolist() == [0, 2, 2, 0, -2, 0, 1]


def test_fp32_leaves_tensors_alone():
    x = wide_values(torch.float32)
    assert round_to(x, "fp32", "stochastic") is x


# -- stochastic rounding: between which values, how often ------------------------------------------------

def float_neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest value of `dtype` <= x and the next one up (via torch.nextafter, not the code under test)."""
    nearest = x.to(dtype)
    below = torch.where(nearest.to(x.dtype) > x, torch.nextafter(nearest, torch.full_like(nearest, -math.inf)),
                        nearest)
    return below.to(x.dtype), torch.nextafter(below, torch.full_like(below, math.inf)).to(x.dtype)


def neighbours(x: torch.Tensor, fmt: NumberFormat) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt.kind == "fixed":
        below = torch.floor(x.double() / fmt.resolution) * fmt.resolution
        return below.to(x.dtype), (below + fmt.resolution).to(x.dtype)
    return float_neighbours(x, FLOAT_DTYPES[fmt.kind])


def awkward_values(spec: str) -> list[float]:
    """Values between representable points where rounding is easy to get wrong, both signs."""
    tiny = 2.0 ** -24  # fp16's smallest subnormal
    values = {
        # Just inside the bounds -2^(IL-1) and 2^(IL-1) - eps, and far below eps.
        "fixed:4.8": [2.0 ** -8 * 0.3, 1 + 2.0 ** -10, 7.995, 3.0],
        "fixed:2.14": [2.0 ** -16, 1.99992, 0.123456, 1.0],
        # Around powers of two the spacing halves below and doubles above; 2^-14 is the smallest normal.
        "fp16": [1 + 2.0 ** -12, 2 - 2.0 ** -12, 2 + 2.0 ** -11, 1 / 3, 2.0 ** -14 - 0.3 * tiny,
                 2.0 ** -14 + 0.7 * tiny, 3.3 * tiny, 0.25 * tiny, 0.6 * tiny, 65504 - 10.3, 1.5, 2.0 ** -20],
        "bf16": [1 + 2.0 ** -9, 2 - 2.0 ** -10, 2 + 2.0 ** -8, 1 / 3, 1.3 * 2.0 ** -126, 2.0 ** 127 * 1.99,
                 1e-30, 12345.678, 1.5, 2.0 ** -100],
    }[spec]
    return values + [-v for v in values]


def random_values(fmt: NumberFormat) -> list[float]:
    g = seeded(2)
    if fmt.kind == "fixed":
        return torch.empty(40).uniform_(fmt.min_value, fmt.max_value, generator=g).tolist()
    high = 15 if fmt.kind == "fp16" else 60
    magnitudes = torch.exp2(torch.empty(40, dtype=torch.float64).uniform_(-26, high, generator=g))
    return (magnitudes * (torch.randint(0, 2, (40,), generator=g) * 2 - 1)).tolist()


@pytest.mark.parametrize("spec, dtype", [("fixed:4.8", torch.float32), ("fixed:2.14", torch.float32),
                                         ("fp16", torch.float32), ("bf16", torch.float32),
                                         ("fp16", torch.float64), ("bf16", torch.float64)])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(spec, dtype):
    fmt = parse_format(spec)
    x = torch.tensor(awkward_values(spec) + random_values(fmt), dtype=dtype)
    low, high = neighbours(x, fmt)
    y = round_to(x.expand(DRAWS, -1), fmt, "stochastic", seeded())  # (DRAWS, values)
    up = y == high
    assert (up | (y == low)).all()
    # In float64: differences of tiny bf16 neighbours are float32 subnormals, which the trainer flushes.
    p_up = (x.double() - low.double()) / (high.double() - low.double())  # Gupta eq. 2
    sigma = (p_up * (1 - p_up) / DRAWS).sqrt()
    assert ((up.double().mean(0) - p_up).abs() <= SIGMAS * sigma).all()
    spacing = high.double() - low.double()
    assert ((y.double().mean(0) - x.double()).abs() <= SIGMAS * spacing * sigma).all()


@pytest.mark.parametrize("spec, x, largest, p_overflow", [
    ("fp16", 65520.0, 65504.0, 0.5),  # halfway between fp16's largest (65504) and 2^16
    ("bf16", torch.finfo(torch.float32).max, torch.finfo(torch.bfloat16).max, 1 - 2.0 ** -16),
])
def test_stochastic_float_overflows_to_inf_with_proportional_probability(spec, x, largest, p_overflow):
    y = round_to(torch.full((DRAWS,), -x), spec, "stochastic", seeded())
    overflow = y == -math.inf
    assert (overflow | (y == -largest)).all()
    sigma = math.sqrt(p_overflow * (1 - p_overflow) / DRAWS)
    assert abs(overflow.double().mean().item() - p_overflow) <= SIGMAS * max(sigma, 1 / DRAWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_stochastic_float_keeps_infinities_nans_and_signed_zeros(spec, dtype):
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e9, -1e9], dtype=dtype)
    y = round_to(x, spec, "stochastic", seeded())
    assert y[:2].tolist() == [math.inf, -math.inf] and y[2].isnan()
    assert y[3:5].tolist() == [0.0, 0.0] and y[3:5].signbit().tolist() == [False, True]
    if spec == "fp16":
        assert y[5:].tolist() == [math.inf, -math.inf]  # past fp16's range
    if spec == "bf16" and dtype == torch.float32:
        assert not (y.view(torch.int32) & 0xFFFF).any()  # NaN included
        payloads = torch.tensor([0x7FFFFFFF, -1, 0x7F800001], dtype=torch.int32).view(torch.float32)  # NaNs
        assert not (round_to(payloads, spec, "stochastic", seeded()).view(torch.int32) - 0x7FC00000).any()


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_fixed_point_saturates_at_its_bounds(mode):
    fmt = parse_format("fixed:2.14")
    assert (fmt.min_value, fmt.max_value, fmt.resolution) == (-2.0, 2 - 2.0 ** -14, 2.0 ** -14)
    x = torch.tensor([5.0, -5.0, math.inf, -math.inf, 2.0, -2.0 - 2.0 ** -20, 1.99999, math.nan])
    y = round_to(x, fmt, mode, seeded())
    assert y[:-1].tolist() == [fmt.max_value, -2.0, fmt.max_value, -2.0, fmt.max_value, -2.0, fmt.max_value]
    assert y[-1].isnan()  # NaN is kept so that divergence stays visible


@pytest.mark.parametrize("spec", ["fixed:2.14", "fp16", "bf16"])
def test_stochastic_rounding_is_reproducible_from_the_generator_seed(spec):
    x = wide_values(torch.float32)
    first = round_to(x, spec, "stochastic", seeded(7))
    assert torch.equal(round_to(x, spec, "stochastic", seeded(7)), first)
    assert not torch.equal(round_to(x, spec, "stochastic", seeded(8)), first)


def test_rounding_generators_differ_across_steps_and_seeds_and_repeat_for_the_same_pair():
    draws = {(seed, step): torch.rand(4, generator=rounding_generator(seed, step)) for seed in (0, 1, 2**32)
             for step in range(100)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
    assert torch.equal(torch.rand(4, generator=rounding_generator(1, 5)), draws[1, 5])


# -- weights stored in low precision ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, spacing_at_one", [("fixed:4.8", 2.0 ** -8), ("fp16", 2.0 ** -10),
                                                  ("bf16", 2.0 ** -7)])
def test_updates_below_half_the_spacing_vanish_rounded_to_nearest_but_accumulate_stochastically(
        spec, spacing_at_one):
    # Gupta et al. §3: the motivation for stochastic rounding. w = 1 and SGD adds 0.3125 spacings per step
    # (exact in float32); after `steps` steps the weights stay within [1, 2), where the spacing is constant.
    chains, steps, fraction = 10_000, 100, 0.3125
    final = {}
    for mode in ("nearest", "stochastic"):
        weights = nn.Parameter(torch.ones(chains))
        optimizer = torch.optim.SGD([weights], lr=1.0)
        generator = seeded()
        for _ in range(steps):
            weights.grad = torch.full_like(weights, -fraction * spacing_at_one)
            optimizer.step()
            quantize_parameters_([weights], spec, mode, generator)
        final[mode] = weights.detach()
    assert (final["nearest"] == 1).all()
    exact = 1 + steps * fraction * spacing_at_one
    # Each step adds an independent rounding error of variance p(1 - p)·spacing^2, p = fraction.
    sigma = spacing_at_one * math.sqrt(steps * fraction * (1 - fraction) / chains)
    assert abs(final["stochastic"].double().mean().item() - exact) <= SIGMAS * sigma


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    model(torch.randn(5, 8)).sum().backward()  # gradients and batch-norm statistics to leave alone
    return model


def test_quantize_parameters_rounds_weights_in_place_and_leaves_the_rest():
    model = small_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    pointers = [p.data_ptr() for p in model.parameters()]
    quantize_parameters_(model, "bf16", "stochastic", seeded())
    for name, param in model.named_parameters():
        assert_representable(param.detach(), parse_format("bf16"))
        assert param.requires_grad and param.is_leaf
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])


def test_quantize_parameters_is_reproducible_and_fp32_changes_nothing():
    models = [small_model() for _ in range(3)]
    quantize_parameters_(models[0], "fixed:2.14", "stochastic", seeded(3))
    quantize_parameters_(list(models[1].parameters()), parse_format("fixed:2.14"), "stochastic", seeded(3))
    quantize_parameters_(models[2], "fp32", "stochastic", seeded(3))
    first, second, unrounded = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(unrounded[k], v) for k, v in small_model().state_dict().items())


# -- specs and errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "fixed:2.14", "fixed:1.0", "fixed:16.9"])
def test_specs_parse_and_print_back(spec):
    assert str(parse_format(spec)) == spec


@pytest.mark.parametrize("spec", ["fp8", "", "FP16", "fixed", "fixed:2", "fixed:2.14.1", "fixed:-1.3", "fixed2.14"])
def test_unknown_specs_name_the_valid_forms(spec):
    with pytest.raises(ValueError) as info:
        parse_format(spec)
    assert str(info.value) == (f"unknown number format {spec!r}; expected fp32, fp16, bf16 or fixed:IL.FL "
                               f"(e.g. fixed:2.14)")


@pytest.mark.parametrize("spec, message", [
    ("fixed:0.8", "fixed:0.8 needs at least 1 integer bit (the sign)"),
    ("fixed:16.10", "fixed:16.10 has 16 + 10 = 26 bits; at most 25 keep every value exact in float32"),
])
def test_impossible_fixed_point_formats_say_why(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_format(spec)


def test_bad_modes_dtypes_and_formats_fail_with_one_line():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="unknown rounding mode 'up'; expected nearest or stochastic"):
        round_to(x, "fp16", "up")
    with pytest.raises(TypeError, match="float32 or float64 tensors, not torch.float16"):
        round_to(x.half(), "fixed:2.14", "nearest")
    with pytest.raises(ValueError, match="fp16 has no integer or fractional bits"):
        NumberFormat("fp16", 2, 14)
    with pytest.raises(ValueError, match="unknown number format kind 'fp8'"):
        NumberFormat("fp8")
