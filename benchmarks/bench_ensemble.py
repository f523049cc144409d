"""Ensembles and distillation on 4 workers: each member's test accuracy, the ensemble's, the student's
distilled from it, and one model trained on all 4 workers with the same settings (the baseline a student
must beat to be worth its teacher).

LeNet-5/mnist5k, momentum SGD at lr 0.05, batch 100, E epochs, `threads=1`; k = 2 members of 2 workers and
k = 4 members of 1 worker; the student is LeNet-5 on all 4 workers for E epochs (T = 2, soft weight 0.5,
the defaults). Per seed s the members have seeds s..s+k-1 and the baseline seed s; medians over the seeds
with 95 % nonparametric CIs.

Usage:

    python benchmarks/bench_ensemble.py [--seeds 0 1 2] [--epochs 5] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.train import train
from polytrain.train.ensemble import train_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json-out")
    options = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in options.seeds:
        exp = Experiment(model="lenet5", dataset="mnist5k", workers=4, epochs=options.epochs, batch_size=100,
                         optimizer="momentum", lr=0.05, augment_shift=0, threads=1, seed=seed)
        rows.setdefault("one model on 4 workers", {}).setdefault("accuracy", []).append(
            train(exp).final_test_accuracy)
        for members in (2, 4):
            result = train_ensemble(exp, members=members)
            row = rows.setdefault(f"{members} members", {})
            for key, value in (("mean member", sum(result.member_accuracy) / members),
                               ("best member", max(result.member_accuracy)),
                               ("ensemble", result.ensemble_accuracy),
                               ("student", result.student.final_test_metric)):
                row.setdefault(key, []).append(value)
    print("| run | mean member | best member | ensemble | student (distilled) |")
    print("|---|---|---|---|---|")
    baseline = median_ci(rows["one model on 4 workers"]["accuracy"])
    print(f"| one model on 4 workers | – | – | – | {_cell(baseline)} (trained on labels) |")
    for members in (2, 4):
        row = rows[f"{members} members"]
        print(f"| {members} members of {4 // members} worker{'s' if members == 2 else ''} | "
              + " | ".join(_cell(median_ci(row[key])) for key in ("mean member", "best member", "ensemble",
                                                                   "student")) + " |")
    if options.json_out:
        with open(options.json_out, "w") as file:
            json.dump(rows, file, indent=1)


def _cell(summary) -> str:
    return f"{summary.median:.3f} [{summary.low:.3f}, {summary.high:.3f}]"


if __name__ == "__main__":
    main()
