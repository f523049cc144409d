"""Pipeline parallelism: an nn.Sequential cut into contiguous stages over the ranks of the mesh's pp axis.

`cut_points(model, stages, input_shape, partition)` cuts where the user says (a list of module indices) or
balances the stages: by the cost model's arithmetic ("flops", the default: forward and backward FLOPs per
sample of each top-level module, polytrain.cost) or by measured time ("time": forward and backward of each
module on a microbatch, `module_times`): the contiguous partition whose most expensive stage is cheapest.
Top-level modules are kept whole (a residual block is one module), so a model with fewer top-level modules
than stages cannot be cut (one line, before any worker starts).

`PipelineStage` is a rank's part: the modules of its stage, or of its v virtual stages under an interleaved
schedule (its parameters are the only ones the update policy sees), the shapes of the activations it
receives (found by running the whole model once on a zero batch before it is cut), and the counted pp
communicator. With a tp axis the layers are split first (polytrain.parallel.tensor) and a stage's tp ranks
each send their share to the next stage's rank of the same tp index. Its `forward(x)` is the pipelined
forward of evaluation: the first stage reads x, every stage sends its output on, the last returns the
model's output and the others zeros of that shape (their numbers are not counted: `Session.sum` counts the
last stage's). Training runs through a pipeline step schedule (polytrain.schedules: gpipe, 1f1b,
interleaved, pipedream), which moves activations forward (`pp:activation`) and their gradients back (`pp:gradient`)
and records each step on the stage's timeline; `pipeline_report` turns the timelines into result.json's
measured bubble, microbatches in flight and activation memory.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict

import torch
from torch import nn

from polytrain.comm import BOOKKEEPING, Communicator
from polytrain.comm.gather import gather_objects
from polytrain.parallel.tensor import full_state_dict as tensor_state_dict
from polytrain.parallel.tensor import load_full_state_dict as load_tensor_state_dict


def _costs(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[float]:
    """Forward + backward FLOPs per sample of each top-level module (0 where no formula counts it)."""
    from polytrain.cost.model import model_cost

    rows = model_cost(model, input_shape).layers
    names = [name for name, _ in model.named_children()]
    totals = dict.fromkeys(names, 0.0)
    for row in rows:
        top = row.name.split(".")[0]
        if top in totals:
            totals[top] += row.flops_forward + row.flops_backward
    return [totals[name] for name in names]


PARTITIONS = ("flops", "time")  # or the user's cuts: a list of module indices


def check_partition(model: nn.Module, stages: int, partition: str | list) -> None:
    """Raises ValueError unless `model` is an nn.Sequential of at least `stages` top-level modules and
    `partition` is "flops", "time" or `stages - 1` increasing module indices in 1 .. len - 1 (where the
    second to the last stage begin)."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"pp cuts an nn.Sequential at its top-level modules; the model is a {type(model).__name__}")
    if stages > len(model):
        raise ValueError(f"pp {stages} cuts the model into {stages} stages at its top-level modules, but it has "
                         f"{len(model)}; use pp <= {len(model)}")
    if isinstance(partition, str):
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition '{partition}'; expected {' or '.join(PARTITIONS)}, or a list of "
                             f"the module indices where stages 2 to {stages} begin")
        return
    valid = (len(partition) == stages - 1 and all(isinstance(c, int) and not isinstance(c, bool) for c in partition)
             and list(partition) == sorted(set(partition)) and all(0 < c < len(model) for c in partition))
    if not valid:
        raise ValueError(f"partition {list(partition)}: expected {stages - 1} increasing module indices in 1 .. "
                         f"{len(model) - 1}, where stages 2 to {stages} of the {len(model)} top-level modules begin")


def cut_points(model: nn.Module, stages: int, input_shape: tuple[int, ...], partition: str | list = "flops",
               costs: list[float] | None = None) -> list[int]:
    """Indices [0, c1, ..., len] of the top-level modules where the `stages` stages begin (and the end): the
    user's `partition`, or balanced (`balanced_cuts`) by the cost model's FLOPs or by measured `costs`
    (partition "time": `module_times`, measured by the caller)."""
    check_partition(model, stages, partition)
    if not isinstance(partition, str):
        return [0, *partition, len(model)]
    if partition == "time":
        if costs is None or len(costs) != len(model):
            raise ValueError("partition 'time' balances measured times: give the costs of every top-level module")
        return balanced_cuts(costs, stages)
    return balanced_cuts(_costs(model, input_shape), stages)


def module_times(model: nn.Sequential, input_shape: tuple[int, ...], batch: int, repeats: int = 3) -> list[float]:
    """Median seconds of forward + backward of each top-level module of `model` on a batch of `batch` random
    samples, after one warm-up. A copy of the model runs (no gradient or batch-norm statistic of the run
    changes) inside a forked random stream (dropout draws nothing from the run's)."""
    import copy
    import time

    probe = copy.deepcopy(model).train()
    parameter = next(probe.parameters())
    synchronize = torch.cuda.synchronize if parameter.device.type == "cuda" else (lambda: None)
    times = []
    with torch.random.fork_rng(devices=[parameter.device] if parameter.device.type == "cuda" else []):
        torch.manual_seed(0)
        value = torch.randn(batch, *input_shape, dtype=parameter.dtype, device=parameter.device)
        for module in probe:
            samples = []
            for _ in range(repeats + 1):
                inputs = value.detach().clone().requires_grad_()
                synchronize()
                started = time.perf_counter()
                output = module(inputs)
                output.backward(torch.ones_like(output))
                synchronize()
                samples.append(time.perf_counter() - started)
            times.append(statistics.median(samples[1:]))
            value = output.detach()
    return times


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """The contiguous partition of `costs` into `stages` non-empty parts whose largest sum is smallest (ties:
    the earliest cuts), as indices [0, c1, ..., len(costs)] (dynamic programming, O(stages n^2))."""
    count = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][j]: the smallest possible largest part of the first j costs in k parts.
    best = [[float("inf")] * (count + 1) for _ in range(stages + 1)]
    choice = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, count + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    cuts, j = [count], count
    for k in range(stages, 0, -1):
        j = choice[k][j]
        cuts.append(j)
    return cuts[::-1]


def _boundary_shapes(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The per-sample shape of the input of every top-level module, and of the model's output (last)."""
    training = model.training
    model.eval()
    shapes = [tuple(input_shape)]
    with torch.no_grad():
        value = torch.zeros(2, *input_shape, dtype=next(model.parameters()).dtype)
        for module in model:
            value = module(value)
            shapes.append(tuple(value.shape[1:]))
    model.train(training)
    return shapes


ACTIVATION, GRADIENT = 1, 2  # message tags: activations and gradients between two ranks are matched apart


def _begins_in_place(module: nn.Module) -> bool:
    """Whether the first module that computes (the first without children) works in place."""
    first = next((m for m in module.modules() if not any(True for _ in m.children())), None)
    return bool(getattr(first, "inplace", False))


class PipelineStage(nn.Module):
    """This rank's stages of a cut nn.Sequential (see the module docstring).

    With `chunks` v above 1 (interleaved schedules) the model is cut into p x v virtual stages and this rank
    holds stages index, index + p, ... (Narayanan et al. 2021, section 2.2); a virtual stage's activation
    goes to the rank of the next one, (stage + 1) mod p. With a `tp` communicator the model has been split
    over tp before the cut (`cuts`, found on the unsplit model, are then given).
    """

    def __init__(self, model: nn.Sequential, comm: Communicator, input_shape: tuple[int, ...], *, chunks: int = 1,
                 cuts: list[int] | None = None, tp: Communicator | None = None) -> None:
        super().__init__()
        self.comm, self.books, self.tp = comm, comm.sibling(BOOKKEEPING), tp
        self.index, self.stages, self.chunks = comm.rank, comm.world_size, chunks
        self.virtual_stages = self.stages * chunks
        self.cuts = cuts if cuts is not None else cut_points(model, self.virtual_stages, input_shape)
        shapes = _boundary_shapes(model, input_shape)
        children = list(model.named_children())
        self.names, self.input_shapes, parts = [], [], []
        for stage in self.own_stages:
            start, end = self.cuts[stage], self.cuts[stage + 1]
            self.names.append([name for name, _ in children[start:end]])
            self.input_shapes.append(shapes[start])
            parts.append(nn.Sequential(OrderedDict(children[start:end])))
        self.parts = nn.ModuleList(parts)
        # A stage that begins in place (ReLU(inplace=True) after a cut) would modify the received activation,
        # a leaf autograd must keep: such a stage works on a copy (`stage_input`).
        self.copies_input = [_begins_in_place(part) for part in parts]
        self.model_output_shape = shapes[-1]
        # Per step: when it began and ended (time.monotonic, shared by the processes of a host), the seconds
        # spent in forward and backward passes, the most microbatches in flight and the most bytes of
        # activations saved for backward at once (polytrain.schedules.pipeline.run_pipeline).
        self.timeline: list[dict[str, float]] = []

    @property
    def own_stages(self) -> list[int]:
        """The virtual stages this rank holds, in order."""
        return [chunk * self.stages + self.index for chunk in range(self.chunks)]

    def stage_input(self, stage: int, received: torch.Tensor) -> torch.Tensor:
        """What a stage's modules get of the activation it received (a copy where they work in place)."""
        return received.clone() if self.copies_input[stage // self.stages] else received

    def part(self, stage: int) -> nn.Module:
        return self.parts[stage // self.stages]

    def input_shape(self, stage: int) -> tuple[int, ...]:
        return self.input_shapes[stage // self.stages]

    def is_last(self, stage: int) -> bool:
        return stage == self.virtual_stages - 1

    def previous(self, stage: int) -> int:
        return (stage - 1) % self.stages

    def following(self, stage: int) -> int:
        return (stage + 1) % self.stages

    def receive(self, comm: Communicator, shape: tuple[int, ...], source: int, operation: str, tag: int,
                like: torch.Tensor | None = None) -> torch.Tensor:
        dtype = like.dtype if like is not None and like.is_floating_point() else next(self.parameters()).dtype
        buffer = torch.empty(*shape, dtype=dtype)
        comm.post([], [(buffer, source)], operation, tag).wait()
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.comm if torch.is_grad_enabled() else self.books
        batch = x.shape[0]
        for stage in self.own_stages:
            value = x if stage == 0 else self.receive(comm, (batch, *self.input_shape(stage)), self.previous(stage),
                                                      "pp:activation", ACTIVATION, like=x)
            value = self.part(stage)(value)
            if self.is_last(stage):
                return value
            comm.post([(value.detach().contiguous(), self.following(stage))], [], "pp:activation", ACTIVATION).wait()
        return value.new_zeros(batch, *self.model_output_shape)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the whole model's state, under the whole model's keys (split layers gathered
        over tp: collective)."""
        state: dict[str, torch.Tensor] = {}
        for part in self.parts:
            state.update(tensor_state_dict(part, self.tp) if self.tp is not None else part.state_dict())
        return state

    def load_own(self, state: dict[str, torch.Tensor]) -> None:
        """Loads this rank's part of the whole model's `state`."""
        for names, part in zip(self.names, self.parts):
            prefixes = tuple(f"{name}." for name in names)
            own = {key: value for key, value in state.items() if key.startswith(prefixes)}
            if self.tp is not None:
                load_tensor_state_dict(part, own)
            else:
                part.load_state_dict(own)


def full_state_dict(stage: PipelineStage) -> dict[str, torch.Tensor] | None:
    """The whole model's state on the pp group's first rank (None on the others; bookkeeping, collective)."""
    parts = gather_objects(stage.books, stage.own_state_dict())
    if parts is None:
        return None
    whole: dict[str, torch.Tensor] = {}
    for part in parts:
        whole.update(part)
    return whole


def bubble_formula(stages: int, microbatches: int, chunks: int = 1) -> float:
    """The idle fraction of a balanced synchronous pipeline's step: (p-1)/(m+p-1), and (p-1)/(vm+p-1) with v
    virtual stages per rank (Narayanan et al. 2021)."""
    return (stages - 1) / (chunks * microbatches + stages - 1)


def pipeline_report(stage: PipelineStage, schedule: str, microbatches: int) -> dict | None:
    """result.json's `pipeline`, on the pp group's first rank (None elsewhere; bookkeeping, collective): the
    bubble measured in each step, the idle share of the stages' own steps (1 - their busy seconds / the sum
    of their spans from start to end: the time a stage waits inside its step, for a neighbour's activation
    or gradient, or for its sends to complete), beside the formula; the median over the steps after the
    first (which warms up); every step's span from the first stage's start to the last one's end (`step_s`);
    per stage its busy seconds, peak microbatches in flight, peak activation bytes and the most weight
    versions held at once; and the staleness of the updates (the most, and how many updates had each).

    Each stage's own span counts the fill and drain once: the drain a stage waits for at the end of a step
    falls into its next step's wait (a span from the first start to the last end would count it in both, as
    the stages' steps overlap), and the optimizer's step and the data between steps count in none (the
    formula has neither). An asynchronous schedule (pipedream) also records its flushes (epoch ends,
    checkpoints), which are not steps: their busy seconds count for their stage, their spans for no bubble.
    Its formula is the idle share of a balanced pipeline that fills and drains once per flush,
    flushes (p-1) / (steps m + flushes (p-1)); between flushes no stage waits in the steady state."""
    timelines = gather_objects(stage.books, stage.timeline)
    if timelines is None:
        return None
    rows_per_stage = min(len(timeline) for timeline in timelines)
    bubbles, spans = [], []
    for index in range(rows_per_stage):
        rows = [timeline[index] for timeline in timelines]
        if rows[0].get("flush"):
            continue
        spans.append(max(row["end"] for row in rows) - min(row["start"] for row in rows))
        own = sum(row["end"] - row["start"] for row in rows)
        bubbles.append(1 - sum(row["busy"] for row in rows) / own if own > 0 else 0.0)
    measured = bubbles[1:] or bubbles
    flushes = sum(1 for row in timelines[0][:rows_per_stage] if row.get("flush"))
    formula = bubble_formula(stage.stages, microbatches, stage.chunks)
    if flushes:  # the pipeline fills and drains once per flush: 1F1B over all the microbatches between flushes
        formula = flushes * (stage.stages - 1) / (len(bubbles) * microbatches + flushes * (stage.stages - 1))
    histogram: dict[str, int] = {}
    for row in timelines[0]:
        if row.get("staleness") is not None:
            histogram[str(row["staleness"])] = histogram.get(str(row["staleness"]), 0) + 1
    return {"schedule": schedule, "stages": stage.stages, "virtual_stages": stage.virtual_stages,
            "microbatches": microbatches, "cuts": stage.cuts,
            "bubble_formula": formula,
            "bubble_measured": statistics.median(measured) if measured else None, "steps_measured": len(measured),
            "step_s": spans,
            "staleness": max((int(key) for key in histogram), default=0),
            "staleness_histogram": dict(sorted(histogram.items())),
            "flushes": flushes,
            "per_stage": [{"busy_s": sum(row["busy"] for row in timeline),
                           "peak_in_flight": max((row["in_flight"] for row in timeline), default=0),
                           "peak_activation_bytes": max((row["activation_bytes"] for row in timeline), default=0),
                           "weight_versions": max((row.get("weight_versions", 1) for row in timeline), default=1)}
                          for timeline in timelines]}
