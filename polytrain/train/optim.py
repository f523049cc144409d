"""Optimizers from torch.optim by name, and learning-rate / batch-size schedules."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from polytrain.config import ConfigError
from polytrain.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")


# Settings every optimizer takes from the Experiment's own fields, not from optimizer_args.
TOP_LEVEL = ("params", "lr", "weight_decay")
# torch.optim keywords that choose an implementation or the direction (a loss is always minimised), not the
# algorithm's hyper-parameters: left at torch's defaults and not offered as optimizer_args.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize")


def _register(name: str, cls: type[torch.optim.Optimizer], fixed: dict | None = None,
              defaults: dict | None = None) -> None:
    """Registers `cls` as `name`; the name sets the keywords `fixed`, and `defaults` replace torch's.

    The factory's signature is the torch constructor's without `fixed` and IMPLEMENTATION_KEYS, so
    Registry.check_arguments names the valid optimizer_args and `optimizer_defaults` reads their defaults.
    """
    fixed, defaults = fixed or {}, defaults or {}
    signature = inspect.signature(cls)
    kept = [p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()
            if p.name not in fixed and p.name not in IMPLEMENTATION_KEYS]

    def factory(params, **kwargs):
        return cls(params, **fixed, **kwargs)

    factory.__signature__ = signature.replace(parameters=kept)
    factory.__doc__ = f"torch.optim.{cls.__name__}" + (f" with {fixed}" if fixed else "")
    OPTIMIZERS.register(name)(factory)


# SGD momentum 0.9 (Sutskever et al. 2013) is polytrain's default; every other key keeps torch's default.
_register("sgd", torch.optim.SGD, fixed=dict(momentum=0.0, dampening=0.0, nesterov=False))
_register("momentum", torch.optim.SGD, defaults=dict(momentum=0.9))
_register("nesterov", torch.optim.SGD, fixed=dict(nesterov=True, dampening=0.0), defaults=dict(momentum=0.9))
_register("adagrad", torch.optim.Adagrad)
_register("rmsprop", torch.optim.RMSprop)
_register("adam", torch.optim.Adam, fixed=dict(decoupled_weight_decay=False))  # decoupled is adamw
_register("adamw", torch.optim.AdamW)


def _plain(value: Any) -> Any:
    """Tuples as lists, the form TOML, --set and result.json use (torch accepts either)."""
    return list(value) if isinstance(value, tuple) else value


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Every optimizer_args key of optimizer `name` with its default (polytrain's, else torch's)."""
    parameters = inspect.signature(OPTIMIZERS.get(name)).parameters.values()
    return {p.name: _plain(p.default) for p in parameters if p.name not in TOP_LEVEL}


def check_optimizer(name: str, args: Mapping[str, Any], lr: float, weight_decay: float) -> None:
    """Raises a one-line ValueError for an unknown key of `args` or a value torch refuses."""
    OPTIMIZERS.check_arguments(name, args, fixed=TOP_LEVEL)
    if "momentum" in args:
        momentum = args["momentum"]
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(f"optimizer_args.momentum must be a number in [0, 1), got {momentum!r}")
    try:  # torch checks its own values (betas in [0, 1), eps >= 0, nesterov needs momentum > 0, ...)
        build_optimizer(name, [torch.zeros(1, requires_grad=True)], lr, weight_decay, args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer {name} with {dict(args)}: {error}") from None


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    args: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """Builds the torch.optim optimizer registered as `name` with `args` over its defaults.

    Args:
        name: registered optimizer name.
        params: the parameters to optimise.
        lr: learning rate.
        weight_decay: L2 penalty (decoupled for adamw).
        args: the torch constructor's own keywords (momentum, betas, eps, ...); missing ones take
            `optimizer_defaults(name)`.
    """
    args = {**optimizer_defaults(name), **(args or {})}
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in args.items()}
    return OPTIMIZERS.get(name)(list(params), lr=lr, weight_decay=weight_decay, **args)


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
