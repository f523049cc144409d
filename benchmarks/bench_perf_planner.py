"""Is the planner's first choice the measured fastest? Five settings on this machine and the emulated cluster
(issue 14, part 6).

For each setting (model, ranks, link) `polytrain.perf.plan.rank_candidates` ranks every exact candidate
(allreduce algorithms x bucket sizes, parameter servers, dp x pp pipelines, dp x tp) by predicted step on
the calibration profile; the candidates run are the planner's first three and the best-predicted of each
family not among them (allreduce, ps, pipeline, tensor parallel), so that the first choice meets the best
of every other way to run. Each runs `--repeats` times (mnist5k, global batch 480, 3 epochs; measured
step = the median over epochs 2..3 of train_s / steps), interleaved. The first choice counts as a hit
when its median is the fastest, and as a tie when the fastest's median lies within its 95 % CI.

    python benchmarks/bench_perf_planner.py measure OUT.jsonl --profile PROFILE.json --repeats 3
    python benchmarks/bench_perf_planner.py summarize OUT.jsonl [--markdown FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment

SETTINGS = [("mlp", 4, "none"), ("mlp", 4, "1gbit"), ("mlp", 4, "100mbit"), ("lenet5", 4, "1gbit"),
            ("mlp", 2, "100mbit")]
EPOCHS, BATCH, FIRST = 3, 480, 3
FAMILIES = ("allreduce", "ps", "pipeline", "tensor")


def base(model: str, seed: int = 0) -> Experiment:
    return Experiment(model=model, dataset="mnist5k", batch_size=BATCH, epochs=EPOCHS, augment_shift=0, seed=seed,
                      timeout_s=600)


def family(settings: dict) -> str:
    mesh = settings.get("mesh", {})
    return "pipeline" if mesh.get("pp", 1) > 1 else "tensor" if mesh.get("tp", 1) > 1 else settings["strategy"]


def chosen_candidates(model: str, ranks: int, bandwidth: str, profile) -> list[dict]:
    """The planner's first FIRST, then the best-predicted of every family not among them."""
    from polytrain.perf.plan import rank_candidates

    ranked, _ = rank_candidates(base(model), profile.cluster(bandwidth, ranks), ranks)
    picked = ranked[:FIRST]
    for name in FAMILIES:
        if not any(family(r.candidate.settings) == name for r in picked):
            picked += [r for r in ranked if family(r.candidate.settings) == name][:1]
    return [{"label": r.candidate.label, "settings": r.candidate.settings, "planner_rank": ranked.index(r) + 1,
             "predicted_s": r.prediction.step_s} for r in picked]


def experiment(model: str, candidate: dict, seed: int) -> Experiment:
    settings = {"mesh": {}, "step_schedule": "accumulate", "microbatches": 1, **candidate["settings"]}
    return dataclasses.replace(base(model, seed), **settings)


def run_all(model: str, ranks: int, bandwidth: str, candidates: list[dict], repeats: int, out: str, train_one) -> None:
    for seed in range(repeats):  # interleaved: drift over time hits every candidate alike
        for candidate in candidates:
            result = train_one(experiment(model, candidate, seed))
            if result is None:
                continue
            steps = [epoch["train_s"] / epoch["steps"] for epoch in result.epochs]
            row = {"model": model, "ranks": ranks, "bandwidth": bandwidth, "seed": seed, **candidate,
                   "step_s": statistics.median(steps[1:])}
            with open(out, "a") as file:
                file.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def main_host(args: argparse.Namespace) -> None:
    """On every host of `polytrain cluster`: the setting's candidates, `repeats` times."""
    from polytrain.launch import init_from_torchrun
    from polytrain.train.defaults import resolve
    from polytrain.train.loop import Trainer
    from polytrain.train.progress import SilentReporter

    comm = init_from_torchrun(600.0, backend="gloo")
    job = json.loads(Path(args.job).read_text())

    def train_one(exp):
        result = Trainer(resolve(exp), SilentReporter(), None, comm).run()
        return result if comm.rank == 0 else None

    run_all(job["model"], comm.world_size, job["bandwidth"], job["candidates"], job["repeats"], job["out"], train_one)


def main_measure(args: argparse.Namespace) -> None:
    from polytrain.perf.profile import load_profile
    from polytrain.train import train

    profile = load_profile(args.profile)
    for model, ranks, bandwidth in SETTINGS:
        candidates = chosen_candidates(model, ranks, bandwidth, profile)
        if bandwidth == "none":
            run_all(model, ranks, bandwidth, candidates, args.repeats, args.out, train)
            continue
        with tempfile.TemporaryDirectory() as scratch:
            job = Path(scratch) / "job.json"
            job.write_text(json.dumps({"model": model, "bandwidth": bandwidth, "candidates": candidates,
                                       "repeats": args.repeats, "out": str(Path(args.out).resolve())}))
            subprocess.run([sys.executable, "-m", "polytrain", "cluster", "--hosts", str(ranks), "--bandwidth",
                            bandwidth, "--timeout", "3000", "--", sys.executable, str(Path(__file__).resolve()),
                            "host", "--job", str(job)], check=True)


def main_summarize(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in open(args.results)]
    settings: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        settings.setdefault((row["model"], row["ranks"], row["bandwidth"]), {}).setdefault(row["label"], []).append(row)
    lines = ["| setting | candidate (planner rank) | predicted ms | measured ms (median, 95 % CI) |",
             "|---|---|---|---|"]
    verdicts = []
    for (model, ranks, bandwidth), by_label in settings.items():
        measured = {label: median_ci([r["step_s"] for r in runs]) for label, runs in by_label.items()}
        first = min(by_label, key=lambda label: by_label[label][0]["planner_rank"])
        fastest = min(measured, key=lambda label: measured[label].median)
        hit = fastest == first
        tie = not hit and measured[first].low <= measured[fastest].median
        verdicts.append((hit, tie))
        for label in sorted(by_label, key=lambda label: by_label[label][0]["planner_rank"]):
            m, run = measured[label], by_label[label][0]
            mark = " **fastest**" if label == fastest else ""
            lines.append(f"| {model}, {ranks} ranks, {bandwidth} | {label} ({run['planner_rank']}) | "
                         f"{1e3 * run['predicted_s']:.2f} | {1e3 * m.median:.2f} [{1e3 * m.low:.2f}, "
                         f"{1e3 * m.high:.2f}]{mark} |")
        verdict = "hit" if hit else "tie (the fastest lies within the first choice's CI)" if tie else "miss"
        lines.append(f"| {model}, {ranks} ranks, {bandwidth} | first choice: {first} -> {verdict} | | |")
    hits = sum(hit for hit, _ in verdicts)
    ties = sum(tie for _, tie in verdicts)
    lines += ["", f"**The first choice was the measured fastest in {hits} of {len(verdicts)} settings**"
                  f" ({ties} more within its CI of the fastest)."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="plan every setting and run its candidates")
    measure.add_argument("out")
    measure.add_argument("--profile", required=True)
    measure.add_argument("--repeats", type=int, default=3)
    host = commands.add_parser("host", help="(on every host of polytrain cluster) one setting's candidates")
    host.add_argument("--job", required=True)
    summarize = commands.add_parser("summarize", help="first choice against the measured fastest")
    summarize.add_argument("results")
    summarize.add_argument("--markdown", default=None)
    args = parser.parse_args()
    {"measure": main_measure, "host": main_host, "summarize": main_summarize}[args.command](args)


if __name__ == "__main__":
    main()
