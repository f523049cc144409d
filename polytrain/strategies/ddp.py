"""`ddp`: PyTorch's own DistributedDataParallel as an update policy, the peer polytrain's `allreduce` is measured
against inside the same harness (`polytrain compare --strategy allreduce --strategy ddp`).

The replica is wrapped in `torch.nn.parallel.DistributedDataParallel` over the mesh's dp process group with
DDP's own buckets, overlap and bucket views; one comm hook (DDP's documented extension point) sums each
bucket with gloo's allreduce through polytrain's communicator, which counts it (estimated as ring
allreduce, like `allreduce:algorithm=native`). Summing rather than DDP's default averaging keeps polytrain's
loss convention (each replica's loss is divided by the global batch), so N ranks equal one worker with the
same global batch, as for `allreduce`. Buffers are not broadcast by default (local batch-norm statistics,
as `allreduce` without sync_bn); DDP's constructor broadcasts rank 0's parameters once, as it always does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, Update


@dataclass(frozen=True)
class DDPArgs:
    """Arguments of `ddp`.

    Attributes:
        bucket_mb: DDP's bucket_cap_mb (its default 25; its first bucket is 1 MiB, as DDP makes it).
        broadcast_buffers: DDP's broadcast_buffers (rank 0's buffers before every forward).
    """

    bucket_mb: float = 25.0
    broadcast_buffers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be a positive number of MiB, got {self.bucket_mb!r}")
        if not isinstance(self.broadcast_buffers, bool):
            raise ValueError(f"broadcast_buffers must be true or false, got {self.broadcast_buffers!r}")


class _Wrapped(DistributedDataParallel):
    """DDP whose state is the replica's own (model.pt and checkpoints hold the same keys as any other run)."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


@STRATEGIES.register("ddp")
class TorchDDP(PolicyBase):
    """torch.nn.parallel.DistributedDataParallel over the dp axis (pure data parallelism, one microbatch)."""

    Args = DDPArgs

    def __init__(self, mesh: Mesh, args: DDPArgs = DDPArgs(), compressor: None = None) -> None:
        if mesh.dp is None:
            raise ValueError("strategy ddp needs at least 2 data-parallel replicas (--workers 2 or more)")
        self.comm = mesh.dp
        self.args = args

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers; older releases know only the first
        name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        wrapped = _Wrapped(model, process_group=self.comm.group, bucket_cap_mb=self.args.bucket_mb,
                           gradient_as_bucket_view=True, **{name: self.args.broadcast_buffers})
        wrapped.register_comm_hook(self.comm, _summed)
        return wrapped

    def before_backward(self, last_microbatch: bool) -> None:
        if not last_microbatch:  # validation forbids it; DDP decides on no_sync at forward, before this
            raise RuntimeError("strategy ddp synchronises every backward: it runs one microbatch per step")

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        update()  # DDP's backward already summed every bucket


def _summed(comm, bucket):  # no annotation: DDP compares it with the type, which postponed annotations are not
    """DDP comm hook: the bucket's sum over the replicas (not DDP's mean), counted by the communicator."""
    work = comm.native_all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])
