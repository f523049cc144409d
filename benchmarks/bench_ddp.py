"""Peer comparison: polytrain's `allreduce` strategy (algorithm=native) against torch DistributedDataParallel.

Both train the same model on the same data (mnist5k, default settings: momentum SGD, cosine schedule,
augmentation) with the same global batch, worker count, backend (gloo) and torch threads, on the same
spawned ranks: each spawn runs R repetitions of (polytrain run, DDP run), the order alternating
(polytrain first in even repetitions, DDP first in odd ones), so a busy phase of the shared machine hits all alike. A run builds a fresh model from the same seed and trains 1 warm-up epoch (reported, not
rated) and E rated epochs; its rate is the training samples of the rated epochs over rank 0's time in
training steps (data loading, forward, backward, communication and optimizer step; evaluation excluded),
measured in the same place in both loops. Ratios are taken per repetition (polytrain / DDP of the two
adjacent runs) and summarised by their median and 95 % nonparametric CI.

The DDP loop is the minimal faithful equivalent of polytrain's Trainer step: the same ShardedBatchSampler
shards, the same per-sample augmentation, the same optimizer and schedule, and mean loss over the local
batch (DDP averages gradients over ranks; with equal shards that is the global-batch mean polytrain
forms by dividing the summed loss by the global batch). Both loops read the loss and count correct
predictions each step (polytrain's metrics). DDP runs with its defaults (25 MiB buckets, 1 MiB first
bucket); polytrain with its own (25 MiB buckets).

Usage:

    python benchmarks/bench_ddp.py [--models lenet5 mlp] [--workers 2 4] [--repeats 5] [--epochs 2]
                                   [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from polytrain.bench.stats import median_ci
from polytrain.comm import Communicator
from polytrain.config import Experiment
from polytrain.data import load_dataset
from polytrain.data.augment import augment_images, draw_augmentation
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.launch import run_workers
from polytrain.models import build_model
from polytrain.train.defaults import resolve
from polytrain.train.environment import environment
from polytrain.train.loop import Trainer, evaluate
from polytrain.train.optim import build_optimizer, build_schedule
from polytrain.train.progress import SilentReporter

# A few million parameters, so that communication matters: 784-2048-1024-10 has 3.7 M (14.9 MB of gradient).
MODEL_ARGS = {"lenet5": {}, "mlp": {"hidden": [2048, 1024]}}


def experiment(model: str, workers: int, epochs: int) -> Experiment:
    """The resolved run both systems train: mnist5k defaults, 1 warm-up epoch + `epochs` rated ones."""
    return resolve(Experiment(model=model, model_args=MODEL_ARGS[model], dataset="mnist5k", workers=workers,
                              epochs=1 + epochs, strategy="allreduce", strategy_args={"algorithm": "native"}))


def polytrain_run(comm: Communicator, exp: Experiment) -> dict:
    """One polytrain run on this rank: per-epoch training seconds, final test accuracy and weights."""
    trainer = Trainer(exp, SilentReporter(), None, comm)
    result = trainer.run()
    return {"epoch_train_s": [row["train_s"] for row in result.epochs], "num_train": trainer.data.num_train,
            "test_accuracy": result.final_test_accuracy, "state": trainer.model.state_dict()}


def ddp_run(comm: Communicator, exp: Experiment) -> dict:
    """The same run with DistributedDataParallel, in the loop a DDP user writes, timed like polytrain's."""
    torch.set_num_threads(exp.threads)
    torch.set_flush_denormal(True)  # as polytrain's Trainer
    data = load_dataset(exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction, **exp.dataset_args)
    torch.manual_seed(exp.seed)
    model = DistributedDataParallel(build_model(exp.model, data.num_classes, data.in_shape, **exp.model_args))
    optimizer = build_optimizer(exp.optimizer, model.parameters(), lr=exp.lr, weight_decay=exp.weight_decay,
                                args=exp.optimizer_args)
    schedule = build_schedule(exp.schedule, exp.schedule_args, lr=exp.lr, epochs=exp.epochs,
                              batch_size=exp.batch_size, warmup_epochs=exp.warmup_epochs,
                              lr_reference_batch=exp.lr_reference_batch)
    epoch_train_s = []
    for epoch in range(exp.epochs):
        sampler = ShardedBatchSampler(len(data.y_train), schedule.batch_size_at(epoch), world_size=comm.world_size,
                                      rank=comm.rank, seed=exp.seed)
        steps = sampler.steps_per_epoch()
        shifts = draw_augmentation(len(data.y_train), exp.augment_shift, exp.augment_flip, exp.seed, epoch)
        train_s = 0.0
        for step, indices in enumerate(sampler.epoch(epoch)):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(epoch, step, steps)
            optimizer.zero_grad(set_to_none=True)
            x, y = augment_images(data.x_train[indices], shifts[indices], exp.augment_shift), data.y_train[indices]
            logits = model(x)
            loss = F.cross_entropy(logits, y)  # local mean; DDP averages over the ranks' equal shards
            loss.backward()
            optimizer.step()
            loss.item(), int((logits.argmax(dim=1) == y).sum())  # the metrics polytrain's step reads
            train_s += time.perf_counter() - started
        epoch_train_s.append(train_s)
    x_test = data.x_test.tensor_split(comm.world_size)[comm.rank]
    y_test = data.y_test.tensor_split(comm.world_size)[comm.rank]
    correct = torch.tensor([float(evaluate(model.module, x_test, y_test)[1])])
    dist.all_reduce(correct)
    return {"epoch_train_s": epoch_train_s, "num_train": len(data.y_train),
            "test_accuracy": correct.item() / len(data.y_test), "state": model.module.state_dict()}


RUNNERS = {"polytrain": polytrain_run, "ddp": ddp_run}


def compare_rank(comm: Communicator, exp: Experiment, repeats: int, systems: list[str]) -> dict | None:
    """Runs the interleaved repetitions on this rank; rank 0 returns every run's numbers.

    Two systems alternate (AB, BA, ...); more rotate (ABC, BCA, CAB, ...).
    """
    # DDP warns once that LeNet's first convolution (1 input channel) has gradient strides that differ from
    # its bucket view's; they differ only on a dimension of size 1 (the same memory layout).
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for repeat in range(repeats):
        order = (systems if repeat % 2 == 0 else systems[::-1]) if len(systems) == 2 else (
            systems[repeat % len(systems):] + systems[:repeat % len(systems)])
        for name in order:
            comm.barrier()
            runs[name].append(RUNNERS[name](comm, exp))
    if comm.rank != 0:
        return None
    first_poly, first_ddp = runs["polytrain"][0]["state"], runs["ddp"][0]["state"]
    difference = max((first_poly[key] - first_ddp[key]).abs().max().item() for key in first_poly)
    for name in runs:
        for run in runs[name]:
            del run["state"]
    return {"runs": runs, "max_weight_difference": difference}


def rate(run: dict) -> float:
    """Training samples per second over the rated epochs (all but the first)."""
    return run["num_train"] * (len(run["epoch_train_s"]) - 1) / sum(run["epoch_train_s"][1:])


def summarize(outcome: dict) -> dict:
    """Medians [CI] of each system's rate, and of each polytrain system's per-repetition ratio to DDP."""
    runs = outcome["runs"]
    rates = {name: [rate(run) for run in runs[name]] for name in runs}
    warmup = {name: [run["num_train"] / run["epoch_train_s"][0] for run in runs[name]] for name in runs}
    ratios = {name: [ours / ddp for ours, ddp in zip(rates[name], rates["ddp"])] for name in runs if name != "ddp"}
    return {"samples_per_s": {name: median_ci(values)._asdict() for name, values in rates.items()},
            "warmup_samples_per_s": {name: median_ci(values)._asdict() for name, values in warmup.items()},
            "ratio_to_ddp": {name: median_ci(values)._asdict() for name, values in ratios.items()},
            "rates": rates, "ratios": ratios,
            "test_accuracy": {name: [run["test_accuracy"] for run in runs[name]] for name in runs},
            "max_weight_difference": outcome["max_weight_difference"]}


def _ci(stats: dict, digits: str = ".0f") -> str:
    return f"{stats['median']:{digits}} [{stats['low']:{digits}}, {stats['high']:{digits}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "mlp"], choices=sorted(MODEL_ARGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="rated epochs per run, after 1 warm-up epoch")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    systems = ["polytrain", "ddp"]
    ours = [name for name in systems if name != "ddp"]
    env = environment(seed=0)
    print(f"{env['cpu']}, {env['cores']} cores; torch {env['torch']}; gloo; {args.repeats} interleaved repetitions, "
          f"1 warm-up + {args.epochs} rated epochs per run; samples/s and ratios: median [95 % CI]\n")
    print("| model | workers | global batch | " + " | ".join(f"{name} samples/s | {name} / DDP" for name in ours)
          + " | DDP samples/s | warm-up epoch samples/s (" + " / ".join(systems) + ") | test acc. ("
          + " / ".join(systems) + ") | max weight diff. polytrain vs DDP | load |")
    print("|---|---:|---:|" + "---:|---:|" * len(ours) + "---:|---:|---:|---:|---|")
    report = {"environment": env, "repeats": args.repeats, "rated_epochs": args.epochs, "results": []}
    for model in args.models:
        for workers in args.workers:
            exp = experiment(model, workers, args.epochs)
            load = os.getloadavg()[0]
            outcome = run_workers(compare_rank, workers, (exp, args.repeats, systems), threads=exp.threads,
                                  backend="gloo", timeout_s=exp.timeout_s)[0]
            summary = summarize(outcome)
            loads = f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
            accuracy = {name: sum(values) / len(values) for name, values in summary["test_accuracy"].items()}
            cells = [f"{_ci(summary['samples_per_s'][name])} | **{_ci(summary['ratio_to_ddp'][name], '.3f')}**"
                     for name in ours]
            print(f"| {model} | {workers} ({exp.threads} thread each) | {exp.batch_size} | " + " | ".join(cells)
                  + f" | {_ci(summary['samples_per_s']['ddp'])} | "
                  + " / ".join(f"{summary['warmup_samples_per_s'][name]['median']:.0f}" for name in systems)
                  + " | " + " / ".join(f"{100 * accuracy[name]:.2f}%" for name in systems)
                  + f" | {summary['max_weight_difference']:.1e} | {loads} |", flush=True)
            report["results"].append({"model": model, "workers": workers, "config": exp.to_dict(),
                                      "load_average": loads, **summary})
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
