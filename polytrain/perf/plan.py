"""`polytrain plan`: every candidate way to run a model on a cluster, ranked by predicted step.

Candidates for R ranks (`--workers`): allreduce with each algorithm at bucket sizes 1, 4 and 25 MiB;
parameter servers (sync, 1 / 2 / 4 servers among the R ranks); pipelines (dp x pp for each pp dividing R
that the model has modules for, gpipe and 1f1b, 1 / 2 / 4 microbatches per stage); tensor parallelism (dp x
tp, tp = 2, 4 where the model has pairs of layers to split). These compute what one worker computes (the
same updates up to float reassociation). `--approximate` adds what changes the optimisation: gradient
compressors (fp16, powersgd, topk), local SGD (H = 4, 16), asynchronous servers and gossip; the table
marks them. Candidates whose predicted memory per rank exceeds `--memory-per-rank` are dropped, and so are
those `polytrain.train.defaults.resolve` refuses.

A plan file is a TOML config of the chosen settings with the prediction in comments, so that
`polytrain train --plan FILE` (or `--config FILE`) runs it as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.config import ConfigError, Experiment, toml_value
from polytrain.perf.cluster import Cluster
from polytrain.perf.predict import Prediction, predict, run_workload

BUCKETS_MB = (1.0, 4.0, 25.0)
SERVER_COUNTS = (1, 2, 4)
MICROBATCHES_PER_STAGE = (1, 2, 4)
COMPRESSORS = ("fp16", "powersgd", "topk")
PERIODS = (4, 16)


@dataclass(frozen=True)
class Candidate:
    settings: dict  # Experiment overrides
    label: str
    exact: bool  # computes the one-worker updates (up to float reassociation)


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    prediction: Prediction


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def candidates(exp: Experiment, ranks: int, approximate: bool = False) -> list[Candidate]:
    """Every candidate of the module docstring for `ranks` ranks of `exp`'s model and batch."""
    out: list[Candidate] = []
    algorithms = [name for name in ALLREDUCE_ALGORITHMS.names()]
    for algorithm in algorithms:
        for bucket in BUCKETS_MB:
            out.append(Candidate({"workers": ranks, "strategy": "allreduce",
                                  "strategy_args": {"algorithm": algorithm, "bucket_mb": bucket}},
                                 f"allreduce {algorithm}, {bucket:g} MiB buckets", True))
    for servers in SERVER_COUNTS:
        if ranks - servers >= 2:
            out.append(Candidate({"workers": ranks - servers, "strategy": "ps",
                                  "strategy_args": {"servers": servers, "mode": "sync"}},
                                 f"ps sync, {servers} server(s) + {ranks - servers} workers", True))
    blocks = len(run_workload(exp).blocks)
    for pp in _divisors(ranks):
        if pp > blocks:
            continue
        for schedule in ("gpipe", "1f1b"):
            for per_stage in MICROBATCHES_PER_STAGE:
                out.append(Candidate({"workers": ranks, "mesh": {"dp": ranks // pp, "pp": pp},
                                      "step_schedule": schedule, "microbatches": per_stage * pp,
                                      "strategy": "allreduce" if ranks > pp else "local", "strategy_args": {}},
                                     f"dp {ranks // pp} x pp {pp}, {schedule}, {per_stage * pp} microbatches", True))
    for tp in (2, 4):
        if ranks % tp == 0:
            out.append(Candidate({"workers": ranks, "mesh": {"dp": ranks // tp, "tp": tp},
                                  "strategy": "allreduce" if ranks > tp else "local", "strategy_args": {}},
                                 f"dp {ranks // tp} x tp {tp}", True))
    if approximate:
        for compressor in COMPRESSORS:
            out.append(Candidate({"workers": ranks, "strategy": "allreduce", "strategy_args": {},
                                  "compressor": compressor}, f"allreduce + {compressor}", False))
        for period in PERIODS:
            out.append(Candidate({"workers": ranks, "strategy": "local_sgd", "strategy_args": {"period": period}},
                                 f"local SGD, H = {period}", False))
        out.append(Candidate({"workers": ranks - 1, "strategy": "ps", "strategy_args": {"servers": 1, "mode": "async"}},
                             "ps async, 1 server", False))
        out.append(Candidate({"workers": ranks, "strategy": "gossip", "strategy_args": {"topology": "ring"}},
                             "gossip, ring", False))
    return out


def rank_candidates(exp: Experiment, cluster: Cluster, ranks: int, memory_per_rank: float | None = None,
                    approximate: bool = False) -> tuple[list[Ranked], list[tuple[Candidate, str]]]:
    """Candidates ranked by predicted step (fastest first), and the dropped ones with why."""
    from polytrain.train.defaults import resolve

    limit = memory_per_rank if memory_per_rank is not None else cluster.memory_per_rank_bytes
    ranked, dropped = [], []
    for candidate in candidates(exp, ranks, approximate):
        settings = {"mesh": {}, "step_schedule": "accumulate", "microbatches": 1, "compressor": None,
                    **candidate.settings}
        try:
            trial = resolve(dataclasses.replace(exp, **settings))
            prediction = predict(trial, cluster)
        except (ValueError, ConfigError) as error:
            dropped.append((candidate, str(error)))
            continue
        if limit is not None and prediction.memory_per_rank_bytes > limit:
            dropped.append((candidate, f"needs {prediction.memory_per_rank_bytes / 2**20:.1f} MiB per rank, "
                                       f"over the limit of {limit / 2**20:.1f} MiB"))
            continue
        ranked.append(Ranked(candidate, prediction))
    ranked.sort(key=lambda r: r.prediction.step_s)
    return ranked, dropped


def write_plan(path: str | Path, exp: Experiment, chosen: Ranked, cluster: Cluster) -> Path:
    """The chosen candidate as a TOML config (`polytrain train --plan FILE`), its prediction in comments."""
    from polytrain.train.io import atomic_write_bytes

    p = chosen.prediction
    lines = [f"# polytrain plan: {chosen.candidate.label}",
             f"# on {cluster.name}: predicted step {1e3 * p.step_s:.3f} ms = {p.split}",
             f"# bytes sent per rank and step {p.bytes_sent_per_rank:.0f}, memory per rank "
             f"{p.memory_per_rank_bytes / 2**20:.1f} MiB; compute from {p.compute_source}",
             f"model = {toml_value(exp.model)}", f"dataset = {toml_value(exp.dataset)}",
             f"batch_size = {exp.batch_size}"]
    settings = {"mesh": {}, "step_schedule": "accumulate", "microbatches": 1, **chosen.candidate.settings}
    for key, value in settings.items():
        if value is None:
            continue
        lines.append(f"{key} = {toml_value(value)}")
    if exp.model_args:
        lines.append(f"model_args = {toml_value(exp.model_args)}")
    target = Path(path)
    atomic_write_bytes(target, ("\n".join(lines) + "\n").encode())
    return target
