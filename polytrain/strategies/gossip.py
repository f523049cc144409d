"""Gossip (decentralized) SGD: every replica steps on its own shard, then mixes its model with its neighbours'.

`gossip:topology=ring|torus|exponential|complete` (D-PSGD, Lian et al., NeurIPS 2017). There is no global
reduction: at every step rank i sends its model to its neighbours in the topology and replaces it by
x_i <- sum_j W_ij x_j over itself and its neighbours, with W the Metropolis-Hastings weights of the graph
(W_ij = 1 / (1 + max(deg i, deg j)) between neighbours, the rest on the diagonal; Xiao & Boyd 2004), which
are symmetric and doubly stochastic for every undirected graph, so the replicas' mean moves exactly as the
mean of their SGD updates and consensus is reached at the rate of W's spectral gap (reported).

Topologies over p ranks (neighbour sets deduplicated, without the rank itself):
- ring: i - 1 and i + 1 (mod p); 2 neighbours, 1 at p = 2;
- torus: a 2-D torus of r x c ranks, r the largest divisor of p with r <= sqrt(p) (a ring for prime p);
- exponential: i +- 2^k (mod p) for 2^k < p, the undirected form of the exponential graph of Assran et al.
  (SGP, ICML 2019); about 2 log2(p) neighbours;
- complete: every other rank, W = 1/p everywhere: one step is then the synchronous mean, so gossip on the
  complete graph equals `allreduce` (tested), at p - 1 model transfers per rank and step.

Decisions where the paper leaves room:
- Adapt then combine: the local step comes first, then the mixing of the stepped models (the diffusion
  form; Lian et al. mix the models of before the step and add the local gradient, which lets the transfer
  overlap the backward pass). Both converge at the same rate; this order makes the complete graph exactly
  the synchronous step, which is what makes the equivalence test meaningful. Gradients are scaled to the
  shard's mean as in local SGD (polytrain.strategies.local_sgd), floating buffers are mixed as parameters.
- Every step's transfers are counted under `gossip:<topology>`: deg_i x model bytes sent per step. After the
  last step the replicas are averaged once (an allreduce, counted as training traffic), so the run ends with
  one model; evaluation during the run uses the replicas' average (computed as bookkeeping; the replicas
  keep their own models), and every epoch row logs the consensus distance before that final average.
- A checkpoint holds every replica's model and optimizer state: it resumes exactly at the same world size.

The asynchronous pairwise variant (AD-PSGD, Lian et al., ICML 2018) is not built yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from polytrain.comm.mesh import Mesh
from polytrain.registry import Registry
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.averaging import average_into, consensus_distance, local_gradients, replaced_by_mean

TOPOLOGIES: Registry[Callable[[int, int], set[int]]] = Registry("topology")


@TOPOLOGIES.register("ring")
def ring(rank: int, p: int) -> set[int]:
    return {(rank - 1) % p, (rank + 1) % p} - {rank}


@TOPOLOGIES.register("torus")
def torus(rank: int, p: int) -> set[int]:
    rows = max(r for r in range(1, math.isqrt(p) + 1) if p % r == 0)
    columns = p // rows
    row, column = divmod(rank, columns)
    vertical = {((row + d) % rows) * columns + column for d in (-1, 1)}
    horizontal = {row * columns + (column + d) % columns for d in (-1, 1)}
    return (vertical | horizontal) - {rank}


@TOPOLOGIES.register("exponential")
def exponential(rank: int, p: int) -> set[int]:
    offsets = [1 << k for k in range(max(1, p).bit_length()) if (1 << k) < p]
    return {(rank + sign * offset) % p for offset in offsets for sign in (-1, 1)} - {rank}


@TOPOLOGIES.register("complete")
def complete(rank: int, p: int) -> set[int]:
    return set(range(p)) - {rank}


def mixing_matrix(topology: str, p: int) -> torch.Tensor:
    """The p x p Metropolis-Hastings mixing matrix of `topology` (float64; symmetric, doubly stochastic)."""
    neighbours = [TOPOLOGIES.get(topology)(rank, p) for rank in range(p)]
    for i, around in enumerate(neighbours):
        for j in around:
            if i not in neighbours[j]:
                raise ValueError(f"topology {topology} is not undirected at p={p}: {j} is not linked to {i}")
    weights = torch.zeros(p, p, dtype=torch.float64)
    for i, around in enumerate(neighbours):
        for j in around:
            weights[i, j] = 1.0 / (1 + max(len(around), len(neighbours[j])))
        weights[i, i] = 1.0 - weights[i].sum()
    return weights


def spectral_gap(weights: torch.Tensor) -> float:
    """1 - |lambda_2| of a symmetric mixing matrix: the fraction of disagreement one mixing step removes."""
    if weights.shape[0] == 1:
        return 1.0
    magnitudes = torch.linalg.eigvalsh(weights).abs().sort(descending=True).values
    return float(1.0 - magnitudes[1])


@dataclass(frozen=True)
class GossipArgs:
    """Arguments of `gossip`.

    Attributes:
        topology: the communication graph: ring, torus, exponential or complete.
    """

    topology: str = "ring"

    def __post_init__(self) -> None:
        TOPOLOGIES.get(self.topology)


@STRATEGIES.register("gossip")
class Gossip(PolicyBase):
    """D-PSGD: a local step, then a weighted average with the neighbours' models (see the module docstring)."""

    Args = GossipArgs

    def __init__(self, mesh: Mesh, args: GossipArgs, compressor: None = None) -> None:
        if mesh.dp is None:
            raise ValueError("gossip needs at least 2 data-parallel replicas (--workers 2 or more)")
        self.comm, self.bookkeeping, self.args = mesh.dp, mesh.bookkeeping, args
        p, rank = self.comm.world_size, self.comm.rank
        self.weights = mixing_matrix(args.topology, p)
        # Summed in global rank order (the rank itself included), so that ranks mixing the same models with
        # the same weights (the complete graph) hold bitwise the same result.
        self.terms = [(j, self.weights[rank, j].item()) for j in range(p) if self.weights[rank, j] != 0]
        self.neighbours = sorted(TOPOLOGIES.get(args.topology)(rank, p))
        self.mixed: list[torch.Tensor] = []
        self.mixed_since_average = False

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.mixed = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        return model

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        local_gradients(model, self.comm.world_size)
        update()
        self.mix()

    def mix(self) -> None:
        """x_i <- sum_j W_ij x_j over this rank and its neighbours, one transfer to and from each neighbour."""
        with torch.no_grad():
            own = torch.cat([t.reshape(-1) for t in self.mixed])
            received = {j: self.comm.scratch(f"gossip:{j}", own.numel(), own.dtype) for j in self.neighbours}
            self.comm.exchange([(own, j) for j in self.neighbours], [(received[j], j) for j in self.neighbours],
                               f"gossip:{self.args.topology}")
            models = {**received, self.comm.rank: own}
            total = torch.zeros_like(own)
            for j, weight in self.terms:
                total.add_(models[j], alpha=weight)
            for tensor, part in zip(self.mixed, total.split([t.numel() for t in self.mixed])):
                tensor.copy_(part.view_as(tensor))
        self.mixed_since_average = True

    def finish(self, model: nn.Module) -> None:
        if self.mixed_since_average:
            average_into(self.mixed, self.comm)
            self.mixed_since_average = False

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The replicas' average (bookkeeping traffic); each replica's own model is put back after."""
        if not self.mixed_since_average:
            yield model
            return
        with replaced_by_mean(self.mixed, self.bookkeeping):
            yield model

    def epoch_metrics(self, model: nn.Module) -> dict:
        return {"consensus_distance": consensus_distance(list(model.parameters()), self.bookkeeping)}

    def report(self) -> dict:
        return {**dataclasses.asdict(self.args), "neighbours": len(self.neighbours),
                "spectral_gap": spectral_gap(self.weights)}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Every replica's model and optimizer state are its own."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "mixed_since_average": self.mixed_since_average}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if "model" not in state:
            raise ValueError("the checkpoint holds no gossip replicas; it was trained with another strategy")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.mixed_since_average = bool(state["mixed_since_average"])
