"""Hogwild!: worker processes on one host update one copy of the parameters in shared memory, without locks
(Recht, Re, Wright & Niu, NeurIPS 2011).

`--strategy hogwild`: rank 0 puts the parameters and floating buffers into one file in /dev/shm, every
rank maps it (MAP_SHARED) and points its model's tensors into it, and the file is unlinked at once (the
mappings stay; nothing is left behind, also when a rank dies). Each rank then trains on its shard of every
global batch with its own optimizer (momentum and Adam state are per process, as in pytorch/examples'
mnist_hogwild), and its optimizer steps write straight into the shared parameters while the others read and
write them. Gradients stay as the step schedule computed them, each rank's share of the global batch's
mean (its shard's sum over the global batch): the p ranks' updates add up to one synchronous step of plain
SGD, so a run keeps the single worker's learning rate and global batch. (mnist_hogwild instead steps every
process at the full rate on its own batch: p times the update; here that is `--lr` times p.) No byte is
sent: result.json's training traffic is zero and `comm.shared_memory_bytes` says what is shared.

Evaluation needs no consensus: there is one model. The epoch's metric sums are collective, so every rank
has finished its steps before any evaluates, and evaluates before any steps again. A checkpoint holds the
shared model and every rank's optimizer state; it resumes at the same world size. All ranks must be on one
host (checked, one line otherwise).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from polytrain.comm.mesh import Mesh
from polytrain.strategies import STRATEGIES, PolicyBase, RankOptimizerState, Update


@dataclass(frozen=True)
class HogwildArgs:
    """`hogwild` takes no arguments."""


def _shared_folder() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@STRATEGIES.register("hogwild")
class Hogwild(RankOptimizerState, PolicyBase):
    """Lock-free updates of one shared copy of the model by every rank of the host."""

    Args = HogwildArgs
    name = "hogwild"

    def __init__(self, mesh: Mesh, args: HogwildArgs, compressor: None = None) -> None:
        if mesh.dp is None or mesh.dp.world_size != mesh.world_size:
            raise ValueError("hogwild needs at least 2 workers, every rank a data-parallel replica")
        self.comm = mesh.bookkeeping
        self.shared_bytes = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        dtypes = {t.dtype for t in tensors}
        if dtypes != {torch.float32} or any(t.device.type != "cpu" for t in tensors):
            raise ValueError(f"hogwild shares float32 CPU tensors; the model has {sorted(map(str, dtypes))} on "
                             f"{sorted({t.device.type for t in tensors})}")
        numel = sum(t.numel() for t in tensors)
        self.shared_bytes = 4 * numel
        path = None
        if self.comm.rank == 0:
            descriptor, path = tempfile.mkstemp(prefix="polytrain-hogwild-", dir=_shared_folder())
            os.close(descriptor)
            os.truncate(path, self.shared_bytes)
        places: list = [None] * self.comm.world_size  # setup metadata, not training traffic: uncounted
        dist.all_gather_object(places, (socket.gethostname(), path), group=self.comm.group)
        hosts = sorted({host for host, _ in places})
        if len(hosts) > 1:
            if path is not None:
                os.unlink(path)
            raise ValueError(f"hogwild shares memory between the workers of one host; they are on {', '.join(hosts)}")
        path = places[0][1]
        shared = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
        if self.comm.rank == 0:
            shared.copy_(torch.cat([t.detach().reshape(-1) for t in tensors]))
        self.comm.barrier()  # rank 0's values are in; every rank maps and points at them
        with torch.no_grad():
            for tensor, view in zip(tensors, shared.split([t.numel() for t in tensors])):
                tensor.data = view.view_as(tensor)
        self.comm.barrier()
        if self.comm.rank == 0:
            os.unlink(path)  # the mappings stay until the processes end
        return model

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        update()

    def report(self) -> dict:
        return {"shared_memory_bytes": self.shared_bytes}

