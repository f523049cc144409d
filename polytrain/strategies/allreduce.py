"""Synchronous data parallelism: gradients summed by a selectable allreduce algorithm, overlapped with backward."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from polytrain.comm import Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.sparse import SPARSE_ALLREDUCE_ALGORITHMS
from polytrain.compress import Compressor
from polytrain.strategies import STRATEGIES, comm_section
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


@STRATEGIES.register("allreduce")
class AllReduce:
    """Synchronous SGD over data parallelism (Ben-Nun & Hoefler 2019, sec. 5.1 / 6.1).

    Each rank computes the gradient of its share of the global batch, scaled by 1/global batch, and the
    ranks sum the gradients with the chosen algorithm, so every rank applies the same global-mean gradient
    and the run equals one worker with the same global batch. Gradients are grouped into buckets of
    `bucket_mb` (in reverse registration order, roughly the order backward produces them); a bucket is
    reduced on the communication thread as soon as its last gradient is accumulated, overlapping the rest
    of the backward pass, as in PyTorch DDP (Li et al., VLDB 2020).

    With a compressor, each bucket's gradients are compressed on the communication thread and their
    payloads summed as the compressor declares (polytrain.strategies.compressed). Fully connected layers
    may instead exchange their sufficient factors (polytrain.strategies.sufficient_factors).

    Args:
        comm: this rank's communicator.
        compressor: gradient compressor of this rank (passed by the trainer from --compressor).
        algorithm: allreduce algorithm name (central, tree, butterfly, ring, rabenseifner, native).
        bucket_mb: bucket size in MiB.
        sync_bn: synchronize batch-norm statistics over all ranks (default: local statistics).
        overlap: launch bucket reductions during backward (else all after backward).
        sparse_algorithm: SparCML algorithm for sparse payloads (ssar_recursive_doubling,
            ssar_split_allgather, dsar_split_allgather).
        sufficient_factors: off; auto (fully connected layers send their factors where that sends fewer
            bytes); always (wherever a layer can be factorised).
    """

    parallel = True
    compresses = True

    @staticmethod
    def check(algorithm: str = "native", bucket_mb: float = 25.0, sync_bn: bool = False,
              overlap: bool = True, sparse_algorithm: str = "ssar_recursive_doubling",
              sufficient_factors: str = "off") -> None:
        """Raises ValueError for invalid arguments, before any worker starts."""
        ALLREDUCE_ALGORITHMS.get(algorithm)
        SPARSE_ALLREDUCE_ALGORITHMS.get(sparse_algorithm)
        if not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
        if sufficient_factors not in SUFFICIENT_FACTOR_MODES:
            raise ValueError(f"sufficient_factors must be one of {', '.join(SUFFICIENT_FACTOR_MODES)}; "
                             f"got {sufficient_factors!r}")

    def __init__(self, comm: Communicator, compressor: Compressor | None = None, algorithm: str = "native",
                 bucket_mb: float = 25.0, sync_bn: bool = False, overlap: bool = True,
                 sparse_algorithm: str = "ssar_recursive_doubling", sufficient_factors: str = "off") -> None:
        self.check(algorithm, bucket_mb, sync_bn, overlap, sparse_algorithm, sufficient_factors)
        self.comm = comm
        comm.reset_stats()  # the run's counts start here, also when ranks run several runs in sequence
        self.rank, self.world_size = comm.rank, comm.world_size
        self.algorithm = ALLREDUCE_ALGORITHMS.get(algorithm)
        self.bucket_bytes = int(bucket_mb * MB)
        self.sync_bn = sync_bn
        self.overlap = overlap
        self.compressor = compressor
        self.sparse_algorithm = sparse_algorithm
        self.sufficient_factors = sufficient_factors
        self.reducer: CompressedReducer | None = None
        self.factors: SufficientFactors | None = None
        self.queue = CommQueue()
        self.buckets: list[_Bucket] = []
        self.last_microbatch = True
        self.hooks: list = []

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.sync_bn:
            model = convert_sync_batchnorm(model, self.sum_across_ranks)
        if self.sufficient_factors != "off":
            # The local batch is set by set_batch_size before the first step.
            self.factors = SufficientFactors(self.comm, model, self.algorithm, 1, self.sufficient_factors)
        handled = self.factors.parameters() if self.factors is not None else set()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p not in handled]
        if self.compressor is not None:
            self.reducer = CompressedReducer(self.comm, self.compressor, self.algorithm, named,
                                             self.sparse_algorithm)
        self.buckets = self._make_buckets([p for _, p in named])
        if self.overlap:
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
            bucket.flat = torch.empty(sum(p.numel() for p in bucket.params), dtype=bucket.params[0].dtype)
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

    def after_backward(self, model: nn.Module) -> None:
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

    def sync_buffers(self, model: nn.Module) -> None:
        """Averages floating buffers over the ranks: with local batch norm each rank tracks the statistics
        of its own shards, and their mean estimates those of the global batch. (DDP instead copies rank 0's
        buffers before every forward.)"""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        mean = self.sum_across_ranks(torch.cat([b.reshape(-1) for b in buffers])) / self.world_size
        offset = 0
        for buffer in buffers:
            buffer.copy_(mean[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def comm_stats(self, steps: int) -> dict:
        """Every rank's counts, gathered to all ranks (the gather itself is bookkeeping, not counted)."""
        per_rank: list = [None] * self.world_size
        dist.all_gather_object(per_rank, self.comm.stats.as_dict(), group=self.comm.group)
        section = {**comm_section(per_rank, steps), "algorithm": self.algorithm.name, "buckets": len(self.buckets)}
        if self.reducer is not None:
            section["compressor"] = {"name": self.compressor.name, "sparse_algorithm": self.sparse_algorithm,
                                     "uncompressed_parameters": self.reducer.uncompressed()}
        if self.factors is not None:
            section["sufficient_factors"] = self.factors.report()
        return section

    def state_dict(self) -> dict:
        """Every rank's compressor state (collective: all ranks call it; residuals differ between ranks)."""
        if self.reducer is None:
            return {}
        per_rank: list = [None] * self.world_size
        dist.all_gather_object(per_rank, self.reducer.state_dict(), group=self.comm.group)
        return {"compressor": per_rank}

    def load_state_dict(self, state: dict) -> None:
        per_rank = state.get("compressor", [])
        if self.reducer is None:
            return
        if len(per_rank) != self.world_size:
            raise ValueError(f"the checkpoint holds compressor state of {len(per_rank)} ranks; "
                             f"this run has {self.world_size}")
        self.reducer.load_state_dict(per_rank[self.rank])

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.factors is not None:
            self.factors.close()
        self.queue.close()
