"""Search strategies under the same budget on the replay test bed (polytrain.tune.replay): random search (the
baseline), TPE, successive halving, ASHA, Hyperband and TPE with ASHA, each over many search seeds, on learning
curves recorded from real polytrain runs. Every search gets the same simulated training time (`--budget-runs`
times the median full run of the table, all of its jobs counted, stopped trials too) on `--parallel` simulated workers; the result of a search is the best
full-budget test accuracy it found (an incumbent that trained only a rung's epochs does not count). Reported:
median and order-statistic 95 % CI over the search seeds, the share of seeds that found the table's best
configuration, and the median simulated wall time to the final incumbent.

    python benchmarks/bench_search.py --seeds 25 --budget-runs 6 --parallel 2
"""

from __future__ import annotations

import argparse
import statistics

from polytrain.bench.stats import median_ci
from polytrain.tune import derive_seed
from polytrain.tune.replay import CURVES, CurveTable, simulate
from polytrain.tune.samplers import build_sampler
from polytrain.tune.schedulers import WAIT, Job, Trials, build_scheduler

STRATEGIES = {  # name: (sampler, scheduler, scheduler args)
    "random (fifo)": ("random", "fifo", {}),
    "tpe (fifo)": ("tpe", "fifo", {}),
    "successive halving": ("random", "sh", {"min": 1, "eta": 3}),
    "asha": ("random", "asha", {"min": 1, "eta": 3}),
    "hyperband": ("random", "hyperband", {"min": 1, "eta": 3}),
    "tpe + asha": ("tpe", "asha", {"min": 1, "eta": 3}),
}


class Budgeted:
    """Stops handing out new jobs once the jobs handed out would have cost `budget_s` of training."""

    def __init__(self, scheduler, table: CurveTable, budget_s: float) -> None:
        self.scheduler, self.table, self.budget_s = scheduler, table, budget_s
        self.spent, self.outstanding = 0.0, 0
        self.position: dict[int, int] = {}

    def ask(self):
        if self.spent >= self.budget_s:
            return WAIT if self.outstanding else None
        job = self.scheduler.ask()
        if isinstance(job, Job):
            curve = self.table.curve(job.params)
            start, end = self.position.get(job.trial, 0), int(round(job.level))
            self.spent += curve[end - 1]["wall_s"] - (curve[start - 1]["wall_s"] if start else 0.0)
            self.position[job.trial] = max(start, end)
            self.outstanding += 1
        return job

    def tell(self, job, score):
        self.outstanding -= 1
        self.scheduler.tell(job, score)


def search(table: CurveTable, sampler: str, scheduler: str, args: dict, seed: int, budget_s: float,
           parallel: int, epochs: int):
    seed_of = lambda n: derive_seed(seed, n)  # noqa: E731
    chosen = build_sampler(sampler, table.space, seed_of, lag=parallel - 1, grid_points=3,
                           args={"startup": 5} if sampler == "tpe" else {})
    limit = 9 if scheduler == "sh" else None  # successive halving needs its first rung's size
    inner = build_scheduler(scheduler, args, Trials(chosen, limit), table.space, epochs, seed)
    return simulate(Budgeted(inner, table, budget_s), table, parallel=parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(CURVES / "digits_mlp.json"))
    parser.add_argument("--seeds", type=int, default=25)
    parser.add_argument("--budget-runs", type=float, default=6.0)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    table = CurveTable.load(args.table)
    epochs = max(len(c) for c in table.curves.values())
    optimum = max(c[-1]["score"] for c in table.curves.values())
    full_run = statistics.median(c[-1]["wall_s"] for c in table.curves.values())
    budget_s = args.budget_runs * full_run
    print(f"table: {len(table.curves)} configurations x {epochs} epochs ({table.made_by}); best final test accuracy "
          f"{100 * optimum:.2f} %; median full run {full_run:.1f} s; budget {args.budget_runs:g} full runs "
          f"({budget_s:.2f} s) of training per search on {args.parallel} workers, {args.seeds} search seeds\n")
    print("| search | best full-budget test accuracy, median [95 % CI] | found the best | trials started "
          "(median) | simulated wall to final incumbent (median) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (sampler, scheduler, scheduler_args) in STRATEGIES.items():
        results = [search(table, sampler, scheduler, scheduler_args, seed, budget_s, args.parallel, epochs)
                   for seed in range(args.seeds)]
        best = [100 * r.best if r.incumbent else 0.0 for r in results]
        interval = median_ci(best)
        found = sum(abs(r.best - optimum) < 1e-12 for r in results)
        started = statistics.median(len({j["trial"] for j in r.jobs}) for r in results)
        wall = statistics.median(r.incumbent[-1][0] for r in results if r.incumbent)
        print(f"| {name} | {interval.median:.2f} [{interval.low:.2f}, {interval.high:.2f}] | {found}/{len(results)} | "
              f"{started:g} | {wall:.2f} s |")


if __name__ == "__main__":
    main()
