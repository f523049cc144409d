"""Tensor (model) parallelism: layers split over the ranks of the mesh's tp axis (`--mesh tp=k`).

The Megatron pairing (Shoeybi et al. 2019, section 3): a layer split by columns (each of the k ranks holds
out/k of its outputs: a linear layer's output features, a convolution's filters; its output is split and
no transfer is needed) is followed, through modules that keep the split meaningful, by a layer split by
rows (each rank holds in/k of its inputs: features, or input channels; it applies its share to its share
of the split activation and the k partial outputs are summed). Two conjugate functions carry the
communication, one allreduce per pair each way:

    f: identity forward, allreduce of the input's gradient backward (in front of the column layer);
    g: allreduce of the partial outputs forward, identity backward (after the row layer; its bias is
       added once, after the sum).

Between the two: element-wise modules (ReLU, Tanh, GELU, Dropout, ...), after a convolution also
channel-wise ones (max and average pools) and one flatten, whose channel-major blocks are exactly the
contiguous shares of the linear layer's input features. Dropout there draws the unsplit activation's mask
on every rank (all ranks of a tp group hold the same random state) and keeps its own block, so the split
model computes exactly what the unsplit one does. A layer without a partner (the classifier of an odd
stack) stays whole on every rank.

Plans (`--set tp_plan=NAME`): `linear` (the default) pairs linear layers only, the survey's and
Krizhevsky's advice (model parallelism where the parameters are, in the fully connected layers);
`conv+linear` splits convolutions too. Every allreduce is the counted ring over the tp communicator
(`allreduce:ring` on axis tp; 2(k-1)/k x the activation's bytes per rank); the forward passes of
evaluation (without gradients) count as bookkeeping.

`split_model(model, comm, plan)` replaces the layers in place, every rank keeping its shards of the
unsplit model's initial weights in the same Parameter objects (an optimizer built before still holds
them); `full_state_dict` / `load_full_state_dict` move between the split model and the unsplit model's
state (model.pt and checkpoints hold the unsplit model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.comm import BOOKKEEPING, Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import all_gather

TP_ALGORITHM = "ring"
# Modules that act on every feature on its own: a split activation passes through them unchanged in meaning.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Identity,
               nn.Dropout)


def _all_reduce(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    summed = tensor.contiguous().clone()
    ALLREDUCE_ALGORITHMS.get(TP_ALGORITHM).all_reduce(comm, summed.view(-1))
    return summed


class _CopyToGroup(torch.autograd.Function):
    """f: the input as it is forward; the sum of the ranks' input gradients backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(ctx.comm, grad), None


class _ReduceFromGroup(torch.autograd.Function):
    """g: the sum of the ranks' partial outputs forward; the gradient as it is backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return _all_reduce(comm, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _share(size: int, parts: int, index: int) -> slice:
    step = size // parts
    return slice(index * step, (index + 1) * step)


def _sharded(parameter: nn.Parameter | None, index) -> nn.Parameter | None:
    """`parameter` itself, holding only its part `index`: an optimizer built over the unsplit model keeps
    stepping the same Parameter objects."""
    if parameter is not None:
        parameter.data = parameter.data[index].clone()
    return parameter


def _operation(layer: nn.Module):
    """The layer's function of (input, weight, bias): F.linear, or F.conv2d with the layer's geometry."""
    if isinstance(layer, nn.Linear):
        return F.linear
    return functools.partial(F.conv2d, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


def _width(layer: nn.Module, side: str) -> int:
    """A linear layer's features or a convolution's channels, on the `side` "out" or "in"."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if side == "out" else layer.in_features
    return layer.out_channels if side == "out" else layer.in_channels


class ColumnParallel(nn.Module):
    """This rank's out/k outputs of a linear layer (features) or a convolution (filters): input whole,
    output split."""

    def __init__(self, layer: nn.Module, comm: Communicator) -> None:
        super().__init__()
        self.comm, self.kind, self.out_width = comm, type(layer).__name__, _width(layer, "out")
        self.operation = _operation(layer)
        rows = _share(self.out_width, comm.world_size, comm.rank)
        self.weight, self.bias = _sharded(layer.weight, rows), _sharded(layer.bias, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operation(_CopyToGroup.apply(x, self.comm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, outputs {self.out_width} / {self.comm.world_size}"


class RowParallel(nn.Module):
    """This rank's in/k inputs of a linear layer (features) or a convolution (input channels): input split,
    output whole after the sum."""

    def __init__(self, layer: nn.Module, comm: Communicator) -> None:
        super().__init__()
        self.comm, self.kind, self.in_width = comm, type(layer).__name__, _width(layer, "in")
        self.operation = _operation(layer)
        columns = _share(self.in_width, comm.world_size, comm.rank)
        self.weight, self.bias = _sharded(layer.weight, (slice(None), columns)), layer.bias
        self.books = comm.sibling(BOOKKEEPING)  # evaluation's sums: no gradient, no training traffic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.comm if torch.is_grad_enabled() else self.books
        output = _ReduceFromGroup.apply(self.operation(x, self.weight, None), comm)
        if self.bias is None:
            return output
        return output + (self.bias if output.dim() == 2 else self.bias.view(1, -1, *[1] * (output.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.kind}, inputs {self.in_width} / {self.comm.world_size}"


class SplitDropout(nn.Module):
    """Dropout on a split activation: the unsplit activation's mask (drawn whole, from the random state every
    rank of the group shares), this rank's block of it along `dim` (1: channels; -1: features)."""

    def __init__(self, dropout: nn.Dropout, dim: int, comm: Communicator) -> None:
        super().__init__()
        self.p, self.dim, self.comm = dropout.p, dim, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        dim, parts = self.dim % x.dim(), self.comm.world_size
        shape = list(x.shape)
        shape[dim] *= parts
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        mask = keep.narrow(dim, self.comm.rank * x.shape[dim], x.shape[dim])
        return x * mask / (1 - self.p)


# Modules that act on every channel on its own (a split feature map passes through them unchanged in meaning).
CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# What each plan splits (`--set tp_plan=NAME`).
TP_PLANS = {"linear": (nn.Linear,), "conv+linear": (nn.Linear, nn.Conv2d)}


@dataclass(frozen=True)
class Pair:
    """A column-split layer, the modules after it (element-wise; channel-wise and one flatten after a
    convolution), and the row-split layer they feed."""

    column: str
    between: tuple[str, ...]
    row: str


def _splittable(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d in kinds and module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear) and nn.Linear in kinds


def plan(model: nn.Module, name: str = "linear") -> list[Pair]:
    """The Megatron pairs of `model` under plan `name`: consecutive layers the plan splits (in the order of
    `named_modules`) with only modules between them that keep the split meaningful, taken two by two. A
    convolution's split channels may be flattened into a linear layer's split features (channel-major
    blocks); otherwise both layers of a pair are of one kind."""
    if name not in TP_PLANS:
        raise ValueError(f"unknown tp plan '{name}'; available: {', '.join(TP_PLANS)}")
    kinds = TP_PLANS[name]
    pairs, pending, between, flattened = [], None, [], False
    for key, module in model.named_modules():
        if list(module.children()):
            continue
        if _splittable(module, kinds):
            if pending is not None and type(module) is (nn.Linear if flattened else type(pending[1])):
                pairs.append(Pair(pending[0], tuple(between), key))
                pending = None
            else:
                pending, between, flattened = (key, module), [], False
        elif pending is None:
            continue
        elif isinstance(module, ELEMENTWISE) or (isinstance(pending[1], nn.Conv2d) and not flattened
                                                 and isinstance(module, CHANNELWISE)):
            between.append(key)
        elif isinstance(module, nn.Flatten) and isinstance(pending[1], nn.Conv2d) and not flattened:
            between.append(key)
            flattened = True
        else:  # a module that mixes features: the pending layer stays whole
            pending = None
    return pairs


def check_plan(model: nn.Module, parts: int, name: str = "linear") -> list[Pair]:
    """The pairs of `model` for tp = `parts`; ValueError naming the layer a split does not divide."""
    pairs = plan(model, name)
    if not pairs:
        raise ValueError(f"tp {parts} splits pairs of consecutive layers (Megatron; plan {name}), but the model has "
                         f"none with only element-wise modules between them; set tp=1")
    modules = dict(model.named_modules())
    for pair in pairs:
        column = modules[pair.column]
        width = _width(column, "out")
        if width % parts:
            what = "output features of linear layer" if isinstance(column, nn.Linear) else "filters of convolution"
            raise ValueError(f"tp {parts} does not divide the {width} {what} {pair.column} (split by columns, "
                             f"feeding {pair.row}); use a tp that divides {width}")
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def split_model(model: nn.Module, comm: Communicator, name: str = "linear") -> list[Pair]:
    """Replaces every pair of `plan(model, name)` by its split layers, in place; returns the pairs."""
    pairs = check_plan(model, comm.world_size, name)
    modules = dict(model.named_modules())
    for pair in pairs:
        _set(model, pair.column, ColumnParallel(modules[pair.column], comm))
        _set(model, pair.row, RowParallel(modules[pair.row], comm))
        dim = 1 if isinstance(modules[pair.column], nn.Conv2d) else -1
        for key in pair.between:
            if isinstance(modules[key], nn.Flatten):
                dim = -1
            elif isinstance(modules[key], nn.Dropout):
                _set(model, key, SplitDropout(modules[key], dim, comm))
    return pairs


def full_state_dict(model: nn.Module, comm: Communicator) -> dict[str, torch.Tensor]:
    """The unsplit model's state: every split weight and bias gathered over the tp group (bookkeeping, by
    each rank's whole shard in rank order; collective)."""
    books = comm.sibling(BOOKKEEPING)
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallel, RowParallel)):
            dim = 0 if isinstance(module, ColumnParallel) else 1
            keys = [("weight", dim)] + ([("bias", 0)] if module.bias is not None and dim == 0 else [])
            for key, axis in keys:
                shard = getattr(module, key).detach()
                pieces = all_gather(books, shard.contiguous().view(-1), fixed_size=True)
                shape = list(shard.shape)
                state[f"{name}.{key}"] = torch.cat([p.view(shape) for p in pieces], dim=axis)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads an unsplit model's `state` into the split `model`: each split layer takes its shard."""
    own = {}
    modules = dict(model.named_modules())
    for key, value in state.items():
        name, _, field = key.rpartition(".")
        module = modules.get(name)
        if isinstance(module, ColumnParallel):
            value = value[_share(module.out_width, module.comm.world_size, module.comm.rank)]
        elif isinstance(module, RowParallel) and field == "weight":
            value = value[:, _share(module.in_width, module.comm.world_size, module.comm.rank)]
        own[key] = value
    model.load_state_dict(own)
