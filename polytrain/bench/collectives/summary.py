"""The report of a run: statistics per algorithm and size, gamma, fits and crossovers (JSON-ready)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from polytrain.bench.collectives.fit import bus_factor, find_crossovers, fit_alpha_beta, fit_slope
from polytrain.bench.collectives.sizes import bytes_per_element
from polytrain.bench.stats import median_ci
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

# How polytrain.bench.collectives.measure times a call; every report states it.
TIMING = ("barrier, then each rank times its own call; per repetition the maximum over ranks; "
          "algorithms in an order rotated each repetition")


@dataclass(frozen=True)
class Measurement:
    """One algorithm at one message size: time statistics, bandwidths and counted against analytic volume.

    Times are per repetition, the maximum over ranks. Bandwidths derive from the median time (and the
    interval's ends); bytes_sent and messages_sent are what the Communicator counted on each rank for one
    call, beside the algorithm's analytic bytes_sent/messages_sent (native: both are the ring estimate).
    """

    algorithm: str
    size_bytes: int
    median_s: float
    ci_low_s: float
    ci_high_s: float
    confidence: float
    algbw_bytes_per_s: float
    busbw_bytes_per_s: float
    busbw_ci_bytes_per_s: tuple[float, float]
    samples_s: tuple[float, ...]
    warmup_s: tuple[float, ...]
    bytes_sent: tuple[int, ...]
    bytes_sent_analytic: tuple[int, ...]
    messages_sent: tuple[int, ...]
    messages_sent_analytic: tuple[int, ...]

    @property
    def counts_match(self) -> bool:
        return self.bytes_sent == self.bytes_sent_analytic and self.messages_sent == self.messages_sent_analytic

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists), with `counts_match`."""
        fields = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return {**fields, "counts_match": self.counts_match}


def _measurement(name: str, n_bytes: int, times_s: np.ndarray, warmup: int, world_size: int,
                 counts: np.ndarray, element_bytes: int) -> Measurement:
    """Statistics of one (algorithm, size); `counts` is (ranks, [bytes, messages]) per call."""
    algorithm = ALLREDUCE_ALGORITHMS.get(name)
    timed = [float(t) for t in times_s[warmup:]]
    ci = median_ci(timed)
    algbw = n_bytes / ci.median
    ranks = range(world_size)
    return Measurement(
        name, n_bytes, *ci, algbw_bytes_per_s=algbw, busbw_bytes_per_s=algbw * bus_factor(world_size),
        busbw_ci_bytes_per_s=(n_bytes / ci.high * bus_factor(world_size), n_bytes / ci.low * bus_factor(world_size)),
        samples_s=tuple(timed), warmup_s=tuple(float(t) for t in times_s[:warmup]),
        bytes_sent=tuple(int(c) for c in counts[:, 0]),
        bytes_sent_analytic=tuple(algorithm.bytes_sent(n_bytes, world_size, r, element_bytes) for r in ranks),
        messages_sent=tuple(int(c) for c in counts[:, 1]),
        messages_sent_analytic=tuple(algorithm.messages_sent(n_bytes // element_bytes, world_size, r)
                                     for r in ranks))


def summarize(world_size: int, algorithms: list[str], sizes_bytes: list[int], times_s: np.ndarray,
              add_times_s: np.ndarray, counts: np.ndarray, warmup: int, dtype: torch.dtype) -> dict:
    """The report: settings, measurements, gamma, fits and crossovers (JSON-ready).

    Args:
        times_s: (repetitions, algorithms, sizes), warm-up repetitions first, max over ranks.
        add_times_s: (repetitions, sizes), the local add x += y.
        counts: (ranks, algorithms, sizes, [bytes, messages]) counted per call.
    """
    element_bytes = bytes_per_element(dtype)
    measurements = {(name, n): _measurement(name, n, times_s[:, a, s], warmup, world_size, counts[:, a, s],
                                            element_bytes)
                    for a, name in enumerate(algorithms) for s, n in enumerate(sizes_bytes)}
    add_medians = [median_ci(list(add_times_s[warmup:, s])).median for s in range(len(sizes_bytes))]
    gamma = fit_slope(sizes_bytes, add_medians)
    fits = {}
    if len(sizes_bytes) >= 2:
        fits = {name: fit_alpha_beta(name, world_size, sizes_bytes,
                                     [measurements[name, n].median_s for n in sizes_bytes], gamma)
                for name in algorithms}
    return {
        "world_size": world_size, "algorithms": algorithms, "sizes_bytes": sizes_bytes,
        "dtype": str(dtype).removeprefix("torch."), "repeats": times_s.shape[0] - warmup, "warmup": warmup,
        "timing": TIMING, "bus_factor": bus_factor(world_size),
        "measurements": [measurements[name, n].to_dict() for name in algorithms for n in sizes_bytes],
        "counts_match": all(m.counts_match for m in measurements.values()),
        "reduction": {"gamma_s_per_byte": gamma, "median_add_s": add_medians},
        "fits": {name: fit.to_dict() for name, fit in fits.items()},
        "crossovers": [asdict(c) for c in find_crossovers(measurements, fits, algorithms, sizes_bytes)],
    }
