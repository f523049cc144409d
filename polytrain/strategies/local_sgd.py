"""Local SGD and DiLoCo: every replica steps on its own; the models are averaged every H steps.

- `local_sgd` (model averaging; Zinkevich et al. 2010, Stich 2019; post-local SGD's synchronous warm-up,
  Lin, Stich, Patel & Jaggi, ICLR 2020): each replica applies the run's optimizer to the gradient of its
  own shard, and every `period` H steps the replicas' parameters (and floating buffers) are replaced by
  their mean. The first `warmup_steps` steps are synchronous (gradients summed as by `allreduce`).
- `diloco` (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023):
  the run's optimizer is the inner one; every H inner steps the mean parameter change of the replicas is
  the outer gradient, anchor - mean(local), which an outer optimizer (SGD with Nesterov momentum, lr 0.7,
  momentum 0.9 in the paper) applies to the anchor, the parameters after the previous outer step; every
  replica then continues from the new anchor.

Scaling. The step schedule divides each replica's summed loss by the global batch (so that summing the
replicas' gradients gives the global mean). A local step multiplies the gradient by the number of
replicas p, which makes it its shard's mean for equal shards; then for any shard sizes the mean of the
replicas' SGD updates is the synchronous one, so local SGD with H = 1 (and any linear optimizer: SGD with
or without momentum, weight decay) equals `allreduce`, and DiLoCo with outer SGD at lr 1 without momentum
equals local SGD (both tested).

Decisions where the papers are silent:
- Evaluation and checkpoints between averages: the test accuracy is that of the replicas' mean (computed
  for the evaluation and counted as bookkeeping traffic; the replicas keep their own models), and a
  checkpoint holds every replica's model and optimizer state, so it resumes exactly but only at the same
  world size. Each replica keeps its own inner optimizer state (the papers do not average it).
- After the last step the replicas are averaged once more (an outer step for DiLoCo) unless they just
  were, so the run ends with one model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.allreduce import AllReduce, AllReduceArgs
from polytrain.strategies.averaging import average_into, consensus_distance, local_gradients, replaced_by_mean


def _check_whole(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low \
        and (high is None or value < high)
    if not ok:
        bounds = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


@dataclass(frozen=True)
class LocalSGDArgs:
    """Arguments of `local_sgd`.

    Attributes:
        period: H, local steps between two averages of the replicas' models.
        warmup_steps: synchronous steps (gradients allreduced) before local steps begin (post-local SGD).
        algorithm: the allreduce algorithm of the averages (and of the warm-up's gradient sums).
    """

    period: int = 4
    warmup_steps: int = 0
    algorithm: str = "native"

    def __post_init__(self) -> None:
        _check_whole("period", self.period, 1)
        _check_whole("warmup_steps", self.warmup_steps, 0)
        ALLREDUCE_ALGORITHMS.get(self.algorithm)


@dataclass(frozen=True)
class DiLoCoArgs:
    """Arguments of `diloco`.

    Attributes:
        period: H, inner steps between two outer steps.
        outer_lr: learning rate of the outer SGD (0.7 in Douillard et al. 2023).
        outer_momentum: momentum of the outer SGD (0.9 in the paper; 0: none).
        nesterov: Nesterov momentum for the outer SGD (the paper's choice).
        warmup_steps: synchronous steps before the inner steps begin.
        algorithm: the allreduce algorithm of the averages.
    """

    period: int = 16
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    warmup_steps: int = 0
    algorithm: str = "native"

    def __post_init__(self) -> None:
        _check_whole("period", self.period, 1)
        _check_whole("warmup_steps", self.warmup_steps, 0)
        _check_number("outer_lr", self.outer_lr, 0.0)
        _check_number("outer_momentum", self.outer_momentum, 0.0, 1.0)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov needs outer_momentum > 0 (as torch.optim.SGD); set nesterov=false")
        ALLREDUCE_ALGORITHMS.get(self.algorithm)



class OuterStep:
    """DiLoCo's outer optimizer over the anchor (the parameters after the previous outer step)."""

    def __init__(self, model: nn.Module, args: "DiLoCoArgs") -> None:
        self.anchor = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
        self.optimizer = torch.optim.SGD(self.anchor, lr=args.outer_lr, momentum=args.outer_momentum,
                                         nesterov=args.nesterov)

    def follow(self, model: nn.Module) -> None:
        """Makes the anchor the model's parameters (during synchronous warm-up steps)."""
        with torch.no_grad():
            for anchor, param in zip(self.anchor, model.parameters()):
                anchor.copy_(param)

    def apply(self, model: nn.Module) -> None:
        """anchor <- outer SGD on the gradient anchor - model (the replicas' mean); model <- anchor."""
        with torch.no_grad():
            for anchor, param in zip(self.anchor, model.parameters()):
                anchor.grad = anchor.detach() - param
            self.optimizer.step()
            for anchor, param in zip(self.anchor, model.parameters()):
                param.copy_(anchor)

    def state_dict(self) -> dict:
        return {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for anchor, saved in zip(self.anchor, state["anchor"]):
                anchor.copy_(saved)
        self.optimizer.load_state_dict(state["outer"])


class ModelAveraging(PolicyBase):
    """Local steps and an average of the replicas every `period` steps; with DiLoCoArgs, an outer step too."""

    Args: type = LocalSGDArgs

    def __init__(self, mesh: Mesh, args: "LocalSGDArgs | DiLoCoArgs", compressor: None = None) -> None:
        if mesh.dp is None:
            raise ValueError("model averaging needs at least 2 data-parallel replicas (--workers 2 or more)")
        self.comm = mesh.dp
        self.bookkeeping = mesh.bookkeeping
        self.args = args
        self.warmup = AllReduce(mesh, AllReduceArgs(algorithm=args.algorithm, overlap=False)) \
            if args.warmup_steps else None
        self.since_average = 0
        self.averaged: list[torch.Tensor] = []
        self.outer: OuterStep | None = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        if self.warmup is not None:
            model = self.warmup.prepare(model, optimizer)
        self.averaged = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        if isinstance(self.args, DiLoCoArgs):
            self.outer = OuterStep(model, self.args)
        return model

    def set_batch_size(self, global_batch: int) -> None:
        """No batch-dependent plan."""

    def before_backward(self, last_microbatch: bool) -> None:
        """Nothing to launch during backward."""

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        if global_step < self.args.warmup_steps:
            self.warmup.reduce_gradients()
            update()
            if self.outer is not None:
                self.outer.follow(model)
            return
        local_gradients(model, self.comm.world_size)
        update()
        self.since_average += 1
        if self.since_average == self.args.period:
            self.synchronize(model)

    def synchronize(self, model: nn.Module) -> None:
        """Makes every replica's model the mean of the replicas' models (then DiLoCo's outer step)."""
        average_into(self.averaged, self.comm, self.args.algorithm)
        if self.outer is not None:
            self.outer.apply(model)
        self.since_average = 0

    def finish(self, model: nn.Module) -> None:
        if self.since_average:
            self.synchronize(model)

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The replicas' mean model, computed as bookkeeping; each replica's own model is put back after.

        (DiLoCo evaluates the mean of the replicas, not the outer step it would take.)
        """
        if self.since_average == 0:
            yield model
            return
        with replaced_by_mean(self.averaged, self.bookkeeping):
            yield model

    def epoch_metrics(self, model: nn.Module) -> dict:
        return {"consensus_distance": consensus_distance(list(model.parameters()), self.bookkeeping)}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Between averages every replica's model and optimizer state differ, so both are this rank's part;
        DiLoCo's anchor and outer optimizer are the same on every replica."""
        state: dict = {"since_average": self.since_average}
        if self.since_average:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
        if self.outer is not None:
            state.update(self.outer.state_dict())
        return state

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.since_average = int(state.get("since_average", 0))
        if "model" in state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if self.outer is not None:
            if "anchor" not in state:
                raise ValueError("the checkpoint holds no DiLoCo anchor; it was trained with another strategy")
            self.outer.load_state_dict(state)

    def report(self) -> dict:
        return dataclasses.asdict(self.args)

    def close(self) -> None:
        if self.warmup is not None:
            self.warmup.close()


@STRATEGIES.register("local_sgd")
class LocalSGD(ModelAveraging):
    """Local SGD: every replica steps on its own shard; the models are averaged every `period` steps."""

    Args = LocalSGDArgs


@STRATEGIES.register("diloco")
class DiLoCo(ModelAveraging):
    """DiLoCo: every `period` inner steps, an outer optimizer steps on the replicas' mean change."""

    Args = DiLoCoArgs
