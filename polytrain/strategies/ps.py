"""Parameter server: server ranks hold the model and apply the run's optimizer; workers push gradients and
pull parameters (`--strategy ps:servers=k,mode=sync|ssp|async,...`).

The run has W workers (`--workers W`, the data-parallel replicas) and k server ranks beside them (ranks W
.. W+k-1; polytrain.comm.mesh). The parameters are split into k shards of whole tensors balanced by bytes
(largest first onto the least loaded server: whole tensors, because optimizers such as LARS and LAMB act
per tensor). Server j keeps the run's torch.optim optimizer for its shard and applies every update; every
byte goes through the counted "ps" communicator (headers as `ps:header`, gradients as `ps:push`,
parameters as `ps:pull`).

Modes (Ben-Nun & Hoefler 2019, section 7.1):
- `sync`: bulk-synchronous. The update of step t is the sum of every worker's gradient of step t (each is
  already weighted by its shard of the global batch), applied as one optimizer step; every worker then
  pulls the parameters of version t+1. This is synchronous SGD: equal to `allreduce` up to float
  reassociation.
- `ssp,staleness=s` (Ho et al., NeurIPS 2013): the same per-step updates, but a worker that pushed step t
  gets parameters for step t+1 as soon as the server has applied the updates of steps <= t - s, so it may
  compute up to s steps ahead of the slowest worker. `sync` is `ssp` with s = 0, by the same code.
- `async` (Downpour SGD, Dean et al., NeurIPS 2012): the server applies each gradient on arrival; a worker
  pushes its gradients summed over `push_every` steps and fetches the parameters every `fetch_every`
  steps, computing on the parameters it last fetched in between. No bound on staleness.
- `sync,backup=b` (backup workers, Chen et al., "Revisiting distributed synchronous SGD", 2016): a step's
  update is applied as soon as the first n - b of the n workers' gradients of that step have arrived, scaled
  by n / (n - b); later ones are dropped. A worker whose reply shows that the servers have moved past its
  next step skips the steps already applied (`behind`), so a straggler costs the others nothing and rejoins
  on fresh parameters. backup=0 is `sync`, by the same code.
- `groups=g` (hierarchical, as in Project Adam; Chilimbi et al., OSDI 2014): the workers form g contiguous
  groups; each group's members send their gradients to its first worker, the leader, which sums them,
  talks to the servers for the group and sends the parameters back. The servers see g contributors.

DistBelief (Dean et al., NeurIPS 2012): the workers may be model-parallel replicas, dp x pp (a pipeline of
stages per replica; not tp, whose shards are no whole tensors). Each stage pushes the gradients of its own
tensors of each server's shard and pulls only them; a server's contributors are the workers holding part of
its shard, and an update sums their pieces per tensor (under async a push moves only its stage's tensors).

The staleness of an applied gradient is the number of updates the server applied between the parameters
the gradient was computed on and its own application (steps for sync/ssp, pushes for async); the servers
record every one, result.json's `comm.staleness` holds the histogram, metrics.jsonl each epoch's maximum
and mean. Evaluation uses the server's parameters: epochs and checkpoints are synchronization points
(`settle`) where every pushed gradient is applied and every worker leaves with the servers' parameters, so a
checkpoint is a consistent cut that resumes at the same world size in every mode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from polytrain.comm.communicator import BOOKKEEPING
from polytrain.comm.gather import all_gather, gather_objects
from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.averaging import average_into

MODES = ("sync", "ssp", "async")
# A worker's header: what it sends, at which step, on which parameters, and the learning rate of every
# optimizer parameter group (the server steps the run's schedule as the workers see it).
STEP, SETTLE = 0.0, 1.0
KIND, CLOCK, VERSION, HAS_GRADIENT, WANTS_PARAMETERS = range(5)
HEADER_FIELDS = 5
# A server's reply: the version of its shard and whether the parameters follow.
REPLY_FIELDS = 2


def _whole(value, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")


@dataclass(frozen=True)
class ParameterServerArgs:
    """Arguments of `ps`.

    Attributes:
        servers: server ranks beside the workers, each holding one shard of the parameters.
        mode: sync (bulk-synchronous), ssp (stale-synchronous) or async (Downpour).
        staleness: ssp's bound s: a worker may be at most s steps ahead of the slowest.
        push_every: async: steps whose gradients a worker sums before pushing them.
        fetch_every: async: steps between two fetches of the parameters.
        groups: hierarchical: groups of workers, each talking to the servers through its leader (None:
            every worker talks to the servers itself).
        backup: sync: a step is applied once the first n - backup workers' gradients are in.
    """

    servers: int = 1
    mode: str = "sync"
    staleness: int | None = None
    push_every: int = 1
    fetch_every: int = 1
    groups: int | None = None
    backup: int = 0
    servers_step = True  # the servers apply the optimizer (train/defaults refuses what needs it on the workers)
    serves_stages = True  # each pipeline stage exchanges its own tensors with the servers (DistBelief)

    def __post_init__(self) -> None:
        _whole(self.servers, "servers", 1)
        if self.mode not in MODES:
            raise ValueError(f"unknown ps mode '{self.mode}'; expected {', '.join(MODES)}")
        if self.mode == "ssp":
            if self.staleness is None:
                raise ValueError("ps mode=ssp needs its bound: staleness=S (S >= 0 steps)")
            _whole(self.staleness, "staleness", 0)
        elif self.staleness is not None:
            raise ValueError(f"staleness is the bound of mode=ssp; mode={self.mode} "
                             f"{'is staleness 0' if self.mode == 'sync' else 'has no bound'}")
        _whole(self.push_every, "push_every", 1)
        _whole(self.fetch_every, "fetch_every", 1)
        if self.mode != "async" and (self.push_every, self.fetch_every) != (1, 1):
            raise ValueError(f"push_every and fetch_every are async's; mode={self.mode} pushes and fetches "
                             f"every step")
        if self.groups is not None:
            _whole(self.groups, "groups", 1)
        _whole(self.backup, "backup", 0)
        if self.backup and (self.mode != "sync" or self.groups is not None):
            raise ValueError(f"backup workers drop a synchronous step's last gradients; use mode=sync without groups "
                             f"(got mode={self.mode}{', groups' if self.groups is not None else ''})")

    @property
    def bound(self) -> int | None:
        """The staleness bound in steps (None: asynchronous, unbounded)."""
        return {"sync": 0, "ssp": self.staleness, "async": None}[self.mode]

    def check_replicas(self, replicas: int) -> None:
        if self.groups is not None and self.groups > replicas:
            raise ValueError(f"ps groups={self.groups} needs at least as many workers; the run has {replicas}")
        if self.backup >= replicas:
            raise ValueError(f"ps backup={self.backup} leaves no gradient of {replicas} workers; use backup < {replicas}")


def shard_tensors(sizes: list[int], servers: int) -> list[list[int]]:
    """Indices of whole tensors of `sizes` bytes for each server: largest first onto the least loaded."""
    loads, shards = [0] * servers, [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        server = min(range(servers), key=lambda j: (loads[j], j))
        shards[server].append(index)
        loads[server] += sizes[index]
    return [sorted(shard) for shard in shards]


def worker_groups(workers: int, groups: int) -> list[list[int]]:
    """`groups` contiguous groups of the worker ranks, sizes differing by at most one."""
    size, extra = divmod(workers, groups)
    starts = [g * size + min(g, extra) for g in range(groups + 1)]
    return [list(range(starts[g], starts[g + 1])) for g in range(groups)]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def write_flat(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        for tensor, values in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(values.view_as(tensor))


def _gradients(shard: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shard])


@STRATEGIES.register("ps")
class ParameterServer(PolicyBase):
    """A parameter server's worker or server side, by this rank's place in the mesh (module docstring)."""

    Args = ParameterServerArgs
    aggregates = True

    def __init__(self, mesh: Mesh, args: ParameterServerArgs, compressor: None = None) -> None:
        if mesh.servers != args.servers:
            raise ValueError(f"ps:servers={args.servers}, but the mesh has {mesh.servers} server ranks")
        self.mesh, self.args, self.ps = mesh, args, mesh.comms["ps"]
        self.workers = mesh.shape.world_size  # every worker rank: dp replicas x pp stages
        self.server_ranks = list(range(self.workers, self.workers + args.servers))
        groups = worker_groups(self.workers, args.groups or self.workers)
        self.leaders = [group[0] for group in groups]
        self.group = next((group for group in groups if mesh.rank in group), [])
        self.settled_at: int | None = None
        self.since_push = self.since_fetch = 0
        self.epoch_staleness: Counter = Counter()  # a server's, since the last epoch_metrics
        self.dropped = self.skipped = 0  # backup workers: a server's late gradients, a worker's skipped steps
        self.staleness: Counter = Counter()  # rank 0's: every server's, for the whole run

    @property
    def is_leader(self) -> bool:
        return self.mesh.rank in self.leaders

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        # The optimizer holds the whole model's parameters on every rank (a pipeline stage's model only its
        # own): their order is the one all ranks shard by.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.args.servers > len(params):
            raise ValueError(f"ps:servers={self.args.servers}, but the model has {len(params)} parameter tensors "
                             f"to shard (at most one server per tensor)")
        indices = shard_tensors([p.numel() * p.element_size() for p in params], self.args.servers)
        self.shard_bytes = [sum(params[i].numel() * params[i].element_size() for i in shard) for shard in indices]
        self.dtype = params[0].dtype
        if any(p.dtype != self.dtype for p in params):
            raise ValueError(f"ps sends each shard as one flat tensor; the model mixes parameter dtypes "
                             f"{sorted({str(p.dtype) for p in params})}")
        self.optimizer = optimizer
        held = self.held_tensors(model, params)
        # pieces[w][j]: the tensors (indices into params) worker w exchanges with server j.
        pieces = [[[i for i in shard if i in held[w]] for shard in indices] for w in range(self.workers)]
        if self.mesh.is_server:
            j = self.mesh.rank - self.workers
            self.shard = [params[i] for i in indices[j]]
            self.version = 0  # updates applied to this shard
            # The contributors of this shard (leaders holding any of it) and where their tensors sit in it.
            self.contributors = [w for w in self.leaders if pieces[w][j]]
            place = {i: k for k, i in enumerate(indices[j])}
            self.pieces = {w: [place[i] for i in pieces[w][j]] for w in self.contributors}
            self.buckets: dict[int, dict[int, tuple[torch.Tensor, int, list[float]]]] = {}
            self.waiting: list[tuple[int, int]] = []  # (contributor, step) asking for parameters
            self.outgoing: dict[int, PostedSends] = {}  # replies in flight, per contributor
        else:
            # This worker's links: the servers it talks to, each with the tensors it holds of their shard.
            mine = pieces[self.mesh.rank]
            self.links = [j for j in range(self.args.servers) if mine[j]]
            self.local = [[params[i] for i in mine[j]] for j in self.links]
            self.local_numel = [sum(p.numel() for p in tensors) for tensors in self.local]
            self.versions = [0] * len(self.links)  # of the parameters this worker holds, per link
            self.pending: list[torch.Tensor] | None = None  # async: gradients summed since the last push
            self.pending_versions: list[int] = []
            self.books = self.mesh.dp.sibling(BOOKKEEPING) if self.mesh.dp is not None else None
        return model

    def held_tensors(self, model: nn.Module, params: list[nn.Parameter]) -> list[set[int]]:
        """For every worker, the indices of the parameters it holds: all of them, or with pp its stage's
        (gathered over the world, as bookkeeping)."""
        if self.mesh.shape.pp == 1:
            return [set(range(len(params)))] * self.workers
        own = {id(p) for p in model.parameters()}
        mine = [] if self.mesh.is_server else [i for i, p in enumerate(params) if id(p) in own]
        gathered = all_gather(self.mesh.bookkeeping, torch.tensor(mine, dtype=torch.int64))
        return [set(t.tolist()) for t in gathered[:self.workers]]

    # -- the worker's side -------------------------------------------------------------------------------

    def behind(self, global_step: int) -> bool:
        """Backup workers: whether every server already applied step `global_step` without this worker (its
        gradient came too late), so the worker skips it."""
        if not self.args.backup or self.mesh.is_server or global_step >= min(self.versions):
            return False
        self.skipped += 1
        return True

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        gradients = [_gradients(tensors) for tensors in self.local]
        self.since_push += 1
        self.since_fetch += 1
        push = self.since_push == self.args.push_every
        fetch = self.since_fetch == self.args.fetch_every
        if push:
            self.since_push = 0
        if fetch:
            self.since_fetch = 0
        leader = self.group[0]
        if not self.is_leader:  # a member: its gradient to the leader, the group's parameters back
            self.ps.send(torch.cat(gradients), leader, "ps:group_reduce")
            if fetch:
                self.receive_from_leader()
            return
        if len(self.group) > 1:
            gradients = self.sum_group(gradients)
        if self.pending is None:
            self.pending, self.pending_versions = gradients, list(self.versions)
        else:
            self.pending = [total + g for total, g in zip(self.pending, gradients)]
        if push or fetch:
            changed = self.contact(STEP, global_step, push, fetch)
            if fetch:
                self.send_to_members(changed)

    def sum_group(self, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
        """The group's gradient: the leader's plus its members', in rank order."""
        members = self.group[1:]
        received = [torch.empty(sum(self.local_numel), dtype=self.dtype) for _ in members]
        self.ps.exchange([], list(zip(received, members)), "ps:group_reduce")
        total = torch.cat(gradients)
        for other in received:
            total += other
        return list(total.split([g.numel() for g in gradients]))

    def contact(self, kind: float, clock: int, push: bool, fetch: bool) -> bool:
        """Sends a header (and the summed gradients) to every server; with `fetch`, takes the replies and
        the parameters of every server that has newer ones. Returns whether any parameters came."""
        lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        servers = [self.server_ranks[j] for j in self.links]
        sends, pushes = [], []
        for k, server in enumerate(servers):
            version = self.pending_versions[k] if push else self.versions[k]
            header = torch.tensor([kind, clock, version, float(push), float(fetch), *lrs], dtype=torch.float64)
            sends.append((header, server))
            if push:
                pushes.append((self.pending[k].contiguous(), server))
        pending = [self.ps.post(sends, [], "ps:header"), self.ps.post(pushes, [], "ps:push")]
        for transfer in pending:
            transfer.wait()
        if push:
            self.pending = None
        if not fetch:
            return False
        replies = [torch.empty(REPLY_FIELDS, dtype=torch.float64) for _ in servers]
        buffers = [torch.empty(numel, dtype=self.dtype) for numel in self.local_numel]
        parameters = list(zip(buffers, servers))
        if kind == STEP:  # the parameters always follow: both receives at once
            transfers = [self.ps.post([], list(zip(replies, servers)), "ps:header"),
                         self.ps.post([], parameters, "ps:pull")]
            for transfer in transfers:
                transfer.wait()
            newer = list(range(len(servers)))
        else:  # at a synchronization point, only from servers whose shard is newer than this worker's
            self.ps.exchange([], list(zip(replies, servers)), "ps:header")
            newer = [k for k, reply in enumerate(replies) if reply[1] > 0]
            self.ps.exchange([], [parameters[k] for k in newer], "ps:pull")
        for k in newer:
            write_flat(self.local[k], buffers[k])
        self.versions = [int(reply[0]) for reply in replies]
        return bool(newer)

    def send_to_members(self, changed: bool) -> None:
        """The leader's parameters to its members, after a flag saying whether they changed."""
        members = self.group[1:]
        if not members:
            return
        flag = torch.tensor([float(changed)])
        self.ps.exchange([(flag, m) for m in members], [], "ps:header")
        if changed:
            flat = torch.cat([flatten(tensors) for tensors in self.local])
            self.ps.exchange([(flat, m) for m in members], [], "ps:group_broadcast")

    def receive_from_leader(self) -> None:
        flag = torch.empty(1)
        self.ps.recv(flag, self.group[0], "ps:header")
        if flag.item():
            flat = torch.empty(sum(self.local_numel), dtype=self.dtype)
            self.ps.recv(flat, self.group[0], "ps:group_broadcast")
            write_flat([p for tensors in self.local for p in tensors], flat)

    # -- synchronization points --------------------------------------------------------------------------

    def settle(self, model: nn.Module, update: Update, global_step: int) -> None:
        """Every gradient pushed so far is applied; every worker leaves with the servers' parameters."""
        if self.settled_at == global_step:
            return
        self.settled_at = global_step
        self.since_push = self.since_fetch = 0
        if self.mesh.is_server:
            self.serve(update, global_step)
        elif self.is_leader:
            changed = self.contact(SETTLE, global_step, self.pending is not None, True)
            self.send_to_members(changed)
        else:
            self.receive_from_leader()

    # -- the server's side -------------------------------------------------------------------------------

    def serve(self, update: Update, target: int) -> None:
        """Serves the contributors (leaders) until each has settled at step `target`."""
        header = torch.empty(HEADER_FIELDS + len(self.optimizer.param_groups), dtype=torch.float64)
        settled: dict[int, int] = {}  # contributor -> version of the parameters it holds
        while len(settled) < len(self.contributors):
            source = self.ps.recv_any(header, "ps:header")
            fields = header.tolist()
            clock, version = int(fields[CLOCK]), int(fields[VERSION])
            if fields[HAS_GRADIENT]:
                gradient = torch.empty(sum(self.shard[k].numel() for k in self.pieces[source]), dtype=self.dtype)
                self.ps.recv(gradient, source, "ps:push")
                self.receive_gradient(gradient, source, clock, version, fields[HEADER_FIELDS:], update)
            if fields[KIND] == SETTLE:
                settled[source] = version
            elif fields[WANTS_PARAMETERS]:
                self.waiting.append((source, clock))
            self.answer_waiting()
        if self.args.bound is not None and (self.buckets or self.version != target):
            raise RuntimeError(f"ps server {self.mesh.rank}: at step {target} it applied {self.version} steps and "
                               f"holds {len(self.buckets)} incomplete ones (a worker pushed out of step)")
        for source, held in settled.items():
            self.reply(source, send_parameters=held != self.version)
        for transfer in self.outgoing.values():
            transfer.wait()
        self.outgoing.clear()

    def receive_gradient(self, gradient: torch.Tensor, source: int, clock: int, version: int, lrs: list[float],
                         update: Update) -> None:
        if self.args.bound is None:  # async: applied as it arrives
            self.apply({source: gradient}, lrs, update, [self.version - version])
            return
        if clock < self.version:  # backup workers: the step was applied without this gradient
            self.dropped += 1
            return
        bucket = self.buckets.setdefault(clock, {})
        bucket[source] = (gradient, version, lrs)
        # Steps complete in order: every contributor pushes its steps in order.
        needed = len(self.contributors) - self.args.backup
        while len(self.buckets.get(self.version, ())) >= needed:
            complete = self.buckets.pop(self.version)
            arrived = [w for w in self.contributors if w in complete]
            scale = len(self.contributors) / len(arrived)
            gradients = {w: complete[w][0] * scale if scale != 1 else complete[w][0] for w in arrived}
            self.apply(gradients, complete[arrived[0]][2], update, [self.version - complete[w][1] for w in arrived])

    def apply(self, gradients: dict[int, torch.Tensor], lrs: list[float], update: Update,
              staleness: list[int]) -> None:
        """One optimizer step of this shard with the sum of the contributors' `gradients` (each over its
        tensors of the shard; a tensor no one sent keeps no gradient, so the optimizer leaves it), at the
        workers' learning rates. With a robust aggregator (one server, every worker a contributor holding the
        whole model), their combination instead."""
        if self.combination is not None:
            rows = torch.stack([gradients[w] for w in self.contributors]) * len(self.contributors)
            gradients = {self.contributors[0]: self.combination.combine(rows, self.version)}
        for source, gradient in gradients.items():  # in contributor order: the sum of allreduce's groups
            tensors = [self.shard[k] for k in self.pieces[source]]
            for param, values in zip(tensors, gradient.split([p.numel() for p in tensors])):
                values = values.view_as(param)
                param.grad = values if param.grad is None else param.grad + values
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        update()
        for param in self.shard:
            param.grad = None
        self.version += 1
        self.epoch_staleness.update(staleness)

    def answer_waiting(self) -> None:
        """Parameters to every contributor whose step the staleness bound now allows."""
        bound = self.args.bound
        ready = [(source, clock) for source, clock in self.waiting
                 if bound is None or self.version >= clock + 1 - bound]
        for source, clock in ready:
            self.waiting.remove((source, clock))
            self.reply(source, send_parameters=True)

    def reply(self, source: int, send_parameters: bool) -> None:
        """Posts the reply (and a copy of the shard) without waiting: a send completes only once its
        receiver asks for it, and a worker asks every server in turn, so a server that waited would block
        the others' replies (a cycle with two servers). The contributor's previous reply is complete by now:
        it sent this request after taking it."""
        previous = self.outgoing.pop(source, None)
        if previous is not None:
            previous.wait()
        reply = torch.tensor([float(self.version), float(send_parameters)], dtype=torch.float64)
        shard = [self.shard[k] for k in self.pieces[source]]
        sends = [(reply, source)] + ([(flatten(shard), source)] if send_parameters else [])
        self.outgoing[source] = PostedSends([self.ps.post(sends[:1], [], "ps:header")] +
                                         [self.ps.post(sends[1:], [], "ps:pull")] * send_parameters, sends)

    # -- evaluation, metrics, checkpoints ----------------------------------------------------------------

    def evaluation_model(self, model: nn.Module):
        """The servers' parameters (every worker holds them after `settle`), with floating buffers (batch
        norm) averaged over the workers as bookkeeping, as allreduce does."""
        if not self.mesh.is_server and self.books is not None:
            average_into([b for b in model.buffers() if b.is_floating_point()], self.books)
        return super().evaluation_model(model)

    def epoch_metrics(self, model: nn.Module) -> dict:
        """The staleness of the epoch's applied gradients, gathered from the servers to rank 0."""
        gathered = gather_objects(self.mesh.bookkeeping, (dict(self.epoch_staleness), self.dropped, self.skipped))
        self.epoch_staleness = Counter()
        if gathered is None:
            return {}
        epoch = Counter()
        for histogram, _, _ in gathered:
            epoch.update(histogram)
        self.staleness.update(epoch)
        metrics = {"staleness_max": max(epoch, default=0), "staleness_mean": _mean(epoch)}
        if self.args.backup:  # the run's totals so far
            self.backup_counts = {"dropped_gradients": sum(d for _, d, _ in gathered),
                                  "skipped_steps": [k for _, _, k in gathered[:self.workers]]}
            metrics["dropped_gradients"] = self.backup_counts["dropped_gradients"]
        return metrics

    def report(self) -> dict:
        section = {"mode": self.args.mode, "servers": self.args.servers, "staleness_bound": self.args.bound,
                   "push_every": self.args.push_every, "fetch_every": self.args.fetch_every,
                   "groups": len(self.leaders), "shard_bytes": self.shard_bytes,
                   "staleness": {"histogram": {str(s): n for s, n in sorted(self.staleness.items())},
                                 "max": max(self.staleness, default=0), "mean": _mean(self.staleness),
                                 "applied": sum(self.staleness.values())}}
        if self.combination is not None:
            section["aggregator"] = self.combination.report()
        if self.args.backup:
            section["backup"] = {"workers": self.args.backup, **getattr(self, "backup_counts", {})}
        return section

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """A server's shard, optimizer state and version; a worker's versions (checkpoints follow `settle`,
        so nothing is in flight); rank 0's staleness histogram of the run."""
        state = {"staleness": {str(s): n for s, n in self.staleness.items()}}
        if self.mesh.is_server:
            aggregator = self.combination.aggregator.state_dict() if self.combination is not None else {}
            return {**state, "shard": [p.detach().clone() for p in self.shard], "optimizer": optimizer.state_dict(),
                    "version": self.version, "aggregator": aggregator}
        return {**state, "versions": list(self.versions)}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        role = "shard" if self.mesh.is_server else "versions"
        if role not in state:
            raise ValueError("the checkpoint holds no parameter-server state for this rank; it was trained with "
                             "another strategy or other servers")
        self.staleness = Counter({int(s): n for s, n in state["staleness"].items()})
        if self.mesh.is_server:
            write_flat(self.shard, flatten(state["shard"]))
            optimizer.load_state_dict(state["optimizer"])
            self.version = int(state["version"])
            if self.combination is not None:
                self.combination.aggregator.load_state_dict(state.get("aggregator", {}))
        else:
            self.versions = [int(v) for v in state["versions"]]


class PostedSends:
    """Posted sends and the tensors they read, kept alive until they complete."""

    def __init__(self, transfers: list, tensors: list) -> None:
        self.transfers, self.tensors = transfers, tensors

    def wait(self) -> None:
        for transfer in self.transfers:
            transfer.wait()


def _mean(histogram: Counter) -> float:
    count = sum(histogram.values())
    return sum(s * n for s, n in histogram.items()) / count if count else 0.0
