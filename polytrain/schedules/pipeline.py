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

The asynchronous `pipedream` (schedules/pipedream.py) runs on the same runtime: `run_pipeline` takes the
state it keeps in flight across steps (`InFlight`), the stashed weights its forwards use and whether a
step's sends may be completed in the next step; `simulate(..., steps=K)` plays K steps and the flush.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from polytrain.parallel.pipeline import ACTIVATION, GRADIENT, PipelineStage
from polytrain.schedules import STEP_SCHEDULES, Action, StepContext, StepOutput


def _forward(i: int, stage: int, stages: int, batch: int = 0) -> list[Action]:
    """Microbatch i's forward on (virtual) stage `stage` of `stages`, with its receive and send."""
    return ([Action("recv_activation", i, stage, batch)] if stage > 0 else []) + [Action("forward", i, stage, batch)] + \
        ([Action("send_activation", i, stage, batch)] if stage < stages - 1 else [])


def _backward(i: int, stage: int, stages: int, batch: int = 0) -> list[Action]:
    return ([Action("recv_gradient", i, stage, batch)] if stage < stages - 1 else []) + \
        [Action("backward", i, stage, batch)] + ([Action("send_gradient", i, stage, batch)] if stage > 0 else [])


class _SavedActivations:
    """The bytes autograd saves for backward, per (batch, microbatch, stage) in flight: tensors counted once
    each (by address), weights not (parameters and stashed weight versions are held anyway)."""

    def __init__(self, pipe: PipelineStage) -> None:
        self.weights = {p.data_ptr() for p in pipe.parameters()}
        self.live: dict[tuple[int, int, int], dict[int, int]] = {}
        self.peak = 0

    def hooks(self, key: tuple[int, int, int]):
        saved = self.live.setdefault(key, {})

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            address = tensor.data_ptr()
            if address not in self.weights:
                saved[address] = max(saved.get(address, 0), tensor.numel() * tensor.element_size())
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def held(self) -> int:
        return sum(sum(saved.values()) for saved in self.live.values())

    def forwarded(self) -> None:
        self.peak = max(self.peak, self.held())

    def released(self, key: tuple[int, int, int]) -> None:
        self.live.pop(key, None)


@dataclass
class InFlight:
    """What a pipeline holds between its actions, keyed by (batch, microbatch, stage): received inputs,
    outputs and losses awaiting their backward, received gradients; the sends not yet completed (with the
    batch of the step that posted them); the activations saved for backward; microbatches in flight.

    A synchronous schedule's step starts and ends with none; an asynchronous one (pipedream) keeps one across
    its steps, so the backwards of one step's batch run in the next.
    """

    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    gradients: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    sends: list = field(default_factory=list)
    saved: _SavedActivations | None = None
    in_flight: int = 0


Weights = Callable[[int, int], "dict[str, torch.Tensor] | None"]


def run_pipeline(actions: list[Action], pipe: PipelineStage, x, y, num_microbatches: int,
                 context: StepContext, *, flight: InFlight | None = None, batch: int = 0,
                 weights: Weights | None = None, carry_sends: bool = False) -> StepOutput:
    """Executes a pipeline schedule's actions on this rank's stages; the loss and metric are the last
    stage's (the other ranks return zeros). Records the step on `pipe.timeline`.

    Synchronous schedules call it with the defaults: every action concerns this step's batch (x, y), the
    modules' own parameters compute, and the step completes its sends. An asynchronous schedule passes the
    `flight` it keeps across steps, the absolute number `batch` of this step's batch (an action's batch
    offset is added to it; forwards are always of this step's batch, x and y may be None without
    forwards), `weights(batch, stage)`, the parameters (name -> tensor, of `pipe.part(stage)`) that a batch's
    forwards use (torch.func.functional_call; None: the module's own), and `carry_sends`: leave this step's
    sends pending (their receives may come in the neighbour's next step) and complete the earlier ones.
    Each microbatch's loss is divided by its own step's global batch at its forward.
    """
    started, busy = time.monotonic(), 0.0
    xs = x.tensor_split(num_microbatches) if x is not None else ()
    ys = y.tensor_split(num_microbatches) if y is not None else ()
    comm = pipe.comm
    flight = flight if flight is not None else InFlight()
    if flight.saved is None:
        flight.saved = _SavedActivations(pipe)
    inputs, outputs, gradients, losses, saved = (flight.inputs, flight.outputs, flight.gradients, flight.losses,
                                                 flight.saved)
    saved.weights = {p.data_ptr() for p in pipe.parameters()} | \
        {t.data_ptr() for owner in (batch - 1, batch) for stage in pipe.own_stages
         for t in ((weights(owner, stage) if weights is not None else None) or {}).values()}
    saved.peak = saved.held()
    backwards = [(a.microbatch, a.stage, a.batch) for a in actions if a.op == "backward"]
    last = backwards[-1] if backwards else None
    peak_in_flight = flight.in_flight
    sends = []
    output = StepOutput()
    for action in actions:
        i, stage, owner = action.microbatch, action.stage, batch + action.batch
        key = (owner, i, stage)
        if action.op == "recv_activation":
            received = pipe.receive(comm, (len(xs[i]), *pipe.input_shape(stage)), pipe.previous(stage),
                                    "pp:activation", ACTIVATION, like=xs[i])
            inputs[key] = received.requires_grad_()
        elif action.op == "forward":
            if action.batch != 0:
                raise ValueError(f"a forward runs this step's batch; got batch offset {action.batch}")
            began = time.monotonic()
            own = weights(owner, stage) if weights is not None else None
            value = xs[i] if stage == 0 else pipe.stage_input(stage, inputs[key])
            with context.autocast(), saved.hooks(key):
                value = pipe.part(stage)(value) if own is None else functional_call(pipe.part(stage), own, (value,))
                if pipe.is_last(stage):
                    loss = context.task.loss_sum(value, ys[i])
            if pipe.is_last(stage):
                losses[key] = loss / context.global_batch
                output.loss_sum += loss.item()
                output.metric_sum += float(context.task.metric.per_sample_sum(value.detach(), ys[i]))
            else:
                outputs[key] = value
            busy += time.monotonic() - began
            saved.forwarded()
            flight.in_flight += 1
            peak_in_flight = max(peak_in_flight, flight.in_flight)
        elif action.op == "send_activation":
            sends.append(comm.post([(outputs[key].detach().contiguous(), pipe.following(stage))], [],
                                   "pp:activation", ACTIVATION))
        elif action.op == "recv_gradient":
            gradients[key] = pipe.receive(comm, tuple(outputs[key].shape), pipe.following(stage), "pp:gradient",
                                          GRADIENT, like=outputs[key])
        elif action.op == "backward":
            if context.before_backward is not None:
                context.before_backward((i, stage, action.batch) == last)
            began = time.monotonic()
            if pipe.is_last(stage):
                context.scale_loss(losses.pop(key)).backward()
            else:
                activation, gradient = outputs.pop(key), gradients.pop(key)
                if activation.requires_grad:  # a first stage without parameters (a Flatten): nothing to backpropagate
                    activation.backward(gradient)
            busy += time.monotonic() - began
            saved.released(key)
            flight.in_flight -= 1
        elif action.op == "send_gradient":
            sends.append(comm.post([(inputs.pop(key).grad.contiguous(), pipe.previous(stage))], [], "pp:gradient",
                                   GRADIENT))
    earlier = [transfer for _, transfer in flight.sends]
    flight.sends = [(batch, transfer) for transfer in sends] if carry_sends else []
    for transfer in earlier + ([] if carry_sends else sends):
        transfer.wait()
    pipe.timeline.append({"start": started, "end": time.monotonic(), "busy": busy, "in_flight": peak_in_flight,
                          "activation_bytes": saved.peak, "weight_versions": 1, "staleness": 0})
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


def _per_stage(value: float | Sequence[float], stage: int, chunks: int) -> float:
    return value[stage] if isinstance(value, (list, tuple)) else value / chunks


def simulate(schedule, num_microbatches: int, stages: int, chunks: int = 1,
             forward_s: float | Sequence[float] = 1.0, backward_s: float | Sequence[float] = 2.0, steps: int = 1,
             message_s: float | Sequence[float] = 0.0) -> dict:
    """Runs `schedule`'s action lists for every rank against each other as the runtime does, with every
    (virtual) stage's forward taking `forward_s` / chunks and its backward `backward_s` / chunks (or, given
    lists, `forward_s[s]` and `backward_s[s]` for virtual stage s) and a message across the boundary after
    virtual stage s taking `message_s` (or `message_s[s]`) seconds on the link between the two ranks (one per
    direction; messages on it follow each other), for
    `steps` steps (the performance model's pipelines, polytrain.perf.predict).

    As in run_pipeline: sends are posted, receives wait; messages between two ranks are matched in order per
    tag; a send completes when its receive is posted (gloo hands a message over to a posted receive) and a
    step ends by completing its sends, an asynchronous schedule's (one with `flush_actions`: pipedream) those
    of the steps before, and at the end its flush completes every backward carried over and every send. The
    steps follow each other without a pause (no optimizer step, no data loading).

    Returns the span of all steps, each rank's busy seconds and the bubble (the idle share of ranks x span),
    and per step each rank's (start, end) and the bubble as result.json measures it (1 - busy / (ranks x the
    span from the first rank's start to the last rank's end); the flush is not a step).
    Raises ValueError on a deadlock or on a receive matched to another message than the one it expects.
    """
    asynchronous = hasattr(schedule, "flush_actions")
    plans: list[list] = []
    for rank in range(stages):
        plan: list = []
        for step in range(steps):
            actions = schedule.actions(num_microbatches, rank, stages, chunks, pending=step > 0) if asynchronous \
                else schedule.actions(num_microbatches, rank, stages, chunks)
            plan += [("act", step, step + action.batch, action) for action in actions]
            plan.append(("end", step, step - 1 if asynchronous else step, None))  # complete the sends of steps <= this
        if asynchronous:  # the flush (counted as step `steps`) runs the last batch's backwards
            plan += [("act", steps, steps - 1 + action.batch, action)
                     for action in schedule.flush_actions(num_microbatches, rank, stages, chunks)]
            plan.append(("end", steps, steps, None))
        plans.append(plan)
    positions, clocks, busy = [0] * stages, [0.0] * stages, [0.0] * stages
    step_busy = [[0.0] * (steps + 1) for _ in range(stages)]
    bounds = [[[None, None] for _ in range(steps + 1)] for _ in range(stages)]
    channels: dict[tuple[int, int, int], list[tuple[int, int, int, float, list]]] = {}
    posted: list[list[tuple[int, list]]] = [[] for _ in range(stages)]  # per rank: (step, [taken at or None])
    link_free: dict[tuple[int, int], float] = {}  # (from rank, to rank) -> when its last message arrives
    moved = True
    while moved:
        moved = False
        for rank, plan in enumerate(plans):
            while positions[rank] < len(plan):
                kind, step, owner, action = plan[positions[rank]]
                if bounds[rank][step][0] is None:
                    bounds[rank][step][0] = clocks[rank]
                if kind == "end":  # `owner`: the last step whose sends are completed here
                    waited = [taken for poster, taken in posted[rank] if poster <= owner]
                    if any(taken[0] is None for taken in waited):
                        break
                    clocks[rank] = max([clocks[rank]] + [taken[0] for taken in waited])
                    posted[rank] = [(poster, taken) for poster, taken in posted[rank] if poster > owner]
                    bounds[rank][step][1] = clocks[rank]
                    positions[rank] += 1
                    moved = True
                    continue
                ahead = action.op in ("send_activation", "recv_activation")
                tag = ACTIVATION if ahead else GRADIENT
                if action.op.startswith("send"):
                    target = action.stage + 1 if ahead else action.stage - 1
                    taken: list = [None]
                    # One link per direction: a message waits for the one before it on that link.
                    link = (rank, target % stages)
                    boundary = action.stage if ahead else action.stage - 1
                    arrival = max(clocks[rank], link_free.get(link, 0.0)) + _per_stage(message_s, boundary, 1)
                    link_free[link] = arrival
                    channels.setdefault((rank, target % stages, tag), []).append(
                        (owner, action.microbatch, target, arrival, taken))
                    posted[rank].append((step, taken))
                elif action.op.startswith("recv"):
                    source = (action.stage - 1 if ahead else action.stage + 1) % stages
                    queue = channels.get((source, rank, tag))
                    if not queue:
                        break
                    batch, microbatch, stage, arrival, taken = queue.pop(0)
                    if (batch, microbatch, stage) != (owner, action.microbatch, action.stage):
                        raise ValueError(f"{schedule.name}: rank {rank} expects microbatch {action.microbatch} of "
                                         f"stage {action.stage} of batch {owner} and receives {microbatch} of stage "
                                         f"{stage} of batch {batch}")
                    taken[0] = clocks[rank]  # the receive is posted now: the send completes
                    clocks[rank] = max(clocks[rank], arrival)
                else:
                    seconds = _per_stage(forward_s if action.op == "forward" else backward_s, action.stage, chunks)
                    clocks[rank] += seconds
                    busy[rank] += seconds
                    step_busy[rank][step] += seconds
                positions[rank] += 1
                moved = True
    stuck = [rank for rank in range(stages) if positions[rank] < len(plans[rank])]
    if stuck:
        raise ValueError(f"{schedule.name} deadlocks: ranks {stuck} wait for messages never sent")
    span = max(clocks)
    step_bubbles = []
    for step in range(steps):
        step_span = max(bounds[rank][step][1] for rank in range(stages)) - \
            min(bounds[rank][step][0] for rank in range(stages))
        step_bubbles.append(1 - sum(step_busy[rank][step] for rank in range(stages)) / (stages * step_span))
    return {"span": span, "busy": busy, "bubble": 1 - sum(busy) / (stages * span),
            "steps": [[tuple(bounds[rank][step]) for rank in range(stages)] for step in range(steps)],
            "step_bubbles": step_bubbles}
