"""Sums and means of tensors over the ranks of a communicator, by a counted allreduce algorithm."""

from __future__ import annotations

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
