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

The package by concern: `sizes` reads the settings, `measure` times the calls on the ranks, `summary`
turns the times into the report, `fit` holds the models, fits and crossovers it contains, and `report`
prints it (tables, JSON) and plots it.
"""

from polytrain.bench.collectives.fit import (Crossover, Fit, FitPoint, bus_factor, find_crossovers, fit_alpha_beta,
                                             fit_slope, measured_crossings, model_terms, predicted_crossing)
from polytrain.bench.collectives.measure import bench_collectives, collect_report
from polytrain.bench.collectives.report import plot_report, run_bench_collectives
from polytrain.bench.collectives.sizes import (DEFAULT_SIZES, DTYPES, format_bytes, parse_algorithms, parse_dtype,
                                               parse_size, parse_sizes)
from polytrain.bench.collectives.summary import TIMING, Measurement, summarize

__all__ = ["Crossover", "Fit", "FitPoint", "bus_factor", "find_crossovers", "fit_alpha_beta", "fit_slope",
           "measured_crossings", "model_terms", "predicted_crossing", "bench_collectives", "collect_report",
           "plot_report", "run_bench_collectives", "DEFAULT_SIZES", "DTYPES", "format_bytes", "parse_algorithms",
           "parse_dtype", "parse_size", "parse_sizes", "TIMING", "Measurement", "summarize"]
