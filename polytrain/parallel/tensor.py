"""Tensor (model) parallelism: fully connected layers split over the ranks of the mesh's tp axis.

The Megatron pairing (Shoeybi et al. 2019, section 3): a linear layer split by columns (each of the k ranks
holds out/k of its output features, so its output is split and no transfer is needed) is followed, through
element-wise modules only (ReLU, Tanh, GELU, Dropout, ...), by a linear layer split by rows (each rank
holds in/k of its input features: it multiplies its share of the split activation and the k partial
products are summed). Two conjugate functions carry the communication, one allreduce per pair each way:

    f: identity forward, allreduce of the input's gradient backward (in front of the column layer);
    g: allreduce of the partial outputs forward, identity backward (after the row layer; its bias is
       added once, after the sum).

Every allreduce is the counted ring over the tp communicator (`allreduce:ring` on axis tp; 2(k-1)/k x
the activation's bytes per rank); the forward passes of evaluation (without gradients) count as
bookkeeping. Dropout between the two layers draws the whole layer's mask on every
rank (all ranks of a tp group hold the same random state) and keeps its own columns, so the split model
computes exactly what the unsplit one does. A linear layer without a partner (the classifier of an odd
stack) stays whole on every rank.

`plan(model)` derives the pairs from the order of the model's modules (`megatron`, the one plan so far);
`split_model(model, comm)` replaces the layers in place, every rank keeping its shards of the unsplit
model's initial weights, and `full_state_dict` / `load_full_state_dict` move between the split model and
the unsplit model's state (model.pt and checkpoints hold the unsplit model).
"""

from __future__ import annotations

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


class ColumnParallelLinear(nn.Module):
    """This rank's out/k output features of a linear layer (input whole, output split)."""

    def __init__(self, linear: nn.Linear, comm: Communicator) -> None:
        super().__init__()
        self.comm, self.in_features, self.out_features = comm, linear.in_features, linear.out_features
        rows = _share(linear.out_features, comm.world_size, comm.rank)
        self.weight, self.bias = _sharded(linear.weight, rows), _sharded(linear.bias, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToGroup.apply(x, self.comm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} / {self.comm.world_size}"


class RowParallelLinear(nn.Module):
    """This rank's in/k input features of a linear layer (input split, output whole after the sum)."""

    def __init__(self, linear: nn.Linear, comm: Communicator) -> None:
        super().__init__()
        self.comm, self.in_features, self.out_features = comm, linear.in_features, linear.out_features
        columns = _share(linear.in_features, comm.world_size, comm.rank)
        self.weight, self.bias = _sharded(linear.weight, (slice(None), columns)), linear.bias
        self.books = comm.sibling(BOOKKEEPING)  # evaluation's sums: no gradient, no training traffic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.comm if torch.is_grad_enabled() else self.books
        output = _ReduceFromGroup.apply(F.linear(x, self.weight), comm)
        return output + self.bias if self.bias is not None else output

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} / {self.comm.world_size}, out_features={self.out_features}"


class SplitDropout(nn.Module):
    """Dropout on a split activation: the unsplit activation's mask (drawn whole, from the random state every
    rank of the group shares), this rank's features of it."""

    def __init__(self, dropout: nn.Dropout, features: int, comm: Communicator) -> None:
        super().__init__()
        self.p, self.features, self.comm = dropout.p, features, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (*x.shape[:-1], self.features)
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        mask = keep[..., _share(self.features, self.comm.world_size, self.comm.rank)]
        return x * mask / (1 - self.p)


@dataclass(frozen=True)
class Pair:
    """A column-split linear layer, the element-wise modules after it, and the row-split layer they feed."""

    column: str
    between: tuple[str, ...]
    row: str


def plan(model: nn.Module) -> list[Pair]:
    """The Megatron pairs of `model`: consecutive linear layers (in the order of `named_modules`) with only
    element-wise modules between them, taken two by two."""
    pairs, pending, between = [], None, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if pending is None:
                pending, between = name, []
            else:
                pairs.append(Pair(pending, tuple(between), name))
                pending = None
        elif pending is not None and list(module.children()) == []:
            if isinstance(module, ELEMENTWISE):
                between.append(name)
            else:  # a module that mixes features: the pending layer stays whole
                pending = None
    return pairs


def check_plan(model: nn.Module, parts: int) -> list[Pair]:
    """The plan of `model` for tp = `parts`; ValueError naming the layer a split does not divide."""
    pairs = plan(model)
    if not pairs:
        raise ValueError(f"tp {parts} splits pairs of consecutive linear layers (Megatron), but the model has none "
                         f"with only element-wise modules between them; set tp=1")
    modules = dict(model.named_modules())
    for pair in pairs:
        features = modules[pair.column].out_features
        if features % parts:
            raise ValueError(f"tp {parts} does not divide the {features} output features of linear layer "
                             f"{pair.column} (split by columns, feeding {pair.row}); use a tp that divides "
                             f"{features}")
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def split_model(model: nn.Module, comm: Communicator) -> list[Pair]:
    """Replaces every pair of `plan(model)` by its split layers, in place; returns the plan."""
    pairs = check_plan(model, comm.world_size)
    modules = dict(model.named_modules())
    for pair in pairs:
        column = modules[pair.column]
        _set(model, pair.column, ColumnParallelLinear(column, comm))
        _set(model, pair.row, RowParallelLinear(modules[pair.row], comm))
        for name in pair.between:
            if isinstance(modules[name], nn.Dropout):
                _set(model, name, SplitDropout(modules[name], column.out_features, comm))
    return pairs


def full_state_dict(model: nn.Module, comm: Communicator) -> dict[str, torch.Tensor]:
    """The unsplit model's state: every split weight and bias gathered over the tp group (bookkeeping, by
    each rank's whole shard in rank order; collective)."""
    books = comm.sibling(BOOKKEEPING)
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            dim = 0 if isinstance(module, ColumnParallelLinear) else 1
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
        if isinstance(module, ColumnParallelLinear):
            value = value[_share(module.out_features, module.comm.world_size, module.comm.rank)]
        elif isinstance(module, RowParallelLinear) and field == "weight":
            value = value[:, _share(module.in_features, module.comm.world_size, module.comm.rank)]
        own[key] = value
    model.load_state_dict(own)
