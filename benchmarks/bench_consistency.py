"""What a slow worker costs each consistency model: samples/s and time to a target accuracy on 4 workers,
with and without one worker 3x slower (`--straggler rank=1,slowdown=3`).

Every run is LeNet-5/mnist5k, 4 workers, Adam at lr 2e-3, batch 100, a constant schedule, `threads=1`;
policies: allreduce, ps sync, ps ssp with s in {1, 3, 8}, ps async (one server rank beside the 4 workers:
5 processes on this machine's cores), local SGD (period 4) and gossip on a ring. The rate is the Result's
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

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.train import train_sequence

POLICIES = {
    "allreduce": ("allreduce", {}),
    "ps sync": ("ps", {"mode": "sync"}),
    "ps ssp s=1": ("ps", {"mode": "ssp", "staleness": 1}),
    "ps ssp s=3": ("ps", {"mode": "ssp", "staleness": 3}),
    "ps ssp s=8": ("ps", {"mode": "ssp", "staleness": 8}),
    "ps async": ("ps", {"mode": "async"}),
    "local_sgd H=4": ("local_sgd", {"period": 4}),
    "gossip ring": ("gossip", {"topology": "ring"}),
}
STRAGGLER = {"rank": 1, "slowdown": 3.0}


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
        for servers in (False, True):  # one spawn per rank count
            keys = [key for key, exp in runs.items() if (exp.strategy == "ps") == servers]
            keys = keys[seed % len(keys):] + keys[:seed % len(keys)]  # the order rotates between seeds
            for key, result in zip(keys, train_sequence([runs[key] for key in keys])):
                rows.setdefault(key, []).append({"seed": seed, "samples_per_s": result.samples_per_s,
                                                 "time_to_target_s": result.time_to_target_s,
                                                 "final_test_accuracy": result.final_test_accuracy,
                                                 "staleness": result.comm.get("staleness", {}).get("max")})
    print(f"| policy | samples/s | with a 3x slower worker | kept (median, 95 % CI) | time to {options.target:g} "
          f"(s) | with the slow worker | test accuracy | with the slow worker | max staleness (slow) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in POLICIES:
        fast, slow = rows[(name, False)], rows[(name, True)]
        kept = median_ci([s["samples_per_s"] / f["samples_per_s"] for f, s in zip(fast, slow)])
        print(f"| {name} | {_median(fast, 'samples_per_s'):.0f} | {_median(slow, 'samples_per_s'):.0f} | "
              f"{kept.median:.2f} [{kept.low:.2f}, {kept.high:.2f}] | {_median(fast, 'time_to_target_s')} | "
              f"{_median(slow, 'time_to_target_s')} | {_median(fast, 'final_test_accuracy'):.3f} | "
              f"{_median(slow, 'final_test_accuracy'):.3f} | {_median(slow, 'staleness')} |")
    if options.json_out:
        with open(options.json_out, "w") as file:
            json.dump({f"{name}{' straggler' if slowed else ''}": value for (name, slowed), value in rows.items()},
                      file, indent=1)


def _median(rows: list[dict], key: str):
    """The median over seeds; None when a run has no value (target not reached, no staleness)."""
    values = [row[key] for row in rows]
    if any(value is None for value in values):
        return None
    median = statistics.median(values)
    return round(median, 1) if key == "time_to_target_s" else median


if __name__ == "__main__":
    main()
