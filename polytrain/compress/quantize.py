"""Quantizing compressors: fp16/bf16 casts and the unbiased stochastic quantizers kbit, qsgd, terngrad.

Sources: Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical Precision"
(ICML 2015) for stochastic rounding; Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding" (NeurIPS 2017); Wen, Xu, Yan, Wu,
Wang, Chen & Li, "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning"
(NeurIPS 2017); Ben-Nun & Hoefler (ACM CSUR 2019), on quantized communication.

Randomness. The stochastic quantizers draw from a torch.Generator seeded by a hash of (seed, stream,
step, numel): `step` counts this tensor's compressions and `stream` tells the tensors of one compressor
apart (assigned in `init` order); both live in the state as 0-d int64 tensors, so a run resumed from a
checkpoint draws exactly what the uninterrupted run drew. Their draws must be independent between ranks
(otherwise the ranks' rounding errors are correlated and do not average out), which they declare with
`per_rank_seed = True`: whoever builds a rank's compressor gives it seed = base_seed + 1000003 * rank
(polytrain.compress.build.build_compressor(..., rank=r) does). Compressors are functional: `compress`
returns a new state and never modifies the one it is given.
"""

from __future__ import annotations

import math

import torch

from polytrain.compress.base import COMPRESSORS, Aggregation, CompressorTraits, Payload, State
from polytrain.compress.packing import pack, pack_trits, packed_bytes, trit_bytes, unpack, unpack_trits
from polytrain.compress.sparsify import shared_generator

RANK_SEED_STRIDE = 1000003  # seed of rank r = base seed + RANK_SEED_STRIDE * r (per_rank_seed compressors)


def check_int(name: str, argument: str, value: int, low: int, high: int | None = None) -> int:
    """Returns `value`, or raises ValueError unless it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} {argument} must be an integer {expected}; got {value!r}")
    return value


class _Cast:
    """Sends the tensor in a 16-bit float format; the allreduce sums the payloads in that format.

    Decompression is exact; compression rounds to nearest with the format's unit roundoff (2^-11 for
    fp16, 2^-8 for bf16). fp16 overflows to inf beyond 65504 and flushes below 6e-8 to zero, and its sum
    over ranks can overflow too; bf16 keeps float32's range. Horovod's `Compression.fp16` is the same.
    """

    name: str
    dtype: torch.dtype
    aggregation: Aggregation = "sum"
    fixed_size = True
    elementwise = True  # one wire tensor, element i encodes element i (Chain relies on it for sparse values)

    def init(self, tensor: torch.Tensor) -> State:
        return {}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        return Payload([tensor.reshape(-1).to(self.dtype)], {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload.wire[0].to(torch.float32).view(payload.context["shape"])

    def payload_bytes(self, numel: int) -> int:
        """2 * numel."""
        return 2 * numel


@COMPRESSORS.register("fp16")
class Float16(_Cast, CompressorTraits):
    """IEEE half precision (11-bit significand), summed in fp16 by the allreduce; see _Cast."""

    name = "fp16"
    dtype = torch.float16


@COMPRESSORS.register("bf16")
class BFloat16(_Cast, CompressorTraits):
    """bfloat16 (8-bit significand, float32's exponent), summed in bf16 by the allreduce; see _Cast."""

    name = "bf16"
    dtype = torch.bfloat16


class _Stochastic:
    """State and seeded draws shared by the stochastic quantizers (see the module docstring)."""

    name: str
    per_rank_seed = True

    def __init__(self, seed: int) -> None:
        self.seed = check_int(self.name, "seed", seed, 0)
        self._streams = 0

    def init(self, tensor: torch.Tensor) -> State:
        stream = self._streams
        self._streams += 1
        return {"step": torch.zeros((), dtype=torch.int64), "stream": torch.tensor(stream, dtype=torch.int64)}

    def _uniform(self, like: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """float32 U[0, 1) draws of `like`'s shape and device, and the state with the step advanced.

        Drawn on the CPU (the generator is a CPU one), so every device gives the same numbers.
        """
        generator = shared_generator(self.seed, int(state["stream"]), int(state["step"]), like.numel())
        draws = torch.rand(like.shape, generator=generator, dtype=torch.float32).to(like.device)
        return draws, {**state, "step": state["step"] + 1}


@COMPRESSORS.register("kbit")
class KBit(_Stochastic, CompressorTraits):
    """Stochastic uniform quantization to 2^bits levels between the tensor's min and max.

    With lo, hi the min and max and L = 2^bits - 1, element x becomes code floor((x - lo) / (hi - lo) * L
    + u), u ~ U[0, 1), decoded as lo + code * (hi - lo) / L: stochastic rounding (Gupta et al. 2015), so
    the expectation is x. Wire: [lo, hi] as float32 (8 bytes), then the codes packed at `bits` bits.
    Payloads differ per rank in lo and hi, so they are allgathered and summed after decompression.

    Args:
        bits: code width, 1..8.
        seed: seed of the rounding draws (per rank; see the module docstring).
    """

    name = "kbit"
    aggregation: Aggregation = "gather"
    fixed_size = True

    def __init__(self, bits: int = 8, seed: int = 0) -> None:
        self.bits = check_int("kbit", "bits", bits, 1, 8)
        super().__init__(seed)

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1).to(torch.float32)
        draws, state = self._uniform(flat, state)
        if flat.numel():
            lo, hi = torch.aminmax(flat)
        else:
            lo = hi = torch.zeros((), dtype=torch.float32, device=flat.device)
        levels = (1 << self.bits) - 1
        span = hi - lo
        scale = torch.where(span > 0, levels / span, 0.0)  # a constant tensor is all code 0
        codes = torch.floor((flat - lo) * scale + draws).clamp_(0, levels)  # clamp: float32 rounding
        wire = [torch.stack([lo, hi]), pack(codes.to(torch.uint8), self.bits)]
        return Payload(wire, {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        bounds, packed = payload.wire
        shape = payload.context["shape"]
        codes = unpack(packed, shape.numel(), self.bits)
        step = (bounds[1] - bounds[0]) / ((1 << self.bits) - 1)
        return (bounds[0] + codes.to(torch.float32) * step).view(shape)

    def payload_bytes(self, numel: int) -> int:
        """8 + ceil(numel * bits / 8): float32 min and max, then the packed codes."""
        return 8 + packed_bytes(numel, self.bits)


@COMPRESSORS.register("qsgd")
class QSGD(_Stochastic, CompressorTraits):
    """QSGD (Alistarh et al., NeurIPS 2017): norm, signs and stochastic levels 0..s.

    Element x of a bucket with 2-norm ||v|| becomes level l = floor(|x| / ||v|| * s + u), u ~ U[0, 1), and
    decodes to ||v|| * sign(x) * l / s, unbiased (the paper's Lemma 3.1). The paper Elias-codes the
    levels; here each element is a sign bit and ceil(log2(s + 1)) level bits packed densely (at most
    8 bits, so s <= 127). Wire: the float32 norms of the buckets, then the packed codes.

    Args:
        levels: s, the number of nonzero levels, 1..127.
        bucket: elements per bucket with its own norm (the paper uses 512); 0 (default) takes the whole
            tensor as one bucket. Smaller buckets lower the variance (Lemma 3.1: it grows with
            min(d / s^2, sqrt(d) / s) for buckets of d elements) at 4 bytes per bucket.
        seed: seed of the rounding draws (per rank; see the module docstring).
    """

    name = "qsgd"
    aggregation: Aggregation = "gather"
    fixed_size = True

    def __init__(self, levels: int = 16, bucket: int = 0, seed: int = 0) -> None:
        self.levels = check_int("qsgd", "levels", levels, 1, 127)
        self.bucket = check_int("qsgd", "bucket", bucket, 0)
        self.level_bits = math.ceil(math.log2(levels + 1))
        super().__init__(seed)

    def _buckets(self, flat: torch.Tensor) -> torch.Tensor:
        """`flat` as rows of one bucket each (the last zero-padded): (num_buckets, bucket size)."""
        if not self.bucket:
            return flat.view(1, -1)
        pad = -flat.numel() % self.bucket
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, self.bucket)

    def num_buckets(self, numel: int) -> int:
        """1 for the whole tensor (bucket=0), else ceil(numel / bucket)."""
        return -(-numel // self.bucket) if self.bucket else 1

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1).to(torch.float32)
        rows = self._buckets(flat)
        norms = torch.linalg.vector_norm(rows, dim=1)
        scale = torch.where(norms > 0, self.levels / norms, 0.0).unsqueeze(1)
        draws, state = self._uniform(rows, state)
        level = torch.floor(rows.abs() * scale + draws).clamp_(max=self.levels).to(torch.uint8)
        codes = level | ((rows < 0).to(torch.uint8) << self.level_bits)  # sign in the top bit
        packed = pack(codes.view(-1)[: flat.numel()], self.level_bits + 1)
        return Payload([norms, packed], {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        norms, packed = payload.wire
        shape = payload.context["shape"]
        numel = shape.numel()
        codes = unpack(packed, numel, self.level_bits + 1)
        magnitude = (codes & ((1 << self.level_bits) - 1)).to(torch.float32)
        value = torch.where(codes >> self.level_bits == 1, -magnitude, magnitude)
        rows = self._buckets(value)
        return (rows * (norms / self.levels).unsqueeze(1)).view(-1)[:numel].view(shape)

    def payload_bytes(self, numel: int) -> int:
        """4 * num_buckets + ceil(numel * (1 + ceil(log2(s + 1))) / 8): norms, then the packed codes."""
        return 4 * self.num_buckets(numel) + packed_bytes(numel, self.level_bits + 1)


@COMPRESSORS.register("terngrad")
class TernGrad(_Stochastic, CompressorTraits):
    """TernGrad (Wen et al., NeurIPS 2017): layer-wise scale s = max|g| and values in {-1, 0, +1}.

    Element g becomes s * sign(g) * b with b ~ Bernoulli(|g| / s), unbiased, with the paper's
    layer-wise scaling (one s per tensor). With `clip` = c, g is first clipped to [-c sigma, c sigma],
    sigma the standard deviation of the tensor's elements (the paper's gradient clipping, with c = 2.5),
    which lowers s and the variance at the price of a bias on the clipped elements. Wire: s as float32,
    then the ternary codes packed five to a byte (base 3, polytrain.compress.packing.pack_trits).

    Args:
        clip: c in standard deviations, > 0, or None for no clipping.
        seed: seed of the Bernoulli draws (per rank; see the module docstring).
    """

    name = "terngrad"
    aggregation: Aggregation = "gather"
    fixed_size = True

    def __init__(self, clip: float | None = None, seed: int = 0) -> None:
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(f"terngrad clip must be a number > 0 or none; got {clip!r}")
        self.clip = None if clip is None else float(clip)
        super().__init__(seed)

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1).to(torch.float32)
        if self.clip is not None and flat.numel():
            bound = self.clip * flat.std(correction=0)
            # A constant tensor (sigma = 0, e.g. one element) has no outliers: left as it is.
            flat = torch.where(bound > 0, torch.maximum(torch.minimum(flat, bound), -bound), flat)
        scale = flat.abs().max() if flat.numel() else torch.zeros((), dtype=torch.float32, device=flat.device)
        draws, state = self._uniform(flat, state)
        keep = draws * scale < flat.abs()  # P = |g| / s; never for g = 0
        codes = torch.where(keep, torch.where(flat < 0, 0, 2), 1).to(torch.uint8)  # -1, 0, +1 -> 0, 1, 2
        return Payload([scale.reshape(1), pack_trits(codes)], {"shape": tensor.shape}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        scale, packed = payload.wire
        shape = payload.context["shape"]
        codes = unpack_trits(packed, shape.numel())
        return ((codes.to(torch.float32) - 1) * scale).view(shape)

    def payload_bytes(self, numel: int) -> int:
        """4 + ceil(numel / 5): float32 scale, then the ternary codes five to a byte."""
        return 4 + trit_bytes(numel)
