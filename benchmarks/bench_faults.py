"""Recovery from a lost worker, and backup workers against a straggler (issue 13).

Recovery: LeNet-5 on digits, 4 workers (allreduce), batch 48, 3 epochs (90 steps), a worker lost at step 40
(`--fault kill:rank=2,step=40` or `hang:...`), `--max-restarts 1`, checkpoints every N steps, timeout_s 10.
Each figure is the median of `--repeats` runs (result.json's `faults.failures[0]`): detection (fault to the
launcher's notice), restart (notice to the first step of the new attempt), recovery (notice to being back
at the failed step) and the steps redone.

Backup workers: LeNet-5 on mnist5k, `ps` with 4 workers and one server, rank 3 three times slower
(`--fault slow:rank=3,factor=3`), b in {0, 1}; samples/s of the last epoch and the time to 90 % test
accuracy, medians over seeds.

    python benchmarks/bench_faults.py recovery [--repeats 3]
    python benchmarks/bench_faults.py backup [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from polytrain.config import Experiment
from polytrain.train import train, train_sequence

RECOVERY = Experiment(model="lenet5", dataset="digits", workers=4, epochs=3, batch_size=48, lr=0.05, timeout_s=10.0,
                      max_restarts=1)
CASES = {
    "kill, restart with 4, checkpoint every 5": dict(faults=[{"kind": "kill", "rank": 2, "step": 40}], checkpoint_steps=5),
    "kill, restart with 4, checkpoint every 20": dict(faults=[{"kind": "kill", "rank": 2, "step": 40}],
                                                      checkpoint_steps=20),
    "kill + corrupt newest, keep 2, every 5": dict(faults=[{"kind": "kill", "rank": 2, "step": 40},
                                                           {"kind": "corrupt-checkpoint"}], checkpoint_steps=5,
                                                   keep_checkpoints=2),
    "hang, continue with 3 (elastic), every 5": dict(faults=[{"kind": "hang", "rank": 1, "step": 40}],
                                                     checkpoint_steps=5, elastic=True),
}


def recovery(args: argparse.Namespace) -> None:
    print("| case | detection s | restart s | recovery s | steps redone | total wall s | clean wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        clean = [train(RECOVERY.replace(max_restarts=0, out=f"{root}/clean{i}")).wall_s for i in range(args.repeats)]
        for case, (name, changes) in enumerate(CASES.items()):
            rows = []
            for i in range(args.repeats):
                result = train(RECOVERY.replace(**changes, out=str(Path(root) / f"case{case}-{i}")))
                rows.append({**result.faults["failures"][0], "total": result.faults["total_wall_s"]})
            med = {key: statistics.median(r[key] for r in rows)
                   for key in ("detection_s", "restart_s", "recovery_s", "steps_redone", "total")}
            print(f"| {name} | {med['detection_s']:.2f} | {med['restart_s']:.2f} | {med['recovery_s']:.2f} | "
                  f"{med['steps_redone']:.0f} | {med['total']:.1f} | {statistics.median(clean):.1f} |", flush=True)


def backup(args: argparse.Namespace) -> None:
    base = Experiment(model="lenet5", dataset="mnist5k", workers=4, epochs=6, batch_size=128, strategy="ps",
                      target=0.9, faults=[{"kind": "slow", "rank": 3, "factor": 3}])
    runs = [base.replace(strategy_args={"servers": 1, "backup": b}, seed=seed)
            for seed in range(args.seeds) for b in (0, 1)]
    results = train_sequence(runs)
    print("| backup workers b | samples/s (last epoch) | time to 90 % s | final accuracy % | dropped gradients |")
    print("|---:|---:|---:|---:|---:|")
    for b in (0, 1):
        mine = [r for r in results if r.config["strategy_args"]["backup"] == b]
        reached = [r.time_to_target_s for r in mine if r.time_to_target_s is not None]
        to_target = f"{statistics.median(reached):.1f}" if len(reached) == len(mine) else "not all reached"
        print(f"| {b} | {statistics.median(r.epochs[-1]['samples_per_s'] for r in mine):.0f} | {to_target} | "
              f"{100 * statistics.median(r.final_test_accuracy for r in mine):.1f} | "
              f"{statistics.median(r.comm.get('backup', {}).get('dropped_gradients', 0) for r in mine):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("recovery").add_argument("--repeats", type=int, default=3)
    commands.add_parser("backup").add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    {"recovery": recovery, "backup": backup}[args.command](args)


if __name__ == "__main__":
    main()
