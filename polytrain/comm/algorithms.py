"""Allreduce algorithms on the Communicator's point-to-point transfers, each with its cost and volume.

Every entry of ALLREDUCE_ALGORITHMS is a class with a `name` (its registry key; transfers are counted
under the operation "allreduce:<name>") and, as static methods:

- `all_reduce(comm, tensor)`: sums `tensor` over all ranks in place, accumulating in its dtype. Every rank
  ends with bitwise the same result (each element's sum is formed once, or by partners adding the same
  two operands, and IEEE addition is commutative), which data-parallel equivalence relies on.
- `cost_s(n_bytes, world_size, alpha_s, beta_s_per_byte, gamma_s_per_byte)`: predicted time in the
  alpha-beta-gamma model (latency per message, transfer per byte, reduction per byte) of Thakur,
  Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH" (IJHPCA 2005).
- `bytes_sent(n_bytes, world_size, rank, element_bytes=1)` and `messages_sent(n_elements, world_size,
  rank)`: what the Communicator counts on `rank` for one call. Vectors are split between elements, so
  ring and rabenseifner need `element_bytes` to be exact when the pieces are uneven; the default treats
  every byte as an element, exact whenever p (p' for rabenseifner) divides the element count.

Conventions shared by all point-to-point algorithms: pieces are split with torch.tensor_split semantics
(the first `n % k` of `k` pieces hold one element more); an empty piece is never sent (no zero-byte
messages), so an empty tensor or a single rank moves nothing. Non-powers of two are folded (Thakur et al.
2005; Rabenseifner 2004): with p' = 2^floor(log2 p) and r = p - p', each odd rank below 2r sends
its whole vector to rank - 1 and sits out, the p' remaining ranks run the power-of-two algorithm, and
the even ranks below 2r send the result back to rank + 1. The fold's rank arithmetic
(`power_of_two_below`, `fold_remainder`, `folded_index`, `unfolded_rank`) and `piece_sizes` are public:
the sparse allreduces (polytrain.comm.sparse) fold and split the same way.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Protocol

import torch

from polytrain.comm.communicator import Communicator, Pending
from polytrain.registry import Registry


class AllReduceAlgorithm(Protocol):
    """A sum-allreduce with its analytic cost and communication volume (all static methods)."""

    name: str

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None: ...

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float: ...

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int: ...

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int: ...


ALLREDUCE_ALGORITHMS: Registry = Registry("allreduce algorithm")


def _registered(algorithm: type) -> type:
    """Registers an algorithm class under its `name`."""
    return ALLREDUCE_ALGORITHMS.register(algorithm.name)(algorithm)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing `tensor`'s storage, so reducing the view reduces the tensor in place."""
    if not tensor.is_contiguous():
        raise ValueError(f"allreduce needs a contiguous tensor; got one of shape {tuple(tensor.shape)} "
                         f"with strides {tensor.stride()}")
    return tensor.view(-1)


def _ceil_log2(p: int) -> int:
    return (p - 1).bit_length()


def power_of_two_below(p: int) -> int:
    """The largest power of two <= p: p' = 2^floor(log2 p), the ranks left after the fold."""
    return 1 << (p.bit_length() - 1)


def _fold_cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
                 gamma_s_per_byte: float) -> float:
    """The fold (one message in, one sum) and unfold (one message out): zero for a power of two."""
    if world_size == power_of_two_below(world_size):
        return 0.0
    return 2 * alpha_s + 2 * n_bytes * beta_s_per_byte + n_bytes * gamma_s_per_byte


def _elements(n_bytes: int, element_bytes: int) -> int:
    n_elements, leftover = divmod(n_bytes, element_bytes)
    if leftover:
        raise ValueError(f"{n_bytes} bytes are not a whole number of {element_bytes}-byte elements")
    return n_elements


def piece_sizes(n_elements: int, num_pieces: int) -> list[int]:
    """The element counts of torch.tensor_split(x, num_pieces) for a vector x of n_elements.

    The first n_elements % num_pieces pieces hold one element more than the others.
    """
    base, extra = divmod(n_elements, num_pieces)
    return [base + (index < extra) for index in range(num_pieces)]


def _post(comm: Communicator, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
          operation: str) -> Pending:
    """Communicator.post leaving out empty pieces (no zero-byte messages)."""
    return comm.post([(t, peer) for t, peer in sends if t.numel()],
                     [(b, peer) for b, peer in recvs if b.numel()], operation)


def _transfer(comm: Communicator, outgoing: torch.Tensor, destination: int, incoming: torch.Tensor,
              source: int, operation: str) -> None:
    """Sends `outgoing` while receiving into `incoming`, leaving out empty pieces."""
    _post(comm, [(outgoing, destination)], [(incoming, source)], operation).wait()


def _reduce_from(comm: Communicator, outgoing: torch.Tensor, destination: int, target: torch.Tensor,
                 source: int, scratch: torch.Tensor, operation: str) -> None:
    """Sends `outgoing` while receiving a piece from `source` that is added into `target`."""
    incoming = scratch[:target.numel()]
    _transfer(comm, outgoing, destination, incoming, source, operation)
    target.add_(incoming)


def fold_remainder(world_size: int) -> int:
    """The number of ranks that sit out the power-of-two part: r = p - p'."""
    return world_size - power_of_two_below(world_size)


def folded_index(world_size: int, rank: int) -> int | None:
    """The index of `rank` among the p' participants after the fold; None for an odd rank below 2r."""
    remainder = fold_remainder(world_size)
    if rank >= 2 * remainder:
        return rank - remainder
    return None if rank % 2 else rank // 2


def unfolded_rank(index: int, world_size: int) -> int:
    """The rank of the participant with index `index` among the p' ranks left by the fold."""
    remainder = fold_remainder(world_size)
    return 2 * index if index < remainder else index + remainder


def _fold(comm: Communicator, flat: torch.Tensor, operation: str) -> int | None:
    """Folds a non-power-of-two world onto p' ranks; returns this rank's index among them, None if it sits out."""
    index = folded_index(comm.world_size, comm.rank)
    if comm.rank < 2 * fold_remainder(comm.world_size):
        if index is None:
            comm.send(flat, comm.rank - 1, operation)
        else:
            buffer = comm.scratch("fold", flat.numel(), flat.dtype)
            comm.recv(buffer, comm.rank + 1, operation)
            flat.add_(buffer)
    return index


def _unfold(comm: Communicator, flat: torch.Tensor, operation: str) -> None:
    """Returns the result to the ranks that sat out the power-of-two part."""
    if comm.rank < 2 * fold_remainder(comm.world_size):
        if comm.rank % 2:
            comm.recv(flat, comm.rank - 1, operation)
        else:
            comm.send(flat, comm.rank + 1, operation)


def _fold_messages_sent(world_size: int, rank: int) -> int:
    """Messages a rank sends in the fold (odd ranks below 2r) or the unfold (even ranks below 2r)."""
    return int(rank < 2 * fold_remainder(world_size))


@_registered
class Central:
    """Parameter server: every rank sends its vector to rank 0, which sums them and sends the sum back."""

    name = "central"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        flat = _flat(tensor)
        if comm.world_size == 1 or flat.numel() == 0:
            return
        if comm.rank == 0:
            workers = range(1, comm.world_size)
            block = comm.scratch("central", len(workers) * flat.numel(), flat.dtype)
            buffers = block.view(len(workers), flat.numel()).unbind()
            comm.exchange([], list(zip(buffers, workers)), "allreduce:central")
            for buffer in buffers:  # rank order, so the sum does not depend on arrival order
                flat.add_(buffer)
            comm.exchange([(flat, worker) for worker in workers], [], "allreduce:central")
        else:
            comm.send(flat, 0, "allreduce:central")
            comm.recv(flat, 0, "allreduce:central")

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Iandola thesis eq. 3.3: the server's link carries |dW| * p bytes, so time grows linearly in p.
        # Here the p - 1 vectors come in, are summed, and only then go out, so both directions count.
        p = world_size
        return 2 * (p - 1) * (alpha_s + n_bytes * beta_s_per_byte) + (p - 1) * n_bytes * gamma_s_per_byte

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        return Central.messages_sent(_elements(n_bytes, element_bytes), world_size, rank) * n_bytes

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        # The server sends the sum to p - 1 workers; each worker sends its vector once.
        if n_elements == 0:
            return 0
        return world_size - 1 if rank == 0 else 1


def _binomial_reduce(comm: Communicator, flat: torch.Tensor, operation: str) -> None:
    """Sums onto rank 0: at distance 1, 2, 4, ... a rank with that bit set sends its partial sum and stops."""
    buffer = comm.scratch("tree", flat.numel(), flat.dtype)
    distance = 1
    while distance < comm.world_size:
        if comm.rank & distance:
            comm.send(flat, comm.rank - distance, operation)
            return
        if comm.rank + distance < comm.world_size:
            comm.recv(buffer, comm.rank + distance, operation)
            flat.add_(buffer)
        distance <<= 1


def _binomial_broadcast(comm: Communicator, flat: torch.Tensor, operation: str) -> None:
    """The reduction tree run backwards: receive from the parent, then send to children, largest subtree first."""
    lowest_bit = comm.rank & -comm.rank if comm.rank else 1 << _ceil_log2(comm.world_size)
    if comm.rank:
        comm.recv(flat, comm.rank - lowest_bit, operation)
    distance = lowest_bit >> 1
    while distance:
        if comm.rank + distance < comm.world_size:
            comm.send(flat, comm.rank + distance, operation)
        distance >>= 1


@_registered
class Tree:
    """Binomial-tree reduce to rank 0 followed by a binomial-tree broadcast from rank 0."""

    name = "tree"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        flat = _flat(tensor)
        if comm.world_size == 1 or flat.numel() == 0:
            return
        _binomial_reduce(comm, flat, "allreduce:tree")
        _binomial_broadcast(comm, flat, "allreduce:tree")

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Thakur et al. 2005: binomial reduce ceil(lg p)(a + nb + ng) plus binomial broadcast
        # ceil(lg p)(a + nb); the bandwidth term is Iandola thesis eq. 3.4, |dW| * 2 log2(p) / BW.
        steps = _ceil_log2(world_size)
        return steps * (2 * alpha_s + 2 * n_bytes * beta_s_per_byte + n_bytes * gamma_s_per_byte)

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        return Tree.messages_sent(_elements(n_bytes, element_bytes), world_size, rank) * n_bytes

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        # One send to the parent (every rank but 0) plus one per child: rank r's children are r + 2^k for
        # 2^k below r's lowest set bit and r + 2^k < p, i.e. min(trailing zeros of r, ceil(lg(p - r))).
        if n_elements == 0:
            return 0
        if rank == 0:
            return _ceil_log2(world_size)
        trailing_zeros = (rank & -rank).bit_length() - 1
        return 1 + min(trailing_zeros, _ceil_log2(world_size - rank))


def _recursive_doubling(comm: Communicator, flat: torch.Tensor, index: int, operation: str) -> None:
    """Partners at distance 1, 2, 4, ... among the p' participants swap whole vectors and add them."""
    buffer = comm.scratch("butterfly", flat.numel(), flat.dtype)
    distance = 1
    while distance < power_of_two_below(comm.world_size):
        partner = unfolded_rank(index ^ distance, comm.world_size)
        _reduce_from(comm, flat, partner, flat, partner, buffer, operation)
        distance <<= 1


def _folded_all_reduce(comm: Communicator, tensor: torch.Tensor, power_of_two_algorithm,
                       operation: str) -> None:
    """Folds a non-power-of-two world, runs `power_of_two_algorithm(comm, flat, index, operation)` on the
    remaining ranks, and sends the result back to the folded ones."""
    flat = _flat(tensor)
    if comm.world_size == 1 or flat.numel() == 0:
        return
    index = _fold(comm, flat, operation)
    if index is not None:
        power_of_two_algorithm(comm, flat, index, operation)
    _unfold(comm, flat, operation)


@_registered
class Butterfly:
    """Recursive doubling: lg p rounds of pairwise whole-vector exchange (fold for non-powers of two)."""

    name = "butterfly"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        _folded_all_reduce(comm, tensor, _recursive_doubling, "allreduce:butterfly")

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Thakur et al. 2005 (recursive doubling): lg p (a + nb + ng) for a power of two, plus the fold
        # (a + nb + ng in, a + nb out) otherwise.
        steps = power_of_two_below(world_size).bit_length() - 1
        return (steps * (alpha_s + n_bytes * beta_s_per_byte + n_bytes * gamma_s_per_byte)
                + _fold_cost_s(n_bytes, world_size, alpha_s, beta_s_per_byte, gamma_s_per_byte))

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        return Butterfly.messages_sent(_elements(n_bytes, element_bytes), world_size, rank) * n_bytes

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        # floor(lg p) whole vectors for each participant, plus one fold or unfold message below 2r.
        if n_elements == 0:
            return 0
        participates = folded_index(world_size, rank) is not None
        steps = power_of_two_below(world_size).bit_length() - 1
        return _fold_messages_sent(world_size, rank) + participates * steps


@_registered
class Ring:
    """Ring reduce-scatter then ring allgather over p nearly equal pieces (bandwidth optimal)."""

    name = "ring"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        flat = _flat(tensor)
        p, rank = comm.world_size, comm.rank
        if p == 1 or flat.numel() == 0:
            return
        pieces = flat.tensor_split(p)
        right, left = (rank + 1) % p, (rank - 1) % p
        operation = "allreduce:ring"
        # Reduce-scatter: at step s send piece rank - s and add the received piece rank - s - 1 into ours;
        # after p - 1 steps piece rank + 1 holds the full sum. Allgather: pass the finished pieces on
        # around the ring, overwriting. Every receive is posted before the first send, each partial piece
        # into its own scratch slot: a neighbour that is ahead never waits for this rank to ask. Posting
        # early is safe: a piece's next message from the left depends on what this rank sent before.
        largest = pieces[0].numel()
        scratch = comm.scratch("ring", (p - 1) * largest, flat.dtype)
        partial = [scratch[step * largest:][:pieces[(rank - step - 1) % p].numel()] for step in range(p - 1)]
        finished = [pieces[(rank - step) % p] for step in range(p - 1)]
        receives = [_post(comm, [], [(buffer, left)], operation) for buffer in partial + finished]
        sends = []
        for step in range(p - 1):
            sends.append(_post(comm, [(pieces[(rank - step) % p], right)], [], operation))
            receives[step].wait()
            pieces[(rank - step - 1) % p].add_(partial[step])
        for step in range(p - 1):
            sends.append(_post(comm, [(pieces[(rank + 1 - step) % p], right)], [], operation))
            receives[p - 1 + step].wait()
        for send in sends:
            send.wait()

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Thakur et al. 2005 (ring reduce-scatter + ring allgather):
        # 2(p-1)a + 2(p-1)/p nb + (p-1)/p ng; the bandwidth term is optimal (Patarasuk & Yuan 2009).
        p = world_size
        share = (p - 1) / p * n_bytes
        return 2 * (p - 1) * alpha_s + 2 * share * beta_s_per_byte + share * gamma_s_per_byte

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        # Each phase sends every piece but one: all but piece rank+1 (reduce-scatter) and all but piece
        # rank+2 (allgather), so 2n - c[rank+1] - c[rank+2] elements; 2(p-1)/p n when p divides n.
        n_elements = _elements(n_bytes, element_bytes)
        sizes = piece_sizes(n_elements, world_size)
        skipped = sizes[(rank + 1) % world_size] + sizes[(rank + 2) % world_size]
        return (2 * n_elements - skipped) * element_bytes

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        # As bytes_sent, counting the non-empty pieces: 2 min(n, p) - [c[rank+1] > 0] - [c[rank+2] > 0].
        sizes = piece_sizes(n_elements, world_size)
        skipped = (sizes[(rank + 1) % world_size] > 0) + (sizes[(rank + 2) % world_size] > 0)
        return 2 * min(n_elements, world_size) - skipped


def _block_range(flat: torch.Tensor, offsets: list[int], first_block: int, num_blocks: int) -> torch.Tensor:
    return flat[offsets[first_block]:offsets[first_block + num_blocks]]


def _halving_doubling(comm: Communicator, flat: torch.Tensor, index: int, operation: str) -> None:
    """Reduce-scatter by recursive halving, then allgather by recursive doubling, over p' blocks.

    Halving (distance p'/2, p'/4, ..., 1): partners split the block range they share, each keeping the
    half that contains its own block and adding in the partner's copy of it; participant `index` ends
    owning block `index`. Doubling runs the same steps backwards, swapping finished ranges.
    """
    num_blocks = power_of_two_below(comm.world_size)
    offsets = [0, *accumulate(piece_sizes(flat.numel(), num_blocks))]
    halving = [num_blocks >> k for k in range(1, num_blocks.bit_length())]  # p'/2, ..., 2, 1
    doubling = halving[::-1]
    partners = [unfolded_rank(index ^ distance, comm.world_size) for distance in halving + doubling]
    mine = [_block_range(flat, offsets, index & ~(d - 1), d) for d in halving + doubling]
    theirs = [_block_range(flat, offsets, (index ^ d) & ~(d - 1), d) for d in halving + doubling]
    # All receives are posted first (as in Ring): halving's into disjoint scratch slots, doubling's
    # straight into the ranges they finish.
    slots = list(accumulate((m.numel() for m in mine[:len(halving)]), initial=0))
    scratch = comm.scratch("rabenseifner", slots[-1], flat.dtype)
    incoming = [scratch[slots[k]:slots[k + 1]] for k in range(len(halving))] + theirs[len(halving):]
    receives = [_post(comm, [], [(buffer, partner)], operation) for buffer, partner in zip(incoming, partners)]
    sends = []
    for k in range(len(halving)):
        sends.append(_post(comm, [(theirs[k], partners[k])], [], operation))
        receives[k].wait()
        mine[k].add_(incoming[k])
    for k in range(len(halving), len(partners)):
        sends.append(_post(comm, [(mine[k], partners[k])], [], operation))
        receives[k].wait()
    for send in sends:
        send.wait()


def _halving_doubling_pieces(n_elements: int, world_size: int, index: int) -> list[int]:
    """Element counts of the pieces participant `index` sends, empty ones included.

    In halving it sends the partner's half of their shared range, in doubling its own range; a range of
    m blocks starting at block g holds m*q + clip(s - g, 0, m) elements, where n = q*p' + s.
    """
    num_blocks = power_of_two_below(world_size)
    base, extra = divmod(n_elements, num_blocks)
    distances = [1 << k for k in range(num_blocks.bit_length() - 1)]
    halving = [(index ^ d) & ~(d - 1) for d in distances]
    doubling = [index & ~(d - 1) for d in distances]
    return [d * base + min(max(extra - first, 0), d) for d, first in
            zip(distances * 2, halving + doubling)]


@_registered
class Rabenseifner:
    """Rabenseifner's allreduce: recursive-halving reduce-scatter plus recursive-doubling allgather."""

    name = "rabenseifner"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        _folded_all_reduce(comm, tensor, _halving_doubling, "allreduce:rabenseifner")

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Thakur et al. 2005 (Rabenseifner's algorithm): 2 lg p a + 2(p-1)/p nb + (p-1)/p ng on
        # p' = 2^floor(lg p) ranks, plus the fold otherwise.
        p = power_of_two_below(world_size)
        share = (p - 1) / p * n_bytes
        return (2 * (p.bit_length() - 1) * alpha_s + 2 * share * beta_s_per_byte + share * gamma_s_per_byte
                + _fold_cost_s(n_bytes, world_size, alpha_s, beta_s_per_byte, gamma_s_per_byte))

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        # Fold/unfold: n elements. A participant sends n - c[index] in halving and, in doubling, its own
        # aligned range of 1, 2, ..., p'/2 blocks: 2(p'-1)/p' n in all when p' divides n.
        n_elements = _elements(n_bytes, element_bytes)
        index = folded_index(world_size, rank)
        pieces = [] if index is None else _halving_doubling_pieces(n_elements, world_size, index)
        return (_fold_messages_sent(world_size, rank) * n_elements + sum(pieces)) * element_bytes

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        # 2 lg p' for a participant when n >= p' (fewer when blocks are empty), plus the fold message.
        if n_elements == 0:
            return 0
        index = folded_index(world_size, rank)
        pieces = [] if index is None else _halving_doubling_pieces(n_elements, world_size, index)
        return _fold_messages_sent(world_size, rank) + sum(size > 0 for size in pieces)


@_registered
class Native:
    """The backend's own allreduce (gloo, NCCL); its traffic is invisible, so volumes are ring estimates."""

    name = "native"

    @staticmethod
    def all_reduce(comm: Communicator, tensor: torch.Tensor) -> None:
        comm.native_all_reduce(tensor)

    @staticmethod
    def cost_s(n_bytes: float, world_size: int, alpha_s: float, beta_s_per_byte: float,
               gamma_s_per_byte: float) -> float:
        # Modelled as ring (Patarasuk & Yuan 2009), as the Communicator's byte estimate is; backends
        # switch algorithms by size, which a fit of alpha and beta on measurements will show.
        return Ring.cost_s(n_bytes, world_size, alpha_s, beta_s_per_byte, gamma_s_per_byte)

    @staticmethod
    def bytes_sent(n_bytes: int, world_size: int, rank: int, element_bytes: int = 1) -> int:
        # Communicator.native_all_reduce's estimate: 2(p-1)/p of the bytes, rounded down.
        return 2 * (world_size - 1) * n_bytes // world_size

    @staticmethod
    def messages_sent(n_elements: int, world_size: int, rank: int) -> int:
        return 2 * (world_size - 1)
