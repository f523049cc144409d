"""Pipeline parallelism: an nn.Sequential cut into contiguous stages, one per rank of the mesh's pp axis.

`cut_points(model, stages, input_shape)` balances the stages by the cost model's arithmetic (forward and
backward FLOPs per sample of each top-level module, polytrain.cost): the contiguous partition whose most
expensive stage is cheapest. Top-level modules are kept whole (a residual block is one module), so a model
with fewer top-level modules than stages cannot be cut (one line).

`PipelineStage` is a rank's part: the modules of its stage (its parameters are the only ones the update
policy sees), the shapes of the activations it receives and sends (found by running the whole model once
on a zero batch before it is cut), and the counted pp communicator. Its `forward(x)` is the pipelined
forward of evaluation: the first stage reads x, every stage sends its output on, the last returns the
model's output and the others zeros of that shape (their numbers are not counted: `Session.sum` counts the
last stage's). Training runs through a pipeline step schedule (polytrain.schedules: gpipe, 1f1b), which
moves activations forward (`pp:activation`) and their gradients back (`pp:gradient`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from polytrain.comm import BOOKKEEPING, Communicator


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


def cut_points(model: nn.Module, stages: int, input_shape: tuple[int, ...]) -> list[int]:
    """Indices [0, c1, ..., len] of the top-level modules where the `stages` stages begin (and the end),
    balanced by the cost model's FLOPs (`balanced_cuts`)."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"pp cuts an nn.Sequential at its top-level modules; the model is a {type(model).__name__}")
    if stages > len(model):
        raise ValueError(f"pp {stages} cuts the model into {stages} stages at its top-level modules, but it has "
                         f"{len(model)}; use pp <= {len(model)}")
    return balanced_cuts(_costs(model, input_shape), stages)


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


class PipelineStage(nn.Module):
    """This rank's stage of a cut nn.Sequential (see the module docstring)."""

    def __init__(self, model: nn.Sequential, comm: Communicator, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.comm, self.books = comm, comm.sibling(BOOKKEEPING)
        self.index, self.stages = comm.rank, comm.world_size
        cuts = cut_points(model, self.stages, input_shape)
        shapes = _boundary_shapes(model, input_shape)
        start, end = cuts[self.index], cuts[self.index + 1]
        children = list(model.named_children())
        self.names = [name for name, _ in children[start:end]]
        self.stage = nn.Sequential(OrderedDict(children[start:end]))
        self.cuts = cuts
        self.input_shape, self.output_shape, self.model_output_shape = shapes[start], shapes[end], shapes[-1]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def receive(self, comm: Communicator, shape: tuple[int, ...], source: int, operation: str,
                like: torch.Tensor | None = None) -> torch.Tensor:
        dtype = like.dtype if like is not None else next(self.parameters()).dtype
        buffer = torch.empty(*shape, dtype=dtype)
        comm.recv(buffer, source, operation)
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.comm if torch.is_grad_enabled() else self.books
        batch = x.shape[0]
        value = x if self.first else self.receive(comm, (batch, *self.input_shape), self.index - 1, "pp:activation",
                                                  like=x if x.is_floating_point() else None)
        value = self.stage(value)
        if self.last:
            return value
        comm.send(value.detach().contiguous(), self.index + 1, "pp:activation")
        return value.new_zeros(batch, *self.model_output_shape)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's part of the whole model's state, under the whole model's keys."""
        return {key.removeprefix("stage."): value for key, value in self.state_dict().items()}

    def load_own(self, state: dict[str, torch.Tensor]) -> None:
        """Loads this stage's part of the whole model's `state`."""
        names = {f"{name}." for name in self.names}
        self.load_state_dict({f"stage.{key}": value for key, value in state.items()
                              if any(key.startswith(prefix) for prefix in names)})


def full_state_dict(stage: PipelineStage) -> dict[str, torch.Tensor] | None:
    """The whole model's state on the pp group's first rank (None on the others; bookkeeping, collective)."""
    from polytrain.comm.gather import gather_objects

    parts = gather_objects(stage.books, stage.own_state_dict())
    if parts is None:
        return None
    whole: dict[str, torch.Tensor] = {}
    for part in parts:
        whole.update(part)
    return whole
