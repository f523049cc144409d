"""PowerSGD: a rank-r approximation of each gradient matrix by one step of power iteration, in two rounds.

Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization" (NeurIPS 2019), Algorithms 1 and 2. A tensor of shape (n, ...) is viewed as an n x m
matrix M (m = numel / n). With e the local error and Q an m x r matrix that is the same on every rank:

    round 1   compress:  D = M + e;  P = D Q                    send P (n x r), summed over the ranks
    round 2   refine:    P^ = orthonormalize(sum P)            (identical on every rank)
                         Q_w = D^T P^;  e <- D - P^ Q_w^T       send Q_w (m x r), summed over the ranks
    result    decompress: P^ (sum Q_w)^T = sum over ranks of P^ P^^T D_w

The error is the local one, taken before Q is summed, as in Algorithm 2 (e_w = D_w - decompress of the
worker's own compressed D_w); the summed Q warm-starts the next step's power iteration (the paper's
warm start: reusing the previous step's Q). Orthonormalization is modified Gram-Schmidt over the r
columns with epsilon added to each norm, so a zero column stays finite.

Multi-round contract (polytrain.compress.base): `rounds = 2`. The strategy calls
`payload, state = compress(tensor, state)`, sums `payload.wire` over the ranks (keeping the context),
calls `payload, state = refine(summed, state)`, sums that `wire` again and calls `decompress` on it.
`decompress` also copies the summed Q into the state returned by `refine` (the buffer travels in the
payload's context; decompress has no state argument), which is how the warm start sees the summed Q.

Tensors sent whole: 0-d and 1-d tensors, and matrices with r (n + m) * min_compression >= n m. They
send the tensor in round 1 and nothing in round 2 (wire []); decompress returns the round-1 sum.
"""

from __future__ import annotations

import math

import torch

from polytrain.compress.base import COMPRESSORS, Aggregation, CompressorTraits, Payload, State
from polytrain.compress.sparsify import check_flag, check_seed, is_number, shared_generator


def orthonormalize(matrix: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Orthonormal columns spanning those of `matrix` (n x r), by modified Gram-Schmidt.

    ORTHOGONALIZE of Vogels et al. 2019, Algorithm 1: each column is divided by its norm + epsilon (a
    guard against zero columns, not in the paper), then removed from the later columns. The loop runs
    over the r columns, not the elements.
    """
    columns = matrix.clone()
    for i in range(columns.shape[1]):
        column = columns[:, i]
        column /= torch.linalg.vector_norm(column) + epsilon
        rest = columns[:, i + 1:]
        rest -= column[:, None] * (column @ rest)[None, :]
    return columns


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(n, m): the matrix a tensor of `shape` is viewed as, first dimension by the rest."""
    if len(shape) < 2:
        return (math.prod(shape), 1)
    return (shape[0], math.prod(shape[1:]))


@COMPRESSORS.register("powersgd")
class PowerSGD(CompressorTraits):
    """Rank-r PowerSGD with error feedback and warm start (Vogels et al., NeurIPS 2019).

    State: "q" (m x r, the warm-start Q), "error" (the tensor's shape), "step" (0-d int64, which seeds a
    fresh Q each step when warm_start is off). Between compress and refine it also holds "delta", the
    compensated matrix D = M + e. Tensors sent whole have empty "q" and "error".

    Args:
        rank: r, the rank of the approximation (capped at min(n, m)).
        warm_start: start each step's power iteration from the previous summed Q; otherwise draw a
            fresh Q from (seed, step), the same on every rank.
        error_feedback: keep the local error e and add it to the next gradient (Algorithm 2).
        epsilon: added to each column norm in the orthonormalization.
        seed: seed of the initial Q, the same on every rank.
        min_compression: compress a matrix only if r (n + m) * min_compression < n m; 1 compresses
            whenever it sends fewer elements, 0 compresses every matrix.
    """

    name = "powersgd"
    aggregation: Aggregation = "sum"
    fixed_size = True
    rounds = 2
    per_rank_seed = False  # Q must be the same on every rank
    error_feedback_builtin = True  # the error is kept here; a generic wrapper would see only the sum

    def __init__(self, rank: int = 2, warm_start: bool = True, error_feedback: bool = True,
                 epsilon: float = 1e-8, seed: int = 0, min_compression: float = 1.0) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"powersgd rank must be an integer >= 1; got {rank!r}")
        if not is_number(epsilon) or epsilon < 0:
            raise ValueError(f"powersgd epsilon must be a number >= 0; got {epsilon!r}")
        if not is_number(min_compression) or min_compression < 0:
            raise ValueError(f"powersgd min_compression must be a number >= 0; got {min_compression!r}")
        self.rank = rank
        self.warm_start = check_flag("powersgd", "warm_start", warm_start)
        self.error_feedback = check_flag("powersgd", "error_feedback", error_feedback)
        self.epsilon = float(epsilon)
        self.seed = check_seed("powersgd", seed)
        self.min_compression = float(min_compression)
        self._shapes: dict[int, torch.Size] = {}  # numel -> shape of the last init, for payload_bytes

    def effective_rank(self, shape: torch.Size | tuple[int, ...]) -> int:
        """r for a tensor of `shape`: 0 if it is sent whole, else min(rank, n, m)."""
        n, m = matrix_shape(shape)
        if len(shape) < 2 or self.rank * (n + m) * self.min_compression >= n * m:
            return 0
        return min(self.rank, n, m)

    def _initial_q(self, m: int, r: int, step: int, device: torch.device) -> torch.Tensor:
        """Standard normal m x r (Vogels et al. 2019), from a generator every rank seeds alike."""
        generator = shared_generator(self.seed, step, m, r)
        return torch.randn(m, r, generator=generator).to(device)

    def init(self, tensor: torch.Tensor) -> State:
        self._shapes[tensor.numel()] = tensor.shape
        step = torch.zeros((), dtype=torch.int64)
        r = self.effective_rank(tensor.shape)
        if r == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=tensor.device)
            return {"q": empty, "error": empty.clone(), "step": step}
        _, m = matrix_shape(tensor.shape)
        error = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return {"q": self._initial_q(m, r, 0, tensor.device), "error": error, "step": step}

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        """Round 1: P = (M + e) Q, or the whole tensor when it is sent uncompressed."""
        r = self.effective_rank(tensor.shape)
        context = {"shape": tensor.shape, "round": 1, "approx_rank": r}
        if r == 0:
            return Payload([tensor.to(torch.float32).reshape(-1)], context), state
        n, m = matrix_shape(tensor.shape)
        delta = tensor.to(torch.float32).reshape(n, m)
        if self.error_feedback:
            delta = delta + state["error"].reshape(n, m)
        step = int(state["step"])
        q = state["q"] if self.warm_start else self._initial_q(m, r, step, tensor.device)
        p = delta @ q  # (n, r)
        return Payload([p.reshape(-1)], context), {**state, "delta": delta}

    def refine(self, summed: Payload, state: State) -> tuple[Payload, State]:
        """Round 2: from the summed P, the local Q = D^T P^ and the new error e = D - P^ Q^T."""
        context = dict(summed.context)
        if context.get("round") != 1:
            raise ValueError(f"powersgd refine needs a round-1 payload; got round {context.get('round')}")
        context["round"] = 2
        r = context["approx_rank"]
        if r == 0:
            context["dense"] = summed.wire[0]
            return Payload([], context), {**state, "step": state["step"] + 1}
        n, m = matrix_shape(context["shape"])
        p_hat = orthonormalize(summed.wire[0].view(n, r), self.epsilon)
        delta = state["delta"]
        q = delta.T @ p_hat  # (m, r)
        state = {key: value for key, value in state.items() if key != "delta"}
        if self.error_feedback:
            state["error"] = (delta - p_hat @ q.T).view(context["shape"])
        state["q"] = q
        state["step"] = state["step"] + 1
        context["p"] = p_hat
        context["warm_q"] = q  # decompress overwrites it with the summed Q
        return Payload([q.reshape(-1).clone()], context), state

    def decompress(self, payload: Payload) -> torch.Tensor:
        """P^ (sum Q)^T of a summed round-2 payload; copies the summed Q into the warm-start state."""
        context = payload.context
        if context.get("round") != 2:
            raise ValueError(f"powersgd decompress needs the round-2 payload that refine returns; "
                             f"got round {context.get('round')}")
        shape = context["shape"]
        if context["approx_rank"] == 0:
            return context["dense"].view(shape)
        n, m = matrix_shape(shape)
        q = payload.wire[0].view(m, context["approx_rank"])
        context["warm_q"].copy_(q)
        return (context["p"] @ q.T).view(shape)

    def payload_bytes_for_shape(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Bytes of both rounds: 4 r (n + m) for a compressed matrix, else 4 numel (round 1 only)."""
        r = self.effective_rank(shape)
        n, m = matrix_shape(shape)
        return 4 * r * (n + m) if r else 4 * n * m

    def payload_bytes(self, numel: int) -> int:
        """Bytes of both rounds for the shape of the last `init` with `numel` elements.

        A vector of that many elements (sent whole, 4 * numel) if no tensor of that size was initialized.
        """
        return self.payload_bytes_for_shape(self._shapes.get(numel, (numel,)))
