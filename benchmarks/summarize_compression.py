"""Markdown tables for BENCHMARKS.md from the compression benchmark's JSON outputs.

    python benchmarks/summarize_compression.py collect CLUSTER_DIR > CLUSTER_DIR/cluster.jsonl
    python benchmarks/summarize_compression.py tables [--accuracy A.jsonl] [--overhead O.jsonl]
                                                      [--cluster C.jsonl]

`collect` turns the run directories of benchmarks/bench_compression_cluster.sh (BANDWIDTH/MODEL/SLUG/
result.json or diverged.txt) into one JSON line per run. `tables` prints, per model:

- accuracy and bytes: test accuracy after the last epoch, median over seeds [nonparametric CI: for 3
  seeds the range, a 75 % interval], the change against fp32 (median over seeds of the per-seed
  difference: a seed fixes split, initialization and data order for every compressor), bytes sent per
  step per rank (counted by the communicator, mean over the ranks and the run's steps) and fp32's bytes
  over them, one rank's payload for the whole model (from the overhead measurement) and 4n over it, and
  compress + decompress time per MB of float32 gradient;
- time to target on the emulated cluster, per bandwidth: seconds from the start of training (evaluation
  included, checked once per epoch) and the speedups fp32 time / time and fp16 time / time (> 1: sooner);
- the issue's goals for top-k 1 % with error feedback and PowerSGD, each marked met or missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression import COMPRESSORS, MODELS, slug  # noqa: E402  (the list and its order)

from polytrain.bench.stats import median_ci  # noqa: E402
from polytrain.config import parse_named  # noqa: E402

FP32, FP16 = "none", "fp16"
GOAL_ROWS = ("topk:ratio=0.01,ef=true", "powersgd:rank=2")
GOAL_MAX_LOSS_POINTS = 0.5
GOAL_MIN_BYTE_RATIO = 50.0
GOAL_BANDWIDTH = "100mbit"


# -- collect ----------------------------------------------------------------------------------------------


def spec_of(config: dict) -> str:
    """The benchmark's spec for a run's (compressor, compressor_args), or one rebuilt from them."""
    name, args = config.get("compressor"), config.get("compressor_args") or {}
    if name is None:
        return FP32
    for spec, _ in COMPRESSORS:
        if spec != FP32 and parse_named(spec, "spec") == (name, args):
            return spec
    text = ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in args.items())
    return f"{name}:{text}" if text else name


def collect(directory: Path) -> list[dict]:
    """One record per run directory BANDWIDTH/MODEL/SLUG under `directory`."""
    records = []
    for path in sorted(directory.glob("*/*/*/result.json")):
        result = json.loads(path.read_text())
        bandwidth, model = path.parts[-4], path.parts[-3]
        per_rank = [rank["bytes_sent"] / max(1, result["steps"]) for rank in result["comm"]["per_rank"]]
        records.append({
            "kind": "cluster", "bandwidth": bandwidth, "model": model, "compressor": spec_of(result["config"]),
            "hosts": result["config"]["workers"], "seed": result["config"]["seed"],
            "epochs_planned": result["config"]["epochs"], "epochs_run": len(result["epochs"]),
            "target_accuracy": result["target"], "time_to_target_s": result["time_to_target_s"],
            "final_test_accuracy": result["final_test_accuracy"], "best_test_accuracy": result["best_test_accuracy"],
            "test_accuracy": [row["test_accuracy"] for row in result["epochs"]],
            "epoch_wall_s": [row["wall_s"] for row in result["epochs"]],
            "epoch_train_s": [row["train_s"] for row in result["epochs"]], "wall_s": result["wall_s"],
            "bytes_sent_per_step_mean": sum(per_rank) / len(per_rank),
            "network": result["environment"].get("network"), "cores": result["environment"].get("cores"),
            "git_sha": result["environment"].get("git_sha"), "directory": str(path.parent)})
    for path in sorted(directory.glob("*/*/*/diverged.txt")):
        names = {slug(spec): spec for spec, _ in COMPRESSORS}
        records.append({"kind": "cluster", "bandwidth": path.parts[-4], "model": path.parts[-3],
                        "compressor": names.get(path.parts[-2], path.parts[-2]),
                        "diverged": path.read_text().strip()})
    return records


# -- tables -----------------------------------------------------------------------------------------------


def read_lines(path: str | None) -> list[dict]:
    if path is None:
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ordered(names: set[str]) -> list[str]:
    """The compressors in COMPRESSORS's order, others after them."""
    known = [spec for spec, _ in COMPRESSORS]
    return [s for s in known if s in names] + sorted(names - set(known))


def kilobytes(value: float) -> str:
    return f"{value / 1e3:,.1f} kB" if value < 1e6 else f"{value / 1e6:,.2f} MB"


def ci_text(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    stats = median_ci(values)
    return f"{scale * stats.median:.{digits}f} [{scale * stats.low:.{digits}f}, {scale * stats.high:.{digits}f}]"


def accuracy_rows(runs: list[dict], overheads: dict) -> tuple[list[str], dict]:
    """Markdown rows of one model's accuracy/bytes table, and per compressor the numbers the goals need."""
    by_spec: dict[str, list[dict]] = {}
    for run in runs:
        by_spec.setdefault(run["compressor"], []).append(run)
    fp32 = {run["seed"]: run for run in by_spec.get(FP32, []) if run.get("diverged") is None}
    fp32_bytes = statistics.median(r["bytes_sent_per_step_mean"] for r in fp32.values()) if fp32 else None
    rows, numbers = [], {}
    for spec in ordered(set(by_spec)):
        done = sorted((r for r in by_spec[spec] if r.get("diverged") is None), key=lambda r: r["seed"])
        diverged = sorted(r["seed"] for r in by_spec[spec] if r.get("diverged") is not None)
        accuracy = [r["final_test_accuracy"] for r in done]
        deltas = [100 * (r["final_test_accuracy"] - fp32[r["seed"]]["final_test_accuracy"])
                  for r in done if r["seed"] in fp32]
        sent = statistics.median(r["bytes_sent_per_step_mean"] for r in done) if done else None
        ratio = fp32_bytes / sent if sent and fp32_bytes else None
        cost = overheads.get(spec)
        cells = [
            f"`{spec}`",
            (ci_text(accuracy, 100) + " (" + " / ".join(f"{100 * a:.1f}" for a in accuracy) + ")") if accuracy else "-",
            f"{statistics.median(deltas):+.2f}" if deltas and spec != FP32 else "-",
            kilobytes(sent) if sent is not None else "-",
            f"{ratio:.1f}x" if ratio is not None else "-",
            f"{cost['fp32_gradient_bytes'] / cost['payload_bytes']:.1f}x" if cost and cost["payload_bytes"] else "-",
            (f"{cost['ms_per_mb']['median']:.3g} [{cost['ms_per_mb']['low']:.3g}, {cost['ms_per_mb']['high']:.3g}]"
             if cost else "-"),
            f"diverged: seed {', '.join(map(str, diverged))}" if diverged else "",
        ]
        rows.append("| " + " | ".join(cells) + " |")
        numbers[spec] = {"delta": statistics.median(deltas) if deltas else None, "ratio": ratio,
                         "diverged": bool(diverged)}
    return rows, numbers


def model_order(names: set[str]) -> list[str]:
    return [m for m in MODELS if m in names] + sorted(names - set(MODELS))


def print_accuracy(runs: list[dict], overheads: dict[tuple[str, str], dict]) -> dict:
    goals: dict[str, dict] = {}
    for model in model_order({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        seeds = sorted({r["seed"] for r in mine})
        epochs = sorted({r["epochs"] for r in mine})
        params = mine[0]["num_parameters"]
        coverage = median_ci([0.0] * len(seeds)).confidence
        cost = next((o for (m, _), o in overheads.items() if m == model), None)
        cost_level = f"{100 * cost['ms_per_mb']['confidence']:.1f} % CI" if cost else "CI"
        print(f"\n**{model}** ({params:,} parameters, {4 * params / 1e6:.2f} MB of float32 gradient), "
              f"{mine[0]['workers']} workers, {'/'.join(map(str, epochs))} epochs, seeds {', '.join(map(str, seeds))}; "
              f"accuracy: median [{100 * coverage:.0f} % CI] (per seed):\n")
        print("| compressor | test accuracy % | vs fp32, points | bytes sent per step per rank | fp32 / this "
              f"| payload: 4n / bytes | compress + decompress ms per MB [{cost_level}] | |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        rows, numbers = accuracy_rows(mine, {spec: o for (m, spec), o in overheads.items() if m == model})
        print("\n".join(rows))
        goals[model] = numbers
    return goals


def time_cell(run: dict | None) -> str:
    if run is None:
        return "-"
    if run.get("time_to_target_s") is None:
        return f"not reached in {run['epochs_run']} epochs (best {100 * run['best_test_accuracy']:.1f} %)"
    reached_at = next(i for i, a in enumerate(run["test_accuracy"], 1) if a >= run["target_accuracy"])
    return f"{run['time_to_target_s']:.1f} (epoch {reached_at})"


def speedup(baseline: dict | None, run: dict | None) -> str:
    if not baseline or not run or baseline.get("time_to_target_s") is None or run.get("time_to_target_s") is None:
        return "-"
    return f"{baseline['time_to_target_s'] / run['time_to_target_s']:.2f}x"


def print_cluster(runs: list[dict]) -> dict:
    sooner: dict[str, dict] = {}
    finished = [r for r in runs if r.get("diverged") is None]
    bandwidths = sorted({r["bandwidth"] for r in finished}, key=lambda b: (len(b), b))
    for model in model_order({r["model"] for r in finished}):
        mine = {(r["bandwidth"], r["compressor"]): r for r in finished if r["model"] == model}
        first = next(iter(mine.values()))
        share = (f"compute oversubscribed {first['hosts'] / first['cores']:.1f}x" if first["hosts"] > first["cores"]
                 else "no oversubscription")
        print(f"\n**{model} on the emulated cluster**: {first['hosts']} hosts sharing {first['cores']} cores "
              f"({share}; compare within a bandwidth only), target {100 * first['target_accuracy']:.1f} % "
              f"test accuracy, at most {first['epochs_planned']} epochs, seed {first['seed']}; time to target in s "
              f"(first epoch-end evaluation at or above it), speedup = baseline time / time:\n")
        header = " | ".join(f"{b}: s to target | vs fp32 | vs fp16 | s per epoch | bytes/step" for b in bandwidths)
        print(f"| compressor | {header} |")
        print("|---|" + "---:|---:|---:|---:|---:|" * len(bandwidths))
        for spec in ordered({c for _, c in mine}):
            cells = []
            for b in bandwidths:
                run = mine.get((b, spec))
                per_epoch = (f"{statistics.median(_epoch_seconds(run)):.1f}" if run else "-")
                cells += [time_cell(run), speedup(mine.get((b, FP32)), run), speedup(mine.get((b, FP16)), run),
                          per_epoch, kilobytes(run["bytes_sent_per_step_mean"]) if run else "-"]
            print(f"| `{spec}` | " + " | ".join(cells) + " |")
        sooner[model] = {spec: _sooner(mine.get((GOAL_BANDWIDTH, FP16)), mine.get((GOAL_BANDWIDTH, spec)))
                         for _, spec in mine}
    diverged = [r for r in runs if r.get("diverged") is not None]
    for run in diverged:
        print(f"\n{run['model']} `{run['compressor']}` at {run['bandwidth']}: diverged ({run['diverged']})")
    return sooner


def _epoch_seconds(run: dict) -> list[float]:
    """Wall seconds of each epoch (training and evaluation)."""
    ends = run["epoch_wall_s"]
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]


def _sooner(fp16: dict | None, run: dict | None) -> bool | None:
    if not fp16 or not run:
        return None
    if run["time_to_target_s"] is None:
        return False
    return fp16["time_to_target_s"] is None or run["time_to_target_s"] < fp16["time_to_target_s"]


def print_goals(accuracy: dict, sooner: dict) -> None:
    print(f"\nGoals (issue): lose at most {GOAL_MAX_LOSS_POINTS} points of accuracy against fp32, send at least "
          f"{GOAL_MIN_BYTE_RATIO:.0f}x fewer bytes per step, reach the target sooner than fp16 at {GOAL_BANDWIDTH}:\n")
    print("| model | compressor | accuracy (vs fp32, points) | bytes (fp32 / this) | sooner than fp16 |")
    print("|---|---|---|---|---|")
    for model in model_order(set(accuracy) | set(sooner)):
        for spec in GOAL_ROWS:
            numbers = accuracy.get(model, {}).get(spec)
            delta, ratio = (numbers or {}).get("delta"), (numbers or {}).get("ratio")
            loss = "-" if delta is None else f"{'met' if delta >= -GOAL_MAX_LOSS_POINTS else 'missed'} ({delta:+.2f})"
            size = "-" if ratio is None else f"{'met' if ratio >= GOAL_MIN_BYTE_RATIO else 'missed'} ({ratio:.1f}x)"
            early = sooner.get(model, {}).get(spec)
            early_text = "-" if early is None else ("met" if early else "missed")
            print(f"| {model} | `{spec}` | {loss} | {size} | {early_text} |")


def print_header(sessions: list[dict], cluster: list[dict]) -> None:
    for session in sessions:
        env = session["environment"]
        print(f"- {session['measurement']}: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
              f"git {str(env.get('git_sha'))[:7]}; command: `{' '.join(session['argv'])}`")
    networks = sorted({r["network"] for r in cluster if r.get("network")})
    for network in networks:
        print(f"- cluster: {network}")


def print_settings(measured: set[str]) -> None:
    """The compressor settings measured, each with the reason for it (bench_compression.COMPRESSORS)."""
    reasons = dict(COMPRESSORS)
    print("\n| compressor | setting chosen because |")
    print("|---|---|")
    for spec in ordered(measured):
        print(f"| `{spec}` | {reasons.get(spec, 'given on the command line')} |")


def tables(args: argparse.Namespace) -> None:
    accuracy_lines, overhead_lines, cluster = (read_lines(args.accuracy), read_lines(args.overhead),
                                               read_lines(args.cluster))
    sessions = [x for x in accuracy_lines + overhead_lines if x["kind"] == "session"]
    runs = [x for x in accuracy_lines if x["kind"] == "accuracy"]
    overheads = {(x["model"], x["compressor"]): x for x in overhead_lines if x["kind"] == "overhead"}
    print_header(sessions, cluster)
    print_settings({x["compressor"] for x in runs + list(overheads.values()) + cluster})
    goals = print_accuracy(runs, overheads) if runs else {}
    if overheads:
        print_overhead(overheads)
    sooner = print_cluster(cluster) if cluster else {}
    print_goals(goals, sooner)


def print_overhead(overheads: dict) -> None:
    first = next(iter(overheads.values()))
    print(f"\nCompression overhead: one process, 1 thread, one rank's real gradient (32 samples) at initialization, "
          f"all parameters; median [{100 * first['ms_per_mb']['confidence']:.1f} % CI] of {first['repeats']} "
          f"repetitions after {first['warmup']} warm-up:\n")
    print("| model | compressor | payload: 4n / bytes | compress ms | decompress ms | ms per MB [CI] |")
    print("|---|---|---:|---:|---:|---:|")
    for (model, spec), cost in overheads.items():
        ms = cost["ms_per_mb"]
        print(f"| {model} | `{spec}` | {cost['fp32_gradient_bytes'] / cost['payload_bytes']:.1f}x | "
              f"{cost['compress_ms']['median']:.3g} | {cost['decompress_ms']['median']:.3g} | "
              f"{ms['median']:.3g} [{ms['low']:.3g}, {ms['high']:.3g}] |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gather = commands.add_parser("collect", help="cluster run directories -> JSON lines on stdout")
    gather.add_argument("directory", type=Path)
    table = commands.add_parser("tables", help="markdown tables from the JSON lines files")
    table.add_argument("--accuracy")
    table.add_argument("--overhead")
    table.add_argument("--cluster")
    args = parser.parse_args()
    if args.command == "collect":
        for record in collect(args.directory):
            print(json.dumps(record))
    else:
        tables(args)


if __name__ == "__main__":
    main()
