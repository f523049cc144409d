"""Synchronous data parallelism: gradients summed by a selectable allreduce algorithm, overlapped with backward."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import all_gather
from polytrain.comm.mesh import Mesh
from polytrain.comm.sparse import SPARSE_ALLREDUCE_ALGORITHMS
from polytrain.compress import Compressor
from polytrain.strategies import STRATEGIES, PolicyBase, Update
from polytrain.strategies.averaging import average_into
from polytrain.strategies.compressed import CompressedReducer
from polytrain.strategies.sufficient_factors import SufficientFactors
from polytrain.strategies.syncbn import convert_sync_batchnorm

MB = 1 << 20
SUFFICIENT_FACTOR_MODES = ("off", "auto", "always")


@dataclass
class _Bucket:
    """Parameters whose gradients are reduced together in one flat buffer."""

    params: list[nn.Parameter]
    ready: int = 0
    future: Future | None = None
    flat: torch.Tensor | None = field(default=None, repr=False)


class CommQueue:
    """Runs every collective of a rank on one background thread, in submission order.

    One thread keeps the order of collectives identical on every rank (they are submitted in the same
    order), lets reductions overlap the rest of the backward pass, and keeps gradient buckets and
    synchronized batch norm from issuing transfers concurrently.
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polytrain-comm")

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def run(self, fn, *args):
        """Runs `fn(*args)` on the communication thread and waits for its result."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


@dataclass(frozen=True)
class AllReduceArgs:
    """Arguments of `allreduce` (see AllReduce).

    Attributes:
        algorithm: allreduce algorithm name (central, tree, butterfly, ring, rabenseifner, native).
        bucket_mb: bucket size in MiB.
        sync_bn: synchronize batch-norm statistics over all replicas (default: local statistics).
        overlap: launch bucket reductions during backward (else all after backward).
        sparse_algorithm: SparCML algorithm for sparse payloads (ssar_recursive_doubling,
            ssar_split_allgather, dsar_split_allgather).
        sufficient_factors: off; auto (fully connected layers send their factors where that sends fewer
            bytes); always (wherever a layer can be factorised).
    """

    algorithm: str = "native"
    bucket_mb: float = 25.0
    sync_bn: bool = False
    overlap: bool = True
    sparse_algorithm: str = "ssar_recursive_doubling"
    sufficient_factors: str = "off"

    def __post_init__(self) -> None:
        ALLREDUCE_ALGORITHMS.get(self.algorithm)
        SPARSE_ALLREDUCE_ALGORITHMS.get(self.sparse_algorithm)
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be a positive number of MiB, got {self.bucket_mb!r}")
        for flag in ("sync_bn", "overlap"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.sufficient_factors not in SUFFICIENT_FACTOR_MODES:
            raise ValueError(f"sufficient_factors must be one of {', '.join(SUFFICIENT_FACTOR_MODES)}; "
                             f"got {self.sufficient_factors!r}")


@STRATEGIES.register("allreduce")
class AllReduce(PolicyBase):
    """Synchronous SGD over data parallelism (Ben-Nun & Hoefler 2019, sec. 5.1 / 6.1).

    Each replica computes the gradient of its share of the global batch, scaled by 1/global batch, and the
    replicas sum the gradients with the chosen algorithm over the mesh's dp axis, so every replica applies
    the same global-mean gradient and the run equals one worker with the same global batch. Gradients are
    grouped into buckets of `bucket_mb` (in reverse registration order, roughly the order backward
    produces them); a bucket is reduced on the communication thread as soon as its last gradient is
    accumulated, overlapping the rest of the backward pass, as in PyTorch DDP (Li et al., VLDB 2020).

    With a compressor, each bucket's gradients are compressed on the communication thread and their
    payloads summed as the compressor declares (polytrain.strategies.compressed). Fully connected layers
    may instead exchange their sufficient factors (polytrain.strategies.sufficient_factors).

    With a robust aggregator (`--aggregator`, a Combination), there are no buckets: after backward every
    replica's whole gradient vector is all-gathered (counted as `allgather`: (n-1) d elements received per
    rank), combined identically on every rank (polytrain.aggregators) and applied; the aggregator's state
    (centered clipping's center) is the same on every rank.

    Args:
        mesh: this rank's mesh; gradients are summed over its dp communicator.
        args: see AllReduceArgs.
        compressor: gradient compressor of this rank (built by the trainer from --compressor).
    """

    Args = AllReduceArgs
    compresses = True
    aggregates = True

    def __init__(self, mesh: Mesh, args: AllReduceArgs = AllReduceArgs(), compressor: Compressor | None = None) -> None:
        if mesh.dp is None:
            raise ValueError("strategy allreduce needs at least 2 data-parallel replicas (--workers 2 or more)")
        self.comm = mesh.dp
        self.bookkeeping = mesh.bookkeeping
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.args = args
        self.algorithm = ALLREDUCE_ALGORITHMS.get(args.algorithm)
        self.bucket_bytes = int(args.bucket_mb * MB)
        self.compressor = compressor
        self.reducer: CompressedReducer | None = None
        self.factors: SufficientFactors | None = None
        self.queue = CommQueue()
        self.buckets: list[_Bucket] = []
        self.last_microbatch = True
        self.hooks: list = []

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        if self.args.sync_bn:
            model = convert_sync_batchnorm(model, self.sum_across_ranks)
        if self.combination is not None:
            self.gathered = [p for p in model.parameters() if p.requires_grad]
            return model
        if self.args.sufficient_factors != "off":
            # The local batch is set by set_batch_size before the first step.
            self.factors = SufficientFactors(self.comm, model, self.algorithm, 1, self.args.sufficient_factors)
        handled = self.factors.parameters() if self.factors is not None else set()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p not in handled]
        if self.compressor is not None:
            self.reducer = CompressedReducer(self.comm, self.compressor, self.algorithm, named,
                                             self.args.sparse_algorithm)
        self.buckets = self._make_buckets([p for _, p in named])
        if self.args.overlap:
            for bucket in self.buckets:
                for param in bucket.params:
                    self.hooks.append(param.register_post_accumulate_grad_hook(self._hook(bucket)))
        return model

    def _make_buckets(self, params: list[nn.Parameter]) -> list[_Bucket]:
        buckets, current, size = [], [], 0
        for param in reversed(params):
            current.append(param)
            size += param.numel() * param.element_size()
            if size >= self.bucket_bytes:
                buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            buckets.append(_Bucket(current))
        return buckets

    def _hook(self, bucket: _Bucket):
        def on_gradient(param: nn.Parameter) -> None:
            if self.last_microbatch:
                bucket.ready += 1
                if bucket.ready == len(bucket.params):
                    self._launch(bucket)

        return on_gradient

    def _launch(self, bucket: _Bucket) -> None:
        if self.reducer is not None:
            bucket.future = self.queue.submit(self.reducer.reduce, bucket.params)
            return
        if bucket.flat is None:  # allocated once: a fresh multi-MB buffer every step costs page faults
            bucket.flat = torch.empty(sum(p.numel() for p in bucket.params), dtype=bucket.params[0].dtype,
                                      device=bucket.params[0].device)
        for param, slot in zip(bucket.params, self._unflatten(bucket)):
            if param.grad is None:
                slot.zero_()
            elif param.grad.data_ptr() != slot.data_ptr():  # not already its slot (gradients kept, not None)
                slot.copy_(param.grad)
        bucket.future = self.queue.submit(self.algorithm.all_reduce, self.comm, bucket.flat)

    def set_batch_size(self, global_batch: int) -> None:
        if self.factors is not None:
            self.factors.set_local_batch(-(-global_batch // self.world_size))

    def before_backward(self, last_microbatch: bool) -> None:
        self.last_microbatch = last_microbatch

    def step(self, model: nn.Module, update: Update, global_step: int) -> None:
        if self.combination is not None:
            self.combine_gradients(global_step)
        else:
            self.reduce_gradients()
        update()

    def combine_gradients(self, global_step: int) -> None:
        """Every replica's whole gradient, gathered and combined by the run's aggregator."""
        params = self.gathered
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        rows = torch.stack(self.queue.run(all_gather, self.comm, flat, True)) * self.world_size
        combined = self.combination.combine(rows, global_step)
        for param, values in zip(params, combined.split([p.numel() for p in params])):
            param.grad = values.view_as(param)

    def reduce_gradients(self) -> None:
        """Launches the buckets not yet launched (unused parameters, no overlap), then unpacks every sum."""
        for bucket in self.buckets:
            if bucket.future is None:
                self._launch(bucket)
        # Submitted after every bucket, so the order of collectives is the same on all ranks.
        factors = self.queue.submit(self.factors.reduce) if self.factors is not None else None
        for bucket in self.buckets:
            result = bucket.future.result()
            if self.reducer is None:
                # The gradients become views of the summed bucket (DDP's gradient_as_bucket_view): no
                # copy back. The trainer sets them to None before the next step refills the bucket.
                for param, summed in zip(bucket.params, self._unflatten(bucket)):
                    param.grad = summed
            else:
                for param, summed in zip(bucket.params, result):
                    param.grad = summed.clone()  # a compressor's result may share memory with its state
            bucket.ready, bucket.future = 0, None
        if factors is not None:
            factors.result()

    @staticmethod
    def _unflatten(bucket: _Bucket) -> list[torch.Tensor]:
        sizes = [param.numel() for param in bucket.params]
        return [piece.view_as(param) for piece, param in zip(bucket.flat.split(sizes), bucket.params)]

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.detach().clone().contiguous()
        self.queue.run(self.algorithm.all_reduce, self.comm, summed.view(-1))
        return summed

    @contextlib.contextmanager
    def evaluation_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """Averages floating buffers over the replicas first (bookkeeping traffic): with local batch norm
        each replica tracks the statistics of its own shards, and their mean estimates those of the global
        batch. (DDP instead copies rank 0's buffers before every forward.)"""
        average_into([b for b in model.buffers() if b.is_floating_point()], self.bookkeeping)
        yield model

    def report(self) -> dict:
        section = {"algorithm": self.algorithm.name, "buckets": len(self.buckets)}
        if self.combination is not None:
            section["aggregator"] = self.combination.report()
        if self.reducer is not None:
            section["compressor"] = {"name": self.compressor.name, "sparse_algorithm": self.args.sparse_algorithm,
                                     "uncompressed_parameters": self.reducer.uncompressed()}
        if self.factors is not None:
            section["sufficient_factors"] = self.factors.report()
        return section

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's compressor state (residuals differ between ranks), the aggregator's (the same on every
        rank)."""
        if self.combination is not None:
            return {"aggregator": self.combination.aggregator.state_dict()}
        return {"compressor": self.reducer.state_dict()} if self.reducer is not None else {}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.combination is not None:
            self.combination.aggregator.load_state_dict(state.get("aggregator", {}))
        if self.reducer is not None:
            if "compressor" not in state:
                raise ValueError("the checkpoint holds no compressor state; it was trained without --compressor")
            self.reducer.load_state_dict(state["compressor"])

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.factors is not None:
            self.factors.close()
        self.queue.close()
