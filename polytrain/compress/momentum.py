"""Momentum correction: heavy-ball momentum applied before a compressor instead of after it.

Lin, Han, Mao, Wang & Dally, "Deep Gradient Compression" (ICLR 2018), sec. 3.2. Error feedback delays
what a compressor drops and releases it later; a momentum optimizer after the compressor then treats each
released burst as a fresh gradient and amplifies it by up to 1 / (1 - m). Momentum correction keeps the
momentum buffer u on the sending rank and compresses u instead of g, so the optimizer after the
compressor runs without momentum:

    u <- m u + g                      torch.optim.SGD's buffer (dampening 0)
    send inner.compress(u)            Nesterov: inner.compress(g + m u), torch's nesterov=True update

Around ErrorFeedback(topk) this is DGC (polytrain.compress.dgc) without gradient clipping, warm-up and
momentum factor masking; around `none` it is SGD with momentum m. Weight decay, which torch adds to g
inside the buffer, is added by the optimizer after the compressor, outside it (as DGC does).
"""

from __future__ import annotations

import torch

from polytrain.compress.base import Aggregation, Compressor, CompressorTraits, Payload, State
from polytrain.compress.wrappers import forward_traits, prefixed, unprefixed

_INNER = "inner."  # prefix of the wrapped compressor's state keys, as in the other wrappers


class MomentumCorrection(CompressorTraits):
    """Sends `inner`'s compression of the momentum buffer u = m u + g (see the module docstring).

    State: "u" (float32, the tensor's shape) plus inner's state under "inner.". Aggregation, wire sizes,
    rounds and combine are inner's. Where `inner` picks a compressor per parameter (Masked), each pick is
    wrapped, so the tensors it leaves uncompressed keep their momentum too.

    Args:
        inner: the compressor that sends the momentum buffer.
        momentum: m, in [0, 1).
        nesterov: send g + m u (Nesterov momentum, Sutskever et al. 2013) instead of u.
    """

    def __init__(self, inner: Compressor, momentum: float, nesterov: bool = False) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum correction: momentum must be a number in [0, 1); got {momentum!r}")
        if not isinstance(nesterov, bool):
            raise ValueError(f"momentum correction: nesterov must be true or false; got {nesterov!r}")
        if inner.owns_momentum:
            raise ValueError(f"compressor {inner.name} applies momentum itself; momentum correction around it "
                             f"would apply momentum twice")
        self.inner = inner
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.name = f"momentum_correction({inner.name})"
        self.aggregation: Aggregation = inner.aggregation
        forward_traits(self, inner)
        self.elementwise = False  # u is state of the input's shape: never a chain's second member
        self.owns_momentum = True  # the optimizer after it must run without momentum

    def select(self, name: str, tensor: torch.Tensor) -> Compressor:
        chosen = self.inner.select(name, tensor)
        return self if chosen is self.inner else MomentumCorrection(chosen, self.momentum, self.nesterov)

    def init(self, tensor: torch.Tensor) -> State:
        u = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return {**prefixed(_INNER, self.inner.init(tensor)), "u": u}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        gradient = tensor.to(torch.float32)
        u = self.momentum * state["u"] + gradient
        sent = gradient + self.momentum * u if self.nesterov else u
        payload, inner_state = self.inner.compress(sent, self._inner_state(state))
        return payload, self._with_inner(inner_state, u)

    def refine(self, summed: Payload, state: State) -> tuple[Payload, State]:
        payload, inner_state = self.inner.refine(summed, self._inner_state(state))
        return payload, self._with_inner(inner_state, state["u"])

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.inner.decompress(payload)

    def combine(self, payloads: list[Payload]) -> torch.Tensor:
        return self.inner.combine(payloads)

    def payload_bytes(self, numel: int) -> int:
        return self.inner.payload_bytes(numel)

    @staticmethod
    def _inner_state(state: State) -> State:
        return unprefixed(_INNER, state)

    @staticmethod
    def _with_inner(inner_state: State, u: torch.Tensor) -> State:
        return {**prefixed(_INNER, inner_state), "u": u}
