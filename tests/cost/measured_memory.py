"""Measures the peak memory of a real training step on the CPU, from the allocator's own events."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _allocations(nodes):
    """Allocation events of the profiler's event tree, the record torch's own memory timeline
    (torch.profiler._memory_profiler) is built from; each carries the signed size allocated or freed."""
    for node in nodes:
        if node.tag == _EventType.Allocation:
            yield node
        yield from _allocations(node.children)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_step_peak(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor) -> int:
    """Peak bytes allocated during one forward, backward and optimizer step, in steady state.

    A first step creates the optimizer state; gradients are then set to None, as `zero_grad` does, and a
    second step runs under `torch.profiler` with `profile_memory=True`. With that flag the CPU allocator
    (c10's `ProfiledCPUMemoryReporter`) reports every allocation and free with its size, so summing them
    in time order gives the bytes allocated inside the step exactly, including operator workspaces that
    never become Python tensors. What existed before the step (parameters, buffers, optimizer state, the
    batch) is added from the tensors themselves. `tracemalloc` cannot see these allocations, and
    `torch.cuda.max_memory_allocated` has no CPU counterpart.
    """
    def step() -> None:
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    before = _tensor_bytes([*model.parameters(), *model.buffers(), *state, x, y])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()),
                    key=lambda node: node.start_time_ns)
    live = peak = 0
    for event in events:
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return before + peak
