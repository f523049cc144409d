"""The loop-level API: every update policy of polytrain in a user's own training loop.

    session = polytrain.setup(strategy="allreduce:algorithm=ring", compressor="fp16")
    model, optimizer = session.setup(model, optimizer)
    for epoch in range(epochs):
        for x, y in session.loader(train_set, batch_size=128, epoch=epoch):   # this replica's shard
            optimizer.zero_grad()
            session.backward(loss_fn(model(x), y))                               # hooks of the policy
            session.step()                                                       # reduce, step, after
        with session.evaluation_model() as consensus: ...
        totals = session.sum({"loss": ..., "samples": ...})                    # over the replicas

`polytrain.setup` joins the ranks that `polytrain run SCRIPT.py --workers N` or torchrun started (their
environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or runs as one process. The Trainer runs on a
Session too: a rank's mesh, device, mixed precision, update policy and checkpoints are this one object,
whichever loop drives it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from polytrain.comm import Communicator
from polytrain.comm.gather import all_gather, gather_objects
from polytrain.comm.mesh import Mesh, MeshShape
from polytrain.config import ConfigError, parse_named
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.launch import init_from_torchrun, under_torchrun
from polytrain.parallel.pipeline import PipelineStage, check_partition, cut_points, module_times, pipeline_report
from polytrain.parallel.pipeline import full_state_dict as pipeline_state_dict
from polytrain.parallel.tensor import full_state_dict, load_full_state_dict, split_model
from polytrain.aggregators import Combination, build_aggregator
from polytrain.faults import Byzantine
from polytrain.strategies import STRATEGIES, UpdatePolicy, build_policy, server_ranks
from polytrain.strategies.averaging import sum_over
from polytrain.train.amp import MixedPrecision
from polytrain.train.checkpoint import (CheckpointError, load_checkpoint, reshard_error, rng_state, save_checkpoint,
                                        set_rng_state)
from polytrain.train.compression import compress_for

DEFAULT_TIMEOUT_S = 60.0


def rank_device(device: str, comm: Communicator | None) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK under torchrun, else the rank modulo the GPUs) or the CPU."""
    if device != "cuda":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", comm.rank if comm is not None else 0)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(device: str) -> str:
    """nccl for ranks on GPUs, gloo for CPU ranks."""
    return "nccl" if device == "cuda" else "gloo"


class Session:
    """One rank's part of a data-parallel run: its mesh, device, mixed precision and update policy.

    Args:
        comm: this rank's communicator over the run's ranks (None: one process).
        strategy: update policy name (None: local for one rank, allreduce for more).
        strategy_args: its arguments.
        compressor: gradient compressor spec NAME[+NAME] (None: uncompressed).
        compressor_args: its arguments and its wrappers' (ef, min_numel, ...).
        mesh: axis sizes, e.g. {"dp": 2} (empty: every rank a data-parallel replica).
        device: cpu or cuda (resolved; see polytrain.train.defaults.resolve_device).
        amp: none, bf16 or fp16.
        grad_clip: clip the global gradient norm to this before each optimizer step.
        seed: seed of the sampler's per-epoch permutations.
        tp_plan: the layers a tp axis above 1 splits (polytrain.parallel.tensor.TP_PLANS).
        chunks: pipeline stages per pp rank (above 1 for interleaved schedules; `chunks_per_rank`).
        partition: how a pp axis above 1 cuts the model: "flops" (balanced by the cost model), "time"
            (balanced by measured time) or the module indices where stages 2, 3, ... begin
            (polytrain.parallel.pipeline.cut_points).
    """

    def __init__(self, comm: Communicator | None, *, strategy: str | None = None, strategy_args: Mapping | None = None,
                 compressor: str | None = None, compressor_args: Mapping | None = None, mesh: Mapping | None = None,
                 device: str = "cpu", amp: str = "none", grad_clip: float | None = None, seed: int = 0,
                 tp_plan: str = "linear", chunks: int = 1, partition: str | list = "flops",
                 aggregator: str | None = None, aggregator_args: Mapping | None = None,
                 faults: list | None = None) -> None:
        self.device = rank_device(device, comm)
        if comm is not None:
            comm.device = self.device
            comm.reset_stats()  # the run's counts start here, also when ranks run several runs in sequence
        world = comm.world_size if comm is not None else 1
        servers = server_ranks(strategy, strategy_args or {}) if strategy else 0
        shape = MeshShape.from_sizes(dict(mesh)) if mesh else MeshShape(dp=world - servers)
        shape.check_workers(world - servers)
        self.mesh = Mesh.build(shape, comm, servers)
        self.rank = self.mesh.rank
        self.strategy = strategy or ("local" if self.mesh.dp_size == 1 else "allreduce")
        self.strategy_args = dict(strategy_args or {})
        self.compressor, self.compressor_args = compressor, dict(compressor_args or {})
        self.precision = MixedPrecision(amp, self.device)
        self.grad_clip = grad_clip
        self.seed = seed
        self.tp_plan, self.chunks, self.partition = tp_plan, chunks, partition
        self.byzantine = Byzantine.of(faults or [], seed)
        self.combination = None
        if aggregator is not None:  # f: the Byzantine replicas the aggregator tolerates (default 1)
            args = {"f": 1, **(aggregator_args or {})}
            f = args.pop("f")
            self.combination = Combination(build_aggregator(aggregator, args, f), self.byzantine)
        self.policy: UpdatePolicy | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.global_step = 0
        self.step_batch: tuple[int, int] | None = None  # (this rank's samples, the global batch) of the step

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def replicas(self) -> int:
        """Data-parallel replicas (the mesh's dp axis)."""
        return self.mesh.dp_size

    # -- setting up ----------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
              input_shape: tuple[int, ...] | None = None,
              probe_batch: int = 32) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Moves `model` to this rank's device and prepares it and `optimizer` for the update policy.

        The optimizer must have been built over `model`'s parameters (moving the model keeps them). With an
        error-feedback compressor, a momentum optimizer's momentum moves in front of the compressor
        (polytrain.train.compression; a notice says so on rank 0). With a tp axis the model's layers are
        split (polytrain.parallel.tensor); with a pp axis it is cut into stages and this rank's stage is the
        model returned (polytrain.parallel.pipeline; `input_shape`, one sample's, is then needed; partition
        "time" measures each module on `probe_batch` samples, best the run's microbatch).
        """
        if self.policy is not None:
            raise RuntimeError("Session.setup was called twice; a session trains one model")
        model.to(self.device)
        compressor = None
        if self.compressor is not None:
            if not STRATEGIES.get(self.strategy).compresses:
                raise ConfigError(f"compressor {self.compressor} needs a strategy that sums gradients over "
                                  f"replicas (allreduce); {self.strategy} does not")
            compressor, notice = compress_for(self.compressor, self.compressor_args, optimizer, self.rank)
            if notice is not None and self.rank == 0:
                print(f"polytrain: {notice}", file=sys.stderr)
        self.policy = build_policy(self.strategy, self.mesh, self.strategy_args, compressor, self.combination)
        cuts = None
        if self.mesh.shape.pp > 1:  # cut the unsplit layers (servers too, as partition "time" measures on all)
            if input_shape is None:
                raise ConfigError("a pipeline needs the shape of one input sample to cut the model: "
                                  "session.setup(model, optimizer, input_shape=...)")
            cuts = self.stage_cuts(model, tuple(input_shape), probe_batch)
        if self.tp is not None:  # the same Parameter objects keep only their shards: the optimizer still holds them
            split_model(model, self.tp, self.tp_plan)
        if self.pp is not None:  # the optimizer holds every stage's parameters; only this rank's get gradients
            model = PipelineStage(model, self.pp, tuple(input_shape), chunks=self.chunks, cuts=cuts, tp=self.tp)
        self.model, self.optimizer = self.policy.prepare(model, optimizer), optimizer
        return self.model, optimizer

    def stage_cuts(self, model: nn.Module, input_shape: tuple[int, ...], probe_batch: int) -> list[int]:
        """Where the pipeline's stages begin (`cut_points`). Measured times are averaged over every rank of
        the world (as bookkeeping), so that all replicas cut alike."""
        stages, costs = self.mesh.shape.pp * self.chunks, None
        try:
            if self.partition == "time":
                check_partition(model, stages, self.partition)
                times = torch.tensor(module_times(model, input_shape, probe_batch), dtype=torch.float64)
                if self.mesh.bookkeeping is not None:
                    every = all_gather(self.mesh.bookkeeping, times, fixed_size=True, operation="partition")
                    times = torch.stack(every).mean(0)
                costs = times.tolist()
            return cut_points(model, stages, input_shape, self.partition, costs)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def tp(self) -> Communicator | None:
        """The tensor-parallel communicator (None without a tp axis above 1)."""
        return self.mesh.comms.get("tp")

    @property
    def pp(self) -> Communicator | None:
        """The pipeline communicator (None without a pp axis above 1)."""
        return self.mesh.comms.get("pp")

    @property
    def counts_metrics(self) -> bool:
        """Whether this rank's loss and metric sums count: one rank per replica (tp rank 0, the last stage)."""
        return (self.tp is None or self.tp.rank == 0) and (self.pp is None or self.pp.rank == self.pp.world_size - 1)

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state (collective with tp and pp: split layers and stages are gathered, as
        bookkeeping; with pp only the first stage's ranks get it, None elsewhere)."""
        if self.pp is not None:
            return pipeline_state_dict(self.model)
        return full_state_dict(self.model, self.tp) if self.tp is not None else self.model.state_dict()

    def pipeline_report(self, schedule: str, microbatches: int) -> dict:
        """result.json's `pipeline` section on rank 0 (the measured bubble beside the formula, in-flight
        microbatches and activation memory per stage; polytrain.parallel.pipeline.pipeline_report), empty
        without a pp axis and on other ranks (collective over pp)."""
        if self.pp is None:
            return {}
        report = pipeline_report(self.model, schedule, microbatches)
        return {"pipeline": report} if report is not None else {}

    def _ready(self) -> UpdatePolicy:
        if self.policy is None:
            raise RuntimeError("call session.setup(model, optimizer) first")
        return self.policy

    # -- the step ------------------------------------------------------------------------------------------

    def sampler(self, num_samples: int, batch_size: int, *, shuffle: bool = True,
                drop_last: bool = False) -> ShardedBatchSampler:
        """This replica's shards of global batches of `batch_size` samples: every sample once per epoch,
        the union over the replicas exactly one worker's batch (data is sharded by the dp coordinate)."""
        if batch_size % self.replicas:
            raise ConfigError(f"global batch {batch_size} is not divisible by {self.replicas} replicas")
        return ShardedBatchSampler(num_samples, batch_size, world_size=self.replicas, rank=self.mesh.dp_rank,
                                   seed=self.seed, shuffle=shuffle, drop_last=drop_last)

    def share(self, num_samples: int) -> range:
        """This replica's contiguous share of `num_samples` samples (e.g. of a test split to evaluate); the
        shares of the replicas differ in size by at most one and together cover every sample once."""
        if self.mesh.is_server:
            return range(0)
        size, extra = divmod(num_samples, self.replicas)
        rank = self.mesh.dp_rank
        start = rank * size + min(rank, extra)
        return range(start, start + size + (rank < extra))

    def loader(self, dataset: TorchDataset, batch_size: int, *, epoch: int = 0, start_step: int = 0,
               shuffle: bool = True, drop_last: bool = False, **dataloader_args: Any) -> Iterator[Any]:
        """Yields this replica's batches of `epoch` (global batch `batch_size`), on this rank's device.

        A DataLoader over `dataset` with the sharded sampler as its batch_sampler (further keywords, e.g.
        num_workers, go to the DataLoader). It also tells the policy the global batch and remembers each
        step's shard size, so that `backward` weights this replica's mean loss exactly.
        """
        policy = self._ready()
        sampler = self.sampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last)
        sampler.set_epoch(epoch, start_step)
        policy.set_batch_size(batch_size)
        loader = DataLoader(dataset, batch_sampler=sampler, **dataloader_args)
        for step, (indices, batch) in enumerate(zip(sampler.epoch(epoch, start_step), loader), start=start_step):
            self.step_batch = (len(indices), sampler.global_batch_len(step))
            yield _to_device(batch, self.device)

    def backward(self, loss: torch.Tensor, *, samples: int | None = None, last_microbatch: bool = True) -> None:
        """Backward of `loss`, the mean loss over `samples` of this replica's samples of the step.

        Gradients are summed over the replicas, so the loss is weighted by samples / global batch: for the
        batches of `loader`, exactly the global batch's mean (shards may differ by one); without a loader,
        1 / replicas (equal shards, as Horovod and DDP assume). With gradient accumulation, call it per
        microbatch with `samples` and `last_microbatch=False` for all but the last.
        """
        policy = self._ready()
        if self.step_batch is not None:
            local, global_batch = self.step_batch
            weight = (samples if samples is not None else local) / global_batch
        else:
            weight = 1.0 / self.replicas
        policy.before_backward(last_microbatch)
        self.precision.scale_loss(loss * weight).backward()

    def update(self) -> None:
        """The local update: (fp16: unscale,) clip, the optimizer's step. The policy decides when."""
        self.precision.step(self.optimizer, self.model.parameters(), self.grad_clip)

    def step(self) -> None:
        """Completes the step after its backward passes: the policy reduces, calls `update`, acts after."""
        self._ready().step(self.model, self.update, self.global_step)
        self.global_step += 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context for forward passes (amp=bf16|fp16; else nothing)."""
        return self.precision.autocast()

    # -- across replicas -----------------------------------------------------------------------------------

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Sums per-replica numbers (metrics) over the dp replicas, in one transfer counted as bookkeeping."""
        names = list(values)
        tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=self.device)
        if not self.counts_metrics:
            tensor.zero_()  # one rank per replica counts: a tp group's ranks computed the same numbers
        return dict(zip(names, sum_over(self.mesh.bookkeeping, tensor).tolist()))

    def evaluation_model(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The model to evaluate for the duration of the context: the replicas' consensus (e.g. local SGD's
        mean of the replicas), with buffers (batch norm) averaged over them."""
        return self._ready().evaluation_model(self.model)

    def finish(self) -> None:
        """After the last step: leaves every replica with the run's final model (e.g. a last average)."""
        self._ready().finish(self.model)

    def comm_stats(self) -> dict:
        """This rank's counted traffic: bytes and messages by axis and operation, bookkeeping apart."""
        comm = self.mesh.bookkeeping
        return comm.stats.as_dict() if comm is not None else {}

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None,
             rank_extra: Mapping[str, Any] | None = None) -> None:
        """Writes the whole distributed state to `path` atomically (collective: every rank calls it, and
        returns once the file is complete, so any rank may load it at once).

        The file holds the model, optimizer, loss scaler, step count, `extra` (rank 0's) and every rank's
        part: its policy state, RNG states and `rank_extra`, gathered to rank 0 as bookkeeping traffic.
        Values are tensors, numbers, strings, lists and dicts (weights_only loading).
        """
        self._ready()
        part = {"policy": self.policy.state_dict(self.model, self.optimizer), "rng": rng_state(),
                **(rank_extra or {})}
        if self.tp is not None or self.pp is not None:  # every rank's optimizer state is that of its part
            part["optimizer"] = self.optimizer.state_dict()
        model_state = self.model_state_dict()
        parts = gather_objects(self.mesh.bookkeeping, part) if self.mesh.bookkeeping is not None else [part]
        if self.rank == 0:
            state = {"model": model_state, "optimizer": self.optimizer.state_dict(),
                     "amp": self.precision.state_dict(), "global_step": self.global_step, "strategy": self.strategy,
                     "ranks": parts, **(extra or {})}
            save_checkpoint(path, state)
        if self.mesh.bookkeeping is not None:
            self.mesh.bookkeeping.barrier()

    def load(self, path: str | Path) -> dict:
        """Restores what `save` wrote (every rank reads `path`) and returns the whole checkpoint."""
        state = load_checkpoint(path)
        self.restore(state)
        return state

    def restore(self, state: dict) -> None:
        """Restores a checkpoint's state: at its world size, or at another one when every rank's policy state
        is the same (synchronous policies; the sampler re-shards each global batch)."""
        self._ready()
        parts = state["ranks"]
        if len(parts) != self.world_size:
            error = reshard_error(parts, self.strategy, self.world_size)
            if error is not None:
                raise CheckpointError(error)
        if self.tp is not None or self.pp is not None:
            if self.pp is not None:
                self.model.load_own(state["model"])
            else:
                load_full_state_dict(self.model, state["model"])
            self.optimizer.load_state_dict(self.rank_part(parts)["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["amp"])
        self.policy.load_state_dict(self.rank_part(parts)["policy"], self.model, self.optimizer)
        self.global_step = state["global_step"]
        set_rng_state(parts[min(self.rank, len(parts) - 1)]["rng"])

    def rank_part(self, parts: list[dict]) -> dict:
        """This rank's part of a checkpoint's `parts` (rank 0's when the world size changed)."""
        return parts[self.rank] if len(parts) == self.world_size else parts[0]

    def close(self) -> None:
        """Releases the policy's threads and hooks."""
        if self.policy is not None:
            self.policy.close()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def setup(*, strategy: str | None = None, compressor: str | None = None, mesh: str | Mapping | None = None,
          device: str = "auto", amp: str = "none", grad_clip: float | None = None, seed: int = 0,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> Session:
    """This process's Session: joins the ranks that `polytrain run` or torchrun started, or runs alone.

    Args:
        strategy: update policy spec NAME[:k=v,...] (`polytrain list` shows them; None: local for one
            process, allreduce for more).
        compressor: gradient compressor spec NAME[+NAME][:k=v,...] (None: uncompressed).
        mesh: axis sizes "dp=2,..." or {"dp": 2} (None: every rank a data-parallel replica).
        device: auto, cpu or cuda (LOCAL_RANK picks the GPU).
        amp: none, bf16 or fp16 (use `session.autocast()` around forward passes).
        grad_clip: clip the global gradient norm before each optimizer step.
        seed: seed of the sampler's permutations (the caller seeds its model itself).
        timeout_s: the longest any collective waits for a peer.
    """
    from polytrain.train.defaults import AMP_MODES, resolve_device

    if amp not in AMP_MODES:
        raise ConfigError(f"unknown amp '{amp}'; expected {', '.join(AMP_MODES)}")
    device = resolve_device(device)
    if "POLYTRAIN_THREADS" in os.environ:  # set by `polytrain run`: this rank's share of the cores
        torch.set_num_threads(int(os.environ["POLYTRAIN_THREADS"]))
    comm = None
    if under_torchrun():
        comm = Communicator(timeout_s=timeout_s) if dist.is_initialized() else \
            init_from_torchrun(timeout_s, backend=backend_for(device))
    strategy_name, strategy_args = parse_named(strategy, "strategy") if strategy else (None, {})
    if strategy_name is not None and server_ranks(strategy_name, strategy_args):
        raise ConfigError(f"strategy {strategy_name} runs server ranks, which serve the workers from polytrain's "
                          f"own loop; train it with `polytrain train` or polytrain.train")
    compressor_name, compressor_args = parse_named(compressor, "compressor") if compressor else (None, {})
    sizes = MeshShape.parse(mesh).sizes() if isinstance(mesh, str) else dict(mesh or {})
    return Session(comm, strategy=strategy_name, strategy_args=strategy_args, compressor=compressor_name,
                   compressor_args=compressor_args, mesh=sizes, device=device, amp=amp, grad_clip=grad_clip,
                   seed=seed)


__all__ = ["Session", "setup", "rank_device", "backend_for"]
