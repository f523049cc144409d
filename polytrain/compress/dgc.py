"""Deep Gradient Compression: top-k of a locally accumulated momentum, with the paper's corrections.

Lin, Han, Mao, Wang & Dally, "Deep Gradient Compression: Reducing the Communication Bandwidth for
Distributed Training" (ICLR 2018), section 3. Per tensor and step, with g the local gradient, m the
momentum, u the momentum buffer and v the accumulated velocity:

    g <- g * min(1, c / ||g||)        local gradient clipping, c = clip / sqrt(world_size)
    u <- m u + g                      momentum correction
    v <- v + u                        local accumulation: what was not sent stays in v
    send the k largest |v| as [indices, values]; the sparse allreduce sums them over the ranks
    u, v <- 0 where sent              momentum factor masking

The momentum is applied here, so the optimizer must run without momentum (`owns_momentum`; the trainer
turns the optimizer's momentum off) and the dropped part is kept in v, so no error feedback wrapper
goes around it (`error_feedback_builtin`).

With every element sent (ratio=1) and no masking, the sent tensor is u, torch.optim.SGD's momentum
buffer (dampening 0), so dgc + SGD without momentum is SGD with momentum m. With masking, u is zeroed
wherever it is sent, so at ratio=1 the momentum disappears and the update is plain SGD: masking stops
the momentum of the elements that were sent, which at high sparsity are the few that were due.

Decisions where the paper leaves room:

- The threshold is the exact top-k (torch.topk); the paper samples 0.1%-1% of v to estimate it.
- Clipping uses this tensor's norm (a compressor sees one tensor at a time); the paper clips the
  gradient of the whole model before accumulation and scales the threshold by N^(-1/2) for N workers,
  which `world_size` provides.
- Warm-up training: the paper raises the sparsity exponentially over the first four epochs (density
  25%, 6.25%, 1.5625%, 0.4%, then 0.1%: a factor 4 per epoch). Here the density falls geometrically
  per step,
      density(t) = d0 * (ratio / d0) ** (t / warmup_steps)  for t < warmup_steps, d0 = max(0.25, ratio),
  and is `ratio` from then on; warmup_steps = four epochs of steps gives the paper's schedule, smoothed.
"""

from __future__ import annotations

import math

import torch

from polytrain.compress.base import COMPRESSORS, Aggregation, CompressorTraits, Payload, State, index_dtype
from polytrain.compress.sparsify import (check_flag, check_ratio, is_number, num_selected, sparse_payload,
                                         sparse_to_dense)

WARMUP_START_DENSITY = 0.25  # Lin et al. 2018, warm-up training: 75% sparsity in the first epoch


@COMPRESSORS.register("dgc")
class DeepGradientCompression(CompressorTraits):
    """Deep Gradient Compression (Lin et al., ICLR 2018); see the module docstring for the algorithm.

    State: "u" (momentum buffer) and "v" (accumulated velocity), both float32 of the tensor's shape,
    and "step" (0-d int64), which sets the warm-up density.

    Args:
        ratio: final density (fraction of elements sent), in (0, 1]; the paper uses 0.001.
        momentum: m of the momentum correction, in [0, 1); 0 gives plain accumulation.
        clip: max norm of each tensor's gradient over all workers, or None for no clipping; each worker
            clips to clip / sqrt(world_size) (Lin et al. 2018, local gradient clipping).
        world_size: number of workers N, for the clipping threshold.
        warmup_steps: steps over which the density falls from 0.25 to `ratio`; 0 for none.
        momentum_masking: zero u where v is sent (momentum factor masking); False keeps the plain
            momentum correction.
    """

    name = "dgc"
    aggregation: Aggregation = "sparse"
    owns_momentum = True  # the optimizer must run without momentum
    error_feedback_builtin = True  # v keeps what was not sent

    def __init__(self, ratio: float = 0.001, momentum: float = 0.9, clip: float | None = None,
                 world_size: int = 1, warmup_steps: int = 0, momentum_masking: bool = True) -> None:
        self.ratio = check_ratio("dgc", ratio)
        if not is_number(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"dgc momentum must be a number in [0, 1); got {momentum!r}")
        if clip is not None and (not is_number(clip) or not clip > 0):
            raise ValueError(f"dgc clip must be a number > 0 or none; got {clip!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"dgc world_size must be an integer >= 1; got {world_size!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"dgc warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        self.momentum = float(momentum)
        self.clip = None if clip is None else float(clip)
        self.world_size = world_size
        self.warmup_steps = warmup_steps
        self.momentum_masking = check_flag("dgc", "momentum_masking", momentum_masking)
        # The size changes during warm-up (the same on every rank at the same step).
        self.fixed_size = warmup_steps == 0

    def density(self, step: int) -> float:
        """The fraction of elements sent at `step` (the warm-up schedule in the module docstring)."""
        if step >= self.warmup_steps:
            return self.ratio
        start = max(WARMUP_START_DENSITY, self.ratio)
        return start * (self.ratio / start) ** (step / self.warmup_steps)

    def init(self, tensor: torch.Tensor) -> State:
        zeros = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return {"u": zeros, "v": zeros.clone(), "step": torch.zeros((), dtype=torch.int64)}

    def _clipped(self, gradient: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return gradient
        max_norm = self.clip / math.sqrt(self.world_size)
        norm = torch.linalg.vector_norm(gradient)
        return gradient * torch.clamp(max_norm / (norm + 1e-12), max=1.0)  # 1e-12: a zero gradient stays 0

    def compress(self, tensor: torch.Tensor, state: State) -> tuple[Payload, State]:
        gradient = self._clipped(tensor.to(torch.float32).reshape(-1))
        u = self.momentum * state["u"].reshape(-1) + gradient  # momentum correction: accumulate u, not g
        v = state["v"].reshape(-1) + u
        step = int(state["step"])
        k = num_selected(v.numel(), self.density(step))
        indices = torch.topk(v.abs(), k, sorted=False).indices
        payload = sparse_payload(v, indices, tensor.shape)
        v = v.index_fill(0, indices, 0.0)
        if self.momentum_masking:
            u = u.index_fill(0, indices, 0.0)
        new_state = {"u": u.view(tensor.shape), "v": v.view(tensor.shape), "step": state["step"] + 1}
        return payload, new_state

    def decompress(self, payload: Payload) -> torch.Tensor:
        return sparse_to_dense(payload)

    def payload_bytes(self, numel: int) -> int:
        """k * (index bytes + 4) at the final density `ratio` (after warm-up); see `payload_bytes_at`."""
        return self.payload_bytes_at(numel, self.warmup_steps)

    def payload_bytes_at(self, numel: int, step: int) -> int:
        """k * (index bytes + 4) with k = num_selected(numel, density(step)), the size at `step`."""
        index_bytes = torch.empty(0, dtype=index_dtype(numel)).element_size()
        return num_selected(numel, self.density(step)) * (index_bytes + 4)
