"""The run's compression plan: this rank's compressor and the optimizer that steps after it.

Error feedback (ef=true, or a compressor that keeps its own residual: onebit, efsignsgd, dgc) delays what
the compressor drops and releases it in bursts; a momentum optimizer after the compressor amplifies each
burst by up to 1 / (1 - m). Lin et al. (ICLR 2018, sec. 3.2) therefore apply the momentum before
compressing ("momentum correction"). Wherever error feedback meets a momentum optimizer (`momentum`,
`nesterov`), the momentum moves in front of the compressor -- polytrain.compress.momentum's
MomentumCorrection, or DGC's own `momentum` argument (unless given) -- and the optimizer becomes SGD
without momentum, with the same learning rate and weight decay. The plan's notice says so.

Left as they are: runs without error feedback; adaptive optimizers (adagrad, rmsprop, adam, adamw), whose
moments are no momentum buffer that could move before the compressor, so they run uncorrected; and
PowerSGD, whose two rounds keep the optimizer's momentum after the compressor as in Vogels et al.
(NeurIPS 2019, Algorithm 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.compress import COMPRESSORS, Compressor, build_compressor
from polytrain.compress.momentum import MomentumCorrection
from polytrain.config import ConfigError, Experiment
from polytrain.train.optim import optimizer_defaults

# Optimizers with SGD's heavy-ball momentum, which momentum correction can move in front of a compressor.
MOMENTUM_OPTIMIZERS = ("momentum", "nesterov")
# Optimizers whose momentum DGC can take over (its correction is heavy-ball, not Nesterov's).
_DGC_OPTIMIZERS = ("sgd", "momentum")
PLAIN = "sgd"


@dataclass(frozen=True)
class CompressionPlan:
    """What a rank compresses with and the optimizer that steps after the compressor.

    Attributes:
        compressor: this rank's compressor.
        optimizer: registered name of the optimizer to build.
        optimizer_args: its torch keywords (polytrain.train.optim.build_optimizer).
        notice: one line saying where the run's momentum went, or None when the run is as configured.
    """

    compressor: Compressor
    optimizer: str
    optimizer_args: dict
    notice: str | None = None


def owns_momentum(name: str) -> bool:
    """Whether compressor `name` (or a member of the chain `a+b`) applies momentum itself."""
    return any(COMPRESSORS.get(member).owns_momentum for member in name.split("+"))


def has_error_feedback(name: str, args: dict) -> bool:
    """Whether compressor `name` with `args` feeds its error back: ef=true, or a single-round member with a
    residual of its own (onebit, efsignsgd, dgc; not PowerSGD, see the module docstring)."""
    members = [COMPRESSORS.get(member) for member in name.split("+")]
    return args.get("ef") is True or any(m.error_feedback_builtin and m.rounds == 1 for m in members)


def _optimizer_args(exp: Experiment) -> dict:
    return {**optimizer_defaults(exp.optimizer), **exp.optimizer_args}


def _heavy_ball(exp: Experiment) -> tuple[float, bool] | None:
    """The run's SGD momentum and whether it is Nesterov's, or None for an optimizer without momentum."""
    if exp.optimizer not in MOMENTUM_OPTIMIZERS:
        return None
    args = _optimizer_args(exp)
    if args["momentum"] == 0:
        return None
    return args["momentum"], exp.optimizer == "nesterov" or args.get("nesterov", False)


def check_compression_plan(exp: Experiment) -> None:
    """Raises ConfigError for a compressor and optimizer that cannot be combined, before any worker starts."""
    args = _optimizer_args(exp)
    if owns_momentum(exp.compressor) and (exp.optimizer not in _DGC_OPTIMIZERS or args.get("nesterov")):
        raise ConfigError(f"compressor {exp.compressor} applies momentum itself (momentum correction) and needs "
                          f"optimizer sgd or momentum without nesterov; got {exp.optimizer}")
    if (_heavy_ball(exp) is not None and has_error_feedback(exp.compressor, exp.compressor_args)
            and args.get("dampening", 0) != 0):
        raise ConfigError(f"momentum correction (error feedback with optimizer {exp.optimizer}) needs "
                          f"dampening 0; got optimizer_args.dampening={args['dampening']}")


def plan_compression(exp: Experiment, rank: int) -> CompressionPlan:
    """The compression plan of rank `rank` for a resolved `exp` (see the module docstring)."""
    args = dict(exp.compressor_args)
    heavy = _heavy_ball(exp)
    plain_args = optimizer_defaults(PLAIN)
    if owns_momentum(exp.compressor):
        args.setdefault("momentum", heavy[0] if heavy else 0.0)
        notice = (f"{exp.compressor} applies momentum {args['momentum']} itself (momentum correction); "
                  f"the optimizer runs as plain sgd")
        return CompressionPlan(build_compressor(exp.compressor, args, rank=rank), PLAIN, plain_args, notice)
    compressor = build_compressor(exp.compressor, args, rank=rank)
    if heavy is None or not has_error_feedback(exp.compressor, args):
        return CompressionPlan(compressor, exp.optimizer, dict(exp.optimizer_args))
    momentum, nesterov = heavy
    notice = (f"error feedback meets optimizer {exp.optimizer} (momentum {momentum}): momentum correction applies "
              f"the momentum before {compressor.name} (Lin et al. 2018); the optimizer runs as plain sgd with the "
              f"same lr and weight decay")
    return CompressionPlan(MomentumCorrection(compressor, momentum, nesterov), PLAIN, plain_args, notice)


def _registered_optimizer(optimizer: torch.optim.Optimizer) -> tuple[str | None, dict]:
    """The registered optimizer a torch optimizer amounts to, and its momentum keywords (None: another kind,
    whose state is no heavy-ball momentum)."""
    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.SGD:
        if group["momentum"] == 0:
            return PLAIN, {}
        if group["nesterov"]:
            return "nesterov", {"momentum": group["momentum"]}
        return "momentum", {"momentum": group["momentum"], "dampening": group["dampening"]}
    return None, {}


def compress_for(compressor: str, compressor_args: dict, optimizer: torch.optim.Optimizer,
                 rank: int) -> tuple[Compressor, str | None]:
    """This rank's compressor for a run stepping `optimizer`, and the plan's notice (module docstring).

    Where the plan moves momentum in front of the compressor, the optimizer's param groups lose theirs
    (momentum 0: torch's SGD then steps as plain SGD with the same lr and weight decay).
    """
    name, args = _registered_optimizer(optimizer)
    if name is None:
        if owns_momentum(compressor):
            raise ConfigError(f"compressor {compressor} applies momentum itself (momentum correction) and needs "
                              f"torch.optim.SGD; got {type(optimizer).__name__}")
        return build_compressor(compressor, dict(compressor_args), rank=rank), None
    described = Experiment(compressor=compressor, compressor_args=dict(compressor_args), optimizer=name,
                           optimizer_args=args)
    check_compression_plan(described)
    plan = plan_compression(described, rank)
    if plan.optimizer == PLAIN and name != PLAIN:
        for group in optimizer.param_groups:
            group.update(momentum=0.0, dampening=0.0, nesterov=False)
    return plan.compressor, plan.notice
