"""Krizhevsky's "one weird trick" (2014, arXiv:1404.5997) as an update policy: `--strategy krizhevsky`.

On a data-parallel mesh of K ranks each rank reads its own batch. The convolutional part of the model is
data-parallel: replicated, its gradients summed over the K ranks by the `allreduce` policy's machinery
(buckets overlapped with backward, any allreduce algorithm; counted under its usual operation names on axis
dp). The fully connected part is model-parallel over the same K ranks: `prepare` splits it and exchanges the
batch at the boundary (polytrain.parallel.hybrid, where the step, the backward and the random state are
described); each rank's fully connected shards take part in all K batches, so they get no further
reduction. The result equals one worker training on the global batch with K microbatches.

The optimizer holds the same Parameter objects after the split (each keeps its shard), so its step is the
run's `update()` after the convolutional gradients are summed. A checkpoint holds the unsplit model (the
model's state_dict gathers it) and every rank's optimizer state (of its shards); it resumes at the same
world size. Evaluation: every rank its own test share, through the same exchange (bookkeeping), batch norm
buffers of the convolutional part averaged first, as `allreduce` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from polytrain.comm.mesh import Mesh
from polytrain.parallel.hybrid import HybridModel, hybrid_plan
from polytrain.strategies import STRATEGIES, PolicyBase, RankOptimizerState, Update
from polytrain.strategies.allreduce import AllReduce, AllReduceArgs


@dataclass(frozen=True)
class KrizhevskyArgs:
    """Arguments of `krizhevsky`: how the convolutional part's gradients are summed (as in `allreduce`).

    Attributes:
        algorithm: allreduce algorithm name (central, tree, butterfly, ring, rabenseifner, native).
        bucket_mb: bucket size in MiB.
        overlap: launch bucket reductions during backward (else all after backward).
    """

    algorithm: str = "native"
    bucket_mb: float = 25.0
    overlap: bool = True

    def __post_init__(self) -> None:
        self.conv_args()  # validates them

    def conv_args(self) -> AllReduceArgs:
        return AllReduceArgs(algorithm=self.algorithm, bucket_mb=self.bucket_mb, overlap=self.overlap)

    def check_model(self, model: nn.Module, replicas: int) -> None:
        """Raises a one-line ValueError for a model the hybrid cannot split over `replicas` ranks."""
        hybrid_plan(model, replicas)


@STRATEGIES.register("krizhevsky")
class Krizhevsky(RankOptimizerState, PolicyBase):
    """Data-parallel convolutions, model-parallel fully connected layers, the batch exchanged at the boundary
    (Krizhevsky 2014; see the module docstring)."""

    Args = KrizhevskyArgs
    name = "krizhevsky"
    splits_model = True

    def __init__(self, mesh: Mesh, args: KrizhevskyArgs = KrizhevskyArgs(), compressor: None = None) -> None:
        if mesh.dp is None or mesh.dp_size != mesh.world_size:
            raise ValueError("strategy krizhevsky needs at least 2 workers, every rank a data-parallel replica")
        self.comm, self.args = mesh.dp, args
        self.conv = AllReduce(mesh, args.conv_args())  # the convolutional part's gradients
        self.model: HybridModel | None = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.model = HybridModel(model, self.comm)
        # Its hooks fire in the convolutional part's backward, after every fully connected collective of the
        # microbatch (the gathered activations' gradient comes last), so the communication thread and this
        # one never use the dp group at once.
        self.conv.prepare(self.model.conv, optimizer)
        return self.model

    def set_batch_size(self, global_batch: int) -> None:
        self.conv.set_batch_size(global_batch)

    def before_backward(self, last_microbatch: bool) -> None:
        self.conv.before_backward(last_microbatch)

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        self.conv.step(model, update, global_step)  # sum the convolutional gradients, update()

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        with self.conv.evaluation_model(model.conv):  # the convolutional part's buffers averaged
            yield model
        model.drain()  # answer the exchanges of replicas whose shares took more batches

    def report(self) -> dict:
        model = self.model
        return {**self.conv.report(), "boundary": model.start if model is not None else None,
                "pairs": [[pair.column, pair.row] for pair in model.pairs] if model is not None else []}


    def close(self) -> None:
        self.conv.close()
