"""Parameter server (1, 2 and 4 sharded servers) against ring allreduce on the emulated cluster, one rank per
host, 4 workers, every link limited with `tc tbf` (FireCaffe's comparison, section 3.3 of Iandola's thesis,
now with sharded servers).

Each run trains an MLP of three hidden layers of 512 (0.93 M parameters, 3.7 MB of float32 gradient; its
shards are whole tensors, so 4 servers hold 43 %, 28 %, 28 % and 1 % of it) on mnist5k, global batch 400
(10 steps an epoch), 2 epochs, plain SGD; its rate is the Result's samples/s of epoch 2 (rank 0's training
time). Bandwidth-only predictions of a step's communication (alpha = 0, beta = 1 / rate): ring allreduce
2 (p-1)/p n beta on every link; a synchronous server first takes every push, then sends every pull, so
the server with the largest shard s receives p s and then sends p s on its link while each worker sends n
and then receives n on its own: 2 max(p s, n) beta.

    bash benchmarks/bench_ps_cluster.sh OUTDIR      # every (bandwidth, servers) in its own cluster start
    python benchmarks/bench_ps_cluster.py summarize OUTDIR

`run` (on every host of `polytrain cluster`): `--servers 0` is allreduce on all hosts, k > 0 is `ps`
with k of the hosts as servers; `--repeats` runs with seeds 0.., rank 0 appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.launch import init_from_torchrun
from polytrain.train.defaults import resolve
from polytrain.train.loop import Trainer
from polytrain.train.progress import SilentReporter

HIDDEN = [512, 512, 512]
RATES = {"100mbit": 100e6, "1gbit": 1e9}


def experiment(workers: int, servers: int, seed: int) -> Experiment:
    strategy = ("ps", {"servers": servers}) if servers else ("allreduce", {"algorithm": "ring"})
    return Experiment(model="mlp", model_args={"hidden": HIDDEN}, dataset="mnist5k", workers=workers, epochs=2,
                      batch_size=400, optimizer="sgd", lr=0.05, schedule="constant", augment_shift=0, threads=1,
                      seed=seed, strategy=strategy[0], strategy_args=strategy[1], timeout_s=600)


def main_run(args: argparse.Namespace) -> None:
    comm = init_from_torchrun(600.0, backend="gloo")
    workers = comm.world_size - args.servers
    for seed in range(args.repeats):
        trainer = Trainer(resolve(experiment(workers, args.servers, seed)), SilentReporter(), None, comm)
        result = trainer.run()
        if comm.rank == 0:
            record = {"bandwidth": args.bandwidth, "servers": args.servers, "workers": workers, "seed": seed,
                      "samples_per_s": result.epochs[-1]["samples_per_s"],
                      "step_s": result.epochs[-1]["train_s"] / result.epochs[-1]["steps"],
                      "accuracy": result.final_test_accuracy, "shard_bytes": result.comm.get("shard_bytes"),
                      "bytes_sent_per_step": result.comm["bytes_sent_per_step"]}
            with open(args.out, "a") as file:
                file.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def gradient_bytes() -> int:
    from polytrain.models import build_model
    return sum(4 * p.numel() for p in build_model("mlp", 10, (1, 28, 28), hidden=HIDDEN).parameters())


def main_summarize(args: argparse.Namespace) -> None:
    records = [json.loads(line) for path in sorted(Path(args.folder).glob("*.jsonl")) for line in open(path)]
    print("| link | policy | step s, measured (median, 95 % CI) | communication s, predicted | samples/s | "
          "vs ring allreduce | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for bandwidth in RATES:
        chosen = [r for r in records if r["bandwidth"] == bandwidth]
        ring = [r["samples_per_s"] for r in chosen if r["servers"] == 0]
        for servers in sorted({r["servers"] for r in chosen}):
            runs = [r for r in chosen if r["servers"] == servers]
            step = median_ci([r["step_s"] for r in runs])
            n, p, beta = gradient_bytes(), runs[0]["workers"], 8 / RATES[bandwidth]
            predicted = 2 * max(p * max(runs[0]["shard_bytes"]), n) * beta if servers else 2 * (p - 1) / p * n * beta
            rate = statistics.median(r["samples_per_s"] for r in runs)
            name = f"ps, {servers} server{'s' * (servers > 1)}" if servers else "ring allreduce"
            print(f"| {bandwidth} | {name} | {step.median:.3f} [{step.low:.3f}, {step.high:.3f}] | {predicted:.3f} | "
                  f"{rate:.0f} | {rate / statistics.median(ring):.2f} | "
                  f"{statistics.median(r['accuracy'] for r in runs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="(on every host of polytrain cluster) the runs of one host count")
    run.add_argument("--servers", type=int, required=True)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--bandwidth", required=True, choices=list(RATES))
    run.add_argument("--out", required=True, help="JSON lines file to append to")
    summarize = commands.add_parser("summarize", help="the table of a folder of JSON lines files")
    summarize.add_argument("folder")
    args = parser.parse_args()
    {"run": main_run, "summarize": main_summarize}[args.command](args)


if __name__ == "__main__":
    main()
