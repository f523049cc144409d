"""Top-k, random-k and threshold sparsification against dense references and analytic byte counts."""

import pytest
import torch

from polytrain.compress import COMPRESSORS, Payload, index_dtype
from polytrain.compress.sparsify import RandomK, Threshold, TopK, num_selected

SIZES = (0, 1, 7, 255, 256, 257, 1000, 32768, 32769, 100003)
SPARSE_NAMES = ("topk", "randomk", "threshold")


def gradient(numel: int, seed: int = 0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator).view(shape or (numel,))


def assert_sorted_unique(indices: torch.Tensor, numel: int) -> None:
    assert indices.dtype == index_dtype(numel)
    as_long = indices.long()
    assert torch.all(as_long[1:] > as_long[:-1])
    assert as_long.numel() == 0 or (as_long.min() >= 0 and as_long.max() < numel)


@pytest.mark.parametrize("numel,ratio,k", [(0, 0.01, 0), (1, 0.01, 1), (7, 0.01, 1), (100, 0.29, 29),
                                           (1000, 0.01, 10), (100003, 0.01, 1000), (5, 1.0, 5)])
def test_num_selected(numel, ratio, k):
    assert num_selected(numel, ratio) == k


@pytest.mark.parametrize("numel", SIZES)
def test_topk_selects_largest_magnitudes(numel):
    compressor = TopK(ratio=0.01)
    g = gradient(numel, shape=(numel,) if numel % 7 else None)
    payload, state = compressor.compress(g, compressor.init(g))
    indices, values = payload.wire
    k = num_selected(numel, 0.01)
    assert_sorted_unique(indices, numel)
    assert indices.numel() == k and values.dtype == torch.float32
    reference = torch.argsort(g.abs(), descending=True)[:k].sort().values  # magnitudes are distinct
    assert torch.equal(indices.long(), reference)
    assert torch.equal(values, g[reference])
    dense = torch.zeros(numel)
    dense[reference] = g[reference]
    assert torch.equal(compressor.decompress(payload), dense)
    assert payload.nbytes() == compressor.payload_bytes(numel)


def test_topk_keeps_shape_and_sums_gathered_payloads():
    compressor = TopK(ratio=0.25)
    grads = [gradient(24, seed, (2, 3, 4)) for seed in range(3)]
    payloads = [compressor.compress(g, {})[0] for g in grads]
    out = compressor.decompress(payloads[0])
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    expected = sum(compressor.decompress(p) for p in payloads)
    assert torch.equal(compressor.combine(payloads), expected)


@pytest.mark.parametrize("name", SPARSE_NAMES)
@pytest.mark.parametrize("numel", SIZES)
def test_payload_bytes_match_wire(name, numel):
    compressor = COMPRESSORS.get(name)(**({"tau": 1e-30} if name == "threshold" else {}))
    g = gradient(numel) + 1.0  # nonzero everywhere, so threshold sends every element (its bound)
    payload, _ = compressor.compress(g, compressor.init(g))
    assert payload.nbytes() == compressor.payload_bytes(numel)


def test_payload_bytes_formulas():
    assert TopK(0.01).payload_bytes(100003) == 1000 * (4 + 4)
    assert TopK(0.01).payload_bytes(1000) == 10 * (2 + 4)
    assert TopK(0.01).payload_bytes(0) == 0
    assert RandomK(0.01).payload_bytes(100003) == 4 * 1000
    assert Threshold().payload_bytes_for_count(1000, 9) == 9 * 2 + 2
    assert Threshold().payload_bytes(7) == 7 + 1


def test_randomk_indices_shared_across_ranks_and_fresh_each_step():
    ranks = [RandomK(ratio=0.1, seed=3) for _ in range(3)]
    grads = [gradient(500, seed) for seed in range(3)]
    states = [c.init(g) for c, g in zip(ranks, grads)]
    seen = []
    for step in range(3):
        outputs = [c.compress(g, s) for c, g, s in zip(ranks, grads, states)]
        payloads = [p for p, _ in outputs]
        states = [s for _, s in outputs]
        indices = payloads[0].context["indices"]
        assert all(torch.equal(p.context["indices"], indices) for p in payloads)
        assert torch.all(indices[1:] > indices[:-1]) and indices.numel() == 50
        assert all(int(s["step"]) == step + 1 for s in states)
        assert len(payloads[0].wire) == 1  # values only
        # "sum": the summed wire decompresses to the sum of the decompressions.
        summed = Payload([sum(p.wire[0] for p in payloads)], payloads[0].context)
        expected = sum(c.decompress(p) for c, p in zip(ranks, payloads))
        torch.testing.assert_close(ranks[0].decompress(summed), expected)
        dense = torch.zeros(500)
        dense[indices] = grads[1][indices]
        assert torch.equal(ranks[1].decompress(payloads[1]), dense)
        seen.append(indices)
    assert not torch.equal(seen[0], seen[1])
    other_seed = RandomK(ratio=0.1, seed=4)
    other_payload, _ = other_seed.compress(grads[0], other_seed.init(grads[0]))
    assert not torch.equal(other_payload.context["indices"], seen[0])


def test_randomk_leaves_given_state_unchanged():
    compressor = RandomK(ratio=0.5)
    g = gradient(10)
    state = compressor.init(g)
    compressor.compress(g, state)
    assert int(state["step"]) == 0


@pytest.mark.parametrize("unbiased", [True, False])
def test_randomk_mean(unbiased):
    """E[decompress] = g with unbiased=True, (k / n) g without: the mean over 4000 steps, fixed seed.

    Element i is sent with probability p = k / n = 1/4 as c g_i (c = n / k unbiased, else 1), so its
    mean over the steps has standard deviation c |g_i| sqrt(p (1 - p) / steps); the bound is 5 of them.
    """
    numel, steps = 20, 4000
    compressor = RandomK(ratio=0.25, seed=11, unbiased=unbiased)
    g = gradient(numel, seed=5)
    state = compressor.init(g)
    total = torch.zeros(numel)
    counts = torch.zeros(numel)
    for _ in range(steps):
        payload, state = compressor.compress(g, state)
        total += compressor.decompress(payload)
        counts[payload.context["indices"]] += 1
    p = 0.25
    c = 1 / p if unbiased else 1.0
    sd = c * g.abs() * (p * (1 - p) / steps) ** 0.5
    assert torch.all((total / steps - c * p * g).abs() <= 5 * sd)
    # Uniform selection: each index is drawn steps * p = 1000 times, binomial sd sqrt(750) ~ 27.
    assert torch.all((counts - steps * p).abs() <= 5 * (steps * p * (1 - p)) ** 0.5)


def test_threshold_sends_sign_and_reconstructs_tau():
    tau = 0.5
    compressor = Threshold(tau=tau)
    g = gradient(1000, seed=2, shape=(10, 100))
    payload, _ = compressor.compress(g, compressor.init(g))
    indices, signs = payload.wire
    assert_sorted_unique(indices, 1000)
    assert signs.dtype == torch.uint8
    expected = torch.where(g.abs() >= tau, tau * torch.sign(g), torch.zeros(()))
    assert torch.equal(compressor.decompress(payload), expected)
    count = int((g.abs() >= tau).sum())
    assert payload.nbytes() == compressor.payload_bytes_for_count(1000, count) == count * 2 + -(-count // 8)


def test_threshold_with_residual_conserves_the_gradient():
    """Strom's residual: sent + residual equals the sum of the gradients over the steps."""
    compressor = Threshold(tau=0.3)
    residual = torch.zeros(200)
    sent = torch.zeros(200)
    total = torch.zeros(200)
    for step in range(20):
        g = gradient(200, seed=step) * 0.2
        total += g
        corrected = g + residual
        payload, _ = compressor.compress(corrected, {})
        out = compressor.decompress(payload)
        residual = corrected - out
        sent += out
        assert torch.all(out.abs() <= 0.3)
    torch.testing.assert_close(sent + residual, total)
    assert sent.abs().sum() > 0


def test_threshold_gathers_variable_sizes():
    compressor = Threshold(tau=1.0)
    assert compressor.aggregation == "gather" and not compressor.fixed_size
    grads = [gradient(50, seed) for seed in range(4)]
    payloads = [compressor.compress(g, {})[0] for g in grads]
    assert len({p.wire[0].numel() for p in payloads}) > 1
    expected = sum(torch.where(g.abs() >= 1.0, torch.sign(g), torch.zeros(())) for g in grads)
    assert torch.equal(compressor.combine(payloads), expected)


@pytest.mark.parametrize("name,args", [("topk", {"ratio": 0}), ("topk", {"ratio": 1.5}),
                                       ("randomk", {"unbiased": "false"}), ("threshold", {"tau": 0})])
def test_invalid_arguments(name, args):
    with pytest.raises(ValueError, match=name):
        COMPRESSORS.get(name)(**args)


def test_declared_attributes():
    assert (TopK.aggregation, TopK.fixed_size) == ("sparse", True)
    assert (RandomK.aggregation, RandomK.fixed_size, RandomK.per_rank_seed) == ("sum", True, False)


def test_index_dtype_is_the_smallest_that_holds_every_index():
    expected = {0: torch.uint8, 1: torch.uint8, 256: torch.uint8, 257: torch.uint16, 65536: torch.uint16,
                65537: torch.uint32, 1 << 32: torch.uint32, (1 << 32) + 1: torch.int64}
    assert {numel: index_dtype(numel) for numel in expected} == expected
