"""Sums and means of tensors over the ranks of a communicator, by a counted allreduce algorithm."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from polytrain.comm import Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS

# Small bookkeeping sums (metrics, buffers for evaluation) go through the ring, whose every byte is counted.
BOOKKEEPING_ALGORITHM = "ring"


def sum_over(comm: Communicator | None, values: torch.Tensor, algorithm: str = BOOKKEEPING_ALGORITHM) -> torch.Tensor:
    """The elementwise sum of `values` over the ranks of `comm` (a copy; `values` itself for no comm)."""
    if comm is None or comm.world_size == 1:
        return values
    summed = values.detach().clone().contiguous()
    ALLREDUCE_ALGORITHMS.get(algorithm).all_reduce(comm, summed.view(-1))
    return summed


def average_into(tensors: list[torch.Tensor], comm: Communicator | None, algorithm: str = BOOKKEEPING_ALGORITHM) -> None:
    """Replaces each tensor by its mean over the ranks of `comm`, with one allreduce of all of them."""
    if comm is None or comm.world_size == 1 or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        ALLREDUCE_ALGORITHMS.get(algorithm).all_reduce(comm, flat)
        flat /= comm.world_size
        for tensor, mean in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(mean.view_as(tensor))


@contextlib.contextmanager
def restored_after(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Whatever the context writes into `tensors`, their values of before are put back after it."""
    own = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, saved in zip(tensors, own):
                tensor.copy_(saved)


@contextlib.contextmanager
def replaced_by_mean(tensors: list[torch.Tensor], comm: Communicator | None) -> Iterator[None]:
    """For the duration of the context, `tensors` hold their mean over `comm` (each rank's own are put back)."""
    with restored_after(tensors):
        average_into(tensors, comm)
        yield


def consensus_distance(parameters: list[torch.Tensor], comm: Communicator | None) -> float:
    """The replicas' mean Euclidean distance from their average, (1/p) sum_i ||x_i - mean(x)|| (collective)."""
    if comm is None or comm.world_size == 1:
        return 0.0
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).double() for t in parameters])
        mean = sum_over(comm, flat) / comm.world_size
        distance = torch.linalg.vector_norm(flat - mean).reshape(1)
        return sum_over(comm, distance).item() / comm.world_size


def local_gradients(model: torch.nn.Module, replicas: int) -> None:
    """Turns the step schedule's gradients (summed loss / global batch) into this replica's shard mean.

    A replica that steps on its own (local SGD, gossip, EASGD) multiplies by the number of replicas p; for
    equal shards that is its shard's mean gradient, and the mean of the replicas' updates is the
    synchronous step for any shard sizes (polytrain.strategies.local_sgd).
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(replicas)
