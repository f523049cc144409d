"""Byzantine-robust aggregation: final test accuracy of every aggregator under every attack, and each
aggregator's cost on clean runs (issue 13).

LeNet-5 on mnist5k (4,000 training digits), 5 or 8 data-parallel workers, global batch 240 (8 workers: 240
too), momentum SGD at lr 0.03 with the dataset's cosine schedule, `EPOCHS` epochs, seed 0. The f Byzantine
workers are ranks 1..f; every attack at its default scale (polytrain.faults). A cell whose aggregator's
resilience condition fails for (n, f) is not run ("n/a"); a run whose loss diverged counts as accuracy 0.

    python benchmarks/bench_byzantine.py run OUT.jsonl [--epochs 4]    # every cell, resumable
    python benchmarks/bench_byzantine.py summarize OUT.jsonl [--plot heatmap.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polytrain.aggregators import AGGREGATORS, check_resilience
from polytrain.config import Experiment
from polytrain.faults import ATTACK_SCALES
from polytrain.train import train, train_sequence

SETTINGS = ((5, 1), (5, 2), (8, 1), (8, 2))
AGGREGATOR_ORDER = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geometric_median",
                    "centered_clipping")
ATTACKS = ("none",) + tuple(ATTACK_SCALES)


def experiment(n: int, f: int, aggregator: str, attack: str, epochs: int) -> Experiment:
    faults = [] if attack == "none" else [{"kind": "byzantine", "ranks": "+".join(str(r) for r in range(1, f + 1)),
                                           "attack": attack}]
    return Experiment(model="lenet5", dataset="mnist5k", workers=n, epochs=epochs, batch_size=240, lr=0.03, seed=0,
                      aggregator=aggregator, aggregator_args={"f": f}, faults=faults, timeout_s=300)


def cells(epochs: int):
    for n, f in SETTINGS:
        for aggregator in AGGREGATOR_ORDER:
            try:
                check_resilience(aggregator, {}, n, f)
            except ValueError:
                continue
            for attack in ATTACKS:
                yield (n, f, aggregator, attack), experiment(n, f, aggregator, attack, epochs)


def main_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    done = {tuple(r["cell"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    todo = [(key, exp) for key, exp in cells(args.epochs) if key not in done]
    for n in sorted({key[0] for key, _ in todo}):
        batch = [(key, exp) for key, exp in todo if key[0] == n]
        # One spawn per world size; a diverged run fails its sequence, so then each cell runs on its own.
        try:
            results = train_sequence([exp for _, exp in batch])
        except Exception:
            results = []
            for _, exp in batch:
                try:
                    results.append(train(exp))
                except Exception as error:  # diverged (NaN loss): recorded as such
                    results.append(str(error).splitlines()[0])
        with out.open("a") as file:
            for (key, _), result in zip(batch, results):
                if isinstance(result, str):
                    record = {"cell": list(key), "accuracy": 0.0, "error": result}
                else:
                    rated = result.epochs[-1]
                    record = {"cell": list(key), "accuracy": result.final_test_accuracy,
                              "step_s": rated["train_s"] / rated["steps"], "samples_per_s": rated["samples_per_s"],
                              "bytes_sent_per_step": result.comm["bytes_sent_per_step"]}
                file.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


def main_summarize(args: argparse.Namespace) -> None:
    records = {tuple(r["cell"]): r for r in map(json.loads, Path(args.out).read_text().splitlines())}
    for n, f in SETTINGS:
        print(f"\n**n = {n}, f = {f}** (final test accuracy, %)\n")
        print("| aggregator | " + " | ".join(ATTACKS) + " |")
        print("|---|" + "---:|" * len(ATTACKS))
        for aggregator in AGGREGATOR_ORDER:
            row = [records.get((n, f, aggregator, attack)) for attack in ATTACKS]
            text = ["n/a" if r is None else (f"{100 * r['accuracy']:.1f}" + ("†" if "error" in r else "")) for r in row]
            print(f"| {aggregator} | " + " | ".join(text) + " |")
    print("\n**Cost on clean runs** (mean step time of the last epoch, ms)\n")
    print("| aggregator | " + " | ".join(f"n={n} f={f}" for n, f in SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for aggregator in AGGREGATOR_ORDER:
        row = [records.get((n, f, aggregator, "none")) for n, f in SETTINGS]
        print(f"| {aggregator} | " + " | ".join("n/a" if r is None else f"{1000 * r['step_s']:.1f}" for r in row) + " |")
    if args.plot:
        plot(records, args.plot)


def plot(records: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4.8), sharey=True)
    for axis, (n, f) in zip(axes, SETTINGS):
        grid = np.full((len(AGGREGATOR_ORDER), len(ATTACKS)), np.nan)
        for i, aggregator in enumerate(AGGREGATOR_ORDER):
            for j, attack in enumerate(ATTACKS):
                record = records.get((n, f, aggregator, attack))
                if record is not None:
                    grid[i, j] = 100 * record["accuracy"]
        image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
                axis.text(j, i, text, ha="center", va="center", fontsize=7,
                          color="white" if np.isnan(grid[i, j]) or grid[i, j] < 60 else "black")
        axis.set_xticks(range(len(ATTACKS)), ATTACKS, rotation=45, ha="right")
        axis.set_yticks(range(len(AGGREGATOR_ORDER)), AGGREGATOR_ORDER)
        axis.set_title(f"n = {n}, f = {f}")
    figure.colorbar(image, ax=axes, shrink=0.8, label="final test accuracy (%)")
    figure.suptitle("LeNet-5 on mnist5k under Byzantine workers")
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("out")
    run.add_argument("--epochs", type=int, default=4)
    summarize = commands.add_parser("summarize")
    summarize.add_argument("out")
    summarize.add_argument("--plot", default=None)
    args = parser.parse_args()
    {"run": main_run, "summarize": main_summarize}[args.command](args)


if __name__ == "__main__":
    assert set(AGGREGATOR_ORDER) == set(AGGREGATORS.names())
    main()
