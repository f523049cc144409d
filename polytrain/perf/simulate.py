"""The performance model at scale: thousands of ranks, the symmetric ones grouped, the asymmetric played.

A mesh's dp replicas do the same work, so the analytic prediction of one (polytrain.perf.predict) stands
for all of them, whatever their number: a symmetric run is simulated as one group and its step *is* the
prediction. What breaks the symmetry is played step by step over every rank, vectorised with numpy:

- per-rank slowdowns (a straggler, or seeded noise on every rank's compute): a synchronous policy's step
  waits for the slowest rank (the bubble); `ps` under ssp lets a rank run up to s steps ahead of the
  slowest applied step; under async nobody waits, and the servers' queue is played event by event (each
  push served in arrival order, its reply sent when served);
- uneven pipeline stages are played by the schedule simulator inside `predict` already.

`simulate(exp, cluster, steps, slowdowns, noise, seed)` returns the mean step of rank 0 and of the
slowest rank, the bubble, the number of groups played and the seconds the simulation took.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass

import numpy as np

from polytrain.config import Experiment
from polytrain.perf.cluster import Cluster
from polytrain.perf.predict import FLOAT_BYTES, Prediction, predict, run_workload, shard_bytes


@dataclass(frozen=True)
class Simulated:
    step_s: float  # rank 0's mean step
    slowest_step_s: float  # the mean step of the rank that finishes last
    bubble_s: float  # rank 0's mean wait for others
    ranks: int
    groups: int  # rank classes simulated (1: symmetric, the analytic prediction)
    steps: int
    elapsed_s: float  # how long the simulation took
    prediction: Prediction  # the symmetric replica's analytic step

    def to_dict(self) -> dict:
        return {"step_s": self.step_s, "slowest_step_s": self.slowest_step_s, "bubble_s": self.bubble_s,
                "ranks": self.ranks, "groups": self.groups, "steps": self.steps, "elapsed_s": self.elapsed_s,
                "prediction": self.prediction.to_dict()}


def _factors(ranks: int, steps: int, slowdowns: dict[int, float] | None, noise: float, seed: int) -> np.ndarray:
    """(steps, ranks) multipliers of every rank's compute: its slowdown times lognormal noise of sigma `noise`."""
    factors = np.ones((steps, ranks))
    for rank, slowdown in (slowdowns or {}).items():
        if not 0 <= rank < ranks:
            raise ValueError(f"slowdown for rank {rank}, but the run has ranks 0 .. {ranks - 1}")
        factors[:, rank] *= slowdown
    if noise > 0:
        factors *= np.random.default_rng(seed).lognormal(0.0, noise, size=(steps, ranks))
    return factors


def simulate(exp: Experiment, cluster: Cluster, steps: int = 20, slowdowns: dict[int, float] | None = None,
             noise: float = 0.0, seed: int = 0) -> Simulated:
    """Simulates `steps` steps of `exp` (workers = its dp ranks) on `cluster` (see the module docstring).

    `slowdowns` maps ranks to compute multipliers (exp.straggler is one more); `noise` is the sigma of
    seeded lognormal noise on every rank's compute in every step."""
    from polytrain.train.defaults import resolve

    started = time.perf_counter()
    exp = resolve(exp)
    slowdowns = dict(slowdowns or {})
    if exp.straggler:
        slowdowns[int(exp.straggler["rank"])] = float(exp.straggler.get("slowdown", 1.0)) * \
            slowdowns.get(int(exp.straggler["rank"]), 1.0)
    symmetric = dataclasses.replace(exp, straggler={}) if exp.straggler else exp
    base = predict(symmetric, cluster)
    ranks = base.mesh.get("dp", exp.workers)
    if not slowdowns and noise == 0:
        return Simulated(base.step_s, base.step_s, base.bubble_s, ranks, 1, steps, time.perf_counter() - started, base)
    factors = _factors(ranks, steps, slowdowns, noise, seed)
    compute = base.compute_s * factors  # (steps, ranks)
    rest = base.step_s - base.compute_s - base.bubble_s  # exposed communication and overhead
    mode = exp.strategy_args.get("mode", "sync") if exp.strategy == "ps" else "sync"
    if exp.strategy == "ps" and mode == "async":
        finish = _async_servers(exp, cluster, base, compute)
    elif exp.strategy == "ps" and mode == "ssp":
        finish = _bounded(compute, rest, int(exp.strategy_args.get("staleness") or 0))
    else:  # every step waits for the slowest rank (allreduce, sync ps, gossip's neighbours, averaging)
        finish = _bounded(compute, rest, 0)
    rank0 = finish[-1, 0] / steps
    return Simulated(float(rank0), float(finish[-1].max() / steps), float(rank0 - compute[:, 0].mean() - rest),
                     ranks, ranks, steps, time.perf_counter() - started, base)


def _bounded(compute: np.ndarray, rest: float, staleness: int) -> np.ndarray:
    """End times (steps, ranks). Bulk-synchronous (staleness 0): step t ends on every rank when the slowest
    has computed it, plus the step's communication and overhead. Stale-synchronous: a rank starts step t
    once every rank has finished step t - 1 - staleness."""
    steps, ranks = compute.shape
    finish = np.zeros((steps, ranks))
    done = np.zeros(ranks)
    for t in range(steps):
        if staleness == 0:
            done = np.full(ranks, (done + compute[t]).max() + rest)
        else:
            gate = finish[t - 1 - staleness].max() if t - 1 - staleness >= 0 else 0.0
            done = np.maximum(done, gate) + compute[t] + rest
        finish[t] = done
    return finish


def _async_servers(exp: Experiment, cluster: Cluster, base: Prediction, compute: np.ndarray) -> np.ndarray:
    """Downpour: every worker computes, pushes its gradient and waits for the reply; each server serves
    pushes in arrival order, a push taking its shard's transfer and the optimizer step."""
    from polytrain.strategies.ps import ParameterServerArgs

    args = ParameterServerArgs(**exp.strategy_args)
    steps, ranks = compute.shape
    link = cluster.p2p_link(ranks + args.servers)
    heaviest = max(shard_bytes(run_workload(exp), args.servers))
    serve_s = heaviest * link.beta_s_per_byte + link.alpha_s + cluster.compute.update_s(
        heaviest // FLOAT_BYTES, exp.optimizer, cluster.ranks_sharing(ranks + args.servers))
    own_s = base.exposed_comm_s + base.overhead_s  # the worker's own transfers and step costs
    finish = np.zeros((steps, ranks))
    events = [(compute[0, r], r, 0) for r in range(ranks)]  # (push arrives at the servers, rank, step)
    heapq.heapify(events)
    server_free = 0.0
    while events:
        arrival, rank, step = heapq.heappop(events)
        server_free = max(server_free, arrival) + serve_s
        finish[step, rank] = server_free + own_s
        if step + 1 < steps:
            heapq.heappush(events, (finish[step, rank] + compute[step + 1, rank], rank, step + 1))
    return finish
