"""Training memory: optimizer state, convolution workspaces, and the peak of one training step.

The peak is found by replaying a traced step tensor by tensor (a liveness analysis, as Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost", Sec. 3, plan memory): the forward pass allocates each
layer's outputs and keeps what autograd saves; the loss keeps its log-probabilities; backward, in reverse
layer order, allocates input and weight gradients, frees each output gradient after its producer has run
and each saved tensor after the last layer that saved it; the optimizer step adds its temporaries. The
weights, buffers, optimizer state and the input batch stay allocated throughout. Gradients are None
before the forward pass (`zero_grad(set_to_none=True)`, PyTorch's default and polytrain's loop), and the
optimizer state exists already (any step after the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polytrain.cost.layers import LayerCost, TensorSpec
from polytrain.cost.trace import Node, Trace
from polytrain.registry import UnknownNameError

# Bytes of a class label (int64) and of an optimizer's step counter (a 0-d float32 tensor per parameter).
TARGET_BYTES = 8
STEP_COUNTER_BYTES = 4


@dataclass(frozen=True)
class OptimizerState:
    """What a torch.optim optimizer keeps and allocates, per parameter tensor.

    Attributes:
        copies: state tensors shaped like the parameter (momentum buffer, moments, sums of squares).
        step_counter: whether it keeps a 0-d step tensor per parameter.
        temporaries: parameter-sized temporaries its update allocates at once (PyTorch's single-tensor
            CPU implementations, weight decay 0): nesterov's grad + momentum * buf, Adagrad's and
            RMSprop's sqrt, Adam's sqrt and its quotient.
    """

    copies: int
    step_counter: bool
    temporaries: int


# The optimizers of polytrain.train.optim, by the same names (torch.optim's SGD, Adagrad, RMSprop, Adam, AdamW).
OPTIMIZER_STATES: dict[str, OptimizerState] = {
    "sgd": OptimizerState(0, False, 0),
    "momentum": OptimizerState(1, False, 0),
    "nesterov": OptimizerState(1, False, 1),
    "adagrad": OptimizerState(1, True, 1),
    "rmsprop": OptimizerState(1, True, 1),
    "adam": OptimizerState(2, True, 2),
    "adamw": OptimizerState(2, True, 2),
}


def optimizer_state(name: str) -> OptimizerState:
    """The state of optimizer `name`; an unknown name raises `UnknownNameError` listing the known ones."""
    if name not in OPTIMIZER_STATES:
        raise UnknownNameError(f"unknown optimizer '{name}'; available: {', '.join(sorted(OPTIMIZER_STATES))}")
    return OPTIMIZER_STATES[name]


def optimizer_state_bytes(name: str, numels: list[int], itemsize: int) -> int:
    """Bytes optimizer `name` keeps between steps for trainable parameters of `numels` elements each."""
    state = optimizer_state(name)
    return sum(state.copies * numel * itemsize + STEP_COUNTER_BYTES * state.step_counter for numel in numels)


@dataclass(frozen=True)
class ConvBackend:
    """How PyTorch computes float32 convolutions on the CPU, which decides their temporary buffers.

    Attributes:
        onednn: whether the oneDNN (mkldnn) path is available and enabled.
        channel_block: channels per block of oneDNN's blocked layouts: 16 with AVX-512 (nChw16c), 8 with
            AVX2 (nChw8c).
        threads: intra-op threads; PyTorch keeps some 1x1 convolutions on its native path on one thread.
    """

    onednn: bool
    channel_block: int
    threads: int


    def describe(self) -> str:
        """One line for reports."""
        if not self.onednn:
            return "no convolution workspace"
        return f"oneDNN convolutions, {self.channel_block}-channel blocks, {self.threads} thread(s)"


NO_WORKSPACE = ConvBackend(onednn=False, channel_block=1, threads=1)


def host_conv_backend() -> ConvBackend:
    """The convolution backend of this process: oneDNN if enabled, its block from the CPU's vector ISA."""
    capability = torch.backends.cpu.get_cpu_capability()
    return ConvBackend(
        onednn=torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        channel_block=16 if capability.startswith("AVX512") else 8,
        threads=torch.get_num_threads(),
    )


def _uses_onednn(conv: nn.Conv2d, x: TensorSpec, backend: ConvBackend) -> bool:
    """PyTorch's choice of oneDNN for a float32 CPU convolution (`use_mkldnn`, aten/src/ATen/native/ConvUtils.h)."""
    if not backend.onednn or x.itemsize != 4 or len(x.shape) != 4:
        return False
    batch = x.shape[0]
    pointwise = tuple(conv.kernel_size) == (1, 1) and set(conv.stride) == {1} and set(conv.dilation) == {1}
    large_enough = conv.groups > 1 or min(conv.kernel_size) > 3 or batch > 1 or x.numel > 20480
    return (not pointwise or batch >= 16 or backend.threads > 1) and large_enough


def conv_workspace_bytes(node: Node, backend: ConvBackend) -> tuple[int, int]:
    """Temporary bytes of a convolution beyond its outputs and gradients: (forward, backward).

    oneDNN computes in its channel-blocked layout and reorders to and from PyTorch's plain NCHW tensors
    (measured with the profiler's allocation events): forward, a blocked copy of the output, and of the
    input when it has at least one block of channels; backward, a blocked copy of the output gradient and
    of the input gradient. Blocked copies pad the channels to a multiple of the block. PyTorch's native
    path (other dtypes, some 1x1 convolutions) is counted as needing no workspace.
    """
    if not isinstance(node.module, nn.Conv2d) or not _uses_onednn(node.module, node.call.inputs[0], backend):
        return 0, 0
    x, y = node.call.inputs[0], node.call.outputs[0]
    block = backend.channel_block

    def blocked(shape: tuple[int, ...]) -> int:
        batch, channels, *spatial = shape
        return batch * math.ceil(channels / block) * block * math.prod(spatial) * x.itemsize

    blocked_input = blocked(x.shape) if x.shape[1] >= block else 0
    forward = blocked(y.shape) + blocked_input
    backward = blocked(y.shape) + (blocked(x.shape) if x.requires_grad else 0)
    return forward, backward


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step.

    Attributes:
        peak_bytes: the largest total allocated at any point of the step.
        peak_at: where it happens: "forward <layer>", "loss", "backward <layer>" or "optimizer step".
        saved_activation_bytes: distinct tensors autograd keeps for backward (activations, indices,
            masks, statistics; the input batch and parameters excluded), at the end of the forward pass.
        workspace_bytes: the largest convolution workspace.
    """

    peak_bytes: int
    peak_at: str
    saved_activation_bytes: int
    workspace_bytes: int


class _Replay:
    """Running total of allocated bytes and its peak."""

    def __init__(self, baseline: int) -> None:
        self.live = baseline
        self.peak = baseline
        self.peak_at = "start"

    def moment(self, extra: int, where: str) -> None:
        """Notes the total with `extra` transient bytes on top of what is live."""
        if self.live + extra > self.peak:
            self.peak, self.peak_at = self.live + extra, where


def saved_storages(trace: Trace, node: Node, cost: LayerCost | None) -> list[int]:
    """Storages of the activations `node` keeps for backward; the input batch and parameters, which stay
    allocated anyway, are left out."""
    if cost is None:
        return []
    values = [node.inputs[i] for i in cost.saved_inputs] + [node.outputs[i] for i in cost.saved_outputs]
    storages = (trace.values[value].storage for value in values)
    return [s for s in storages if trace.storage_creator[s] is not None]


def _last_savers(trace: Trace, costs: list[LayerCost | None]) -> dict[int, int]:
    """Storage -> the earliest node that saves it (backward frees it after that node has run)."""
    savers: dict[int, int] = {}
    for index, (node, cost) in enumerate(zip(trace.nodes, costs)):
        for storage in saved_storages(trace, node, cost):
            savers.setdefault(storage, index)
    return savers


def _last_uses(trace: Trace) -> dict[int, int]:
    """Storage -> the last node that reads or writes it in the forward pass."""
    last: dict[int, int] = {}
    for index, node in enumerate(trace.nodes):
        for value in (*node.inputs, *node.outputs):
            last[trace.values[value].storage] = index
    return last


def simulate_step(trace: Trace, costs: list[LayerCost | None], workspaces: list[tuple[int, int]],
                  resident_bytes: int, optimizer_temporary_bytes: int) -> StepMemory:
    """Replays one training step of `trace` (module docstring) and returns its peak.

    Args:
        trace: the forward pass; its first output is taken as the logits of a cross-entropy loss.
        costs: each node's cost, None for nodes that are not counted (their saved tensors are unknown).
        workspaces: each node's (forward, backward) workspace bytes.
        resident_bytes: bytes allocated throughout: parameters, buffers, optimizer state, input batch
            and targets.
        optimizer_temporary_bytes: the optimizer update's largest transient allocation.
    """
    replay = _Replay(resident_bytes)
    savers = _last_savers(trace, costs)
    kept = savers.keys() | {trace.values[v].storage for v in trace.outputs}  # the caller holds the logits
    _forward(trace, costs, workspaces, replay, kept)
    saved_bytes = sum(trace.storage_bytes[s] for s in savers) + sum(c.saved_buffer_bytes for c in costs if c)
    log_probs = trace.values[trace.outputs[0]].spec.nbytes  # log_softmax keeps its output for backward
    replay.live += log_probs
    replay.moment(2 * log_probs, "loss")  # backward: gradients of the log-probabilities and of the logits
    replay.live -= log_probs
    weight_grads = _backward(trace, costs, workspaces, replay, savers)
    replay.live += weight_grads
    replay.moment(optimizer_temporary_bytes, "optimizer step")
    largest_workspace = max((max(pair) for pair in workspaces), default=0)
    return StepMemory(replay.peak, replay.peak_at, saved_bytes, largest_workspace)


def _forward(trace: Trace, costs: list[LayerCost | None], workspaces: list[tuple[int, int]], replay: _Replay,
             kept: set[int]) -> None:
    """Allocates each node's new outputs and saved buffers; frees outputs nobody keeps after their last use."""
    last_use = _last_uses(trace)
    created: dict[int, list[int]] = {}
    for storage, creator in enumerate(trace.storage_creator):
        if creator is not None:
            created.setdefault(creator, []).append(storage)
    freed_after: dict[int, list[int]] = {}
    for storage, index in last_use.items():
        if trace.storage_creator[storage] is not None and storage not in kept:
            freed_after.setdefault(index, []).append(storage)
    for index, node in enumerate(trace.nodes):
        cost = costs[index]
        new = sum(trace.storage_bytes[s] for s in created.get(index, ())) + (cost.saved_buffer_bytes if cost else 0)
        replay.moment(new + workspaces[index][0], f"forward {node.name}")
        replay.live += new - sum(trace.storage_bytes[s] for s in freed_after.get(index, ()))


class _Gradients:
    """Gradient tensors of activations: one buffer per value, shared by the values a pass-through layer
    (addition, concatenation, view) hands the same gradient to."""

    def __init__(self) -> None:
        self.buffer_of: dict[int, int] = {}  # value -> buffer
        self.bytes: dict[int, int] = {}  # buffer -> bytes
        self.users: dict[int, int] = {}  # buffer -> values holding it
        self._made = 0

    @property
    def live(self) -> int:
        return sum(self.bytes.values())

    def give(self, value: int, buffer: int) -> None:
        self.buffer_of[value] = buffer
        self.users[buffer] += 1

    def new(self, value: int, nbytes: int) -> None:
        buffer, self._made = self._made, self._made + 1
        self.bytes[buffer], self.users[buffer] = nbytes, 0
        self.give(value, buffer)

    def release(self, value: int) -> None:
        buffer = self.buffer_of.pop(value, None)
        if buffer is None:
            return
        self.users[buffer] -= 1
        if self.users[buffer] == 0:
            del self.bytes[buffer], self.users[buffer]


def _backward(trace: Trace, costs: list[LayerCost | None], workspaces: list[tuple[int, int]], replay: _Replay,
              savers: dict[int, int]) -> int:
    """Runs backward in reverse node order; returns the bytes of weight gradients it allocated."""
    grads = _Gradients()
    grads.new(trace.outputs[0], trace.values[trace.outputs[0]].spec.nbytes)
    freed_at: dict[int, list[int]] = {}
    for storage, index in savers.items():
        freed_at.setdefault(index, []).append(storage)
    weight_grads, done = 0, set()
    for index in reversed(range(len(trace.nodes))):
        node, cost = trace.nodes[index], costs[index]
        incoming = [v for v in node.outputs if v in grads.buffer_of]
        if incoming:
            new_weights = sum(p.nbytes for p in node.parameters if p.requires_grad and p.storage not in done)
            done |= {p.storage for p in node.parameters}
            accumulating = _input_gradients(trace, node, cost, grads, incoming[0])
            replay.moment(grads.live + weight_grads + new_weights + accumulating + workspaces[index][1],
                          f"backward {node.name}")
            weight_grads += new_weights
            for value in node.outputs:
                grads.release(value)
        replay.live -= sum(trace.storage_bytes[s] for s in freed_at.get(index, ()))
        replay.live -= cost.saved_buffer_bytes if cost else 0
    return weight_grads


def _input_gradients(trace: Trace, node: Node, cost: LayerCost | None, grads: _Gradients, incoming: int) -> int:
    """Gives `node`'s inputs that need one their gradient; returns the bytes of gradients being accumulated.

    A pass-through layer shares its output gradient with its inputs; any other layer allocates a new
    gradient per input. An input that already has a gradient (it feeds several layers) gets the new one
    added: autograd allocates the incoming gradient and frees it after the sum.
    """
    transient = 0
    for value in node.inputs:
        spec = trace.values[value].spec
        if not spec.requires_grad:
            continue
        if value in grads.buffer_of:
            transient += spec.nbytes
        elif cost is not None and cost.grad_passthrough:
            grads.give(value, grads.buffer_of[incoming])
        else:
            grads.new(value, spec.nbytes)
    return transient
