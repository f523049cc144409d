"""`polytrain bench collectives`: the report as tables (rich), JSON or a plot (matplotlib)."""

from __future__ import annotations

import json
import sys
from typing import IO

import numpy as np

from polytrain.bench.collectives.measure import collect_report
from polytrain.bench.collectives.sizes import format_bytes, parse_algorithms, parse_sizes


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
             title="median with 95% CI; dashed: fitted alpha-beta model")
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
