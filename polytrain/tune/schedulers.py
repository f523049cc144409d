"""How much each trial trains: `fifo` (every trial its whole budget), successive halving (`sh`), `asha`
(Li et al. 2018), `hyperband` (Li et al. 2017, brackets of successive halving) and population-based training
(`pbt`, Jaderberg et al. 2017, synchronous generations).

A scheduler hands out jobs (`ask`): train trial n until `level` of the resource (epochs, wall_s or bytes_sent,
a run paused with `stop_at` and continued from its checkpoint), and hears each job's score (`tell`; higher is
better, -inf for a failed job). `ask` answers a Job, WAIT (more may come once jobs in flight are told) or
None (nothing more). The same schedulers drive real runs (polytrain.tune.run) and the replay of recorded
learning curves (polytrain.tune.replay).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from polytrain.config import ConfigError
from polytrain.tune.samplers import History, Sampler, perturb
from polytrain.tune.space import SearchSpace

SCHEDULERS = ("fifo", "sh", "asha", "hyperband", "pbt")
RESOURCES = ("epochs", "wall_s", "bytes_sent")
WAIT = "wait"


@dataclass(frozen=True)
class Job:
    trial: int
    level: float  # train until this much of the resource (cumulative over the trial's jobs)
    params: dict  # the hyper-parameters of this job (pbt changes them between jobs)
    source: int | None = None  # pbt's exploit: continue from this trial's checkpoint at `source_level`
    source_level: float | None = None


@dataclass
class Trials:
    """The trials a scheduler has started: their hyper-parameters from the sampler, and the history the
    sampler sees."""

    sampler: Sampler
    limit: int | None
    history: History = field(default_factory=History)

    def new(self) -> int | None:
        """A new trial's number, or None when the sampler waits for history or no trials are left."""
        number = len(self.history.params)
        if self.limit is not None and number >= self.limit:
            return None
        params = self.sampler.params(number, self.history)
        if params is None:
            return None
        self.history.params[number] = params
        return number

    def can_grow(self) -> bool:
        return self.limit is None or len(self.history.params) < self.limit


def rung_levels(minimum: float, maximum: float, eta: int) -> list[float]:
    """minimum, minimum * eta, ... below maximum, then maximum."""
    levels, level = [], float(minimum)
    while level < maximum * (1 - 1e-9):
        levels.append(level)
        level *= eta
    return levels + [float(maximum)]


class Scheduler:
    def __init__(self, trials: Trials) -> None:
        self.trials = trials
        self.in_flight = 0

    def ask(self):
        job = self.next_job()
        if isinstance(job, Job):
            self.in_flight += 1
        return job

    def tell(self, job: Job, score: float) -> None:
        self.in_flight -= 1
        self.trials.history.scores[job.trial] = score
        self.record(job, score)

    def idle(self):
        return WAIT if self.in_flight else None

    def next_job(self):
        raise NotImplementedError

    def record(self, job: Job, score: float) -> None:
        pass


class Fifo(Scheduler):
    """Every trial trains its whole budget."""

    def __init__(self, trials: Trials, maximum: float) -> None:
        super().__init__(trials)
        self.maximum = maximum

    def next_job(self):
        number = self.trials.new()
        if number is None:
            return WAIT if self.in_flight or self.trials.can_grow() else None
        return Job(number, self.maximum, self.trials.history.params[number])


class SuccessiveHalving(Scheduler):
    """`n` trials at the first rung; after each rung the best 1/eta (at least one) go on to the next."""

    def __init__(self, trials: Trials, n: int, levels: list[float], eta: int) -> None:
        super().__init__(trials)
        self.n, self.levels, self.eta = n, levels, eta
        self.rung, self.queue, self.scores, self.first = 0, [], {}, 0

    def next_job(self):
        if self.rung == 0 and self.first < self.n:
            number = self.trials.new()
            if number is not None:
                self.first += 1
                return Job(number, self.levels[0], self.trials.history.params[number])
            if self.in_flight or (self.trials.can_grow() and self.trials.sampler.needs_history):
                return WAIT
            self.first = self.n  # the sampler has no more trials: the rung is what was started
        if self.queue:
            number = self.queue.pop(0)
            return Job(number, self.levels[self.rung], self.trials.history.params[number])
        if self.in_flight:
            return WAIT
        ranked = sorted(self.scores.items(), key=lambda item: (-item[1], item[0]))
        if self.rung + 1 >= len(self.levels) or len(ranked) <= 1:
            return None
        self.rung += 1
        self.queue = [number for number, _ in ranked[:max(1, len(ranked) // self.eta)]]
        self.scores = {}
        return self.next_job()

    def record(self, job: Job, score: float) -> None:
        self.scores[job.trial] = score


class Hyperband(Scheduler):
    """Brackets s = s_max .. 0 of successive halving: n_s = ceil((s_max + 1) / (s + 1) * eta^s) trials from
    maximum * eta^-s, one bracket after the other, the whole pass again while trials are left."""

    def __init__(self, trials: Trials, minimum: float, maximum: float, eta: int) -> None:
        super().__init__(trials)
        self.minimum, self.maximum, self.eta = minimum, maximum, eta
        self.brackets = self.one_pass()
        self.current = 0

    def one_pass(self) -> list[SuccessiveHalving]:
        s_max = int(math.floor(math.log(self.maximum / self.minimum, self.eta) + 1e-9))
        return [SuccessiveHalving(self.trials, int(math.ceil((s_max + 1) / (s + 1) * self.eta ** s)),
                                  rung_levels(self.maximum * self.eta ** -s, self.maximum, self.eta), self.eta)
                for s in range(s_max, -1, -1)]

    def next_job(self):
        while True:
            while self.current < len(self.brackets):
                job = self.brackets[self.current].ask()
                if job is not None:
                    return job
                self.current += 1
            if not self.trials.can_grow():
                return None
            self.brackets, self.current = self.brackets + self.one_pass(), len(self.brackets)

    def ask(self):  # each bracket counts its own jobs in flight
        return self.next_job()

    def tell(self, job: Job, score: float) -> None:
        self.brackets[self.current].tell(job, score)


class Asha(Scheduler):
    """Asynchronous successive halving: a free worker promotes the best not yet promoted trial of the highest
    rung whose top 1/eta holds one, else starts a new trial at the first rung (up to `n` trials)."""

    def __init__(self, trials: Trials, levels: list[float], eta: int) -> None:
        super().__init__(trials)
        self.levels, self.eta = levels, eta
        self.rungs: list[dict[int, float]] = [{} for _ in levels]
        self.promoted: list[set[int]] = [set() for _ in levels]

    def next_job(self):
        for k in range(len(self.levels) - 2, -1, -1):
            ranked = sorted(self.rungs[k].items(), key=lambda item: (-item[1], item[0]))
            for number, _ in ranked[:len(ranked) // self.eta]:
                if number not in self.promoted[k]:
                    self.promoted[k].add(number)
                    return Job(number, self.levels[k + 1], self.trials.history.params[number])
        number = self.trials.new()
        if number is None:
            return WAIT if self.in_flight or self.trials.can_grow() and self.trials.sampler.needs_history else None
        return Job(number, self.levels[0], self.trials.history.params[number])

    def record(self, job: Job, score: float) -> None:
        self.rungs[self.levels.index(job.level)][job.trial] = score


class PopulationBasedTraining(Scheduler):
    """Synchronous PBT: `population` trials train `interval` at a time; after each generation the worst
    `quantile` of them continue from the checkpoint of one of the best `quantile` (exploit: weights, optimizer
    state and hyper-parameters together) with perturbed hyper-parameters (explore). `lineage` records, per
    trial, every job: its level, hyper-parameters and the trial whose checkpoint it continued."""

    def __init__(self, trials: Trials, space: SearchSpace, population: int, interval: float, maximum: float,
                 seed: int, quantile: float = 0.25) -> None:
        super().__init__(trials)
        if trials.limit is not None and trials.limit < population:
            raise ConfigError(f"pbt needs trials >= population; got {trials.limit} < {population}")
        self.space, self.population, self.quantile, self.seed = space, population, quantile, seed
        generations = int(math.ceil(maximum / interval - 1e-9))
        self.levels = [min(float(maximum), interval * (g + 1)) for g in range(generations)]
        self.generation, self.queue, self.scores = 0, [], {}
        self.members: list[int] = []
        self.lineage: dict[int, list[dict]] = {}

    def next_job(self):
        if len(self.members) < self.population:
            number = self.trials.new()
            if number is None:
                return WAIT
            self.members.append(number)
            return self._job(number, self.trials.history.params[number], None)
        if self.queue:
            return self.queue.pop(0)
        if self.in_flight or self.generation + 1 >= len(self.levels):
            return self.idle()
        self.exploit_and_explore()
        return self.queue.pop(0)

    def exploit_and_explore(self) -> None:
        rng = random.Random(self.seed * 1_000_003 + self.generation)
        ranked = sorted(self.members, key=lambda n: (-self.scores[n], n))
        cut = max(1, int(self.population * self.quantile)) if self.population > 1 else 0
        top, bottom = ranked[:cut], set(ranked[len(ranked) - cut:]) if cut else set()
        level = self.levels[self.generation]
        self.generation += 1
        for number in self.members:  # exploit jobs first, so every copy is made at the generation's end
            if number in bottom:
                source = top[rng.randrange(len(top))]
                params = perturb(self.space, self.current(source), rng)
                self.queue.insert(0, self._job(number, params, source, level))
            else:
                self.queue.append(self._job(number, self.current(number), None))

    def current(self, number: int) -> dict:
        return self.lineage[number][-1]["params"]

    def _job(self, number: int, params: dict, source: int | None, source_level: float | None = None) -> Job:
        job = Job(number, self.levels[self.generation], params, source, source_level)
        self.lineage.setdefault(number, []).append({"level": job.level, "params": params, "source": source})
        return job

    def record(self, job: Job, score: float) -> None:
        self.scores[job.trial] = score
        self.lineage[job.trial][-1]["score"] = score

    def ancestry(self, number: int) -> list[dict]:
        """The jobs that made trial `number`'s final weights, oldest first: each with the trial that ran it."""
        chain, index = [], len(self.lineage[number]) - 1
        while index >= 0:
            entry = self.lineage[number][index]
            chain.append({"trial": number, **entry})
            if entry["source"] is not None:
                number = entry["source"]
            index -= 1
        return chain[::-1]


SCHEDULER_ARGS = {"fifo": (), "sh": ("min", "eta"), "asha": ("min", "eta"), "hyperband": ("min", "eta"),
                  "pbt": ("population", "interval", "quantile")}


def build_scheduler(name: str, args: dict, trials: Trials, space: SearchSpace, maximum: float, seed: int) -> Scheduler:
    """The scheduler `name` over `trials` with its arguments ([tune.scheduler]: min and eta for sh, asha and
    hyperband; population, interval and quantile for pbt), the resource's maximum per trial `maximum`."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}'; expected one of {', '.join(SCHEDULERS)}")
    unknown = sorted(set(args) - set(SCHEDULER_ARGS[name]))
    if unknown:
        raise ConfigError(f"scheduler {name} has no argument {unknown[0]!r}; valid: "
                          f"{', '.join(SCHEDULER_ARGS[name]) or 'none'}")
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"scheduler {name}: {key} must be a positive number; got {value!r}")
    if name == "fifo":
        return Fifo(trials, maximum)
    if name == "pbt":
        population = int(args.get("population", 4))
        interval = float(args.get("interval", max(1.0, maximum / 4)))
        if not interval < maximum:
            raise ConfigError(f"pbt: interval {interval:g} must be below the budget per trial {maximum:g}")
        return PopulationBasedTraining(trials, space, population, interval, maximum, seed,
                                       float(args.get("quantile", 0.25)))
    eta, minimum = int(args.get("eta", 3)), float(args.get("min", 1))
    if eta < 2 or not minimum < maximum:
        raise ConfigError(f"scheduler {name} needs eta >= 2 and min < the budget per trial {maximum:g}; "
                          f"got eta {eta}, min {minimum:g}")
    if name == "hyperband":
        return Hyperband(trials, minimum, maximum, eta)
    levels = rung_levels(minimum, maximum, eta)
    if name == "asha":
        return Asha(trials, levels, eta)
    if trials.limit is None:
        raise ConfigError("scheduler sh needs a number of trials (the first rung's)")
    return SuccessiveHalving(trials, trials.limit, levels, eta)
