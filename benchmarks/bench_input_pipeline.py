"""Training speed of the default LeNet-5/mnist5k run, before and after a change, and through each input path.

Each run is a fresh `python` process training `Experiment(model="lenet5", dataset="mnist5k", epochs=E,
workers=W)` with everything else at its defaults; its rate is the Result's samples/s (training steps of
epochs 2..E over rank 0's training time: reading the batch, augmentation, forward, backward, communication,
optimizer step; evaluation excluded). Variants:

- `TREE` (e.g. `before=/tmp/before`, `after=.`): the source tree on PYTHONPATH, the in-memory path.
- with `--streamed`, also the last tree's `arrays` dataset: the same mnist5k split written as .npy files,
  memory-mapped and read through DataLoader with `loader_workers` 0, 1 and 2 (per rank). Augmentation is
  off in these and in a matching in-memory run (`memory-noaug`), which is their peer.

Repetitions interleave the variants (the order rotating), so a busy phase of the machine hits all alike;
ratios are taken per repetition against the first variant and summarised by their median and 95 %
nonparametric CI.

Usage:

    git worktree add /tmp/before <commit>
    python benchmarks/bench_input_pipeline.py --trees before=/tmp/before after=. [--workers 1 2] [--repeats 7]
                                              [--epochs 3] [--streamed] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from polytrain.bench.stats import median_ci

RUNNER = r"""
import json, sys
import polytrain
from polytrain.config import Experiment
settings = json.loads(sys.argv[1])
result = polytrain.train(Experiment(**settings))
print(json.dumps({"samples_per_s": result.samples_per_s, "final_test_accuracy": result.final_test_accuracy}))
"""


def write_arrays(folder: Path) -> None:
    """The mnist5k split polytrain trains on (seed 0), as the four .npy files of the `arrays` dataset."""
    import numpy as np

    from polytrain.data import load_dataset

    data = load_dataset("mnist5k", seed=0)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.save(folder / f"{name}.npy", getattr(data, name).numpy())


def run(tree: str, settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(settings)], capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir(), timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"run {tree} {settings} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--streamed", action="store_true", help="also the arrays dataset through DataLoader")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.trees)
    last = list(trees)[-1]
    scratch = Path(tempfile.mkdtemp(prefix="polytrain-arrays-"))
    if args.streamed:
        write_arrays(scratch)
    records = []
    for workers in args.workers:
        base = {"model": "lenet5", "epochs": args.epochs, "workers": workers}
        variants = {name: (path, {**base, "dataset": "mnist5k"}) for name, path in trees.items()}
        if args.streamed:
            plain = {**base, "augment_shift": 0, "batch_size": 128, "optimizer": "momentum", "lr": 0.05,
                     "weight_decay": 1e-3, "schedule": "cosine"}
            variants["memory-noaug"] = (trees[last], {**plain, "dataset": "mnist5k"})
            for readers in (0, 1, 2):
                variants[f"arrays-w{readers}"] = (trees[last], {**plain, "dataset": "arrays", "loader_workers": readers,
                                                                "dataset_args": {"path": str(scratch)}})
        names = list(variants)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                path, settings = variants[name]
                outcome = run(path, settings)
                rates[name].append(outcome["samples_per_s"])
                records.append({"workers": workers, "variant": name, "repeat": repeat, **outcome})
                print(f"workers {workers} {name} #{repeat}: {outcome['samples_per_s']:.0f} samples/s, "
                      f"accuracy {outcome['final_test_accuracy']:.4f}", flush=True)
        print(f"\nworkers {workers}, {args.epochs} epochs, {args.repeats} repetitions")
        print("| variant | samples/s median [95 % CI] | / first variant, median of per-repetition ratios [95 % CI] |")
        print("|---|---|---|")
        reference = rates[names[0]]
        for name in names:
            rate = median_ci(rates[name])
            peer = reference if not name.startswith("arrays") else rates["memory-noaug"]
            ratio = median_ci([a / b for a, b in zip(rates[name], peer)])
            against = names[0] if not name.startswith("arrays") else "memory-noaug"
            print(f"| {name} | {rate.median:.0f} [{rate.low:.0f}, {rate.high:.0f}] | "
                  f"{ratio.median:.3f} [{ratio.low:.3f}, {ratio.high:.3f}] vs {against} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
