"""Data augmentation drawn per sample and epoch, so it does not depend on how batches are sharded.

The random choices for an epoch are drawn for every training sample at once from (seed, epoch), then
looked up by sample index: a sample is augmented the same way whichever rank and step it lands in, so N
workers still see exactly what one worker sees, and a resumed run needs no augmentation state.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def draw_augmentation(num_samples: int, max_shift: int, flip: bool, seed: int, epoch: int) -> torch.Tensor:
    """Per-sample choices of one epoch: (num_samples, 3) int64 rows of (shift_y, shift_x, flip).

    Shifts are uniform in [-max_shift, max_shift] pixels; flip is 1 with probability 1/2 when enabled.
    """
    rng = np.random.default_rng([seed, epoch, 0xA06])  # a stream apart from the sampler's (seed, epoch)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(num_samples, 2))
    flips = rng.integers(0, 2, size=(num_samples, 1)) if flip else np.zeros((num_samples, 1), dtype=np.int64)
    return torch.from_numpy(np.concatenate([shifts, flips], axis=1))


def augment_images(x: torch.Tensor, choices: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translates each image of (N, C, H, W) by its (shift_y, shift_x), then mirrors the flagged ones.

    This is the pad-and-crop augmentation of He et al. 2016, with the border replicated rather than
    zero-filled: after normalisation zero is not the background colour, a replicated border is.
    """
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), mode="replicate")
    rows = (max_shift - choices[:, 0])[:, None] + torch.arange(height)  # (N, H) source rows
    cols = (max_shift - choices[:, 1])[:, None] + torch.arange(width)  # (N, W) source columns
    flipped = choices[:, 2].bool()
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
