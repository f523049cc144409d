"""Quantizers: fp16/bf16 round-off bounds, unbiasedness of kbit/qsgd/terngrad, wire formats, seeding."""

import math

import pytest
import torch

from polytrain.compress import COMPRESSORS, Payload
from polytrain.compress.packing import unpack, unpack_trits
from polytrain.compress.quantize import QSGD, BFloat16, Float16, KBit, TernGrad

STOCHASTIC = ["kbit", "qsgd", "terngrad"]


def _gradient(numel: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def _draws(compressor, tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` successive decompressions (one per step) of the same tensor: (count, *tensor.shape)."""
    state = compressor.init(tensor)
    out = []
    for _ in range(count):
        payload, state = compressor.compress(tensor, state)
        out.append(compressor.decompress(payload))
    return torch.stack(out)


@pytest.mark.parametrize("compressor", [KBit(bits=2), KBit(bits=8), QSGD(levels=2), QSGD(levels=16, bucket=64),
                                        TernGrad(), TernGrad(clip=10.0)], ids=lambda c: f"{c.name}")
def test_stochastic_quantizers_are_unbiased(compressor):
    """The mean of N draws lies within 5 standard errors of the input, element by element and overall."""
    x = _gradient(200, seed=1)
    x[7] = 0.0
    draws = _draws(compressor, x, 2000).double()
    mean = draws.mean(0)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.all((mean - x.double()).abs() <= 5 * stderr + 1e-6)
    # The element-wise z-scores of an unbiased estimator average to about 0 (sd 1 / sqrt(200)).
    z = (mean - x.double())[stderr > 0] / stderr[stderr > 0]
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


def test_terngrad_variance_matches_the_bernoulli_formula():
    """Var[s sign(g) b] = s |g| - g^2 for b ~ Bernoulli(|g| / s) (Wen et al. 2017, eq. 2)."""
    x = _gradient(50, seed=2)
    draws = _draws(TernGrad(), x, 4000).double()
    expected = x.abs().max().double() * x.abs().double() - x.double() ** 2
    assert torch.allclose(draws.var(0), expected, rtol=0.15, atol=1e-3)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeded_draws_reproduce_and_resume(name):
    """The same seed and state give the same payload; a restored state continues the same sequence."""
    x = _gradient(300)
    a, b = COMPRESSORS.get(name)(seed=5), COMPRESSORS.get(name)(seed=5)
    state_a, state_b = a.init(x), b.init(x)
    for _ in range(3):
        payload_a, state_a = a.compress(x, state_a)
        payload_b, state_b = b.compress(x, state_b)
        assert all(torch.equal(u, v) for u, v in zip(payload_a.wire, payload_b.wire))
    assert int(state_a["step"]) == 3
    saved = {key: value.clone() for key, value in state_a.items()}
    continued, _ = a.compress(x, state_a)
    resumed, _ = COMPRESSORS.get(name)(seed=5).compress(x, saved)
    assert all(torch.equal(u, v) for u, v in zip(continued.wire, resumed.wire))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_draws_differ_between_seeds_steps_and_tensors(name):
    x = _gradient(300)
    compressor = COMPRESSORS.get(name)(seed=0)
    first_state, second_state = compressor.init(x), compressor.init(x)
    assert int(first_state["stream"]) != int(second_state["stream"])
    step0, state = compressor.compress(x, first_state)
    step1, _ = compressor.compress(x, state)
    other_tensor, _ = compressor.compress(x, second_state)
    other_seed, _ = COMPRESSORS.get(name)(seed=1).compress(x, first_state)
    for payload in (step1, other_tensor, other_seed):
        assert not torch.equal(payload.wire[1], step0.wire[1])
    assert COMPRESSORS.get(name).per_rank_seed is True


def test_compress_leaves_its_inputs_alone():
    x = _gradient(100)
    for name in STOCHASTIC:
        compressor = COMPRESSORS.get(name)()
        state = compressor.init(x)
        before = x.clone()
        _, new_state = compressor.compress(x, state)
        assert torch.equal(x, before) and int(state["step"]) == 0 and int(new_state["step"]) == 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_kbit_codes_header_and_error_bound(bits):
    x = _gradient(1000, seed=bits).view(10, 100)
    compressor = KBit(bits=bits)
    payload, _ = compressor.compress(x, compressor.init(x))
    bounds, packed = payload.wire
    assert bounds.dtype == torch.float32 and bounds.tolist() == [x.min().item(), x.max().item()]
    assert packed.numel() == math.ceil(1000 * bits / 8)
    assert int(unpack(packed, 1000, bits).max()) <= (1 << bits) - 1
    out = compressor.decompress(payload)
    assert out.shape == x.shape and out.dtype == torch.float32
    step = (x.max() - x.min()) / ((1 << bits) - 1)
    assert torch.all((out - x).abs() <= step * (1 + 1e-5))  # rounds to one of the two nearest levels


def test_kbit_is_exact_on_its_grid_and_for_constants():
    grid = torch.tensor([-1.0, 0.0, 2.0, 1.0, -1.0])  # levels -1, 0, 1, 2 of a 2-bit code
    compressor = KBit(bits=2)
    payload, _ = compressor.compress(grid, compressor.init(grid))
    assert torch.equal(compressor.decompress(payload), grid)
    constant = torch.full((2, 3), -0.25)
    payload, _ = compressor.compress(constant, compressor.init(constant))
    assert torch.equal(compressor.decompress(payload), constant)


def test_qsgd_wire_format_and_levels():
    x = _gradient(100, seed=3)
    compressor = QSGD(levels=1)  # ternary: {-||x||, 0, +||x||}
    payload, _ = compressor.compress(x, compressor.init(x))
    norms, packed = payload.wire
    assert torch.allclose(norms, torch.linalg.vector_norm(x).reshape(1))
    assert packed.numel() == math.ceil(100 * 2 / 8)  # sign bit + 1 level bit
    out = compressor.decompress(payload)
    assert set(out.abs().unique().tolist()) <= {0.0, norms.item()}
    assert torch.all(out * x >= 0)  # the sign is kept
    assert QSGD(levels=16).level_bits == 5 and QSGD(levels=15).level_bits == 4
    assert QSGD(levels=127).level_bits == 7


def test_qsgd_buckets_have_their_own_norms_and_bound_the_error():
    x = _gradient(250, seed=4)
    x[200:] *= 100  # a loud last bucket must not swamp the others
    compressor = QSGD(levels=8, bucket=100)
    payload, _ = compressor.compress(x, compressor.init(x))
    norms = payload.wire[0]
    expected = torch.stack([torch.linalg.vector_norm(part) for part in x.split(100)])
    assert torch.allclose(norms, expected)
    out = compressor.decompress(payload)
    per_element = torch.cat([n.expand(len(part)) for n, part in zip(norms, x.split(100))])
    assert torch.all((out - x).abs() <= per_element / 8 * (1 + 1e-5))  # one level of its own bucket
    assert compressor.payload_bytes(250) == 4 * 3 + math.ceil(250 * 5 / 8)


def test_terngrad_values_scale_and_trits():
    x = _gradient(101, seed=5)
    compressor = TernGrad()
    payload, _ = compressor.compress(x, compressor.init(x))
    scale, packed = payload.wire
    assert scale.item() == x.abs().max().item()
    assert packed.numel() == math.ceil(101 / 5)
    codes = unpack_trits(packed, 101)
    out = compressor.decompress(payload)
    assert torch.equal(out, (codes.float() - 1) * scale)
    assert torch.all(out * x >= 0)
    assert out[x.abs().argmax()] == x[x.abs().argmax()]  # |g| = s is sent with probability 1


def test_terngrad_clip_bounds_the_scale_by_sigmas():
    x = _gradient(1000, seed=6)
    x[0] = 50.0  # an outlier that would otherwise set s
    compressor = TernGrad(clip=2.5)
    payload, _ = compressor.compress(x, compressor.init(x))
    assert torch.isclose(payload.wire[0][0], 2.5 * x.std(correction=0))
    one = torch.tensor([0.3])  # sigma = 0: nothing is clipped
    payload, _ = compressor.compress(one, compressor.init(one))
    assert torch.equal(compressor.decompress(payload), one)


@pytest.mark.parametrize("cast, unit_roundoff", [(Float16(), 2.0 ** -11), (BFloat16(), 2.0 ** -8)])
def test_casts_round_within_unit_roundoff_and_sum(cast, unit_roundoff):
    x = _gradient(1000).view(20, 50) * 10
    payload, state = cast.compress(x, cast.init(x))
    assert state == {} and payload.wire[0].dtype == cast.dtype and cast.aggregation == "sum"
    out = cast.decompress(payload)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.all((out - x).abs() <= unit_roundoff * x.abs())
    # "sum": the allreduce adds the payloads in the 16-bit format; decompressing gives that sum.
    y = _gradient(1000, seed=9).view(20, 50)
    summed = Payload([payload.wire[0] + cast.compress(y, {})[0].wire[0]], payload.context)
    assert torch.equal(cast.decompress(summed), (x.to(cast.dtype) + y.to(cast.dtype)).float())


def test_none_is_exact():
    none = COMPRESSORS.get("none")()
    x = _gradient(64).view(4, 4, 4)
    payload, _ = none.compress(x, none.init(x))
    assert torch.equal(none.decompress(payload), x)


@pytest.mark.parametrize("make, message", [
    (lambda: KBit(bits=0), "kbit bits must be an integer in 1..8"),
    (lambda: KBit(bits=2.5), "kbit bits"),
    (lambda: KBit(seed=-1), "kbit seed"),
    (lambda: QSGD(levels=128), "qsgd levels must be an integer in 1..127"),
    (lambda: QSGD(bucket=-1), "qsgd bucket must be an integer >= 0"),
    (lambda: TernGrad(clip=0), "terngrad clip must be a number > 0 or none"),
    (lambda: TernGrad(clip="x"), "terngrad clip"),
])
def test_bad_arguments_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
