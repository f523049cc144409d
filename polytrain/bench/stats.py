"""Timing statistics: the median with a nonparametric confidence interval (Hoefler & Belli, SC15)."""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple, Sequence


class MedianCI(NamedTuple):
    """A sample median and a confidence interval around it.

    `confidence` is the interval's exact coverage, which is at least the level asked for, or, for samples
    too small to reach it (fewer than 6 at 95 %), the coverage of the whole range [min, max].
    """

    median: float
    low: float
    high: float
    confidence: float


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_ci(samples: Sequence[float], level: float = 0.95) -> MedianCI:
    """Median of `samples` and a distribution-free confidence interval of the true median.

    Hoefler & Belli, "Scientific Benchmarking of Parallel Computing Systems", SC15, Sec. 3.1.3 (after
    Le Boudec): the number B of samples below the true median is Binomial(n, 1/2) whatever the
    distribution, so the order statistics x_(l) and x_(n+1-l) (1-based, sorted) bracket the median with
    probability 1 - 2 P(B <= l - 1). We take the largest l whose coverage is still >= `level`, computed
    with the exact binomial rather than its normal approximation.

    Args:
        samples: at least one measurement.
        level: the confidence asked for, in (0, 1).

    Raises:
        ValueError: for no samples or a level outside (0, 1).
    """
    if not samples:
        raise ValueError("median_ci needs at least one sample")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie in (0, 1); got {level}")
    ordered = sorted(samples)
    n = len(ordered)
    rank, coverage = 1, 1 - 2 * _binomial_half_cdf(0, n)  # the widest interval, [min, max]
    while rank + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_half_cdf(rank, n) >= level:
        rank += 1
        coverage = 1 - 2 * _binomial_half_cdf(rank - 1, n)
    return MedianCI(statistics.median(ordered), ordered[rank - 1], ordered[n - rank], coverage)
