"""The compressor contract: transformations with explicit state (DESIGN.md section 2, like optax).

    state = c.init(tensor)
    payload, state = c.compress(tensor, state)
    tensor = c.decompress(payload)

A `Payload` is what one rank puts on the wire for one tensor: `wire` holds the tensors that are sent
(their bytes are exactly what the communicator counts), `context` what every rank knows without sending
it (shape, dtype, k, a shared seed, the step). A compressor's context must therefore be identical on all
ranks; per-rank numbers such as a scale or a norm travel in `wire`.

Each compressor declares how payloads of different ranks combine (`aggregation`):

- "sum": wire tensors may be summed elementwise over the ranks (by any allreduce algorithm) and
  `decompress` of the summed payload is the sum of the ranks' tensors as decompressed (a linear code:
  fp16, bf16, random-k with a shared seed). A summable compressor may need several rounds (PowerSGD):
  it then has `rounds > 1` and `refine(summed, state)` turns round k's summed payload into round k+1's.
- "gather": payloads are allgathered; the result is `c.combine(payloads)` (by default the sum of the
  decompressed payloads). Compressors whose wire sizes differ between ranks set `fixed_size = False`;
  the transport then sends each wire tensor's element count first (4 bytes each, the stated header).
- "sparse": wire is `[indices, values]` (indices sorted ascending, unique, in the smallest integer dtype
  that holds numel - 1, see `index_dtype`); payloads are summed by a sparse allreduce
  (polytrain.comm.sparse) into the dense sum.

State is a dict of tensors (residuals, PowerSGD's Q, DGC's momentum, a step counter as a 0-d tensor), so
it can be saved in a checkpoint and restored as is. `payload_bytes(numel)` gives the analytic wire size of
one tensor of that many elements, which tests compare with the communicator's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from polytrain.registry import Registry

Aggregation = Literal["sum", "gather", "sparse"]
State = dict[str, torch.Tensor]

COMPRESSORS: Registry = Registry("compressor")


@dataclass
class Payload:
    """One tensor's compressed form: `wire` is sent, `context` is known to every rank without sending."""

    wire: list[torch.Tensor]
    context: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes on the wire (the header of variable-size gathers not included)."""
        return sum(t.numel() * t.element_size() for t in self.wire)


class Compressor(Protocol):
    """A gradient compressor (see the module docstring for the contract).

    Compressor classes derive from CompressorTraits, which gives every member after `fixed_size` its
    default; a compressor declares only the traits in which it differs.
    """

    name: str
    aggregation: Aggregation
    fixed_size: bool  # every rank's wire tensors have the same sizes for the same input shape
    rounds: int  # summed rounds per step; rounds after the first come from `refine` (PowerSGD: 2)
    per_rank_seed: bool  # its draws must differ between ranks: it is built with seed + 1000003 * rank
    elementwise: bool  # one wire tensor whose element i encodes element i of the input (fp16, none)
    error_feedback_builtin: bool  # keeps its own residual, so ErrorFeedback around it is refused
    owns_momentum: bool  # applies momentum itself (DGC's momentum correction); the optimizer must not

    def init(self, tensor: torch.Tensor) -> State: ...

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]: ...

    def decompress(self, payload: Payload) -> torch.Tensor: ...

    def payload_bytes(self, numel: int) -> int: ...

    def select(self, name: str, tensor: torch.Tensor) -> Compressor: ...

    def combine(self, payloads: list[Payload]) -> torch.Tensor: ...


class CompressorTraits:
    """Defaults of Compressor's optional members; every compressor class derives from it.

    By default a compressor runs one round, shares its seed between ranks, sends no elementwise code,
    keeps no residual and no momentum, compresses every parameter alike and combines gathered payloads
    by summing their decompressions.
    """

    rounds = 1
    per_rank_seed = False
    elementwise = False
    error_feedback_builtin = False
    owns_momentum = False

    def select(self, name: str, tensor: torch.Tensor) -> Compressor:
        """The compressor for the parameter `name` of `tensor`'s shape: this one (Masked picks per tensor)."""
        return self

    def combine(self, payloads: list[Payload]) -> torch.Tensor:
        """The aggregate of allgathered payloads: the sum of their decompressions."""
        total = self.decompress(payloads[0]).clone()
        for payload in payloads[1:]:
            total.add_(self.decompress(payload))
        return total


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype that holds every index of a vector of `numel` elements.

    Unsigned 16- and 32-bit types (torch supports storing and converting them, not arithmetic) double the
    range of their signed peers: a vector of up to 65,536 elements, such as LeNet-5's whole gradient, takes
    2-byte indices. Users convert to int64 before computing with indices.
    """
    largest = max(numel - 1, 0)
    for dtype in (torch.uint8, torch.uint16, torch.uint32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


@COMPRESSORS.register("none")
class NoCompression(CompressorTraits):
    """The uncompressed tensor as it is (the fp32 baseline and what per-layer exclusion falls back to)."""

    name = "none"
    aggregation: Aggregation = "sum"
    fixed_size = True
    elementwise = True

    def init(self, tensor: torch.Tensor) -> State:
        return {}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        return Payload([tensor.reshape(-1)], {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.wire[0].view(payload.context["shape"])

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel
