"""The rank-sharding batch sampler: every sample used exactly once per epoch, for any world size."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields one rank's share of every global batch of an epoch.

    Each epoch draws one permutation of the training samples from (seed, epoch), identical on all ranks,
    cuts it into global batches of `global_batch_size` (the last one smaller unless `drop_last`), and
    splits every global batch into `world_size` contiguous shards whose sizes differ by at most one. The
    union of the shards of step t over all ranks is exactly the batch a single worker sees at step t, so
    N workers can reproduce one worker; every sample is used exactly once per epoch.

    The sampler is stateless apart from its settings: the position in training is (epoch, step), which
    is what a checkpoint stores. As a torch `Sampler` (`DataLoader(dataset, batch_sampler=sampler)`) it
    yields the index lists of the epoch and step set by `set_epoch`, like DistributedSampler.

    Args:
        num_samples: size of the training split.
        global_batch_size: samples per step over all ranks.
        world_size: number of ranks sharing each global batch.
        rank: this rank, in [0, world_size).
        seed: seed of the per-epoch permutations.
        shuffle: draw a permutation each epoch (else the natural order).
        drop_last: drop the last, smaller global batch.
    """

    def __init__(self, num_samples: int, global_batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global batch must be at least 1, got {global_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if drop_last and global_batch_size > num_samples:
            raise ValueError(f"global batch {global_batch_size} exceeds the {num_samples} samples; "
                             "drop_last would leave no step")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.current_epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch (and the step to start at, for resuming) that iterating the sampler yields."""
        self.current_epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.epoch(self.current_epoch, self.start_step):
            yield shard.tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def steps_per_epoch(self) -> int:
        """Number of global batches in one epoch."""
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch`, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        rng = np.random.default_rng([self.seed, epoch])  # independent stream per (seed, epoch)
        return torch.from_numpy(rng.permutation(self.num_samples))

    def global_batch(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """The indices of global batch `step` of an epoch whose sample order is `order`."""
        start = step * self.global_batch_size
        return order[start:start + self.global_batch_size]

    def global_batch_len(self, step: int) -> int:
        """Number of samples in global batch `step` over all ranks."""
        return min(self.global_batch_size, self.num_samples - step * self.global_batch_size)

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of `global_batch`; sizes over ranks differ by at most one."""
        return torch.tensor_split(global_batch, self.world_size)[self.rank]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Yields this rank's indices for each step of `epoch`, starting at `start_step` (for resuming)."""
        order = self.permutation(epoch)
        for step in range(start_step, self.steps_per_epoch()):
            yield self.shard(self.global_batch(order, step))
