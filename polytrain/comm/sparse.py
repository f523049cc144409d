"""Sparse allreduce (SparCML) on the Communicator's point-to-point transfers, with an exact volume model.

`sparse_all_reduce(comm, indices, values, numel, algorithm)` sums sparse vectors, one per rank, given as
the compressors' sparse payload (indices sorted ascending and unique, values beside them), and returns the
dense sum of length `numel` on every rank, bitwise the same everywhere. The algorithms are those of
Renggli, Ashkboos, Aghagolzadeh, Alistarh & Hoefler, "SparCML: High-Performance Sparse Communication for
Machine Learning" (SC19), registered in SPARSE_ALLREDUCE_ALGORITHMS:

- `ssar_recursive_doubling` (SSAR_Recursive_double): lg p rounds in which partners swap their current
  sparse vectors and merge them (union of indices, sum of values). Non-powers of two are folded as in
  polytrain.comm.algorithms: each odd rank below 2r sends its vector to rank - 1 first and receives the
  result from it at the end (r = p - p', p' = 2^floor(lg p)).
- `ssar_split_allgather` (SSAR_Split_allgather): the index space is split into p ranges (torch.tensor_split
  semantics); every rank sends each other rank the entries that fall in that rank's range, all at once
  (a sparse reduce-scatter), each rank sums its range in rank order, and the reduced ranges are gathered
  by recursive doubling: in each round partners swap everything they hold as one message (fold as above).
- `dsar_split_allgather` (DSAR_Split_allgather): the same reduce-scatter; then each reduced range goes
  dense when that is smaller and the ranges are allgathered as separate blocks around a ring
  (polytrain.comm.gather), so each range keeps its own representation and no rank is folded.

Wire format. Every message covers a span of the index space that both sides know (the whole vector, one
range, or a run of ranges) and is sent as a header followed by a payload:

- header: ONE element, int32 (4 bytes) for vectors of up to 2^31 elements, int64 (8 bytes) beyond. It
  holds -1 when the span follows dense, else the number k >= 0 of (index, value) entries that follow.
- payload: dense, the span's values in the value dtype (span * value_bytes bytes); sparse, one uint8
  buffer of k * (index_bytes + value_bytes) bytes holding the k indices in the caller's index dtype and the
  k values, whichever has the wider element first (so both halves can be viewed in place). Indices are
  global positions, sorted ascending; the caller's index dtype holds every index below `numel`, so unions
  still fit. A sparse message with k = 0 has no payload; a span of length 0 is never sent at all.

The header goes first because the receiver cannot post a buffer before it knows the size: every transfer
is one header exchange and one payload exchange, all counted by the Communicator under the operation
"sparse_allreduce:<name>". SparCML's density switch decides the representation of every message: dense
iff k * (index_bytes + value_bytes) >= span * value_bytes (the sparse form would not be smaller). A span
once sent dense counts as fully present afterwards, on both sides, which keeps the byte count a function
of the index sets alone: `sparse_all_reduce_volume` replays each algorithm on all ranks' index sets and
gives the bytes and messages each rank sends (it is both the test oracle and the exact volume model).

Merging converts indices to int64 locally (torch.unique of the concatenation; a dense scratch once the
result is dense). Sums accumulate in the value dtype. Each element is added either by partners that add
the same two operands in the same order (recursive doubling puts the lower rank's vector first) or once
by the owner of its range in rank order, and copies are exact, so every rank holds bitwise the same sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, Protocol, Sequence

import torch

from polytrain.comm.algorithms import (fold_remainder, folded_index, piece_sizes, power_of_two_below,
                                       unfolded_rank)
from polytrain.comm.communicator import Communicator
from polytrain.comm.gather import ring_all_gather_into
from polytrain.registry import Registry

DENSE = -1  # header value announcing that the span follows dense
LARGEST_INT32_SPAN = 1 << 31  # a sparse message has k < span entries, so int32 holds every header up to here


class SparseAllReduceAlgorithm(Protocol):
    """A sparse sum-allreduce with its message volume and alpha-beta cost bounds (all static methods)."""

    name: str

    @staticmethod
    def all_reduce(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor: ...

    @staticmethod
    def volume(masks: list[torch.Tensor], wire: WireFormat) -> list[tuple[int, int]]: ...

    @staticmethod
    def cost_s(k: float, n: int, world_size: int, alpha_s: float, beta_s_per_byte: float, index_bytes: int = 4,
               value_bytes: int = 4, overlap: str = "disjoint") -> float: ...


SPARSE_ALLREDUCE_ALGORITHMS: Registry = Registry("sparse allreduce algorithm")


def _registered(algorithm: type) -> type:
    return SPARSE_ALLREDUCE_ALGORITHMS.register(algorithm.name)(algorithm)


def sparse_all_reduce(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int,
                      algorithm: str = "ssar_recursive_doubling") -> torch.Tensor:
    """The dense sum over all ranks of the sparse vectors (indices, values) of length `numel`.

    Args:
        comm: the communicator of the ranks taking part; all must pass the same numel, algorithm, index
            dtype and value dtype.
        indices: (k,) positions, sorted ascending, unique, below numel, in an integer dtype that holds
            numel - 1 (polytrain.compress.base.index_dtype gives the smallest); k may differ between ranks.
        values: (k,) floating values at those positions.
        numel: length of the dense vector.
        algorithm: a name in SPARSE_ALLREDUCE_ALGORITHMS.

    Returns:
        (numel,) dense sum in the values' dtype, bitwise the same on every rank.
    """
    return SPARSE_ALLREDUCE_ALGORITHMS.get(algorithm).all_reduce(comm, indices, values, numel)


@dataclass(frozen=True)
class WireFormat:
    """The element sizes that fix every message's size for one sparse allreduce of `numel` elements."""

    numel: int
    index_bytes: int
    value_bytes: int

    @property
    def header_bytes(self) -> int:
        return 4 if self.numel <= LARGEST_INT32_SPAN else 8

    @property
    def entry_bytes(self) -> int:
        return self.index_bytes + self.value_bytes

    def is_dense(self, entries: float, span: float) -> bool:
        """SparCML's representation switch: dense once the sparse form is no smaller than the dense one."""
        return entries * self.entry_bytes >= span * self.value_bytes

    def message(self, entries: float, span: float) -> tuple[float, int]:
        """(bytes, messages) of sending `entries` of a span of `span` elements: header, then payload."""
        if span == 0:
            return 0, 0
        if self.is_dense(entries, span):
            return self.header_bytes + span * self.value_bytes, 2
        return self.header_bytes + entries * self.entry_bytes, 1 + (entries > 0)


class _Sparse(NamedTuple):
    """A sparse vector: int64 global positions (sorted, unique) and the values there."""

    indices: torch.Tensor
    values: torch.Tensor


class _Channel:
    """Encodes, sends and decodes the messages of one sparse allreduce (see the module docstring)."""

    def __init__(self, comm: Communicator, operation: str, numel: int, index_dtype: torch.dtype,
                 value_dtype: torch.dtype) -> None:
        self.comm, self.operation, self.numel = comm, operation, numel
        self.index_dtype, self.value_dtype = index_dtype, value_dtype
        self.wire = WireFormat(numel, _element_size(index_dtype), _element_size(value_dtype))
        self.header_dtype = torch.int32 if self.wire.header_bytes == 4 else torch.int64

    def pack(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One uint8 buffer of the indices (in the wire index dtype) and the values, wider first."""
        parts = [indices.to(self.index_dtype).view(torch.uint8), values.contiguous().view(torch.uint8)]
        return torch.cat(parts if self.wire.index_bytes >= self.wire.value_bytes else parts[::-1])

    def unpack(self, buffer: torch.Tensor, entries: int) -> _Sparse:
        split = entries * max(self.wire.index_bytes, self.wire.value_bytes)
        first, second = buffer[:split], buffer[split:]
        if self.wire.index_bytes < self.wire.value_bytes:
            first, second = second, first
        return _Sparse(first.view(self.index_dtype).long(), second.view(self.value_dtype))

    def buffer(self, header: int, span: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """Where a message with this header lands: `target` (a view of the result) or a new buffer."""
        if header == DENSE:
            return target if target is not None else torch.empty(span, dtype=self.value_dtype)
        return torch.empty(header * self.wire.entry_bytes, dtype=torch.uint8)

    def exchange_headers(self, outgoing: list[tuple[int, int]], sources: list[int]) -> list[int]:
        """Sends (header, destination) pairs and returns the headers received from `sources`, in order."""
        received = [torch.empty(1, dtype=self.header_dtype) for _ in sources]
        self.comm.exchange([(torch.tensor([header], dtype=self.header_dtype), peer) for header, peer in outgoing],
                           list(zip(received, sources)), self.operation)
        return [int(header) for header in received]

    def transfer(self, outgoing: list[tuple[int, torch.Tensor, int]],
                 incoming: list[tuple[int, int, torch.Tensor | None]]) -> list[tuple[int, torch.Tensor]]:
        """Sends (header, payload, destination) messages while receiving from (span, source, target) ones.

        Returns each incoming message as (header, payload), a dense payload landing in `target` if given.
        """
        headers = self.exchange_headers([(header, peer) for header, _, peer in outgoing],
                                        [peer for _, peer, _ in incoming])
        buffers = [self.buffer(header, span, target) for header, (span, _, target) in zip(headers, incoming)]
        self.comm.exchange([(payload, peer) for _, payload, peer in outgoing if payload.numel()],
                           [(buffer, peer) for buffer, (_, peer, _) in zip(buffers, incoming) if buffer.numel()],
                           self.operation)
        return list(zip(headers, buffers))

    # Whole-vector blocks (recursive doubling): a dense tensor of numel values or a _Sparse.

    def encode(self, block: torch.Tensor | _Sparse) -> tuple[int, torch.Tensor, torch.Tensor | _Sparse]:
        """(header, payload, block as it is kept): a block sent dense is kept dense."""
        if isinstance(block, _Sparse):
            if not self.wire.is_dense(block.indices.numel(), self.numel):
                return block.indices.numel(), self.pack(*block), block
            block = _densify(block, self.numel)
        return DENSE, block, block

    def decode(self, header: int, payload: torch.Tensor) -> torch.Tensor | _Sparse:
        return payload if header == DENSE else self.unpack(payload, header)

    def swap(self, block: torch.Tensor | _Sparse, destination: int | None,
             source: int | None) -> tuple[torch.Tensor | _Sparse, torch.Tensor | _Sparse | None]:
        """Sends `block` to `destination` while receiving one from `source` (either may be None)."""
        outgoing = []
        if destination is not None:
            header, payload, block = self.encode(block)
            outgoing = [(header, payload, destination)]
        incoming = [] if source is None else [(self.numel, source, None)]
        received = self.transfer(outgoing, incoming)
        return block, (self.decode(*received[0]) if received else None)

    def merge(self, lower: torch.Tensor | _Sparse, upper: torch.Tensor | _Sparse) -> torch.Tensor | _Sparse:
        """lower + upper (lower first in every addition, so partners compute the same bits)."""
        if not isinstance(lower, _Sparse) and not isinstance(upper, _Sparse):
            return lower + upper
        if not isinstance(lower, _Sparse):
            total = lower.clone()
            total[upper.indices] = lower[upper.indices] + upper.values
            return total
        if not isinstance(upper, _Sparse):
            total = upper.clone()
            total[lower.indices] = lower.values + upper[lower.indices]
            return total
        union, position = torch.unique(torch.cat([lower.indices, upper.indices]), sorted=True, return_inverse=True)
        values = torch.zeros(union.numel(), dtype=self.value_dtype)
        values[position[:lower.indices.numel()]] = lower.values
        values[position[lower.indices.numel():]] += upper.values
        merged = _Sparse(union, values)
        return _densify(merged, self.numel) if self.wire.is_dense(union.numel(), self.numel) else merged

    # Spans of a dense result `out` with a mask `present` of the entries that have been sent or summed.

    def encode_span(self, out: torch.Tensor, present: torch.Tensor, start: int, stop: int) -> tuple[int, torch.Tensor]:
        """(header, payload) of out[start:stop]; a span sent dense becomes fully present."""
        mask = present[start:stop]
        entries = int(mask.count_nonzero())
        if self.wire.is_dense(entries, stop - start):
            mask.fill_(True)
            return DENSE, out[start:stop]
        positions = mask.nonzero().squeeze(1) + start
        return entries, self.pack(positions, out[positions])

    def apply_span(self, out: torch.Tensor, present: torch.Tensor, start: int, stop: int, header: int,
                   payload: torch.Tensor) -> None:
        """Writes a received span into out (a dense one has already landed there) and marks it present."""
        if header == DENSE:
            present[start:stop] = True
            return
        received = self.unpack(payload, header)
        out[received.indices] = received.values
        present[received.indices] = True

    def send_span(self, out: torch.Tensor, present: torch.Tensor, send: tuple[int, int, int] | None,
                  receive: tuple[int, int, int] | None) -> None:
        """Sends out[start:stop] to a peer and/or receives a span from one; (start, stop, peer) each."""
        outgoing = []
        if send is not None and send[1] > send[0]:
            header, payload = self.encode_span(out, present, send[0], send[1])
            outgoing = [(header, payload, send[2])]
        if receive is None or receive[1] == receive[0]:
            self.transfer(outgoing, [])
            return
        start, stop, source = receive
        [(header, payload)] = self.transfer(outgoing, [(stop - start, source, out[start:stop])])
        self.apply_span(out, present, start, stop, header, payload)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _densify(block: _Sparse, numel: int) -> torch.Tensor:
    dense = torch.zeros(numel, dtype=block.values.dtype)
    dense[block.indices] = block.values
    return dense


def _checked(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int,
             name: str) -> tuple[_Channel, torch.Tensor, torch.Tensor]:
    """Validates the caller's sparse vector; returns its channel, int64 indices and contiguous values."""
    if numel < 0:
        raise ValueError(f"sparse allreduce needs numel >= 0; got {numel}")
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise ValueError(f"sparse allreduce needs 1-D indices and values of one length; got shapes "
                         f"{tuple(indices.shape)} and {tuple(values.shape)}")
    if indices.dtype == torch.bool or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise ValueError(f"sparse allreduce needs integer indices; got {indices.dtype}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"sparse allreduce needs floating-point values; got {values.dtype}")
    if numel - 1 > torch.iinfo(indices.dtype).max:
        raise ValueError(f"index dtype {indices.dtype} cannot hold index {numel - 1} of a vector of {numel} "
                         f"elements; use polytrain.compress.base.index_dtype({numel})")
    positions = indices.long()
    if positions.numel() and (positions[0] < 0 or positions[-1] >= numel
                              or not bool((positions[1:] > positions[:-1]).all())):
        raise ValueError(f"sparse allreduce needs indices sorted ascending, unique and in [0, {numel})")
    channel = _Channel(comm, f"sparse_allreduce:{name}", numel, indices.dtype, values.dtype)
    return channel, positions, values.detach().contiguous()


def _range_offsets(numel: int, world_size: int) -> list[int]:
    """Start of each rank's range and the end: torch.tensor_split(vector, p) boundaries."""
    return [0, *accumulate(piece_sizes(numel, world_size))]


def _participant_span(offsets: list[int], first: int, count: int, world_size: int) -> tuple[int, int]:
    """Elements held by participants first..first+count-1 after the fold: a run of whole ranges.

    Participant j holds range unfolded_rank(j) (and the folded one after it, for j < r), and
    unfolded_rank(p') = p, so participants' ranges are contiguous and in order.
    """
    return offsets[unfolded_rank(first, world_size)], offsets[unfolded_rank(first + count, world_size)]


# ---------------------------------------------------------------------------------------------------------
# The algorithms


@_registered
class SsarRecursiveDoubling:
    """SSAR_Recursive_double: lg p rounds of swapping and merging whole sparse vectors (fold otherwise)."""

    name = "ssar_recursive_doubling"

    @staticmethod
    def all_reduce(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        channel, positions, values = _checked(comm, indices, values, numel, SsarRecursiveDoubling.name)
        block: torch.Tensor | _Sparse = _Sparse(positions, values)
        p, rank = comm.world_size, comm.rank
        if p == 1 or numel == 0:
            return _densify(block, numel)
        index = folded_index(p, rank)
        folded = rank < 2 * fold_remainder(p)
        if folded:
            block, received = channel.swap(block, rank - 1 if index is None else None,
                                           None if index is None else rank + 1)
            if received is not None:
                block = channel.merge(block, received)
        if index is not None:
            distance = 1
            while distance < power_of_two_below(p):
                partner_index = index ^ distance
                partner = unfolded_rank(partner_index, p)
                block, received = channel.swap(block, partner, partner)
                block = channel.merge(block, received) if index < partner_index else channel.merge(received, block)
                distance <<= 1
        if folded:
            block, received = channel.swap(block, rank + 1 if rank % 2 == 0 else None,
                                           rank - 1 if rank % 2 else None)
            block = block if received is None else received
        return block if not isinstance(block, _Sparse) else _densify(block, numel)

    @staticmethod
    def volume(masks: list[torch.Tensor], wire: WireFormat) -> list[tuple[int, int]]:
        p, n = len(masks), wire.numel
        tally = _Tally(wire, p)
        if p == 1 or n == 0:
            return tally.totals()
        masks = [mask.clone() for mask in masks]
        remainder, participants = fold_remainder(p), power_of_two_below(p)
        for rank in range(1, 2 * remainder, 2):
            masks[rank - 1] |= tally.send_span(rank, masks[rank], 0, n)
        distance = 1
        while distance < participants:
            sent = {index: tally.send_span(unfolded_rank(index, p), masks[unfolded_rank(index, p)], 0, n)
                    for index in range(participants)}
            for index in range(participants):
                masks[unfolded_rank(index, p)] |= sent[index ^ distance]
            distance <<= 1
        for rank in range(0, 2 * remainder, 2):
            masks[rank + 1] = tally.send_span(rank, masks[rank], 0, n)
        return tally.totals()

    @staticmethod
    def cost_s(k: float, n: int, world_size: int, alpha_s: float, beta_s_per_byte: float, index_bytes: int = 4,
               value_bytes: int = 4, overlap: str = "disjoint") -> float:
        """SparCML's bounds for k entries per rank, with this module's headers and switch added.

        SparCML's analysis: lg p a + (p-1) k (c_i + c_v) b when the ranks' indices are disjoint (the
        message doubles each round), lg p (a + k (c_i + c_v) b) when they are identical. Here every
        transfer is a header message and a payload message, each payload is capped at the dense span by
        the switch, and a non-power of two adds the fold (one rank's vector in) and the unfold (the result
        out). With alpha_s = 0 and beta_s_per_byte = 1 this is the bytes one rank sends.
        """
        wire, p = WireFormat(n, index_bytes, value_bytes), world_size
        participants = power_of_two_below(p)
        grows = _overlap_grows(overlap)
        start = k * (2 if grows and participants < p else 1)
        rounds = [wire.message(min(start * (1 << t) if grows else k, n), n)
                  for t in range(participants.bit_length() - 1)]
        if participants < p:
            rounds += [wire.message(k, n), wire.message(min(p * k, n) if grows else k, n)]
        return _time_s(rounds, alpha_s, beta_s_per_byte)


def _reduce_scatter(channel: _Channel, positions: torch.Tensor, values: torch.Tensor,
                    offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse reduce-scatter: returns (out, present) with this rank's range summed in rank order.

    Every rank sends each other rank the entries in that rank's range, all messages posted at once.
    """
    comm = channel.comm
    p, rank = comm.world_size, comm.rank
    cuts = torch.searchsorted(positions, torch.tensor(offsets)).tolist()
    pieces = [_Sparse(positions[cuts[j]:cuts[j + 1]], values[cuts[j]:cuts[j + 1]]) for j in range(p)]
    outgoing = []
    for owner in range(p):
        start, stop = offsets[owner], offsets[owner + 1]
        if owner != rank and stop > start:
            piece = pieces[owner]
            if channel.wire.is_dense(piece.indices.numel(), stop - start):
                outgoing.append((DENSE, _densify(_Sparse(piece.indices - start, piece.values), stop - start), owner))
            else:
                outgoing.append((piece.indices.numel(), channel.pack(*piece), owner))
    start, stop = offsets[rank], offsets[rank + 1]
    sources = [source for source in range(p) if source != rank] if stop > start else []
    received = dict(zip(sources, channel.transfer(outgoing, [(stop - start, source, None) for source in sources])))
    out = torch.zeros(channel.numel, dtype=channel.value_dtype)
    present = torch.zeros(channel.numel, dtype=torch.bool)
    mine, mine_present = out[start:stop], present[start:stop]
    for source in range(p):  # rank order, so the sum does not depend on arrival order
        if source == rank:
            header, piece = pieces[rank].indices.numel(), pieces[rank]
        else:
            if source not in received:
                continue
            header, payload = received[source]
            piece = payload if header == DENSE else channel.unpack(payload, header)
        if header == DENSE:
            mine.add_(piece)
            mine_present.fill_(True)
        else:
            local = piece.indices - start
            mine[local] += piece.values
            mine_present[local] = True
    return out, present


def _reduce_scatter_volume(masks: list[torch.Tensor], wire: WireFormat, tally: _Tally,
                           offsets: list[int]) -> list[torch.Tensor]:
    """What each rank sends in the reduce-scatter; returns each range's present mask after it."""
    p = len(masks)
    reduced = [torch.zeros(offsets[j + 1] - offsets[j], dtype=torch.bool) for j in range(p)]
    for source, mask in enumerate(masks):
        for owner in range(p):
            piece = mask[offsets[owner]:offsets[owner + 1]]
            reduced[owner] |= piece if owner == source else tally.send_span(source, piece.clone(), 0, piece.numel())
    return reduced


@_registered
class SsarSplitAllgather:
    """SSAR_Split_allgather: sparse reduce-scatter over p ranges, then a recursive-doubling sparse allgather."""

    name = "ssar_split_allgather"

    @staticmethod
    def all_reduce(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        channel, positions, values = _checked(comm, indices, values, numel, SsarSplitAllgather.name)
        p, rank = comm.world_size, comm.rank
        if p == 1 or numel == 0:
            return _densify(_Sparse(positions, values), numel)
        offsets = _range_offsets(numel, p)
        out, present = _reduce_scatter(channel, positions, values, offsets)
        index = folded_index(p, rank)
        folded = rank < 2 * fold_remainder(p)
        if folded and index is None:  # the odd rank hands its reduced range to rank - 1
            channel.send_span(out, present, (offsets[rank], offsets[rank + 1], rank - 1), None)
        elif folded:
            channel.send_span(out, present, None, (offsets[rank + 1], offsets[rank + 2], rank + 1))
        if index is not None:
            distance = 1
            while distance < power_of_two_below(p):
                partner = unfolded_rank(index ^ distance, p)
                mine = _participant_span(offsets, index & ~(distance - 1), distance, p)
                theirs = _participant_span(offsets, (index ^ distance) & ~(distance - 1), distance, p)
                channel.send_span(out, present, (*mine, partner), (*theirs, partner))
                distance <<= 1
        if folded:  # the result goes back to the odd rank
            channel.send_span(out, present, (0, numel, rank + 1) if rank % 2 == 0 else None,
                              (0, numel, rank - 1) if rank % 2 else None)
        return out

    @staticmethod
    def volume(masks: list[torch.Tensor], wire: WireFormat) -> list[tuple[int, int]]:
        p, n = len(masks), wire.numel
        tally = _Tally(wire, p)
        if p == 1 or n == 0:
            return tally.totals()
        offsets = _range_offsets(n, p)
        reduced = _reduce_scatter_volume(masks, wire, tally, offsets)
        held = [torch.zeros(n, dtype=torch.bool) for _ in range(p)]
        for rank in range(p):
            held[rank][offsets[rank]:offsets[rank + 1]] = reduced[rank]
        remainder, participants = fold_remainder(p), power_of_two_below(p)
        for rank in range(1, 2 * remainder, 2):
            start, stop = offsets[rank], offsets[rank + 1]
            held[rank - 1][start:stop] |= tally.send_span(rank, held[rank], start, stop)
        distance = 1
        while distance < participants:
            spans = {index: _participant_span(offsets, index & ~(distance - 1), distance, p)
                     for index in range(participants)}
            sent = {index: tally.send_span(unfolded_rank(index, p), held[unfolded_rank(index, p)], *spans[index])
                    for index in range(participants)}
            for index in range(participants):
                start, stop = spans[index ^ distance]
                held[unfolded_rank(index, p)][start:stop] |= sent[index ^ distance]
            distance <<= 1
        for rank in range(0, 2 * remainder, 2):
            held[rank + 1] = tally.send_span(rank, held[rank], 0, n)
        return tally.totals()

    @staticmethod
    def cost_s(k: float, n: int, world_size: int, alpha_s: float, beta_s_per_byte: float, index_bytes: int = 4,
               value_bytes: int = 4, overlap: str = "disjoint") -> float:
        """SparCML's bounds for k entries per rank spread evenly over the p ranges, with headers and switch.

        Following SparCML's analysis: (p-1) messages of k/p entries in the split phase, then an allgather
        of the reduced ranges of K entries each (K = k when the ranks' indices are disjoint, k/p when
        identical): (p - 1 + lg p) a + ((p-1)/p k + (p-1) K)(c_i + c_v) b. Here with a header message per
        transfer, the switch capping each payload at its dense span, and the fold for a non-power of two.
        """
        wire, p = WireFormat(n, index_bytes, value_bytes), world_size
        span, piece, reduced = _split_sizes(k, n, p, wire, overlap)
        participants = power_of_two_below(p)
        steps = [wire.message(piece, span)] * (p - 1)
        steps += [wire.message(reduced * (1 << t), span * (1 << t)) for t in range(participants.bit_length() - 1)]
        if participants < p:
            steps += [wire.message(reduced, span), wire.message(min(p * reduced, n), n)]
        return _time_s(steps, alpha_s, beta_s_per_byte)


@_registered
class DsarSplitAllgather:
    """DSAR_Split_allgather: sparse reduce-scatter, each range dense when that is smaller, ring allgather."""

    name = "dsar_split_allgather"

    @staticmethod
    def all_reduce(comm: Communicator, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        channel, positions, values = _checked(comm, indices, values, numel, DsarSplitAllgather.name)
        p, rank = comm.world_size, comm.rank
        if p == 1 or numel == 0:
            return _densify(_Sparse(positions, values), numel)
        offsets = _range_offsets(numel, p)
        out, present = _reduce_scatter(channel, positions, values, offsets)
        start, stop = offsets[rank], offsets[rank + 1]
        own = channel.encode_span(out, present, start, stop) if stop > start else None
        # Every rank learns every range's header first, then the payloads go around the ring.
        owners = [owner for owner in range(p) if owner != rank and offsets[owner + 1] > offsets[owner]]
        outgoing = [(own[0], peer) for peer in range(p) if peer != rank] if own is not None else []
        headers = dict(zip(owners, channel.exchange_headers(outgoing, owners)))
        blocks = [torch.empty(0, dtype=torch.uint8) for _ in range(p)]
        for owner, header in headers.items():
            blocks[owner] = channel.buffer(header, offsets[owner + 1] - offsets[owner],
                                           out[offsets[owner]:offsets[owner + 1]])
        if own is not None:
            blocks[rank] = own[1]
        ring_all_gather_into(comm, blocks, channel.operation)
        for owner, header in headers.items():
            channel.apply_span(out, present, offsets[owner], offsets[owner + 1], header, blocks[owner])
        return out

    @staticmethod
    def volume(masks: list[torch.Tensor], wire: WireFormat) -> list[tuple[int, int]]:
        p, n = len(masks), wire.numel
        tally = _Tally(wire, p)
        if p == 1 or n == 0:
            return tally.totals()
        offsets = _range_offsets(n, p)
        reduced = _reduce_scatter_volume(masks, wire, tally, offsets)
        payloads = []
        for owner, mask in enumerate(reduced):
            span, entries = mask.numel(), int(mask.count_nonzero())
            payloads.append(span * wire.value_bytes if wire.is_dense(entries, span) else entries * wire.entry_bytes)
            if span:  # the range's header goes to every other rank
                tally.add(owner, wire.header_bytes * (p - 1), p - 1)
        for rank in range(p):  # the ring forwards every block but that of rank + 1
            forwarded = [size for owner, size in enumerate(payloads) if owner != (rank + 1) % p]
            tally.add(rank, sum(forwarded), sum(size > 0 for size in forwarded))
        return tally.totals()

    @staticmethod
    def cost_s(k: float, n: int, world_size: int, alpha_s: float, beta_s_per_byte: float, index_bytes: int = 4,
               value_bytes: int = 4, overlap: str = "disjoint") -> float:
        """SparCML's split phase, then a ring allgather of the p reduced ranges (Thakur et al. 2005).

        The split phase is as in SSAR_Split_allgather; each range then travels once around the ring in
        whichever form is smaller, (p-1) (a + min(K (c_i + c_v), n/p c_v) b), after its header has gone to
        the p - 1 other ranks. Once the ranges are dense this is the dense allgather's (p-1)/p n c_v b.
        """
        wire, p = WireFormat(n, index_bytes, value_bytes), world_size
        span, piece, reduced = _split_sizes(k, n, p, wire, overlap)
        block = span * wire.value_bytes if wire.is_dense(reduced, span) else reduced * wire.entry_bytes
        steps = [wire.message(piece, span)] * (p - 1)
        steps += [(wire.header_bytes, 1)] * (p - 1) + [(block, int(block > 0))] * (p - 1)
        return _time_s(steps, alpha_s, beta_s_per_byte)


# ---------------------------------------------------------------------------------------------------------
# Volume and cost


class _Tally:
    """Bytes and messages each rank sends, for the volume replays."""

    def __init__(self, wire: WireFormat, world_size: int) -> None:
        self.wire = wire
        self.counts = [[0, 0] for _ in range(world_size)]

    def add(self, rank: int, n_bytes: int, messages: int) -> None:
        self.counts[rank][0] += n_bytes
        self.counts[rank][1] += messages

    def send_span(self, rank: int, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Counts sending mask[start:stop] from `rank`; returns what arrives (all of it if sent dense)."""
        span, entries = mask[start:stop], int(mask[start:stop].count_nonzero())
        n_bytes, messages = self.wire.message(entries, stop - start)
        self.add(rank, int(n_bytes), messages)
        if stop > start and self.wire.is_dense(entries, stop - start):
            span.fill_(True)
        return span.clone()

    def totals(self) -> list[tuple[int, int]]:
        return [(n_bytes, messages) for n_bytes, messages in self.counts]


def sparse_all_reduce_volume(indices: Sequence[torch.Tensor], numel: int,
                             algorithm: str = "ssar_recursive_doubling",
                             value_dtype: torch.dtype = torch.float32) -> list[tuple[int, int]]:
    """(bytes_sent, messages_sent) the Communicator counts on each rank for one `sparse_all_reduce`.

    The volume depends on the data, so it is replayed from every rank's index set with the algorithm's
    own message pattern and density switch (see the module docstring); it is exact, headers included.

    Args:
        indices: each rank's indices, in rank order, all in the same integer dtype (the one on the wire).
        numel: length of the dense vector.
        algorithm: a name in SPARSE_ALLREDUCE_ALGORITHMS.
        value_dtype: dtype of the values.
    """
    if not indices:
        raise ValueError("sparse allreduce volume needs one index tensor per rank; got none")
    if len({index.dtype for index in indices}) > 1:
        raise ValueError(f"every rank must send indices of one dtype; got {sorted({str(i.dtype) for i in indices})}")
    masks = []
    for positions in indices:
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[positions.long()] = True
        masks.append(mask)
    index_bytes = indices[0].element_size()
    wire = WireFormat(numel, index_bytes, _element_size(value_dtype))
    return SPARSE_ALLREDUCE_ALGORITHMS.get(algorithm).volume(masks, wire)


def sparse_all_reduce_bytes_sent(indices: Sequence[torch.Tensor], numel: int,
                                 algorithm: str = "ssar_recursive_doubling",
                                 value_dtype: torch.dtype = torch.float32) -> list[int]:
    """Bytes each rank sends in one `sparse_all_reduce` (see sparse_all_reduce_volume)."""
    return [n_bytes for n_bytes, _ in sparse_all_reduce_volume(indices, numel, algorithm, value_dtype)]


def sparse_all_reduce_messages_sent(indices: Sequence[torch.Tensor], numel: int,
                                    algorithm: str = "ssar_recursive_doubling",
                                    value_dtype: torch.dtype = torch.float32) -> list[int]:
    """Messages each rank sends in one `sparse_all_reduce` (see sparse_all_reduce_volume)."""
    return [messages for _, messages in sparse_all_reduce_volume(indices, numel, algorithm, value_dtype)]


def _overlap_grows(overlap: str) -> bool:
    """Whether unions grow with each merge: disjoint indices (SparCML's upper bound) or identical ones."""
    if overlap not in ("disjoint", "identical"):
        raise ValueError(f"overlap must be 'disjoint' or 'identical'; got '{overlap}'")
    return overlap == "disjoint"


def _split_sizes(k: float, n: int, world_size: int, wire: WireFormat, overlap: str) -> tuple[float, float, float]:
    """(range length, entries per piece, entries per reduced range) with k entries per rank spread evenly."""
    span, piece = n / world_size, k / world_size
    if wire.is_dense(piece, span):  # a piece sent dense makes its whole range present
        return span, piece, span
    return span, piece, min(k if _overlap_grows(overlap) else piece, span)


def _time_s(steps: list[tuple[float, int]], alpha_s: float, beta_s_per_byte: float) -> float:
    """Alpha-beta time of messages sent one after another: a per message, b per byte."""
    return sum(messages * alpha_s + n_bytes * beta_s_per_byte for n_bytes, messages in steps)
