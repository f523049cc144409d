"""`polytrain demo`: the main job on an embedded default, printed as a results table."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polytrain.config import Experiment
from polytrain.train import Result, train
from polytrain.train.progress import console_reporter

TARGET_ACCURACY = 0.97


def demo_experiments(epochs: int | None, out: Path | None) -> dict[str, Experiment]:
    """The runs the demo compares, by label."""
    base = Experiment(model="lenet5", dataset="mnist5k", epochs=epochs, target_accuracy=TARGET_ACCURACY)
    return {"1 worker": base.replace(out=str(out / "1-worker") if out else None)}


def results_table(results: dict[str, Result]) -> Table:
    """Accuracy beside speed, one row per run."""
    table = Table(title=f"LeNet-5 on real MNIST digits (mnist5k), target {100 * TARGET_ACCURACY:.0f}% test accuracy")
    columns = ("run", "batch", "test acc", f"to {100 * TARGET_ACCURACY:.0f}%", "wall s", "samples/s", "bytes/step")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, result in results.items():
        config = result.config
        to_target = f"{result.time_to_target_s:.1f} s" if result.time_to_target_s is not None else "never"
        table.add_row(f"{label}, {config['epochs']} epochs", str(config["batch_size"]),
                      f"{100 * result.final_test_accuracy:.2f}%", to_target, f"{result.wall_s:.1f}",
                      f"{result.samples_per_s:.0f}", f"{result.comm['bytes_sent_per_step']:.0f}")
    return table


def run_demo(epochs: int | None = None, out: Path | None = None) -> dict[str, Result]:
    """Trains each demo run on this machine and prints the comparison table."""
    console = Console()
    console.width = max(console.width, 110)  # the table needs ~100 columns; pipes default to 80
    console.print("polytrain demo: training on 4,000 real MNIST digits, testing on the 1,000 held out "
                  "(accuracy is on the test split; rates exclude the first epoch).")
    results = {label: train(exp, reporter=console_reporter(sys.stdout))
               for label, exp in demo_experiments(epochs, out).items()}
    console.print(results_table(results))
    return results
