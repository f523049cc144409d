"""Synchronous pipeline schedules: GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush; Narayanan et al.
2019, 2021), as data, and the runtime that executes them on a rank's PipelineStage.

For stage s of p with m microbatches:
- `gpipe`: every forward (receive the activation from s-1, forward, send it to s+1), then every backward
  (receive the gradient from s+1, backward, send the input's gradient to s-1) in reverse order. Up to m
  microbatches' activations are held at once.
- `1f1b`: min(p-s-1, m) warm-up forwards, then one forward and one backward in turn, then the remaining
  backwards. At most p-s microbatches are in flight on stage s.

Both accumulate the gradient of every microbatch before the update, so a run equals one worker with the
same m microbatches (tested); the bubble of either is (p-1)/(m+p-1) of the step on a balanced pipeline.
Sends are posted without waiting (a stage that waited for its send to be taken while its neighbour waits
for its own would deadlock under 1F1B) and completed at the end of the step; receives wait, within the
communicator's timeout.
"""

from __future__ import annotations

from polytrain.parallel.pipeline import PipelineStage
from polytrain.schedules import STEP_SCHEDULES, Action, StepContext, StepOutput


def _forward(i: int, stage: int, stages: int) -> list[Action]:
    return ([Action("recv_activation", i, stage)] if stage > 0 else []) + [Action("forward", i, stage)] + \
        ([Action("send_activation", i, stage)] if stage < stages - 1 else [])


def _backward(i: int, stage: int, stages: int) -> list[Action]:
    return ([Action("recv_gradient", i, stage)] if stage < stages - 1 else []) + [Action("backward", i, stage)] + \
        ([Action("send_gradient", i, stage)] if stage > 0 else [])


def run_pipeline(actions: list[Action], pipe: PipelineStage, x, y, num_microbatches: int,
                 context: StepContext) -> StepOutput:
    """Executes a pipeline schedule's actions on this rank's stage; the loss and metric are the last
    stage's (the other stages return zeros)."""
    xs, ys = x.tensor_split(num_microbatches), y.tensor_split(num_microbatches)
    comm, index = pipe.comm, pipe.index
    inputs, outputs, gradients, losses = {}, {}, {}, {}
    backwards = [a.microbatch for a in actions if a.op == "backward"]
    last = backwards[-1] if backwards else None
    sends = []
    output = StepOutput()
    for action in actions:
        i = action.microbatch
        if action.op == "recv_activation":
            received = pipe.receive(comm, (len(xs[i]), *pipe.input_shape), index - 1, "pp:activation",
                                    like=xs[i] if xs[i].is_floating_point() else None)
            inputs[i] = received.requires_grad_()
        elif action.op == "forward":
            with context.autocast():
                value = pipe.stage(xs[i] if pipe.first else inputs[i])
                if pipe.last:
                    loss = context.task.loss_sum(value, ys[i])
            if pipe.last:
                losses[i] = loss
                output.loss_sum += loss.item()
                output.metric_sum += float(context.task.metric.per_sample_sum(value.detach(), ys[i]))
            else:
                outputs[i] = value
        elif action.op == "send_activation":
            sends.append(comm.post([(outputs[i].detach().contiguous(), index + 1)], [], "pp:activation"))
        elif action.op == "recv_gradient":
            gradients[i] = pipe.receive(comm, tuple(outputs[i].shape), index + 1, "pp:gradient", like=outputs[i])
        elif action.op == "backward":
            if context.before_backward is not None:
                context.before_backward(i == last)
            if pipe.last:
                context.scale_loss(losses.pop(i) / context.global_batch).backward()
            else:
                outputs.pop(i).backward(gradients.pop(i))
        elif action.op == "send_gradient":
            sends.append(comm.post([(inputs.pop(i).grad.contiguous(), index - 1)], [], "pp:gradient"))
    for transfer in sends:
        transfer.wait()
    return output


class _Pipelined:
    """What the pipeline schedules share: they split the model over pp and run on a PipelineStage."""

    splits: tuple[str, ...] = ("pp",)

    def run(self, model, x, y, num_microbatches: int, context: StepContext) -> StepOutput:
        if not isinstance(model, PipelineStage):
            raise ValueError(f"step schedule {self.name} runs a model cut into pipeline stages (--mesh pp=P)")
        return run_pipeline(self.actions(num_microbatches, model.index, model.stages), model, x, y,
                            num_microbatches, context)


@STEP_SCHEDULES.register("gpipe")
class GPipe(_Pipelined):
    """Every forward, then every backward (see the module docstring)."""

    name = "gpipe"

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1) -> list[Action]:
        forwards = [a for i in range(num_microbatches) for a in _forward(i, stage, stages)]
        return forwards + [a for i in reversed(range(num_microbatches)) for a in _backward(i, stage, stages)]


@STEP_SCHEDULES.register("1f1b")
class OneForwardOneBackward(_Pipelined):
    """Warm-up forwards, one forward and one backward in turn, the remaining backwards."""

    name = "1f1b"

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1) -> list[Action]:
        warmup = min(stages - stage - 1, num_microbatches)
        actions = [a for i in range(warmup) for a in _forward(i, stage, stages)]
        for k in range(num_microbatches - warmup):
            actions += _forward(warmup + k, stage, stages) + _backward(k, stage, stages)
        for k in range(num_microbatches - warmup, num_microbatches):
            actions += _backward(k, stage, stages)
        return actions
