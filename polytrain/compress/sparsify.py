"""Sparsifying compressors: top-k, random-k and threshold (Strom) sparsification.

Each keeps a few elements of the gradient and drops the rest; what is dropped is lost unless the
compressor is wrapped in error feedback (polytrain.compress's ErrorFeedback), which adds it to the next
step's gradient. Shared conventions:

- k = max(1, floor(ratio * numel)) elements are kept (at most numel; none of an empty tensor), see
  `num_selected`.
- Indices go on the wire in `index_dtype(numel)` (one byte up to 256 elements, two up to 65,536, four
  up to 2^32), sorted ascending and unique, which the sparse allreduce (polytrain.comm.sparse) needs.
- Compressors are functional: `compress` never modifies the state it is given, it returns a new one.

Sources: top-k — Aji & Heafield, "Sparse Communication for Distributed Gradient Descent" (EMNLP 2017);
Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018). Random-k — Stich et al. (2018);
Wangni, Wang, Liu & Zhang, "Gradient Sparsification for Communication-Efficient Distributed
Optimization" (NeurIPS 2018). Threshold — Strom, "Scalable Distributed DNN Training Using Commodity GPU
Cloud Computing" (Interspeech 2015).
"""

from __future__ import annotations

import math

import torch

from polytrain.compress.base import COMPRESSORS, Aggregation, CompressorTraits, Payload, State, index_dtype
from polytrain.compress.packing import pack, packed_bytes, unpack

_MASK_64 = (1 << 64) - 1


def num_selected(numel: int, ratio: float) -> int:
    """k = max(1, floor(ratio * numel)) capped at numel; 0 for an empty tensor.

    The 1e-6 guard keeps products such as 0.29 * 100 = 28.999999999999996 at 29.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(ratio * numel + 1e-6)))


def is_number(value: object) -> bool:
    """Whether `value` is an int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ratio(name: str, ratio: float) -> float:
    """Returns `ratio` as a float, or raises ValueError unless 0 < ratio <= 1."""
    if not is_number(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"{name} ratio must be a number in (0, 1]; got {ratio!r}")
    return float(ratio)


def check_flag(name: str, argument: str, value: bool) -> bool:
    """Returns `value`, or raises ValueError unless it is a bool (a string 'false' would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} {argument} must be true or false; got {value!r}")
    return value


def check_seed(name: str, seed: int) -> int:
    """Returns `seed`, or raises ValueError unless it is an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{name} seed must be an integer; got {seed!r}")
    return seed


def shared_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a hash of integer `parts`, identical on every rank that passes them.

    The parts are mixed with splitmix64 (Steele, Lea & Flood, "Fast Splittable Pseudorandom Number
    Generators", OOPSLA 2014), so neighbouring steps or sizes get unrelated streams.
    """
    state = 0
    for part in parts:
        state = ((state ^ (part & _MASK_64)) + 0x9E3779B97F4A7C15) & _MASK_64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK_64
        state ^= state >> 31
    return torch.Generator().manual_seed(state >> 1)  # 63 bits: manual_seed takes a signed 64-bit int


def sparse_payload(flat: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> Payload:
    """The [indices, values] payload of `flat` at `indices` (int64, any order), for "sparse" aggregation."""
    indices = indices.sort().values
    values = flat[indices].to(torch.float32)
    return Payload([indices.to(index_dtype(flat.numel())), values], {"shape": shape})


def sparse_to_dense(payload: Payload) -> torch.Tensor:
    """The dense float32 tensor of an [indices, values] payload; repeated indices add up."""
    shape = payload.context["shape"]
    indices, values = payload.wire
    dense = torch.zeros(math.prod(shape), dtype=torch.float32, device=values.device)
    dense.index_add_(0, indices.long(), values)
    return dense.view(shape)


@COMPRESSORS.register("topk")
class TopK(CompressorTraits):
    """Sends the k elements of largest magnitude as [indices, values] (Aji & Heafield 2017).

    Use it with error feedback (`ef=true`): without it the small elements are never applied
    (Stich et al. 2018 prove convergence with memory). Wire per tensor: k indices in index_dtype(numel)
    and k float32 values, summed over ranks by a sparse allreduce (SparCML, Renggli et al. SC19).

    Args:
        ratio: fraction of elements sent, in (0, 1]; at least one element of a non-empty tensor.
    """

    name = "topk"
    aggregation: Aggregation = "sparse"
    fixed_size = True

    def __init__(self, ratio: float = 0.01) -> None:
        self.ratio = check_ratio("topk", ratio)

    def init(self, tensor: torch.Tensor) -> State:
        return {}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1)
        k = num_selected(flat.numel(), self.ratio)
        indices = torch.topk(flat.abs(), k, sorted=False).indices
        return sparse_payload(flat, indices, tensor.shape), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        return sparse_to_dense(payload)

    def payload_bytes(self, numel: int) -> int:
        """k * (index bytes + 4): k = num_selected(numel, ratio) indices and float32 values."""
        index_bytes = torch.empty(0, dtype=index_dtype(numel)).element_size()
        return num_selected(numel, self.ratio) * (index_bytes + 4)


@COMPRESSORS.register("randomk")
class RandomK(CompressorTraits):
    """Sends k elements at indices every rank draws alike, so only the values travel and they add up.

    The indices are drawn uniformly without replacement from a generator seeded by (seed, step, numel),
    where step counts this tensor's compressions: all ranks draw the same indices without sending them
    (tensors of the same size draw the same indices in the same step). `unbiased=True` scales the values
    by numel / k so that the expected decompression is the gradient (Wangni et al. 2018; Stich et al.
    2018, "rand-k"); the default sends them as they are, which is meant for error feedback.

    Args:
        ratio: fraction of elements sent, in (0, 1]; at least one element of a non-empty tensor.
        seed: shared seed (the same on every rank).
        unbiased: scale by numel / k.
    """

    name = "randomk"
    aggregation: Aggregation = "sum"
    fixed_size = True
    per_rank_seed = False  # every rank must draw the same indices

    def __init__(self, ratio: float = 0.01, seed: int = 0, unbiased: bool = False) -> None:
        self.ratio = check_ratio("randomk", ratio)
        self.seed = check_seed("randomk", seed)
        self.unbiased = check_flag("randomk", "unbiased", unbiased)

    def init(self, tensor: torch.Tensor) -> State:
        return {"step": torch.zeros((), dtype=torch.int64)}

    def indices(self, numel: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The sorted int64 indices drawn at `step` for a tensor of `numel` elements."""
        k = num_selected(numel, self.ratio)
        generator = shared_generator(self.seed, step, numel)
        return torch.randperm(numel, generator=generator)[:k].sort().values.to(device)

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1)
        step = int(state["step"])
        indices = self.indices(flat.numel(), step, flat.device)
        values = flat[indices].to(torch.float32)
        if self.unbiased and indices.numel():
            values = values * (flat.numel() / indices.numel())
        payload = Payload([values], {"shape": tensor.shape, "indices": indices, "step": step})
        return payload, {**state, "step": state["step"] + 1}

    def decompress(self, payload: Payload) -> torch.Tensor:
        shape = payload.context["shape"]
        (values,) = payload.wire
        dense = torch.zeros(math.prod(shape), dtype=torch.float32, device=values.device)
        dense[payload.context["indices"]] = values
        return dense.view(shape)

    def payload_bytes(self, numel: int) -> int:
        """4 * k: float32 values only (the indices follow from the shared seed)."""
        return 4 * num_selected(numel, self.ratio)


@COMPRESSORS.register("threshold")
class Threshold(CompressorTraits):
    """Strom's threshold quantization: every element with |g| >= tau is sent as its index and sign.

    The receiver reconstructs each sent element as +tau or -tau (Strom, Interspeech 2015). The rest of
    the gradient, and the difference between g and +-tau for the sent elements, is what Strom keeps in
    a residual added to the next gradient: use this compressor with error feedback (`ef=true`); without
    it every element below tau is lost for good and the sent ones are clipped to tau.

    Wire: the sorted indices in index_dtype(numel), then their sign bits packed 8 per byte by
    polytrain.compress.packing (1 = negative). How many elements pass differs between ranks and
    steps, so payloads are allgathered ("gather", fixed_size False) and summed after decompression;
    the transport adds its 4-byte element count per wire tensor.

    Args:
        tau: the threshold, > 0.
    """

    name = "threshold"
    aggregation: Aggregation = "gather"
    fixed_size = False

    def __init__(self, tau: float = 0.001) -> None:
        if not is_number(tau) or not tau > 0:
            raise ValueError(f"threshold tau must be a number > 0; got {tau!r}")
        self.tau = float(tau)

    def init(self, tensor: torch.Tensor) -> State:
        return {}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        flat = tensor.reshape(-1)
        indices = torch.nonzero(flat.abs() >= self.tau).view(-1)  # ascending
        signs = pack(flat[indices] < 0, 1)
        wire = [indices.to(index_dtype(flat.numel())), signs]
        return Payload(wire, {"shape": tensor.shape, "tau": self.tau}), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        shape = payload.context["shape"]
        indices, signs = payload.wire
        negative = unpack(signs, indices.numel(), 1).bool()
        tau = torch.tensor(payload.context["tau"], dtype=torch.float32, device=signs.device)
        dense = torch.zeros(math.prod(shape), dtype=torch.float32, device=signs.device)
        dense[indices.long()] = torch.where(negative, -tau, tau)
        return dense.view(shape)

    def payload_bytes(self, numel: int) -> int:
        """The largest payload, every element sent: see `payload_bytes_for_count` for the exact size."""
        return self.payload_bytes_for_count(numel, numel)

    @staticmethod
    def payload_bytes_for_count(numel: int, count: int) -> int:
        """count * index bytes + ceil(count / 8) when `count` of `numel` elements pass the threshold."""
        index_bytes = torch.empty(0, dtype=index_dtype(numel)).element_size()
        return count * index_bytes + packed_bytes(count, 1)
