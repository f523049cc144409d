"""Builds a run's gradient compressor, handing the optimizer's momentum to compressors that own it.

Deep Gradient Compression (Lin et al., ICLR 2018) applies momentum before sparsifying ("momentum
correction"), so the optimizer must then step without momentum: the run's `momentum` moves into the
compressor (unless its `momentum` argument is given) and the optimizer becomes plain SGD.
"""

from __future__ import annotations

from polytrain.compress import COMPRESSORS, Compressor, build_compressor
from polytrain.config import ConfigError, Experiment

# Optimizers whose momentum a compressor can take over, and the momentum each hands over.
_TAKEOVER = {"momentum": True, "sgd": False}


def owns_momentum(name: str) -> bool:
    """Whether compressor `name` (or a member of the chain `a+b`) applies momentum itself."""
    return any(COMPRESSORS.get(member).owns_momentum for member in name.split("+"))


def check_momentum_takeover(name: str, args: dict, optimizer: str) -> None:
    """Raises ConfigError when compressor `name` owns momentum but `optimizer` is not sgd or momentum."""
    if owns_momentum(name) and optimizer not in _TAKEOVER:
        raise ConfigError(f"compressor {name} applies momentum itself (momentum correction) and needs "
                          f"optimizer sgd or momentum; got {optimizer}")


def build_run_compressor(exp: Experiment, rank: int) -> tuple[Compressor, str, str | None]:
    """The compressor of rank `rank`, the optimizer to build, and a notice of a momentum takeover (or None)."""
    args = dict(exp.compressor_args)
    if not owns_momentum(exp.compressor):
        return build_compressor(exp.compressor, args, rank=rank), exp.optimizer, None
    args.setdefault("momentum", exp.momentum if _TAKEOVER[exp.optimizer] else 0.0)
    notice = (f"{exp.compressor} applies momentum {args['momentum']} itself (momentum correction); "
              f"the optimizer runs as plain sgd")
    return build_compressor(exp.compressor, args, rank=rank), "sgd", notice
