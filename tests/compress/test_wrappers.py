"""Wrappers: error feedback conserves the residual, masking selects per parameter, chains re-encode wires."""

import math

import pytest
import torch

from polytrain.compress import COMPRESSORS, NoCompression, Payload, index_dtype
from polytrain.compress.packing import packed_bytes
from polytrain.compress.quantize import Float16, KBit
from polytrain.compress.sign import OneBit
from polytrain.compress.wrappers import Chain, ErrorFeedback, Masked


def _gradient(shape=(6, 50), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


INNERS = ["none", "fp16", "bf16", "kbit", "qsgd", "terngrad", "signsgd", "topk", "randomk", "threshold"]


@pytest.mark.parametrize("name", INNERS)
def test_error_feedback_conserves_every_step(name):
    """decompress(payload) + new residual == input + old residual; over steps nothing is lost."""
    compressor = ErrorFeedback(COMPRESSORS.get(name)())
    assert compressor.aggregation == compressor.inner.aggregation
    assert compressor.fixed_size == compressor.inner.fixed_size
    state = compressor.init(_gradient())
    assert set(state) == {"residual"} | {f"inner.{key}" for key in compressor.inner.init(_gradient())}
    sent, total = torch.zeros(6, 50), torch.zeros(6, 50)
    for step in range(5):
        g = _gradient(seed=step)
        old = state["residual"]
        payload, state = compressor.compress(g, state)
        out = compressor.decompress(payload)
        assert torch.allclose(out + state["residual"], g + old, atol=1e-5)
        assert payload.nbytes() <= compressor.payload_bytes(300)
        sent += out
        total += g
    assert torch.allclose(sent + state["residual"], total, atol=1e-4)


def test_error_feedback_passes_the_inner_state_through():
    compressor = ErrorFeedback(KBit(bits=2))
    state = compressor.init(_gradient())
    for _ in range(3):
        _, state = compressor.compress(_gradient(), state)
    assert int(state["inner.step"]) == 3


def test_error_feedback_delegates_combine():
    compressor = ErrorFeedback(COMPRESSORS.get("signsgd")())
    tensors = [_gradient(seed=s) for s in range(3)]
    payloads = [compressor.compress(t, compressor.init(t))[0] for t in tensors]
    assert torch.equal(compressor.combine(payloads), compressor.inner.combine(payloads))


@pytest.mark.parametrize("name", ["onebit", "efsignsgd", "dgc", "powersgd"])
def test_error_feedback_refuses_builtin_error_feedback(name):
    with pytest.raises(ValueError, match=f"compressor {name} has error feedback built in"):
        ErrorFeedback(COMPRESSORS.get(name)())


def test_masked_selects_per_parameter():
    inner = KBit(bits=4)
    masked = Masked(inner, min_numel=100, exclude_biases=True, exclude=r"(^|\.)bn\d*\.")
    weight = torch.zeros(20, 10)
    assert masked.select("layer1.weight", weight) is inner
    assert isinstance(masked.select("layer1.weight", torch.zeros(9, 10)), NoCompression)  # < min_numel
    assert isinstance(masked.select("fc.bias", torch.zeros(500)), NoCompression)  # 1-D
    assert isinstance(masked.select("block.bn1.weight", weight), NoCompression)  # matches exclude
    assert masked.select("block.bnx.weight", weight) is inner


def test_masked_min_rate_uses_the_inner_payload_size():
    inner = KBit(bits=8)  # 8 + n bytes against 4 n: rate 4n / (8 + n)
    masked = Masked(inner)  # min_rate 1.0: never send more than float32 would
    assert isinstance(masked.select("w", torch.zeros(2)), NoCompression)  # 8 / 10 < 1
    assert masked.select("w", torch.zeros(3)) is inner  # 12 / 11
    assert isinstance(masked.select("w", torch.zeros(0)), NoCompression)
    strict = Masked(inner, min_rate=3.5)  # 4 n / (8 + n) >= 3.5  <=>  n >= 56
    assert isinstance(strict.select("w", torch.zeros(55)), NoCompression)
    assert strict.select("w", torch.zeros(56)) is inner
    none = COMPRESSORS.get("none")()
    assert Masked(none).select("w", torch.zeros(10)) is none  # rate exactly 1
    assert masked.rate(100) == pytest.approx(400 / 108)


def test_masked_delegates_the_protocol():
    inner = COMPRESSORS.get("powersgd")()
    masked = Masked(inner)
    assert masked.aggregation == "sum" and masked.rounds == 2 and masked.fixed_size
    x = _gradient()
    payload, state = masked.compress(x, masked.init(x))
    payload, state = masked.refine(payload, state)
    assert masked.decompress(payload).shape == x.shape
    assert masked.payload_bytes(300) == inner.payload_bytes(300)
    assert Masked(KBit()).per_rank_seed and not Masked(Float16()).per_rank_seed


def test_wrappers_forward_their_members_traits():
    dgc, fp16, kbit = COMPRESSORS.get("dgc")(), Float16(), KBit()
    chain = Chain(dgc, fp16)
    assert chain.owns_momentum and chain.error_feedback_builtin and not chain.per_rank_seed
    assert chain.rounds == 1 and chain.fixed_size and not Masked(COMPRESSORS.get("threshold")()).fixed_size
    assert Chain(NoCompression(), fp16).elementwise and not Chain(NoCompression(), kbit).elementwise
    assert Masked(dgc).owns_momentum and Masked(dgc).error_feedback_builtin and Masked(fp16).elementwise
    wrapped = ErrorFeedback(kbit)
    assert wrapped.per_rank_seed and not wrapped.owns_momentum and not wrapped.error_feedback_builtin
    assert Masked(wrapped).per_rank_seed and Masked(wrapped).rounds == 1


def test_every_compressor_selects_itself_unless_masked():
    x = _gradient()
    for name in COMPRESSORS.names():
        compressor = COMPRESSORS.get(name)()
        assert compressor.select("w", x) is compressor
    wrapped = ErrorFeedback(Float16())
    assert wrapped.select("w", x) is wrapped


@pytest.mark.parametrize("kwargs, message", [
    ({"min_numel": -1}, "min_numel must be an integer >= 0"),
    ({"exclude_biases": "yes"}, "exclude_biases must be true or false"),
    ({"exclude": "(bias"}, "exclude '\\(bias' is not a valid regular expression"),
    ({"exclude": 3}, "exclude must be a regular expression string"),
    ({"min_rate": -0.5}, "min_rate must be a number >= 0"),
])
def test_masked_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Masked(KBit(), **kwargs)


def test_chain_none_then_fp16_is_summable_and_rounds_like_fp16():
    chain = Chain(NoCompression(), Float16())
    assert chain.name == "none+fp16" and chain.aggregation == "sum" and chain.fixed_size
    x, y = _gradient(seed=1), _gradient(seed=2)
    px, _ = chain.compress(x, chain.init(x))
    py, _ = chain.compress(y, chain.init(y))
    assert [t.dtype for t in px.wire] == [torch.float16] and px.nbytes() == chain.payload_bytes(300) == 600
    out = chain.decompress(px)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x.half().float())
    summed = Payload([px.wire[0] + py.wire[0]], px.context)  # what the allreduce does
    assert torch.equal(chain.decompress(summed), (x.half() + y.half()).float())


def test_chain_topk_then_fp16_keeps_indices_and_halves_values():
    topk = COMPRESSORS.get("topk")(ratio=0.1)
    chain = Chain(topk, Float16())
    assert chain.aggregation == "sparse"
    x = _gradient()
    payload, _ = chain.compress(x, chain.init(x))
    plain, _ = topk.compress(x, topk.init(x))
    indices, values = payload.wire
    assert torch.equal(indices, plain.wire[0]) and indices.dtype == index_dtype(300)
    assert values.dtype == torch.float16 and torch.equal(values, plain.wire[1].half())
    expected = topk.decompress(Payload([plain.wire[0], plain.wire[1].half().float()], plain.context))
    assert torch.equal(chain.decompress(payload), expected)
    assert payload.nbytes() == chain.payload_bytes(300) == 30 * (2 + 2)


def test_chain_topk_then_kbit_gathers_and_conserves_under_error_feedback():
    chain = Chain(COMPRESSORS.get("topk")(ratio=0.1), KBit(bits=4))
    assert chain.aggregation == "gather" and chain.per_rank_seed
    x = _gradient()
    payload, state = chain.compress(x, chain.init(x))
    assert int(state["second.step"]) == 1
    assert payload.nbytes() == chain.payload_bytes(300) == 30 * 2 + 8 + packed_bytes(30, 4)
    out = chain.decompress(payload)
    assert out.shape == x.shape and (out != 0).sum() <= 30
    wrapped = ErrorFeedback(chain)
    state = wrapped.init(x)
    old = state["residual"]
    payload, state = wrapped.compress(x, state)
    assert torch.allclose(wrapped.decompress(payload) + state["residual"], x + old, atol=1e-5)


def test_chain_of_a_summable_first_stays_summable():
    randomk = COMPRESSORS.get("randomk")(ratio=0.2, seed=3)
    chain = Chain(randomk, COMPRESSORS.get("bf16")())
    assert chain.aggregation == "sum"
    x, y = _gradient(seed=1), _gradient(seed=2)
    px, _ = chain.compress(x, chain.init(x))
    py, _ = chain.compress(y, chain.init(y))
    summed = Payload([px.wire[0] + py.wire[0]], px.context)
    assert torch.allclose(chain.decompress(summed), chain.decompress(px) + chain.decompress(py), atol=0.05)
    assert px.nbytes() == chain.payload_bytes(300) == 2 * 60


def test_chain_with_a_non_summable_second_gathers():
    chain = Chain(NoCompression(), KBit(bits=2))
    assert chain.aggregation == "gather"
    x = _gradient()
    payload, _ = chain.compress(x, chain.init(x))
    assert payload.nbytes() == chain.payload_bytes(300) == 8 + math.ceil(300 * 2 / 8)


@pytest.mark.parametrize("first, second, message", [
    ("none", "onebit", "onebit keeps a residual"),
    ("powersgd", "fp16", "powersgd: it runs 2 rounds"),
    ("none", "powersgd", "powersgd: it runs 2 rounds"),
    ("threshold", "fp16", "threshold sends wire tensors whose sizes differ"),
])
def test_chain_refuses_what_it_cannot_compose(first, second, message):
    with pytest.raises(ValueError, match=message):
        Chain(COMPRESSORS.get(first)(), COMPRESSORS.get(second)())


def test_error_feedback_refuses_onebit_directly():
    with pytest.raises(ValueError, match="built in"):
        ErrorFeedback(OneBit())


def test_masked_does_not_exclude_variable_size_compressors_by_their_upper_bound():
    from polytrain.compress.sparsify import Threshold
    masked = Masked(Threshold(tau=0.1), exclude_biases=True)  # payload_bytes bounds 4.125 bytes per element
    assert masked.select("fc.weight", torch.zeros(300, 200)) is masked.inner
