"""Wrappers around any compressor: error feedback, per-layer masking and chaining two compressors.

- `ErrorFeedback(inner)` adds what `inner` failed to send to the next step's tensor (Seide et al.,
  Interspeech 2014; Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy
  et al., "Error Feedback Fixes SignSGD", ICML 2019).
- `Masked(inner, ...)` leaves small, 1-D or excluded tensors uncompressed, as DGC and PowerSGD do for
  biases and batch-norm parameters (Lin et al., ICLR 2018; Vogels et al., NeurIPS 2019).
- `Chain(first, second)` compresses the floating-point wire tensors of `first` with `second` (top-k
  values sent in fp16, as in Lin et al. 2018 and SparCML, Renggli et al. SC19).

Each wrapper is itself a compressor (same protocol); nested states are flattened into one dict of
tensors with prefixed keys ("inner.", "first.", "second."), so a checkpoint stores them as they are.
"""

from __future__ import annotations

import re

import torch

from polytrain.compress.base import Aggregation, Compressor, CompressorTraits, NoCompression, Payload, State


def prefixed(prefix: str, state: State) -> State:
    """`state` with every key under `prefix` (a wrapper's view of its inner compressor's state)."""
    return {prefix + key: value for key, value in state.items()}


def unprefixed(prefix: str, state: State) -> State:
    """The entries of `state` under `prefix`, with the prefix taken off."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _single_round(role: str, compressor: Compressor) -> None:
    if compressor.rounds != 1:
        raise ValueError(f"{role} cannot wrap compressor {compressor.name}: it runs {compressor.rounds} "
                         f"rounds per step; expected a single-round compressor")


def forward_traits(wrapper: Compressor, *members: Compressor) -> None:
    """Gives `wrapper` the traits of the compressors it wraps (one, or a chain's two).

    A wrapper has fixed sizes and an elementwise code only if all its members do; it has a trait that
    marks something a member does (per-rank draws, a built-in residual, momentum) if any member does, and
    runs as many rounds as its longest member.
    """
    wrapper.fixed_size = all(member.fixed_size for member in members)
    wrapper.elementwise = all(member.elementwise for member in members)
    wrapper.per_rank_seed = any(member.per_rank_seed for member in members)
    wrapper.error_feedback_builtin = any(member.error_feedback_builtin for member in members)
    wrapper.owns_momentum = any(member.owns_momentum for member in members)
    wrapper.rounds = max(member.rounds for member in members)


class ErrorFeedback(CompressorTraits):
    """Error feedback around `inner`: the part of t + e that `inner` did not send becomes the new e.

        corrected = t + e;  payload = inner.compress(corrected);  e = corrected - inner.decompress(payload)

    so what is sent plus the new residual is exactly what was to be sent (nothing is lost, only delayed).
    State: inner's state under "inner." plus "residual" (float32, the tensor's shape). Aggregation, traits
    and combine are inner's. Compressors that keep their own error (`error_feedback_builtin`) and
    multi-round ones (PowerSGD's residual is only known after the last round) are refused.
    """

    def __init__(self, inner: Compressor) -> None:
        if inner.error_feedback_builtin:
            raise ValueError(f"compressor {inner.name} has error feedback built in; "
                             f"wrapping it in error feedback would feed the error back twice")
        _single_round("error feedback", inner)
        self.inner = inner
        self.name = f"ef({inner.name})"
        self.aggregation: Aggregation = inner.aggregation
        forward_traits(self, inner)

    def init(self, tensor: torch.Tensor) -> State:
        residual = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return {**prefixed("inner.", self.inner.init(tensor)), "residual": residual}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        corrected = tensor.to(torch.float32) + state["residual"]
        payload, inner_state = self.inner.compress(corrected, unprefixed("inner.", state))
        residual = corrected - self.inner.decompress(payload)
        return payload, {**prefixed("inner.", inner_state), "residual": residual}

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.inner.decompress(payload)

    def combine(self, payloads: list[Payload]) -> torch.Tensor:
        return self.inner.combine(payloads)

    def payload_bytes(self, numel: int) -> int:
        return self.inner.payload_bytes(numel)


class Masked(CompressorTraits):
    """Compresses only the tensors worth compressing; `select(name, tensor)` picks per parameter.

    A tensor is sent uncompressed (NoCompression) when it has fewer than `min_numel` elements, is 1-D
    and `exclude_biases` is set (biases, batch-norm scales and shifts), its parameter name matches the
    regular expression `exclude` (re.search), or `inner` would shrink it by less than `min_rate`
    (4 * numel / inner.payload_bytes(numel) < min_rate; the default 1.0 never sends a tensor larger than
    as float32; not applied to variable-size compressors such as threshold). Otherwise it gets `inner`. For use where a single compressor is expected, Masked
    delegates the whole protocol to `inner`; the strategy calls `select` for each parameter.

    Args:
        inner: the compressor for the selected tensors.
        min_numel: tensors with fewer elements are not compressed.
        exclude_biases: leave 1-D tensors uncompressed.
        exclude: regular expression on the parameter name, or None.
        min_rate: smallest compression rate worth compressing for, >= 0.
    """

    def __init__(self, inner: Compressor, min_numel: int = 0, exclude_biases: bool = False,
                 exclude: str | None = None, min_rate: float = 1.0) -> None:
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an integer >= 0; got {min_numel!r}")
        if not isinstance(exclude_biases, bool):
            raise ValueError(f"exclude_biases must be true or false; got {exclude_biases!r}")
        if isinstance(min_rate, bool) or not isinstance(min_rate, (int, float)) or not min_rate >= 0:
            raise ValueError(f"min_rate must be a number >= 0; got {min_rate!r}")
        if exclude is not None and not isinstance(exclude, str):
            raise ValueError(f"exclude must be a regular expression string; got {exclude!r}")
        try:
            self._pattern = re.compile(exclude) if exclude is not None else None
        except re.error as error:
            raise ValueError(f"exclude {exclude!r} is not a valid regular expression: {error}") from None
        self.inner = inner
        self.min_numel = min_numel
        self.exclude_biases = exclude_biases
        self.exclude = exclude
        self.min_rate = float(min_rate)
        self.plain = NoCompression()
        self.name = f"masked({inner.name})"
        self.aggregation: Aggregation = inner.aggregation
        forward_traits(self, inner)

    def rate(self, numel: int) -> float:
        """inner's compression rate 4 * numel / payload_bytes(numel) (inf for a free payload)."""
        nbytes = self.inner.payload_bytes(numel)
        return 4 * numel / nbytes if nbytes else float("inf")

    def select(self, name: str, tensor: torch.Tensor) -> Compressor:
        """`inner` for the parameter `name` of `tensor`'s shape, or NoCompression (see the class docstring)."""
        numel = tensor.numel()
        skip = (numel < self.min_numel
                or (self.exclude_biases and tensor.dim() == 1)
                or (self._pattern is not None and self._pattern.search(name) is not None)
                # A variable-size payload's payload_bytes is only an upper bound: no rate to compare.
                or (self.inner.fixed_size and self.rate(numel) < self.min_rate))
        return self.plain if skip else self.inner

    def refine(self, summed: Payload, state: State):
        return self.inner.refine(summed, state)

    def init(self, tensor: torch.Tensor) -> State:
        return self.inner.init(tensor)

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        return self.inner.compress(tensor, state)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.inner.decompress(payload)

    def combine(self, payloads: list[Payload]) -> torch.Tensor:
        return self.inner.combine(payloads)

    def payload_bytes(self, numel: int) -> int:
        return self.inner.payload_bytes(numel)


class Chain(CompressorTraits):
    """`second` compresses each floating-point wire tensor of `first`'s payload; integer ones pass as is.

    E.g. Chain(topk, fp16) sends top-k's indices unchanged and its values in fp16. Decompression
    decompresses `second`'s parts back into `first`'s wire (in its original dtype) and then `first`'s.

    Aggregation: when `second` is summable ("sum": a linear code), the chain aggregates as `first` does:
    summing `second`'s codes sums `first`'s wire tensors. A "sparse" first keeps its [indices, values]
    form only with an elementwise `second` (fp16, bf16, none): the sparse allreduce then sums the values
    in `second`'s dtype (cast the dense result to float32, which is `second`'s decompression). In every
    other case the chain is "gather" (payloads allgathered, each decompressed, summed).

    State: `first`'s under "first.", and one state of `second` under "second.", threaded through
    `first`'s floating-point wire tensors in order (so its step counter advances once per wire tensor);
    `second`'s state must therefore not depend on the tensor's shape, which excludes compressors with
    error feedback built in (wrap the whole chain in ErrorFeedback instead). `first` must have fixed wire
    sizes (`second`'s context records them) and both members a single round.
    """

    def __init__(self, first: Compressor, second: Compressor) -> None:
        _single_round("a chain", first)
        _single_round("a chain", second)
        if second.error_feedback_builtin:
            raise ValueError(f"compressor {second.name} keeps a residual of its input's shape and cannot be "
                             f"the second member of a chain; use ef=true on the chain instead")
        if not first.fixed_size:
            raise ValueError(f"compressor {first.name} sends wire tensors whose sizes differ between ranks "
                             f"and cannot be the first member of a chain")
        self.first = first
        self.second = second
        self.name = f"{first.name}+{second.name}"
        summable = second.aggregation == "sum" and (first.aggregation != "sparse" or second.elementwise)
        self.aggregation: Aggregation = first.aggregation if summable else "gather"
        forward_traits(self, first, second)
        self._bytes: dict[int, int] = {}

    def init(self, tensor: torch.Tensor) -> State:
        first_state = self.first.init(tensor)
        second_state = self.second.init(torch.zeros(0, dtype=torch.float32, device=tensor.device))
        return {**prefixed("first.", first_state), **prefixed("second.", second_state)}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        inner, first_state = self.first.compress(tensor, unprefixed("first.", state))
        second_state = unprefixed("second.", state)
        wire: list[torch.Tensor] = []
        parts: list[tuple[int, torch.dtype, dict] | None] = []  # per wire tensor of `first`
        for tensor_on_wire in inner.wire:
            if not tensor_on_wire.is_floating_point():
                wire.append(tensor_on_wire)
                parts.append(None)
                continue
            part, second_state = self.second.compress(tensor_on_wire.to(torch.float32), second_state)
            wire.extend(part.wire)
            parts.append((len(part.wire), tensor_on_wire.dtype, part.context))
        payload = Payload(wire, {"first": inner.context, "parts": parts})
        return payload, {**prefixed("first.", first_state), **prefixed("second.", second_state)}

    def decompress(self, payload: Payload) -> torch.Tensor:
        wire = iter(payload.wire)
        first_wire = []
        for part in payload.context["parts"]:
            if part is None:
                first_wire.append(next(wire))
                continue
            count, dtype, context = part
            encoded = Payload([next(wire) for _ in range(count)], context)
            first_wire.append(self.second.decompress(encoded).to(dtype))
        return self.first.decompress(Payload(first_wire, payload.context["first"]))

    def payload_bytes(self, numel: int) -> int:
        """first's bytes with each floating-point wire tensor of m elements replaced by second's bytes(m).

        The sizes of first's wire tensors are read off one compression of zeros (cached per numel).
        """
        if numel not in self._bytes:
            zeros = torch.zeros(numel, dtype=torch.float32)
            inner, _ = self.first.compress(zeros, self.first.init(zeros))
            self._bytes[numel] = sum(
                self.second.payload_bytes(t.numel()) if t.is_floating_point() else t.numel() * t.element_size()
                for t in inner.wire)
        return self._bytes[numel]
