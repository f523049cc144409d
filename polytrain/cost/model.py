"""The cost of a whole model: per-layer rows and totals, from one meta-device trace and the layer formulas.

Totals follow Iandola's thesis Sec. 3.3: |W| (eq. 3.1) and |D| (eq. 3.2, every new tensor a layer outputs,
at the batch size), |grad W| = |W| for trainable parameters and |grad D| = |D| for outputs that need a
gradient (Sec. 3.4), and their ratio |D| / |W| (Table 3.1, there at batch 1024). Work and depth follow
Ben-Nun & Hoefler (2019) Sec. 2.1: the network's depth is the longest path through the layer graph
(parallel branches, such as Inception's, count once), and its average parallelism is work / depth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from polytrain.cost.layers import LayerCost, NotCountable
from polytrain.cost.memory import (
    TARGET_BYTES,
    ConvBackend,
    StepMemory,
    conv_workspace_bytes,
    host_conv_backend,
    optimizer_state,
    optimizer_state_bytes,
    saved_storages,
    simulate_step,
)
from polytrain.cost.trace import Node, Trace, trace_model
from polytrain.models import MODELS, build_model

_IMAGENET = ((3, 224, 224), 1000)
_CIFAR = ((3, 32, 32), 10)
# The input each zoo model was designed for: (sample shape, classes).
NATURAL_INPUTS: dict[str, tuple[tuple[int, ...], int]] = {
    **dict.fromkeys(("alexnet", "vgg16", "vgg19", "nin", "googlenet", "resnet18", "resnet50", "densenet121",
                     "squeezenet1_0", "squeezenet1_1"), _IMAGENET),
    **dict.fromkeys(("resnet20", "resnet56", "resnet110", "densenet_cifar"), _CIFAR),
    "lenet5": ((1, 32, 32), 10),  # LeCun et al. 1998 Sec. II.B: a 32x32 field
    "mlp": ((1, 28, 28), 10),  # MNIST
    **dict.fromkeys(("lstm", "gru"), ((40,), 10)),  # MNIST-1D (Greydanus 2020), polytrain's sequence task
}
# Zoo models the cost model has no formulas for yet, and why.
UNCOSTED = {"gpt": "it reads token ids through embeddings and attention, which the cost model has no formulas "
                   "for yet"}


@dataclass(frozen=True)
class LayerRow:
    """One layer call. Arithmetic is per sample; bytes, work and depth are for the whole batch.

    Attributes:
        name: qualified module name, or module name and function (`layer1.0.add`).
        kind: module class or function kind.
        output_shape: shape of the first output, batch first.
        params: parameters the layer owns.
        macs_forward, flops_forward, macs_backward, flops_backward: per sample (`polytrain.cost.layers`).
        activation_bytes: new tensors the layer outputs (0 for in-place layers and views).
        saved_bytes: tensors first kept for backward at this layer.
        work: forward FLOPs of the batch.
        depth: levels of the layer's longest dependency chain.
        counted: False if no formula covers the layer; its arithmetic is then unknown and reported as 0.
        note: why it is not counted, or a caveat about its counts.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs_forward: int
    flops_forward: int
    macs_backward: int
    flops_backward: int
    activation_bytes: int
    saved_bytes: int
    work: int
    depth: int
    counted: bool
    note: str


@dataclass(frozen=True)
class CostTotals:
    """Totals of a model at one batch size. FLOPs and MACs are per sample, bytes at the batch size.

    Attributes:
        params: |W| in elements; trainable_params: those with requires_grad.
        weight_bytes: |W| in bytes (Iandola eq. 3.1); weight_grad_bytes: |grad W|.
        activation_bytes: |D| (eq. 3.2); activation_grad_bytes: |grad D|.
        data_weight_ratio: |D| / |W| (Iandola Table 3.1); None for a model without parameters.
        saved_activation_bytes: tensors autograd keeps for backward.
        optimizer: its name; optimizer_state_bytes: what it keeps between steps.
        input_bytes: the input batch and its int64 labels.
        workspace_bytes: the largest convolution workspace; conv_backend: the backend it was modelled for.
        training_memory_bytes: peak of one training step (`polytrain.cost.memory`); peak_at: where.
        macs_forward, flops_forward, macs_backward, flops_backward: per sample, training mode.
        flops_inference: forward FLOPs in inference mode (batch norm with running statistics, no dropout).
        flops_training: flops_forward + flops_backward.
        work: forward FLOPs of the batch; depth: longest path through the layer graph;
        average_parallelism: work / depth.
        not_counted: layers without a formula; their arithmetic is missing from every total.
    """

    params: int
    trainable_params: int
    weight_bytes: int
    weight_grad_bytes: int
    activation_bytes: int
    activation_grad_bytes: int
    data_weight_ratio: float | None
    saved_activation_bytes: int
    optimizer: str
    optimizer_state_bytes: int
    input_bytes: int
    workspace_bytes: int
    conv_backend: str
    training_memory_bytes: int
    peak_at: str
    macs_forward: int
    flops_forward: int
    flops_inference: int
    macs_backward: int
    flops_backward: int
    flops_training: int
    work: int
    depth: int
    average_parallelism: float
    not_counted: tuple[str, ...]


@dataclass(frozen=True)
class ModelCost:
    """The cost model's answer for one model, input and batch size."""

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    dtype: str
    layers: tuple[LayerRow, ...]
    total: CostTotals

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the `polytrain cost --json` contract (DESIGN.md Sec. 4)."""
        return dataclasses.asdict(self)


def _check_arguments(input_shape: Sequence[int], batch_size: int, dtype: torch.dtype) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"input shape must be positive integers like 3,32,32; got {shape}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1; got {batch_size!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type; got {dtype}")
    return shape


def _evaluate(node: Node) -> tuple[LayerCost | None, LayerCost | None, str]:
    """(training-mode cost, inference-mode cost, note) of a node; no costs where no formula applies."""
    if node.formula is None:
        return None, None, node.note
    try:
        return node.formula(node.call), node.formula(dataclasses.replace(node.call, training=False)), ""
    except NotCountable as reason:
        return None, None, str(reason)


def _fan_out_flops(trace: Trace) -> list[int]:
    """Backward additions where a tensor feeds several layers: autograd sums their k gradients, k - 1
    additions per element, counted at the layer that produced the tensor (shortcut connections, Inception
    and dense-block inputs)."""
    uses = [0] * len(trace.values)
    for node in trace.nodes:
        for value in node.inputs:
            uses[value] += 1
    extra = [0] * len(trace.nodes)
    for value, count in zip(trace.values, uses):
        if value.producer is not None and value.spec.requires_grad and count > 1:
            extra[value.producer] += (count - 1) * value.spec.numel
    return extra


def _longest_path(trace: Trace, depths: list[int]) -> int:
    """Length of the longest path through the layer graph, each node weighted by its depth."""
    finish = [0] * len(trace.values)
    longest = 0
    for node, depth in zip(trace.nodes, depths):
        end = max((finish[v] for v in node.inputs), default=0) + depth
        for value in node.outputs:
            finish[value] = end
        longest = max(longest, end)
    return longest


def _saved_by_row(trace: Trace, costs: list[LayerCost | None]) -> list[int]:
    """Saved bytes attributed to the first layer that keeps each tensor, plus each layer's own buffers."""
    seen, rows = set(), []
    for node, cost in zip(trace.nodes, costs):
        new = [s for s in saved_storages(trace, node, cost) if s not in seen]
        seen.update(new)
        rows.append(sum(trace.storage_bytes[s] for s in new) + (cost.saved_buffer_bytes if cost else 0))
    return rows


@dataclass(frozen=True)
class _Weights:
    """Parameter counts and the bytes of what is kept per parameter."""

    params: int
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    buffer_bytes: int
    largest_trainable_bytes: int


def _weights(model: nn.Module, itemsize: int, optimizer: str) -> _Weights:
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    floating = [b.numel() * itemsize if b.is_floating_point() else b.numel() * b.element_size()
                for b in model.buffers()]
    params = sum(p.numel() for p in model.parameters())
    return _Weights(params, sum(trainable), params * itemsize, sum(trainable) * itemsize,
                    optimizer_state_bytes(optimizer, trainable, itemsize), sum(floating),
                    max(trainable, default=0) * itemsize)


def model_cost(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, *, optimizer: str = "momentum",
               dtype: torch.dtype = torch.float32, name: str | None = None,
               conv_backend: ConvBackend | None = None) -> ModelCost:
    """Counts parameters, activations, arithmetic, memory, work and depth of `model`, layer by layer.

    The model is run once on the meta device (nothing is computed or allocated; `model` is left as it was)
    in training mode, on a batch of `batch_size` samples of `input_shape`.

    Args:
        model: any nn.Module taking one tensor batch; layers without a formula are listed as not counted.
        input_shape: one sample's shape, e.g. (3, 224, 224).
        batch_size: B, for activation bytes, memory, work and depth (arithmetic is reported per sample).
        optimizer: a name of `polytrain.train.optim.OPTIMIZERS`, for the optimizer state.
        dtype: element type of parameters and activations (bytes per element).
        name: model name for the report (default: the class name).
        conv_backend: how convolutions allocate workspace (default: this process's, `host_conv_backend`).

    Returns:
        The per-layer rows and the totals.
    """
    shape = _check_arguments(input_shape, batch_size, dtype)
    temporaries = optimizer_state(optimizer).temporaries
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = _weights(model, itemsize, optimizer)
    trace = trace_model(model, (batch_size, *shape), dtype)
    evaluated = [_evaluate(node) for node in trace.nodes]
    costs, inference, notes = ([e[i] for e in evaluated] for i in range(3))
    backend = conv_backend or host_conv_backend()
    workspaces = [conv_workspace_bytes(node, backend) for node in trace.nodes]
    input_bytes = batch_size * (math.prod(shape) * itemsize + TARGET_BYTES)
    resident = weights.weight_bytes + weights.buffer_bytes + weights.optimizer_state_bytes + input_bytes
    memory = simulate_step(trace, costs, workspaces, resident, temporaries * weights.largest_trainable_bytes)
    rows = _rows(trace, costs, notes, batch_size)
    total = _totals(trace, rows, inference, memory, batch_size, optimizer, weights, input_bytes, backend)
    return ModelCost(name or type(model).__name__, shape, batch_size, str(dtype).removeprefix("torch."),
                     tuple(rows), total)


def registered_model_cost(name: str, input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                          batch_size: int = 1, model_args: dict[str, Any] | None = None,
                          **options: Any) -> ModelCost:
    """`model_cost` of zoo model `name`, built on the meta device (no memory, no initialisation cost).

    Args:
        name: a registered model name.
        input_shape: one sample's shape; default: the model's natural input (`NATURAL_INPUTS`).
        num_classes: output classes; default: the natural input's.
        batch_size: as for `model_cost`.
        model_args: the model's metaparameters (e.g. {"sr": 0.25} for SqueezeNet).
        **options: `optimizer`, `dtype`, `conv_backend`, as for `model_cost`.
    """
    MODELS.get(name)  # an unknown name fails here, listing the registered ones
    if name in UNCOSTED:
        raise ValueError(f"model {name} cannot be costed: {UNCOSTED[name]}")
    natural_shape, natural_classes = NATURAL_INPUTS.get(name, (None, None))
    shape = input_shape if input_shape is not None else natural_shape
    classes = num_classes if num_classes is not None else natural_classes
    if shape is None or classes is None:
        raise ValueError(f"model {name} has no natural input; give its input shape and number of classes")
    with torch.device("meta"):
        model = build_model(name, classes, tuple(shape), **(model_args or {}))
    return model_cost(model, shape, batch_size, name=name, **options)


def _rows(trace: Trace, costs: list[LayerCost | None], notes: list[str], batch: int) -> list[LayerRow]:
    fan_out = _fan_out_flops(trace)
    saved = _saved_by_row(trace, costs)
    rows = []
    for index, (node, cost) in enumerate(zip(trace.nodes, costs)):
        cost = cost or LayerCost()
        created = sum(trace.storage_bytes[trace.values[v].storage] for v in node.outputs
                      if trace.storage_creator[trace.values[v].storage] == index)
        shape = node.call.outputs[0].shape if node.call.outputs else ()
        rows.append(LayerRow(
            name=node.name, kind=node.kind, output_shape=shape, params=node.num_params,
            macs_forward=cost.macs_forward // batch, flops_forward=cost.flops_forward // batch,
            macs_backward=cost.macs_backward // batch,
            flops_backward=(cost.flops_backward + fan_out[index]) // batch,
            activation_bytes=created, saved_bytes=saved[index], work=cost.flops_forward, depth=cost.depth,
            counted=costs[index] is not None, note=notes[index] or cost.note,
        ))
    return rows


def _totals(trace: Trace, rows: list[LayerRow], inference: list[LayerCost | None], memory: StepMemory,
            batch: int, optimizer: str, weights: _Weights, input_bytes: int, backend: ConvBackend) -> CostTotals:
    activation_bytes = sum(row.activation_bytes for row in rows)
    work = sum(row.work for row in rows)
    depth = _longest_path(trace, [row.depth for row in rows])
    flops_forward = sum(row.flops_forward for row in rows)
    flops_backward = sum(row.flops_backward for row in rows)
    return CostTotals(
        params=weights.params,
        trainable_params=weights.trainable_params,
        weight_bytes=weights.weight_bytes,
        weight_grad_bytes=weights.grad_bytes,
        activation_bytes=activation_bytes,
        activation_grad_bytes=sum(row.activation_bytes for row, node in zip(rows, trace.nodes)
                                  if any(trace.values[v].spec.requires_grad for v in node.outputs)),
        data_weight_ratio=activation_bytes / weights.weight_bytes if weights.weight_bytes else None,
        saved_activation_bytes=memory.saved_activation_bytes,
        optimizer=optimizer,
        optimizer_state_bytes=weights.optimizer_state_bytes,
        input_bytes=input_bytes,
        workspace_bytes=memory.workspace_bytes,
        conv_backend=backend.describe(),
        training_memory_bytes=memory.peak_bytes,
        peak_at=memory.peak_at,
        macs_forward=sum(row.macs_forward for row in rows),
        flops_forward=flops_forward,
        flops_inference=sum(c.flops_forward for c in inference if c) // batch,
        macs_backward=sum(row.macs_backward for row in rows),
        flops_backward=flops_backward,
        flops_training=flops_forward + flops_backward,
        work=work,
        depth=depth,
        average_parallelism=work / depth if depth else 0.0,
        not_counted=tuple(row.name for row in rows if not row.counted),
    )
