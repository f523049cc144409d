"""Momentum correction: DGC without its extras around error-feedback top-k, SGD momentum around none."""

import io

import pytest
import torch

from polytrain.compress import COMPRESSORS, Masked, NoCompression
from polytrain.compress.dgc import DeepGradientCompression
from polytrain.compress.momentum import MomentumCorrection
from polytrain.compress.powersgd import PowerSGD
from polytrain.compress.sparsify import TopK
from polytrain.compress.wrappers import ErrorFeedback


def _gradient(shape=(6, 50), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_around_error_feedback_topk_it_is_dgc_without_clipping_warmup_and_masking():
    corrected = MomentumCorrection(ErrorFeedback(TopK(ratio=0.05)), momentum=0.9)
    dgc = DeepGradientCompression(ratio=0.05, momentum=0.9, clip=None, warmup_steps=0, momentum_masking=False)
    ours, theirs = corrected.init(_gradient()), dgc.init(_gradient())
    for step in range(8):
        g = _gradient(seed=step)
        payload, ours = corrected.compress(g, ours)
        expected, theirs = dgc.compress(g, theirs)
        for sent, reference in zip(payload.wire, expected.wire, strict=True):
            assert sent.dtype == reference.dtype and torch.equal(sent, reference), step
        assert torch.equal(corrected.decompress(payload), dgc.decompress(expected))
        assert torch.equal(ours["u"], theirs["u"]) and torch.equal(ours["inner.residual"], theirs["v"]), step


def least_squares(parameter: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    inputs, targets = torch.randn(16, 5, generator=generator), torch.randn(16, 3, generator=generator)
    return torch.nn.functional.mse_loss(inputs @ parameter, targets)


@pytest.mark.parametrize("nesterov", [False, True])
def test_around_none_with_plain_sgd_it_is_sgd_with_momentum(nesterov):
    torch.manual_seed(0)
    reference = torch.randn(5, 3, requires_grad=True)
    ours = reference.detach().clone().requires_grad_(True)
    momentum_sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, nesterov=nesterov)
    plain_sgd = torch.optim.SGD([ours], lr=0.1)
    corrected = MomentumCorrection(NoCompression(), momentum=0.9, nesterov=nesterov)
    state = corrected.init(ours)
    for step in range(6):
        for parameter, optimizer in ((reference, momentum_sgd), (ours, plain_sgd)):
            optimizer.zero_grad()
            least_squares(parameter, step).backward()
        payload, state = corrected.compress(ours.grad, state)
        ours.grad = corrected.decompress(payload)
        momentum_sgd.step()
        plain_sgd.step()
        # Heavy ball: the same float operations as torch's buffer, bit for bit. Nesterov: torch forms
        # g + m u in one add with alpha (a fused multiply-add), which parts by an ulp or two.
        tolerance = dict(rtol=1e-6, atol=1e-7) if nesterov else dict(rtol=0, atol=0)
        torch.testing.assert_close(ours, reference, **tolerance)
        torch.testing.assert_close(state["u"], momentum_sgd.state[reference]["momentum_buffer"], **tolerance)


def test_state_checkpoints_as_a_dict_of_tensors_and_resumes_exactly():
    corrected = MomentumCorrection(ErrorFeedback(TopK(ratio=0.1)), momentum=0.5)
    state = corrected.init(_gradient())
    for step in range(3):
        _, state = corrected.compress(_gradient(seed=step), state)
    assert set(state) == {"u", "inner.residual"} and all(isinstance(v, torch.Tensor) for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    straight, _ = corrected.compress(_gradient(seed=3), state)
    resumed, _ = corrected.compress(_gradient(seed=3), restored)
    assert all(torch.equal(a, b) for a, b in zip(straight.wire, resumed.wire, strict=True))


def test_the_inner_state_is_prefixed_and_passed_through():
    corrected = MomentumCorrection(COMPRESSORS.get("kbit")(bits=2), momentum=0.9)
    state = corrected.init(_gradient())
    for _ in range(3):
        _, state = corrected.compress(_gradient(), state)
    assert int(state["inner.step"]) == 3


def test_each_pick_of_a_mask_keeps_its_momentum():
    masked = Masked(ErrorFeedback(TopK(ratio=0.1)), exclude_biases=True)
    corrected = MomentumCorrection(masked, momentum=0.9)
    weight, bias = corrected.select("fc.weight", torch.zeros(6, 50)), corrected.select("fc.bias", torch.zeros(6))
    assert isinstance(weight, MomentumCorrection) and weight.inner is masked.inner
    assert isinstance(bias, MomentumCorrection) and isinstance(bias.inner, NoCompression)
    state = bias.init(torch.zeros(6))
    for _ in range(2):
        payload, state = bias.compress(torch.ones(6), state)
    assert torch.equal(bias.decompress(payload), torch.full((6,), 0.9 * 1.0 + 1.0))
    plain = MomentumCorrection(TopK(ratio=0.1), momentum=0.9)
    assert plain.select("fc.weight", torch.zeros(6, 50)) is plain


def test_traits_are_the_inner_compressors_and_it_owns_the_momentum():
    corrected = MomentumCorrection(ErrorFeedback(TopK(ratio=0.1)), momentum=0.9)
    assert corrected.name == "momentum_correction(ef(topk))"
    assert (corrected.aggregation, corrected.fixed_size, corrected.rounds) == ("sparse", True, 1)
    assert corrected.owns_momentum and not corrected.elementwise
    assert corrected.payload_bytes(300) == corrected.inner.payload_bytes(300)
    assert MomentumCorrection(PowerSGD(rank=2), momentum=0.9).rounds == 2


@pytest.mark.parametrize("inner, momentum, nesterov, message", [
    (TopK(), 1.0, False, r"momentum must be a number in \[0, 1\); got 1.0"),
    (TopK(), 0.9, "yes", "nesterov must be true or false"),
    (DeepGradientCompression(), 0.9, False, "compressor dgc applies momentum itself"),
])
def test_bad_arguments_fail_in_one_line(inner, momentum, nesterov, message):
    with pytest.raises(ValueError, match=message):
        MomentumCorrection(inner, momentum, nesterov)
