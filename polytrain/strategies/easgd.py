"""Elastic averaging SGD: replicas explore on their own, held to a center variable by an elastic force.

`easgd:alpha=..,tau=..` is synchronous EASGD (Zhang, Choromanska & LeCun, NeurIPS 2015, eq. 5-6, and its
Algorithm 1 with the center kept by an allreduce instead of a master). Every replica i takes local steps
with the run's optimizer; every tau steps, with x~ the center,

    x_i <- x_i - alpha (x_i - x~)            (the elastic pull of every replica towards the center)
    x~  <- x~ + alpha sum_i (x_i - x~)       (the center moves towards the replicas; beta = p alpha)

from the models before the pull. The sum is one allreduce of the replicas' models, so every rank holds the
same center; the traffic is that of local SGD with period tau. EAMSGD (the paper's momentum variant) is
this policy under the momentum optimizer with Nesterov momentum (`--optimizer momentum --set
optimizer_args.nesterov=true`): the local steps are the run's torch.optim steps, whatever they are.

alpha = 0 leaves the replicas independent (tested against local SGD that never averages); alpha p must not
exceed 1 (beyond it the center overshoots the replicas' mean). The default alpha is 0.9 / p (beta = 0.9,
the paper's choice). The center is the run's model: evaluation uses it, and after the last step the
replicas pull once more (unless they just did) and every replica becomes the center. Gradients are scaled
to the shard's mean and floating buffers move with the parameters, as in local SGD. A checkpoint holds
every replica's model and optimizer state and the center: it resumes exactly at the same world size.

Asynchronous EASGD (a center on a server rank, each worker pulling on its own clock) comes with the
parameter server.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.averaging import consensus_distance, local_gradients, restored_after, sum_over


@dataclass(frozen=True)
class EASGDArgs:
    """Arguments of `easgd`.

    Attributes:
        alpha: the elastic moving rate (None: 0.9 / p, the paper's beta = p alpha = 0.9).
        tau: local steps between two elastic updates (the communication period).
        algorithm: the allreduce algorithm that sums the replicas for the center.
    """

    alpha: float | None = None
    tau: int = 4
    algorithm: str = "native"

    def __post_init__(self) -> None:
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 <= alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(f"tau must be a whole number >= 1, got {self.tau!r}")
        ALLREDUCE_ALGORITHMS.get(self.algorithm)

    def moving_rate(self, replicas: int) -> float:
        """alpha at `replicas` replicas; ValueError when beta = p alpha exceeds 1."""
        alpha = 0.9 / replicas if self.alpha is None else float(self.alpha)
        if alpha * replicas > 1 + 1e-12:
            raise ValueError(f"easgd's alpha={alpha:g} at {replicas} replicas gives beta = p alpha = "
                             f"{alpha * replicas:g} > 1: the center would overshoot the replicas' mean; use "
                             f"alpha <= {1 / replicas:g}")
        return alpha

    def check_replicas(self, replicas: int) -> None:
        self.moving_rate(replicas)


@STRATEGIES.register("easgd")
class EASGD(PolicyBase):
    """Synchronous EASGD: local steps, and every tau steps an elastic pull between replicas and center."""

    Args = EASGDArgs

    def __init__(self, mesh: Mesh, args: EASGDArgs, compressor: None = None) -> None:
        if mesh.dp is None:
            raise ValueError("easgd needs at least 2 data-parallel replicas (--workers 2 or more)")
        self.comm, self.bookkeeping, self.args = mesh.dp, mesh.bookkeeping, args
        self.alpha = args.moving_rate(self.comm.world_size)
        self.since_pull = 0
        self.elastic: list[torch.Tensor] = []
        self.center: list[torch.Tensor] = []

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.elastic = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        self.center = [t.detach().clone() for t in self.elastic]
        return model

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        local_gradients(model, self.comm.world_size)
        update()
        self.since_pull += 1
        if self.since_pull == self.args.tau:
            self.pull()

    def pull(self) -> None:
        """The elastic update of replicas and center from the models before it (one allreduce)."""
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1) for t in self.elastic])
            replicas = sum_over(self.comm, flat, self.args.algorithm)  # sum_i x_i
            p, alpha = self.comm.world_size, self.alpha
            for replica, center, total in zip(self.elastic, self.center,
                                              replicas.split([t.numel() for t in self.elastic])):
                old_center = center.clone()
                center.mul_(1 - p * alpha).add_(total.view_as(center), alpha=alpha)  # x~ + a sum_i (x_i - x~)
                replica.mul_(1 - alpha).add_(old_center, alpha=alpha)  # x_i - a (x_i - x~)
        self.since_pull = 0

    def finish(self, model: nn.Module) -> None:
        if self.since_pull:
            self.pull()
        self.become_center()

    def become_center(self) -> None:
        with torch.no_grad():
            for replica, center in zip(self.elastic, self.center):
                replica.copy_(center)

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The center (the same on every rank, no traffic); each replica's own model is put back after."""
        with restored_after(self.elastic):
            self.become_center()
            yield model

    def epoch_metrics(self, model: nn.Module) -> dict:
        return {"consensus_distance": consensus_distance(list(model.parameters()), self.bookkeeping)}

    def report(self) -> dict:
        return {"alpha": self.alpha, "beta": self.alpha * self.comm.world_size, "tau": self.args.tau,
                "algorithm": self.args.algorithm}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The replica's own model and optimizer state, and the center (the same on every rank)."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "since_pull": self.since_pull,
                "center": [t.clone() for t in self.center]}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if "center" not in state:
            raise ValueError("the checkpoint holds no EASGD center; it was trained with another strategy")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.since_pull = int(state["since_pull"])
        with torch.no_grad():
            for center, saved in zip(self.center, state["center"]):
                center.copy_(saved)
