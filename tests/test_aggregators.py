"""Byzantine-robust aggregators against their definitions: trimmed mean with beta 0 and multi-Krum with m = n
against the mean, the median and trimmed mean against numpy, Krum, multi-Krum and Bulyan against
brute-force implementations of the papers' rules, the geometric median against its optimality condition,
centered clipping against its update; each robust one against an outlier that moves the mean; resilience
conditions and bad arguments in one line."""

import numpy as np
import pytest
import torch

from polytrain.aggregators import AGGREGATORS, build_aggregator, check_resilience


def honest_and_outliers(n: int, f: int, d: int = 20, seed: int = 0) -> torch.Tensor:
    """n - f rows near 1, then f rows far away (a scaled sign flip)."""
    generator = torch.Generator().manual_seed(seed)
    honest = 1 + 0.1 * torch.randn(n - f, d, generator=generator, dtype=torch.float64)
    return torch.cat([honest, -100 * torch.ones(f, d, dtype=torch.float64)])


def random_rows(n: int, d: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_krum_scores(rows: np.ndarray, f: int) -> list[float]:
    n = len(rows)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[:max(1, n - f - 2)]))
    return scores


@pytest.mark.parametrize("n", [3, 5, 8])
def test_trimmed_mean_with_beta_0_and_multikrum_with_m_n_are_the_mean(n):
    rows = random_rows(n)
    mean = rows.mean(dim=0)
    assert torch.allclose(build_aggregator("trimmed_mean", {"beta": 0.0})(rows), mean, rtol=0, atol=1e-12)
    assert torch.equal(build_aggregator("multikrum", {"m": n})(rows), mean)
    assert torch.equal(build_aggregator("mean")(rows), mean)


@pytest.mark.parametrize("n, f", [(5, 1), (6, 2), (9, 2)])
def test_median_and_trimmed_mean_equal_numpys(n, f):
    rows = random_rows(n, seed=n)
    array = rows.numpy()
    assert np.allclose(build_aggregator("median", f=f)(rows).numpy(), np.median(array, axis=0), rtol=0, atol=1e-12)
    trimmed = np.sort(array, axis=0)[f:n - f].mean(axis=0)
    assert np.allclose(build_aggregator("trimmed_mean", f=f)(rows).numpy(), trimmed, rtol=0, atol=1e-12)
    beta = 0.25
    k = int(beta * n)
    trimmed = np.sort(array, axis=0)[k:n - k].mean(axis=0)
    if k >= f:
        assert np.allclose(build_aggregator("trimmed_mean", {"beta": beta}, f=f)(rows).numpy(), trimmed, atol=1e-12)


@pytest.mark.parametrize("n, f", [(5, 1), (7, 2), (8, 1)])
def test_krum_and_multikrum_choose_by_the_papers_scores(n, f):
    rows = random_rows(n, seed=10 + n)
    scores = reference_krum_scores(rows.numpy(), f)
    best = int(np.argmin(scores))
    assert torch.equal(build_aggregator("krum", f=f)(rows), rows[best])
    m = n - f
    chosen = sorted(np.argsort(scores, kind="stable")[:m])
    assert torch.allclose(build_aggregator("multikrum", f=f)(rows), rows[chosen].mean(dim=0), atol=1e-12)


def reference_bulyan(rows: np.ndarray, f: int) -> np.ndarray:
    pool, chosen = list(range(len(rows))), []
    for _ in range(len(rows) - 2 * f):
        scores = reference_krum_scores(rows[pool], f)
        chosen.append(pool.pop(int(np.argmin(scores))))
    selected = rows[sorted(chosen)]
    keep = len(selected) - 2 * f
    median = np.median(selected, axis=0)
    result = []
    for column in range(rows.shape[1]):
        values = sorted(selected[:, column], key=lambda v: abs(v - median[column]))
        result.append(np.mean(values[:keep]))
    return np.array(result)


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2)])
def test_bulyan_is_krum_selection_then_the_values_nearest_the_median(n, f):
    rows = random_rows(n, seed=20 + n)
    assert np.allclose(build_aggregator("bulyan", f=f)(rows).numpy(), reference_bulyan(rows.numpy(), f), atol=1e-12)


def test_the_geometric_median_zeroes_the_sum_of_unit_vectors():
    rows = random_rows(6, d=5, seed=3)
    point = build_aggregator("geometric_median")(rows)
    units = (point - rows) / (point - rows).norm(dim=1, keepdim=True)
    assert units.sum(dim=0).norm() < 1e-6
    # No other point has a smaller sum of distances (a few random moves).
    total = (rows - point).norm(dim=1).sum()
    for delta in random_rows(20, d=5, seed=4) * 1e-3:
        assert (rows - point - delta).norm(dim=1).sum() >= total


def test_centered_clipping_clips_each_offset_from_the_last_aggregate():
    rows = honest_and_outliers(5, 1)
    clipping = build_aggregator("centered_clipping", {"tau": 1.0, "iterations": 2}, f=1)
    first = clipping(rows)
    center = torch.zeros(rows.shape[1], dtype=torch.float64)
    for _ in range(2):
        offsets = rows - center
        scale = torch.clamp(1.0 / offsets.norm(dim=1), max=1.0)
        center = center + (scale[:, None] * offsets).mean(dim=0)
    assert torch.allclose(first, center, atol=1e-12)
    assert torch.allclose(clipping.state_dict()["center"], first)  # the next step starts from it
    restored = build_aggregator("centered_clipping", {"tau": 1.0, "iterations": 2}, f=1)
    restored.load_state_dict(clipping.state_dict())
    assert torch.equal(restored(rows), clipping(rows))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "bulyan", "geometric_median"])
def test_robust_aggregators_stay_near_the_honest_rows_while_the_mean_does_not(name):
    n, f = (7, 1) if name == "bulyan" else (5, 1)
    rows = honest_and_outliers(n, f)
    honest_mean = rows[:n - f].mean(dim=0)
    assert (build_aggregator("mean")(rows) - honest_mean).abs().max() > 10
    assert (build_aggregator(name, f=f)(rows) - honest_mean).abs().max() < 0.5


def test_aggregates_come_back_in_the_rows_dtype():
    rows = random_rows(7).float()
    for name in AGGREGATORS.names():
        assert build_aggregator(name, f=1)(rows).dtype == torch.float32


@pytest.mark.parametrize("name, n, f, message", [
    ("krum", 4, 1, "aggregator krum needs n > 2f \\+ 2 = 4 for f = 1; got n = 4 workers"),
    ("multikrum", 6, 2, "multikrum needs n > 2f \\+ 2 = 6 for f = 2; got n = 6"),
    ("bulyan", 6, 1, "aggregator bulyan needs n >= 4f \\+ 3 = 7 for f = 1; got n = 6 workers"),
    ("median", 4, 2, "median needs n > 2f = 4 for f = 2"),
    ("geometric_median", 2, 1, "geometric_median needs n > 2f = 2"),
    ("trimmed_mean", 4, 2, "trimmed_mean needs n > 2k and k >= f"),
])
def test_resilience_conditions_fail_in_one_line(name, n, f, message):
    with pytest.raises(ValueError, match=message):
        check_resilience(name, {}, n, f)
    check_resilience(name, {}, n + 4 * f + 3, f)  # enough workers


@pytest.mark.parametrize("name, args, message", [
    ("krumm", {}, "unknown aggregator 'krumm'; available: "),
    ("trimmed_mean", {"beta": 0.5}, "beta is the share trimmed at each end, in \\[0, 0.5\\)"),
    ("multikrum", {"m": 0}, "multikrum m is how many rows are averaged"),
    ("centered_clipping", {"tau": 0}, "tau is the clipping radius, > 0"),
    ("median", {"beta": 0.1}, "aggregator median takes no argument 'beta'"),
])
def test_bad_arguments_fail_in_one_line(name, args, message):
    with pytest.raises(ValueError, match=message):
        build_aggregator(name, args, f=1)


def test_every_registered_aggregator_is_tested_here():
    assert set(AGGREGATORS.names()) == {"mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan",
                                        "geometric_median", "centered_clipping"}
