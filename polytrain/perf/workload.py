"""What one training step computes and moves, per top-level module: the cost model's counts, grouped.

A `Workload` is the model as the performance model sees it: its top-level modules (`Block`s, the units a
pipeline cuts and the order backward produces gradients in) with their per-sample FLOPs and activation
bytes, and its trainable parameters in registration order (the allreduce buckets are cut from them as
`polytrain.strategies.allreduce` cuts them). Everything comes from `polytrain.cost`; nothing is measured.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from polytrain.cost.model import model_cost
from polytrain.models import build_model


@dataclass(frozen=True)
class Block:
    """One top-level module; FLOPs and bytes are per sample."""

    name: str
    params: int
    flops_forward: float
    flops_backward: float
    bytes_forward: float  # activations the module writes
    saved_bytes: float  # what autograd keeps for its backward
    output_elements: int  # the activation handed to the next module (a pipeline boundary)
    layers: int


@dataclass(frozen=True)
class Workload:
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    blocks: tuple[Block, ...]
    parameters: tuple[tuple[str, tuple[int, ...], int], ...]  # (name, shape, block) of every trainable one, in order
    input_elements: int
    model_args: tuple = ()

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.parameters)

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params

    def block_index(self, name: str) -> int:
        return next(i for i, block in enumerate(self.blocks) if block.name == name.split(".")[0])

    def training_memory_bytes(self, batch: int, optimizer: str = "momentum") -> int:
        """The cost model's peak of one training step of the whole model at `batch` samples."""
        return _memory(self.model, self.input_shape, self.num_classes, self.model_args, batch, optimizer)


def _meta_model(name: str, input_shape: tuple[int, ...], num_classes: int, model_args: tuple):
    with torch.device("meta"):
        return build_model(name, num_classes, input_shape, **dict(model_args))


@functools.lru_cache(maxsize=64)
def _memory(name, input_shape, num_classes, model_args, batch, optimizer) -> int:
    cost = model_cost(_meta_model(name, input_shape, num_classes, model_args), input_shape, max(1, batch),
                      optimizer=optimizer, name=name)
    return cost.total.training_memory_bytes


@functools.lru_cache(maxsize=64)
def _workload(name: str, input_shape: tuple[int, ...], num_classes: int, model_args: tuple) -> Workload:
    model = _meta_model(name, input_shape, num_classes, model_args)
    cost = model_cost(model, input_shape, 1, name=name)
    order = [child for child, _ in model.named_children()] or [""]
    index = {child: i for i, child in enumerate(order)}
    sums = [{"flops_forward": 0, "flops_backward": 0, "bytes_forward": 0, "saved_bytes": 0, "layers": 0,
             "output": 0} for _ in order]
    for row in cost.layers:
        block = sums[index.get(row.name.split(".")[0], len(order) - 1) if order != [""] else 0]
        block["flops_forward"] += row.flops_forward
        block["flops_backward"] += row.flops_backward
        block["bytes_forward"] += row.activation_bytes
        block["saved_bytes"] += row.saved_bytes
        block["layers"] += 1
        block["output"] = int(torch.Size(row.output_shape[1:]).numel())
    params_per_block = [0] * len(order)
    parameters = []
    for qualified, param in model.named_parameters():
        if param.requires_grad:
            i = index.get(qualified.split(".")[0], 0) if order != [""] else 0
            params_per_block[i] += param.numel()
            parameters.append((qualified, tuple(param.shape), i))
    blocks = tuple(Block(name or "model", params_per_block[i], s["flops_forward"], s["flops_backward"],
                         s["bytes_forward"], s["saved_bytes"], s["output"], s["layers"])
                   for i, (name, s) in enumerate(zip(order, sums)))
    return Workload(name, tuple(input_shape), num_classes, blocks, tuple(parameters),
                    int(torch.Size(input_shape).numel()), model_args)


def workload(name: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict[str, Any] | None = None
             ) -> Workload:
    """The workload of zoo model `name` on samples of `input_shape` with `num_classes` classes."""
    return _workload(name, tuple(input_shape), num_classes, tuple(sorted((model_args or {}).items())))
