"""Hogwild! on one host: polytrain's `--strategy hogwild` against the approach of pytorch/examples'
mnist_hogwild, samples/s at 1 and 2 processes and test accuracy, LeNet-5 on mnist5k.

mnist_hogwild's approach (read from pytorch/examples, written here for the same data): `model.share_memory()`
in the parent, `torch.multiprocessing` processes started with spawn, each with its own `SGD(lr=0.01,
momentum=0.5)` stepping the shared model on its own batches of 64. Here each process takes a contiguous
1/p of every epoch's permutation, so that both sides see every sample once per epoch (the original
iterates the whole dataset in every process), and batches are slices of the in-memory tensors, as
polytrain's in-memory path reads them.

polytrain: `Experiment(model="lenet5", dataset="mnist5k", workers=p, strategy="hogwild")` (p = 1:
`local`) with momentum 0.5, `threads=1`, 64 samples per process and step: global batch 64 p and lr 0.01 p,
so each process's update is mnist_hogwild's (hogwild keeps each rank's gradient as its share of the global
batch's mean). Both sides: E epochs, rate = samples of epochs 2..E over the training time of those epochs
(polytrain: rank 0's, which waits at each epoch's end for the others; mnist_hogwild pattern: the slowest
process's), test accuracy of the final shared model. Every torch uses 1 thread per process; a `local` run
with 2 threads is shown beside, the other way to use the 2 cores.

Repetitions interleave the variants; each variant's ratio to the 1-process run of the same side and
repetition is summarised by its median and 95 % nonparametric CI.

Usage:

    python benchmarks/bench_hogwild.py [--repeats 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.data import load_dataset
from polytrain.models import build_model
from polytrain.train import train

BATCH, LR, MOMENTUM = 64, 0.01, 0.5


def peer_process(rank: int, processes: int, epochs: int, seed: int, model, x, y, times) -> None:
    """One mnist_hogwild-style process: its own optimizer on the shared model, its share of each epoch."""
    torch.set_num_threads(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        share = order.tensor_split(processes)[rank]
        started = time.perf_counter()
        model.train()
        for first in range(0, len(share), BATCH):
            batch = share[first:first + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        times[rank * epochs + epoch] = time.perf_counter() - started


def run_peer(processes: int, epochs: int, seed: int) -> dict:
    data = load_dataset("mnist5k", seed=0)
    torch.manual_seed(seed)
    model = build_model("lenet5", 10, tuple(data.x_train.shape[1:]))
    model.share_memory()
    times = torch.zeros(processes * epochs).share_memory_()
    context = mp.get_context("spawn")
    workers = [context.Process(target=peer_process, args=(rank, processes, epochs, seed, model, data.x_train,
                                                           data.y_train, times)) for rank in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    per_process = times.view(processes, epochs)[:, 1:].sum(dim=1)  # epochs 2..E
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return {"samples_per_s": len(data.x_train) * (epochs - 1) / per_process.max().item(), "accuracy": accuracy}


def run_polytrain(processes: int, epochs: int, seed: int, threads: int = 1) -> dict:
    exp = Experiment(model="lenet5", dataset="mnist5k", workers=processes, epochs=epochs, batch_size=BATCH * processes,
                     optimizer="momentum", lr=LR * processes, optimizer_args={"momentum": MOMENTUM},
                     weight_decay=0.0, schedule="constant", augment_shift=0, threads=threads, seed=seed,
                     strategy="hogwild" if processes > 1 else "local")
    result = train(exp)
    return {"samples_per_s": result.samples_per_s, "accuracy": result.final_test_accuracy}


VARIANTS = {
    "polytrain local, 1 process": lambda epochs, seed: run_polytrain(1, epochs, seed),
    "polytrain hogwild, 2 processes": lambda epochs, seed: run_polytrain(2, epochs, seed),
    "polytrain local, 1 process x 2 threads": lambda epochs, seed: run_polytrain(1, epochs, seed, threads=2),
    "mnist_hogwild pattern, 1 process": lambda epochs, seed: run_peer(1, epochs, seed),
    "mnist_hogwild pattern, 2 processes": lambda epochs, seed: run_peer(2, epochs, seed),
}
BASELINE = {"polytrain": "polytrain local, 1 process", "mnist_hogwild": "mnist_hogwild pattern, 1 process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    options = parser.parse_args()
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(options.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # the order rotates
            rows[name].append(VARIANTS[name](options.epochs, repeat))
    print("| variant | samples/s (median) | vs 1 process of its side (median, 95 % CI) | test accuracy (median) | "
          "accuracy - 1 process (points) |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        baseline = rows[BASELINE["polytrain" if name.startswith("polytrain") else "mnist_hogwild"]]
        ratio = median_ci([run["samples_per_s"] / base["samples_per_s"] for run, base in zip(runs, baseline)])
        accuracy = statistics.median(run["accuracy"] for run in runs)
        points = 100 * (accuracy - statistics.median(run["accuracy"] for run in baseline))
        print(f"| {name} | {statistics.median(run['samples_per_s'] for run in runs):.0f} | {ratio.median:.2f} "
              f"[{ratio.low:.2f}, {ratio.high:.2f}] | {accuracy:.3f} | {points:+.1f} |")


if __name__ == "__main__":
    main()
