"""The collective benchmark: the alpha-beta fit, crossovers, a tiny real run and its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from polytrain.bench.collectives import (bus_factor, fit_alpha_beta, fit_slope, measured_crossings,
                                         model_terms, parse_algorithms, parse_sizes, plot_report,
                                         predicted_crossing, summarize)
from polytrain.cli import main
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

ALGORITHMS = ALLREDUCE_ALGORITHMS.names()
SIZES = [1 << k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
ALPHA_S, BETA_S_PER_BYTE, GAMMA_S_PER_BYTE = 60e-6, 1 / 1.5e9, 1 / 8e9


@pytest.mark.parametrize("world_size", [2, 4, 5, 8])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fit_recovers_alpha_and_beta_from_the_cost_model(algorithm, world_size):
    cost_s = ALLREDUCE_ALGORITHMS.get(algorithm).cost_s
    times_s = [cost_s(n, world_size, ALPHA_S, BETA_S_PER_BYTE, GAMMA_S_PER_BYTE) for n in SIZES]
    fit = fit_alpha_beta(algorithm, world_size, SIZES, times_s, GAMMA_S_PER_BYTE)
    assert fit.alpha_s == pytest.approx(ALPHA_S, rel=1e-9)
    assert fit.beta_s_per_byte == pytest.approx(BETA_S_PER_BYTE, rel=1e-9)
    assert fit.max_abs_relative_error < 1e-9
    assert [point.predicted_s for point in fit.points] == pytest.approx(times_s, rel=1e-12)


def test_model_terms_are_the_coefficients_of_cost_s():
    # Ring on 4 ranks (Thakur et al. 2005): 2(p-1) = 6 latencies, 2(p-1)/p n = 1.5 n bytes moved, 0.75 n summed.
    assert model_terms("ring", 1000, 4) == pytest.approx((6, 1500, 750))
    assert model_terms("central", 1000, 4) == pytest.approx((6, 6000, 3000))


def test_fit_keeps_alpha_and_beta_nonnegative():
    # Pure bandwidth times with a constant noise floor that a negative alpha would fit better.
    times_s = [n * 1e-9 for n in SIZES]
    times_s[0] *= 0.5
    fit = fit_alpha_beta("ring", 4, SIZES, times_s)
    assert fit.alpha_s >= 0 and fit.beta_s_per_byte > 0


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two or more sizes"):
        fit_alpha_beta("ring", 4, [1024], [1e-3])


def test_reduction_slope_is_the_time_per_byte():
    assert fit_slope(SIZES, [2e-6 + n * 1e-10 for n in SIZES]) == pytest.approx(1e-10, rel=1e-9)


def test_measured_crossing_interpolates_in_log_size():
    # t_a = n and t_b = 4 sqrt(n) cross at n = 16; their log ratio is linear in log n, so the
    # interpolation between 8 and 32 is exact.
    sizes = [2, 8, 32, 128]
    crossings = measured_crossings(sizes, [float(n) for n in sizes], [4 * n ** 0.5 for n in sizes])
    assert len(crossings) == 1 and crossings[0][0] == 1 and crossings[0][1] == pytest.approx(16.0)
    assert measured_crossings(sizes, [1.0] * 4, [2.0] * 4) == []
    zigzag = measured_crossings(sizes, [1.0, 3.0, 1.0, 3.0], [2.0] * 4)
    assert [index for index, _ in zigzag] == [0, 1, 2]


def test_predicted_crossing_of_two_fitted_models():
    # Tree on 8 ranks: 6 alpha + 6 n beta + 3 n gamma; ring: 14 alpha + 1.75 n beta + 0.875 n gamma.
    world_size = 8
    fits = {name: fit_alpha_beta(name, world_size, SIZES,
                                 [ALLREDUCE_ALGORITHMS.get(name).cost_s(n, world_size, ALPHA_S, BETA_S_PER_BYTE,
                                                                         GAMMA_S_PER_BYTE) for n in SIZES],
                                 GAMMA_S_PER_BYTE)
            for name in ("tree", "ring")}
    below, above, size = predicted_crossing(fits["ring"], fits["tree"])
    expected = 8 * ALPHA_S / (4.25 * BETA_S_PER_BYTE + 2.125 * GAMMA_S_PER_BYTE)
    assert (below, above) == ("tree", "ring") and size == pytest.approx(expected)
    assert predicted_crossing(fits["ring"], fits["ring"]) is None


def test_summary_statistics_of_synthetic_timings():
    algorithms, sizes, world_size, warmup = ["ring", "tree"], [4096, 65536, 1 << 20], 4, 1
    repeats = 7
    times = np.empty((warmup + repeats, 2, 3))
    for a, name in enumerate(algorithms):
        for s, n in enumerate(sizes):
            exact = ALLREDUCE_ALGORITHMS.get(name).cost_s(n, world_size, ALPHA_S, BETA_S_PER_BYTE, 0.0)
            times[:, a, s] = exact * np.linspace(0.97, 1.03, warmup + repeats)
    times[0] *= 10  # a slow warm-up, reported but not counted
    counts = np.zeros((world_size, 2, 3, 2), dtype=np.int64)
    for a, name in enumerate(algorithms):
        algorithm = ALLREDUCE_ALGORITHMS.get(name)
        for s, n in enumerate(sizes):
            for rank in range(world_size):
                counts[rank, a, s] = algorithm.bytes_sent(n, world_size, rank, 4), algorithm.messages_sent(
                    n // 4, world_size, rank)
    add_times = np.array([[1e-6 + 0 * n for n in sizes]] * (warmup + repeats))
    report = summarize(world_size, algorithms, sizes, times, add_times, counts, warmup, torch.float32)
    assert report["counts_match"] and report["repeats"] == repeats
    ring_1mb = next(m for m in report["measurements"] if m["algorithm"] == "ring" and m["size_bytes"] == 1 << 20)
    assert len(ring_1mb["samples_s"]) == repeats and ring_1mb["warmup_s"] == [pytest.approx(times[0, 0, 2])]
    assert ring_1mb["median_s"] == pytest.approx(times[warmup + 3, 0, 2])
    assert ring_1mb["busbw_bytes_per_s"] == pytest.approx((1 << 20) / ring_1mb["median_s"] * 1.5)
    assert ring_1mb["ci_low_s"] <= ring_1mb["median_s"] <= ring_1mb["ci_high_s"]
    assert report["fits"]["ring"]["alpha_s"] == pytest.approx(ALPHA_S, rel=0.05)
    assert {c["source"] for c in report["crossovers"]} <= {"measured", "predicted"}


def test_bus_factor_is_nccl_tests_allreduce_convention():
    assert bus_factor(2) == 1.0 and bus_factor(4) == 1.5 and bus_factor(8) == 1.75


def test_sizes_and_algorithms_parse():
    assert parse_sizes("1KB,64KB,1MB,16MB") == [1024, 65536, 1 << 20, 1 << 24]
    assert parse_sizes("2^10..2^13") == [1024, 2048, 4096, 8192]
    assert parse_sizes("4^5..4^6,4096,1kib") == [1024, 4096]
    assert parse_algorithms("ring, tree,ring") == ["ring", "tree"]
    assert parse_algorithms("all") == ALGORITHMS


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "12XB"], "--sizes: cannot read '12XB'"),
    (["--sizes", "2^12..2^10"], "one base B >= 2 and a <= b"),
    (["--sizes", "1026"], "1026 bytes is not a whole number of 4-byte float32 elements"),
    (["--algorithms", "rign"], "unknown allreduce algorithm 'rign'; available: butterfly, central"),
    (["--workers", "1"], "--workers must be at least 2"),
    (["--repeats", "0"], "need repeats >= 1"),
    (["--dtype", "int8"], "--dtype: unknown type 'int8'"),
    (["--plot", "out.pdf"], "--plot writes a PNG"),
])
def test_bad_input_is_one_line_error(capsys, argv, message):
    assert main(["bench", "collectives", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("polytrain: error: ") and message in error and error.count("\n") == 1


def test_tiny_real_run_through_the_command_line(capsys, tmp_path):
    argv = ["bench", "collectives", "--workers", "2", "--algorithms", "ring,tree", "--sizes", "1KB,4KB",
            "--repeats", "2", "--warmup", "1", "--threads", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world_size"] == 2 and report["algorithms"] == ["ring", "tree"]
    assert report["sizes_bytes"] == [1024, 4096] and report["repeats"] == 2 and report["warmup"] == 1
    assert [(m["algorithm"], m["size_bytes"]) for m in report["measurements"]] == [
        ("ring", 1024), ("ring", 4096), ("tree", 1024), ("tree", 4096)]
    for m in report["measurements"]:
        assert len(m["samples_s"]) == 2 and len(m["warmup_s"]) == 1
        assert m["ci_low_s"] <= m["median_s"] <= m["ci_high_s"]
        assert m["bytes_sent"] == m["bytes_sent_analytic"] and m["messages_sent"] == m["messages_sent_analytic"]
    ring_4k = report["measurements"][1]
    assert ring_4k["bytes_sent"] == [4096, 4096]  # 2(p-1)/p n for p = 2
    assert set(report["fits"]) == {"ring", "tree"} and report["counts_match"]
    assert report["environment"]["torch"] == torch.__version__
    plot = tmp_path / "collectives.png"
    plot_report(report, str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_in_process_under_torchrun(tmp_path):
    # torchrun starts the ranks itself; each runs the benchmark in-process and only rank 0 prints.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "polytrain", "bench", "collectives", "--algorithms", "butterfly", "--sizes", "1KB,2KB",
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["world_size"] == 2 and report["launcher"] == "torchrun" and report["counts_match"]
