"""One-bit compressors: 1-bit SGD, signSGD with majority vote, and error-feedback signSGD.

Each sends one bit per element, packed 8 to a byte (polytrain.compress.packing.pack with bits=1; bit 1
means x >= 0), plus one or two float32 reconstruction values per tensor. A bit cannot say 0, so an
element that is exactly 0 is sent as positive (the papers' sign(0) = 0 is not representable).

Sources: Seide, Fu, Droppo, Li & Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs" (Interspeech 2014); Bernstein, Wang, Azizzadenesheli
& Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems" (ICML 2018); Karimireddy,
Rebjock, Stich & Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes" (ICML 2019).
"""

from __future__ import annotations

import torch

from polytrain.compress.base import COMPRESSORS, Aggregation, CompressorTraits, Payload, State
from polytrain.compress.packing import pack, packed_bytes, unpack
from polytrain.compress.sparsify import check_flag


def _signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The bits of `pack(x >= 0, 1)` as a bool tensor (True: x >= 0)."""
    return unpack(packed, numel, 1).bool()


def _mean_abs(flat: torch.Tensor) -> torch.Tensor:
    """||x||_1 / d as a 1-element float32 tensor (0 for an empty tensor)."""
    return (flat.abs().sum() / max(flat.numel(), 1)).reshape(1)


@COMPRESSORS.register("onebit")
class OneBit(CompressorTraits):
    """1-bit SGD with error feedback (Seide et al. 2014): two reconstruction values per tensor.

    With e the residual, x = g + e is quantized to 1 bit per element (x >= 0 or not); the receiver
    reconstructs the mean of x's non-negative entries or the mean of its negative entries (the values that
    minimise the squared error for that split), and the quantization error stays in e for the next step
    (the paper's "error feedback"). Seide et al. quantize each column of a weight matrix
    with its own pair of values; here the pair is per tensor, so any shape works and the header is a
    constant 8 bytes. Wire: [mean of x >= 0, mean of x < 0] as float32, then the bits.
    """

    name = "onebit"
    aggregation: Aggregation = "gather"
    fixed_size = True
    error_feedback_builtin = True  # the residual is the paper's error feedback

    def init(self, tensor: torch.Tensor) -> State:
        return {"residual": torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        corrected = tensor.to(torch.float32) + state["residual"]
        flat = corrected.reshape(-1)
        positive = flat >= 0
        num_positive = positive.sum()
        means = torch.stack([
            flat.clamp(min=0).sum() / num_positive.clamp(min=1),
            flat.clamp(max=0).sum() / (flat.numel() - num_positive).clamp(min=1),
        ])
        decoded = torch.where(positive, means[0], means[1])
        payload = Payload([means, pack(positive, 1)], {"shape": tensor.shape})
        return payload, {"residual": corrected - decoded.view(corrected.shape)}

    def decompress(self, payload: Payload) -> torch.Tensor:
        means, packed = payload.wire
        shape = payload.context["shape"]
        return torch.where(_signs(packed, shape.numel()), means[0], means[1]).view(shape)

    def payload_bytes(self, numel: int) -> int:
        """8 + ceil(numel / 8): two float32 reconstruction values, then one bit per element."""
        return 8 + packed_bytes(numel, 1)


@COMPRESSORS.register("signsgd")
class SignSGD(CompressorTraits):
    """signSGD with majority vote (Bernstein et al. 2018): ranks send signs, the vote is summed.

    Each rank sends its gradient's signs and its scale ||g||_1 / d (mean |g|). `combine` returns
    sign(sum of the ranks' signs) (0 on a tied vote) times the sum of the ranks' scales. A gather's
    aggregate is on the scale of a sum over ranks (each rank's gradient is already divided by the global
    batch, so the sum is the mean gradient), and sign(vote) * summed scale is of the size of that sum: a
    learning rate tuned for plain SGD carries over. With `scale=False` the aggregate is p * sign(vote) for
    p ranks, p times the unscaled sign of the paper (whose learning rates are then those of signSGD,
    e.g. 1e-4 for Adam-like step sizes); the scale is still sent, so the wire size does not change.
    Wire: scale as float32, then one bit per element.

    Args:
        scale: multiply the vote by the ranks' mean |g| (True) or use the bare sign (False).
    """

    name = "signsgd"
    aggregation: Aggregation = "gather"
    fixed_size = True

    def __init__(self, scale: bool = True) -> None:
        self.scale = check_flag("signsgd", "scale", scale)

    def init(self, tensor: torch.Tensor) -> State:
        return {}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1).to(torch.float32)
        return Payload([_mean_abs(flat), pack(flat >= 0, 1)], {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        """One rank's contribution: scale * sign (or the bare sign with scale=False)."""
        magnitude, packed = payload.wire
        shape = payload.context["shape"]
        ones = torch.where(_signs(packed, shape.numel()), 1.0, -1.0)
        return (ones * magnitude if self.scale else ones).view(shape)

    def combine(self, payloads: list[Payload]) -> torch.Tensor:
        """The majority vote sign(sum of signs) times the sum of the scales (p with scale=False)."""
        shape = payloads[0].context["shape"]
        votes = torch.zeros(shape.numel(), dtype=torch.int32, device=payloads[0].wire[1].device)
        for payload in payloads:
            votes += _signs(payload.wire[1], shape.numel())  # counts the +1 votes
        # sum of signs = 2 * (+1 votes) - p; its sign is the vote, 0 on a tie.
        vote = torch.sign(2 * votes - len(payloads)).to(torch.float32)
        if self.scale:
            factor = torch.stack([payload.wire[0][0] for payload in payloads]).sum()
        else:
            factor = torch.tensor(float(len(payloads)))
        return (vote * factor).view(shape)

    def payload_bytes(self, numel: int) -> int:
        """4 + ceil(numel / 8): float32 scale, then one bit per element."""
        return 4 + packed_bytes(numel, 1)


@COMPRESSORS.register("efsignsgd")
class EFSignSGD(CompressorTraits):
    """EF-signSGD (Karimireddy et al. 2019, Algorithm 1): scaled sign of g + e, the error kept in e.

    With x = g + e and d elements, the rank sends delta = (||x||_1 / d) sign(x) and keeps e = x - delta.
    The payloads are allgathered and summed after decompression (the paper's single-worker update, applied
    to the average over workers). Wire: ||x||_1 / d as float32, then one bit per element.
    """

    name = "efsignsgd"
    aggregation: Aggregation = "gather"
    fixed_size = True
    error_feedback_builtin = True

    def init(self, tensor: torch.Tensor) -> State:
        return {"residual": torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        corrected = tensor.to(torch.float32) + state["residual"]
        flat = corrected.reshape(-1)
        magnitude = _mean_abs(flat)
        positive = flat >= 0
        decoded = torch.where(positive, magnitude, -magnitude)
        payload = Payload([magnitude, pack(positive, 1)], {"shape": tensor.shape})
        return payload, {"residual": corrected - decoded.view(corrected.shape)}

    def decompress(self, payload: Payload) -> torch.Tensor:
        magnitude, packed = payload.wire
        shape = payload.context["shape"]
        return torch.where(_signs(packed, shape.numel()), magnitude, -magnitude).view(shape)

    def payload_bytes(self, numel: int) -> int:
        """4 + ceil(numel / 8): float32 scale, then one bit per element."""
        return 4 + packed_bytes(numel, 1)
