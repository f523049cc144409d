"""Allgather of tensors whose lengths differ between ranks, on the Communicator's point-to-point transfers.

`all_gather(comm, tensor)` returns every rank's (flattened) tensor in rank order. The algorithm is the
ring allgather (Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in
MPICH", IJHPCA 2005): in step s = 0, ..., p-2 every rank sends block rank - s to its right
neighbour and receives block rank - s - 1 from its left one, so each step forwards the block received in
the step before. It takes p - 1 steps for any p (no fold for non-powers of two) and each rank sends every
block but that of its right neighbour: (p-1)/p of the data when blocks are equal, which is optimal.

Sizes are not known in advance, so unless the caller guarantees equal sizes (`fixed_size=True`), each rank
first sends its element count to every other rank as a 4-byte int32 header (the stated header of
polytrain.compress.base; one message per peer, posted at once), counted under the same operation as the
data. Empty blocks are never sent (no zero-byte messages). Transfers are counted as "allgather" unless
the caller names another operation.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import torch

from polytrain.comm.communicator import Communicator

COUNT_DTYPE = torch.int32
COUNT_BYTES = 4  # the element-count header each rank sends to every other rank when sizes vary


def all_gather(comm: Communicator, tensor: torch.Tensor, fixed_size: bool = False,
               operation: str = "allgather") -> list[torch.Tensor]:
    """Every rank's tensor, flattened, in rank order (this rank's entry is a copy of its own).

    Args:
        comm: the communicator of the ranks taking part; every rank must call with the same dtype.
        tensor: this rank's contribution, of any shape and length (0 included); gathered flattened.
        fixed_size: the caller guarantees every rank's tensor has the same number of elements, so the
            count exchange is skipped (unequal sizes then fail in the transport or hang until the timeout).
        operation: label under which the bytes are counted.
    """
    flat = tensor.detach().reshape(-1).contiguous()
    counts = [flat.numel()] * comm.world_size if fixed_size else _exchange_counts(comm, flat.numel(), operation)
    blocks = [flat.clone() if source == comm.rank else flat.new_empty(count)
              for source, count in enumerate(counts)]
    ring_all_gather_into(comm, blocks, operation)
    return blocks


def _exchange_counts(comm: Communicator, count: int, operation: str) -> list[int]:
    """Sends this rank's element count to every other rank and returns all counts in rank order."""
    if count > torch.iinfo(COUNT_DTYPE).max:
        raise ValueError(f"allgather counts elements in int32; a tensor of {count} elements is too long "
                         f"(at most {torch.iinfo(COUNT_DTYPE).max})")
    peers = [peer for peer in range(comm.world_size) if peer != comm.rank]
    mine = torch.tensor([count], dtype=COUNT_DTYPE, device=comm.device)
    theirs = {peer: torch.empty(1, dtype=COUNT_DTYPE, device=comm.device) for peer in peers}
    comm.exchange([(mine, peer) for peer in peers], [(theirs[peer], peer) for peer in peers], operation)
    return [count if source == comm.rank else int(theirs[source]) for source in range(comm.world_size)]


def ring_all_gather_into(comm: Communicator, blocks: list[torch.Tensor], operation: str) -> None:
    """Ring allgather in place: `blocks[comm.rank]` is this rank's data, the others are filled.

    Every rank must pass buffers of the sizes the other ranks' blocks have (dtypes may differ between
    blocks but must agree between ranks); empty blocks are skipped on both sides.
    """
    p, rank = comm.world_size, comm.rank
    if len(blocks) != p:
        raise ValueError(f"ring allgather needs one block per rank; got {len(blocks)} blocks for {p} ranks")
    right, left = (rank + 1) % p, (rank - 1) % p
    for step in range(p - 1):
        outgoing, incoming = blocks[(rank - step) % p], blocks[(rank - step - 1) % p]
        comm.exchange([(outgoing, right)] if outgoing.numel() else [],
                      [(incoming, left)] if incoming.numel() else [], operation)


def all_gather_bytes_sent(lengths_in_bytes: Sequence[int], world_size: int, rank: int,
                          fixed_size: bool = False) -> int:
    """What the Communicator counts as sent by `rank` for one `all_gather`.

    Every block but that of the right neighbour rank + 1 passes through each rank, plus the 4-byte count
    to each of the p - 1 other ranks when sizes vary: sum(L) - L[(rank+1) % p] + 4 (p-1) [not fixed_size].

    Args:
        lengths_in_bytes: each rank's tensor size in bytes, in rank order.
        world_size: number of ranks (the length of `lengths_in_bytes`).
        rank: the rank whose bytes are counted.
        fixed_size: whether the count exchange was skipped.
    """
    _check_lengths(lengths_in_bytes, world_size)
    headers = 0 if fixed_size else COUNT_BYTES * (world_size - 1)
    return headers + sum(lengths_in_bytes) - lengths_in_bytes[(rank + 1) % world_size]


def all_gather_messages_sent(lengths_in_bytes: Sequence[int], world_size: int, rank: int,
                             fixed_size: bool = False) -> int:
    """Messages `rank` sends in one `all_gather`: one per non-empty forwarded block, plus p - 1 counts."""
    _check_lengths(lengths_in_bytes, world_size)
    headers = 0 if fixed_size else world_size - 1
    forwarded = [length for source, length in enumerate(lengths_in_bytes) if source != (rank + 1) % world_size]
    return headers + sum(length > 0 for length in forwarded)


def all_gather_cost_s(lengths_in_bytes: Sequence[int], alpha_s: float, beta_s_per_byte: float,
                      fixed_size: bool = False) -> float:
    """Predicted time in the alpha-beta model (latency per message, transfer time per byte).

    Thakur et al. 2005, ring allgather: (p-1) a + (p-1)/p n b for n bytes in all, split evenly. In
    every step each block is on some link, so with uneven blocks a step lasts as long as the largest one
    takes: (p-1)(a + max(L) b). The count exchange adds p - 1 messages of 4 bytes from every rank.
    """
    p = len(lengths_in_bytes)
    headers = 0.0 if fixed_size else (p - 1) * (alpha_s + COUNT_BYTES * beta_s_per_byte)
    return headers + (p - 1) * (alpha_s + max(lengths_in_bytes, default=0) * beta_s_per_byte)


def _check_lengths(lengths_in_bytes: Sequence[int], world_size: int) -> None:
    if len(lengths_in_bytes) != world_size:
        raise ValueError(f"allgather volume needs one length per rank; got {len(lengths_in_bytes)} "
                         f"lengths for {world_size} ranks")


def gather_objects(comm: Communicator, value: Any, root: int = 0, operation: str = "gather_objects") -> list | None:
    """Every rank's `value` at rank `root`, in rank order (None on the other ranks).

    Values are serialised with torch.save and read back with weights_only=True, so they may hold tensors,
    numbers, strings, lists, tuples and dicts (a checkpoint's per-rank parts). Each rank sends its byte
    count (int64) and then its bytes to `root` over the counted point-to-point transfers.
    """
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(comm.device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=comm.device)
    if comm.rank != root:
        comm.send(size, root, operation)
        comm.send(payload, root, operation)
        return None
    peers = [peer for peer in range(comm.world_size) if peer != root]
    sizes = {peer: torch.empty(1, dtype=torch.int64, device=comm.device) for peer in peers}
    comm.exchange([], [(sizes[peer], peer) for peer in peers], operation)
    received = {peer: torch.empty(int(sizes[peer]), dtype=torch.uint8, device=comm.device) for peer in peers}
    comm.exchange([], [(received[peer], peer) for peer in peers], operation)
    received[root] = payload
    return [torch.load(io.BytesIO(received[rank].cpu().numpy().tobytes()), weights_only=True, map_location="cpu")
            for rank in range(comm.world_size)]
