"""Local SGD and DiLoCo at 4 workers on LeNet-5/mnist5k: accuracy, bytes per step and time to target.

Every run is one `polytrain train` command line, run as a subprocess exactly as recorded (the command, its
exit status, its wall time and the load average before it go into one JSON line per run), so a reader can
paste any of them. Two measurements:

- `accuracy`: 4 local workers (gloo over loopback, no emulated network), mnist5k's defaults (LeNet-5,
  global batch 128 = 32 steps per epoch, momentum SGD, cosine schedule) for `--epochs` epochs:
  fp32 `allreduce` (no compressor), `local_sgd:period=H` for H in 1, 4, 16, 64, and `diloco:period=16`
  with the paper's outer Nesterov SGD (lr 0.7, momentum 0.9), for every seed.
- `cluster`: the same training on `polytrain cluster --hosts 4 --bandwidth 100mbit` (4 network
  namespaces, each link shaped with tc tbf, one rank per host) with `--target-accuracy T`: `allreduce`
  with fp32 and with `--compressor fp16`, and `local_sgd` with H = 4 and H = 16. The 4 hosts share this
  machine's cores, so compute is oversubscribed; compare rows of the same session only.

In both, all (configuration, seed) runs go in one order drawn by `random.Random(--order-seed)`, so a busy
phase of the shared machine hits the configurations alike. A finished run (its result.json exists) is
skipped when the command is repeated; a failed one is retried after `--retry-wait` seconds (the tree is
edited by others while this runs) and kept as failed after `--retries` retries. `tables` prints the
markdown tables of BENCHMARKS.md from the JSON lines: medians over seeds with the nonparametric CI of
polytrain.bench.stats.median_ci (with 3 seeds that is [min, max] at 75 % coverage), every seed's value
beside it.

Usage:

    python benchmarks/bench_local_sgd.py accuracy --seeds 0 1 2 --epochs 4 --out OUT
    python benchmarks/bench_local_sgd.py cluster --seeds 0 1 2 --epochs 4 --target 0.95 --out OUT
    python benchmarks/bench_local_sgd.py tables OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET = "mnist5k"
WORKERS = 4
BANDWIDTH = "100mbit"

# (label, extra arguments of `polytrain train`): the label names the row in the tables.
ACCURACY_CONFIGS: tuple[tuple[str, list[str]], ...] = (
    ("allreduce", ["--strategy", "allreduce"]),
    ("local_sgd:period=1", ["--strategy", "local_sgd:period=1"]),
    ("local_sgd:period=4", ["--strategy", "local_sgd:period=4"]),
    ("local_sgd:period=16", ["--strategy", "local_sgd:period=16"]),
    ("local_sgd:period=64", ["--strategy", "local_sgd:period=64"]),
    ("diloco:period=16,outer_lr=0.7,outer_momentum=0.9,nesterov=true",
     ["--strategy", "diloco:period=16,outer_lr=0.7,outer_momentum=0.9,nesterov=true"]),
)
CLUSTER_CONFIGS: tuple[tuple[str, list[str]], ...] = (
    ("allreduce", ["--strategy", "allreduce"]),
    ("allreduce --compressor fp16", ["--strategy", "allreduce", "--compressor", "fp16"]),
    ("local_sgd:period=4", ["--strategy", "local_sgd:period=4"]),
    ("local_sgd:period=16", ["--strategy", "local_sgd:period=16"]),
)
BASELINE = "allreduce"
FP16 = "allreduce --compressor fp16"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]", "_", label)


def train_command(extra: list[str], seed: int, epochs: int, out: Path, target: float | None) -> list[str]:
    command = ["polytrain", "train", "--dataset", DATASET, "--workers", str(WORKERS), "--epochs", str(epochs),
               *extra, "--seed", str(seed)]
    if target is not None:
        command += ["--target-accuracy", str(target)]
    return command + ["--out", str(out)]


def run_command(command: list[str], out: Path, retries: int, retry_wait: float, timeout: float) -> dict:
    """Runs `command` (whose --out is `out`) until it writes result.json or the retries are spent."""
    attempts = []
    for attempt in range(retries + 1):
        if attempt:
            print(f"    retry {attempt}/{retries} in {retry_wait:.0f} s", flush=True)
            time.sleep(retry_wait)
        if out.exists():
            shutil.rmtree(out)  # a failed attempt's directory: --out refuses to overwrite a run
        load = os.getloadavg()[0]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
            rc, tail = done.returncode, (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired as error:
            rc, tail = 124, f"timed out after {timeout} s: {str(error.stdout or '')[-1000:]}"
        seconds = time.perf_counter() - started
        attempts.append({"rc": rc, "command_s": seconds, "load_average": load,
                         "tail": None if rc == 0 else tail})
        if rc == 0 and (out / "result.json").exists():
            break
        print(f"    failed (status {rc}): {tail.strip().splitlines()[-1] if tail.strip() else ''}", flush=True)
    return {"attempts": attempts, "ok": (out / "result.json").exists()}


def summary(result: dict) -> dict:
    """The numbers the tables need from one result.json."""
    per_rank = [rank["bytes_sent"] / max(1, result["steps"]) for rank in result["comm"]["per_rank"]]
    return {
        "final_test_accuracy": result["final_test_accuracy"], "best_test_accuracy": result["best_test_accuracy"],
        "test_accuracy": [row["test_accuracy"] for row in result["epochs"]],
        "epoch_wall_s": [row["wall_s"] for row in result["epochs"]],
        "epoch_train_s": [row["train_s"] for row in result["epochs"]],
        "target_accuracy": result["target"], "time_to_target_s": result["time_to_target_s"],
        "wall_s": result["wall_s"], "steps": result["steps"],
        "bytes_sent_per_step": result["comm"]["bytes_sent_per_step"],
        "bytes_sent_per_step_mean": sum(per_rank) / len(per_rank),
        "bytes_estimated": result["comm"]["estimated"],
        "bookkeeping_bytes_sent": result["comm"]["bookkeeping"]["bytes_sent"],
        "git_sha": result["environment"].get("git_sha"), "network": result["environment"].get("network"),
        "cpu": result["environment"].get("cpu"), "cores": result["environment"].get("cores"),
        "torch": result["environment"].get("torch"), "threads": result["environment"].get("threads"),
    }


def measure(kind: str, args: argparse.Namespace) -> None:
    configs = ACCURACY_CONFIGS if kind == "accuracy" else CLUSTER_CONFIGS
    if args.configs:
        known = dict(configs)
        missing = [c for c in args.configs if c not in known]
        if missing:
            raise SystemExit(f"unknown configurations {missing}; known: {list(known)}")
        configs = tuple((c, known[c]) for c in args.configs)
    target = args.target if kind == "cluster" else None
    runs = [(label, extra, seed) for label, extra in configs for seed in args.seeds]
    random.Random(args.order_seed).shuffle(runs)
    out = args.out / kind
    out.mkdir(parents=True, exist_ok=True)
    lines = args.out / f"{kind}.jsonl"
    with open(lines, "a") as handle:
        handle.write(json.dumps({"kind": "session", "measurement": kind, "argv": sys.argv,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "load_average": os.getloadavg(), "order": [[l, s] for l, _, s in runs]}) + "\n")
    print(f"{len(runs)} {kind} runs, order seed {args.order_seed}; lines appended to {lines}", flush=True)
    for number, (label, extra, seed) in enumerate(runs, 1):
        directory = out / slug(label) / f"seed{seed}"
        command = train_command(extra, seed, args.epochs, directory, target)
        if kind == "cluster":
            command = ["polytrain", "cluster", "--hosts", str(WORKERS), "--bandwidth", BANDWIDTH,
                       "--timeout", str(int(args.timeout)), "--", *command]
        if (directory / "result.json").exists():
            print(f"[{number}/{len(runs)}] {label} seed {seed}: done before, kept", flush=True)
            continue
        print(f"[{number}/{len(runs)}] {' '.join(command)}", flush=True)
        outcome = run_command(command, directory, args.retries, args.retry_wait, args.timeout + 60)
        record = {"kind": kind, "config": label, "seed": seed, "epochs": args.epochs, "command": command,
                  "order": number, **outcome}
        if outcome["ok"]:
            record.update(summary(json.loads((directory / "result.json").read_text())))
            reached = record["time_to_target_s"]
            print(f"    {100 * record['final_test_accuracy']:.2f} %, {record['bytes_sent_per_step'] / 1e3:.1f} kB/step"
                  + (f", target at {reached:.1f} s" if reached is not None else "")
                  + f", command {outcome['attempts'][-1]['command_s']:.1f} s", flush=True)
        with open(lines, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# -- tables -----------------------------------------------------------------------------------------------


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(records: list[dict]) -> dict[tuple[str, int], dict]:
    """The last record of each (config, seed) that finished."""
    runs = {}
    for record in records:
        if record.get("kind") != "session" and record.get("ok"):
            runs[(record["config"], record["seed"])] = record
    return runs


def ci_text(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    from polytrain.bench.stats import median_ci

    stats = median_ci(values)
    low, mid, high = (seconds_text(scale * v, digits) for v in (stats.low, stats.median, stats.high))
    return f"{mid} [{low}, {high}]"


def seconds_text(value: float, digits: int = 1) -> str:
    """A number, or 'n.r.' (not reached) for the +inf of a run that missed the target."""
    return "n.r." if value == math.inf else f"{value:.{digits}f}"


def censored(run: dict) -> float:
    return math.inf if run["time_to_target_s"] is None else run["time_to_target_s"]


def coverage(n: int) -> str:
    from polytrain.bench.stats import median_ci

    return f"{100 * median_ci([0.0] * n).confidence:.0f} %"


def kilobytes(value: float) -> str:
    return f"{value / 1e3:,.1f} kB"


def per_seed(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    return " / ".join(f"{scale * v:.{digits}f}" for v in values)


def accuracy_table(records: list[dict]) -> None:
    runs = latest(records)
    labels = [label for label, _ in ACCURACY_CONFIGS if any(key[0] == label for key in runs)]
    seeds = sorted({seed for _, seed in runs})
    base = {seed: r for (label, seed), r in runs.items() if label == BASELINE}
    base_bytes = statistics.median(r["bytes_sent_per_step_mean"] for r in base.values()) if base else None
    epochs = sorted({r["epochs"] for r in runs.values()})
    print(f"\n{WORKERS} local workers, LeNet-5 on {DATASET}, {'/'.join(map(str, epochs))} epochs, seeds "
          f"{', '.join(map(str, seeds))}; test accuracy: median [{coverage(len(seeds))} CI] (per seed); "
          f"bytes: training traffic sent per optimizer step per rank (mean over ranks), median over seeds:\n")
    print("| strategy | final test accuracy % | vs allreduce, points | bytes sent per step per rank "
          "| allreduce / this | run wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in labels:
        done = sorted((r for (l, _), r in runs.items() if l == label), key=lambda r: r["seed"])
        accuracy = [r["final_test_accuracy"] for r in done]
        deltas = [100 * (r["final_test_accuracy"] - base[r["seed"]]["final_test_accuracy"])
                  for r in done if r["seed"] in base]
        sent = statistics.median(r["bytes_sent_per_step_mean"] for r in done)
        wall = statistics.median(r["wall_s"] for r in done)
        cells = [f"`{label}`", f"{ci_text(accuracy, 100)} ({per_seed(accuracy)})",
                 f"{statistics.median(deltas):+.2f}" if deltas and label != BASELINE else "-",
                 kilobytes(sent), f"{base_bytes / sent:.1f}x" if base_bytes and sent else "-", f"{wall:.1f}"]
        print("| " + " | ".join(cells) + " |")


def epoch_seconds(run: dict) -> list[float]:
    ends = run["epoch_wall_s"]
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]


def reached_epoch(run: dict) -> int:
    """The epoch whose end-of-epoch evaluation first reached the target."""
    return next(i for i, a in enumerate(run["test_accuracy"], 1) if a >= run["target_accuracy"])


def cluster_table(records: list[dict]) -> None:
    runs = latest(records)
    labels = [label for label, _ in CLUSTER_CONFIGS if any(key[0] == label for key in runs)]
    seeds = sorted({seed for _, seed in runs})
    first = next(iter(runs.values()))
    target = first["target_accuracy"]
    print(f"\nEmulated cluster, {WORKERS} hosts at {BANDWIDTH} each way sharing {first['cores']} cores, "
          f"LeNet-5 on {DATASET}, {first['epochs']} epochs, target {100 * target:.1f} % test accuracy "
          f"(first epoch-end evaluation at or above it), seeds {', '.join(map(str, seeds))}; "
          f"median [{coverage(len(seeds))} CI] (per seed):\n")
    print("| strategy | time to target s (per seed; epoch reached) | fp32 allreduce / this | fp16 allreduce / this "
          "| s per epoch | final test accuracy % | bytes sent per step per rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    # A seed that never reached the target counts as slower than any that did (time +inf): the median is
    # still that of all seeds, and finite while more than half of them reached the target.
    medians = {}
    for label in labels:
        done = [r for (l, _), r in runs.items() if l == label]
        medians[label] = statistics.median(censored(r) for r in done)
    for label in labels:
        done = sorted((r for (l, _), r in runs.items() if l == label), key=lambda r: r["seed"])
        times = [censored(r) for r in done]
        epochs = " / ".join(str(reached_epoch(r)) if r["time_to_target_s"] is not None else "-" for r in done)
        seconds = " / ".join(seconds_text(t) for t in times)
        reached = sum(t != math.inf for t in times)
        time_text = f"{ci_text(times, 1, 1)} ({seconds}; epochs {epochs})"
        if reached < len(times):
            time_text += f", reached by {reached} of {len(times)} seeds"
        mine = medians[label]
        ratios = []
        for base_label in (BASELINE, FP16):
            base = medians.get(base_label)
            finite = base is not None and base != math.inf and mine != math.inf
            ratios.append(f"{base / mine:.2f}x" if finite and label != base_label else "-")
        per_epoch = statistics.median(s for r in done for s in epoch_seconds(r))
        accuracy = [r["final_test_accuracy"] for r in done]
        cells = [f"`{label}`", time_text, *ratios, f"{per_epoch:.2f}",
                 f"{ci_text(accuracy, 100)} ({per_seed(accuracy)})",
                 kilobytes(statistics.median(r["bytes_sent_per_step_mean"] for r in done))]
        print("| " + " | ".join(cells) + " |")


def provenance(records: list[dict]) -> None:
    for record in records:
        if record.get("kind") == "session":
            print(f"- {record['measurement']} session {record['started']} (load average "
                  f"{record['load_average'][0]:.1f}): `{' '.join(['python'] + record['argv'])}`")
    runs = list(latest(records).values())
    if runs:
        shas = sorted({str(r["git_sha"])[:7] for r in runs})
        loads = [a["load_average"] for r in runs for a in r["attempts"][-1:]]
        print(f"- {runs[0]['cpu']}, {runs[0]['cores']} cores, torch {runs[0]['torch']}, {runs[0]['threads']} torch "
              f"thread(s) per rank; git {', '.join(shas)} (with others' uncommitted changes in the tree); "
              f"load average before a run {min(loads):.1f} to {max(loads):.1f}; network: "
              f"{'; '.join(sorted({str(r['network']) for r in runs}))}")
    failed = [r for r in records if r.get("kind") != "session" and not r.get("ok")]
    for record in failed:
        print(f"- failed: {record['config']} seed {record['seed']} after {len(record['attempts'])} attempts")


def tables(args: argparse.Namespace) -> None:
    accuracy, cluster = read(args.out / "accuracy.jsonl"), read(args.out / "cluster.jsonl")
    provenance(accuracy + cluster)
    if latest(accuracy):
        accuracy_table(accuracy)
    if latest(cluster):
        cluster_table(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for kind in ("accuracy", "cluster"):
        sub = commands.add_parser(kind)
        sub.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        sub.add_argument("--epochs", type=int, default=4)
        sub.add_argument("--configs", nargs="+", help="labels of the configurations to run (default: all)")
        sub.add_argument("--order-seed", type=int, default=9)
        sub.add_argument("--retries", type=int, default=2)
        sub.add_argument("--retry-wait", type=float, default=180.0)
        sub.add_argument("--timeout", type=float, default=900.0, help="seconds for one run")
        sub.add_argument("--out", type=Path, required=True)
        if kind == "cluster":
            sub.add_argument("--target", type=float, default=0.95)
    table = commands.add_parser("tables")
    table.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "tables":
        tables(args)
    else:
        measure(args.command, args)


if __name__ == "__main__":
    main()
