"""Every consistency model at 4 workers, and what a slow worker costs it: test accuracy, time to a target
accuracy, samples/s, bytes per step against the analytic volume and the staleness of applied gradients,
with and without one worker 3x slower (`--straggler rank=1,slowdown=3`).

Every run is LeNet-5/mnist5k, 4 workers, Adam at lr 2e-3, batch 100, a constant schedule, `threads=1`;
policies: allreduce, ps sync, ps ssp with s in {1, 3, 8}, ps async, asynchronous EASGD (one server rank
beside the 4 workers: 5 processes on this machine's cores), local SGD (period 4), gossip (D-PSGD) and
AD-PSGD on a ring, synchronous EASGD (tau 4) and Hogwild!. The rate is the Result's
samples/s (epochs 2..E over rank 0's training time, which for the parameter server includes waiting at
each epoch's end for the slowest worker's last pushes); time to target is the wall time at the end of the
first epoch whose test accuracy reaches it (None: not within E epochs).

Per seed, the runs of one rank count share one spawn (`train_sequence`), in an order that rotates from
seed to seed (a slow phase of the machine then hits no policy more than the others); the straggler's ratio to the same
policy's run without it is taken per seed and summarised by its median and 95 % nonparametric CI.

Usage:

    python benchmarks/bench_consistency.py [--seeds 0 1 2] [--epochs 3] [--target 0.85] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.models import build_model
from polytrain.train import train_sequence
from polytrain.train.defaults import resolve, run_ranks

POLICIES = {
    "allreduce": ("allreduce", {}),
    "ps sync": ("ps", {"mode": "sync"}),
    "ps ssp s=1": ("ps", {"mode": "ssp", "staleness": 1}),
    "ps ssp s=3": ("ps", {"mode": "ssp", "staleness": 3}),
    "ps ssp s=8": ("ps", {"mode": "ssp", "staleness": 8}),
    "ps async": ("ps", {"mode": "async"}),
    "local_sgd H=4": ("local_sgd", {"period": 4}),
    "gossip ring": ("gossip", {"topology": "ring"}),
    "adpsgd ring": ("adpsgd", {"topology": "ring"}),
    "easgd tau=4": ("easgd", {"tau": 4}),
    "easgd async tau=4": ("easgd", {"tau": 4, "servers": 1}),
    "hogwild": ("hogwild", {}),
}
STRAGGLER = {"rank": 1, "slowdown": 3.0}
WORKERS = 4


def analytic_bytes_per_step(name: str, n: int, p: int = WORKERS) -> float:
    """Bytes rank 0 (a worker; AD-PSGD's active rank) sends per step by each protocol, for n model bytes."""
    ring = 2 * (p - 1) / p * n  # allreduce (native: counted as ring), one average of the models
    return {"allreduce": ring, "ps sync": n, "ps ssp s=1": n, "ps ssp s=3": n, "ps ssp s=8": n, "ps async": n,
            "local_sgd H=4": ring / 4, "gossip ring": 2 * n, "adpsgd ring": n, "easgd tau=4": ring / 4,
            "easgd async tau=4": n / 4, "hogwild": 0.0}[name]


def experiments(seed: int, epochs: int, target: float) -> dict[tuple[str, bool], Experiment]:
    base = Experiment(model="lenet5", dataset="mnist5k", workers=4, epochs=epochs, batch_size=100, optimizer="adam",
                      lr=2e-3, schedule="constant", augment_shift=0, threads=1, seed=seed, target=target)
    return {(name, slowed): base.replace(strategy=strategy, strategy_args=args, straggler=STRAGGLER if slowed else {})
            for name, (strategy, args) in POLICIES.items() for slowed in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--json-out")
    options = parser.parse_args()
    rows: dict[tuple[str, bool], list[dict]] = {}
    for seed in options.seeds:
        runs = experiments(seed, options.epochs, options.target)
        for ranks in sorted({run_ranks(resolve(exp)) for exp in runs.values()}):  # one spawn per rank count
            keys = [key for key, exp in runs.items() if run_ranks(resolve(exp)) == ranks]
            keys = keys[seed % len(keys):] + keys[:seed % len(keys)]  # the order rotates between seeds
            for key, result in zip(keys, train_sequence([runs[key] for key in keys])):
                sent = sum(result.comm["per_rank"][0]["by_operation"].values())
                rows.setdefault(key, []).append({"seed": seed, "samples_per_s": result.samples_per_s,
                                                 "time_to_target_s": result.time_to_target_s,
                                                 "final_test_accuracy": result.final_test_accuracy,
                                                 "bytes_per_step": sent / result.steps,
                                                 "staleness": result.comm.get("staleness", {}).get("max"),
                                                 "histogram": result.comm.get("staleness", {}).get("histogram")})
    print_tables(rows, options.target)
    if options.json_out:
        with open(options.json_out, "w") as file:
            json.dump({f"{name}{' straggler' if slowed else ''}": value for (name, slowed), value in rows.items()},
                      file, indent=1)


def print_tables(rows: dict[tuple[str, bool], list[dict]], target: float) -> None:
    n = sum(4 * p.numel() for p in build_model("lenet5", 10, (1, 28, 28)).parameters())
    print(f"| policy | test accuracy (median, 95 % CI) | time to {target:g} (s) | samples/s | bytes/step sent by "
          f"rank 0 | analytic |")
    print("|---|---|---|---|---|---|")
    for name in POLICIES:
        fast = rows[(name, False)]
        accuracy = median_ci([row["final_test_accuracy"] for row in fast])
        reached = [row["time_to_target_s"] for row in fast if row["time_to_target_s"] is not None]
        time = median_ci(reached) if len(reached) == len(fast) else None
        print(f"| {name} | {accuracy.median:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}] | "
              f"{f'{time.median:.1f} [{time.low:.1f}, {time.high:.1f}]' if time else f'{len(reached)} of {len(fast)} seeds'}"
              f" | {_median(fast, 'samples_per_s'):.0f} | {_median(fast, 'bytes_per_step'):.0f} | "
              f"{analytic_bytes_per_step(name, n):.0f} |")
    print()
    print("| staleness of applied gradients (all seeds) | 0 | 1 | 2 | 3 | 4..7 | 8+ | max |")
    print("|---|---|---|---|---|---|---|---|")
    for name in POLICIES:
        for slowed in (False, True):
            histograms = [row["histogram"] for row in rows[(name, slowed)] if row["histogram"]]
            if not histograms:
                continue
            total = Counter()
            for histogram in histograms:
                total.update({int(s): count for s, count in histogram.items()})
            count = sum(total.values())
            bins = [total[0], total[1], total[2], total[3], sum(total[s] for s in range(4, 8)),
                    sum(c for s, c in total.items() if s >= 8)]
            print(f"| {name}{' (3x slower worker)' if slowed else ''} | "
                  + " | ".join(f"{100 * b / count:.0f} %" for b in bins) + f" | {max(total)} |")
    print()
    print(f"| policy | samples/s | with a 3x slower worker | kept (median, 95 % CI) | time to {target:g} "
          f"(s) | with the slow worker | test accuracy | with the slow worker | max staleness (slow) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in POLICIES:
        fast, slow = rows[(name, False)], rows[(name, True)]
        kept = median_ci([s["samples_per_s"] / f["samples_per_s"] for f, s in zip(fast, slow)])
        print(f"| {name} | {_median(fast, 'samples_per_s'):.0f} | {_median(slow, 'samples_per_s'):.0f} | "
              f"{kept.median:.2f} [{kept.low:.2f}, {kept.high:.2f}] | {_reached(fast)} | {_reached(slow)} | "
              f"{_median(fast, 'final_test_accuracy'):.3f} | {_median(slow, 'final_test_accuracy'):.3f} | "
              f"{_median(slow, 'staleness') if slow[0]['staleness'] is not None else '–'} |")


def _reached(rows: list[dict]) -> str:
    missed = sum(row["time_to_target_s"] is None for row in rows)
    return f"not reached in {missed} of {len(rows)} seeds" if missed else f"{_median(rows, 'time_to_target_s')}"


def _median(rows: list[dict], key: str):
    """The median over seeds; None when a run has no value (target not reached, no staleness)."""
    values = [row[key] for row in rows]
    if any(value is None for value in values):
        return None
    median = statistics.median(values)
    return round(median, 1) if key == "time_to_target_s" else median


if __name__ == "__main__":
    main()
