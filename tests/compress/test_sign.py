"""One-bit compressors: reconstruction values, error feedback, and signSGD's majority vote."""

import pytest
import torch

from polytrain.compress import Payload
from polytrain.compress.packing import unpack
from polytrain.compress.sign import EFSignSGD, OneBit, SignSGD


def _gradient(shape=(7, 13), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_onebit_reconstructs_the_means_of_each_side():
    x = _gradient()
    compressor = OneBit()
    payload, state = compressor.compress(x, compressor.init(x))
    means, packed = payload.wire
    assert means.tolist() == pytest.approx([x[x >= 0].mean().item(), x[x < 0].mean().item()], rel=1e-6)
    assert torch.equal(unpack(packed, x.numel(), 1).bool(), (x >= 0).reshape(-1))
    out = compressor.decompress(payload)
    assert torch.equal(out, torch.where(x >= 0, means[0], means[1]))
    assert torch.allclose(out + state["residual"], x, atol=1e-6)


def test_onebit_error_feedback_loses_nothing_over_steps():
    """sum of what was sent + the last residual == sum of the gradients (Seide et al. 2014, sec. 3)."""
    compressor = OneBit()
    state = compressor.init(_gradient())
    sent = torch.zeros(7, 13)
    total = torch.zeros(7, 13)
    for step in range(20):
        g = _gradient(seed=step)
        payload, state = compressor.compress(g, state)
        sent += compressor.decompress(payload)
        total += g
    assert torch.allclose(sent + state["residual"], total, atol=1e-4)


def test_onebit_one_sided_and_empty_tensors():
    compressor = OneBit()
    positive = torch.tensor([1.0, 2.0, 3.0])
    payload, state = compressor.compress(positive, compressor.init(positive))
    assert payload.wire[0].tolist() == [2.0, 0.0]
    assert torch.equal(state["residual"], torch.tensor([-1.0, 0.0, 1.0]))
    empty = torch.zeros(0)
    payload, _ = compressor.compress(empty, compressor.init(empty))
    assert payload.nbytes() == 8 and compressor.decompress(payload).shape == (0,)


def _payloads(compressor, tensors):
    return [compressor.compress(t, compressor.init(t))[0] for t in tensors]


def test_signsgd_majority_vote_scaled_by_the_ranks_scales():
    ranks = [_gradient(seed=seed) for seed in range(5)]
    compressor = SignSGD()
    payloads = _payloads(compressor, ranks)
    signs = torch.stack([torch.where(t >= 0, 1.0, -1.0) for t in ranks])
    scales = torch.stack([t.abs().mean() for t in ranks])
    expected = torch.sign(signs.sum(0)) * scales.sum()
    assert torch.allclose(compressor.combine(payloads), expected)
    assert torch.allclose(compressor.decompress(payloads[0]), signs[0] * scales[0])


def test_signsgd_tied_vote_is_zero_and_unscaled_vote_is_p_times_sign():
    a = torch.tensor([1.0, -2.0, 3.0, -0.5])
    b = torch.tensor([-1.0, -1.0, 2.0, 0.5])
    scaled, bare = SignSGD(), SignSGD(scale=False)  # scales: 1.625 + 1.125 = 2.75
    assert torch.equal(scaled.combine(_payloads(scaled, [a, b])), torch.tensor([0.0, -2.75, 2.75, 0.0]))
    assert torch.equal(bare.combine(_payloads(bare, [a, b])), torch.tensor([0.0, -2.0, 2.0, 0.0]))
    assert torch.equal(bare.combine(_payloads(bare, [a, b, b])), torch.tensor([-3.0, -3.0, 3.0, 3.0]))
    assert torch.equal(bare.decompress(_payloads(bare, [a])[0]), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert bare.payload_bytes(4) == scaled.payload_bytes(4) == 5


def test_signsgd_zero_is_sent_as_positive():
    compressor = SignSGD()
    x = torch.tensor([0.0, -1.0])
    assert compressor.decompress(_payloads(compressor, [x])[0]).tolist() == [0.5, -0.5]


def test_efsignsgd_sends_the_scaled_sign_and_keeps_the_error():
    compressor = EFSignSGD()
    state = compressor.init(_gradient())
    residual = state["residual"]
    sent, total = torch.zeros(7, 13), torch.zeros(7, 13)
    for step in range(10):
        g = _gradient(seed=step)
        corrected = g + residual
        payload, state = compressor.compress(g, state)
        out = compressor.decompress(payload)
        scale = corrected.abs().sum() / corrected.numel()  # ||g + e||_1 / d (Karimireddy et al., Alg. 1)
        assert torch.allclose(out, scale * torch.where(corrected >= 0, 1.0, -1.0))
        assert torch.allclose(state["residual"], corrected - out, atol=1e-6)
        residual = state["residual"]
        sent += out
        total += g
    assert torch.allclose(sent + residual, total, atol=1e-4)


@pytest.mark.parametrize("compressor", [OneBit(), EFSignSGD()], ids=lambda c: c.name)
def test_builtin_error_feedback_is_declared_and_state_is_functional(compressor):
    assert compressor.error_feedback_builtin is True and compressor.per_rank_seed is False
    x = _gradient()
    state = compressor.init(x)
    _, first = compressor.compress(x, state)
    assert torch.equal(state["residual"], torch.zeros(7, 13))  # the given state is not modified
    payload, second = compressor.compress(x, first)
    assert not torch.equal(first["residual"], second["residual"])
    assert isinstance(payload, Payload)


def test_signsgd_scale_must_be_a_flag():
    with pytest.raises(ValueError, match="signsgd scale must be true or false"):
        SignSGD(scale="false")
