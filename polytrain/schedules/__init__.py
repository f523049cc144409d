"""Step schedules: how one replica computes the forward and backward passes of one step.

A schedule is data: `actions(num_microbatches, stage)` lists what a rank does during a step, in order
(forward of microbatch i on stage s, its backward, and, for the pipeline schedules to come, sends and
receives of activations and their gradients). The runtime executes that list with `run_actions`, and the
performance model can simulate the same list. The per-microbatch forward and backward of a module are
written once, in `run_actions`.

`accumulate` is the schedule of a whole model on every rank: forward and backward of each microbatch in
turn, gradients accumulating (today's microbatching; one microbatch is the plain step). The pipeline
schedules `gpipe`, `1f1b` and `interleaved` (schedules/pipeline.py) run a model cut into stages over the pp
axis; `pipedream` (PipeDream-2BW, schedules/pipedream.py) pipelines across steps without a flush, so its
work crosses the steps: an action may concern the previous step's batch (`Action.batch`), a step may end
without a complete gradient (`StepOutput.gradient_ready`), and `settle` completes what is in flight where
the trainer needs a settled model (an epoch's end, a checkpoint). Synchronous schedules settle nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch
from torch import nn

from polytrain.registry import Registry
from polytrain.tasks import CLASSIFICATION, Task

STEP_SCHEDULES: Registry = Registry("step schedule")

Op = Literal["forward", "backward", "send_activation", "recv_activation", "send_gradient", "recv_gradient"]


@dataclass(frozen=True)
class Action:
    """One thing a rank does during a step.

    Attributes:
        op: forward, backward, or (pipeline schedules) a send or receive of activations or gradients.
        microbatch: the microbatch it concerns, 0-based.
        stage: the pipeline stage it runs on (0 for a whole model).
        batch: the step's batch it concerns, relative to the step: 0 (this step's), -1 (the previous step's,
            whose backwards an asynchronous schedule carried over).
    """

    op: Op
    microbatch: int
    stage: int = 0
    batch: int = 0


@dataclass
class StepContext:
    """What a schedule needs besides the model and the batch.

    Attributes:
        global_batch: samples of the step over all replicas; each microbatch's summed loss is divided by
            it, so the accumulated gradient is that of the full batch's mean loss and summing the
            replicas' gradients gives the global mean.
        before_backward: called with `last_microbatch` before each backward (update policies hook in
            here to launch their reductions with the last one).
        autocast: the mixed-precision context of forward passes (default: none).
        scale_loss: applied to the loss before backward (fp16 loss scaling; default: identity).
        task: the loss to minimise and the metric to sum (polytrain.tasks; default: classification).
    """

    global_batch: int
    before_backward: Callable[[bool], None] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda loss: loss)
    task: Task = CLASSIFICATION


@dataclass
class StepOutput:
    """The loss and the task's metric, each summed over this rank's samples of the step (computed by its
    forwards), and whether the parameters' .grad hold a complete gradient for the update policy to apply
    (False only where an asynchronous schedule has none yet: pipedream's first step after a flush)."""

    loss_sum: float = 0.0
    metric_sum: float = 0.0
    gradient_ready: bool = True


class StepSchedule(Protocol):
    """A registered step schedule (see the module docstring)."""

    name: str

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1) -> list[Action]: ...

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_microbatches: int,
            context: StepContext) -> StepOutput: ...

    def settle(self, model: nn.Module) -> bool:
        """At a synchronization point (an epoch's end, a checkpoint; every rank): completes the work the
        schedule carried over from its steps. True when that left a complete gradient in the parameters'
        .grad, which the trainer then applies through the update policy's step. Optional: a schedule without
        it (every synchronous one) carries nothing over."""


def settle_schedule(schedule, model: nn.Module) -> bool:
    """`schedule.settle(model)` where the schedule has one (see StepSchedule.settle), else False."""
    settle = getattr(schedule, "settle", None)
    return bool(settle(model)) if settle is not None else False


def run_actions(actions: list[Action], model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_microbatches: int,
                context: StepContext) -> StepOutput:
    """Executes the forward and backward actions of a whole-model schedule on (x, y).

    Microbatches are the `num_microbatches` slices of the batch (torch.tensor_split); a forward keeps its
    loss until that microbatch's backward, so a schedule may run several forwards before their backwards.
    """
    pieces = list(zip(x.tensor_split(num_microbatches), y.tensor_split(num_microbatches)))
    backwards = [a.microbatch for a in actions if a.op == "backward"]
    last = backwards[-1] if backwards else None
    pending: dict[int, torch.Tensor] = {}
    output = StepOutput()
    for action in actions:
        if action.op == "forward":
            x_micro, y_micro = pieces[action.microbatch]
            with context.autocast():
                prediction = model(x_micro)
                loss = context.task.loss_sum(prediction, y_micro)  # autocast computes losses in float32
            pending[action.microbatch] = loss
            output.loss_sum += loss.item()
            with torch.no_grad():
                output.metric_sum += float(context.task.metric.per_sample_sum(prediction, y_micro))
        elif action.op == "backward":
            loss = pending.pop(action.microbatch)
            if context.before_backward is not None:
                context.before_backward(action.microbatch == last)
            context.scale_loss(loss / context.global_batch).backward()
        else:
            raise ValueError(f"action {action.op} needs a pipeline runtime; run_actions executes whole-model "
                             f"schedules (forward and backward only)")
    return output


@STEP_SCHEDULES.register("accumulate")
class Accumulate:
    """The whole model on every rank: forward then backward of each microbatch in turn (gradient accumulation).

    One microbatch in memory at a time; with k microbatches the accumulated gradient equals the full
    batch's (for models without batch norm, whose statistics depend on the batch).
    """

    name = "accumulate"
    # The mesh axes the model may be split over: tp (the split layers communicate inside the forward and
    # backward passes, polytrain.parallel.tensor); pp needs a pipeline schedule.
    splits: tuple[str, ...] = ("tp",)

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1) -> list[Action]:
        return [Action(op, i, stage) for i in range(num_microbatches) for op in ("forward", "backward")]

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_microbatches: int,
            context: StepContext) -> StepOutput:
        return run_actions(self.actions(num_microbatches), model, x, y, num_microbatches, context)


def local_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatches: int, global_batch: int,
               before_backward: Callable[[bool], None] | None = None) -> tuple[float, float]:
    """Forward and backward of one replica's classification batch under `accumulate`: (summed loss, correct
    predictions)."""
    output = Accumulate().run(model, x, y, microbatches, StepContext(global_batch, before_backward))
    return output.loss_sum, output.metric_sum


__all__ = ["STEP_SCHEDULES", "Action", "StepContext", "StepOutput", "StepSchedule", "Accumulate", "run_actions",
           "local_step", "settle_schedule"]


# Registers the pipeline schedules (gpipe, 1f1b, interleaved; pipedream).
from polytrain.schedules import pipeline  # noqa: E402,F401
from polytrain.schedules import pipedream  # noqa: E402,F401
