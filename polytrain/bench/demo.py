"""`polytrain demo`: the main job on an embedded default, printed as a results table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polytrain.config import Experiment
from polytrain.train import Result, train, train_sequence
from polytrain.train.progress import console_reporter

TARGET_ACCURACY = 0.97
PARALLEL_WORKERS = 4
# The parameter-server pattern, the bandwidth-optimal ring and the backend's own allreduce.
DEMO_ALGORITHMS = ("central", "ring", "native")


def demo_experiments(epochs: int | None, out: Path | None) -> tuple[Experiment, dict[str, Experiment]]:
    """The single-worker baseline and the parallel runs the demo compares with it, by label."""
    base = Experiment(model="lenet5", dataset="mnist5k", epochs=epochs, target=TARGET_ACCURACY)
    baseline = base.replace(out=str(out / "1-worker") if out else None)
    parallel = {f"{PARALLEL_WORKERS} workers, {name}": base.replace(
        workers=PARALLEL_WORKERS, strategy="allreduce", strategy_args={"algorithm": name},
        out=str(out / f"{PARALLEL_WORKERS}-workers-{name}") if out else None) for name in DEMO_ALGORITHMS}
    return baseline, parallel


def results_table(results: dict[str, Result], baseline: Result) -> Table:
    """Accuracy beside speed, one row per run, speed-up against the single worker of the same code."""
    table = Table(title=f"LeNet-5 on real MNIST digits (mnist5k), global batch {baseline.config['batch_size']}, "
                        f"{baseline.config['epochs']} epochs, target {100 * TARGET_ACCURACY:.0f}% test accuracy")
    columns = ("run", "test acc", f"to {100 * TARGET_ACCURACY:.0f}%", "wall s", "samples/s", "speed-up",
               "bytes sent/step")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, result in results.items():
        to_target = f"{result.time_to_target_s:.1f} s" if result.time_to_target_s is not None else "never"
        estimated = "~" if result.comm.get("estimated") else ""
        table.add_row(label, f"{100 * result.final_test_accuracy:.2f}%", to_target, f"{result.wall_s:.1f}",
                      f"{result.samples_per_s:.0f}", f"{result.samples_per_s / baseline.samples_per_s:.2f}x",
                      f"{estimated}{result.comm['bytes_sent_per_step']:,.0f}")
    return table


def run_demo(epochs: int | None = None, out: Path | None = None) -> dict[str, Result]:
    """Trains each demo run on this machine and prints the comparison table."""
    console = Console()
    console.width = max(console.width, 110)  # the table needs ~100 columns; pipes default to 80
    console.print("polytrain demo: training on 4,000 real MNIST digits, testing on the 1,000 held out.")
    baseline_exp, parallel = demo_experiments(epochs, out)
    baseline = train(baseline_exp, reporter=console_reporter(sys.stdout))
    console.print(f"{PARALLEL_WORKERS} workers (processes) with synchronous data parallelism, "
                  f"one run per allreduce algorithm: {', '.join(DEMO_ALGORITHMS)}")
    results = {"1 worker": baseline, **dict(zip(parallel, train_sequence(list(parallel.values()), report=True)))}
    console.print(results_table(results, baseline))
    console.print(f"Rates exclude the first epoch and process start-up; time to target includes evaluation. "
                  f"bytes sent/step is rank 0's ('~': estimated for the backend's own allreduce). "
                  f"This machine has {os.cpu_count()} cores: {PARALLEL_WORKERS} workers share them.")
    return results
