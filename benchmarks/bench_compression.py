"""Gradient compression at 4 workers: accuracy and bytes over seeds, and compress/decompress overhead.

Three measurements share the compressor list `COMPRESSORS` and the models `MODELS` below:

- `accuracy`: every compressor on every model, trained by 4 local worker processes (gloo over loopback,
  no emulated network) for each seed; one JSON line per run with the test accuracy after every epoch and
  the bytes each rank sent per optimizer step (counted by the communicator). All runs share one spawned
  set of workers (spawning costs seconds); the compressors' order rotates with the seed. A run that
  diverges is recorded as such and the others go on.
- `overhead`: single process, 1 torch thread: compress + decompress of a real gradient of each model
  (one rank's share, 32 samples, of the global batch of 128 at initialization), parameter by parameter as
  the strategy does (each parameter its own compressor state, carried from call to call; PowerSGD's
  second round included in compress). Every repetition times all compressors in an order rotated each
  repetition; medians with 95 % nonparametric CIs (polytrain.bench.stats.median_ci), in ms and in ms per
  MB (10^6 bytes) of float32 gradient. DGC is timed without its warm-up (at its final density).
- `cluster-run` (used by benchmarks/bench_compression_cluster.sh): run on every host of `polytrain cluster`,
  trains every (model, compressor) in turn on the ranks torchrun's environment describes, each as
  `polytrain train` would, and writes each run's result.json, so one cluster start serves all runs.

The spec `none` means no compressor at all (the strategy's plain bucketed float32 allreduce, the fastest
uncompressed path), not `--compressor none` (the same bytes through the compressor machinery).

Usage:

    python benchmarks/bench_compression.py accuracy [--models lenet5 mlp] [--seeds 0 1 2]
        [--epochs lenet5=6 mlp=3] [--compressors SPEC ...] --out accuracy.jsonl
    python benchmarks/bench_compression.py overhead [--models lenet5 mlp] [--repeats 11] [--warmup 2]
        [--compressors SPEC ...] --out overhead.jsonl
    python benchmarks/bench_compression.py list      # the compressor specs, one a line
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from polytrain.bench.stats import median_ci
from polytrain.comm import Communicator
from polytrain.compress import build_compressor
from polytrain.config import Experiment, parse_named
from polytrain.data import load_dataset
from polytrain.launch import init_from_torchrun, run_workers
from polytrain.models import build_model
from polytrain.train.defaults import resolve
from polytrain.train.environment import environment
from polytrain.train.io import atomic_write_json
from polytrain.train.loop import Trainer, TrainingDiverged
from polytrain.train.progress import SilentReporter
from polytrain.train.result import Result

WORKERS = 4
DATASET = "mnist5k"  # 4,000 training and 1,000 test images; global batch 128 -> 32 steps per epoch
GLOBAL_BATCH = 128  # the mnist5k default; each of the 4 workers computes 32 samples

# The two models of the issue: LeNet-5 (61,706 parameters, 0.25 MB of float32 gradient, mostly in its
# 400x120 fully connected layer) and a fully connected 784-1024-1024-10 MLP (1,863,690 parameters,
# 7.45 MB), large enough that communication matters on the emulated 100 Mbit/s and 1 Gbit/s links.
MODELS: dict[str, dict] = {"lenet5": {}, "mlp": {"hidden": [1024, 1024]}}
# Fewer than mnist5k's default 20 epochs, so that 3 seeds x 15 compressors x 2 models take ~20 minutes
# here: one epoch of each of the 15 compressors took 22-27 s in all for LeNet-5 and 77-111 s for the MLP
# (4 workers on 2 shared cores, load average 3 to 12).
DEFAULT_EPOCHS = {"lenet5": 6, "mlp": 3}

# Every registered compressor, with the setting measured and why. The goal rows of the issue are top-k 1 %
# with error feedback and PowerSGD; the sparsifiers all send ~1 % so that they can be compared.
COMPRESSORS: tuple[tuple[str, str], ...] = (
    ("none", "fp32 baseline: no compressor, the bucketed float32 allreduce"),
    ("fp16", "fp16 baseline (Horovod's Compression.fp16): 2x fewer bytes, summed in fp16"),
    ("bf16", "float32's exponent range with an 8-bit mantissa: 2x, no overflow"),
    ("kbit:bits=4", "stochastic uniform 4-bit codes between min and max: 8x, unbiased"),
    ("qsgd:levels=7,bucket=512", "QSGD with the paper's buckets of 512: sign + 3 level bits = 4 bits, like kbit"),
    ("terngrad:clip=2.5", "TernGrad with the paper's clipping at 2.5 standard deviations: ~1.6 bits"),
    ("onebit", "1-bit SGD: its error feedback is built in"),
    ("signsgd", "signSGD with majority vote, scaled by the mean absolute gradient so the momentum-SGD lr carries over"),
    ("efsignsgd", "EF-signSGD: scaled sign with built-in error feedback"),
    ("topk:ratio=0.01,ef=true", "goal row: top-k 1 % with error feedback"),
    ("topk+fp16:ratio=0.01,ef=true", "top-k 1 % with its values sent in fp16 (indices unchanged)"),
    ("randomk:ratio=0.01,ef=true", "random-k 1 % with error feedback: indices from a shared seed, values only"),
    ("threshold:tau=0.005,ef=true", "Strom's threshold; tau from 2-epoch trials (1e-3, 3e-3, 1e-2) so that "
                                    "~1 % of the elements pass on both models early in training"),
    ("dgc:ratio=0.01,warmup_steps=32", "DGC at 1 % (the paper uses 0.1 %), its sparsity warm-up over one "
                                       "epoch (32 steps) as the runs here are short"),
    ("powersgd:rank=2", "goal row: PowerSGD at the paper's rank 2 for image models, error feedback and warm start"),
)


def specs(chosen: list[str] | None = None) -> list[str]:
    """The compressor specs to measure: `chosen` (each checked) or all of COMPRESSORS."""
    if not chosen:
        return [spec for spec, _ in COMPRESSORS]
    for spec in chosen:
        if spec != "none":
            name, args = parse_named(spec, "--compressors")
            build_compressor(name, args)  # a bad spec fails here, before any worker starts
    return chosen


def slug(spec: str) -> str:
    """A directory name for a compressor spec: 'topk:ratio=0.01,ef=true' -> 'topk_ratio=0.01_ef=true'."""
    return re.sub(r"[^A-Za-z0-9.=+-]", "_", spec)


def per_model(values: list[str], cast, what: str) -> dict:
    """Parses ['lenet5=8', 'mlp=5'] into {'lenet5': 8, 'mlp': 5}."""
    parsed = {}
    for item in values:
        model, sep, text = item.partition("=")
        if not sep or model not in MODELS:
            raise SystemExit(f"{what} {item!r}: expected MODEL=VALUE with MODEL one of {', '.join(MODELS)}")
        parsed[model] = cast(text)
    return parsed


def experiment(model: str, spec: str, seed: int, epochs: int, **settings) -> Experiment:
    """The run of `spec` on `model` at 4 workers with mnist5k's defaults (momentum, cosine, shifts)."""
    compressor, args = (None, {}) if spec == "none" else parse_named(spec, "--compressors")
    return Experiment(model=model, model_args=MODELS[model], dataset=DATASET, workers=WORKERS, epochs=epochs,
                      seed=seed, compressor=compressor, compressor_args=args, **settings)


def train_to_target(trainer: Trainer) -> Result:
    """Trainer.run's loop, ending after the first evaluation at or above the target accuracy.

    The schedule stays that of all epochs, so up to there the run is the full run.
    """
    trainer.started = time.perf_counter()
    trainer.model.train()
    try:
        while trainer.position.epoch < trainer.exp.epochs:
            trainer.train_epoch()
            if trainer.position.history[-1]["test_accuracy"] >= trainer.exp.target:
                break  # the accuracy is summed over the ranks: every rank stops after the same epoch
        return trainer.finish()
    finally:
        trainer.policy.close()


def run_once(comm: Communicator, exp: Experiment,
             stop_at_target: bool = False) -> tuple[Result | None, str | None, int]:
    """Trains `exp` on this rank: (Result or None, the divergence message or None, parameter count)."""
    trainer = Trainer(resolve(exp), SilentReporter(), None, comm)
    num_parameters = sum(p.numel() for p in trainer.model.parameters())
    try:
        return (train_to_target(trainer) if stop_at_target else trainer.run()), None, num_parameters
    except TrainingDiverged as error:
        return None, str(error), num_parameters


def run_record(model: str, spec: str, seed: int, epochs: int, result: Result | None, diverged: str | None,
               num_parameters: int) -> dict:
    """One JSON line: accuracy per epoch and the bytes sent per step, rank 0's and the mean over ranks."""
    record = {"model": model, "compressor": spec, "seed": seed, "epochs": epochs, "workers": WORKERS,
              "num_parameters": num_parameters, "fp32_gradient_bytes": 4 * num_parameters, "diverged": diverged,
              "load_average": os.getloadavg()[0]}
    if result is None:
        return record
    per_rank = [entry["bytes_sent"] / max(1, result.steps) for entry in result.comm["per_rank"]]
    record.update(
        final_test_accuracy=result.final_test_accuracy, best_test_accuracy=result.best_test_accuracy,
        test_accuracy=[row["test_accuracy"] for row in result.epochs],
        epoch_train_s=[row["train_s"] for row in result.epochs], wall_s=result.wall_s,
        target_accuracy=result.target, time_to_target_s=result.time_to_target_s,
        samples_per_s=result.samples_per_s, steps=result.steps,
        bytes_sent_per_step=result.comm["bytes_sent_per_step"],
        bytes_sent_per_step_mean=sum(per_rank) / len(per_rank), bytes_estimated=result.comm["estimated"],
        algorithm=result.comm.get("algorithm"), config=result.config)
    return record


def append_line(path: str, record: dict) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


# -- accuracy ---------------------------------------------------------------------------------------------


def accuracy_rank(comm: Communicator, runs: list[tuple[str, str, int, int]], out: str) -> None:
    """Trains every (model, spec, seed, epochs) in turn; rank 0 appends one line per run to `out`."""
    for number, (model, spec, seed, epochs) in enumerate(runs, 1):
        started = time.perf_counter()
        result, diverged, num_parameters = run_once(comm, experiment(model, spec, seed, epochs))
        if comm.rank == 0:
            record = run_record(model, spec, seed, epochs, result, diverged, num_parameters)
            append_line(out, {"kind": "accuracy", **record})
            accuracy = f"{100 * result.final_test_accuracy:.2f} %" if result is not None else "diverged"
            print(f"[{number}/{len(runs)}] {model} {spec} seed {seed}: {accuracy}, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)


def accuracy_runs(models: list[str], chosen: list[str], seeds: list[int], epochs: dict) -> list[tuple]:
    """Seeds outermost; within a seed, models in turn and the compressors rotated by the seed's position."""
    runs = []
    for position, seed in enumerate(seeds):
        shift = position % len(chosen)
        for model in models:
            runs += [(model, spec, seed, epochs[model]) for spec in chosen[shift:] + chosen[:shift]]
    return runs


def main_accuracy(args: argparse.Namespace) -> None:
    chosen = specs(args.compressors)
    epochs = {**DEFAULT_EPOCHS, **per_model(args.epochs, int, "--epochs")}
    runs = accuracy_runs(args.models, chosen, args.seeds, epochs)
    append_line(args.out, {"kind": "session", "measurement": "accuracy", "argv": sys.argv,
                           "environment": environment(seed=0), "workers": WORKERS, "dataset": DATASET,
                           "models": {m: MODELS[m] for m in args.models}, "epochs": epochs, "seeds": args.seeds,
                           "compressors": chosen})
    base = resolve(experiment(args.models[0], "none", 0, 1))
    print(f"{len(runs)} runs at {WORKERS} local workers ({base.threads} torch thread each, {os.cpu_count()} cores); "
          f"lines appended to {args.out}", flush=True)
    run_workers(accuracy_rank, WORKERS, (runs, args.out), threads=base.threads, backend="gloo",
                timeout_s=base.timeout_s)


# -- overhead ---------------------------------------------------------------------------------------------


def model_gradients(model: str) -> list[tuple[str, torch.Tensor]]:
    """(name, gradient) of every parameter: one rank's 32 samples of a global batch of 128, at init."""
    data = load_dataset(DATASET, seed=0)
    torch.manual_seed(0)
    net = build_model(model, data.num_classes, data.in_shape, **MODELS[model])
    local = GLOBAL_BATCH // WORKERS
    loss = F.cross_entropy(net(data.x_train[:local]), data.y_train[:local], reduction="sum") / GLOBAL_BATCH
    loss.backward()
    return [(name, p.grad.detach().clone()) for name, p in net.named_parameters()]


class _Coder:
    """One compressor over a model's parameters: a chosen compressor and its state per parameter."""

    def __init__(self, spec: str, gradients: list[tuple[str, torch.Tensor]]) -> None:
        name, args = ("none", {}) if spec == "none" else parse_named(spec, "--compressors")
        # Steady state: DGC's warm-up sends up to 25 % of the elements during its first steps.
        args = {key: value for key, value in args.items() if key != "warmup_steps"}
        compressor = build_compressor(name, args, rank=0)
        self.members = [compressor.select(n, g) for n, g in gradients]
        self.states = [member.init(g) for member, (_, g) in zip(self.members, gradients)]
        self.payload_bytes = 0

    def timed_pass(self, gradients: list[tuple[str, torch.Tensor]]) -> tuple[float, float]:
        """Compresses every gradient (all rounds), then decompresses: seconds of each half."""
        started = time.perf_counter()
        payloads, nbytes = [], 0
        for i, (member, (_, grad)) in enumerate(zip(self.members, gradients)):
            payload, self.states[i] = member.compress(grad, self.states[i])
            nbytes += payload.nbytes()
            for _ in range(1, member.rounds):  # one process: the "sum" is its own payload
                payload, self.states[i] = member.refine(payload, self.states[i])
                nbytes += payload.nbytes()
            payloads.append(payload)
        middle = time.perf_counter()
        for member, payload in zip(self.members, payloads):
            member.decompress(payload)
        self.payload_bytes = nbytes
        return middle - started, time.perf_counter() - middle


def overhead(model: str, chosen: list[str], repeats: int, warmup: int) -> list[dict]:
    """Compress and decompress times of every spec on `model`'s real gradient, interleaved per repetition."""
    gradients = model_gradients(model)
    num_parameters = sum(g.numel() for _, g in gradients)
    megabytes = 4 * num_parameters / 1e6
    coders = {spec: _Coder(spec, gradients) for spec in chosen}
    times: dict[str, list[tuple[float, float]]] = {spec: [] for spec in chosen}
    for repeat in range(warmup + repeats):
        shift = repeat % len(chosen)
        for spec in chosen[shift:] + chosen[:shift]:
            measured = coders[spec].timed_pass(gradients)
            if repeat >= warmup:
                times[spec].append(measured)
    records = []
    for spec in chosen:
        compress_ms = [1e3 * c for c, _ in times[spec]]
        decompress_ms = [1e3 * d for _, d in times[spec]]
        total_ms = [c + d for c, d in zip(compress_ms, decompress_ms)]
        records.append({
            "kind": "overhead", "model": model, "compressor": spec, "num_parameters": num_parameters,
            "fp32_gradient_bytes": 4 * num_parameters, "payload_bytes": coders[spec].payload_bytes,
            "compress_ms": median_ci(compress_ms)._asdict(), "decompress_ms": median_ci(decompress_ms)._asdict(),
            "total_ms": median_ci(total_ms)._asdict(),
            "ms_per_mb": median_ci([t / megabytes for t in total_ms])._asdict(),
            "samples_total_ms": total_ms, "repeats": repeats, "warmup": warmup})
    return records


def main_overhead(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the trainer
    chosen = specs(args.compressors)
    append_line(args.out, {"kind": "session", "measurement": "overhead", "argv": sys.argv,
                           "environment": environment(seed=0), "threads": 1, "repeats": args.repeats,
                           "warmup": args.warmup, "compressors": chosen})
    for model in args.models:
        load = os.getloadavg()[0]
        for record in overhead(model, chosen, args.repeats, args.warmup):
            record["load_average"] = [load, os.getloadavg()[0]]
            append_line(args.out, record)
            ci = record["ms_per_mb"]
            print(f"{model} {record['compressor']}: {ci['median']:.3g} ms/MB [{ci['low']:.3g}, {ci['high']:.3g}], "
                  f"payload {record['payload_bytes']} B of {record['fp32_gradient_bytes']}", flush=True)


# -- cluster ----------------------------------------------------------------------------------------------


def main_cluster_run(args: argparse.Namespace) -> None:
    """Under torchrun (on every host of `polytrain cluster`): every (model, spec) run in turn.

    Each run is `polytrain train` without --out, stopped at the first evaluation that reaches the target
    (unless --full); rank 0 then writes its result.json to OUT/MODEL/SLUG (or diverged.txt). Not --out
    itself: that checkpoints after every epoch, gathering every rank's compressor state (error-feedback
    residuals: 4 x 7.45 MB for the MLP) over the emulated links inside the timed wall time, which would
    charge the compressors for checkpointing, not for training.
    """
    chosen = specs(args.compressors)
    epochs, targets = per_model(args.epochs, int, "--epochs"), per_model(args.targets, float, "--targets")
    runs = [(model, spec, Path(args.out) / model / slug(spec)) for model in args.models for spec in chosen]
    for _, _, out in runs:
        if (out / "result.json").exists():
            raise SystemExit(f"{out} already holds a result; choose another --out")
    comm = init_from_torchrun(args.timeout, backend="gloo")
    if comm.world_size != WORKERS:
        print(f"note: {comm.world_size} hosts; the benchmark's runs are meant for {WORKERS}", file=sys.stderr)
    for model, spec, out in runs:
        exp = experiment(model, spec, args.seed, epochs[model], target=targets[model],
                         timeout_s=args.timeout).replace(workers=comm.world_size)
        result, diverged, _ = run_once(comm, exp, stop_at_target=not args.full)
        if comm.rank != 0:
            continue
        out.mkdir(parents=True, exist_ok=True)
        if result is None:
            (out / "diverged.txt").write_text(f"{diverged}\n")
            print(f"{model} {spec}: diverged", flush=True)
            continue
        atomic_write_json(out / "result.json", result.to_dict())
        reached = (f"target at {result.time_to_target_s:.1f} s" if result.time_to_target_s is not None
                   else "target not reached")
        print(f"{model} {spec}: {reached}; final {100 * result.final_test_accuracy:.2f} %, "
              f"{result.wall_s:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="accuracy and bytes per step over seeds, 4 local workers")
    accuracy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    accuracy.add_argument("--epochs", nargs="*", default=[], metavar="MODEL=E",
                          help="epochs per model (default lenet5=6 mlp=3)")
    cost = commands.add_parser("overhead", help="compress + decompress ms per MB, one process, 1 thread")
    cost.add_argument("--repeats", type=int, default=11)
    cost.add_argument("--warmup", type=int, default=2)
    cluster = commands.add_parser("cluster-run", help="(on every host of polytrain cluster) every run in turn")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--epochs", nargs="+", required=True, metavar="MODEL=E")
    cluster.add_argument("--targets", nargs="+", required=True, metavar="MODEL=ACCURACY")
    cluster.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait")
    cluster.add_argument("--full", action="store_true", help="train every epoch, also after reaching the target")
    for sub in (accuracy, cost, cluster):
        sub.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
        sub.add_argument("--compressors", nargs="+", default=None, metavar="SPEC")
        sub.add_argument("--out", required=True, help="JSON lines file to append to (cluster-run: a directory)")
    commands.add_parser("list", help="print the compressor specs, one a line")
    args = parser.parse_args()
    if args.command == "list":
        print("\n".join(specs()))
    else:
        {"accuracy": main_accuracy, "overhead": main_overhead, "cluster-run": main_cluster_run}[args.command](args)


if __name__ == "__main__":
    main()
