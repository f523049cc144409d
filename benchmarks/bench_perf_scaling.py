"""Predicted scaling to 8,192 ranks, and how long the simulator takes for one step of 8,192 (issue 14, part 4).

Weak scaling of ResNet-50 on ImageNet-shaped samples (3x224x224, 1000 classes; 32 per rank, momentum SGD)
on the `dgx-a100` profile (8 A100 per node on NVLink, 200 Gbit/s InfiniBand between nodes; polytrain
predict --cluster list): speedup = ranks x the 1-rank step / the R-rank step, for ring, tree and
Rabenseifner allreduce, allreduce with PowerSGD (rank 2), local SGD (H = 16) and a synchronous parameter
server with one server per 8 workers. Then the simulator's own time for one step of 8,192 ranks: all
ranks alike (one group, analytic), and every rank played (lognormal compute noise sigma 0.05, a
straggler, asynchronous servers), median of 5 timings, after a first (cold) call that traces the model.

    python benchmarks/bench_perf_scaling.py --plot docs/perf_scaling.png --markdown OUT.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from polytrain.config import Experiment
from polytrain.perf.cluster import parse_cluster
from polytrain.perf.predict import predict
from polytrain.perf.simulate import simulate

RANKS = [2**k for k in range(0, 14)]  # 1 .. 8192
PER_RANK = 32
DATA = {"shape": "3,224,224", "num_classes": 1000, "num_samples": 16}
STRATEGIES = {
    "allreduce ring": dict(strategy="allreduce", strategy_args={"algorithm": "ring"}),
    "allreduce tree": dict(strategy="allreduce", strategy_args={"algorithm": "tree"}),
    "allreduce rabenseifner": dict(strategy="allreduce", strategy_args={"algorithm": "rabenseifner"}),
    "allreduce + powersgd": dict(strategy="allreduce", strategy_args={"algorithm": "ring"}, compressor="powersgd"),
    "local SGD H=16": dict(strategy="local_sgd", strategy_args={"period": 16, "algorithm": "ring"}),
    "ps sync, 1 server per 8": dict(strategy="ps"),
}


def experiment(ranks: int, settings: dict) -> Experiment:
    settings = dict(settings)
    workers = ranks
    if settings.get("strategy") == "ps":
        servers = max(1, ranks // 8)
        settings["strategy_args"] = {"servers": servers, "mode": "sync"}
    if ranks == 1:
        settings = {"strategy": "local"}
    return Experiment(model="resnet50", dataset="synthetic", dataset_args=DATA, workers=workers,
                      batch_size=PER_RANK * workers, optimizer="momentum", **settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="dgx-a100")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    base = parse_cluster(args.cluster)
    cold = time.perf_counter()
    one = predict(experiment(1, {}), base.with_ranks(1)).step_s
    cold = time.perf_counter() - cold
    curves: dict[str, list[float]] = {}
    lines = ["| strategy | " + " | ".join(str(r) for r in RANKS[1::2]) + " |", "|---" * (len(RANKS[1::2]) + 1) + "|"]
    for name, settings in STRATEGIES.items():
        speedups = []
        for ranks in RANKS:
            exp = experiment(ranks, settings)
            servers = exp.strategy_args.get("servers", 0) if exp.strategy == "ps" else 0
            step = predict(exp, base.with_ranks(ranks + servers)).step_s
            speedups.append(ranks * one / step)
        curves[name] = speedups
        lines.append(f"| {name} | " + " | ".join(f"{s:.0f}" if s >= 10 else f"{s:.2f}" for s in speedups[1::2]) + " |")
    exp = experiment(8192, STRATEGIES["allreduce ring"])
    cluster = base.with_ranks(8192)
    timings = {}
    cases = {"all ranks alike (grouped)": lambda: simulate(exp, cluster),
             "noise sigma 0.05 on every rank": lambda: simulate(exp, cluster, noise=0.05, steps=10),
             "one straggler x3": lambda: simulate(dataclasses.replace(exp, straggler={"rank": 5, "slowdown": 3.0}),
                                                  cluster, steps=10),
             "async ps, 1024 servers, noise 0.05": lambda: simulate(
                 dataclasses.replace(exp, strategy="ps", strategy_args={"servers": 1024, "mode": "async"}),
                 base.with_ranks(8192 + 1024), noise=0.05, steps=10)}
    for label, run in cases.items():
        run()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            samples.append(time.perf_counter() - started)
        timings[label] = statistics.median(samples)
    lines += ["", f"Simulator time for one step of 8,192 ranks (median of 5; the first call, which traces "
                  f"ResNet-50 through the cost model, took {cold:.2f} s):", "",
              "| case | seconds |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in timings.items()]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 5))
        axis.loglog(RANKS, RANKS, "k--", label="ideal")
        for name, speedups in curves.items():
            axis.loglog(RANKS, speedups, marker="o", markersize=3, label=name)
        axis.set_xlabel("ranks")
        axis.set_ylabel("speedup over one rank (weak scaling, 32 samples per rank)")
        axis.set_title(f"ResNet-50 on {args.cluster}, predicted by polytrain.perf")
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
