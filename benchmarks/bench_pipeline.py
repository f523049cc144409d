"""Pipelines measured: the bubble against (p-1)/(vm+p-1), the activation memory each schedule holds, and
samples/s against torch.distributed.pipelining's GPipe and 1F1B on the same partition.

The model is the zoo's MLP with eight hidden layers of 1024 (`model_args hidden=[1024]*8`; nine linear
layers of nearly equal cost, so the cost model's cut balances p = 2 and p = 4 within 4 %) on mnist5k
(4000 training samples), microbatches of 32 samples (the batch is 32 m: every microbatch costs the same
whatever m), momentum SGD, one epoch per run, `threads=1` per rank. Per run, result.json's `pipeline`
section gives the measured bubble (per step, 1 - the stages' busy seconds / the sum of each stage's own
span from its start to its end, the median over the steps after the first) and per stage the
most microbatches in flight and the most activation bytes saved for backward. The simulated bubble runs
the schedule's action lists with forward 1 and backward 2 per stage (polytrain.schedules.pipeline.simulate).

Comparison with torch: `torch.distributed.pipelining` (PipelineStage + ScheduleGPipe / Schedule1F1B) on the
same stages (polytrain's cut), the same data and batches and the same optimizer, one epoch, samples/s over
the steps after the first two; polytrain's rate is taken the same way from the wall time of its run's
steps (`pipeline.step_s`). Each repeat runs polytrain and torch in turn (interleaved), and the table gives
the median ratio over repeats with its 95 % CI.

This machine has 2 cores: p = 2 ranks get one core each; p = 4 ranks share 2 cores, so whenever more than
two stages compute at once each runs at about half speed, which hides part of the bubble (the measured
bubble of p = 4 reads low; the table says so).

Usage:

    python benchmarks/bench_pipeline.py [--repeats 3] [--stages 2 4] [--microbatches 1 2 4 8 16]
        [--torch-repeats 5] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from polytrain.bench.stats import median_ci
from polytrain.config import Experiment
from polytrain.launch import run_workers
from polytrain.schedules import STEP_SCHEDULES
from polytrain.schedules.pipeline import simulate
from polytrain.train import train_sequence

MICROBATCH = 32
HIDDEN = [1024] * 8
BASE = Experiment(model="mlp", model_args={"hidden": HIDDEN}, dataset="mnist5k", epochs=1, optimizer="momentum",
                  lr=0.01, schedule="constant", augment_shift=0, threads=1)


def experiment(schedule: str, stages: int, microbatches: int, out: str) -> Experiment:
    return BASE.replace(workers=stages, mesh={"pp": stages}, step_schedule=schedule, microbatches=microbatches,
                        batch_size=MICROBATCH * microbatches, out=out)


def schedules_for(stages: int, microbatches: int) -> list[str]:
    return ["gpipe", "1f1b"] + (["interleaved"] if microbatches % stages == 0 and microbatches >= stages else [])


def bubble_and_memory(stages_list, microbatches_list, repeats):
    rows = {}
    for stages in stages_list:
        configs = [(name, m) for m in microbatches_list for name in schedules_for(stages, m)]
        for repeat in range(repeats):
            order = configs[repeat % len(configs):] + configs[:repeat % len(configs)]  # rotate the slow phases
            with tempfile.TemporaryDirectory() as directory:
                results = train_sequence([experiment(name, stages, m, f"{directory}/{i}")
                                          for i, (name, m) in enumerate(order)])
            for (name, m), result in zip(order, results):
                pipeline = result.comm["pipeline"]
                row = rows.setdefault((stages, name, m), {"bubble": [], "pipeline": pipeline})
                row["bubble"].append(pipeline["bubble_measured"])
    table = []
    for (stages, name, m), row in sorted(rows.items()):
        chunks = 2 if name == "interleaved" else 1
        pipeline = row["pipeline"]
        mid, low, high, _ = median_ci(row["bubble"])
        table.append({"stages": stages, "schedule": name, "microbatches": m, "virtual_stages": chunks * stages,
                      "bubble_formula": pipeline["bubble_formula"],
                      "bubble_simulated": simulate(STEP_SCHEDULES.get(name)(), m, stages, chunks)["bubble"],
                      "bubble_measured": mid, "bubble_ci": [low, high], "runs": len(row["bubble"]),
                      "peak_in_flight": [s["peak_in_flight"] for s in pipeline["per_stage"]],
                      "peak_activation_kib": [s["peak_activation_bytes"] / 1024 for s in pipeline["per_stage"]],
                      "cuts": pipeline["cuts"]})
    return table


def torch_pipeline_rank(comm, schedule_name: str, cuts: list[int], microbatches: int, warmup_steps: int):
    """One rank of torch.distributed.pipelining on polytrain's stage `comm.rank` of the cut: samples/s over
    one epoch after `warmup_steps` steps."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from polytrain.data import load_dataset
    from polytrain.models import build_model

    data = load_dataset(BASE.dataset)
    torch.manual_seed(0)
    model = build_model(BASE.model, data.num_classes, data.in_shape, **BASE.model_args)
    stage_module = model[cuts[comm.rank]:cuts[comm.rank + 1]]
    stage = PipelineStage(stage_module, comm.rank, comm.world_size, torch.device("cpu"), group=comm.group)
    loss = torch.nn.CrossEntropyLoss()
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = kind(stage, microbatches, loss_fn=loss)
    optimizer = torch.optim.SGD(stage_module.parameters(), lr=BASE.lr, momentum=0.9)
    batch = MICROBATCH * microbatches
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    steps = len(order) // batch
    started = None
    for step in range(steps):
        if step == warmup_steps:
            started = time.monotonic()
        indices = order[step * batch:(step + 1) * batch]
        x, y = data.x_train[indices], data.y_train[indices]
        optimizer.zero_grad()
        if comm.rank == 0:
            schedule.step(x)
        elif comm.rank == comm.world_size - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()
    return (steps - warmup_steps) * batch / (time.monotonic() - started)


def polytrain_rate(result, microbatches: int, warmup_steps: int) -> float:
    """Samples/s of a pipelined run over its steps after the first `warmup_steps` (from the step spans)."""
    steps = result.comm["pipeline"]["step_s"][warmup_steps:]
    return len(steps) * MICROBATCH * microbatches / sum(steps)


def against_torch(stages: int, microbatches: int, repeats: int, warmup_steps: int = 2):
    rows = {}
    for repeat in range(repeats):
        for name in ("gpipe", "1f1b"):
            with tempfile.TemporaryDirectory() as directory:
                [result] = train_sequence([experiment(name, stages, microbatches, f"{directory}/run")])
            cuts = result.comm["pipeline"]["cuts"]
            ours = polytrain_rate(result, microbatches, warmup_steps)
            theirs = run_workers(torch_pipeline_rank, stages, (name, cuts, microbatches, warmup_steps), threads=1)[-1]
            row = rows.setdefault(name, {"polytrain": [], "torch": [], "ratio": []})
            row["polytrain"].append(ours)
            row["torch"].append(theirs)
            row["ratio"].append(ours / theirs)
    return [{"schedule": name, "stages": stages, "microbatches": microbatches,
             "polytrain_samples_per_s": statistics.median(row["polytrain"]),
             "torch_samples_per_s": statistics.median(row["torch"]),
             "ratio_median_ci": list(median_ci(row["ratio"])), "repeats": repeats} for name, row in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--torch-repeats", type=int, default=5)
    parser.add_argument("--torch-microbatches", type=int, default=8)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    bubbles = bubble_and_memory(args.stages, args.microbatches, args.repeats)
    print("| p | schedule | m | bubble (p-1)/(vm+p-1) | simulated | measured median [95% CI] | in flight per stage "
          "| activation KiB per stage |")
    print("|---|---|---|---|---|---|---|---|")
    for row in bubbles:
        low, high = row["bubble_ci"]
        print(f"| {row['stages']} | {row['schedule']} | {row['microbatches']} | {row['bubble_formula']:.3f} | "
              f"{row['bubble_simulated']:.3f} | {row['bubble_measured']:.3f} [{low:.3f}, {high:.3f}] | "
              f"{row['peak_in_flight']} | {[round(k) for k in row['peak_activation_kib']]} |")
    comparison = against_torch(2, args.torch_microbatches, args.torch_repeats) if args.torch_repeats else []
    if comparison:
        print("\n| schedule | p | m | polytrain samples/s | torch.distributed.pipelining samples/s | ratio [95% CI] |")
        print("|---|---|---|---|---|---|")
        for row in comparison:
            mid, low, high, _ = row["ratio_median_ci"]
            print(f"| {row['schedule']} | {row['stages']} | {row['microbatches']} | "
                  f"{row['polytrain_samples_per_s']:.0f} | {row['torch_samples_per_s']:.0f} | "
                  f"{mid:.3f} [{low:.3f}, {high:.3f}] |")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"bubbles": bubbles, "torch": comparison}, handle, indent=1)


if __name__ == "__main__":
    main()
