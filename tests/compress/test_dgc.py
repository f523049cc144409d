"""Deep Gradient Compression against torch.optim.SGD and a hand-checked example."""

import math

import pytest
import torch

from polytrain.compress import COMPRESSORS, index_dtype
from polytrain.compress.dgc import DeepGradientCompression


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int,
          compressor: DeepGradientCompression | None = None) -> None:
    """A few steps of least squares on fixed data; the gradients go through `compressor` if given."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(steps, 16, 5, generator=generator)
    targets = torch.randn(steps, 16, 3, generator=generator)
    states = {name: compressor.init(p) for name, p in model.named_parameters()} if compressor else {}
    for step in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs[step]), targets[step]).backward()
        for name, parameter in model.named_parameters():
            if compressor:
                payload, states[name] = compressor.compress(parameter.grad, states[name])
                parameter.grad = compressor.decompress(payload)
        optimizer.step()


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_full_density_without_masking_is_sgd_with_momentum():
    """At ratio 1 the sent tensor is the momentum buffer u: dgc + SGD == SGD(momentum=m)."""
    model, twin = models()
    train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=10)
    dgc = DeepGradientCompression(ratio=1.0, momentum=0.9, momentum_masking=False)
    train(twin, torch.optim.SGD(twin.parameters(), lr=0.1), steps=10, compressor=dgc)
    for expected, actual in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_full_density_with_masking_is_plain_sgd():
    """Momentum factor masking zeroes u wherever it is sent: at ratio 1 nothing carries over."""
    model, twin = models()
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=10)
    dgc = DeepGradientCompression(ratio=1.0, momentum=0.9)
    train(twin, torch.optim.SGD(twin.parameters(), lr=0.1), steps=10, compressor=dgc)
    for expected, actual in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masking", [True, False])
def test_hand_checked_accumulation_and_masking(masking):
    dgc = DeepGradientCompression(ratio=0.25, momentum=0.5, momentum_masking=masking)
    g1 = torch.tensor([1.0, -3.0, 0.5, 2.0])
    state = dgc.init(g1)
    payload, state = dgc.compress(g1, state)
    # u = v = g1; the largest |v| is -3 at index 1; both are zeroed there (v always, u if masking).
    assert payload.wire[0].tolist() == [1] and payload.wire[1].tolist() == [-3.0]
    assert payload.wire[0].dtype == index_dtype(4)
    assert state["v"].tolist() == [1.0, 0.0, 0.5, 2.0]
    assert state["u"].tolist() == ([1.0, 0.0, 0.5, 2.0] if masking else [1.0, -3.0, 0.5, 2.0])
    payload, state = dgc.compress(torch.ones(4), state)
    # u = 0.5 u + 1; v = v + u.
    u = [1.5, 1.0, 1.25, 2.0] if masking else [1.5, -0.5, 1.25, 2.0]
    v = [2.5, 1.0, 1.75, 4.0] if masking else [2.5, -0.5, 1.75, 4.0]
    assert payload.wire[0].tolist() == [3] and payload.wire[1].tolist() == [4.0]
    assert state["v"].tolist() == v[:3] + [0.0]
    assert state["u"].tolist() == u[:3] + ([0.0] if masking else [u[3]])
    assert int(state["step"]) == 2
    assert dgc.decompress(payload).tolist() == [0.0, 0.0, 0.0, 4.0]


def test_nothing_is_lost():
    """Without momentum, sent + v equals the sum of the gradients (the accumulation is error feedback)."""
    dgc = DeepGradientCompression(ratio=0.05, momentum=0.0)
    generator = torch.Generator().manual_seed(3)
    grads = torch.randn(30, 4, 25, generator=generator)
    state = dgc.init(grads[0])
    sent = torch.zeros(4, 25)
    for g in grads:
        payload, state = dgc.compress(g, state)
        sent += dgc.decompress(payload)
        assert payload.wire[0].numel() == 5
    torch.testing.assert_close(sent + state["v"], grads.sum(0))


def test_compress_leaves_given_state_unchanged():
    dgc = DeepGradientCompression(ratio=0.5)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    state = dgc.init(g)
    dgc.compress(g, state)
    assert not state["u"].any() and not state["v"].any() and int(state["step"]) == 0


def test_local_clipping_scales_by_inverse_sqrt_world_size():
    """clip 2 over 4 workers: each clips its gradient to norm 2 / sqrt(4) = 1 before accumulating."""
    dgc = DeepGradientCompression(ratio=1.0, momentum=0.0, clip=2.0, world_size=4)
    g = torch.tensor([3.0, 4.0])  # norm 5
    payload, _ = dgc.compress(g, dgc.init(g))
    torch.testing.assert_close(dgc.decompress(payload), torch.tensor([0.6, 0.8]))
    small = torch.tensor([0.3, 0.4])  # norm 0.5 < 1: unchanged
    payload, _ = dgc.compress(small, dgc.init(small))
    torch.testing.assert_close(dgc.decompress(payload), small)


def test_warmup_density_schedule():
    """0.25 at step 0, falling by the same factor every step to `ratio` at warmup_steps (Lin et al. 4)."""
    dgc = DeepGradientCompression(ratio=0.001, warmup_steps=4)
    expected = [0.25 * (0.001 / 0.25) ** (t / 4) for t in range(4)] + [0.001, 0.001]
    assert [dgc.density(t) for t in range(6)] == pytest.approx(expected)
    assert dgc.density(2) == pytest.approx(math.sqrt(0.25 * 0.001))
    assert not dgc.fixed_size and DeepGradientCompression().fixed_size
    g = torch.randn(10000)
    state = dgc.init(g)
    for step in range(6):
        payload, state = dgc.compress(g, state)
        k = max(1, math.floor(dgc.density(step) * 10000 + 1e-6))
        assert payload.wire[0].numel() == k
        assert payload.nbytes() == dgc.payload_bytes_at(10000, step) == k * (2 + 4)
    assert dgc.payload_bytes(10000) == 10 * 6


@pytest.mark.parametrize("numel", [0, 1, 7, 1000, 100003])
def test_payload_bytes_and_indices(numel):
    dgc = DeepGradientCompression()
    g = torch.randn(numel)
    payload, _ = dgc.compress(g, dgc.init(g))
    indices = payload.wire[0]
    assert indices.dtype == index_dtype(numel)
    assert torch.all(indices.long()[1:] > indices.long()[:-1])
    assert payload.nbytes() == dgc.payload_bytes(numel)


def test_declared_attributes_and_arguments():
    dgc = COMPRESSORS.get("dgc")()
    assert dgc.aggregation == "sparse" and dgc.owns_momentum and dgc.error_feedback_builtin
    for bad in ({"momentum": 1.0}, {"clip": 0}, {"world_size": 0}, {"warmup_steps": -1}, {"ratio": 2}):
        with pytest.raises(ValueError, match="dgc"):
            DeepGradientCompression(**bad)
