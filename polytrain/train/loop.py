"""The training loop: the shared local step, evaluation, checkpoints and results."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from polytrain.comm import Communicator, CommStats
from polytrain.comm.mesh import MeshShape
from polytrain.config import ConfigError, Experiment
from polytrain.data import load_dataset
from polytrain.data.augment import augment_images, draw_augmentation
from polytrain.data.loading import RunData, run_data
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.faults import FaultInjector, flip_byte, flip_labels, read_events, record_event
from polytrain.launch import WorkerFailed, init_from_torchrun, run_workers, under_torchrun
from polytrain.models import build_model
from polytrain.ops.precision import parse_format, quantize_parameters_, rounding_generator
from polytrain.parallel.pipeline import check_partition
from polytrain.plugins import load_plugins
from polytrain.schedules import STEP_SCHEDULES, StepContext, settle_schedule
from polytrain.tasks import TASKS, Task
from polytrain.train.checkpoint import (CheckpointError, checkpoint_path, keep_previous, load_checkpoint,
                                        load_newest_intact, reshard_error)
from polytrain.strategies import policy_args, server_ranks
from polytrain.train.defaults import chunks_per_rank, resolve, run_ranks
from polytrain.train.environment import environment
from polytrain.train.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from polytrain.train.optim import Schedule, build_optimizer, build_schedule
from polytrain.train.progress import Reporter, SilentReporter, console_reporter
from polytrain.train.tracking import with_tracking
from polytrain.train.result import Result
from polytrain.train.session import Session, backend_for
from polytrain.train.straggler import Straggler

# Settings that may differ when resuming: they do not change what has been computed so far.
RESUMABLE_CHANGES = ("epochs", "stop_at", "out", "target", "checkpoint_steps", "threads", "timeout_s", "device",
                     "loader_workers", "straggler", "faults", "max_restarts", "elastic", "keep_checkpoints")
# Hyper-parameters a resumed run may be given anew when asked to (`retune`: population-based training
# explores them): they apply from the resumed step on; the learning rate is set at every step, the others in
# the optimizer's groups.
RETUNABLE = ("lr", "weight_decay", "optimizer_args")
# Settings that may differ when a run resumes at another world size (the global batch stays and the sampler
# re-shards it), provided its policy state is the same on every rank (checkpoint.reshard_error). The strategy
# may change between `local` and `allreduce`: the same synchronous SGD on 1 and on N replicas.
WORLD_CHANGES = ("workers", "mesh")
SYNCHRONOUS = ("local", "allreduce")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class _EpochTotals:
    """This rank's running sums of the epoch in progress; summed over the ranks at the end of the epoch.

    Every rank's are kept in mid-epoch checkpoints; resumed at another world size, their sums go to the new
    rank 0 (the counts and loss stay exact; the time is the old rank 0's).
    """

    loss_sum: float = 0.0
    metric_sum: float = 0.0
    samples: int = 0
    train_s: float = 0.0


@dataclass
class _Position:
    """Where training stands: the next step to run is `step` of `epoch` (both 0-based)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    wall_s: float = 0.0  # training wall time before this process started (resumed runs)
    history: list[dict] = field(default_factory=list)
    totals: _EpochTotals = field(default_factory=_EpochTotals)


@dataclass
class Attempt:
    """Which attempt of a self-restarting run this is, and the global step its predecessor failed at (None:
    unknown); rank 0 records in faults.jsonl when it resumes training and when it is back at that step."""

    number: int = 0
    redo_until: int | None = None
    resumed: bool = False

    def reached(self, out: Path | None, global_step: int) -> None:
        if self.number == 0:
            return
        if not self.resumed:
            self.resumed = True
            record_event(out, event="resumed", attempt=self.number, step=global_step)
        if global_step == self.redo_until:
            record_event(out, event="caught_up", attempt=self.number, step=global_step)


@torch.no_grad()
def evaluate(model: nn.Module, batches, task: Task, device: torch.device | str = "cpu") -> tuple[float, float]:
    """The loss and the task's metric of `model` summed over the samples of `batches` ((x, y) pairs), in
    eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, metric_sum = 0.0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        output = model(x)
        loss_sum += float(task.loss_sum(output, y))
        metric_sum += float(task.metric.per_sample_sum(output, y))
    model.train(was_training)
    return loss_sum, metric_sum


def load_run_data(exp: Experiment, data=None) -> RunData:
    """The run's data (the user's `data`, else the registered dataset), checked against its augmentation."""
    if data is None:
        data = load_dataset(exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction, **exp.dataset_args)
    loaded = run_data(data, name=exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction, task=exp.task,
                      workers=exp.loader_workers)
    if (exp.augment_shift or exp.augment_flip) and len(loaded.in_shape) != 3:
        raise ConfigError(f"augmentation needs image samples (C, H, W); dataset {exp.dataset} gives "
                          f"{loaded.in_shape} (set augment_shift=0 and augment_flip=false)")
    return loaded


def run_model(exp: Experiment, data: RunData, factory: Callable[[], nn.Module] | None) -> nn.Module:
    """The user's model from `factory`, else the registered model for the data's shape and classes."""
    if factory is not None:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the model factory {exp.model} returned a {type(model).__name__}; "
                              f"expected a torch.nn.Module")
        return model
    if data.num_classes is None:
        raise ConfigError(f"dataset {exp.dataset} does not say its classes (no num_classes or classes "
                          f"attribute), so model {exp.model} cannot be built for it; pass your own model")
    return build_model(exp.model, data.num_classes, data.in_shape, **exp.model_args)


@dataclass(frozen=True)
class OwnObjects:
    """What a user brings instead of registry names (polytrain.train's keywords), sent to every rank.

    Attributes:
        model: a picklable callable returning the nn.Module (a class, a module-level function, a partial).
        data: a Dataset, a map-style torch Dataset or a (train, test) pair of them.
        task: the loss and metric (polytrain.tasks.Task).
    """

    model: Callable[[], nn.Module] | None = None
    data: object = None
    task: Task | None = None


class Trainer:
    """One training run of a resolved Experiment on this rank: mesh x step schedule x update policy.

    Args:
        exp: the resolved experiment.
        reporter: progress output.
        on_step: called with the global step number after every step (single-process runs).
        comm: this rank's communicator over the run's ranks (None: a single process).
        own: the user's own model factory, data and task, in place of exp's registry names.
        attempt: which attempt of a self-restarting run this is (injected kills and hangs fire in the first).
    """

    def __init__(self, exp: Experiment, reporter: Reporter, on_step: Callable[[int], None] | None,
                 comm: Communicator | None = None, own: OwnObjects = OwnObjects(),
                 attempt: Attempt | None = None) -> None:
        load_plugins()  # a spawned rank registers the plugins' names again
        self.exp = exp
        self.reporter = reporter
        self.on_step = on_step
        torch.set_num_threads(exp.threads)
        # Subnormal floats (tiny weights and gradients late in training) slow CPU arithmetic ~10x; flushing
        # them to zero is what accelerators do anyway.
        torch.set_flush_denormal(True)
        self.session = Session(comm, strategy=exp.strategy, strategy_args=exp.strategy_args,
                               compressor=exp.compressor, compressor_args=exp.compressor_args, mesh=exp.mesh,
                               device=exp.device, amp=exp.amp, grad_clip=exp.grad_clip, seed=exp.seed,
                               tp_plan=exp.tp_plan, chunks=chunks_per_rank(exp), partition=exp.partition,
                               aggregator=exp.aggregator, aggregator_args=exp.aggregator_args, faults=exp.faults)
        self.device, self.mesh, self.rank = self.session.device, self.session.mesh, self.session.rank
        self.data = load_run_data(exp, own.data)
        self.task = own.task or TASKS.get(exp.task)
        torch.manual_seed(exp.seed)
        model = self.build_model(own.model)
        self.parameters = sum(p.numel() for p in model.parameters())  # before tp/pp keep shards of it
        self.number_format = parse_format(exp.precision)
        quantize_parameters_(model, self.number_format, "nearest")  # stored in the format from step 0
        optimizer = build_optimizer(exp.optimizer, model.parameters(), lr=exp.lr, weight_decay=exp.weight_decay,
                                    args=exp.optimizer_args)
        microbatch = max(1, exp.batch_size // self.session.replicas // exp.microbatches)
        self.model, self.optimizer = self.session.setup(model, optimizer, input_shape=self.data.in_shape,
                                                        probe_batch=microbatch)
        self.policy = self.session.policy
        self.schedule: Schedule = build_schedule(exp.schedule, exp.schedule_args, lr=exp.lr, epochs=exp.epochs,
                                                 batch_size=exp.batch_size, warmup_epochs=exp.warmup_epochs,
                                                 lr_reference_batch=exp.lr_reference_batch)
        self.step_schedule = STEP_SCHEDULES.get(exp.step_schedule)()
        self.precision = self.session.precision
        self.position = _Position()
        self.straggler = Straggler(exp.straggler, self.rank)
        self.attempt = attempt or Attempt()
        self.faults = FaultInjector(exp.faults, self.rank, self.attempt.number, exp.out)
        self.saved_step: int | None = None  # the global step of checkpoint.pt, which the next save keeps
        self.bytes_before = 0  # rank 0's training bytes sent before this process (a resumed run's)
        byzantine = self.session.byzantine
        self.flips_labels = byzantine is not None and not self.mesh.is_server and \
            byzantine.flips_labels(self.mesh.dp_rank)
        self.out = Path(exp.out) if exp.out else None
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)  # fail on an unwritable --out before training

    def build_model(self, factory: Callable[[], nn.Module] | None) -> nn.Module:
        return run_model(self.exp, self.data, factory)

    # -- checkpoints -------------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoints the run (collective): the session's state, the trainer's position and every rank's
        running totals of the epoch."""
        if self.out is None:
            return
        position = self.position
        extra = {"config": self.exp.to_dict(),
                 "sampler": {"epoch": position.epoch, "step": position.step, "seed": self.exp.seed,
                             "batch_size": self.schedule.batch_size_at(position.epoch)},
                 "wall_s": position.wall_s + self.elapsed(), "history": position.history}
        self.session.global_step = position.global_step
        if self.rank == 0 and self.exp.keep_checkpoints > 1 and self.saved_step not in (None, position.global_step):
            keep_previous(self.out, self.saved_step, self.exp.keep_checkpoints)
        self.session.save(checkpoint_path(self.out), extra, {"totals": vars(position.totals).copy()})
        self.saved_step = position.global_step

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint written by `save`, at its world size or, for synchronous policies
        whose state is the same on every rank, at another one (the sampler re-shards each global batch)."""
        self.session.restore(state)
        parts = state["ranks"]
        if len(parts) == self.mesh.world_size:
            totals = _EpochTotals(**parts[self.rank]["totals"])
        elif self.rank == 0:  # the epoch's running sums of all old ranks, kept by one new rank
            totals = _EpochTotals(**{key: sum(p["totals"][key] for p in parts) for key in parts[0]["totals"]})
            totals.train_s = parts[0]["totals"]["train_s"]
        else:
            totals = _EpochTotals()
        sampler = state["sampler"]
        self.saved_step = None  # a fallback's newer, corrupt checkpoint.pt is not kept
        self.position = _Position(epoch=sampler["epoch"], step=sampler["step"], global_step=state["global_step"],
                                  wall_s=state["wall_s"], history=list(state["history"]), totals=totals)
        self.bytes_before = self.position.history[-1].get("bytes_sent", 0) if self.position.history else 0
        saved = state["config"]
        if (saved["weight_decay"], saved["optimizer_args"]) != (self.exp.weight_decay, self.exp.optimizer_args):
            retuned = {key: tuple(v) if isinstance(v, list) else v for key, v in self.exp.optimizer_args.items()}
            for group in self.optimizer.param_groups:  # load_state_dict brought back the saved ones
                group.update(weight_decay=self.exp.weight_decay, **retuned)

    # -- the loop ----------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self) -> Result:
        self.started = time.perf_counter()
        self.model.train()
        self.reporter.start(f"{self.exp.model} on {self.exp.dataset}", self.exp.epochs, self.position.epoch)
        try:
            while self.position.epoch < self.exp.epochs:
                self.train_epoch()
                if self.exp.stop_at and self.stop_reached():
                    break
            return self.finish()
        finally:
            self.reporter.close()
            self.session.close()

    def stop_reached(self) -> bool:
        """Whether the epoch just ended reached `stop_at` (rank 0's measures decide for every rank)."""
        row = self.position.history[-1]
        reached = any(row["epoch" if key == "epochs" else key] >= value for key, value in self.exp.stop_at.items())
        return self.session.sum({"stop": float(reached and self.rank == 0)})["stop"] > 0

    def sampler(self, epoch: int) -> ShardedBatchSampler:
        """This replica's shards: data is sharded by the mesh's dp coordinate."""
        return self.session.sampler(self.data.num_train, self.schedule.batch_size_at(epoch))

    def train_epoch(self) -> None:
        position, epoch = self.position, self.position.epoch
        sampler = self.sampler(epoch)
        steps = sampler.steps_per_epoch()
        self.policy.set_batch_size(sampler.global_batch_size)
        self.augmentation = self.draw_augmentation(epoch)
        if self.mesh.is_server:
            self.serve_epoch(steps)
        else:
            self.train_steps(sampler, steps)
        started = time.perf_counter()
        self.settle()  # part of the epoch's time: what the slowest rank still had in flight
        position.totals.train_s += time.perf_counter() - started
        lr = self.schedule.lr_at(epoch, steps - 1, steps)  # the last step's
        policy_metrics = self.policy.epoch_metrics(self.model)  # the replicas as trained, before a last average
        if position.epoch == self.exp.epochs - 1:
            self.policy.finish(self.model)  # e.g. a last average: the final evaluation sees the final model
        self.end_epoch(lr, sampler.global_batch_size, steps, policy_metrics)

    def train_steps(self, sampler: ShardedBatchSampler, steps: int) -> None:
        """This replica's steps of the epoch from the current position."""
        position, epoch = self.position, self.position.epoch
        # Reading the data is part of the step's time (a DataLoader's workers prefetch while the step runs).
        started = time.perf_counter()
        for indices, x, y in self.data.train_batches(sampler, epoch, position.step):
            self.faults.before_step(position.global_step)
            if self.rank == 0:
                self.attempt.reached(self.out, position.global_step)
            if self.policy.behind(position.global_step):  # backup workers: applied without this replica
                self.advance()
                started = time.perf_counter()
                continue
            lr = self.schedule.lr_at(epoch, position.step, steps)
            loss_sum = self.train_step(indices, x, y, sampler.global_batch_len(position.step), lr)
            position.totals.train_s += time.perf_counter() - started
            self.reporter.step(epoch, position.step, steps, loss_sum / max(1, len(indices)))
            self.advance()
            if self.on_step is not None:
                self.on_step(position.global_step)
            started = time.perf_counter()

    def advance(self) -> None:
        """One step done: the position moves on, and at every checkpoint_steps-th step a checkpoint."""
        position = self.position
        position.step += 1
        position.global_step += 1
        if self.exp.checkpoint_steps and position.global_step % self.exp.checkpoint_steps == 0:
            self.settle()
            self.save()

    def settle(self) -> None:
        """A synchronization point: the step schedule completes the work it carried over from its steps
        (pipedream's pending backwards; the gradient they complete is applied through the policy's step),
        then the policy completes what is in flight (a parameter server applies every pushed gradient)."""
        if settle_schedule(self.step_schedule, self.model):
            self.policy.step(self.model, self.session.update, self.position.global_step)
            # The generator of the next step, whose own rounding follows no update (pipedream's first step
            # after a flush) and so leaves the stored weights as they are.
            quantize_parameters_(self.model, self.number_format, self.exp.rounding,
                                 rounding_generator(self.exp.seed, self.position.global_step))
        self.policy.settle(self.model, self.session.update, self.position.global_step)

    def serve_epoch(self, steps: int) -> None:
        """A server rank's epoch: no data and no steps of its own; it walks the workers' steps to each
        synchronization point, where it serves them inside `settle` (polytrain.strategies.ps)."""
        while self.position.step < steps:
            self.advance()

    def draw_augmentation(self, epoch: int) -> torch.Tensor | None:
        exp = self.exp
        if not (exp.augment_shift or exp.augment_flip):
            return None
        return draw_augmentation(self.data.num_train, exp.augment_shift, exp.augment_flip, exp.seed, epoch)

    def train_step(self, indices: torch.Tensor, x: torch.Tensor, y: torch.Tensor, global_batch: int,
                   lr: float) -> float:
        """The step schedule's forward/backward passes on this rank's samples (x, y) at `indices` (augmented
        here), then the update policy's step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.augmentation is not None:
            x = augment_images(x, self.augmentation[indices], self.exp.augment_shift)
        if self.flips_labels:
            y = flip_labels(y, self.data.num_classes)
        x, y = x.to(self.device), y.to(self.device)
        context = StepContext(global_batch, self.policy.before_backward, self.precision.autocast,
                              self.precision.scale_loss, self.task)
        computing = time.perf_counter()
        output = self.step_schedule.run(self.model, x, y, self.exp.microbatches, context)
        self.straggler.after_compute(time.perf_counter() - computing)
        if not math.isfinite(output.loss_sum):
            self.diverged(output.loss_sum)
        self.session.global_step = self.position.global_step
        if output.gradient_ready:  # else the schedule has no complete gradient yet: no update (pipedream)
            self.session.step()
        quantize_parameters_(self.model, self.number_format, self.exp.rounding,
                             rounding_generator(self.exp.seed, self.position.global_step))
        totals = self.position.totals
        totals.loss_sum += output.loss_sum
        totals.metric_sum += output.metric_sum
        totals.samples += len(indices)
        return output.loss_sum

    def diverged(self, loss: float) -> None:
        position = self.position
        path = checkpoint_path(self.out) if self.out is not None else None
        kept = f"last good checkpoint kept at {path}" if path is not None and path.exists() else "no checkpoint"
        raise TrainingDiverged(f"loss is {loss} at step {position.global_step + 1} (epoch {position.epoch + 1}, "
                               f"step {position.step + 1} of the epoch); training stopped; {kept}")

    def evaluate(self) -> tuple[float, float]:
        """Mean test loss and the task's metric of the policy's consensus model; each replica evaluates its
        contiguous share of the test split."""
        num_test = self.data.num_test
        share = self.session.share(num_test)
        with self.session.evaluation_model() as model:
            loss_sum, metric_sum = evaluate(model, self.data.test_batches(share.start, share.stop), self.task,
                                            self.device)
        summed = self.session.sum({"loss": loss_sum, "metric": metric_sum})
        return summed["loss"] / num_test, self.task.metric.value(summed["metric"], num_test)

    def end_epoch(self, lr: float, batch_size: int, steps: int, policy_metrics: dict) -> None:
        position, totals = self.position, self.position.totals
        # Training metrics of the whole global batch, not of this rank's shard; time is this rank's.
        summed = self.session.sum({"loss": totals.loss_sum, "metric": totals.metric_sum, "samples": totals.samples})
        samples, metric = summed["samples"], self.task.metric
        eval_started = time.perf_counter()
        test_loss, test_metric = self.evaluate()
        row = {
            "epoch": position.epoch + 1,
            "train_loss": summed["loss"] / max(1.0, samples),
            f"train_{metric.name}": metric.value(summed["metric"], samples),
            "test_loss": test_loss,
            f"test_{metric.name}": test_metric,
            "lr": lr,
            "batch_size": batch_size,
            "steps": steps,
            "samples": int(samples),
            "train_s": totals.train_s,
            "eval_s": time.perf_counter() - eval_started,
            "samples_per_s": samples / totals.train_s if totals.train_s > 0 else 0.0,
            "wall_s": position.wall_s + self.elapsed(),
            "bytes_sent": self.bytes_before + self.session.comm_stats().get("bytes_sent", 0),
            **policy_metrics,
        }
        position.history.append(row)
        position.epoch, position.step, position.totals = position.epoch + 1, 0, _EpochTotals()
        self.reporter.epoch(row)
        if self.out is not None and self.rank == 0:
            atomic_write_jsonl(self.out / "metrics.jsonl", position.history)
        self.save()

    def comm_section(self, steps: int) -> dict:
        """result.json's `comm`: rank 0's training traffic (every axis but bookkeeping) and per-step bytes,
        its bookkeeping traffic apart, every rank's counts by axis and operation, and the policy's report.

        The counts are gathered from every rank uncounted (they are the books themselves)."""
        mine = self.mesh.bookkeeping.stats.as_dict() if self.mesh.bookkeeping is not None else CommStats().as_dict()
        if self.exp.straggler:
            mine["straggler_wait_s"] = self.straggler.waited_s
        per_rank = [mine]
        if self.mesh.bookkeeping is not None:
            per_rank = [None] * self.mesh.world_size
            dist.all_gather_object(per_rank, mine, group=self.mesh.bookkeeping.group)
        rank0 = per_rank[0]
        straggler = {}
        if self.exp.straggler:  # what the slowed rank waited, beside its settings
            waited = per_rank[self.exp.straggler["rank"]]["straggler_wait_s"]
            straggler = {"straggler": {**self.exp.straggler, "waited_s": waited}}
        return {"bytes_sent": rank0["bytes_sent"], "bytes_received": rank0["bytes_received"],
                "messages": rank0["messages_sent"], "bytes_sent_per_step": rank0["bytes_sent"] / max(1, steps),
                "estimated": any(stats["estimated"] for stats in per_rank), "bookkeeping": rank0["bookkeeping"],
                "mesh": self.mesh.shape.sizes(), "per_rank": [{"rank": rank, **stats} for rank, stats in enumerate(per_rank)],
                **straggler, **self.policy.report(),
                **self.session.pipeline_report(self.exp.step_schedule, self.exp.microbatches)}

    def finish(self) -> Result:
        result = Result.from_history(self.exp, self.position.history, comm=self.comm_section(self.position.global_step),
                                     steps=self.position.global_step, data=self.data.describe(), task=self.task,
                                     environment=environment(self.exp.seed))
        model_state = self.session.model_state_dict()  # collective with tp
        if self.rank == 0:
            from polytrain.perf.predict import beside_measured

            result = dataclasses.replace(result, performance=beside_measured(self.exp, self.position.history),
                                         model={"parameters": self.parameters})
        if self.out is not None and self.rank == 0:
            buffer = io.BytesIO()
            torch.save(model_state, buffer)
            atomic_write_bytes(self.out / "model.pt", buffer.getvalue())
            atomic_write_json(self.out / "result.json", result.to_dict())
        return result


def _check_resumable(exp: Experiment, state: dict, directory: Path, retune: bool = False) -> None:
    """Raises ConfigError when `exp` cannot continue the checkpoint `state` of run `directory`.

    Only RESUMABLE_CHANGES may differ, and the world size (WORLD_CHANGES) when every rank's policy state is
    the same, so that it can be re-sharded.
    """
    requested, saved = exp.to_dict(), state["config"]
    allowed_keys = RESUMABLE_CHANGES + WORLD_CHANGES + (RETUNABLE if retune else ())
    if retune and (requested["optimizer_args"], requested["weight_decay"]) != (saved["optimizer_args"],
                                                                                saved["weight_decay"]):
        if saved["compressor"] is not None or server_ranks(saved["strategy"], saved["strategy_args"]):
            raise ConfigError(f"cannot resume {directory} with other optimizer_args or weight_decay: with a "
                              f"compressor or parameter servers the optimizer's state lives beyond this rank's "
                              f"optimizer; only lr may change")
    if {requested["strategy"], saved["strategy"]} <= set(SYNCHRONOUS) and requested["workers"] != saved["workers"]:
        allowed_keys += ("strategy", "strategy_args")
    for key in saved:
        if key not in allowed_keys and requested[key] != saved[key]:
            allowed = ", ".join(allowed_keys)
            raise ConfigError(f"cannot resume {directory} with {key}={requested[key]!r}: the checkpoint was "
                              f"trained with {key}={saved[key]!r} (only {allowed} may change)")
    if requested["workers"] != saved["workers"]:
        error = reshard_error(state["ranks"], saved["strategy"], requested["workers"])
        if error is not None:
            raise ConfigError(f"cannot resume {directory}: {error}")


def newest_checkpoint(directory: str | Path, quarantine: bool = False) -> tuple[Path, dict]:
    """The newest intact checkpoint of run `directory` (a corrupt newer one is passed over with a notice)."""
    found = load_newest_intact(directory, quarantine)
    if found is None:
        raise CheckpointError(f"no checkpoint at {checkpoint_path(directory)}: expected a file written by "
                              f"polytrain train --out")
    path, state, skipped = found
    for reason in skipped:
        print(f"polytrain: {reason}; continuing from {path.name} instead", file=sys.stderr)
    return path, state


def stored_experiment(directory: str | Path) -> Experiment:
    """The resolved Experiment saved in the newest intact checkpoint of run directory `directory`."""
    path, state = newest_checkpoint(directory)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no run settings (config): it was not written by polytrain train "
                              f"(an own loop's checkpoint is loaded with session.load)")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(Experiment)})
    if unknown:
        raise CheckpointError(f"{path} holds settings this polytrain does not know ({', '.join(unknown)}); it was "
                              f"written by another version")
    return Experiment(**config)


def _resume_state(exp: Experiment, resume: str | Path | None, retune: bool = False) -> tuple[Path, dict] | None:
    """The checkpoint file to continue from and its state, checked against `exp`; refuses to overwrite
    another run."""
    if resume is None:
        if exp.out is not None and checkpoint_path(exp.out).exists():
            raise ConfigError(f"{exp.out} already holds a run ({checkpoint_path(exp.out).name}); "
                              f"continue it with --resume {exp.out} or choose another --out")
        return None
    path, state = newest_checkpoint(resume, quarantine=True)
    if "ranks" not in state:
        raise CheckpointError(f"{path} was written by an older polytrain without per-rank "
                              f"state; it cannot be resumed by this version")
    _check_resumable(exp, state, Path(resume), retune)
    return path, state


def _run(exp: Experiment, state: dict | None, reporter: Reporter, on_step, comm: Communicator | None,
         own: OwnObjects = OwnObjects(), attempt: Attempt | None = None) -> Result:
    if comm is None or comm.rank == 0:
        reporter = with_tracking(reporter, exp)
    trainer = Trainer(exp, reporter, on_step, comm, own, attempt)
    if state is not None:
        trainer.restore(state)
    return trainer.run()


def _train_rank(comm: Communicator, exp: Experiment, checkpoint: str | None, report: bool,
                own: OwnObjects, attempt: Attempt) -> Result | None:
    """One spawned rank of a multi-worker run (`checkpoint`: the file to continue from); rank 0 returns the
    Result."""
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    reporter = console_reporter(sys.stdout) if report and comm.rank == 0 else SilentReporter()
    result = _run(exp, state, reporter, None, comm, own, attempt)
    return result if comm.rank == 0 else None


def _train_ranks_sequence(comm: Communicator, experiments: list[Experiment], resumes: list[str | None],
                          report: bool, own: OwnObjects) -> list[Result] | None:
    """Several runs, one after the other, on the same spawned ranks; rank 0 returns the Results."""
    results = []
    for exp, resume in zip(experiments, resumes):
        state = load_checkpoint(resume) if resume is not None else None
        reporter = console_reporter(sys.stdout) if report and comm.rank == 0 else SilentReporter()
        results.append(_run(exp, state, reporter, None, comm, own))
    return results if comm.rank == 0 else None


def _with_own(exp: Experiment, own: OwnObjects) -> Experiment:
    """`exp` naming the user's own objects: the model factory's and the data's names, the task's."""
    changes = {}
    if own.model is not None:
        if isinstance(own.model, nn.Module) or not callable(own.model):
            raise ConfigError(f"model is a {type(own.model).__name__}; expected a registered name or a picklable "
                              f"callable returning an nn.Module (a class, a module-level function, a partial)")
        changes["model"] = _qualified_name(own.model)
    if own.data is not None and exp.dataset == Experiment.dataset:  # the user's data, unless they named it
        first = own.data[0] if isinstance(own.data, (tuple, list)) and own.data else own.data
        changes["dataset"] = first.name if isinstance(getattr(first, "name", None), str) else type(first).__name__
    if own.task is not None:
        if not isinstance(own.task, Task):
            raise ConfigError(f"task is a {type(own.task).__name__}; expected a polytrain.tasks.Task or a "
                              f"registered name ({', '.join(TASKS.names())})")
        changes["task"] = own.task.name
    return exp.replace(**changes) if changes else exp


def _qualified_name(factory: Callable) -> str:
    inner = getattr(factory, "func", factory)  # functools.partial
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__name__)}"


def train_sequence(experiments: list[Experiment], *, resume: list[str | Path | None] | None = None,
                   report: bool = False, model: Callable[[], nn.Module] | None = None, data=None,
                   task: Task | str | None = None) -> list[Result]:
    """Trains several multi-worker experiments one after the other on one set of spawned workers.

    Saves the process start-up (importing torch in every rank) between runs, as the demo and the tests
    need; each run's Result is the same as from `train` (with the same own `model`, `data` and `task`,
    and `resume[i]`, if given, as run i's resume directory). All experiments need the same rank count.
    """
    own = _own_objects(model, data, task)
    resolved = [resolve(_with_own(exp, own), own=_owned(own)) for exp in experiments]
    ranks = {run_ranks(exp) for exp in resolved}
    if len(ranks) != 1 or ranks == {1}:
        raise ConfigError(f"train_sequence needs one rank count above 1 for all runs (workers and servers); got "
                          f"{sorted(ranks)}")
    resumes = list(resume) if resume is not None else [None] * len(resolved)
    if len(resumes) != len(resolved):
        raise ConfigError(f"train_sequence got {len(resumes)} resume directories for {len(resolved)} runs")
    for exp, directory in zip(resolved, resumes):
        _resume_state(exp, directory)
        check_model_fits(exp, own)
    resumes = [str(newest_checkpoint(directory)[0]) if directory is not None else None for directory in resumes]
    return run_workers(_train_ranks_sequence, ranks.pop(), (resolved, resumes, report, own),
                       threads=resolved[0].threads,
                       backend=backend_for(resolved[0].device), timeout_s=max(exp.timeout_s for exp in resolved))[0]


def check_model_fits(exp: Experiment, own: OwnObjects = OwnObjects()) -> None:
    """Builds the model once in this process where the mesh or the policy must see it (a pp axis cuts it
    into stages: `check_partition`; a policy's Args may check it: krizhevsky's boundary and splits), so that
    a model the run cannot train fails in one line before any worker starts."""
    args = policy_args(exp.strategy, exp.strategy_args)
    shape = MeshShape.from_sizes(exp.mesh)
    if not hasattr(args, "check_model") and shape.pp == 1:
        return
    model = run_model(exp, load_run_data(exp, own.data), own.model)
    try:
        if shape.pp > 1:
            check_partition(model, shape.pp * chunks_per_rank(exp), exp.partition)
        if hasattr(args, "check_model"):
            args.check_model(model, shape.dp)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _own_objects(model, data, task) -> OwnObjects:
    if isinstance(task, str):
        task = TASKS.get(task)
    return OwnObjects(model=model, data=data, task=task)


def _owned(own: OwnObjects) -> tuple[str, ...]:
    """The settings the user's own objects stand in for: resolve does not look them up in the registries."""
    return tuple(name for name, value in (("model", own.model), ("dataset", own.data), ("task", own.task))
                 if value is not None)


def _with_torchrun_world(exp: Experiment) -> Experiment:
    """Under torchrun the world size comes from its environment (less the policy's server ranks); an explicit
    other --workers is an error."""
    servers = server_ranks(exp.strategy, exp.strategy_args) if exp.strategy else 0
    workers = int(os.environ["WORLD_SIZE"]) - servers
    if exp.workers not in (None, 1, workers):
        raise ConfigError(f"--workers {exp.workers} does not match torchrun's WORLD_SIZE={workers + servers}"
                          f"{f' less {servers} servers' if servers else ''}")
    return exp.replace(workers=workers)


def train(exp: Experiment, *, resume: str | Path | None = None, reporter: Reporter | None = None,
          on_step: Callable[[int], None] | None = None, model: Callable[[], nn.Module] | None = None,
          data=None, task: Task | str | None = None, retune: bool = False) -> Result:
    """Trains `exp` and returns its Result (rank 0's); writes the contract files when `exp.out` is set.

    With `workers` above 1, spawns that many local worker processes, or, when started by torchrun, runs
    this process as the rank torchrun's environment names.

    Args:
        exp: the experiment; None settings take the defaults of its model and dataset.
        resume: a run directory whose checkpoint to continue from (the settings must match it, except
            those in RESUMABLE_CHANGES).
        retune: the resumed run may also take new RETUNABLE hyper-parameters (lr, weight_decay,
            optimizer_args), applied from its first step on.
        reporter: progress output (default: none; spawned workers report on rank 0's console instead).
        on_step: called with the global step number after every optimizer step (and its checkpoint);
            single-process runs only.
        model: the user's own model: a picklable callable returning an nn.Module (in place of exp.model).
        data: the user's own data: a map-style torch Dataset (split by exp.test_fraction with exp.seed), a
            (train, test) pair of them, or a polytrain.data.Dataset (in place of exp.dataset).
        task: the loss and metric, a polytrain.tasks.Task or a registered task name (default: the
            dataset's task; polytrain.tasks.task_of_loss(fn) makes one of a loss function).
    """
    own = _own_objects(model, data, task)
    torchrun = under_torchrun()
    exp = resolve(_with_own(_with_torchrun_world(exp) if torchrun else exp, own), own=_owned(own))
    resumed = _resume_state(exp, resume, retune)
    if run_ranks(exp) > 1 and not torchrun:
        if on_step is not None:
            raise ConfigError("on_step callbacks need a single process; spawned workers cannot call back")
        check_model_fits(exp, own)
        return supervise(exp, str(resumed[0]) if resumed is not None else None, reporter is not None, own)
    _check(not exp.max_restarts or not torchrun, "under torchrun a run is restarted by torchrun itself: use its "
                                                 "--max-restarts (and an elastic rendezvous), not polytrain's")
    _check(not [f for f in exp.faults if f["kind"] in ("kill", "hang")] or torchrun,
           "kill and hang faults stop a worker process; a single-process run has none to spare (--workers 2 or more)")
    comm = init_from_torchrun(exp.timeout_s, backend=backend_for(exp.device)) if torchrun else None
    if reporter is None or (comm is not None and comm.rank != 0):
        reporter = SilentReporter()  # one progress display per run: rank 0's
    return _run(exp, resumed[1] if resumed is not None else None, reporter, on_step, comm, own)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def supervise(exp: Experiment, checkpoint: str | None, report: bool, own: OwnObjects = OwnObjects()) -> Result:
    """Runs `exp` on local worker processes and, when a rank dies or hangs (the others notice within the
    collective timeout; the launcher stops every rank), restarts it from its newest intact checkpoint up to
    `exp.max_restarts` times: with as many workers as before, or with the survivors when `exp.elastic`.
    The Result (and result.json) record every failure under `faults`."""
    failures: list[dict] = []
    attempt = Attempt()
    current = exp
    started = time.time()
    while True:
        try:
            result = run_workers(_train_rank, run_ranks(current), (current, checkpoint, report, own, attempt),
                                 threads=current.threads, backend=backend_for(current.device),
                                 timeout_s=current.timeout_s)[0]
            break
        except WorkerFailed as error:
            if attempt.number >= exp.max_restarts:
                if failures:
                    raise WorkerFailed(f"{error} (attempt {attempt.number + 1}; --max-restarts {exp.max_restarts} "
                                       f"used up)", error.worker_traceback) from None
                raise
            failure = _failure(current, error, attempt.number)
            if attempt.number == 0 and any(f["kind"] == "corrupt-checkpoint" for f in exp.faults) and \
                    checkpoint_path(exp.out).exists():
                flip_byte(checkpoint_path(exp.out))
                failure["corrupted"] = checkpoint_path(exp.out).name
            found = load_newest_intact(exp.out, quarantine=True)
            if current.elastic:
                survivors = current.workers - len(failure["lost_ranks"])
                _check(survivors >= 1, f"every worker of the run was lost ({error}); nothing to continue with")
                current = resolve(at_another_world_size(current, survivors), own=_owned(own))
            if found is not None:
                path, state, skipped = found
                failure.update(resumed_from=path.name, resumed_step=state["global_step"], passed_over=skipped)
                if current.workers != exp.workers:
                    _check_resumable(current, state, Path(exp.out))
                checkpoint = str(path)
            else:  # no checkpoint yet: from the start
                failure.update(resumed_from=None, resumed_step=0, passed_over=[])
                checkpoint = None
            failure["workers_after"] = current.workers
            if failure.get("step") is not None:
                failure["steps_redone"] = failure["step"] - failure["resumed_step"]
            failures.append(failure)
            print(f"polytrain: {error}; restarting from "
                  f"{failure['resumed_from'] or 'the start'} with {current.workers} workers "
                  f"(restart {attempt.number + 1} of {exp.max_restarts})", file=sys.stderr)
            attempt = Attempt(attempt.number + 1, failure.get("step"))
    if failures or exp.faults:
        result = dataclasses.replace(result, faults={**_fault_report(exp, failures),
                                                     "total_wall_s": time.time() - started})
        if exp.out is not None:
            atomic_write_json(Path(exp.out) / "result.json", result.to_dict())
    return result


def _failure(exp: Experiment, error: WorkerFailed, attempt: int) -> dict:
    """What failed in `attempt`: the lost ranks, and from the injected fault's event (if any) its kind, step
    and how long the launcher took to notice."""
    events = [e for e in read_events(exp.out) if e.get("event") == "fault" and e.get("attempt", 0) == attempt]
    fault = events[-1] if events else None
    failure = {"attempt": attempt, "error": str(error), "lost_ranks": error.lost_ranks,
               "kind": fault["kind"] if fault else "unplanned", "step": fault["step"] if fault else None,
               "detected_at": error.detected_at}
    if fault is not None:
        failure["detection_s"] = error.detected_at - fault["time"]
    return failure


def _fault_report(exp: Experiment, failures: list[dict]) -> dict:
    """result.json's `faults`: the injected ones, every failure with its detection time, the time until the
    next attempt trained again (restart_s) and until it was back at the failed step (recovery_s)."""
    events = read_events(exp.out) if exp.out is not None else []
    for failure in failures:
        after = failure["attempt"] + 1
        for name, key in (("resumed", "restart_s"), ("caught_up", "recovery_s")):
            event = next((e for e in events if e.get("event") == name and e.get("attempt") == after), None)
            if event is not None:
                failure[key] = event["time"] - failure["detected_at"]
        if failure.get("step") is not None and failure["step"] == failure["resumed_step"]:
            failure.setdefault("recovery_s", failure.get("restart_s"))
        del failure["detected_at"]
    return {"injected": exp.faults, "max_restarts": exp.max_restarts, "elastic": exp.elastic,
            "restarts": len(failures), "failures": failures}


def at_another_world_size(stored: Experiment, workers: int) -> Experiment:
    """A stored run's settings with what follows from the world size derived anew for `workers` ranks:
    the mesh, the threads per rank, and local <-> allreduce (the same synchronous SGD on 1 and N workers)."""
    strategy, strategy_args = stored.strategy, stored.strategy_args
    if workers == 1 and strategy == "allreduce":
        strategy, strategy_args = "local", {}
    elif workers > 1 and strategy == "local":
        strategy = "allreduce"
    return stored.replace(workers=workers, mesh={}, threads=None, strategy=strategy, strategy_args=strategy_args)


__all__ = ["train", "train_sequence", "Trainer", "TrainingDiverged", "CheckpointError", "evaluate",
           "stored_experiment"]
