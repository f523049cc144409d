"""Batch normalization with statistics over the global batch of all ranks, on any device.

torch.nn.SyncBatchNorm only runs on accelerators; this one works wherever the Communicator does, and its
traffic is counted like every other byte.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor]


class _SumAcrossRanks(torch.autograd.Function):
    """y = sum over ranks of x; its gradient is again the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce: SumAcrossRanks) -> torch.Tensor:
        ctx.reduce = reduce
        return reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.reduce(grad.contiguous()), None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode mean and variance are those of the global batch (Ioffe & Szegedy 2015).

    Each rank sums count, sum and sum of squares per channel; one allreduce makes them global. The
    gradient flows through the same sums, so N ranks compute exactly what one rank computes on the
    whole batch. Evaluation uses the running statistics, as nn.BatchNorm does.
    """

    def __init__(self, num_features: int, reduce: SumAcrossRanks, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.reduce = reduce

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input; got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]  # every axis but the channels of (N, C, ...)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
        total = _SumAcrossRanks.apply(local, self.reduce)
        n, channels = total[0], self.num_features
        mean = total[1:1 + channels] / n
        var = total[1 + channels:] / n - mean * mean  # biased, used to normalise
        self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)


def convert_sync_batchnorm(module: nn.Module, reduce: SumAcrossRanks) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d of `module` by a SyncBatchNorm sharing its parameters and buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(module.num_features, reduce, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, reduce))
    return module
