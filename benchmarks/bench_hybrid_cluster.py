"""Data, model, pipeline and hybrid parallelism on the emulated cluster: 4 ranks, one per host, every link
limited with `tc tbf` to 1 Gbit/s and then 100 Mbit/s each way.

Models: the zoo's AlexNet and VGG-16 at the small input size (digits, 8 x 8: AlexNet 2.85 M parameters,
2.45 M of them in convolutions; VGG-16 15.2 M, 14.7 M in convolutions), global batch 256, 2 epochs
(6 steps each), momentum SGD, `threads=1`. Layouts of the 4 ranks:

- `dp 4`: data parallelism, ring allreduce of every gradient;
- `krizhevsky`: data-parallel convolutions, model-parallel fully connected layers (Krizhevsky 2014);
- `tp 4 linear`: the fully connected layers split over 4 ranks (Megatron pairs), convolutions replicated;
- `tp 4 conv+linear`: convolutions split by filters and input channels too;
- `pp 4 1f1b`: 4 pipeline stages, 8 microbatches of 32;
- `dp 2 x pp 2 1f1b`: 2 replicas of a 2-stage pipeline, 4 microbatches each.

The rate is the Result's samples/s of epoch 2 (rank 0's training time), bytes per step rank 0's training
traffic (result.json `comm.bytes_sent_per_step`). The survey's expectation (section 6.3; Krizhevsky 2014):
data parallelism pays for convolutions (few parameters, much compute), model parallelism for fully
connected layers (many parameters, little compute).

    bash benchmarks/bench_hybrid_cluster.sh OUTDIR     # one `polytrain cluster` start per bandwidth
    python benchmarks/bench_hybrid_cluster.py summarize OUTDIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from polytrain.bench.stats import median_ci
from polytrain.config import ConfigError, Experiment
from polytrain.launch import init_from_torchrun
from polytrain.train.defaults import resolve
from polytrain.train.loop import Trainer
from polytrain.train.progress import SilentReporter

MODELS = ("alexnet", "vgg16")
LAYOUTS = {
    "dp 4": {"mesh": {"dp": 4}, "strategy": "allreduce", "strategy_args": {"algorithm": "ring"}},
    "krizhevsky": {"mesh": {"dp": 4}, "strategy": "krizhevsky"},
    "tp 4 linear": {"mesh": {"tp": 4}},
    "tp 4 conv+linear": {"mesh": {"tp": 4}, "tp_plan": "conv+linear"},
    "pp 4 1f1b": {"mesh": {"pp": 4}, "step_schedule": "1f1b", "microbatches": 8},
    "dp 2 x pp 2 1f1b": {"mesh": {"dp": 2, "pp": 2}, "step_schedule": "1f1b", "microbatches": 4},
}


def experiment(model: str, layout: str, seed: int) -> Experiment:
    return Experiment(model=model, dataset="digits", workers=4, epochs=2, batch_size=256, optimizer="momentum",
                      lr=0.01, schedule="constant", augment_shift=0, threads=1, seed=seed, timeout_s=600,
                      **LAYOUTS[layout])


def main_run(args: argparse.Namespace) -> None:
    comm = init_from_torchrun(600.0, backend="gloo")
    for seed in range(args.repeats):
        for model in MODELS:
            for layout in LAYOUTS:
                try:
                    exp = resolve(experiment(model, layout, seed))
                except ConfigError as error:  # a layout this checkout cannot run (say which, go on)
                    if comm.rank == 0:
                        print(f"skipped {model} {layout}: {error}", flush=True)
                    continue
                result = Trainer(exp, SilentReporter(), None, comm).run()
                if comm.rank == 0:
                    record = {"bandwidth": args.bandwidth, "model": model, "layout": layout, "seed": seed,
                              "samples_per_s": result.epochs[-1]["samples_per_s"],
                              "bytes_sent_per_step": result.comm["bytes_sent_per_step"],
                              "accuracy": result.final_test_accuracy}
                    with open(args.out, "a") as file:
                        file.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)


def main_summarize(args: argparse.Namespace) -> None:
    records = [json.loads(line) for path in sorted(Path(args.folder).glob("*.jsonl")) for line in open(path)]
    print("| link | model | layout | samples/s (median, 95 % CI) | vs dp 4 | MB sent per step (rank 0) | "
          "test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for bandwidth in ("1gbit", "100mbit"):
        for model in MODELS:
            chosen = [r for r in records if r["bandwidth"] == bandwidth and r["model"] == model]
            base = [r["samples_per_s"] for r in chosen if r["layout"] == "dp 4"]
            for layout in LAYOUTS:
                runs = [r for r in chosen if r["layout"] == layout]
                if not runs:
                    continue
                rate = median_ci([r["samples_per_s"] for r in runs])
                ratio = f"{rate.median / statistics.median(base):.2f}" if base else "-"
                print(f"| {bandwidth} | {model} | {layout} | {rate.median:.0f} [{rate.low:.0f}, {rate.high:.0f}] | "
                      f"{ratio} | {statistics.median(r['bytes_sent_per_step'] for r in runs) / 1e6:.2f} | "
                      f"{statistics.median(r['accuracy'] for r in runs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="(on every host of polytrain cluster) every model x layout")
    run.add_argument("--repeats", type=int, default=2)
    run.add_argument("--bandwidth", required=True)
    run.add_argument("--out", required=True, help="JSON lines file to append to")
    summarize = commands.add_parser("summarize", help="the table of a folder of JSON lines files")
    summarize.add_argument("folder")
    args = parser.parse_args()
    {"run": main_run, "summarize": main_summarize}[args.command](args)


if __name__ == "__main__":
    main()
