"""`polytrain demo`: one strategy of each family beside the single worker, through `polytrain compare`, with its
report.

LeNet-5 on 4,000 real MNIST digits (tested on the 1,000 held out), global batch 128: allreduce (the ring and
the central reduction of the parameter-server pattern), a compressor (top-k 1 % with error feedback), local
SGD, an asynchronous parameter server and a pipeline, each on 4 processes, against one worker of the same
code. One seed (a demo, not a claim: the summary says so); `polytrain compare` makes the claims.
"""

from __future__ import annotations

from pathlib import Path

from polytrain.bench.compare import Cell, Matrix, baseline_cell, check_matrix, compare, print_summary

TARGET_ACCURACY = 0.97
DEMO_EPOCHS = 8
DEMO_CELLS = [
    ("4 workers, allreduce ring", {"workers": 4, "strategy": "allreduce", "strategy_args": {"algorithm": "ring"}}),
    ("4 workers, allreduce central (parameter-server pattern)",
     {"workers": 4, "strategy": "allreduce", "strategy_args": {"algorithm": "central"}}),
    ("4 workers, ring + top-k 1 % with error feedback",
     {"workers": 4, "strategy": "allreduce", "strategy_args": {"algorithm": "ring"}, "compressor": "topk",
      "compressor_args": {"ratio": 0.01, "ef": True}}),
    ("4 workers, local SGD averaging every 4 steps",
     {"workers": 4, "strategy": "local_sgd", "strategy_args": {"period": 4}}),
    ("4 workers + 1 server, asynchronous parameter server",
     {"workers": 4, "strategy": "ps", "strategy_args": {"servers": 1, "mode": "async"}}),
    ("dp 2 x pp 2, 1F1B pipeline", {"workers": 4, "mesh": {"dp": 2, "pp": 2}, "step_schedule": "1f1b",
                                     "microbatches": 2}),
]


def demo_matrix(epochs: int | None = None) -> Matrix:
    """The demo's cells: the single-worker baseline and one representative of each family."""
    base = {"model": "lenet5", "dataset": "mnist5k", "epochs": epochs or DEMO_EPOCHS, "target": TARGET_ACCURACY}
    cells = [baseline_cell()] + [Cell(label, settings) for label, settings in DEMO_CELLS]
    matrix = Matrix(base, cells, seeds=[0])
    check_matrix(matrix)
    return matrix


def run_demo(epochs: int | None = None, out: Path | None = None) -> Path:
    """Runs (or resumes) the demo in `out` (default ./polytrain-demo), prints the table, writes the report;
    returns the report's path."""
    from polytrain.bench.report import write_report

    root = Path(out or "polytrain-demo")
    print(f"polytrain demo: LeNet-5 on 4,000 real MNIST digits, tested on the 1,000 held out; one run per family "
          f"against one worker, in {root} (a second call resumes it)")
    summary = compare(demo_matrix(epochs), root)
    print_summary(summary)
    html_path, _ = write_report(root)
    print(f"Rates exclude the first epoch and process start-up; time to target includes evaluation. bytes/step "
          f"is rank 0's; step ms (predicted) shows the performance model's prediction once `polytrain calibrate` "
          f"has run. The report: {html_path}")
    return html_path
