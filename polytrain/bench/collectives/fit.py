"""Each algorithm's alpha-beta-gamma model, its fit to measured times, and where algorithms cross over."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Sequence

import numpy as np

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

if TYPE_CHECKING:
    from polytrain.bench.collectives.summary import Measurement


def bus_factor(world_size: int) -> float:
    """busbw / algbw for allreduce, 2(p-1)/p (nccl-tests, doc/PERFORMANCE.md)."""
    return 2 * (world_size - 1) / world_size


def model_terms(algorithm: str, n_bytes: float, world_size: int) -> tuple[float, float, float]:
    """(A, B, C) with cost_s(n, p, alpha, beta, gamma) = A alpha + B beta + C gamma (cost_s is linear)."""
    cost_s = ALLREDUCE_ALGORITHMS.get(algorithm).cost_s
    return (cost_s(n_bytes, world_size, 1.0, 0.0, 0.0), cost_s(n_bytes, world_size, 0.0, 1.0, 0.0),
            cost_s(n_bytes, world_size, 0.0, 0.0, 1.0))


@dataclass(frozen=True)
class FitPoint:
    """Measured and predicted time of one algorithm at one size; relative_error = (predicted - measured) / measured."""

    size_bytes: int
    measured_s: float
    predicted_s: float
    relative_error: float


@dataclass(frozen=True)
class Fit:
    """alpha and beta of one algorithm, fitted with gamma held at a measured value, and how well they predict."""

    algorithm: str
    world_size: int
    alpha_s: float
    beta_s_per_byte: float
    gamma_s_per_byte: float
    points: tuple[FitPoint, ...]

    def predict_s(self, n_bytes: float) -> float:
        """The fitted model's time for one allreduce of `n_bytes`."""
        return ALLREDUCE_ALGORITHMS.get(self.algorithm).cost_s(n_bytes, self.world_size, self.alpha_s,
                                                               self.beta_s_per_byte, self.gamma_s_per_byte)

    @property
    def max_abs_relative_error(self) -> float:
        return max(abs(point.relative_error) for point in self.points)

    def to_dict(self) -> dict:
        bandwidth = 1 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else None
        return {**asdict(self), "points": [asdict(point) for point in self.points],
                "bandwidth_bytes_per_s": bandwidth, "max_abs_relative_error": self.max_abs_relative_error}


def _nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||matrix x - target|| over x >= 0 for two unknowns (the unconstrained optimum, else the
    best fit with one of them at zero, which is where the constrained optimum then lies)."""
    solution = np.linalg.lstsq(matrix, target, rcond=None)[0]
    if (solution >= 0).all():
        return solution
    candidates = []
    for keep in range(matrix.shape[1]):
        column = matrix[:, keep]
        x = np.zeros(matrix.shape[1])
        x[keep] = max(0.0, column @ target / (column @ column)) if column @ column > 0 else 0.0
        candidates.append((np.linalg.norm(matrix @ x - target), keep, x))
    return min(candidates, key=lambda candidate: candidate[:2])[2]


def fit_alpha_beta(algorithm: str, world_size: int, sizes_bytes: Sequence[int], times_s: Sequence[float],
                   gamma_s_per_byte: float = 0.0) -> Fit:
    """Fits alpha >= 0 and beta >= 0 of `algorithm`'s cost model to measured times, gamma held fixed.

    Least squares on relative errors (each equation divided by its measured time), so that 1 KiB and
    64 MiB messages, four orders of magnitude apart in time, weigh alike.

    Raises:
        ValueError: for fewer than two sizes, or a world size at which the model has no terms.
    """
    if len(sizes_bytes) != len(times_s) or len(sizes_bytes) < 2:
        raise ValueError(f"fitting alpha and beta needs two or more sizes with times; got {len(sizes_bytes)}")
    terms = np.array([model_terms(algorithm, n, world_size) for n in sizes_bytes])  # (sizes, 3): A, B, C
    measured = np.asarray(times_s, dtype=float)
    if not terms[:, :2].any():
        raise ValueError(f"allreduce {algorithm} sends nothing at world size {world_size}; nothing to fit")
    alpha, beta = _nonnegative_least_squares(terms[:, :2] / measured[:, None],
                                             (measured - terms[:, 2] * gamma_s_per_byte) / measured)
    predicted = terms @ np.array([alpha, beta, gamma_s_per_byte])
    points = tuple(FitPoint(int(n), float(t), float(model), float((model - t) / t))
                   for n, t, model in zip(sizes_bytes, measured, predicted))
    return Fit(algorithm, world_size, float(alpha), float(beta), gamma_s_per_byte, points)


def fit_slope(sizes_bytes: Sequence[int], times_s: Sequence[float]) -> float:
    """Seconds per byte: the least-squares slope of t = c + slope * n (relative errors, slope >= 0)."""
    sizes, measured = np.asarray(sizes_bytes, dtype=float), np.asarray(times_s, dtype=float)
    if len(sizes) < 2:
        return float(measured[0] / sizes[0])
    matrix = np.stack([np.ones_like(sizes), sizes], axis=1) / measured[:, None]
    return float(_nonnegative_least_squares(matrix, np.ones_like(sizes))[1])


@dataclass(frozen=True)
class Crossover:
    """Where `faster_above` overtakes `faster_below` as messages grow.

    `source` is "measured" (medians interpolated linearly in log size between the two bracketing sizes)
    or "predicted" (the fitted models, t = L + K n, crossing once at most). `clear` says, for a measured
    crossing, whether the confidence intervals of the two algorithms are disjoint at both bracketing sizes
    (else the crossing may be noise); for a predicted one, whether it lies inside the measured sizes.
    """

    faster_below: str
    faster_above: str
    size_bytes: float
    source: str
    clear: bool


def measured_crossings(sizes_bytes: Sequence[int], times_a: Sequence[float],
                       times_b: Sequence[float]) -> list[tuple[int, float]]:
    """(i, size) for each sign change of log(t_a / t_b) between sizes i and i + 1, interpolated in log size."""
    logs = np.log(np.asarray(sizes_bytes, dtype=float))
    gaps = np.log(np.asarray(times_a, dtype=float)) - np.log(np.asarray(times_b, dtype=float))
    crossings = []
    for i in range(len(gaps) - 1):
        if gaps[i] * gaps[i + 1] < 0:
            at = logs[i] + (logs[i + 1] - logs[i]) * gaps[i] / (gaps[i] - gaps[i + 1])
            crossings.append((i, float(math.exp(at))))
    return crossings


def predicted_crossing(fit_a: Fit, fit_b: Fit) -> tuple[str, str, float] | None:
    """(faster_below, faster_above, size) where two fitted linear models t = L + K n cross, if at n > 0."""
    latency_a, latency_b = fit_a.predict_s(0.0), fit_b.predict_s(0.0)
    slope_a, slope_b = fit_a.predict_s(1.0) - latency_a, fit_b.predict_s(1.0) - latency_b
    if slope_a == slope_b:
        return None
    size = (latency_b - latency_a) / (slope_a - slope_b)
    if size <= 0:
        return None
    below, above = (fit_a, fit_b) if latency_a < latency_b else (fit_b, fit_a)
    return below.algorithm, above.algorithm, size


def _disjoint(a: Measurement, b: Measurement) -> bool:
    return a.ci_high_s < b.ci_low_s or b.ci_high_s < a.ci_low_s


def find_crossovers(measurements: dict[tuple[str, int], Measurement], fits: dict[str, Fit],
                    algorithms: Sequence[str], sizes_bytes: Sequence[int]) -> list[Crossover]:
    """Every measured and predicted crossover of every pair of algorithms."""
    found = []
    for a, b in combinations(algorithms, 2):
        times_a = [measurements[a, n].median_s for n in sizes_bytes]
        times_b = [measurements[b, n].median_s for n in sizes_bytes]
        for i, size in measured_crossings(sizes_bytes, times_a, times_b):
            below, above = (a, b) if times_a[i] < times_b[i] else (b, a)
            clear = all(_disjoint(measurements[a, n], measurements[b, n]) for n in sizes_bytes[i:i + 2])
            found.append(Crossover(below, above, size, "measured", clear))
        if a in fits and b in fits:
            crossing = predicted_crossing(fits[a], fits[b])
            if crossing is not None:
                inside = sizes_bytes[0] <= crossing[2] <= sizes_bytes[-1]
                found.append(Crossover(*crossing, "predicted", inside))
    return found
