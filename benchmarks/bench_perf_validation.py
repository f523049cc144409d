"""Predicted against measured step time: 6 strategies x 2 and 4 ranks x loopback / 1 Gbit/s / 100 Mbit/s
(33 configurations: the server needs 2 workers beside it) on this machine and the emulated cluster (issue 14, part 3).

Every run trains the zoo MLP (784-512-256-10, 0.54 M parameters, 2.1 MB of float32 gradient) on mnist5k,
global batch 480 (8 steps an epoch), 4 epochs; its measured step is the median over epochs 2..4 of
train_s / steps (rank 0's training time), and each configuration is run `--repeats` times (median and
95 % CI over the repeats). The predictions come from a calibration profile (`polytrain calibrate`)
and never see these runs.

    python benchmarks/bench_perf_validation.py measure OUT.jsonl --bandwidths none,1gbit,100mbit --repeats 3
    python benchmarks/bench_perf_validation.py summarize OUT.jsonl --profile PROFILE.json [--markdown FILE]
    # extrapolation: a profile calibrated with 1 and 2 ranks only predicts the 4-rank runs
    python benchmarks/bench_perf_validation.py summarize OUT.jsonl --profile TWO_RANKS.json --hosts 4

`measure` runs loopback configurations as local worker processes and the others on `polytrain cluster`
(one start per bandwidth and host count; `host` is what every host runs there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment

# name -> (strategy, args, compressor, mesh maker, schedule, microbatches, servers)
CONFIGS = {
    "allreduce ring": ("allreduce", {"algorithm": "ring"}, None, None, "accumulate", 1, 0),
    "allreduce native": ("allreduce", {"algorithm": "native"}, None, None, "accumulate", 1, 0),
    "allreduce + fp16": ("allreduce", {"algorithm": "native"}, "fp16", None, "accumulate", 1, 0),
    "local SGD H=4": ("local_sgd", {"period": 4}, None, None, "accumulate", 1, 0),
    "ps sync, 1 server": ("ps", {"servers": 1, "mode": "sync"}, None, None, "accumulate", 1, 1),
    "gpipe pp=2, 4 microbatches": ("allreduce", {}, None, "pp", "gpipe", 4, 0),
}
EPOCHS, BATCH = 4, 480  # 480 splits over 2, 3 and 4 workers


def runs_at(name: str, hosts: int) -> bool:
    """A parameter server needs 2 workers beside it."""
    return hosts - CONFIGS[name][6] >= 2


def experiment(name: str, hosts: int, seed: int) -> Experiment:
    strategy, args, compressor, mesh, schedule, microbatches, servers = CONFIGS[name]
    workers = hosts - servers
    shape = {"dp": workers // 2, "pp": 2} if mesh == "pp" else {}
    if mesh == "pp" and workers == 2:
        strategy, args = "local", {}
    return Experiment(model="mlp", dataset="mnist5k", workers=workers, epochs=EPOCHS, batch_size=BATCH,
                      strategy=strategy, strategy_args=args, compressor=compressor, mesh=shape, step_schedule=schedule,
                      microbatches=microbatches, augment_shift=0, seed=seed, timeout_s=600)


def record(name: str, hosts: int, bandwidth: str, seed: int, result) -> dict:
    steps = [epoch["train_s"] / epoch["steps"] for epoch in result.epochs]
    return {"config": name, "hosts": hosts, "bandwidth": bandwidth, "seed": seed,
            "step_s": statistics.median(steps[1:]), "epoch_steps_s": steps,
            "bytes_sent_per_step": result.comm["bytes_sent_per_step"], "accuracy": result.final_test_accuracy}


def append(path: str, row: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "epoch_steps_s"}), flush=True)


def main_host(args: argparse.Namespace) -> None:
    """On every host of `polytrain cluster`: every configuration of this host count, `repeats` times."""
    from polytrain.launch import init_from_torchrun
    from polytrain.train.defaults import resolve
    from polytrain.train.loop import Trainer
    from polytrain.train.progress import SilentReporter

    comm = init_from_torchrun(600.0, backend="gloo")
    for seed in range(args.repeats):
        for name in (name for name in CONFIGS if runs_at(name, comm.world_size)):
            result = Trainer(resolve(experiment(name, comm.world_size, seed)), SilentReporter(), None, comm).run()
            if comm.rank == 0:
                append(args.out, record(name, comm.world_size, args.bandwidth, seed, result))


def main_measure(args: argparse.Namespace) -> None:
    from polytrain.train import train

    for bandwidth in args.bandwidths.split(","):
        for hosts in [int(h) for h in args.hosts.split(",")]:
            if bandwidth == "none":
                for seed in range(args.repeats):  # interleaved: drift over time hits every configuration alike
                    for name in (name for name in CONFIGS if runs_at(name, hosts)):
                        append(args.out, record(name, hosts, bandwidth, seed, train(experiment(name, hosts, seed))))
                continue
            subprocess.run([sys.executable, "-m", "polytrain", "cluster", "--hosts", str(hosts), "--bandwidth",
                            bandwidth, "--timeout", "3000", "--", sys.executable, str(Path(__file__).resolve()),
                            "host", "--bandwidth", bandwidth, "--repeats", str(args.repeats), "--out",
                            str(Path(args.out).resolve())], check=True)


def main_summarize(args: argparse.Namespace) -> None:
    from polytrain.perf.predict import predict
    from polytrain.perf.profile import load_profile

    profile = load_profile(args.profile)
    rows = [json.loads(line) for line in open(args.results)]
    hosts_wanted = {int(h) for h in args.hosts.split(",")} if args.hosts else None
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if hosts_wanted is None or row["hosts"] in hosts_wanted:
            groups.setdefault((row["bandwidth"], row["hosts"], row["config"]), []).append(row)
    lines = ["| link | ranks | configuration | measured step ms (median, 95 % CI) | spread | predicted ms | "
             "compute / exposed comm / bubble / overhead ms | error |", "|---|---|---|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {}
    table = []
    for (bandwidth, hosts, name), runs in sorted(groups.items(), key=lambda item: (item[0][0] != "none", item[0])):
        measured = median_ci([r["step_s"] for r in runs])
        exp = experiment(name, hosts, 0)
        p = predict(exp, profile.cluster(bandwidth, hosts))
        error = (p.step_s - measured.median) / measured.median
        spread = (measured.high - measured.low) / 2 / measured.median
        for key in ("all", f"strategy: {name}", f"link: {bandwidth}", f"ranks: {hosts}"):
            errors.setdefault(key, []).append(abs(error))
        table.append((abs(error), bandwidth, hosts, name, error, p))
        lines.append(f"| {bandwidth} | {hosts} | {name} | {1e3 * measured.median:.2f} [{1e3 * measured.low:.2f}, "
                     f"{1e3 * measured.high:.2f}] | ±{100 * spread:.0f} % | {1e3 * p.step_s:.2f} | "
                     f"{1e3 * p.compute_s:.2f} / {1e3 * p.exposed_comm_s:.2f} / {1e3 * p.bubble_s:.2f} / "
                     f"{1e3 * p.overhead_s:.2f} | {100 * error:+.1f} % |")
    lines += ["", "| group | configurations | MAPE |", "|---|---|---|"]
    for key, values in errors.items():
        lines.append(f"| {key} | {len(values)} | {100 * statistics.mean(values):.1f} % |")
    spreads = []
    for runs in groups.values():
        for r in runs:
            later = r["epoch_steps_s"][1:]
            spreads.append(statistics.pstdev(later) / statistics.mean(later))
    lines += ["", f"run-to-run spread: the median coefficient of variation of a run's epoch steps is "
                  f"{100 * statistics.median(spreads):.1f} %; the median half-width of the 95 % CIs over repeats "
                  "is in the spread column."]
    lines += ["", "largest errors:"] + [f"- {bw}, {h} ranks, {n}: {100 * e:+.1f} % ({p.split})"
                                        for _, bw, h, n, e, p in sorted(table, reverse=True)[:5]]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="run every configuration and append JSON lines")
    measure.add_argument("out")
    measure.add_argument("--bandwidths", default="none,1gbit,100mbit")
    measure.add_argument("--hosts", default="2,4")
    measure.add_argument("--repeats", type=int, default=3)
    host = commands.add_parser("host", help="(on every host of polytrain cluster) the runs of one host count")
    host.add_argument("--bandwidth", required=True)
    host.add_argument("--repeats", type=int, default=3)
    host.add_argument("--out", required=True)
    summarize = commands.add_parser("summarize", help="predicted against measured, MAPE")
    summarize.add_argument("results")
    summarize.add_argument("--profile", required=True)
    summarize.add_argument("--hosts", default=None, help="only these host counts (the extrapolation check)")
    summarize.add_argument("--markdown", default=None)
    args = parser.parse_args()
    {"measure": main_measure, "host": main_host, "summarize": main_summarize}[args.command](args)


if __name__ == "__main__":
    main()
