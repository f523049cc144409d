"""Reproduces the allreduce tables of BENCHMARKS.md ("Collectives" and the bus-bandwidth part of "Peer comparison").

Runs `polytrain.bench.collectives.collect_report` (what `polytrain bench collectives` runs) at each worker
count and prints Markdown: median time with its 95 % CI, bus bandwidth, the fitted alpha/beta, predicted
against measured time, the crossovers, and the bus bandwidth of ring and rabenseifner relative to gloo's
own allreduce (`native`) from 4 MiB up, as the median of per-repetition ratios (the algorithms of one
repetition run back to back, so each ratio pairs calls made under the same machine load). Usage:

    python benchmarks/bench_collectives.py [--workers 4 2] [--sizes 2^10..2^26] [--repeats 21] [--warmup 3]
                                          [--json-out FILE] [--plot-prefix PREFIX]
"""

from __future__ import annotations

import argparse
import json
import os

from polytrain.bench.collectives import collect_report, format_bytes, parse_sizes, plot_report
from polytrain.bench.stats import median_ci
from polytrain.comm import DEFAULT_TIMEOUT_S
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

PEERS = ("ring", "rabenseifner")
PEER_MIN_BYTES = 4 << 20


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def _by_key(report: dict) -> dict:
    return {(m["algorithm"], m["size_bytes"]): m for m in report["measurements"]}


def time_table(report: dict) -> str:
    """Median ms [95 % CI] and busbw GB/s per size and algorithm; the fastest in bold."""
    algorithms, by_key = report["algorithms"], _by_key(report)
    lines = ["| size | " + " | ".join(algorithms) + " |", "|---:|" + "---:|" * len(algorithms)]
    for n in report["sizes_bytes"]:
        fastest = min(algorithms, key=lambda name: by_key[name, n]["median_s"])
        cells = []
        for name in algorithms:
            m = by_key[name, n]
            text = (f"{_ms(m['median_s'])} [{_ms(m['ci_low_s'])}, {_ms(m['ci_high_s'])}] "
                    f"/ {m['busbw_bytes_per_s'] / 1e9:.3g}")
            cells.append(f"**{text}**" if name == fastest else text)
        lines.append(f"| {format_bytes(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_table(report: dict) -> str:
    """alpha, beta, 1/beta and the prediction error per algorithm."""
    lines = ["| algorithm | A (latencies) | B/n (bytes moved per byte) | alpha us | beta ps/B | 1/beta GB/s | "
             "error at smallest / largest size | max abs error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    p, n = report["world_size"], report["sizes_bytes"][-1]
    for name, fit in report["fits"].items():
        cost_s = ALLREDUCE_ALGORITHMS.get(name).cost_s
        latencies, moved = cost_s(n, p, 1.0, 0.0, 0.0), cost_s(n, p, 0.0, 1.0, 0.0) / n
        bandwidth = fit["bandwidth_bytes_per_s"]
        first, last = fit["points"][0]["relative_error"], fit["points"][-1]["relative_error"]
        lines.append(f"| {name} | {latencies:g} | {moved:.3g} | {1e6 * fit['alpha_s']:.3g} | "
                     f"{1e12 * fit['beta_s_per_byte']:.3g} | {bandwidth / 1e9 if bandwidth else float('inf'):.3g} | "
                     f"{100 * first:+.0f}% / {100 * last:+.0f}% | {100 * fit['max_abs_relative_error']:.0f}% |")
    return "\n".join(lines)


def error_table(report: dict) -> str:
    """(predicted - measured) / measured per size and algorithm."""
    algorithms = list(report["fits"])
    lines = ["| size | " + " | ".join(algorithms) + " |", "|---:|" + "---:|" * len(algorithms)]
    for i, n in enumerate(report["sizes_bytes"]):
        lines.append(f"| {format_bytes(n)} | " + " | ".join(
            f"{100 * report['fits'][name]['points'][i]['relative_error']:+.0f}%" for name in algorithms) + " |")
    return "\n".join(lines)


def crossover_table(report: dict) -> str:
    """Measured crossings whose neighbours are clearly ordered, and every predicted one."""
    rows = [c for c in report["crossovers"] if c["clear"] or c["source"] == "predicted"]
    lines = ["| faster below | faster above | size | source | clear |", "|---|---|---:|---|---|"]
    for c in sorted(rows, key=lambda c: (c["faster_below"], c["faster_above"], c["source"])):
        lines.append(f"| {c['faster_below']} | {c['faster_above']} | {format_bytes(c['size_bytes'])} | "
                     f"{c['source']} | {'yes' if c['clear'] else 'no'} |")
    unclear = sum(1 for c in report["crossovers"] if c["source"] == "measured" and not c["clear"])
    return "\n".join(lines) + f"\n\n({unclear} further measured sign changes lie within overlapping CIs.)"


def peer_ratios(report: dict) -> list[dict]:
    """busbw of ring / rabenseifner over native per size >= 4 MiB: median [CI] of per-repetition ratios."""
    by_key, rows = _by_key(report), []
    for n in report["sizes_bytes"]:
        if n < PEER_MIN_BYTES or ("native", n) not in by_key:
            continue
        for name in PEERS:
            if (name, n) not in by_key:
                continue
            # busbw ratio = t_native / t_algorithm, paired within each repetition
            pairs = zip(by_key["native", n]["samples_s"], by_key[name, n]["samples_s"])
            ratios = [t_native / t for t_native, t in pairs]
            rows.append({"algorithm": name, "size_bytes": n, **median_ci(ratios)._asdict()})
    return rows


def peer_table(rows: list[dict]) -> str:
    lines = ["| size | algorithm | busbw / native busbw, median [95 % CI] | goal >= 0.8 |", "|---:|---|---:|---|"]
    for row in rows:
        verdict = "met" if row["low"] >= 0.8 else ("missed" if row["high"] < 0.8 else "undecided (CI spans 0.8)")
        lines.append(f"| {format_bytes(row['size_bytes'])} | {row['algorithm']} | {row['median']:.2f} "
                     f"[{row['low']:.2f}, {row['high']:.2f}] | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--sizes", default="2^10..2^26")
    parser.add_argument("--algorithms", default=",".join(ALLREDUCE_ALGORITHMS.names()))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--plot-prefix", default=None, help="write PREFIX-<workers>w.png")
    args = parser.parse_args()
    reports = []
    for workers in args.workers:
        load = os.getloadavg()[0]
        report = collect_report(workers, args.algorithms.split(","), parse_sizes(args.sizes), args.repeats,
                                args.warmup, threads=args.threads, timeout_s=max(DEFAULT_TIMEOUT_S, 120.0))
        report["load_average_before"] = load
        report["load_average_after"] = os.getloadavg()[0]
        report["peer_ratios"] = peer_ratios(report)
        reports.append(report)
        confidence = min(m["confidence"] for m in report["measurements"])
        gamma = report["reduction"]["gamma_s_per_byte"]
        print(f"## {workers} workers ({report['launcher']}), load average {load:.1f} -> "
              f"{report['load_average_after']:.1f}; {report['repeats']} repetitions after {report['warmup']} "
              f"warm-up; cells: median ms [{100 * confidence:.1f} % CI] / busbw GB/s\n")
        print(time_table(report), "\n")
        print(f"gamma (measured x += y) = {1e12 * gamma:.3g} ps/byte\n")
        print(fit_table(report), "\n")
        print(error_table(report), "\n")
        print(crossover_table(report), "\n")
        print(peer_table(report["peer_ratios"]), "\n")
        print("counted bytes = analytic for every algorithm, size and rank:", report["counts_match"], "\n")
        if args.plot_prefix:
            plot_report(report, f"{args.plot_prefix}-{workers}w.png")
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(reports, out, indent=2)


if __name__ == "__main__":
    main()
