"""How workers cooperate: a communication policy around the shared local step.

The training loop (polytrain.train) runs the local step (forward, backward, microbatches, clipping)
once for every strategy; a strategy only decides what to exchange, with whom and when. A strategy is
built as `STRATEGIES.get(name)(comm, **strategy_args)`, where `comm` is the rank's Communicator (None for
a single process).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from polytrain.registry import Registry

STRATEGIES: Registry = Registry("strategy")


class Strategy(Protocol):
    """The communication policy of a training run."""

    parallel: bool
    rank: int
    world_size: int

    @staticmethod
    def check(**strategy_args) -> None:
        """Raises ValueError for invalid strategy arguments, before any worker starts."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Adapts the model once, before the optimizer is built (e.g. hooks, synchronized batch norm)."""

    def before_backward(self, last_microbatch: bool) -> None:
        """Called before each microbatch's backward; gradients are complete after the last one."""

    def after_backward(self, model: nn.Module) -> None:
        """Called once the local gradients of a step are complete, before clipping and the optimizer step."""

    def set_batch_size(self, global_batch: int) -> None:
        """Called at the start of every epoch with the global batch size of its steps."""

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Sums a small tensor of metrics over all ranks (e.g. evaluation counts)."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Makes buffers such as batch-norm running statistics equal on all ranks (before evaluation)."""

    def comm_stats(self, steps: int) -> dict:
        """The result.json `comm` section: rank 0's counts, per-step bytes and every rank's counts."""

    def state_dict(self) -> dict:
        """State to keep in checkpoints (collective: every rank calls it at the same step)."""

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned."""

    def close(self) -> None:
        """Releases threads and hooks."""


def comm_section(per_rank: list[dict], steps: int) -> dict:
    """Builds the result.json `comm` section from every rank's CommStats.as_dict()."""
    rank0 = per_rank[0]
    return {"bytes_sent": rank0["bytes_sent"], "bytes_received": rank0["bytes_received"],
            "messages": rank0["messages_sent"], "bytes_sent_per_step": rank0["bytes_sent"] / max(1, steps),
            "estimated": any(stats["estimated"] for stats in per_rank),
            "per_rank": [{"rank": rank, **stats} for rank, stats in enumerate(per_rank)]}


@STRATEGIES.register("local")
class Local:
    """One worker, no communication: the single-worker baseline every parallel strategy is measured against."""

    parallel = False
    rank = 0
    world_size = 1

    @staticmethod
    def check() -> None:
        """Local takes no arguments."""

    def __init__(self, comm: None = None) -> None:
        if comm is not None and comm.world_size > 1:
            raise ValueError(f"strategy local runs one worker; got {comm.world_size} ranks")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def before_backward(self, last_microbatch: bool) -> None:
        """Nothing to exchange."""

    def after_backward(self, model: nn.Module) -> None:
        """Nothing to exchange: the local gradient is the global one."""

    def set_batch_size(self, global_batch: int) -> None:
        """One worker needs no batch-dependent plan."""

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def sync_buffers(self, model: nn.Module) -> None:
        """One rank's buffers are the buffers."""

    def comm_stats(self, steps: int) -> dict:
        """A single worker sends nothing."""
        zero = {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0, "messages_received": 0,
                "estimated": False, "by_operation": {}}
        return comm_section([zero], steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        pass


from polytrain.strategies import allreduce  # noqa: E402,F401  (registers the parallel strategies)
