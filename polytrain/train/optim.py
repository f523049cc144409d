"""Optimizers from torch.optim by name, and learning-rate / batch-size schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from polytrain.config import ConfigError
from polytrain.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Builds the torch.optim optimizer registered as `name`."""
    return OPTIMIZERS.get(name)(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(params, lr, momentum, weight_decay):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("momentum")
def _momentum(params, lr, momentum, weight_decay):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("nesterov")
def _nesterov(params, lr, momentum, weight_decay):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


@OPTIMIZERS.register("adagrad")
def _adagrad(params, lr, momentum, weight_decay):
    return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params, lr, momentum, weight_decay):
    # `momentum` is RMSprop's smoothing constant alpha here, as in Caffe/torch naming it would clash.
    return torch.optim.RMSprop(params, lr=lr, alpha=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, lr, momentum, weight_decay):
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, lr, momentum, weight_decay):
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


@dataclass(frozen=True)
class Schedule:
    """Learning rate and global batch size as pure functions of training progress.

    Progress is measured in epochs (`epoch + step / steps_per_epoch`), so the schedule needs no state of
    its own: a checkpoint's (epoch, step) restores it exactly, and it holds when the batch size changes
    the number of steps per epoch.

    Attributes:
        peak_lr: learning rate after the linear scaling rule, before decay.
        warmup_start_lr: learning rate the linear warm-up starts from.
        warmup_epochs: length of the warm-up.
        decay: multiplier of `peak_lr` as a function of progress in epochs.
        batch_growth: multiplier of the base global batch as a function of the epoch.
        base_batch_size: global batch at epoch 0.
    """

    peak_lr: float
    warmup_start_lr: float
    warmup_epochs: float
    decay: Callable[[float], float]
    batch_growth: Callable[[int], int]
    base_batch_size: int

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Learning rate for step `step` of `epoch`."""
        start = epoch + step / steps_per_epoch
        lr = self.peak_lr * self.decay(start)
        end = epoch + (step + 1) / steps_per_epoch  # warm-up reaches the peak at the end of its last step
        if end < self.warmup_epochs:
            ramp = self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * end / self.warmup_epochs
            lr = min(lr, ramp)
        return lr

    def batch_size_at(self, epoch: int) -> int:
        """Global batch size during `epoch`."""
        return self.base_batch_size * self.batch_growth(epoch)


def _milestones(milestones: list[int] | None, epochs: int) -> list[int]:
    milestones = [epochs // 2, (3 * epochs) // 4] if milestones is None else milestones
    if not all(isinstance(m, int) and 0 < m for m in milestones):
        raise ConfigError(f"schedule milestones {milestones!r}: expected positive epoch numbers")
    return sorted(milestones)


def _passed(milestones: list[int], progress: float) -> int:
    """Number of milestones reached; they take effect at epoch boundaries."""
    return sum(1 for m in milestones if math.floor(progress + 1e-9) >= m)


def _no_growth(epoch: int) -> int:
    return 1


@SCHEDULES.register("constant")
def _constant(epochs: int):
    return (lambda progress: 1.0), _no_growth


@SCHEDULES.register("step")
def _step(epochs: int, milestones: list[int] | None = None, gamma: float = 0.1):
    milestones = _milestones(milestones, epochs)
    return (lambda progress: gamma ** _passed(milestones, progress)), _no_growth


@SCHEDULES.register("poly")
def _poly(epochs: int, power: float = 0.5):
    # FireCaffe / Iandola thesis sec. 3.5: lr = lr0 * (1 - iter / max_iter) ** power, power 0.5.
    return (lambda progress: max(0.0, 1.0 - progress / epochs) ** power), _no_growth


@SCHEDULES.register("cosine")
def _cosine(epochs: int):
    # Loshchilov & Hutter 2017 (SGDR) without restarts, annealing to zero at the last epoch.
    return (lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, epochs) / epochs))), _no_growth


@SCHEDULES.register("batchgrow")
def _batch_growth(epochs: int, milestones: list[int] | None = None, factor: int = 2,
                  max_growth: int | None = None):
    """Smith et al. 2018, "Don't decay the learning rate, increase the batch size".

    Where the step schedule would divide the learning rate by `factor`, the batch grows by `factor`
    instead, up to `max_growth` times the base batch; later milestones decay the learning rate.
    """
    milestones = _milestones(milestones, epochs)
    max_growth = factor ** len(milestones) if max_growth is None else max_growth
    if factor < 2 or max_growth < 1:
        raise ConfigError(f"batchgrow factor {factor} must be >= 2 and max_growth {max_growth} >= 1")
    num_growths = int(math.floor(math.log(max_growth, factor) + 1e-9))

    def growth(epoch: int) -> int:
        return factor ** min(_passed(milestones, epoch), num_growths)

    def decay(progress: float) -> float:
        return factor ** -max(0, _passed(milestones, progress) - num_growths)

    return decay, growth


def _schedule_parts(name: str, epochs: int, args: dict):
    SCHEDULES.check_arguments(name, args, fixed=("epochs",))
    return SCHEDULES.get(name)(epochs, **args)


def build_schedule(name: str, args: dict, *, lr: float, epochs: int, batch_size: int, warmup_epochs: float,
                   lr_reference_batch: int | None) -> Schedule:
    """Builds the schedule `name`, applying the linear scaling rule when `lr_reference_batch` is set.

    With the rule (Goyal et al. 2017), `lr` belongs to `lr_reference_batch` samples and the peak becomes
    lr * batch_size / lr_reference_batch; the warm-up then ramps from `lr` to that peak, as in the paper.
    Without it, the warm-up ramps from 0.
    """
    decay, growth = _schedule_parts(name, epochs, args)
    scaled = lr * batch_size / lr_reference_batch if lr_reference_batch else lr
    return Schedule(peak_lr=scaled, warmup_start_lr=lr if lr_reference_batch else 0.0,
                    warmup_epochs=warmup_epochs, decay=decay, batch_growth=growth, base_batch_size=batch_size)
