"""PowerSGD against its matrix algebra (QR, SVD), over several simulated ranks summed by hand."""

import pytest
import torch

from polytrain.compress import COMPRESSORS, Payload
from polytrain.compress.powersgd import PowerSGD, matrix_shape, orthonormalize


def matrix(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def summed(payloads: list[Payload]) -> Payload:
    """What the strategy does between rounds: sum every wire tensor over the ranks, keep the context."""
    wire = [torch.stack(tensors).sum(0) for tensors in zip(*(p.wire for p in payloads))]
    return Payload(wire, dict(payloads[0].context))


def step(compressor: PowerSGD, grads: list[torch.Tensor], states: list[dict]) -> tuple[list, list]:
    """One two-round exchange over len(grads) simulated ranks: each rank's result and new state."""
    first = [compressor.compress(g, s) for g, s in zip(grads, states)]
    total = summed([p for p, _ in first])
    second = [compressor.refine(total, s) for _, s in first]
    total = summed([p for p, _ in second])
    results = [compressor.decompress(Payload(total.wire, p.context)) for p, _ in second]
    return results, [s for _, s in second]


def single(compressor: PowerSGD, g: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
    results, states = step(compressor, [g], [state])
    return results[0], states[0]


def test_orthonormalize_matches_qr_projection():
    p = matrix((30, 4), 0)
    q = orthonormalize(p, 1e-8)
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    reference = torch.linalg.qr(p).Q
    torch.testing.assert_close(q @ q.T, reference @ reference.T, atol=1e-5, rtol=0)
    assert torch.isfinite(orthonormalize(torch.zeros(5, 2), 1e-8)).all()


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (4, 2, 3, 3)])
def test_full_rank_is_exact(shape):
    """r = min(n, m): P^ spans the column space of M, so P^ P^^T M = M."""
    n, m = matrix_shape(shape)
    compressor = PowerSGD(rank=min(n, m), min_compression=0)
    g = matrix(shape, 1)
    out, state = single(compressor, g, compressor.init(g))
    assert out.shape == g.shape
    torch.testing.assert_close(out, g, atol=1e-4, rtol=1e-4)
    assert state["error"].abs().max() < 1e-4


def test_rank_one_matrix_is_exact_at_rank_one():
    a, b = matrix((20,), 2), matrix((30,), 3)
    g = torch.outer(a, b)
    compressor = PowerSGD(rank=1)
    out, _ = single(compressor, g, compressor.init(g))
    torch.testing.assert_close(out, g, atol=1e-5, rtol=1e-5)


def test_error_feedback_conserves_the_gradient():
    """Each rank's local reconstruction P^ Q_w^T plus its new error is D = M + old error."""
    compressor = PowerSGD(rank=2)
    grads = [matrix((12, 9), seed) for seed in range(3)]
    states = [compressor.init(g) for g in grads]
    for _ in range(3):
        old_errors = [s["error"].clone() for s in states]
        first = [compressor.compress(g, s) for g, s in zip(grads, states)]
        total_p = summed([p for p, _ in first])
        second = [compressor.refine(total_p, s) for _, s in first]
        for g, old, (payload, state) in zip(grads, old_errors, second):
            local = payload.context["p"] @ payload.wire[0].view(9, 2).T
            torch.testing.assert_close(local + state["error"], g + old, atol=1e-5, rtol=1e-5)
            assert "delta" not in state
        total_q = summed([p for p, _ in second])
        results = [compressor.decompress(Payload(total_q.wire, p.context)) for p, _ in second]
        states = [s for _, s in second]
        # Linear: the decompressed sum is the sum of the local reconstructions.
        locals_sum = sum(p.context["p"] @ p.wire[0].view(9, 2).T for p, _ in second)
        torch.testing.assert_close(results[0], locals_sum, atol=1e-5, rtol=1e-5)


def test_multi_rank_matches_paper_math():
    """P = sum M_r Q, P^ = orth(P), Q' = sum M_r^T P^: P^ Q'^T = P^ P^^T sum M_r (Vogels et al. 2019)."""
    compressor = PowerSGD(rank=3, seed=7)
    grads = [matrix((16, 24), seed) for seed in range(4)]
    states = [compressor.init(g) for g in grads]
    q0 = states[0]["q"].clone()
    assert all(torch.equal(s["q"], q0) for s in states)  # same initial Q on every rank
    results, states = step(compressor, grads, states)
    total = sum(grads)
    basis = torch.linalg.qr(total @ q0).Q
    expected = basis @ basis.T @ total
    for result in results:
        assert torch.equal(result, results[0])
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)
    # The warm start holds the summed Q, the same on every rank.
    for state in states:
        assert torch.equal(state["q"], states[0]["q"])
    torch.testing.assert_close(states[0]["q"] @ basis.T, (total.T @ basis) @ basis.T, atol=1e-4, rtol=1e-4)


def test_warm_start_is_power_iteration():
    """Without error feedback and the same M every step, warm-started Q converges to the top-r subspace."""
    u, _ = torch.linalg.qr(matrix((40, 40), 4))
    v, _ = torch.linalg.qr(matrix((30, 30), 5))
    singular = torch.tensor([10.0, 8.0, 1.0, 0.5] + [0.1] * 26)
    g = u[:, :30] @ torch.diag(singular) @ v.T
    best = u[:, :2] @ torch.diag(singular[:2]) @ v[:, :2].T  # Eckart-Young
    compressor = PowerSGD(rank=2, error_feedback=False)
    state = compressor.init(g)
    for _ in range(20):
        out, state = single(compressor, g, state)
    torch.testing.assert_close(out, best, atol=1e-3, rtol=1e-3)
    cold = PowerSGD(rank=2, error_feedback=False, warm_start=False)
    state = cold.init(g)
    for _ in range(20):
        cold_out, state = single(cold, g, state)
    assert (cold_out - best).norm() > 10 * (out - best).norm()


def test_without_warm_start_q_is_fresh_but_shared():
    compressor = PowerSGD(rank=2, warm_start=False)
    grads = [matrix((8, 12), seed) for seed in range(2)]
    states = [compressor.init(g) for g in grads]
    q0 = states[0]["q"].clone()
    _, states = step(compressor, grads, states)
    assert int(states[0]["step"]) == 1
    later = [compressor.compress(g, s)[0] for g, s in zip(grads, states)]
    # Step 1 draws a new Q from (seed, step), the same on both ranks: P_w = (M_w + e_w) Q1.
    q1 = compressor._initial_q(12, 2, 1, torch.device("cpu"))
    assert not torch.allclose(q1, q0)
    for g, s, payload in zip(grads, states, later):
        torch.testing.assert_close(payload.wire[0], ((g + s["error"]) @ q1).reshape(-1))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (1000,), (100003,), (3, 3), (2, 5)])
def test_uncompressed_tensors_send_whole_in_round_one(shape):
    compressor = PowerSGD(rank=2)
    grads = [matrix(shape, seed) for seed in range(3)]
    states = [compressor.init(g) for g in grads]
    first = [compressor.compress(g, s) for g, s in zip(grads, states)]
    second = [compressor.refine(summed([p for p, _ in first]), s) for _, s in first]
    assert all(p.wire == [] for p, _ in second)
    out = compressor.decompress(second[0][0])
    torch.testing.assert_close(out, sum(grads))
    numel = grads[0].numel()
    assert first[0][0].nbytes() + second[0][0].nbytes() == 4 * numel == compressor.payload_bytes(numel)


@pytest.mark.parametrize("shape,r", [((10, 100), 2), ((8, 3, 3, 3), 2), ((64, 64), 4), ((100003, 2), 1)])
def test_payload_bytes(shape, r):
    compressor = PowerSGD(rank=r)
    g = matrix(shape, 0)
    state = compressor.init(g)
    payload, state = compressor.compress(g, state)
    refined, _ = compressor.refine(payload, state)
    n, m = matrix_shape(shape)
    expected = 4 * r * (n + m)
    assert payload.nbytes() == 4 * r * n and refined.nbytes() == 4 * r * m
    assert compressor.payload_bytes_for_shape(shape) == expected == compressor.payload_bytes(g.numel())


def test_rounds_out_of_order_are_refused():
    compressor = PowerSGD()
    g = matrix((10, 10), 0)
    payload, state = compressor.compress(g, compressor.init(g))
    with pytest.raises(ValueError, match="round-2"):
        compressor.decompress(payload)
    refined, _ = compressor.refine(payload, state)
    with pytest.raises(ValueError, match="round-1"):
        compressor.refine(refined, state)


def test_declared_attributes_and_arguments():
    compressor = COMPRESSORS.get("powersgd")()
    assert compressor.aggregation == "sum" and compressor.rounds == 2
    assert compressor.per_rank_seed is False and compressor.error_feedback_builtin
    for bad in ({"rank": 0}, {"epsilon": -1.0}, {"warm_start": "yes"}, {"min_compression": -1}):
        with pytest.raises(ValueError, match="powersgd"):
            PowerSGD(**bad)
