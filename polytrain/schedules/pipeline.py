"""Synchronous pipeline schedules: GPipe (Huang et al. 2019), 1F1B (PipeDream-Flush; Narayanan et al. 2019,
2021) and interleaved 1F1B (Narayanan et al. 2021), as data, the runtime that executes them on a rank's
PipelineStage, and a simulator of their action lists.

For stage s of p with m microbatches:
- `gpipe`: every forward (receive the activation from s-1, forward, send it to s+1), then every backward
  (receive the gradient from s+1, backward, send the input's gradient to s-1) in reverse order. Up to m
  microbatches' activations are held at once.
- `1f1b`: min(p-s-1, m) warm-up forwards, then one forward and one backward in turn, then the remaining
  backwards. At most p-s microbatches are in flight on stage s.
- `interleaved`: every rank holds v virtual stages (`--set virtual_stages=v`, the model cut into p v);
  Megatron's order (see `Interleaved`), a bubble of (p-1)/(vm+p-1) for v times the messages.

All accumulate the gradient of every microbatch before the update, so a run equals one worker with the same
m microbatches (tested); the bubble of gpipe and 1f1b is (p-1)/(m+p-1) of the step on a balanced pipeline
(`simulate` reproduces it from the action lists, and the runtime measures it). Sends are posted without
waiting (a stage that waited for its send to be taken while its neighbour waits for its own would deadlock
under 1F1B) and completed at the end of the step; receives wait, within the communicator's timeout.
Activations and gradients travel under their own message tags, so two ranks that exchange both (p = 2,
interleaved) match each kind in order.
"""

from __future__ import annotations

import time

import torch

from polytrain.parallel.pipeline import ACTIVATION, GRADIENT, PipelineStage
from polytrain.schedules import STEP_SCHEDULES, Action, StepContext, StepOutput


def _forward(i: int, stage: int, stages: int) -> list[Action]:
    """Microbatch i's forward on (virtual) stage `stage` of `stages`, with its receive and send."""
    return ([Action("recv_activation", i, stage)] if stage > 0 else []) + [Action("forward", i, stage)] + \
        ([Action("send_activation", i, stage)] if stage < stages - 1 else [])


def _backward(i: int, stage: int, stages: int) -> list[Action]:
    return ([Action("recv_gradient", i, stage)] if stage < stages - 1 else []) + [Action("backward", i, stage)] + \
        ([Action("send_gradient", i, stage)] if stage > 0 else [])


class _SavedActivations:
    """The bytes autograd saves for backward, per (microbatch, stage) in flight: tensors counted once each
    (by address), parameters not (they are held anyway)."""

    def __init__(self, pipe: PipelineStage) -> None:
        self.parameters = {p.data_ptr() for p in pipe.parameters()}
        self.live: dict[tuple[int, int], dict[int, int]] = {}
        self.peak = 0

    def hooks(self, key: tuple[int, int]):
        saved = self.live.setdefault(key, {})

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            address = tensor.data_ptr()
            if address not in self.parameters:
                saved[address] = max(saved.get(address, 0), tensor.numel() * tensor.element_size())
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def forwarded(self) -> None:
        self.peak = max(self.peak, sum(sum(saved.values()) for saved in self.live.values()))

    def released(self, key: tuple[int, int]) -> None:
        self.live.pop(key, None)


def run_pipeline(actions: list[Action], pipe: PipelineStage, x, y, num_microbatches: int,
                 context: StepContext) -> StepOutput:
    """Executes a pipeline schedule's actions on this rank's stages; the loss and metric are the last
    stage's (the other ranks return zeros). Records the step on `pipe.timeline`."""
    started, busy = time.monotonic(), 0.0
    xs, ys = x.tensor_split(num_microbatches), y.tensor_split(num_microbatches)
    comm = pipe.comm
    inputs, outputs, gradients, losses = {}, {}, {}, {}
    backwards = [(a.microbatch, a.stage) for a in actions if a.op == "backward"]
    last = backwards[-1] if backwards else None
    saved = _SavedActivations(pipe)
    in_flight = peak_in_flight = 0
    sends = []
    output = StepOutput()
    for action in actions:
        i, stage = action.microbatch, action.stage
        key = (i, stage)
        if action.op == "recv_activation":
            received = pipe.receive(comm, (len(xs[i]), *pipe.input_shape(stage)), pipe.previous(stage),
                                    "pp:activation", ACTIVATION, like=xs[i])
            inputs[key] = received.requires_grad_()
        elif action.op == "forward":
            began = time.monotonic()
            with context.autocast(), saved.hooks(key):
                value = pipe.part(stage)(xs[i] if stage == 0 else inputs[key])
                if pipe.is_last(stage):
                    loss = context.task.loss_sum(value, ys[i])
            if pipe.is_last(stage):
                losses[key] = loss
                output.loss_sum += loss.item()
                output.metric_sum += float(context.task.metric.per_sample_sum(value.detach(), ys[i]))
            else:
                outputs[key] = value
            busy += time.monotonic() - began
            saved.forwarded()
            in_flight += 1
            peak_in_flight = max(peak_in_flight, in_flight)
        elif action.op == "send_activation":
            sends.append(comm.post([(outputs[key].detach().contiguous(), pipe.following(stage))], [],
                                   "pp:activation", ACTIVATION))
        elif action.op == "recv_gradient":
            gradients[key] = pipe.receive(comm, tuple(outputs[key].shape), pipe.following(stage), "pp:gradient",
                                          GRADIENT, like=outputs[key])
        elif action.op == "backward":
            if context.before_backward is not None:
                context.before_backward(key == last)
            began = time.monotonic()
            if pipe.is_last(stage):
                context.scale_loss(losses.pop(key) / context.global_batch).backward()
            else:
                outputs.pop(key).backward(gradients.pop(key))
            busy += time.monotonic() - began
            saved.released(key)
            in_flight -= 1
        elif action.op == "send_gradient":
            sends.append(comm.post([(inputs.pop(key).grad.contiguous(), pipe.previous(stage))], [], "pp:gradient",
                                   GRADIENT))
    for transfer in sends:
        transfer.wait()
    pipe.timeline.append({"start": started, "end": time.monotonic(), "busy": busy, "in_flight": peak_in_flight,
                          "activation_bytes": saved.peak})
    return output


class _Pipelined:
    """What the pipeline schedules share: they split the model over pp (and its layers over tp) and run on a
    PipelineStage."""

    splits: tuple[str, ...] = ("pp", "tp")
    interleaves = False  # holds several virtual stages per rank (Experiment.virtual_stages)

    def run(self, model, x, y, num_microbatches: int, context: StepContext) -> StepOutput:
        if not isinstance(model, PipelineStage) or (model.chunks > 1) != self.interleaves:
            raise ValueError(f"step schedule {self.name} runs a model cut into pipeline stages (--mesh pp=P)"
                             + (" with virtual stages" if self.interleaves else " without virtual stages"))
        return run_pipeline(self.actions(num_microbatches, model.index, model.stages, model.chunks), model, x, y,
                            num_microbatches, context)


@STEP_SCHEDULES.register("gpipe")
class GPipe(_Pipelined):
    """Every forward, then every backward (see the module docstring)."""

    name = "gpipe"

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1, chunks: int = 1) -> list[Action]:
        forwards = [a for i in range(num_microbatches) for a in _forward(i, stage, stages)]
        return forwards + [a for i in reversed(range(num_microbatches)) for a in _backward(i, stage, stages)]


@STEP_SCHEDULES.register("1f1b")
class OneForwardOneBackward(_Pipelined):
    """Warm-up forwards, one forward and one backward in turn, the remaining backwards."""

    name = "1f1b"

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1, chunks: int = 1) -> list[Action]:
        warmup = min(stages - stage - 1, num_microbatches)
        actions = [a for i in range(warmup) for a in _forward(i, stage, stages)]
        for k in range(num_microbatches - warmup):
            actions += _forward(warmup + k, stage, stages) + _backward(k, stage, stages)
        for k in range(num_microbatches - warmup, num_microbatches):
            actions += _backward(k, stage, stages)
        return actions


@STEP_SCHEDULES.register("interleaved")
class Interleaved(_Pipelined):
    """Interleaved 1F1B over v virtual stages per rank (Megatron-LM; Narayanan et al. 2021, section 2.2).

    Rank r holds stages r, r + p, ..., r + (v-1)p. Its k-th forward is on its chunk (k div p) mod v for
    microbatch (k div pv) p + k mod p, its k-th backward on chunk v - 1 - (k div p) mod v of the same
    microbatch; 2(p-r-1) + (v-1)p warm-up forwards, then one forward and one backward in turn. The bubble
    shrinks to (p-1)/(vm+p-1), for v times the messages; m must be a multiple of p.
    """

    name = "interleaved"
    interleaves = True

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1, chunks: int = 2) -> list[Action]:
        if num_microbatches % stages:
            raise ValueError(f"interleaved 1f1b runs microbatches in groups of the {stages} stages; "
                             f"{num_microbatches} microbatches is not a multiple of {stages}")
        total, virtual = num_microbatches * chunks, stages * chunks

        def unit(k: int, forward: bool) -> tuple[int, int]:
            chunk = (k // stages) % chunks
            microbatch = (k // virtual) * stages + k % stages
            return microbatch, (chunk if forward else chunks - 1 - chunk) * stages + stage

        warmup = min(2 * (stages - stage - 1) + (chunks - 1) * stages, total)
        actions = [a for k in range(warmup) for a in _forward(*unit(k, True), virtual)]
        for k in range(total - warmup):
            actions += _forward(*unit(warmup + k, True), virtual) + _backward(*unit(k, False), virtual)
        for k in range(total - warmup, total):
            actions += _backward(*unit(k, False), virtual)
        return actions


def simulate(schedule, num_microbatches: int, stages: int, chunks: int = 1, forward_s: float = 1.0,
             backward_s: float = 2.0) -> dict:
    """Runs `schedule`'s action lists for every rank against each other as the runtime does (sends posted,
    receives wait; messages between two ranks matched in order per tag), with every (virtual) stage's
    forward taking `forward_s` / chunks and its backward `backward_s` / chunks and messages taking no time.

    Returns the step's span, each rank's busy seconds and the bubble (the idle share of ranks x span).
    Raises ValueError on a deadlock or on a receive matched to another message than the one it expects.
    """
    plans = [schedule.actions(num_microbatches, rank, stages, chunks) for rank in range(stages)]
    positions, clocks, busy = [0] * stages, [0.0] * stages, [0.0] * stages
    channels: dict[tuple[int, int, int], list[tuple[int, int, float]]] = {}
    moved = True
    while moved:
        moved = False
        for rank, actions in enumerate(plans):
            while positions[rank] < len(actions):
                action = actions[positions[rank]]
                ahead = action.op in ("send_activation", "recv_activation")
                tag = ACTIVATION if ahead else GRADIENT
                if action.op.startswith("send"):
                    target = action.stage + 1 if ahead else action.stage - 1
                    channels.setdefault((rank, target % stages, tag), []).append(
                        (action.microbatch, target, clocks[rank]))
                elif action.op.startswith("recv"):
                    source = (action.stage - 1 if ahead else action.stage + 1) % stages
                    queue = channels.get((source, rank, tag))
                    if not queue:
                        break
                    microbatch, stage, sent = queue.pop(0)
                    if (microbatch, stage) != (action.microbatch, action.stage):
                        raise ValueError(f"{schedule.name}: rank {rank} expects microbatch {action.microbatch} of "
                                         f"stage {action.stage} and receives {microbatch} of stage {stage}")
                    clocks[rank] = max(clocks[rank], sent)
                else:
                    seconds = (forward_s if action.op == "forward" else backward_s) / chunks
                    clocks[rank] += seconds
                    busy[rank] += seconds
                positions[rank] += 1
                moved = True
    stuck = [rank for rank in range(stages) if positions[rank] < len(plans[rank])]
    if stuck:
        raise ValueError(f"{schedule.name} deadlocks: ranks {stuck} wait for messages never sent")
    span = max(clocks)
    return {"span": span, "busy": busy, "bubble": 1 - sum(busy) / (stages * span)}
