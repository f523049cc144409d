"""Update policies: how replicas stay consistent (the third axis of a run, docs/architecture.md).

A run is a mesh (who is who, polytrain.comm.mesh) x a step schedule (how one replica computes a step,
polytrain.schedules) x an update policy (how the replicas' updates are made consistent). The policy owns
the update: it reduces gradients (allreduce algorithms, compression, sufficient factors), applies the
update (by default the run's optimizer step, handed to it as `update`), and may act after it (model
averaging every H steps, an outer optimizer). The trainer's step is written once:

    output = schedule.run(model, x, y, microbatches, context)   # policy.before_backward hooks in
    policy.step(model, update, global_step)                     # reduce, update(), after

Policies are registered by name (`--strategy NAME:k=v,...`); each declares its arguments as a frozen
dataclass `Args` that validates itself, so a bad argument fails before any worker starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from torch import nn

from polytrain.aggregators import Combination
from polytrain.comm.mesh import Mesh
from polytrain.compress import Compressor
from polytrain.registry import Registry

STRATEGIES: Registry = Registry("strategy")

Update = Callable[[], None]


class UpdatePolicy(Protocol):
    """The contract of a registered update policy (see the module docstring).

    Class attributes:
        Args: frozen dataclass of the policy's arguments (validated in __post_init__).
        parallel: runs with more than one replica.
        compresses: takes a gradient compressor (--compressor).
        splits_model: splits the model over the dp ranks itself (krizhevsky): no tp or pp axis beside it and
            no --grad-clip (no rank sees the whole gradient).

    An `Args` may define `check_replicas(p)`, raising ValueError for arguments that do not fit p
    data-parallel replicas; it runs with the rest of the validation, before any worker starts. So does
    `check_model(model, p)`, raising ValueError for a model the policy cannot train on p replicas (the
    launching process builds the model once for it). An `Args` with a `servers` field asks for that many
    server ranks beside the workers (`server_ranks`): on them the policy is built too, trains on no data, and
    serves the workers inside `settle` (polytrain.strategies.ps).
    """

    Args: type
    parallel: bool
    compresses: bool
    splits_model: bool

    def __init__(self, mesh: Mesh, args: Any, compressor: Compressor | None = None) -> None: ...

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The model as this policy trains it (hooks registered, layers converted); `optimizer` is the
        run's, over its parameters."""

    def set_batch_size(self, global_batch: int) -> None:
        """Called before each epoch with its global batch."""

    def before_backward(self, last_microbatch: bool) -> None:
        """Called by the step schedule before every backward."""

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        """Completes step `global_step` (0-based) after the schedule's backward passes: reduce, update, after."""

    def behind(self, global_step: int) -> bool:
        """Whether this replica skips step `global_step` (its batch unread by the model), because the others
        already applied it without this replica (backup workers)."""

    def settle(self, model: nn.Module, update: Update, global_step: int) -> None:
        """At a synchronization point (an epoch's end, a checkpoint), after `global_step` steps: complete
        what is in flight (collective, on every rank)."""

    def finish(self, model: nn.Module) -> None:
        """After the last step: leave every replica with the run's final model."""

    def evaluation_model(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The model to evaluate (the replicas' consensus), for the duration of the context."""

    def epoch_metrics(self, model: nn.Module) -> dict:
        """Numbers for the epoch's row of metrics.jsonl, taken after its last step (collective)."""

    def report(self) -> dict:
        """What result.json's `comm` section says about this policy beyond the counts."""

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's policy state for a checkpoint (tensors, numbers, strings, lists, dicts)."""

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restores what `state_dict` returned on this rank."""

    def close(self) -> None:
        """Releases threads and hooks."""


class PolicyBase:
    """Defaults of the optional parts of the UpdatePolicy contract (one level of inheritance, no more)."""

    parallel = True
    compresses = False
    aggregates = False  # combines the replicas' whole gradients with a Combination (--aggregator)
    combination: Combination | None = None
    splits_model = False

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        return model

    def set_batch_size(self, global_batch: int) -> None:
        """No batch-dependent plan."""

    def before_backward(self, last_microbatch: bool) -> None:
        """Nothing to launch during backward."""

    def settle(self, model: nn.Module, update: Update, global_step: int) -> None:
        """Nothing is in flight between steps."""

    def behind(self, global_step: int) -> bool:
        """Every step is this replica's to compute."""
        return False

    def finish(self, model: nn.Module) -> None:
        """The replicas already hold the final model."""

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model

    def epoch_metrics(self, model: nn.Module) -> dict:
        return {}

    def report(self) -> dict:
        return {}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Nothing to release."""


class RankOptimizerState:
    """A mixin for policies whose ranks each step an optimizer the checkpoint's model does not restore
    (a model split over the ranks, or shared by them, and saved once): each rank's optimizer state is saved
    with the rank's policy state. Set `name`, the strategy's, for the messages."""

    name = ""

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return {"optimizer": optimizer.state_dict()}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if "optimizer" not in state:
            raise ValueError(f"the checkpoint holds no {self.name} optimizer state for this rank")
        optimizer.load_state_dict(state["optimizer"])


def policy_args(name: str, args: Mapping[str, Any]):
    """The validated `Args` of policy `name` from user arguments (ValueError naming the valid keys)."""
    args_class = STRATEGIES.get(name).Args
    valid = [f.name for f in dataclasses.fields(args_class)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"strategy {name} takes no argument '{unknown[0]}'; valid: {', '.join(valid) or 'none'}")
    return args_class(**args)


def server_ranks(name: str, args: Mapping[str, Any]) -> int:
    """The server ranks policy `name` runs beside its workers (its Args' `servers`; 0 for most)."""
    return getattr(policy_args(name, args), "servers", 0)


def build_policy(name: str, mesh: Mesh, args: Mapping[str, Any], compressor: Compressor | None = None,
                 combination: Combination | None = None) -> UpdatePolicy:
    """The update policy `name` of this rank; `compressor` only for policies that compress, `combination`
    (a robust aggregator of the replicas' whole gradients) only for those that aggregate."""
    factory = STRATEGIES.get(name)
    if compressor is not None and not factory.compresses:
        raise ValueError(f"strategy {name} takes no gradient compressor")
    if combination is not None and not factory.aggregates:
        raise ValueError(f"strategy {name} does not gather the replicas' gradients; --aggregator needs allreduce or ps")
    policy = factory(mesh, policy_args(name, args), compressor)
    policy.combination = combination  # read by prepare and step
    return policy


@dataclasses.dataclass(frozen=True)
class NoArgs:
    """A policy without arguments."""


@STRATEGIES.register("local")
class Local(PolicyBase):
    """One worker, no communication: the single-worker baseline every parallel strategy is measured against."""

    Args = NoArgs
    parallel = False

    def __init__(self, mesh: Mesh, args: NoArgs, compressor: None = None) -> None:
        if mesh.dp_size > 1:
            raise ValueError(f"strategy local runs one replica; got {mesh.dp_size} data-parallel replicas")

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        update()


# Registers the parallel policies.
from polytrain.strategies import allreduce, ddp, easgd, gossip, hogwild, krizhevsky, local_sgd, ps  # noqa: E402,F401

__all__ = ["STRATEGIES", "UpdatePolicy", "PolicyBase", "Update", "policy_args", "server_ranks", "build_policy",
           "Local"]
