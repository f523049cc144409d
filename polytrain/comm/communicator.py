"""The one communicator every strategy talks through: torch.distributed, with every byte counted."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class CommError(RuntimeError):
    """A collective or point-to-point transfer failed or timed out (a peer died or hung)."""


# The label of traffic that keeps the run's books (metrics, evaluation counts, checkpoint gathers): it is
# counted like every other byte but never as the per-step traffic of the training algorithm.
BOOKKEEPING = "bookkeeping"


@dataclass
class _Counts:
    """Bytes and messages one rank sent and received under one (axis, operation) label."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


@dataclass
class CommStats:
    """What one rank sent and received, counted at the call (payload bytes, not protocol overhead).

    One CommStats is shared by all Communicators of a rank (one per mesh axis, plus bookkeeping); each
    call is counted under its communicator's axis and the operation. The totals and `by_operation`
    cover the training traffic (every axis but bookkeeping); `bookkeeping` and `by_axis` show the rest.
    """

    counts: dict[tuple[str, str], _Counts] = field(default_factory=dict)
    # True once a backend collective (e.g. gloo's own allreduce) was used: polytrain cannot see its
    # traffic and counts it from the backend's algorithm, so the totals are partly estimates.
    estimated: bool = False
    # A policy may receive on a thread of its own (adpsgd's passive ranks listen for requests).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, axis: str, operation: str, sent: int, received: int, messages_sent: int,
            messages_received: int) -> None:
        with self.lock:
            counts = self.counts.setdefault((axis, operation), _Counts())
            counts.bytes_sent += sent
            counts.bytes_received += received
            counts.messages_sent += messages_sent
            counts.messages_received += messages_received

    def clear(self) -> None:
        """Starts counting from zero, in place (every communicator sharing this object sees it)."""
        self.counts.clear()
        self.estimated = False

    def _total(self, name: str, bookkeeping: bool = False) -> int:
        return sum(getattr(c, name) for (axis, _), c in self.counts.items() if (axis == BOOKKEEPING) == bookkeeping)

    bytes_sent = property(lambda self: self._total("bytes_sent"), doc="Training bytes sent (all axes but bookkeeping).")
    bytes_received = property(lambda self: self._total("bytes_received"), doc="Training bytes received.")
    messages_sent = property(lambda self: self._total("messages_sent"), doc="Training messages sent.")
    messages_received = property(lambda self: self._total("messages_received"), doc="Training messages received.")

    @property
    def by_operation(self) -> dict[str, int]:
        """Training bytes sent per operation, summed over the axes."""
        sent: dict[str, int] = {}
        for (axis, operation), counts in self.counts.items():
            if axis != BOOKKEEPING:
                sent[operation] = sent.get(operation, 0) + counts.bytes_sent
        return sent

    def as_dict(self) -> dict:
        by_axis: dict[str, dict[str, int]] = {}
        for (axis, operation), counts in sorted(self.counts.items()):
            by_axis.setdefault(axis, {})[operation] = counts.bytes_sent
        names = ("bytes_sent", "bytes_received", "messages_sent", "messages_received")
        return {**{name: self._total(name) for name in names}, "estimated": self.estimated,
                "by_operation": self.by_operation, "by_axis": by_axis,
                "bookkeeping": {name: self._total(name, bookkeeping=True) for name in names}}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """Point-to-point and collective operations over a torch.distributed process group, counted per rank.

    Collective algorithms (polytrain.comm.algorithms) are written on `exchange`, `send` and `recv`, so
    the counts are exact. `native_all_reduce` calls the backend's own allreduce; its bytes are estimated
    from the ring algorithm gloo and NCCL use for large messages and reported as estimated.

    Args:
        group: the process group (default: the world).
        timeout_s: the longest any single operation may wait for a peer.
        axis: the label every transfer is counted under besides its operation (a mesh axis such as
            "dp", or BOOKKEEPING).
        stats: the counters to add to (shared by a rank's communicators; default: new ones).
        device: where scratch buffers live (the device of the tensors this communicator moves).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 axis: str = "dp", stats: CommStats | None = None, device: torch.device | str = "cpu") -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.axis = axis
        self.stats = stats if stats is not None else CommStats()
        self.device = torch.device(device)
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def sibling(self, axis: str, group: dist.ProcessGroup | None = None) -> "Communicator":
        """A communicator over `group` (None: this one's) counting into the same stats under `axis`."""
        return Communicator(group if group is not None else self.group, self.timeout.total_seconds(), axis,
                            self.stats, self.device)

    def reset_stats(self) -> None:
        """Starts counting from zero (a new run on the same ranks), for every communicator sharing the stats."""
        self.stats.clear()

    def _count(self, operation: str, sent: int, received: int, messages_sent: int, messages_received: int) -> None:
        self.stats.add(self.axis, operation, sent, received, messages_sent, messages_received)

    def _wait(self, works: list, what: str) -> None:
        for work in works:
            try:
                if not work.wait(self.timeout):
                    raise CommError(f"rank {self.rank}: {what} timed out after {self.timeout.total_seconds():.0f} s")
            except RuntimeError as error:
                if isinstance(error, CommError):
                    raise
                raise CommError(f"rank {self.rank}: {what} failed: {str(error).splitlines()[0]}") from None

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
             operation: str = "p2p", tag: int = 0) -> "Pending":
        """Starts sends and receives without waiting; `.wait()` on the result completes them.

        Algorithms post the receives of later rounds early, so data arriving from a peer that is ahead
        lands in its buffer at once instead of waiting for this rank to ask for it. Messages between
        two ranks are matched in the order they are posted.

        Args:
            sends: (tensor, destination rank) pairs; tensors must be contiguous and left untouched
                until the transfer has been waited for.
            recvs: (buffer, source rank) pairs, filled in place.
            operation: label under which the bytes are counted.
            tag: messages between two ranks are matched in order within each tag (a pipeline keeps
                activations and gradients apart).
        """
        # Receives are posted before sends: gloo otherwise serialises a pairwise exchange and halves the
        # throughput of a full-duplex link (measured on the emulated cluster, BENCHMARKS.md).
        ops = [dist.P2POp(dist.irecv, buffer, self._global(peer), self.group, tag) for buffer, peer in recvs]
        ops += [dist.P2POp(dist.isend, tensor, self._global(peer), self.group, tag) for tensor, peer in sends]
        if not ops:
            return Pending(self, [], operation)
        self._count(operation, sum(_nbytes(t) for t, _ in sends), sum(_nbytes(b) for b, _ in recvs),
                    len(sends), len(recvs))
        return Pending(self, dist.batch_isend_irecv(ops),
                       f"{operation} with ranks {sorted({p for _, p in sends + recvs})}")

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 operation: str = "p2p") -> None:
        """Posts all sends and receives at once and waits for them (deadlock-free pairwise exchange)."""
        self.post(sends, recvs, operation).wait()

    def scratch(self, site: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of `numel` elements kept for reuse by the call site `site` (e.g. "ring:3").

        Allocating multi-megabyte receive buffers on every call costs page faults that show in the
        bandwidth of large messages; a site's buffer is valid until the site asks for it again.
        """
        key = (site, dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel]

    def send(self, tensor: torch.Tensor, dst: int, operation: str = "p2p") -> None:
        """Sends `tensor` to rank `dst` and waits until it has been handed over."""
        self.exchange([(tensor, dst)], [], operation)

    def recv(self, buffer: torch.Tensor, src: int, operation: str = "p2p") -> None:
        """Receives from rank `src` into `buffer`."""
        self.exchange([], [(buffer, src)], operation)

    def recv_any(self, buffer: torch.Tensor, operation: str = "p2p") -> int:
        """Receives into `buffer` the next message sent to this rank by any rank; returns the sender.

        Every message to this rank on this communicator's group must then have `buffer`'s size (a
        parameter server takes fixed-size headers from whichever worker is first, polytrain.strategies.ps).
        """
        self._count(operation, 0, _nbytes(buffer), 0, 1)
        work = dist.irecv(buffer, None, self.group)
        self._wait([work], f"{operation} from any rank")
        return work._source_rank()

    def native_all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """The backend's own sum-allreduce; bytes are estimated as ring allreduce, 2(p-1)/p * n per rank."""
        p = self.world_size
        estimate = 2 * (p - 1) * _nbytes(tensor) // p  # Patarasuk & Yuan 2009: ring reduce-scatter + allgather
        self._count("native_all_reduce", estimate, estimate, 2 * (p - 1), 2 * (p - 1))
        self.stats.estimated = True
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        if async_op:
            return work
        self._wait([work], "native allreduce")
        return None

    def barrier(self) -> None:
        """Waits for every rank (a zero-byte native collective, not counted)."""
        self._wait([dist.barrier(group=self.group, async_op=True)], "barrier")


class Pending:
    """Transfers started by Communicator.post; `wait` completes them within the communicator's timeout."""

    def __init__(self, comm: Communicator, works: list, what: str) -> None:
        self.comm, self.works, self.what = comm, works, what

    def wait(self) -> None:
        self.comm._wait(self.works, self.what)
        self.works = []
