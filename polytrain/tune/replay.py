"""A fast offline test bed: learning curves recorded from real polytrain runs, replayed by a tabular
simulator, so that schedulers and samplers can be run and compared in seconds (as Syne Tune's blackbox
simulator does) with simulated wall time and `parallel` simulated workers.

A table is JSON: the search space (choices: the recorded grid), the command that made it, and per
configuration its curve, one row per epoch with the test metric, the cumulative training wall time and bytes.
A job "trains" a trial to a level of the resource: the first recorded epoch at or past it gives the score, and
the recorded time between where the trial stood and that epoch is what the job takes.

    python -m polytrain.tune.replay record TUNE_DIR TABLE.json   # from a `polytrain tune` grid study
"""

from __future__ import annotations

import heapq
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from polytrain.config import ConfigError
from polytrain.tune.schedulers import Job, Scheduler
from polytrain.tune.space import SearchSpace

CURVES = Path(__file__).parent / "curves"


@dataclass(frozen=True)
class CurveTable:
    space_table: dict
    curves: dict[str, list[dict]]  # key(params) -> per-epoch rows
    made_by: str = ""

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.parse(self.space_table)

    @classmethod
    def load(cls, path: str | Path) -> "CurveTable":
        data = json.loads(Path(path).read_text())
        return cls(data["space"], {key(c["params"]): c["curve"] for c in data["configs"]}, data.get("made_by", ""))

    def curve(self, params: dict) -> list[dict]:
        found = self.curves.get(key(params))
        if found is None:
            raise ConfigError(f"the curve table has no configuration {params}; a replayed search samples the "
                              f"table's own space")
        return found


def key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(params)})


def record(study_dir: str | Path, metric: str = "test_accuracy") -> dict:
    """The curve table of a finished `polytrain tune` study (every trial's metrics.jsonl)."""
    study_dir = Path(study_dir)
    summary = json.loads((study_dir / "tune.json").read_text())
    configs = []
    for trial in summary["trials"]:
        rows = [json.loads(line) for line in (study_dir / trial["directory"] / "metrics.jsonl").read_text().splitlines()]
        configs.append({"params": trial["params"], "seed": trial["seed"], "curve": [
            {"epoch": r["epoch"], "score": r[f"test_{metric.removeprefix('test_')}"], "wall_s": r["wall_s"],
             "bytes_sent": r.get("bytes_sent", 0)} for r in rows]})
    import tomllib

    config = tomllib.loads((study_dir / "trials" / "0000" / "config.toml").read_text())
    keys = list(configs[0]["params"])
    spec_space = {k: {"choice": sorted({c["params"][k] for c in configs}, key=lambda v: (str(type(v)), v))}
                  for k in keys}
    return {"made_by": f"polytrain tune grid study {study_dir.name}, model {config.get('model')} on "
                       f"{config.get('dataset')}, {config.get('epochs')} epochs", "metric": metric,
            "space": spec_space, "configs": configs}


@dataclass
class Simulation:
    """A replayed search: every job with its simulated start and end, the cost (all jobs' recorded training
    time, stopped trials' included), and the incumbent over simulated time."""

    jobs: list[dict] = field(default_factory=list)
    cost_s: float = 0.0
    wall_s: float = 0.0
    incumbent: list[tuple[float, float]] = field(default_factory=list)  # (simulated time, best full-budget score)

    @property
    def best(self) -> float:
        return self.incumbent[-1][1] if self.incumbent else -math.inf


def simulate(scheduler: Scheduler, table: CurveTable, parallel: int = 1, resource: str = "epochs",
             maximum: float | None = None) -> Simulation:
    """Runs `scheduler` against `table` with `parallel` simulated workers; a trial's score counts for the
    incumbent once it has trained `maximum` of the resource (default: its whole curve)."""
    clock, sequence, events = 0.0, 0, []
    position: dict[int, int] = {}  # epochs each trial has trained
    sim = Simulation()
    done = False
    while True:
        while not done and len(events) < parallel:
            job = scheduler.ask()
            if job is None:
                done = True
            if not isinstance(job, Job):
                break
            if job.source is not None:
                raise ConfigError("a replayed search cannot exploit another trial's weights (pbt): the table "
                                  "holds one curve per configuration")
            curve = table.curve(job.params)
            start = position.get(job.trial, 0)
            end = _epoch_reaching(curve, resource, job.level)
            took = curve[end - 1]["wall_s"] - (curve[start - 1]["wall_s"] if start else 0.0)
            position[job.trial] = max(start, end)
            sim.cost_s += max(0.0, took)
            sequence += 1
            heapq.heappush(events, (clock + max(0.0, took), sequence, job, curve[end - 1]["score"], end))
        if not events:
            if not done:
                raise RuntimeError("the scheduler waits with no job in flight")
            break
        clock, _, job, score, end = heapq.heappop(events)
        scheduler.tell(job, score)
        sim.jobs.append({"trial": job.trial, "level": job.level, "epoch": end, "score": score, "end_s": clock})
        curve = table.curve(job.params)
        reached = end >= len(curve) if maximum is None else _measure(curve[end - 1], resource) >= maximum * (1 - 1e-9)
        if reached and score > sim.best:
            sim.incumbent.append((clock, score))
    sim.wall_s = clock
    return sim


def _measure(row: dict, resource: str) -> float:
    return row["epoch"] if resource == "epochs" else row[resource]


def _epoch_reaching(curve: list[dict], resource: str, level: float) -> int:
    for row in curve:
        if _measure(row, resource) >= level * (1 - 1e-9):
            return row["epoch"]
    return curve[-1]["epoch"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "record":
        print("usage: python -m polytrain.tune.replay record TUNE_DIR TABLE.json", file=sys.stderr)
        return 2
    table = record(argv[1])
    Path(argv[2]).write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table['configs'])} curves -> {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
