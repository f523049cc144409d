"""Sums gradients over the ranks through a compressor, each payload by the aggregation it declares.

Every parameter gets its own compressor state (residuals, PowerSGD's Q, DGC's momentum); a Masked
compressor picks per parameter between its inner compressor and no compression. The payloads of one
bucket travel together, one collective per aggregation kind (polytrain.compress.base):

- "sum": the wire tensors of all summable payloads are concatenated per dtype and summed by the run's
  allreduce algorithm; multi-round compressors (PowerSGD) refine and sum again.
- "gather": each rank's wire tensors are laid end to end in one byte buffer and allgathered
  (polytrain.comm.gather); variable-size payloads prefix their wire tensors' element counts (int32 each,
  the stated header). Each rank then combines every rank's payload.
- "sparse": the payloads' indices are shifted into one index space for the bucket and summed by a SparCML
  sparse allreduce (polytrain.comm.sparse) into the dense sum.

The result on every rank is the sum over ranks of what the compressor delivers, which is the global-mean
gradient because each rank's gradient is already scaled by 1/global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from polytrain.comm import Communicator
from polytrain.comm.gather import COUNT_DTYPE, all_gather
from polytrain.comm.sparse import sparse_all_reduce
from polytrain.compress import Compressor, Payload, index_dtype
from polytrain.compress.base import State


@dataclass
class _Entry:
    """One parameter with the compressor chosen for it and that compressor's state."""

    name: str
    param: nn.Parameter
    compressor: Compressor
    state: State = field(repr=False)


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class CompressedReducer:
    """Reduces buckets of parameters' gradients through `compressor` (see the module docstring).

    Args:
        comm: this rank's communicator.
        compressor: the rank's compressor (built with polytrain.compress.build_compressor).
        algorithm: the allreduce algorithm class summable payloads go through.
        named_parameters: the (name, parameter) pairs whose gradients are reduced.
        sparse_algorithm: the SparCML algorithm sparse payloads go through.
    """

    def __init__(self, comm: Communicator, compressor: Compressor, algorithm,
                 named_parameters: list[tuple[str, nn.Parameter]],
                 sparse_algorithm: str = "ssar_recursive_doubling") -> None:
        self.comm = comm
        self.compressor = compressor
        self.algorithm = algorithm
        self.sparse_algorithm = sparse_algorithm
        self.entries: dict[nn.Parameter, _Entry] = {}
        for name, param in named_parameters:
            chosen = compressor.select(name, param)
            self.entries[param] = _Entry(name, param, chosen, chosen.init(param.detach()))

    def uncompressed(self) -> list[str]:
        """Names of the parameters the compressor's masking leaves uncompressed."""
        return [e.name for e in self.entries.values() if e.compressor.name == "none"]

    def reduce(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The sum over all ranks of each parameter's gradient as the compressor delivers it."""
        entries = [self.entries[p] for p in params]
        payloads = []
        for entry in entries:
            grad = entry.param.grad if entry.param.grad is not None else torch.zeros_like(entry.param)
            payload, entry.state = entry.compressor.compress(grad.detach(), entry.state)
            payloads.append(payload)
        results: list[torch.Tensor | None] = [None] * len(entries)
        kinds = [e.compressor.aggregation for e in entries]
        for kind, reduce in (("sum", self._sum), ("gather", self._gather), ("sparse", self._sparse)):
            chosen = [i for i, k in enumerate(kinds) if k == kind]
            if chosen:
                for i, result in zip(chosen, reduce([entries[i] for i in chosen], [payloads[i] for i in chosen])):
                    results[i] = result.reshape(entries[i].param.shape).to(entries[i].param.dtype)
        return results

    # -- aggregations --------------------------------------------------------------------------------------

    def _sum(self, entries: list[_Entry], payloads: list[Payload]) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * len(entries)
        active = list(range(len(entries)))
        round_number = 1
        while active:
            self._sum_wires([t for i in active for t in payloads[i].wire])
            still = []
            for i in active:
                compressor = entries[i].compressor
                if compressor.rounds > round_number:
                    payloads[i], entries[i].state = compressor.refine(payloads[i], entries[i].state)
                    still.append(i)
                else:
                    results[i] = compressor.decompress(payloads[i])
            active, round_number = still, round_number + 1
        return results

    def _sum_wires(self, wires: list[torch.Tensor]) -> None:
        """Sums the wire tensors over the ranks in place: one allreduce per dtype."""
        for dtype in sorted({t.dtype for t in wires}, key=str):
            group = [t for t in wires if t.dtype == dtype and t.numel()]
            if not group:
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            self.algorithm.all_reduce(self.comm, flat)
            offset = 0
            for t in group:
                t.view(-1).copy_(flat[offset:offset + t.numel()])
                offset += t.numel()

    def _gather(self, entries: list[_Entry], payloads: list[Payload]) -> list[torch.Tensor]:
        fixed = all(e.compressor.fixed_size for e in entries)
        counts = [t.numel() for p, e in zip(payloads, entries) if not e.compressor.fixed_size for t in p.wire]
        pieces = [_byte_view(torch.tensor(counts, dtype=COUNT_DTYPE))] if counts else []
        pieces += [_byte_view(t) for p in payloads for t in p.wire]
        gathered = all_gather(self.comm, torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8),
                              fixed_size=fixed)
        per_rank = [self._unpack(buffer, entries, payloads, len(counts)) for buffer in gathered]
        return [e.compressor.combine([rank_payloads[i] for rank_payloads in per_rank])
                for i, e in enumerate(entries)]

    @staticmethod
    def _unpack(buffer: torch.Tensor, entries: list[_Entry], local: list[Payload], n_counts: int) -> list[Payload]:
        """One rank's gathered bytes as payloads shaped like the local ones (same dtypes and context)."""
        offset = n_counts * COUNT_DTYPE.itemsize
        counts = iter(buffer[:offset].clone().view(COUNT_DTYPE).tolist())
        payloads = []
        for entry, mine in zip(entries, local):
            wire = []
            for template in mine.wire:
                numel = template.numel() if entry.compressor.fixed_size else next(counts)
                size = numel * template.element_size()
                wire.append(buffer[offset:offset + size].clone().view(template.dtype))  # clone: aligned
                offset += size
            payloads.append(Payload(wire, mine.context))
        return payloads

    def _sparse(self, entries: list[_Entry], payloads: list[Payload]) -> list[torch.Tensor]:
        sizes = [e.param.numel() for e in entries]
        total = sum(sizes)
        dtypes = {p.wire[1].dtype for p in payloads}
        value_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        indices, values, offset = [], [], 0
        for payload, size in zip(payloads, sizes):
            indices.append(payload.wire[0].to(torch.int64) + offset)
            values.append(payload.wire[1].to(value_dtype))
            offset += size
        dense = sparse_all_reduce(self.comm, torch.cat(indices).to(index_dtype(total)), torch.cat(values), total,
                                  self.sparse_algorithm)
        return list(dense.split(sizes))

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, State]:
        """This rank's compressor state per parameter name."""
        return {e.name: e.state for e in self.entries.values()}

    def load_state_dict(self, states: dict[str, State]) -> None:
        missing = sorted({e.name for e in self.entries.values()} - set(states))
        if missing:
            raise ValueError(f"compressor state has no entry for parameter {missing[0]}")
        for entry in self.entries.values():
            entry.state = {key: value.clone() for key, value in states[entry.name].items()}
