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

`easgd:servers=k` is asynchronous EASGD (the paper's Algorithm 1 with its master, section 3): the center
lives on k server ranks beside the workers (sharded by bytes as a parameter server's, polytrain.strategies.ps;
every byte through the counted "ps" communicator). Every tau of its own steps a worker sends its model to
the servers (`easgd:push`) and, at once, without waiting for the others, each server answers with its
center x~ (`easgd:pull`) and moves it, x~ <- x~ + alpha (x_i - x~), while the worker pulls itself towards
the answer, x_i <- x_i - alpha (x_i - x~): the paper's atomic read and elastic update of the center by one
worker. A fast worker pulls more often than a slow one and nobody waits for the slowest. Epoch ends and
checkpoints are synchronization points (`settle`): every worker's exchanges are done and the servers send
the center (`easgd:center`), which the workers evaluate and, after the last step, become. A checkpoint
holds each worker's replica and optimizer, and each server's shard of the center and its count of elastic
updates: it resumes at the same world size. alpha = 0 leaves the center at the initial model and the
workers independent, as in the synchronous form.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.communicator import BOOKKEEPING
from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.averaging import consensus_distance, local_gradients, restored_after, sum_over
from polytrain.strategies.ps import PostedSends, flatten, shard_tensors, write_flat

# A worker's header to a server of the asynchronous form: [kind, its step].
EXCHANGE, SETTLE = 0.0, 1.0


@dataclass(frozen=True)
class EASGDArgs:
    """Arguments of `easgd`.

    Attributes:
        alpha: the elastic moving rate (None: 0.9 / p, the paper's beta = p alpha = 0.9).
        tau: local steps between two elastic updates (the communication period).
        algorithm: the allreduce algorithm that sums the replicas for the center (synchronous form).
        servers: 0 for the synchronous form (the center kept by an allreduce on every rank); k >= 1 for the
            asynchronous one, the center on k server ranks beside the workers.
    """

    alpha: float | None = None
    tau: int = 4
    algorithm: str = "native"
    servers: int = 0
    servers_step = False  # the servers move the center; the workers step their optimizers

    def __post_init__(self) -> None:
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 <= alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(f"tau must be a whole number >= 1, got {self.tau!r}")
        ALLREDUCE_ALGORITHMS.get(self.algorithm)
        if isinstance(self.servers, bool) or not isinstance(self.servers, int) or self.servers < 0:
            raise ValueError(f"servers must be a whole number >= 0 (0: the synchronous form), got {self.servers!r}")
        if self.servers and self.algorithm != "native":
            raise ValueError("algorithm is the synchronous form's allreduce; easgd with servers sends to them")

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
    """EASGD: local steps, and every tau steps an elastic pull between a replica and the center, all replicas
    at once by an allreduce or, with servers, each on its own clock (see the module docstring)."""

    Args = EASGDArgs

    def __init__(self, mesh: Mesh, args: EASGDArgs, compressor: None = None) -> None:
        self.mesh, self.args = mesh, args
        if args.servers:
            if mesh.servers != args.servers:
                raise ValueError(f"easgd:servers={args.servers}, but the mesh has {mesh.servers} server ranks")
            self.comm, replicas = mesh.comms["ps"], mesh.shape.dp
            self.server_ranks = list(range(replicas, replicas + args.servers))
            self.bookkeeping = None if mesh.is_server else mesh.dp.sibling(BOOKKEEPING)
        else:
            if mesh.dp is None:
                raise ValueError("easgd needs at least 2 data-parallel replicas (--workers 2 or more), or servers")
            self.comm, self.bookkeeping, replicas = mesh.dp, mesh.bookkeeping, mesh.dp.world_size
        self.replicas = replicas
        self.alpha = args.moving_rate(replicas)
        self.since_pull = 0
        self.exchanges = 0  # a server's elastic updates of its shard of the center
        self.elastic: list[torch.Tensor] = []
        self.center: list[torch.Tensor] = []

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.elastic = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        self.center = [t.detach().clone() for t in self.elastic]
        if self.args.servers:
            if self.args.servers > len(self.elastic):
                raise ValueError(f"easgd:servers={self.args.servers}, but the model has {len(self.elastic)} tensors "
                                 f"to shard (at most one server per tensor)")
            if any(t.dtype != self.elastic[0].dtype for t in self.elastic):
                raise ValueError("easgd with servers sends each shard as one flat tensor; the model mixes dtypes "
                                 f"{sorted({str(t.dtype) for t in self.elastic})}")
            indices = shard_tensors([t.numel() * t.element_size() for t in self.elastic], self.args.servers)
            self.shards = [[self.elastic[i] for i in shard] for shard in indices]
            self.centers = [[self.center[i] for i in shard] for shard in indices]
            self.shard_bytes = [sum(t.numel() * t.element_size() for t in shard) for shard in self.shards]
            self.outgoing: dict[int, PostedSends] = {}
        return model

    @property
    def is_server(self) -> bool:
        return self.mesh.is_server

    def server_index(self) -> int:
        return self.mesh.rank - self.replicas

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        local_gradients(model, self.replicas)
        update()
        self.since_pull += 1
        if self.since_pull == self.args.tau:
            self.exchange(global_step) if self.args.servers else self.pull()

    def pull(self) -> None:
        """The elastic update of replicas and center from the models before it (one allreduce)."""
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1) for t in self.elastic])
            replicas = sum_over(self.comm, flat, self.args.algorithm)  # sum_i x_i
            p, alpha = self.replicas, self.alpha
            for replica, center, total in zip(self.elastic, self.center,
                                              replicas.split([t.numel() for t in self.elastic])):
                old_center = center.clone()
                center.mul_(1 - p * alpha).add_(total.view_as(center), alpha=alpha)  # x~ + a sum_i (x_i - x~)
                replica.mul_(1 - alpha).add_(old_center, alpha=alpha)  # x_i - a (x_i - x~)
        self.since_pull = 0

    # -- the asynchronous form: a worker's side ----------------------------------------------------------

    def exchange(self, global_step: int) -> None:
        """This replica to the servers and their center back, then the replica's elastic pull towards it."""
        headers = [(torch.tensor([EXCHANGE, global_step], dtype=torch.float64), s) for s in self.server_ranks]
        models = [(flatten(shard), s) for shard, s in zip(self.shards, self.server_ranks)]
        received = [torch.empty(sum(t.numel() for t in shard), dtype=shard[0].dtype) for shard in self.shards]
        transfers = [self.comm.post(headers, [], "easgd:header"), self.comm.post(models, [], "easgd:push"),
                     self.comm.post([], list(zip(received, self.server_ranks)), "easgd:pull")]
        for transfer in transfers:
            transfer.wait()
        with torch.no_grad():
            for shard, centers, center in zip(self.shards, self.centers, received):
                write_flat(centers, center)
                for replica, old_center in zip(shard, centers):
                    replica.mul_(1 - self.alpha).add_(old_center, alpha=self.alpha)  # x_i - a (x_i - x~)
        self.since_pull = 0

    # -- synchronization points --------------------------------------------------------------------------

    def settle(self, model: nn.Module, update: Update, global_step: int) -> None:
        """Asynchronous form: the servers answer every exchange until each worker settles, then send every
        worker the center."""
        if not self.args.servers:
            return
        if self.is_server:
            self.serve()
            return
        headers = [(torch.tensor([SETTLE, global_step], dtype=torch.float64), s) for s in self.server_ranks]
        received = [torch.empty(sum(t.numel() for t in shard), dtype=shard[0].dtype) for shard in self.shards]
        self.comm.exchange(headers, [], "easgd:header")
        self.comm.exchange([], list(zip(received, self.server_ranks)), "easgd:center")
        for centers, center in zip(self.centers, received):
            write_flat(centers, center)

    def serve(self) -> None:
        """A server's loop: an elastic update for every replica that arrives, until every worker settles."""
        shard = self.shards[self.server_index()]
        header = torch.empty(2, dtype=torch.float64)
        settled: set[int] = set()
        while len(settled) < self.replicas:
            source = self.comm.recv_any(header, "easgd:header")
            if header[0].item() == SETTLE:
                settled.add(source)
                continue
            replica = torch.empty(sum(t.numel() for t in shard), dtype=shard[0].dtype)
            self.comm.recv(replica, source, "easgd:push")
            previous = self.outgoing.pop(source, None)
            if previous is not None:  # taken by now: the worker sent this replica after it
                previous.wait()
            center = flatten(shard)  # the center before this update: what the worker pulls towards
            self.outgoing[source] = PostedSends([self.comm.post([(center, source)], [], "easgd:pull")], [center])
            with torch.no_grad():
                for tensor, values in zip(shard, replica.split([t.numel() for t in shard])):
                    tensor.add_(values.view_as(tensor) - tensor, alpha=self.alpha)  # x~ + a (x_i - x~)
            self.exchanges += 1
        for transfer in self.outgoing.values():
            transfer.wait()
        self.outgoing.clear()
        center = flatten(shard)
        self.comm.exchange([(center, worker) for worker in sorted(settled)], [], "easgd:center")

    # -- the end, evaluation, metrics, checkpoints -------------------------------------------------------

    def finish(self, model: nn.Module) -> None:
        if self.args.servers:  # settled at the epoch's end: the center is the servers'
            if not self.is_server:
                self.become_center()
            return
        if self.since_pull:
            self.pull()
        self.become_center()

    def become_center(self) -> None:
        with torch.no_grad():
            for replica, center in zip(self.elastic, self.center):
                replica.copy_(center)

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The center (the same on every worker, no traffic); each replica's own model is put back after.
        A server evaluates nothing."""
        if self.is_server:
            yield model
            return
        with restored_after(self.elastic):
            self.become_center()
            yield model

    def epoch_metrics(self, model: nn.Module) -> dict:
        if self.is_server:
            return {}
        return {"consensus_distance": consensus_distance(list(model.parameters()), self.bookkeeping)}

    def report(self) -> dict:
        report = {"alpha": self.alpha, "beta": self.alpha * self.replicas, "tau": self.args.tau}
        if self.args.servers:
            return {**report, "servers": self.args.servers, "shard_bytes": self.shard_bytes}
        return {**report, "algorithm": self.args.algorithm}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """A worker's own replica and optimizer state and the center it last saw; a server's shard of the
        center and its count of elastic updates."""
        if self.is_server:
            return {"center": [t.clone() for t in self.shards[self.server_index()]], "exchanges": self.exchanges}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "since_pull": self.since_pull,
                "center": [t.clone() for t in self.center]}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if "center" not in state:
            raise ValueError("the checkpoint holds no EASGD center; it was trained with another strategy")
        if self.is_server:
            write_flat(self.shards[self.server_index()], flatten(state["center"]))
            self.exchanges = int(state["exchanges"])
            return
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.since_pull = int(state["since_pull"])
        with torch.no_grad():
            for center, saved in zip(self.center, state["center"]):
                center.copy_(saved)
