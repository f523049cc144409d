"""`polytrain tune`: hyper-parameter search whose trials are polytrain runs (multi-worker where the base says so).

A study is base settings (as `polytrain train --config` reads them), a search space, a sampler, one or more
objectives and a seed. Trial n's hyper-parameters and seed depend only on (study seed, n), so a study
replays to the same trials whatever order they finish in, and a killed study resumes: finished trials are
kept, running ones run again. Trials run `parallel` at a time, each its own `polytrain train` process with
the cores divided among every rank of every trial running (`threads`); the ranks of one trial share its
hyper-parameters because they are one run's settings. The result never is the best of N: the total cost of
the search (every trial, failed ones too) is reported, and the winner is re-run on fresh seeds beside the
single-worker baseline through `polytrain compare`, summarised with a CI.

Samplers (polytrain.tune.samplers): random, grid, tpe (Optuna) and evolution (regularized evolution).
Schedulers (polytrain.tune.schedulers): fifo, successive halving, ASHA, Hyperband and population-based
training. A scheduler's jobs pause a trial at a level of the resource (epochs, wall_s or bytes_sent) and
continue it from its checkpoint later, so a promoted trial trains exactly as one uninterrupted run would;
pbt's exploit copies a checkpoint bit for bit, and its winner is replayed from its lineage to the same weights.
Every job is stored as it ends: a killed study asks its scheduler again and answers the jobs it finished
from the database.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from polytrain.bench.compare import train_in_directory
from polytrain.config import ConfigError, Experiment, apply_overrides
from polytrain.train.defaults import resolve
from polytrain.train.loop import RETUNABLE
from polytrain.tune.samplers import SAMPLERS, build_sampler
from polytrain.tune.schedulers import RESOURCES, Job, PopulationBasedTraining, Scheduler, Trials, build_scheduler
from polytrain.tune.space import SearchSpace
from polytrain.tune.study import Study, TrialRow
# Objectives read from result.json, and the direction each is optimised in unless "max:" / "min:" says.
OBJECTIVES: dict[str, tuple[Callable[[dict], float | None], str]] = {
    "final_test_accuracy": (lambda r: r["final_test_accuracy"], "max"),
    "best_test_accuracy": (lambda r: r["best_test_accuracy"], "max"),
    "final_test_metric": (lambda r: r["final_test_metric"], "max"),
    "time_to_target_s": (lambda r: r["time_to_target_s"], "min"),
    "wall_s": (lambda r: r["wall_s"], "min"),
    "samples_per_s": (lambda r: r["samples_per_s"], "max"),
    "bytes_sent_per_step": (lambda r: r["comm"].get("bytes_sent_per_step"), "min"),
    "parameters": (lambda r: r.get("model", {}).get("parameters"), "min"),
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
    sampler_args: dict = field(default_factory=dict)
    scheduler: str = "fifo"
    scheduler_args: dict = field(default_factory=dict)
    resource: str = "epochs"
    budget: float | None = None  # per trial, in the resource (epochs: the base's)

    @classmethod
    def parse(cls, base: dict, table: dict) -> "TuneSpec":
        known = {"space", "sampler", "trials", "grid_points", "objective", "seed", "parallel", "confirm_seeds",
                 "sampler_args", "scheduler", "scheduler_args", "resource", "budget"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"[tune] has no setting {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        space = SearchSpace.parse(table.get("space", {}))
        resolved = resolve(apply_overrides(Experiment(), base))
        space.check(resolved)
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
        if sampler != "grid" and whole["trials"] is None:
            raise ConfigError(f"sampler {sampler} needs a number of trials ([tune] trials = N or --trials N)")
        resource = table.get("resource", "epochs")
        if resource not in RESOURCES:
            raise ConfigError(f"[tune] resource must be one of {', '.join(RESOURCES)}; got {resource!r}")
        budget = table.get("budget", resolved.epochs if resource == "epochs" else None)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ConfigError(f"[tune] budget (per trial, in {resource}) must be a positive number; got {budget!r}")
        if resource == "epochs" and budget > resolved.epochs:
            raise ConfigError(f"[tune] budget {budget} epochs is more than the base's epochs = {resolved.epochs}")
        scheduler = table.get("scheduler", "fifo")
        if scheduler == "pbt":
            fixed = [d.key for d in space.dimensions if d.key.split(".")[0] not in RETUNABLE]
            if fixed:
                raise ConfigError(f"pbt changes hyper-parameters of running trials, which {fixed[0]} cannot be; "
                                  f"its space may hold {', '.join(RETUNABLE)} (and optimizer_args.X)")
            if resource != "epochs":
                raise ConfigError("pbt's generations are in epochs: use resource = \"epochs\"")
        spec = cls(dict(base), space, dict(table.get("space", {})), sampler, whole["trials"], whole["grid_points"],
                   objectives, whole["seed"], whole["parallel"], whole["confirm_seeds"],
                   dict(table.get("sampler_args", {})), scheduler, dict(table.get("scheduler_args", {})), resource,
                   float(budget))
        spec.build()  # every argument checked before any trial
        return spec

    def stored(self) -> dict:
        """The part of the spec that defines the trials (confirm_seeds may change on resume; parallel too,
        except for the model-based samplers, whose trials see the trials finished parallel - 1 before)."""
        return {"base": self.base, "space": self.space_table, "sampler": self.sampler, "trials": self.trials,
                "grid_points": self.grid_points, "seed": self.seed, "sampler_args": self.sampler_args,
                "scheduler": self.scheduler, "scheduler_args": self.scheduler_args, "resource": self.resource,
                "budget": self.budget, "objectives": [f"{o.direction}:{o.name}" for o in self.objectives],
                **({"parallel": self.parallel} if self.sampler in ("tpe", "evolution") else {})}

    def build(self) -> Scheduler:
        """A fresh sampler and scheduler for this study (the same decisions every time it is replayed)."""
        sampler = build_sampler(self.sampler, self.space, lambda n: derive_seed(self.seed, n),
                                lag=self.parallel - 1, grid_points=self.grid_points, args=self.sampler_args)
        limit = self.trials if sampler.limit is None else min(sampler.limit, self.trials or sampler.limit)
        return build_scheduler(self.scheduler, self.scheduler_args, Trials(sampler, limit), self.space,
                               self.budget, self.seed)

    def score(self, values: list[float]) -> float:
        """The first objective as a score the schedulers maximise."""
        return values[0] if self.objectives[0].direction == "max" else -values[0]


@dataclass
class TuneSummary:
    rows: list[TrialRow]
    objectives: tuple[Objective, ...]
    best: list[TrialRow]  # the winner, or the Pareto front for several objectives
    total_seconds: float
    jobs: int = 0
    confirmation: object | None = None  # the compare Summary of the winner's re-runs
    lineage: list[dict] | None = None  # pbt: the winner's jobs, oldest first
    replay: dict | None = None  # pbt: the winner re-made from its lineage


def pareto_front(rows: list[TrialRow], objectives: tuple[Objective, ...]) -> list[TrialRow]:
    """The complete trials no other complete trial dominates (at least as good in every objective, better in one)."""
    done = [r for r in rows if r.state == "complete"]

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        pairs = list(zip(objectives, a.values, b.values))
        return (all(not o.better(y, x) for o, x, y in pairs) and any(o.better(x, y) for o, x, y in pairs))

    return [r for r in done if not any(dominates(other, r) for other in done if other is not r)]


class _Runner:
    """Runs a study's jobs as polytrain runs in ROOT/trials/NNNN, each paused at its level (`stop_at`) and
    continued from its checkpoint by the trial's next job; pbt's exploit copies the source trial's checkpoint
    of the generation's end bit-exactly. Jobs a killed study finished are answered from the database."""

    def __init__(self, spec: TuneSpec, root: Path, study: Study, run_timeout_s: float, threads: int,
                 stream: TextIO) -> None:
        self.spec, self.root, self.study, self.run_timeout_s = spec, root, study, run_timeout_s
        self.threads, self.stream = threads, stream
        self.recorded = {_job_key(row): row for row in study.jobs()}
        self.seeds = {row.number: row.seed for row in study.rows()}
        self.epochs = resolve(apply_overrides(Experiment(), spec.base)).epochs

    def experiment(self, job: Job, directory: Path) -> Experiment:
        """The job's run: the trial's settings, paused at the job's level unless that is the whole run."""
        epochs = self.spec.resource == "epochs"
        stop_at = {} if epochs and job.level >= self.epochs else {
            self.spec.resource: int(round(job.level)) if epochs else job.level}
        return apply_overrides(Experiment(), {**self.spec.base, **job.params, "seed": self.seeds[job.trial],
                                              "out": str(directory), "stop_at": stop_at,
                                              "threads": self.spec.base.get("threads", self.threads)})

    def prepare(self, job: Job) -> None:
        """On the main thread, before the job is handed out: the trial's row, and pbt's exploit copy."""
        if job.trial not in self.seeds:
            self.seeds[job.trial] = derive_seed(self.spec.seed, job.trial)
            self.study.add(job.trial, job.params, self.seeds[job.trial], f"trials/{job.trial:04d}")
        if job.source is not None and _job_key(job) not in self.recorded:
            self.seeds[job.trial] = self.seeds[job.source]  # the clone trains on with its source's data order
            target = self.root / f"trials/{job.trial:04d}"
            snapshot = self.root / f"trials/{job.source:04d}" / "snapshots" / f"at-{job.source_level:g}.pt"
            for old in target.glob("checkpoint*.pt"):
                old.unlink()
            shutil.copyfile(snapshot, target / "checkpoint.pt")
            if _sha256(snapshot) != _sha256(target / "checkpoint.pt"):
                raise RuntimeError(f"exploit: the copy of {snapshot} into {target} differs from it")

    def run(self, job: Job) -> tuple[float, list[float], float]:
        """The job's score, its objective values and the training seconds it took."""
        found = self.recorded.get(_job_key(job))
        if found is not None:
            return self.spec.score(found.values), found.values, found.seconds
        directory = self.root / f"trials/{job.trial:04d}"
        start = int(job.source_level) if job.source is not None else len(_history(directory))
        self.study.mark(job.trial, "running")
        result = train_in_directory(self.experiment(job, directory), run_timeout_s=self.run_timeout_s, resume=True)
        values = [o.value(result) for o in self.spec.objectives]
        if result is not None:  # the training time of the epochs this job added
            history = _history(directory)
            seconds = history[-1]["wall_s"] - (history[start - 1]["wall_s"] if start else 0.0)
        else:
            seconds = _failed_seconds(directory)
        if result is not None and self.spec.scheduler == "pbt":
            (directory / "snapshots").mkdir(exist_ok=True)
            shutil.copyfile(directory / "checkpoint.pt", directory / "snapshots" / f"at-{job.level:g}.pt")
        self.study.record_job(job.trial, job.level, job.source, job.params, values, seconds,
                              "complete" if result is not None else "failed")
        shown = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(self.spec.objectives, values))
        level = f" to {job.level:g} {self.spec.resource}" if self.spec.scheduler != "fifo" else ""
        source = f" from trial {job.source}'s weights" if job.source is not None else ""
        print(f"[trial {job.trial}{level}{source}] {_params_text(job.params)}: "
              f"{shown if result is not None else f'FAILED, see {directory}/log.txt'}", file=self.stream, flush=True)
        return self.spec.score(values), values, seconds


def tune(spec: TuneSpec, root: str | Path, storage: str | None = None, name: str = "study",
         run_timeout_s: float = 3600.0, stream: TextIO | None = None) -> TuneSummary:
    """Runs (or resumes) the study in `root` and returns its summary; writes tune.json there."""
    from polytrain.train.defaults import run_ranks
    from polytrain.train.io import atomic_write_json

    root, stream = Path(root), stream or sys.stdout
    study = Study(storage or f"sqlite:///{(root / 'study.db').resolve()}", name, spec.stored())
    try:
        requeued = study.requeue_running()
        if requeued:
            print(f"{requeued} trial(s) of a killed study run again", file=stream)
        ranks = run_ranks(resolve(apply_overrides(Experiment(), spec.base)))
        threads = max(1, (os.cpu_count() or 1) // (ranks * spec.parallel))
        runner = _Runner(spec, root, study, run_timeout_s, threads, stream)
        scheduler = spec.build()
        jobs = _drive(scheduler, runner, spec.parallel)
        rows = study.rows()
    finally:
        study.close()
    best = _best(rows, spec.objectives, spec.budget)
    summary = TuneSummary(rows, spec.objectives, best, sum(r.seconds or 0.0 for r in rows), jobs)
    if isinstance(scheduler, PopulationBasedTraining) and len(best) == 1:
        summary.lineage = scheduler.ancestry(best[0].number)
        summary.replay = _replay_lineage(spec, summary.lineage, runner, root, run_timeout_s)
    elif spec.confirm_seeds and len(best) == 1:
        summary.confirmation = _confirm(spec, best[0], root / "confirm", run_timeout_s, stream)
    atomic_write_json(root / "tune.json", _summary_json(summary))
    return summary


def _drive(scheduler: Scheduler, runner: _Runner, parallel: int) -> int:
    """Hands the scheduler's jobs to `parallel` threads and tells it each outcome in the order they end."""
    futures: dict = {}
    jobs, finished = 0, False
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while True:
            while not finished and len(futures) < parallel:
                job = scheduler.ask()
                if job is None:
                    finished = True
                if not isinstance(job, Job):
                    break
                runner.prepare(job)
                futures[pool.submit(runner.run, job)] = job
                jobs += 1
            if not futures:
                if not finished:
                    raise RuntimeError("the scheduler waits with no job in flight")
                return jobs
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: futures[f].trial):
                job = futures.pop(future)
                score, _, _ = future.result()
                scheduler.tell(job, score)


def _replay_lineage(spec: TuneSpec, lineage: list[dict], runner: _Runner, root: Path, run_timeout_s: float) -> dict:
    """PBT's winner made again from nothing by its lineage: one run, each job's hyper-parameters in turn,
    paused and continued at each generation's end; its weights must equal the winner's bit for bit."""
    import torch

    from polytrain.train.result import max_weight_difference

    directory = root / "replay"
    seed = derive_seed(spec.seed, lineage[0]["trial"])
    for index, entry in enumerate(lineage):
        runner.seeds[-1] = seed
        exp = runner.experiment(Job(-1, entry["level"], entry["params"]), directory)
        if train_in_directory(exp, run_timeout_s=run_timeout_s, resume=index > 0) is None:
            return {"directory": str(directory), "identical": False, "error": f"the replay failed, see {directory}"}
    winner = root / f"trials/{lineage[-1]['trial']:04d}" / "model.pt"
    difference = max_weight_difference(torch.load(winner), torch.load(directory / "model.pt"))
    return {"directory": str(directory), "identical": difference == 0.0, "max_difference": difference}


def _job_key(job) -> tuple:
    return (job.trial, float(job.level), job.source, json.dumps(job.params, sort_keys=True))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _history(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _failed_seconds(directory: Path) -> float:
    path = directory / "failed.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else 0.0


def _best(rows: list[TrialRow], objectives: tuple[Objective, ...], budget: float) -> list[TrialRow]:
    """The best of the trials that trained the whole budget (a stopped trial's early score is no result)."""
    done = [r for r in rows if r.state == "complete" and all(math.isfinite(v) for v in r.values)
            and r.level is not None and r.level >= budget * (1 - 1e-9)]
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
                "level": r.level, "seconds": r.seconds, "directory": r.directory} for r in summary.rows],
            "best": [r.number for r in summary.best], "total_seconds": summary.total_seconds, "jobs": summary.jobs,
            "trials_failed": sum(r.state == "failed" for r in summary.rows), "confirmation": confirmed,
            "lineage": summary.lineage, "lineage_replay": summary.replay}


def print_tune_summary(summary: TuneSummary, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    failed = sum(r.state == "failed" for r in summary.rows)
    print(f"{len(summary.rows)} trials ({failed} failed), {summary.jobs} jobs, {summary.total_seconds:.1f} s of "
          f"training in all (every trial counted, stopped ones too)", file=stream)
    label = "winner" if len(summary.objectives) == 1 else "Pareto front"
    for row in summary.best:
        values = ", ".join(f"{o.name} {v:.4g}" for o, v in zip(summary.objectives, row.values))
        print(f"{label}: trial {row.number} ({_params_text(row.params)}): {values} (one seed: not the result)",
              file=stream)
    if summary.lineage is not None:
        steps = "; ".join(f"to {e['level']:g} in trial {e['trial']} ({_params_text(e['params'])})"
                          for e in summary.lineage)
        print(f"the winner's lineage: {steps}", file=stream)
        replay = summary.replay or {}
        print(f"replayed from its lineage in {replay.get('directory')}: "
              f"{'bit-identical weights' if replay.get('identical') else f'NOT identical: {replay}'}", file=stream)
    if summary.confirmation is not None:
        from polytrain.bench.compare import print_summary

        print("the result: the winner re-run on fresh seeds (median [95 % CI])", file=stream)
        print_summary(summary.confirmation, stream)
