"""Where a trial's hyper-parameters come from: `random`, `grid`, `tpe` (Optuna's Tree-structured Parzen
Estimator, an optional extra, driven by ask/tell) and `evolution` (regularized evolution, Real et al. 2019).

Trial n's hyper-parameters depend only on (study seed, n) and, for the model-based samplers, on the values of
the trials numbered below n - lag (lag = parallel - 1): those are finished before trial n is asked, whatever
order the trials in flight finish in, so a study replays to the same trials (`History.visible`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from polytrain.config import ConfigError
from polytrain.tune.space import Dimension, SearchSpace

SAMPLERS = ("random", "grid", "tpe", "evolution")


@dataclass
class History:
    """What a model-based sampler may see: each trial's hyper-parameters and its latest score (higher is
    better; -inf for a failed trial), by number."""

    params: dict[int, dict] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)

    def visible(self, number: int, lag: int) -> list[tuple[int, dict, float]] | None:
        """Trials 0 .. number - lag - 1 with their scores, or None while one of them has none yet."""
        shown = range(max(0, number - lag))
        if any(n not in self.scores for n in shown):
            return None
        return [(n, self.params[n], self.scores[n]) for n in shown]


class Sampler:
    """Hyper-parameters for trial `number`; None when the history it needs is not there yet."""

    needs_history = False
    limit: int | None = None  # the most trials it can give (a grid's size)

    def params(self, number: int, history: History) -> dict | None:
        raise NotImplementedError


class RandomSampler(Sampler):
    def __init__(self, space: SearchSpace, seed_of) -> None:
        self.space, self.seed_of = space, seed_of

    def params(self, number: int, history: History) -> dict:
        return self.space.sample(random.Random(self.seed_of(number)))


class GridSampler(Sampler):
    def __init__(self, space: SearchSpace, points: int) -> None:
        self.grid = space.grid(points)
        self.limit = len(self.grid)

    def params(self, number: int, history: History) -> dict:
        return self.grid[number]


class TPESampler(Sampler):
    """Optuna's TPE over the space, replayed from the visible history into a fresh in-memory study for each
    trial (ask/tell), seeded by the trial's own seed."""

    needs_history = True

    def __init__(self, space: SearchSpace, seed_of, lag: int, startup: int = 5) -> None:
        try:
            import optuna
        except ImportError:
            raise ConfigError("sampler tpe needs Optuna: pip install 'polytrain[tune]' (or optuna)") from None
        self.optuna, self.space, self.seed_of, self.lag, self.startup = optuna, space, seed_of, lag, startup
        self.distributions = {d.key: _distribution(optuna, d) for d in space.dimensions}

    def params(self, number: int, history: History) -> dict | None:
        seen = history.visible(number, self.lag)
        if seen is None:
            return None
        optuna = self.optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=self.seed_of(number), n_startup_trials=self.startup)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for _, params, score in seen:
            finite = math.isfinite(score)
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self.distributions, value=score if finite else None,
                state=optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL))
        trial = study.ask(self.distributions)
        return {d.key: trial.params[d.key] for d in self.space.dimensions}


def _distribution(optuna, d: Dimension):
    if d.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(d.choices))
    if d.kind in ("int", "logint"):
        return optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.kind == "logint")
    return optuna.distributions.FloatDistribution(d.low, d.high, log=d.kind == "loguniform")


class EvolutionSampler(Sampler):
    """Regularized (aging) evolution: the first `population` trials at random; then each trial mutates the
    best of `sample` members drawn from the `population` most recent visible trials (the oldest is thereby
    removed), changing one dimension: a choice to another choice, a range to a fresh draw."""

    needs_history = True

    def __init__(self, space: SearchSpace, seed_of, lag: int, population: int = 10, sample: int = 3) -> None:
        if not 1 <= sample <= population:
            raise ConfigError(f"evolution needs 1 <= sample <= population; got sample {sample}, population "
                              f"{population}")
        self.space, self.seed_of, self.lag = space, seed_of, lag
        self.population, self.sample = population, sample

    def params(self, number: int, history: History) -> dict | None:
        rng = random.Random(self.seed_of(number))
        if number < self.population + self.lag:
            return self.space.sample(rng)
        seen = history.visible(number, self.lag)
        if seen is None:
            return None
        alive = seen[-self.population:]
        parent = max(rng.sample(alive, self.sample), key=lambda member: (member[2], -member[0]))
        return mutate(self.space, parent[1], rng)


def mutate(space: SearchSpace, params: dict, rng: random.Random) -> dict:
    """`params` with one dimension changed (one with a single choice cannot change)."""
    changeable = [d for d in space.dimensions if d.kind != "choice" or len(d.choices) > 1]
    child = dict(params)
    if not changeable:
        return child
    d = changeable[rng.randrange(len(changeable))]
    if d.kind == "choice":
        others = [c for c in d.choices if c != params[d.key]]
        child[d.key] = others[rng.randrange(len(others))]
    else:
        child[d.key] = d.sample(rng)
    return child


def perturb(space: SearchSpace, params: dict, rng: random.Random, factors=(0.8, 1.2),
            resample: float = 0.25) -> dict:
    """PBT's explore: each value redrawn with probability `resample`, else a range's value scaled by one of
    `factors` (kept inside the range) and a choice moved to a neighbouring one."""
    child: dict[str, Any] = {}
    for d in space.dimensions:
        value = params[d.key]
        if rng.random() < resample:
            child[d.key] = d.sample(rng)
        elif d.kind == "choice":
            index = d.choices.index(value) + rng.choice((-1, 1))
            child[d.key] = d.choices[min(len(d.choices) - 1, max(0, index))]
        else:
            scaled = min(d.high, max(d.low, value * rng.choice(factors)))
            child[d.key] = int(round(scaled)) if d.kind in ("int", "logint") else scaled
    return child


def build_sampler(name: str, space: SearchSpace, seed_of, *, lag: int, grid_points: int, args: dict) -> Sampler:
    """The sampler `name` with its arguments ([tune.sampler_args]: startup for tpe; population, sample for
    evolution)."""
    known = {"random": (), "grid": (), "tpe": ("startup",), "evolution": ("population", "sample")}
    if name not in known:
        raise ConfigError(f"unknown sampler '{name}'; expected one of {', '.join(SAMPLERS)}")
    unknown = sorted(set(args) - set(known[name]))
    if unknown:
        raise ConfigError(f"sampler {name} has no argument {unknown[0]!r}; valid: {', '.join(known[name]) or 'none'}")
    for key, value in args.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"sampler {name}: {key} must be a whole number >= 1; got {value!r}")
    if name == "random":
        return RandomSampler(space, seed_of)
    if name == "grid":
        return GridSampler(space, grid_points)
    if name == "tpe":
        return TPESampler(space, seed_of, lag, **args)
    return EvolutionSampler(space, seed_of, lag, **args)
