"""The step time of a run, predicted from its Experiment, its workload and a cluster.

`predict(exp, cluster)` splits one training step of rank 0 (a dp replica's first rank) into

- compute: its forward and backward passes (every microbatch; a pipeline stage's busy time),
- exposed communication: the part of its transfers that no computation hides,
- bubble: a pipeline's idle time, or the wait for slower ranks (stragglers) and busy servers,
- overhead: the optimizer step, compression, data and framework time of a step,

beside its training bytes sent per step and its memory (the cost model's training memory of its part).

Each update policy has a model in PREDICTORS (a registry: a new strategy registers its own). Synchronous
data parallelism plays the allreduce buckets as `polytrain.strategies.allreduce` cuts and launches them:
bucket k is ready when backward has produced its last gradient, buckets go through one communication
thread in order, and what finishes after backward is exposed; the cluster's calibrated `overlap` says how
much of the hidden part really was hidden. Pipelines are played by `polytrain.schedules.pipeline.simulate`
on the schedule's own action lists, with each stage's times and each boundary's transfer time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.mesh import MeshShape
from polytrain.config import Experiment
from polytrain.cost.memory import optimizer_state
from polytrain.perf.cluster import Cluster
from polytrain.perf.workload import Workload, workload
from polytrain.registry import Registry

MB = 1 << 20
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Prediction:
    """One predicted training step of rank 0 (seconds; bytes per step)."""

    step_s: float
    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    overhead_s: float
    comm_s: float  # every transfer on rank 0's path, hidden or not
    bytes_sent_per_rank: float
    memory_per_rank_bytes: int
    strategy: str
    cluster: str
    compute_source: str
    mesh: dict
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def split(self) -> str:
        return (f"compute {1e3 * self.compute_s:.2f} ms + exposed comm {1e3 * self.exposed_comm_s:.2f} ms "
                f"+ bubble {1e3 * self.bubble_s:.2f} ms + overhead {1e3 * self.overhead_s:.2f} ms")


@dataclass
class Parts:
    """What a strategy's model adds to the replica's compute."""

    exposed_comm_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: float = 0.0
    bubble_s: float = 0.0
    overhead_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    updates_locally: bool = True  # the rank runs the optimizer step (not on a parameter server)


@dataclass
class Context:
    """A run as the models see it: rank 0's mesh position, batches, and its modules' times."""

    exp: Experiment
    cluster: Cluster
    workload: Workload
    shape: MeshShape
    servers: int
    microbatch: int
    times: list[tuple[float, float]]  # (forward, backward) s of every top-level module at `microbatch`
    tp_blocks: frozenset = frozenset()

    @property
    def dp(self) -> int:
        return self.shape.dp

    @property
    def microbatches(self) -> int:
        return self.exp.microbatches

    @property
    def ranks_sharing(self) -> int:
        return self.cluster.ranks_sharing(self.shape.world_size + self.servers)

    @property
    def args(self) -> dict:
        return self.exp.strategy_args

    def block_params(self, block: int) -> int:
        params = self.workload.blocks[block].params
        return params // self.shape.tp if block in self.tp_blocks else params

    @property
    def compute_s(self) -> float:
        return self.microbatches * sum(f + b for f, b in self.times)

    def gradient_bytes(self) -> float:
        return FLOAT_BYTES * sum(self.block_params(i) for i in range(len(self.workload.blocks)))

    def allreduce_s(self, n_bytes: float, algorithm: str | None = None) -> float:
        return self.cluster.allreduce_s(algorithm or self.args.get("algorithm", "native"), n_bytes, self.dp)

    def allreduce_bytes_sent(self, n_bytes: float, algorithm: str | None = None) -> float:
        if self.dp < 2 or n_bytes <= 0:
            return 0.0
        return ALLREDUCE_ALGORITHMS.get(algorithm or self.args.get("algorithm", "native")).bytes_sent(
            int(n_bytes), self.dp, 0, FLOAT_BYTES)


PREDICTORS: Registry[Callable[[Context], Parts]] = Registry("performance model")


@functools.lru_cache(maxsize=32)
def _dataset_shape(name: str, seed: int, test_fraction: float, args: tuple) -> tuple[tuple[int, ...], int]:
    from polytrain.data import load_dataset

    data = load_dataset(name, seed=seed, test_fraction=test_fraction, **dict(args))
    return tuple(data.in_shape), int(data.num_classes)


def run_workload(exp: Experiment) -> Workload:
    """The workload of a resolved Experiment's model on its dataset's samples."""
    shape, classes = _dataset_shape(exp.dataset, exp.seed, exp.test_fraction,
                                    tuple(sorted((k, v) for k, v in exp.dataset_args.items())))
    return workload(exp.model, shape, classes, exp.model_args)


def measured_step_s(history: list[dict]) -> float | None:
    """A run's measured step: the median over the epochs after the first (which warms up) of train_s / steps."""
    import statistics

    rated = [row for row in (history[1:] or history) if row.get("steps")]
    return statistics.median(row["train_s"] / row["steps"] for row in rated) if rated else None


def beside_measured(exp: Experiment, history: list[dict]) -> dict:
    """result.json's `performance`: the predicted step on this machine's calibration profile beside the
    measured one (bandwidth from POLYTRAIN_BANDWIDTH, set on the emulated cluster's hosts), or why there is
    no prediction. Never raises: a prediction must not cost a finished run its result."""
    import os

    from polytrain.perf.profile import default_profile_path, load_profile

    path = default_profile_path()
    measured = measured_step_s(history)
    if not path.is_file():
        return {"predicted_step_s": None, "measured_step_s": measured,
                "why": f"no calibration profile at {path} (polytrain calibrate)"}
    try:
        bandwidth = os.environ.get("POLYTRAIN_BANDWIDTH", "none")
        prediction = predict(exp, load_profile(path).cluster(bandwidth, exp.workers + _servers(exp)))
    except Exception as error:  # noqa: BLE001 - recorded, never fatal
        return {"predicted_step_s": None, "measured_step_s": measured, "why": f"{type(error).__name__}: {error}"}
    error = (prediction.step_s - measured) / measured if measured else None
    return {"predicted_step_s": prediction.step_s, "measured_step_s": measured, "relative_error": error,
            "bandwidth": bandwidth, "profile": str(path), "prediction": prediction.to_dict()}


def _servers(exp: Experiment) -> int:
    if exp.strategy in ("ps", "easgd"):
        return int(exp.strategy_args.get("servers", 1 if exp.strategy == "ps" else 0))
    return 0


def _tp_blocks(exp: Experiment, wl: Workload, tp: int) -> frozenset:
    if tp < 2:
        return frozenset()
    from polytrain.models import build_model
    from polytrain.parallel.tensor import plan

    with torch.device("meta"):
        model = build_model(wl.model, wl.num_classes, wl.input_shape, **dict(wl.model_args))
    names = [name for pair in plan(model, exp.tp_plan) for name in (pair.column, *pair.between, pair.row)]
    return frozenset(wl.block_index(name) for name in names)


def predict(exp: Experiment, cluster: Cluster, wl: Workload | None = None) -> Prediction:
    """The predicted step of rank 0 of `exp` (resolved or not) on `cluster`."""
    from polytrain.train.defaults import resolve

    exp = resolve(exp)
    if exp.strategy not in PREDICTORS:
        raise ValueError(f"no performance model for strategy {exp.strategy} yet; modelled: "
                         f"{', '.join(PREDICTORS.names())}")
    wl = wl or run_workload(exp)
    shape = MeshShape.from_sizes(exp.mesh) if exp.mesh else MeshShape.from_sizes({"dp": exp.workers})
    servers = _servers(exp)
    microbatch = max(1, exp.batch_size // shape.dp // exp.microbatches)
    tp_blocks = _tp_blocks(exp, wl, shape.tp)
    sharing = cluster.ranks_sharing(shape.world_size + servers)
    times = cluster.compute.block_times(wl, microbatch, sharing)
    times = [(f / shape.tp, b / shape.tp) if i in tp_blocks else (f, b) for i, (f, b) in enumerate(times)]
    context = Context(exp, cluster, wl, shape, servers, microbatch, times, tp_blocks)
    if shape.pp > 1:
        compute_s, parts = _pipeline(context)
    else:
        compute_s, parts = context.compute_s, Parts()
        _tensor_parallel(context, parts)
    policy = PREDICTORS.get(exp.strategy)(context)
    params_on_rank = int(context.gradient_bytes() / FLOAT_BYTES)
    if shape.pp > 1:
        params_on_rank = _stage_params(context, 0)
    update_s = cluster.compute.update_s(params_on_rank, exp.optimizer, sharing) if policy.updates_locally else 0.0
    overhead = update_s + cluster.compute.step_overhead_s(wl, exp.batch_size // shape.dp, sharing) + policy.overhead_s
    bubble = parts.bubble_s + policy.bubble_s
    exposed = parts.exposed_comm_s + policy.exposed_comm_s
    compute_s, bubble = _straggle(exp, compute_s, bubble, policy)
    source = cluster.compute.source
    if hasattr(cluster.compute, "uses_measurements") and cluster.compute.uses_measurements(wl):
        source = "measured modules"
    return Prediction(step_s=compute_s + exposed + bubble + overhead, compute_s=compute_s, exposed_comm_s=exposed,
                      bubble_s=bubble, overhead_s=overhead, comm_s=parts.comm_s + policy.comm_s,
                      bytes_sent_per_rank=parts.bytes_sent + policy.bytes_sent,
                      memory_per_rank_bytes=_memory(context), strategy=exp.strategy, cluster=cluster.name,
                      compute_source=source, mesh=shape.sizes(), notes=tuple(parts.notes + policy.notes))


def _straggle(exp: Experiment, compute_s: float, bubble_s: float, parts: Parts) -> tuple[float, float]:
    """A straggler (`--straggler rank=R,slowdown=S`) stretches its compute S times; synchronous policies wait
    for it (the bubble), asynchronous ones do not (the simulator plays them: polytrain.perf.simulate)."""
    if not exp.straggler:
        return compute_s, bubble_s
    slowdown = float(exp.straggler.get("slowdown", 1.0))
    waits = exp.strategy not in ASYNCHRONOUS or exp.strategy_args.get("mode", "sync") != "async"
    if exp.straggler.get("rank", 0) == 0:
        return compute_s * slowdown, bubble_s
    return compute_s, bubble_s + ((slowdown - 1) * compute_s if waits else 0.0)


ASYNCHRONOUS = ("ps",)  # policies with an asynchronous mode


# -- data parallelism ------------------------------------------------------------------------------------


def buckets(ctx: Context, bucket_mb: float) -> list[tuple[list[int], int]]:
    """The allreduce buckets of rank 0 as polytrain.strategies.allreduce cuts them: parameters in reverse
    registration order, a bucket closed once it holds bucket_mb; (parameter indices, bytes) each."""
    limit, cuts, current, size = int(bucket_mb * MB), [], [], 0
    parameters = ctx.workload.parameters
    for index in reversed(range(len(parameters))):
        _, shape, block = parameters[index]
        current.append(index)
        size += FLOAT_BYTES * math.prod(shape) // (ctx.shape.tp if block in ctx.tp_blocks else 1)
        if size >= limit:
            cuts.append((current, size))
            current, size = [], 0
    if current:
        cuts.append((current, size))
    return cuts


def overlap_timeline(ready_s: list[float], transfer_s: list[float], backward_end_s: float, overlap: float,
                     overlapped: bool) -> float:
    """Exposed seconds of transfers through one thread in order, each starting when ready and after the
    one before; `overlap` in [0, 1] of what the timeline hides counts as hidden (1: all of it)."""
    total = sum(transfer_s)
    if not overlapped:
        return total
    end = 0.0
    for ready, seconds in zip(ready_s, transfer_s):
        end = max(end, ready) + seconds
    exposed = max(0.0, end - backward_end_s)
    return exposed + (1.0 - overlap) * (min(total, backward_end_s + total) - exposed)


def _ready_times(ctx: Context) -> list[float]:
    """When the last microbatch's backward has produced each block's gradients (from the step's start)."""
    before = ctx.compute_s - sum(b for _, b in ctx.times)
    ready, clock = [0.0] * len(ctx.times), before
    for block in reversed(range(len(ctx.times))):
        clock += ctx.times[block][1]
        ready[block] = clock
    return ready


def _bucket_payload(ctx: Context, indices: list[int], compressor) -> tuple[str, float, float]:
    """(aggregation, payload bytes on the wire per rank, raw bytes) of one bucket under `compressor`."""
    raw, payload, kinds = 0.0, 0.0, set()
    for index in indices:
        name, shape, _ = ctx.workload.parameters[index]
        raw += FLOAT_BYTES * math.prod(shape)
        chosen = compressor.select(name, torch.empty(shape, device="meta"))
        kinds.add(chosen.aggregation)
        payload += (chosen.payload_bytes_for_shape(shape) if hasattr(chosen, "payload_bytes_for_shape")
                    else chosen.payload_bytes(math.prod(shape)))
    kind = "gather" if "gather" in kinds else ("sparse" if "sparse" in kinds else "sum")
    return kind, payload, raw


@PREDICTORS.register("allreduce")
def allreduce(ctx: Context) -> Parts:
    from polytrain.strategies.allreduce import AllReduceArgs

    args = AllReduceArgs(**ctx.args)
    parts = Parts()
    if ctx.dp < 2:
        return parts
    cuts = buckets(ctx, args.bucket_mb)
    compressor = None
    if ctx.exp.compressor:
        from polytrain.compress import build_compressor

        compressor = build_compressor(ctx.exp.compressor, ctx.exp.compressor_args)
    ready = _ready_times(ctx)
    transfers, readies = [], []
    for indices, size in cuts:
        readies.append(min(ready[ctx.workload.parameters[i][2]] for i in indices) if ctx.shape.pp == 1 else
                       ctx.compute_s)
        if compressor is None:
            transfers.append(ctx.allreduce_s(size, args.algorithm))
            parts.bytes_sent += ctx.allreduce_bytes_sent(size, args.algorithm)
            continue
        kind, payload, raw = _bucket_payload(ctx, indices, compressor)
        parts.overhead_s += ctx.cluster.compute.compression_s(ctx.exp.compressor, raw, ctx.ranks_sharing)
        if kind == "sum":
            transfers.append(ctx.allreduce_s(payload, args.algorithm))
            parts.bytes_sent += ctx.allreduce_bytes_sent(payload, args.algorithm)
        else:  # gathered (and sparse payloads, whose SparCML exchange moves about as much): (p - 1) payloads
            transfers.append(ctx.cluster.allgather_s(payload, ctx.dp))
            parts.bytes_sent += (ctx.dp - 1) * payload
    if ctx.exp.aggregator:  # the whole gradient is all-gathered after backward instead
        transfers = [ctx.cluster.allgather_s(ctx.gradient_bytes(), ctx.dp)]
        readies, parts.bytes_sent = [ctx.compute_s], (ctx.dp - 1) * ctx.gradient_bytes()
    parts.comm_s = sum(transfers)
    # Buckets (compressed ones too) start as backward produces them; an aggregator waits for the whole.
    parts.exposed_comm_s = overlap_timeline(readies, transfers, ctx.compute_s, ctx.cluster.overlap,
                                            args.overlap and not ctx.exp.aggregator)
    parts.notes.append(f"{len(cuts)} bucket(s) of <= {args.bucket_mb:g} MiB, {args.algorithm}")
    return parts


@PREDICTORS.register("ddp")
def ddp(ctx: Context) -> Parts:
    """torch's DDP: its buckets overlapped with backward, each summed by gloo's allreduce (`native`); its
    smaller first bucket (1 MiB) is not modelled apart."""
    bucket_mb = ctx.args.get("bucket_mb", 25.0)
    as_allreduce = ctx.exp.replace(strategy="allreduce", strategy_args={"algorithm": "native", "bucket_mb": bucket_mb})
    return allreduce(dataclasses.replace(ctx, exp=as_allreduce))


@PREDICTORS.register("local")
def local(ctx: Context) -> Parts:
    return Parts()


def _periodic_average(ctx: Context, period: int, algorithm: str) -> Parts:
    size = ctx.gradient_bytes()
    seconds = ctx.allreduce_s(size, algorithm)
    return Parts(exposed_comm_s=seconds / period, comm_s=seconds / period,
                 bytes_sent=ctx.allreduce_bytes_sent(size, algorithm) / period,
                 notes=[f"one {algorithm} allreduce of the parameters every {period} steps"])


@PREDICTORS.register("local_sgd")
def local_sgd(ctx: Context) -> Parts:
    from polytrain.strategies.local_sgd import LocalSGDArgs

    args = LocalSGDArgs(**ctx.args)
    return _periodic_average(ctx, args.period, args.algorithm)


@PREDICTORS.register("diloco")
def diloco(ctx: Context) -> Parts:
    from polytrain.strategies.local_sgd import DiLoCoArgs

    args = DiLoCoArgs(**ctx.args)
    parts = _periodic_average(ctx, args.period, args.algorithm)
    parts.overhead_s += ctx.cluster.compute.update_s(int(ctx.gradient_bytes() / FLOAT_BYTES), "nesterov",
                                                     ctx.ranks_sharing) / args.period
    return parts


@PREDICTORS.register("easgd")
def easgd(ctx: Context) -> Parts:
    from polytrain.strategies.easgd import EASGDArgs

    args = EASGDArgs(**ctx.args)
    if args.servers == 0:
        return _periodic_average(ctx, args.tau, args.algorithm)
    size = ctx.gradient_bytes()
    link = ctx.cluster.p2p_link(ctx.dp + args.servers)
    seconds = 2 * link.transfer_s(size, args.servers) + 2 * ctx.dp * size / args.servers * link.beta_s_per_byte
    return Parts(exposed_comm_s=seconds / args.tau, comm_s=seconds / args.tau, bytes_sent=size / args.tau,
                 notes=[f"elastic exchange with {args.servers} server(s) every {args.tau} steps"])


@PREDICTORS.register("hogwild")
def hogwild(ctx: Context) -> Parts:
    return Parts(notes=["shared memory: no bytes sent"])


def _neighbours(topology: str, p: int) -> int:
    from polytrain.strategies.gossip import TOPOLOGIES

    return len(TOPOLOGIES.get(topology)(0, p))


@PREDICTORS.register("gossip")
def gossip(ctx: Context) -> Parts:
    topology = ctx.args.get("topology", "ring")
    degree = _neighbours(topology, ctx.dp)
    size = ctx.gradient_bytes()
    link = ctx.cluster.p2p_link(ctx.dp)
    seconds = link.transfer_s(degree * size, degree)  # posted together: the rank's link carries k models
    return Parts(exposed_comm_s=seconds, comm_s=seconds, bytes_sent=degree * size,
                 notes=[f"{topology}: {degree} neighbour(s) per step"])


@PREDICTORS.register("adpsgd")
def adpsgd(ctx: Context) -> Parts:
    size = ctx.gradient_bytes()
    link = ctx.cluster.p2p_link(ctx.dp)
    seconds = 2 * link.transfer_s(size)  # half the ranks start an exchange each step, each ships a model each way
    return Parts(exposed_comm_s=seconds / 2, comm_s=seconds / 2, bytes_sent=size / 2,
                 notes=["active ranks average with one passive partner per step"])


# -- parameter servers -----------------------------------------------------------------------------------


def shard_bytes(wl: Workload, servers: int) -> list[int]:
    """Bytes of each server's shard: whole tensors, largest first onto the least loaded (as ps does)."""
    loads = [0] * servers
    for size in sorted((FLOAT_BYTES * math.prod(shape) for _, shape, _ in wl.parameters), reverse=True):
        loads[loads.index(min(loads))] += size
    return loads


@PREDICTORS.register("ps")
def parameter_server(ctx: Context) -> Parts:
    from polytrain.strategies.ps import ParameterServerArgs

    args = ParameterServerArgs(**ctx.args)
    size = ctx.gradient_bytes()
    heaviest = max(shard_bytes(ctx.workload, args.servers))
    contributors = args.groups or ctx.dp
    link = ctx.cluster.p2p_link(ctx.dp + args.servers)
    beta = link.beta_s_per_byte
    # One direction of one round: the worker's link carries its model, the busiest server's link one shard
    # from every contributor; full-duplex links carry pushes and pulls at once.
    worker_way = link.transfer_s(size, args.servers)
    server_way = contributors * heaviest * beta + contributors * link.alpha_s
    group_way = 0.0
    if args.groups:
        members = -(-ctx.dp // args.groups)
        group_way = (members - 1) * size * beta + link.alpha_s
    apply_s = ctx.cluster.compute.update_s(heaviest // FLOAT_BYTES, ctx.exp.optimizer, ctx.ranks_sharing)
    one_way = max(worker_way, server_way) + group_way
    parts = Parts(bytes_sent=size / (args.push_every if args.mode == "async" else 1), updates_locally=False)
    if args.mode == "async":
        own = worker_way / args.push_every + worker_way / args.fetch_every
        serve = contributors * (heaviest * beta + link.alpha_s + apply_s) / args.push_every
        cycle = ctx.compute_s + own
        parts.exposed_comm_s, parts.comm_s = own, own
        parts.bubble_s = max(0.0, serve - cycle)  # the servers cannot keep up: workers wait for replies
        parts.notes.append("asynchronous: workers wait for no one; servers apply each push on arrival")
        return parts
    round_s = 2 * one_way + apply_s
    parts.comm_s = 2 * one_way
    if args.mode == "ssp" and (args.staleness or 0) > 0:
        # Pulls of step t may arrive while step t+1 computes: a worker is bound by the slower of its own
        # compute + push and the servers' round.
        own = ctx.compute_s + worker_way
        parts.exposed_comm_s = max(0.0, max(own, round_s) - ctx.compute_s)
        parts.notes.append(f"ssp staleness {args.staleness}: rounds overlap the next steps' compute")
    else:
        parts.exposed_comm_s = round_s
        parts.notes.append(f"{args.mode}: push, apply on {args.servers} server(s), pull")
    return parts


# -- model parallelism -----------------------------------------------------------------------------------


def _tensor_parallel(ctx: Context, parts: Parts) -> None:
    """Megatron pairs: one allreduce of the row layer's output in forward and one of the column layer's input
    gradient in backward (where there is one), per microbatch, over the tp ranks (not hidden: the next
    layer needs them)."""
    tp = ctx.shape.tp
    if tp < 2:
        return
    from polytrain.models import build_model
    from polytrain.parallel.tensor import plan

    wl = ctx.workload
    with torch.device("meta"):
        model = build_model(wl.model, wl.num_classes, wl.input_shape, **dict(wl.model_args))
    seconds = sent = 0.0
    for pair in plan(model, ctx.exp.tp_plan):
        column, row = wl.block_index(pair.column), wl.block_index(pair.row)
        inputs = wl.blocks[column - 1].output_elements if column > 0 else wl.input_elements
        # The input gradient is reduced only where autograd computes one: after a layer with parameters.
        needs_grad = any(block.params for block in wl.blocks[:column])
        for elements in (wl.blocks[row].output_elements, inputs if needs_grad else 0):
            if not elements:
                continue
            n_bytes = FLOAT_BYTES * elements * ctx.microbatch
            seconds += ctx.cluster.allreduce_s("native", n_bytes, tp)
            sent += ALLREDUCE_ALGORITHMS.get("native").bytes_sent(int(n_bytes), tp, 0, FLOAT_BYTES)
    parts.exposed_comm_s += ctx.microbatches * seconds
    parts.comm_s += ctx.microbatches * seconds
    parts.bytes_sent += ctx.microbatches * sent
    parts.notes.append(f"tp {tp}: {len(plan(model, ctx.exp.tp_plan))} split pair(s)")


def stage_cuts(ctx: Context) -> list[int]:
    from polytrain.parallel.pipeline import balanced_cuts

    stages = ctx.shape.pp * _chunks(ctx)
    partition = ctx.exp.partition
    if not isinstance(partition, str):
        return [0, *partition, len(ctx.workload.blocks)]
    costs = ([f + b for f, b in ctx.times] if partition == "time" else
             [block.flops_forward + block.flops_backward for block in ctx.workload.blocks])
    return balanced_cuts(costs, stages)


def _chunks(ctx: Context) -> int:
    from polytrain.schedules import STEP_SCHEDULES

    return ctx.exp.virtual_stages if getattr(STEP_SCHEDULES.get(ctx.exp.step_schedule), "interleaves", False) else 1


def _stage_params(ctx: Context, rank: int) -> int:
    cuts, chunks = stage_cuts(ctx), _chunks(ctx)
    stages = [rank + k * ctx.shape.pp for k in range(chunks)]
    return sum(ctx.block_params(i) for s in stages for i in range(cuts[s], cuts[s + 1]))


def _pipeline(ctx: Context) -> tuple[float, Parts]:
    """Plays the schedule's actions with every virtual stage's times and boundary transfers; returns rank 0's
    busy seconds and the bubble (the rest of the slowest rank's span)."""
    from polytrain.schedules import STEP_SCHEDULES
    from polytrain.schedules.pipeline import simulate

    cuts, chunks, pp = stage_cuts(ctx), _chunks(ctx), ctx.shape.pp
    forward = [sum(f for f, _ in ctx.times[cuts[s]:cuts[s + 1]]) for s in range(len(cuts) - 1)]
    backward = [sum(b for _, b in ctx.times[cuts[s]:cuts[s + 1]]) for s in range(len(cuts) - 1)]
    link = ctx.cluster.p2p_link(pp)
    boundary = [FLOAT_BYTES * ctx.microbatch * ctx.workload.blocks[cuts[s + 1] - 1].output_elements
                // (ctx.shape.tp if cuts[s + 1] - 1 in ctx.tp_blocks else 1) for s in range(len(cuts) - 2)]
    messages = [link.transfer_s(n) for n in boundary] + [0.0]
    schedule = STEP_SCHEDULES.get(ctx.exp.step_schedule)()
    played = simulate(schedule, ctx.microbatches, pp, chunks, forward_s=forward, backward_s=backward,
                      message_s=messages, steps=1)
    span = played["span"]
    busy = played["busy"][0]
    # Rank 0 holds stages 0, pp, 2pp, ...: it sends activations forward from each and input gradients
    # back from each but the first.
    mine = range(0, len(cuts) - 1, pp)
    sent = ctx.microbatches * sum((boundary[s] if s < len(boundary) else 0) + (boundary[s - 1] if s > 0 else 0)
                                  for s in mine)
    parts = Parts(bubble_s=span - busy, comm_s=sum(messages) * ctx.microbatches, bytes_sent=sent,
                  notes=[f"pp {pp} x {chunks} chunk(s), cut at {cuts[1:-1]}; span {1e3 * span:.2f} ms"])
    _tensor_parallel(ctx, parts)
    return busy, parts


def _memory(ctx: Context) -> int:
    """Rank 0's training memory: the cost model's step peak for a replica; for a stage, its weights,
    gradients and optimizer state plus the activations its schedule keeps in flight."""
    exp, wl = ctx.exp, ctx.workload
    if ctx.shape.pp == 1 and ctx.shape.tp == 1:
        return wl.training_memory_bytes(ctx.microbatch, exp.optimizer)
    state = optimizer_state(exp.optimizer)
    params = _stage_params(ctx, 0) if ctx.shape.pp > 1 else int(ctx.gradient_bytes() / FLOAT_BYTES)
    per_param = FLOAT_BYTES * (2 + state.copies)
    blocks = range(len(wl.blocks))
    if ctx.shape.pp > 1:
        cuts = stage_cuts(ctx)
        blocks = [i for k in range(_chunks(ctx)) for i in range(cuts[k * ctx.shape.pp], cuts[k * ctx.shape.pp + 1])]
    saved = sum(wl.blocks[i].saved_bytes / (ctx.shape.tp if i in ctx.tp_blocks else 1) for i in blocks)
    in_flight = ctx.microbatches if exp.step_schedule == "gpipe" else min(ctx.microbatches, ctx.shape.pp)
    return int(params * per_param + saved * ctx.microbatch * max(1, in_flight))
