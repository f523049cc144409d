"""Collective benchmark: times each allreduce algorithm per message size and fits its alpha-beta model.

Every rank runs `bench_collectives`. For each repetition, each message size and each algorithm (in an
order rotated every repetition, so drift and cache effects hit all algorithms alike) the ranks meet at a
barrier, then each rank times its own call; the repetition's time is the maximum over the ranks, since a
collective is done when its slowest rank is done. The first `warmup` repetitions are kept in the report
but left out of the statistics. The medians, with their nonparametric 95 % confidence intervals (Hoefler
& Belli, SC15), give:

- bus bandwidth in the convention of NVIDIA's nccl-tests (doc/PERFORMANCE.md): algbw = size / time and,
  for allreduce, busbw = algbw * 2(p-1)/p, the rate each rank's link must sustain under the
  bandwidth-optimal algorithm, so that busbw is comparable across world sizes and with the link speed;
- alpha (latency per message) and beta (transfer time per byte) fitted per algorithm on the model
  t(n) = A alpha + B(n) beta + C(n) gamma, where A, B(n), C(n) are the algorithm's own coefficients,
  read off its `cost_s` by evaluating it with one of alpha, beta, gamma set to 1 and the others to 0
  (cost_s is linear in them). gamma, the local reduction time per byte, is measured rather than fitted:
  for one world size B(n) and C(n) are both proportional to n, so beta and gamma cannot be told apart by
  a fit. Each repetition therefore also times `x.add_(y)` on every size (the reduction the algorithms
  run), and gamma is the least-squares slope of those times over n;
- predicted against measured time per size, and the sizes at which one algorithm overtakes another, both
  on the measured medians (interpolated linearly in log size) and on the fitted models.

`run_bench_collectives` runs it on N spawned local workers, or in this process when started by torchrun
(so `polytrain cluster ... -- polytrain bench collectives` measures the emulated network).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import IO, Sequence

import numpy as np
import torch
import torch.distributed as dist

from polytrain.bench.stats import median_ci
from polytrain.comm import DEFAULT_TIMEOUT_S, Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.launch import init_from_torchrun, run_workers, under_torchrun
from polytrain.train.environment import environment

# Binary multiples, as nccl-tests' -b/-e flags: 1KB = 1 KiB = 1024 bytes.
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DEFAULT_SIZES = "4^5..4^12"  # 1 KiB, 4 KiB, ..., 16 MiB
TIMING = ("barrier, then each rank times its own call; per repetition the maximum over ranks; "
          "algorithms in an order rotated each repetition")


# -- input ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """"64KB" -> 65536 (binary units: K, KB, KiB = 1024); a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--sizes: cannot read {text!r}; write sizes like 1KB, 64KB, 16MB or 4096")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_sizes(text: str) -> list[int]:
    """Message sizes in bytes from "1KB,64KB,1MB" or "B^a..B^b" (every power of B from B^a to B^b).

    Items are separated by commas and may mix both forms; the result is sorted and without repeats.
    """
    sizes: set[int] = set()
    for item in text.split(","):
        powers = re.fullmatch(r"\s*(\d+)\^(\d+)\s*\.\.\s*(\d+)\^(\d+)\s*", item)
        if powers:
            base, first, other_base, last = map(int, powers.groups())
            if base < 2 or base != other_base or first > last:
                raise ValueError(f"--sizes: {item.strip()!r} must be B^a..B^b with one base B >= 2 and a <= b")
            sizes.update(base ** exponent for exponent in range(first, last + 1))
        else:
            sizes.add(parse_size(item))
    if min(sizes) < 1:
        raise ValueError("--sizes: every size must be at least 1 byte")
    return sorted(sizes)


def parse_algorithms(text: str) -> list[str]:
    """"ring,tree" -> ["ring", "tree"] (order kept, repeats dropped); "all" -> every registered algorithm."""
    if text.strip() == "all":
        return ALLREDUCE_ALGORITHMS.names()
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError("--algorithms: name at least one algorithm, or 'all'")
    for name in names:
        ALLREDUCE_ALGORITHMS.get(name)
    return names


def parse_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32, for the element types the benchmark reduces."""
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown type {name!r}; available: {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_settings(sizes_bytes: Sequence[int], repeats: int, warmup: int, dtype: torch.dtype) -> None:
    element_bytes = torch.finfo(dtype).bits // 8
    odd = [size for size in sizes_bytes if size % element_bytes]
    if odd:
        raise ValueError(f"message size {odd[0]} bytes is not a whole number of {element_bytes}-byte "
                         f"{str(dtype).removeprefix('torch.')} elements")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats} and {warmup}")


def format_bytes(n_bytes: float) -> str:
    """1024 -> "1 KiB", 16777216 -> "16 MiB" (3 significant digits)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.3g} B"


# -- the model ----------------------------------------------------------------------------------------

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


# -- crossovers ---------------------------------------------------------------------------------------

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


def _disjoint(a: "Measurement", b: "Measurement") -> bool:
    return a.ci_high_s < b.ci_low_s or b.ci_high_s < a.ci_low_s


def find_crossovers(measurements: dict[tuple[str, int], "Measurement"], fits: dict[str, Fit],
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


# -- measuring ------------------------------------------------------------------------------------------

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


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _time_round(comm: Communicator, algorithms: list, buffers: list[torch.Tensor], addend: torch.Tensor,
                rotation: int, times: np.ndarray, add_times: np.ndarray, counts: np.ndarray) -> None:
    """One repetition: every size, every algorithm (order rotated), then the local add, timed on this rank."""
    expected = comm.world_size * (comm.world_size + 1) / 2  # each rank contributes rank + 1
    order = algorithms[rotation % len(algorithms):] + algorithms[:rotation % len(algorithms)]
    for s, buffer in enumerate(buffers):
        for algorithm in order:
            a = algorithms.index(algorithm)
            buffer.fill_(comm.rank + 1)
            comm.barrier()
            sent, messages = comm.stats.bytes_sent, comm.stats.messages_sent
            started = time.perf_counter()
            algorithm.all_reduce(comm, buffer)
            times[a, s] = time.perf_counter() - started
            counts[a, s] = comm.stats.bytes_sent - sent, comm.stats.messages_sent - messages
            if buffer[0].item() != expected or buffer[-1].item() != expected:
                raise RuntimeError(f"allreduce {algorithm.name} of {buffer.numel()} elements returned "
                                   f"{buffer[0].item()}, not {expected}, on rank {comm.rank}")
        started = time.perf_counter()
        buffer.add_(addend[:buffer.numel()])
        add_times[s] = time.perf_counter() - started


def _max_over_ranks(comm: Communicator, values: np.ndarray) -> np.ndarray:
    # Bookkeeping after the timing, on the backend directly so that it is not counted as traffic.
    tensor = torch.from_numpy(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=comm.group)
    return tensor.numpy()


def _gather_counts(comm: Communicator, counts: np.ndarray) -> np.ndarray:
    everyone = torch.zeros((comm.world_size, *counts.shape), dtype=torch.int64)
    everyone[comm.rank] = torch.from_numpy(counts)
    dist.all_reduce(everyone, group=comm.group)
    return everyone.numpy()  # (ranks, algorithms, sizes, [bytes, messages])


def bench_collectives(comm: Communicator, algorithms: Sequence[str], sizes_bytes: Sequence[int], repeats: int = 11,
                      warmup: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """Times every algorithm at every size on this rank's group; call it on every rank.

    Each buffer is refilled with rank + 1 before every call (untimed) and the sum checked after it, so
    values neither grow nor turn subnormal, and a wrong result stops the benchmark.

    Returns:
        The same report on every rank (see `summarize`).
    """
    _check_settings(sizes_bytes, repeats, warmup, dtype)
    if comm.world_size < 2:
        raise ValueError(f"a collective benchmark needs at least 2 ranks; got {comm.world_size}")
    chosen = [ALLREDUCE_ALGORITHMS.get(name) for name in algorithms]
    buffers = [torch.empty(n // _element_bytes(dtype), dtype=dtype) for n in sizes_bytes]
    addend = torch.ones(max(b.numel() for b in buffers), dtype=dtype)
    rounds = warmup + repeats
    times = np.zeros((rounds, len(chosen), len(buffers)))
    add_times = np.zeros((rounds, len(buffers)))
    counts = np.zeros((len(chosen), len(buffers), 2), dtype=np.int64)
    for round_index in range(rounds):
        _time_round(comm, chosen, buffers, addend, round_index, times[round_index], add_times[round_index], counts)
    times = _max_over_ranks(comm, times)
    add_times = _max_over_ranks(comm, add_times)
    return summarize(comm.world_size, list(algorithms), list(sizes_bytes), times, add_times,
                     _gather_counts(comm, counts), warmup, dtype)


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
    element_bytes = _element_bytes(dtype)
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


# -- running and printing -----------------------------------------------------------------------------

def _bench_rank(comm: Communicator, algorithms: list[str], sizes_bytes: list[int], repeats: int, warmup: int,
                dtype_name: str) -> dict | None:
    report = bench_collectives(comm, algorithms, sizes_bytes, repeats, warmup, DTYPES[dtype_name])
    return report if comm.rank == 0 else None


def collect_report(workers: int | None, algorithms: list[str], sizes_bytes: list[int], repeats: int = 11,
                   warmup: int = 2, dtype_name: str = "float32", threads: int | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> dict | None:
    """Runs the benchmark on `workers` spawned local ranks (gloo), or on torchrun's world from this process.

    Returns:
        The report with an environment manifest; None on torchrun ranks other than 0.
    """
    _check_settings(sizes_bytes, repeats, warmup, parse_dtype(dtype_name))
    for name in algorithms:
        ALLREDUCE_ALGORITHMS.get(name)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1; got {threads}")
    args = (list(algorithms), list(sizes_bytes), repeats, warmup, dtype_name)
    if under_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if workers not in (None, world_size):
            raise ValueError(f"--workers {workers} does not match torchrun's WORLD_SIZE={world_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        comm = init_from_torchrun(timeout_s, backend="gloo")
        try:
            report = _bench_rank(comm, *args)
        finally:
            dist.destroy_process_group()
        launcher = "torchrun"
    else:
        workers = 2 if workers is None else workers
        if workers < 2:
            raise ValueError(f"--workers must be at least 2 for a collective; got {workers}")
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        report = run_workers(_bench_rank, workers, args, threads=threads, backend="gloo", timeout_s=timeout_s)[0]
        launcher = f"{workers} local processes, {threads} torch thread(s) each"
    if report is not None:
        report.update(backend="gloo", launcher=launcher, environment=environment(seed=0))
    return report


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def _tables(report: dict) -> list:
    """Rich tables (or a line where one would be empty): time, bus bandwidth, fits, errors, crossovers."""
    from rich.table import Table

    algorithms, sizes = report["algorithms"], report["sizes_bytes"]
    by_key = {(m["algorithm"], m["size_bytes"]): m for m in report["measurements"]}
    fastest = {n: min(algorithms, key=lambda name: by_key[name, n]["median_s"]) for n in sizes}
    p, confidence = report["world_size"], min(m["confidence"] for m in report["measurements"])
    times = Table(title=f"allreduce on {p} ranks ({report['launcher']}): median ms [{100 * confidence:.1f}% CI] "
                        f"of {report['repeats']} repetitions after {report['warmup']} warm-up; bold: fastest")
    busbw = Table(title=f"bus bandwidth GB/s (nccl-tests: size / time * 2(p-1)/p = x{report['bus_factor']:.2f}), "
                        "from the median [CI]")
    errors = Table(title="fitted model against measurement: (predicted - measured) / measured")
    for table in (times, busbw, errors):
        table.add_column("size", justify="right")
        for name in algorithms:
            table.add_column(name, justify="right")
    for n in sizes:
        cells = []
        for name in algorithms:
            m = by_key[name, n]
            text = f"{_ms(m['median_s'])} [{_ms(m['ci_low_s'])}, {_ms(m['ci_high_s'])}]"
            cells.append(f"[bold]{text}[/bold]" if name == fastest[n] else text)
        times.add_row(format_bytes(n), *cells)
        busbw.add_row(format_bytes(n), *(f"{by_key[name, n]['busbw_bytes_per_s'] / 1e9:.3g} "
                                         f"[{by_key[name, n]['busbw_ci_bytes_per_s'][0] / 1e9:.3g}, "
                                         f"{by_key[name, n]['busbw_ci_bytes_per_s'][1] / 1e9:.3g}]"
                                         for name in algorithms))
        if report["fits"]:
            errors.add_row(format_bytes(n), *(f"{100 * _fit_point(report, name, n)['relative_error']:+.0f}%"
                                              for name in algorithms))
    tables = [times, busbw]
    if report["fits"]:
        tables += [_fit_table(report), errors]
    tables.append(_crossover_table(report) if report["crossovers"] else "crossovers: none among these sizes")
    return tables


def _fit_point(report: dict, name: str, n_bytes: int) -> dict:
    return next(point for point in report["fits"][name]["points"] if point["size_bytes"] == n_bytes)


def _fit_table(report: dict):
    from rich.table import Table

    gamma = report["reduction"]["gamma_s_per_byte"]
    table = Table(title=f"alpha-beta fit per algorithm (relative least squares on the medians), gamma measured "
                        f"= {1e12 * gamma:.3g} ps/byte ({1 / gamma / 1e9 if gamma else float('inf'):.3g} GB/s add)")
    for column in ("algorithm", "alpha us", "beta ps/byte", "1/beta GB/s", "max |error|"):
        table.add_column(column, justify="left" if column == "algorithm" else "right")
    for name, fit in report["fits"].items():
        bandwidth = fit["bandwidth_bytes_per_s"]
        table.add_row(name, f"{1e6 * fit['alpha_s']:.3g}", f"{1e12 * fit['beta_s_per_byte']:.3g}",
                      f"{bandwidth / 1e9:.3g}" if bandwidth else "-", f"{100 * fit['max_abs_relative_error']:.0f}%")
    return table


def _crossover_table(report: dict):
    from rich.table import Table

    table = Table(title="crossovers: the first algorithm is faster below the size, the second above "
                        "(measured: clear = CIs disjoint on both sides; predicted: clear = inside the sizes)")
    for column in ("faster below", "faster above", "size", "source", "clear"):
        table.add_column(column)
    for c in report["crossovers"]:
        table.add_row(c["faster_below"], c["faster_above"], format_bytes(c["size_bytes"]), c["source"],
                      "yes" if c["clear"] else "no")
    return table


def plot_report(report: dict, path: str) -> None:
    """Writes a PNG: time vs size (log-log, CI bars, fitted model dashed) and bus bandwidth vs size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms, sizes = report["algorithms"], np.asarray(report["sizes_bytes"], dtype=float)
    by_key = {(m["algorithm"], m["size_bytes"]): m for m in report["measurements"]}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    for index, name in enumerate(algorithms):
        color = f"C{index}"
        rows = [by_key[name, int(n)] for n in sizes]
        median = np.array([m["median_s"] for m in rows])
        low, high = median - [m["ci_low_s"] for m in rows], [m["ci_high_s"] for m in rows] - median
        left.errorbar(sizes, median, yerr=[low, high], color=color, marker="o", markersize=3, capsize=2,
                      label=name)
        if name in report["fits"]:
            left.plot(sizes, [p["predicted_s"] for p in report["fits"][name]["points"]], color=color,
                      linestyle="--", linewidth=0.8)
        busbw = np.array([m["busbw_bytes_per_s"] for m in rows]) / 1e9
        ci = np.array([m["busbw_ci_bytes_per_s"] for m in rows]).T / 1e9
        right.errorbar(sizes, busbw, yerr=[busbw - ci[0], ci[1] - busbw], color=color, marker="o",
                       markersize=3, capsize=2, label=name)
    left.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="time per allreduce (s)",
             title=f"median with 95% CI; dashed: fitted alpha-beta model")
    right.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
              title="busbw = size / time * 2(p-1)/p")
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"allreduce on {report['world_size']} ranks, {report['backend']}, {report['launcher']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_bench_collectives(workers: int | None, algorithms: str, sizes: str, repeats: int, warmup: int,
                          dtype_name: str = "float32", threads: int | None = None, as_json: bool = False,
                          plot: str | None = None, out: IO[str] | None = None) -> dict | None:
    """`polytrain bench collectives`: parses the flags, runs the benchmark, prints tables or JSON, plots."""
    if plot is not None and not plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a file name ending in .png, not {plot!r}")
    report = collect_report(workers, parse_algorithms(algorithms), parse_sizes(sizes), repeats, warmup,
                            dtype_name, threads)
    if report is None:
        return None
    out = out or sys.stdout
    if plot is not None:
        plot_report(report, plot)
    if as_json:
        out.write(json.dumps(report, indent=2) + "\n")
        return report
    from rich.console import Console

    console = Console(file=out, width=max(Console().width, 200))
    for table in _tables(report):
        console.print(table)
    mismatched = [f"{m['algorithm']} at {format_bytes(m['size_bytes'])}" for m in report["measurements"]
                  if not m["counts_match"]]
    console.print("counted bytes and messages per rank equal the analytic bytes_sent/messages_sent: "
                  + ("yes, for every algorithm and size" if not mismatched else f"NO for {', '.join(mismatched)}")
                  + " (native: both are the ring estimate, its traffic is invisible)")
    if plot is not None:
        console.print(f"plot written to {plot}")
    return report
