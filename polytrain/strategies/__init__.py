"""How workers cooperate: a communication policy around the shared local step.

The training loop (polytrain.train) runs the local step (forward, backward, microbatches, clipping)
once for every strategy; a strategy only decides what to exchange, with whom and when.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from polytrain.registry import Registry

STRATEGIES: Registry = Registry("strategy")


class Strategy(Protocol):
    """The communication policy of a training run."""

    def after_backward(self, model: nn.Module) -> None:
        """Called once the local gradients of a step are complete, before clipping and the optimizer step."""

    def comm_stats(self) -> dict:
        """Bytes and messages this rank has sent and received (the result.json `comm` section)."""


@STRATEGIES.register("local")
class Local:
    """One worker, no communication: the single-worker baseline every parallel strategy is measured against."""

    parallel = False

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size

    def after_backward(self, model: nn.Module) -> None:
        """Nothing to exchange: the local gradient is the global one."""

    def comm_stats(self) -> dict:
        """A single worker sends nothing."""
        rank0 = {"rank": 0, "bytes_sent": 0, "bytes_received": 0, "messages": 0}
        return {"bytes_sent": 0, "bytes_received": 0, "messages": 0, "bytes_sent_per_step": 0.0,
                "per_rank": [rank0]}
