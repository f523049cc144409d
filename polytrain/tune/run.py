"""`polytrain tune`: hyper-parameter search whose trials are polytrain runs (multi-worker where the base says so).

A study is base settings (as `polytrain train --config` reads them), a search space, a sampler, one or more
objectives and a seed. Trial n's hyper-parameters and seed depend only on (study seed, n), so a study
replays to the same trials whatever order they finish in, and a killed study resumes: finished trials are
kept, running ones run again. Trials run `parallel` at a time, each its own `polytrain train` process with
the cores divided among every rank of every trial running (`threads`); the ranks of one trial share its
hyper-parameters because they are one run's settings. The result never is the best of N: the total cost of
the search (every trial, failed ones too) is reported, and the winner is re-run on fresh seeds beside the
single-worker baseline through `polytrain compare`, summarised with a CI.

Samplers: `random` (each trial from its own seeded generator) and `grid` (every combination, in order).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from polytrain.config import ConfigError, Experiment, apply_overrides
from polytrain.tune.space import SearchSpace
from polytrain.tune.study import Study, TrialRow

SAMPLERS = ("random", "grid")
# Objectives read from result.json, and the direction each is optimised in unless "max:" / "min:" says.
OBJECTIVES: dict[str, tuple[Callable[[dict], float | None], str]] = {
    "final_test_accuracy": (lambda r: r["final_test_accuracy"], "max"),
    "best_test_accuracy": (lambda r: r["best_test_accuracy"], "max"),
    "final_test_metric": (lambda r: r["final_test_metric"], "max"),
    "time_to_target_s": (lambda r: r["time_to_target_s"], "min"),
    "wall_s": (lambda r: r["wall_s"], "min"),
    "samples_per_s": (lambda r: r["samples_per_s"], "max"),
    "bytes_sent_per_step": (lambda r: r["comm"].get("bytes_sent_per_step"), "min"),
}
CONFIRM_SEED_BASE = 1_000_000  # fresh seeds for the winner's re-runs, disjoint from every trial's


def derive_seed(study_seed: int, number: int) -> int:
    """A trial's seed from (study seed, trial number) alone: a 31-bit hash, the same on every machine."""
    digest = hashlib.sha256(f"polytrain-tune:{study_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # max or min

    @classmethod
    def parse(cls, text: str) -> "Objective":
        direction, _, name = text.rpartition(":")
        if name not in OBJECTIVES:
            raise ConfigError(f"unknown objective '{name}'; expected one of {', '.join(OBJECTIVES)} "
                              f"(optionally max:NAME or min:NAME)")
        if direction not in ("", "max", "min"):
            raise ConfigError(f"objective {text!r}: the direction is max or min")
        return cls(name, direction or OBJECTIVES[name][1])

    def value(self, result: dict | None) -> float:
        """The trial's value; a failed trial, or one that never reached the target, is the worst possible."""
        value = OBJECTIVES[self.name][0](result) if result is not None else None
        if value is None:
            return -math.inf if self.direction == "max" else math.inf
        return float(value)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "max" else a < b


@dataclass(frozen=True)
class TuneSpec:
    """What a study is: stored with it, so that reopening it with other settings is refused."""

    base: dict
    space: SearchSpace
    space_table: dict
    sampler: str = "random"
    trials: int | None = None
    grid_points: int = 3
    objectives: tuple[Objective, ...] = (Objective("final_test_accuracy", "max"),)
    seed: int = 0
    parallel: int = 1
    confirm_seeds: int = 3

    @classmethod
    def parse(cls, base: dict, table: dict) -> "TuneSpec":
        known = {"space", "sampler", "trials", "grid_points", "objective", "seed", "parallel", "confirm_seeds"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"[tune] has no setting {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        space = SearchSpace.parse(table.get("space", {}))
        space.check(apply_overrides(Experiment(), base))
        sampler = table.get("sampler", "random")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{sampler}'; expected one of {', '.join(SAMPLERS)}")
        objective = table.get("objective", "final_test_accuracy")
        objectives = tuple(Objective.parse(o) for o in (objective if isinstance(objective, list) else [objective]))
        whole = {key: table.get(key, default) for key, default in
                 (("trials", None), ("grid_points", 3), ("seed", 0), ("parallel", 1), ("confirm_seeds", 3))}
        minimum = {"trials": 1, "grid_points": 2, "seed": 0, "parallel": 1, "confirm_seeds": 0}
        for key, value in whole.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum[key]):
                raise ConfigError(f"[tune] {key} must be a whole number >= {minimum[key]}; got {value!r}")
        if sampler == "random" and whole["trials"] is None:
            raise ConfigError("sampler random needs a number of trials ([tune] trials = N or --trials N)")
        return cls(dict(base), space, dict(table.get("space", {})), sampler, whole["trials"], whole["grid_points"],
                   objectives, whole["seed"], whole["parallel"], whole["confirm_seeds"])

    def stored(self) -> dict:
        """The part of the spec that defines the trials (parallel and confirm_seeds may change on resume)."""
        return {"base": self.base, "space": self.space_table, "sampler": self.sampler, "trials": self.trials,
                "grid_points": self.grid_points, "seed": self.seed,
                "objectives": [f"{o.direction}:{o.name}" for o in self.objectives]}

    def planned(self) -> list[dict]:
        """Every trial's hyper-parameters, by number (independent of the order trials run or finish in)."""
        if self.sampler == "grid":
            grid = self.space.grid(self.grid_points)
            return grid[:self.trials] if self.trials is not None else grid
        return [self.space.sample(random.Random(derive_seed(self.seed, n))) for n in range(self.trials)]


@dataclass
class TuneSummary:
    rows: list[TrialRow]
    objectives: tuple[Objective, ...]
    best: list[TrialRow]  # the winner, or the Pareto front for several objectives
    total_seconds: float
    confirmation: object | None = None  # the compare Summary of the winner's re-runs


def pareto_front(rows: list[TrialRow], objectives: tuple[Objective, ...]) -> list[TrialRow]:
    """The complete trials no other complete trial dominates (at least as good in every objective, better in one)."""
    done = [r for r in rows if r.state == "complete"]

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        pairs = list(zip(objectives, a.values, b.values))
        return (all(not o.better(y, x) for o, x, y in pairs) and any(o.better(x, y) for o, x, y in pairs))

    return [r for r in done if not any(dominates(other, r) for other in done if other is not r)]


def tune(spec: TuneSpec, root: str | Path, storage: str | None = None, name: str = "study",
         run_timeout_s: float = 3600.0, stream: TextIO | None = None) -> TuneSummary:
    """Runs (or resumes) the study in `root` and returns its summary; writes tune.json there."""
    from polytrain.bench.compare import train_in_directory
    from polytrain.train.defaults import resolve, run_ranks
    from polytrain.train.io import atomic_write_json

    root, stream = Path(root), stream or sys.stdout
    study = Study(storage or f"sqlite:///{(root / 'study.db').resolve()}", name, spec.stored())
    try:
        requeued = study.requeue_running()
        if requeued:
            print(f"{requeued} trial(s) of a killed study run again", file=stream)
        known = {row.number for row in study.rows()}
        for number, params in enumerate(spec.planned()):
            if number not in known:
                study.add(number, params, derive_seed(spec.seed, number), f"trials/{number:04d}")  # below root
        waiting = [row for row in study.rows() if row.state == "waiting"]
        ranks = run_ranks(resolve(apply_overrides(Experiment(), spec.base)))
        threads = max(1, (os.cpu_count() or 1) // (ranks * min(spec.parallel, max(1, len(waiting)))))
        total = len(study.rows())

        def run(row: TrialRow) -> None:
            directory = root / row.directory
            exp = apply_overrides(Experiment(), {**spec.base, **row.params, "seed": row.seed, "out": str(directory),
                                                 "threads": spec.base.get("threads", threads)})
            study.mark(row.number, "running")
            result = train_in_directory(exp, run_timeout_s=run_timeout_s)
            values = [o.value(result) for o in spec.objectives]
            seconds = result["wall_s"] if result is not None else _failed_seconds(directory)
            study.mark(row.number, "complete" if result is not None else "failed", values, seconds)
            shown = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(spec.objectives, values))
            print(f"[trial {row.number + 1}/{total}] {_params_text(row.params)}: "
                  f"{shown if result is not None else f'FAILED, see {directory}/log.txt'}",
                  file=stream, flush=True)

        with ThreadPoolExecutor(max_workers=spec.parallel) as pool:
            for finished in [pool.submit(run, row) for row in waiting]:
                finished.result()
        rows = study.rows()
    finally:
        study.close()
    best = _best(rows, spec.objectives)
    summary = TuneSummary(rows, spec.objectives, best, sum(r.seconds or 0.0 for r in rows))
    if spec.confirm_seeds and len(best) == 1:
        summary.confirmation = _confirm(spec, best[0], root / "confirm", run_timeout_s, stream)
    atomic_write_json(root / "tune.json", _summary_json(summary))
    return summary


def _failed_seconds(directory: Path) -> float:
    import json

    path = directory / "failed.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else 0.0


def _best(rows: list[TrialRow], objectives: tuple[Objective, ...]) -> list[TrialRow]:
    done = [r for r in rows if r.state == "complete" and all(math.isfinite(v) for v in r.values)]
    if not done:
        return []
    if len(objectives) > 1:
        return pareto_front(done, objectives)
    objective = objectives[0]
    ordered = sorted(done, key=lambda r: (-r.values[0] if objective.direction == "max" else r.values[0], r.number))
    return ordered[:1]


def _confirm(spec: TuneSpec, winner: TrialRow, root: Path, run_timeout_s: float, stream: TextIO):
    """The winner on fresh seeds beside the single-worker baseline: a `compare` of two cells."""
    from polytrain.bench.compare import Cell, Matrix, baseline_cell, check_matrix, compare

    seeds = [CONFIRM_SEED_BASE + i for i in range(spec.confirm_seeds)]
    matrix = Matrix(spec.base, [baseline_cell(), Cell(f"winner (trial {winner.number}): "
                                                      f"{_params_text(winner.params)}", dict(winner.params))], seeds)
    check_matrix(matrix)
    print(f"re-running the winner on {len(seeds)} fresh seeds beside one worker (in {root})", file=stream)
    return compare(matrix, root, run_timeout_s=run_timeout_s, stream=stream)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _summary_json(summary: TuneSummary) -> dict:
    confirmed = None
    if summary.confirmation is not None:
        winner = next(c for c in summary.confirmation.cells.values() if not c.cell.baseline)
        confirmed = {k: v.to_dict() if v else None for k, v in winner.stats.items()}
    return {"objectives": [f"{o.direction}:{o.name}" for o in summary.objectives],
            "trials": [{"number": r.number, "state": r.state, "params": r.params, "seed": r.seed, "values": [
                None if not math.isfinite(v) else v for v in r.values] if r.values else None,
                "seconds": r.seconds, "directory": r.directory} for r in summary.rows],
            "best": [r.number for r in summary.best], "total_seconds": summary.total_seconds,
            "trials_failed": sum(r.state == "failed" for r in summary.rows), "confirmation": confirmed}


def print_tune_summary(summary: TuneSummary, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    failed = sum(r.state == "failed" for r in summary.rows)
    print(f"{len(summary.rows)} trials ({failed} failed), {summary.total_seconds:.1f} s of training in all "
          f"(every trial counted)", file=stream)
    label = "winner" if len(summary.objectives) == 1 else "Pareto front"
    for row in summary.best:
        values = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(summary.objectives, row.values))
        print(f"{label}: trial {row.number} ({_params_text(row.params)}): {values} (one seed: not the result)",
              file=stream)
    if summary.confirmation is not None:
        from polytrain.bench.compare import print_summary

        print("the result: the winner re-run on fresh seeds (median [95 % CI])", file=stream)
        print_summary(summary.confirmation, stream)
