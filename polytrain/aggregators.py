"""Byzantine-robust aggregation of whole gradient vectors (`--aggregator NAME[:k=v,...]`).

An aggregator combines the n workers' gradients, the rows of an (n, d) tensor, into one d-vector, while up to
f of the rows may be arbitrary (Byzantine). Each is registered by name with the resilience condition on n
and f under which its guarantee holds (Ben-Nun & Hoefler 2019, section 7.4; checked before a run starts):

- `mean`: the plain average (no resilience: one bad row moves it anywhere; the baseline).
- `median`: the coordinate-wise median (Yin et al., ICML 2018); n > 2f.
- `trimmed_mean:beta=b`: per coordinate, the mean after dropping the floor(b n) largest and smallest values
  (Yin et al. 2018; default b = f / n); n > 2 floor(b n). beta = 0 is the mean.
- `krum`: the row whose n - f - 2 nearest other rows are closest (squared distances; Blanchard et al.,
  NeurIPS 2017); n > 2f + 2.
- `multikrum:m=k`: the mean of the k rows of lowest Krum score (default k = n - f); n > 2f + 2. m = n is the
  mean.
- `bulyan`: n - 2f rows chosen by Krum one at a time (each chosen row leaves the pool), then per coordinate
  the mean of the n - 4f of them closest to their median (El Mhamdi et al., ICML 2018); n >= 4f + 3.
- `geometric_median`: the point minimizing the sum of Euclidean distances to the rows, by smoothed
  Weiszfeld iterations (Pillutla et al., "Robust aggregation for federated learning", 2022); n > 2f.
- `centered_clipping:tau=t,iterations=l`: starting from the previous step's aggregate, l times
  v <- v + mean_i clip(x_i - v, tau) (Karimireddy et al., ICML 2021); n > 2f. It keeps that center between
  steps (`state_dict`).

Aggregators are objects built once per run (`build_aggregator`); `aggregator(gradients)` returns the
aggregate in the rows' dtype, computed in float64. A policy that gathers every replica's whole gradient
(`allreduce`, the `ps` servers) combines them through a `Combination`: the aggregator, after the Byzantine
replicas' rows are replaced by their attack's (polytrain.faults.Byzantine).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from polytrain.faults import Byzantine
from polytrain.registry import Registry

AGGREGATORS: Registry[Callable[..., "Aggregator"]] = Registry("aggregator")


class Aggregator:
    """Combines the rows of an (n, d) tensor; `requires(n, f)` is None where the condition holds, else the
    condition in words."""

    name = ""

    def __init__(self, f: int) -> None:
        self.f = f

    def requires(self, n: int) -> str | None:
        return None

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        if gradients.dim() != 2:
            raise ValueError(f"aggregator {self.name} combines an (n, d) tensor of n gradients; got shape "
                             f"{tuple(gradients.shape)}")
        problem = self.requires(gradients.shape[0])
        if problem is not None:
            raise ValueError(problem)
        return self.combine(gradients.double()).to(gradients.dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _needs(name: str, holds: bool, condition: str, n: int, f: int) -> str | None:
    return None if holds else f"aggregator {name} needs {condition} for f = {f}; got n = {n} workers"


def _squared_distances(rows: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").square()


def krum_scores(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's sum of squared distances to its n - f - 2 nearest other rows (at least the nearest one:
    Bulyan's last selections run on pools that small)."""
    n = rows.shape[0]
    distances = _squared_distances(rows)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.sort(dim=1).values[:, :max(1, n - f - 2)]
    return nearest.sum(dim=1)


@AGGREGATORS.register("mean")
class Mean(Aggregator):
    name = "mean"

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.mean(dim=0)


@AGGREGATORS.register("median")
class Median(Aggregator):
    name = "median"

    def requires(self, n: int) -> str | None:
        return _needs(self.name, n > 2 * self.f, f"n > 2f = {2 * self.f}", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        ordered, n = rows.sort(dim=0).values, rows.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2  # the mean of the two middle values for even n


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    name = "trimmed_mean"

    def __init__(self, f: int, beta: float | None = None) -> None:
        super().__init__(f)
        if beta is not None and not (isinstance(beta, (int, float)) and 0 <= beta < 0.5):
            raise ValueError(f"trimmed_mean beta is the share trimmed at each end, in [0, 0.5); got {beta!r}")
        self.beta = beta

    def trimmed(self, n: int) -> int:
        return self.f if self.beta is None else int(self.beta * n)

    def requires(self, n: int) -> str | None:
        k = self.trimmed(n)
        return _needs(self.name, n > 2 * k and k >= self.f, f"n > 2k and k >= f values trimmed at each end "
                                                           f"(k = {k})", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        k, n = self.trimmed(rows.shape[0]), rows.shape[0]
        return rows.sort(dim=0).values[k:n - k].mean(dim=0)


@AGGREGATORS.register("krum")
class Krum(Aggregator):
    name = "krum"

    def requires(self, n: int) -> str | None:
        return _needs(self.name, n > 2 * self.f + 2, f"n > 2f + 2 = {2 * self.f + 2}", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[int(krum_scores(rows, self.f).argmin())]


@AGGREGATORS.register("multikrum")
class MultiKrum(Krum):
    name = "multikrum"

    def __init__(self, f: int, m: int | None = None) -> None:
        super().__init__(f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"multikrum m is how many rows are averaged, a whole number >= 1; got {m!r}")
        self.m = m

    def requires(self, n: int) -> str | None:
        m = self.m if self.m is not None else n - self.f
        if m > n:
            return f"aggregator multikrum averages m = {m} of the n = {n} gradients; use m <= n"
        return super().requires(n)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        m = self.m if self.m is not None else n - self.f
        if m == n:  # every row: the mean, in the rows' order
            return rows.mean(dim=0)
        chosen = krum_scores(rows, self.f).argsort()[:m].sort().values
        return rows[chosen].mean(dim=0)


@AGGREGATORS.register("bulyan")
class Bulyan(Aggregator):
    name = "bulyan"

    def requires(self, n: int) -> str | None:
        return _needs(self.name, n >= 4 * self.f + 3, f"n >= 4f + 3 = {4 * self.f + 3}", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        n, f = rows.shape[0], self.f
        pool = list(range(n))
        chosen = []
        for _ in range(n - 2 * f):  # Krum over the rows left: f Byzantine ones may still be among them
            chosen.append(pool.pop(int(krum_scores(rows[pool], f).argmin())))
        selected = rows[sorted(chosen)]
        keep = selected.shape[0] - 2 * f
        median = Median(0).combine(selected)
        closest = (selected - median).abs().argsort(dim=0)[:keep]
        return selected.gather(0, closest).mean(dim=0)


@AGGREGATORS.register("geometric_median")
class GeometricMedian(Aggregator):
    name = "geometric_median"

    def __init__(self, f: int, iterations: int = 100, tolerance: float = 1e-10, smoothing: float = 1e-12) -> None:
        super().__init__(f)
        self.iterations, self.tolerance, self.smoothing = iterations, tolerance, smoothing

    def requires(self, n: int) -> str | None:
        return _needs(self.name, n > 2 * self.f, f"n > 2f = {2 * self.f}", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        point = rows.mean(dim=0)
        for _ in range(self.iterations):
            weights = 1 / (rows - point).norm(dim=1).clamp_min(self.smoothing)
            moved = (weights[:, None] * rows).sum(dim=0) / weights.sum()
            if (moved - point).norm() <= self.tolerance * max(1.0, float(point.norm())):
                return moved
            point = moved
        return point


@AGGREGATORS.register("centered_clipping")
class CenteredClipping(Aggregator):
    name = "centered_clipping"

    def __init__(self, f: int, tau: float = 10.0, iterations: int = 1) -> None:
        super().__init__(f)
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"centered_clipping tau is the clipping radius, > 0; got {tau!r}")
        self.tau, self.iterations = float(tau), iterations
        self.center: torch.Tensor | None = None  # the previous step's aggregate

    def requires(self, n: int) -> str | None:
        return _needs(self.name, n > 2 * self.f, f"n > 2f = {2 * self.f}", n, self.f)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        center = self.center.double() if self.center is not None else torch.zeros_like(rows[0])
        for _ in range(self.iterations):
            offsets = rows - center
            scale = (self.tau / offsets.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)
            center = center + (scale[:, None] * offsets).mean(dim=0)
        self.center = center.clone()
        return center

    def state_dict(self) -> dict:
        return {"center": self.center}

    def load_state_dict(self, state: dict) -> None:
        self.center = state.get("center")


def build_aggregator(name: str, args: dict[str, Any] | None = None, f: int = 0) -> Aggregator:
    """The aggregator `name` with its arguments, for up to `f` Byzantine workers (ValueError in one line for
    an unknown name or argument)."""
    args = dict(args or {})
    AGGREGATORS.check_arguments(name, args, fixed=("f",))
    return AGGREGATORS.get(name)(f, **args)


def check_resilience(name: str, args: dict[str, Any] | None, n: int, f: int) -> None:
    """Raises ValueError (one line) unless aggregator `name` tolerates f Byzantine workers of n."""
    problem = build_aggregator(name, args, f).requires(n)
    if problem is not None:
        raise ValueError(problem)


class Combination:
    """How a policy combines the replicas' whole gradients: `combine(rows, step)` applies the Byzantine
    replicas' attack to `rows` (n, d), then the aggregator.

    Each row is one replica's gradient, scaled so that it estimates the whole batch's (the replica's share
    times n): the `mean` of the rows is then exactly what a sum of the shares gives.
    """

    def __init__(self, aggregator: Aggregator, byzantine: Byzantine | None = None) -> None:
        self.aggregator, self.byzantine = aggregator, byzantine

    def combine(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        if self.byzantine is not None:
            rows = self.byzantine.corrupt(rows, step)
        return self.aggregator(rows)

    def report(self) -> dict:
        section = {"name": self.aggregator.name, "f": self.aggregator.f}
        if self.byzantine is not None:
            section["byzantine"] = {"ranks": list(self.byzantine.ranks), "attack": self.byzantine.attack,
                                    "scale": self.byzantine.scale}
        return section
