"""PipeDream-2BW (Narayanan, Phanishayee, Shi, Chen & Zaharia 2021, "Memory-Efficient Pipeline-Parallel DNN
Training", ICML): asynchronous 1F1B pipelining with double-buffered weights, as step schedule `pipedream`
(`--mesh pp=P --step-schedule pipedream --microbatches m`, m >= P).

Order. The 1F1B order continues across steps without a flush. Stage s of p holds w_s = p-s-1 backwards over
from one step to the next: in step t it runs F(t,0), B(t-1,m-w_s), F(t,1), B(t-1,m-w_s+1), ..., F(t,w_s-1),
B(t-1,m-1), then F(t,w_s), B(t,0), F(t,w_s+1), B(t,1), ..., F(t,m-1), B(t,m-w_s-1), and leaves the last w_s
backwards of batch t to step t+1 (the last stage leaves none). Over the steps of an epoch this is 1F1B over all
the epoch's microbatches, so the pipeline fills and drains once per flush instead of once per step. Receives
and sends are 1F1B's (pp:activation, pp:gradient, matched in order per tag); since the previous stage receives
the gradients of a step's last backwards in its next step, a step's sends are completed at the end of the next
step (`simulate` runs the cross-step action lists: every receive gets the message it expects, no deadlock).

Weights (2BW). Every forward of batch t and its backward use the weights at the start of step t, V_t, even when
the backward runs after an update. At the start of step t the stage's parameters are stashed as leaf tensors
that share the parameters' memory (`p.data`, so with a version counter of their own); batch t's forwards run on
the stash (torch.func.functional_call) and its backwards accumulate into the stash's .grad. At the end of step
t batch t-1's gradient is complete: it becomes the parameters' .grad, the update policy reduces it over dp
(allreduce; local: nothing) and the optimizer applies it,

    V_{t+1} = V_t - lr grad f(V_{t-1}),

the paper's 2BW update (section 3.1) with a delay of one step for every stage, at the learning rate of step t.
Batch t-1's stash is freed, and the parameters move to memory of their own before the update, so batch t's
stash keeps V_t while the optimizer writes V_{t+1}. A stage thus holds at most two weight versions (V_t for
batch t's pending backwards, V_{t+1} in the parameters; during step t+1 the stash of V_{t+1} shares the
parameters' memory), as the paper's double buffer; the last stage, whose backwards all run in their own step,
keeps batch t's gradient, not its weights, until the end of step t+1 and holds one. Two versions suffice
because the paper generates a new weight version every m >= d microbatches, d the pipeline depth (section 3.1;
here m >= pp, checked before any worker starts): a microbatch's backward then never comes more than one update
after its forward.

First steps and flushes. The first step (of a run, of an epoch, after a checkpoint) has no complete gradient:
it makes no update (W(1) = W(0) in the paper's recurrence, which starts from one version). The schedule says so
(StepOutput.gradient_ready False) and the trainer skips the update policy's step, so allreduce and the
optimizer see nothing rather than zeros (a zero gradient would still move the weights through weight decay
and momentum, and count an allreduce). At an epoch's end, a checkpoint and the run's end the trainer calls
`settle`: the last batch's pending backwards run (a flush), and its gradient is handed over and applied as one
more update. Every batch's gradient is applied once, there are as many updates as steps, and evaluation,
model.pt and checkpoints see a settled model: nothing is in flight, so a run resumed from a checkpoint starts
exactly as the uninterrupted run continues after its flush. Checkpoints therefore take part in the updates:
`checkpoint_steps` adds flushes.

Staleness. Every update applies a gradient computed on the weights one update older (1), except the first
after a flush (0: the step before made no update). result.json's pipeline section says "staleness" (the most),
"staleness_histogram" (updates by staleness) and per stage "weight_versions" (the most held at once).

Batch norm and dropout behave as under the synchronous schedules: per microbatch, the running statistics
updated in each forward (functional_call takes the modules' own buffers); the random state of a forward is
not replayed for anything.

Not supported (refused before any worker starts, polytrain.train.defaults): tp (the split layers' parameters
are not stashed), update policies other than local and allreduce (asynchronous or averaging policies would
compound the delay), allreduce's sufficient factors (they capture a step's activations for its own gradient).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from polytrain.parallel.pipeline import PipelineStage
from polytrain.schedules import STEP_SCHEDULES, Action, StepContext, StepOutput
from polytrain.schedules.pipeline import InFlight, _backward, _forward, _Pipelined, run_pipeline


@dataclass
class _Version:
    """The weights one batch's forwards and backwards use on this rank.

    Attributes:
        number: the updates applied on this rank before it was stashed.
        weights: per part of the stage, name -> leaf tensor (None once no backward of the batch is left).
        grads: per part, name -> the batch's gradient (set when its last backward ran).
        pending: backwards of the batch not run yet on this rank.
    """

    number: int
    weights: list[dict[str, torch.Tensor]] | None
    grads: list[dict[str, torch.Tensor | None]] | None = None
    pending: int = 0


@STEP_SCHEDULES.register("pipedream")
class PipeDream2BW(_Pipelined):
    """Asynchronous 1F1B with weight stashing and double-buffered weights (see the module docstring)."""

    name = "pipedream"
    splits: tuple[str, ...] = ("pp",)
    policies: tuple[str, ...] = ("local", "allreduce")  # update policies it runs with
    staleness = 1  # the delay of every update but the first after a flush

    def __init__(self) -> None:
        self.flight = InFlight()
        self.versions: dict[int, _Version] = {}  # batch number -> its version, while its gradient is not applied
        self.batch = 0  # the number of the next step's batch, counted over this process's steps
        self.updates = 0  # gradients handed to the update policy on this rank
        self.microbatches: int | None = None
        self.context: StepContext | None = None

    # -- the schedule as data -------------------------------------------------------------------------------

    def actions(self, num_microbatches: int, stage: int = 0, stages: int = 1, chunks: int = 1,
                pending: bool = True) -> list[Action]:
        """One step's actions on `stage`; `pending`: the previous step left its last backwards to this one
        (batch offset -1). Without them it is 1F1B without the drain."""
        warmup = min(stages - stage - 1, num_microbatches)
        actions: list[Action] = []
        for k in range(warmup):
            actions += _forward(k, stage, stages)
            if pending:
                actions += _backward(num_microbatches - warmup + k, stage, stages, batch=-1)
        for k in range(num_microbatches - warmup):
            actions += _forward(warmup + k, stage, stages) + _backward(k, stage, stages)
        return actions

    def flush_actions(self, num_microbatches: int, stage: int = 0, stages: int = 1, chunks: int = 1) -> list[Action]:
        """After the last step before a synchronization point: the backwards it left (1F1B's drain)."""
        warmup = min(stages - stage - 1, num_microbatches)
        return [a for k in range(num_microbatches - warmup, num_microbatches) for a in _backward(k, stage, stages)]

    # -- the runtime ----------------------------------------------------------------------------------------

    def run(self, model, x, y, num_microbatches: int, context: StepContext) -> StepOutput:
        if not isinstance(model, PipelineStage) or model.chunks != 1:
            raise ValueError("step schedule pipedream runs a model cut into pipeline stages (--mesh pp=P) without "
                             "virtual stages")
        if self.microbatches is not None and num_microbatches != self.microbatches and self.versions:
            raise ValueError(f"pipedream carries {self.microbatches} microbatches over; got {num_microbatches}")
        batch = self.batch
        self.microbatches = num_microbatches
        self.context = self._without_reduction_hooks(context)
        # The stash of V_batch shares the parameters' memory until `_release` moves the parameters off it.
        self.versions[batch] = _Version(self.updates, [
            {name: p.data.requires_grad_() for name, p in part.named_parameters() if p.requires_grad}
            for part in model.parts], pending=num_microbatches)
        held = self._held(model)
        actions = self.actions(num_microbatches, model.index, model.stages, pending=(batch - 1) in self.versions)
        output = run_pipeline(actions, model, x, y, num_microbatches, self.context, flight=self.flight, batch=batch,
                              weights=self._weights(model), carry_sends=True)
        self._count(actions, batch)
        staleness = self._hand_over(model, batch - 1)
        self._release(model)
        model.timeline[-1].update(weight_versions=max(held, self._held(model)), staleness=staleness, flush=False)
        self.batch += 1
        output.gradient_ready = staleness is not None
        return output

    def settle(self, model) -> bool:
        """The flush: the last batch's pending backwards, its sends and those carried over completed; its
        gradient becomes the parameters' .grad (True) for the trainer to apply through the policy's step."""
        if not self.versions:
            return False
        latest = self.batch - 1
        held = self._held(model)
        actions = self.flush_actions(self.microbatches, model.index, model.stages)
        run_pipeline(actions, model, None, None, self.microbatches, self.context, flight=self.flight, batch=latest,
                     weights=self._weights(model))
        self._count(actions, latest)
        staleness = self._hand_over(model, latest)
        self._release(model)
        model.timeline[-1].update(weight_versions=held, staleness=staleness, flush=True)
        left = (self.flight.inputs, self.flight.outputs, self.flight.gradients, self.flight.losses)
        if self.versions or any(left) or self.flight.sends:
            raise RuntimeError("pipedream's flush left work in flight")  # a bug, not a user error
        self.flight = InFlight()
        return staleness is not None

    @staticmethod
    def _without_reduction_hooks(context: StepContext) -> StepContext:
        """No backward produces the gradient of the policy's parameters (they go to the stashes and are handed
        over at the step's end, where the policy's step reduces them): before_backward is told 'not the last
        microbatch', so that reductions armed for the last one (allreduce's overlap) stay off."""
        hook = context.before_backward
        return dataclasses.replace(context, before_backward=(lambda last: hook(False)) if hook is not None else None)

    def _weights(self, model: PipelineStage):
        def weights(batch: int, stage: int) -> dict[str, torch.Tensor] | None:
            version = self.versions.get(batch)
            if version is None or version.weights is None:
                return None
            return version.weights[stage // model.stages]

        return weights

    def _count(self, actions: list[Action], batch: int) -> None:
        for action in actions:
            if action.op == "backward":
                self.versions[batch + action.batch].pending -= 1

    def _hand_over(self, model: PipelineStage, batch: int) -> int | None:
        """Batch `batch`'s gradient becomes the parameters' .grad and its version is forgotten; the staleness of
        the update it makes (None: there is no such batch, no update)."""
        version = self.versions.pop(batch, None)
        if version is None:
            return None
        if version.pending:
            raise RuntimeError(f"pipedream: batch {batch} has {version.pending} backwards left")  # a bug
        self._keep_gradient(version)
        for part, grads in zip(model.parts, version.grads):
            for name, param in part.named_parameters():
                param.grad = grads.get(name)
        staleness = self.updates - version.number
        self.updates += 1
        return staleness

    @staticmethod
    def _keep_gradient(version: _Version) -> None:
        if version.weights is not None:
            version.grads = [{name: tensor.grad for name, tensor in weights.items()} for weights in version.weights]
            version.weights = None

    def _release(self, model: PipelineStage) -> None:
        """Frees the weights of versions without pending backwards (their gradient is kept) and moves the
        parameters to memory of their own where a stash still shares theirs, so the update policy's step (and
        anything else writing the parameters in place) leaves every stashed version as it was."""
        for version in self.versions.values():
            if version.pending == 0:
                self._keep_gradient(version)
        shared = {t.data_ptr() for version in self.versions.values() if version.weights is not None
                  for weights in version.weights for t in weights.values()}
        for param in model.parameters():
            if param.data_ptr() in shared:
                param.data = param.data.clone()

    def _held(self, model: PipelineStage) -> int:
        """Weight versions this rank holds: the parameters' and each stash not sharing their memory."""
        live = {p.data_ptr() for p in model.parameters()}
        return 1 + sum(1 for version in self.versions.values() if version.weights is not None and live
                       and live.isdisjoint(t.data_ptr() for weights in version.weights for t in weights.values()))
