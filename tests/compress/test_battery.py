"""One battery over every registered compressor (COMPRESSORS.names()), each built with its defaults.

For every compressor: the analytic `payload_bytes` equals the bytes of a real payload (over all rounds
of a multi-round compressor; an upper bound where `fixed_size` is False, since the size depends on the
data), any shape decompresses to that shape in float32, state is a dict of tensors that `compress` does
not modify, draws are reproducible, and the declared aggregation holds: "sum" payloads add up to the sum
of the decompressions, "sparse" wires are sorted unique indices in index_dtype(numel) plus values,
"gather" payloads combine. Every single-round compressor without built-in error feedback also goes
through ErrorFeedback, which must conserve the residual.
"""

import pytest
import torch

from polytrain.compress import COMPRESSORS, CompressorTraits, Payload, index_dtype
from polytrain.compress.wrappers import ErrorFeedback

NAMES = COMPRESSORS.names()
NUMELS = [0, 1, 7, 8, 9, 1000, 100003]
SHAPES = [(), (1,), (5,), (3, 4), (6, 2, 3), (4, 3, 2, 2)]


def _tensor(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _send(compressor, tensor, state):
    """All rounds for one rank alone: (final payload, state, bytes over all rounds)."""
    payload, state = compressor.compress(tensor, state)
    nbytes = payload.nbytes()
    for _ in range(compressor.rounds - 1):
        payload, state = compressor.refine(payload, state)
        nbytes += payload.nbytes()
    return payload, state, nbytes


def test_the_battery_sees_every_compressor():
    assert {"none", "fp16", "bf16", "kbit", "qsgd", "terngrad", "onebit", "signsgd", "efsignsgd"} <= set(NAMES)
    for name in NAMES:
        assert COMPRESSORS.get(name).name == name
        assert COMPRESSORS.get(name)().aggregation in ("sum", "gather", "sparse")


@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("name", NAMES)
def test_payload_bytes_match_a_real_payload(name, numel):
    compressor = COMPRESSORS.get(name)()
    x = _tensor((numel,), seed=numel)
    _, _, nbytes = _send(compressor, x, compressor.init(x))
    if compressor.fixed_size:
        assert nbytes == compressor.payload_bytes(numel)
    else:
        assert nbytes <= compressor.payload_bytes(numel)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_any_shape_round_trips_to_float32_of_that_shape(name, shape):
    compressor = COMPRESSORS.get(name)()
    x = _tensor(shape)
    state = compressor.init(x)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    before = {key: value.clone() for key, value in state.items()}
    x_before = x.clone()
    payload, new_state, nbytes = _send(compressor, x, state)
    out = compressor.decompress(payload)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(x, x_before)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert new_state.keys() == state.keys()
    assert all(new_state[k].shape == state[k].shape and new_state[k].dtype == state[k].dtype for k in state)
    if compressor.fixed_size:
        assert nbytes == compressor.payload_bytes(x.numel())


@pytest.mark.parametrize("name", NAMES)
def test_same_state_gives_the_same_payload(name):
    compressor = COMPRESSORS.get(name)()
    x = _tensor((40, 30))
    state = compressor.init(x)
    first, _, _ = _send(compressor, x, state)
    again, _, _ = _send(compressor, x, state)
    assert len(first.wire) == len(again.wire)
    assert all(torch.equal(a, b) for a, b in zip(first.wire, again.wire))


@pytest.mark.parametrize("name", NAMES)
def test_declared_aggregation_holds_for_two_ranks(name):
    compressor = COMPRESSORS.get(name)()
    tensors = [_tensor((40, 30), seed=seed) for seed in (1, 2)]
    states = [compressor.init(t) for t in tensors]
    if compressor.aggregation == "sum":
        _check_sum(compressor, tensors, states)
    elif compressor.aggregation == "sparse":
        _check_sparse(compressor, tensors, states)
    else:
        _check_gather(compressor, tensors, states)


def _sum_wires(payloads: list[Payload]) -> Payload:
    """What an allreduce of the wire tensors gives, keeping the (shared) context."""
    return Payload([sum(parts) for parts in zip(*(p.wire for p in payloads))], payloads[0].context)


def _check_sum(compressor, tensors, states):
    payloads = []
    for tensor, state in zip(tensors, states):
        payloads.append(compressor.compress(tensor, state))
    if compressor.rounds == 1:
        own = [compressor.decompress(p) for p, _ in payloads]
        summed = compressor.decompress(_sum_wires([p for p, _ in payloads]))
        assert torch.allclose(summed, own[0] + own[1], atol=1e-2, rtol=1e-2)
        return
    # Several rounds: every rank refines the summed payload with its own state; the result is shared.
    for _ in range(compressor.rounds - 1):
        summed = _sum_wires([p for p, _ in payloads])
        payloads = [compressor.refine(summed, state) for _, state in payloads]
    results = [compressor.decompress(_sum_wires([p for p, _ in payloads])) for _ in payloads]
    assert results[0].shape == tensors[0].shape and torch.isfinite(results[0]).all()
    assert torch.equal(results[0], results[1])


def _check_sparse(compressor, tensors, states):
    dense = torch.zeros(tensors[0].numel())
    expected = torch.zeros(tensors[0].shape)
    for tensor, state in zip(tensors, states):
        payload, _ = compressor.compress(tensor, state)
        indices, values = payload.wire
        assert indices.dtype == index_dtype(tensor.numel()) and values.dtype == torch.float32
        assert torch.all(indices[1:].long() > indices[:-1].long())  # sorted and unique
        dense.index_add_(0, indices.long(), values)
        expected += compressor.decompress(payload)
    assert torch.allclose(dense.view(expected.shape), expected)


def _check_gather(compressor, tensors, states):
    payloads = [compressor.compress(t, s)[0] for t, s in zip(tensors, states)]
    if compressor.fixed_size:
        assert [t.shape for t in payloads[0].wire] == [t.shape for t in payloads[1].wire]
    result = compressor.combine(payloads)
    assert result.shape == tensors[0].shape and result.dtype == torch.float32
    if type(compressor).combine is CompressorTraits.combine:  # no combine of its own
        own = compressor.decompress(payloads[0]) + compressor.decompress(payloads[1])
        assert torch.allclose(result, own)


@pytest.mark.parametrize("name", NAMES)
def test_error_feedback_conserves_around_every_eligible_compressor(name):
    compressor = COMPRESSORS.get(name)()
    if compressor.error_feedback_builtin or compressor.rounds > 1:
        with pytest.raises(ValueError):
            ErrorFeedback(compressor)
        return
    wrapped = ErrorFeedback(compressor)
    state = wrapped.init(_tensor((20, 15)))
    for step in range(3):
        g = _tensor((20, 15), seed=step)
        old = state["residual"]
        payload, state = wrapped.compress(g, state)
        assert torch.allclose(wrapped.decompress(payload) + state["residual"], g + old, atol=1e-5)
