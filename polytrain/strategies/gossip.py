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

`adpsgd:topology=...` is the asynchronous pairwise variant (AD-PSGD, Lian, Zhang, Zhang & Liu, ICML 2018):
no step waits for all, and every averaging involves two replicas. As in the paper the graph is split into
active ranks (even) and passive ranks (odd), and only edges between the two are used (the paper's
bipartite condition, which rules out deadlocks). After each local step an active rank picks one of its
passive neighbours at random (reproducibly: from its rank and step) and the two replace their models by
their mean, x_i = x_j <- (x_i + x_j) / 2, one model each way (`adpsgd:<topology>`, with a 16-byte request,
`adpsgd:header`). A passive rank never waits for a partner: a thread of its own takes the requests as they
come, and it answers them between its own steps (where the paper answers from a communication thread,
during them; here the model is never read half-updated). Pairwise averages keep the sum of the models, so
the replicas' mean moves exactly as the mean of their SGD updates, on whoever's clock. Epoch ends and
checkpoints are synchronization points: every active rank tells its partners it is done (`settle`) and each
passive rank answers every request before it. Evaluation, the final average and checkpoints are those of
D-PSGD above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from polytrain.comm.communicator import CommError
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


def bipartite_neighbours(topology: str, rank: int, p: int) -> list[int]:
    """AD-PSGD's partners of `rank`: its neighbours in `topology` of the other parity (active ranks are even,
    passive ones odd)."""
    return sorted(j for j in TOPOLOGIES.get(topology)(rank, p) if j % 2 != rank % 2)


# A request's header: [kind, the active rank's step].
REQUEST, DONE = 0.0, 1.0


@dataclass(frozen=True)
class ADPSGDArgs(GossipArgs):
    """Arguments of `adpsgd`: those of `gossip`."""

    receives_from_any_rank = True  # a passive rank takes requests from whichever partner is first

    def check_replicas(self, replicas: int) -> None:
        lonely = [r for r in range(replicas) if not bipartite_neighbours(self.topology, r, replicas)]
        if lonely:
            raise ValueError(f"adpsgd pairs even (active) with odd (passive) ranks along the topology's edges; "
                             f"in topology {self.topology} at {replicas} workers rank {lonely[0]} has no "
                             f"neighbour of the other parity (use ring or complete)")


@STRATEGIES.register("adpsgd")
class ADPSGD(Gossip):
    """AD-PSGD: a local step, then an active rank averages its model with one passive neighbour's, without
    waiting for anyone else (see the module docstring)."""

    Args = ADPSGDArgs

    def __init__(self, mesh: Mesh, args: ADPSGDArgs, compressor: None = None) -> None:
        if mesh.dp is None or mesh.dp.world_size != mesh.world_size:
            raise ValueError("adpsgd needs at least 2 workers, every rank a data-parallel replica")
        super().__init__(mesh, args)
        p, rank = self.comm.world_size, self.comm.rank
        args.check_replicas(p)
        self.partners = bipartite_neighbours(args.topology, rank, p)
        self.active = rank % 2 == 0
        ranks = list(range(p)) if self.comm.group is None else dist.get_process_group_ranks(self.comm.group)
        # Requests and models on groups of their own: a passive rank's receive from any rank must meet
        # nothing but requests.
        self.requests = self.comm.sibling(self.comm.axis, dist.new_group(ranks))
        self.models = self.comm.sibling(self.comm.axis, dist.new_group(ranks))
        self.operation = f"adpsgd:{args.topology}"
        self.exchanges = 0
        self.settled = True  # nothing in flight: no step since the last synchronization point
        self.listener: threading.Thread | None = None
        self.incoming: queue.Queue = queue.Queue()
        self.done = 0  # a passive rank's partners that reached the synchronization point

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        local_gradients(model, self.comm.world_size)
        update()
        self.settled = False
        self.mixed_since_average = True  # the replicas differ by their local steps
        if self.active:
            choice = torch.randint(len(self.partners), (1,),
                                   generator=torch.Generator().manual_seed(self.comm.rank * 1_000_003 + global_step))
            partner = self.partners[int(choice)]
            self.requests.send(torch.tensor([REQUEST, global_step], dtype=torch.float64), partner, "adpsgd:header")
            self.average_with(partner)
        else:
            self.answer(wait=False)

    def average_with(self, partner: int) -> None:
        """x <- (x + x_partner) / 2, one model each way; both ranks compute the same mean."""
        with torch.no_grad():
            own = torch.cat([t.reshape(-1) for t in self.mixed])
            theirs = self.models.scratch("adpsgd", own.numel(), own.dtype)
            self.models.exchange([(own, partner)], [(theirs, partner)], self.operation)
            mean = own.add_(theirs).mul_(0.5)
            for tensor, part in zip(self.mixed, mean.split([t.numel() for t in self.mixed])):
                tensor.copy_(part.view_as(tensor))
        self.exchanges += 1

    # -- a passive rank's side ---------------------------------------------------------------------------

    def listen(self) -> None:
        """The listener thread: every request of the epoch into `incoming`, until each partner is done."""
        header = torch.empty(2, dtype=torch.float64)
        done = 0
        try:
            while done < len(self.partners):
                source = self.requests.recv_any(header, "adpsgd:header")
                done += header[0].item() == DONE
                self.incoming.put((source, header[0].item()))
        except Exception as error:  # handed to the training thread, which raises it
            self.incoming.put(error)

    def answer(self, wait: bool) -> None:
        """Averages with every partner whose request came (wait: until every partner is done)."""
        if self.listener is None and self.done < len(self.partners):
            self.listener = threading.Thread(target=self.listen, name="adpsgd-listener", daemon=True)
            self.listener.start()
        timeout = self.requests.timeout.total_seconds()
        while self.done < len(self.partners):
            try:
                item = self.incoming.get(block=wait, timeout=timeout if wait else None)
            except queue.Empty:
                if wait:
                    raise CommError(f"rank {self.comm.rank}: no adpsgd request from its partners in "
                                    f"{timeout:.0f} s") from None
                return
            if isinstance(item, Exception):
                raise item
            source, kind = item
            if kind == DONE:
                self.done += 1
            else:
                self.average_with(source)
        if self.listener is not None:
            self.listener.join()
            self.listener = None

    # -- synchronization points --------------------------------------------------------------------------

    def settle(self, model: nn.Module, update: Update, global_step: int) -> None:
        self.complete_pairs()

    def complete_pairs(self) -> None:
        """A synchronization point: the active ranks tell their partners they are done, the passive ranks
        answer every request before their partners' last. Also before evaluating, the final average and
        checkpoints, so that a hand-written loop needs no call of its own."""
        if self.settled:
            return
        if self.active:
            done = torch.tensor([DONE, -1], dtype=torch.float64)
            self.requests.exchange([(done, partner) for partner in self.partners], [], "adpsgd:header")
        else:
            self.answer(wait=True)
            self.done = 0
        self.settled = True

    def finish(self, model: nn.Module) -> None:
        self.complete_pairs()
        super().finish(model)

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        self.complete_pairs()
        with super().evaluation_model(model) as evaluated:
            yield evaluated

    def epoch_metrics(self, model: nn.Module) -> dict:
        self.complete_pairs()
        return super().epoch_metrics(model)

    def report(self) -> dict:
        return {"topology": self.args.topology, "partners": len(self.partners), "exchanges": self.exchanges}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        self.complete_pairs()
        return {**super().state_dict(model, optimizer), "exchanges": self.exchanges}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().load_state_dict(state, model, optimizer)
        self.exchanges = int(state.get("exchanges", 0))
