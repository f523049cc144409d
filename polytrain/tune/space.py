"""A search space over any Experiment setting (`lr`, `batch_size`, `strategy_args.period`, `model_args.sr`, ...):
uniform, log-uniform, integer and categorical dimensions, sampled from a seeded generator or enumerated as a
grid.

In TOML (`[tune.space]`), one key per setting, its value a one-entry table:

    lr = { loguniform = [0.01, 0.5] }
    "optimizer_args.momentum" = { uniform = [0.5, 0.99] }
    "strategy_args.period" = { int = [1, 16] }            # inclusive; { logint = [1, 64] } on a log scale
    batch_size = { choice = [64, 128, 256] }

A grid takes every choice and, for a numeric range, `grid_points` points (ends included; log-spaced for the
log kinds; integers rounded and deduplicated).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

from polytrain.config import ConfigError, Experiment, apply_overrides

KINDS = ("uniform", "loguniform", "int", "logint", "choice")


@dataclass(frozen=True)
class Dimension:
    """One setting of the space: its kind and range (low, high) or its choices."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    @classmethod
    def parse(cls, key: str, spec: Any) -> "Dimension":
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"search space {key}: expected one of {', '.join(KINDS)} as a table, e.g. "
                              f"{{ loguniform = [0.01, 0.5] }}; got {spec!r}")
        kind, value = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"search space {key}: choice takes a non-empty list; got {value!r}")
            return cls(key, kind, choices=tuple(value))
        numeric = (isinstance(value, list) and len(value) == 2
                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not numeric or not value[0] < value[1]:
            raise ConfigError(f"search space {key}: {kind} takes [low, high] with low < high; got {value!r}")
        if kind in ("int", "logint") and not all(float(v).is_integer() for v in value):
            raise ConfigError(f"search space {key}: {kind} takes whole bounds; got {value!r}")
        if kind in ("loguniform", "logint") and value[0] <= 0:
            raise ConfigError(f"search space {key}: {kind} needs low > 0; got {value!r}")
        return cls(key, kind, float(value[0]), float(value[1]))

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return self.choices[rng.randrange(len(self.choices))]
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        return _logint(rng, int(self.low), int(self.high))

    def grid(self, points: int) -> list:
        if self.kind == "choice":
            return list(self.choices)
        if points < 2:
            raise ConfigError(f"a grid over {self.key} needs at least 2 points per range; got {points}")
        fractions = [i / (points - 1) for i in range(points)]
        if self.kind in ("uniform", "int"):
            values = [self.low + f * (self.high - self.low) for f in fractions]
        else:
            values = [math.exp(math.log(self.low) + f * (math.log(self.high) - math.log(self.low))) for f in fractions]
        if self.kind in ("int", "logint"):
            return sorted({int(round(v)) for v in values})
        return values


def _logint(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high] whose logarithm is uniform (each octave as likely)."""
    value = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
    return min(high, max(low, int(value)))


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @classmethod
    def parse(cls, table: dict) -> "SearchSpace":
        if not isinstance(table, dict) or not table:
            raise ConfigError("the search space ([tune.space]) needs at least one setting")
        return cls(tuple(Dimension.parse(key, spec) for key, spec in table.items()))

    def sample(self, rng: random.Random) -> dict[str, Any]:
        return {d.key: d.sample(rng) for d in self.dimensions}

    def grid(self, points: int = 3) -> list[dict[str, Any]]:
        axes = [d.grid(points) for d in self.dimensions]
        return [dict(zip((d.key for d in self.dimensions), values)) for values in itertools.product(*axes)]

    def check(self, base: Experiment) -> None:
        """Every key names a setting (a table's entry as key.sub): one line otherwise, before any trial."""
        for d in self.dimensions:
            probe = d.choices[0] if d.kind == "choice" else (int(d.low) if d.kind in ("int", "logint") else d.low)
            try:
                apply_overrides(base, {d.key: probe})
            except ConfigError as error:
                raise ConfigError(f"search space {d.key}: {error}") from None
