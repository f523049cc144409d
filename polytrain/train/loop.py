"""The training loop: the shared local step, evaluation, checkpoints and results."""

from __future__ import annotations

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
import torch.nn.functional as F
from torch import nn

from polytrain.comm import Communicator, CommStats
from polytrain.comm.gather import gather_objects
from polytrain.comm.mesh import Mesh, MeshShape
from polytrain.config import ConfigError, Experiment
from polytrain.data import Dataset, load_dataset
from polytrain.data.augment import augment_images, draw_augmentation
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.launch import init_from_torchrun, run_workers, under_torchrun
from polytrain.models import build_model
from polytrain.ops.precision import parse_format, quantize_parameters_, rounding_generator
from polytrain.schedules import STEP_SCHEDULES, StepContext
from polytrain.strategies import UpdatePolicy, build_policy
from polytrain.strategies.averaging import sum_over
from polytrain.train.amp import MixedPrecision
from polytrain.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, reshard_error, rng_state,
                                        save_checkpoint, set_rng_state)
from polytrain.train.compression import plan_compression
from polytrain.train.defaults import resolve
from polytrain.train.environment import environment
from polytrain.train.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from polytrain.train.optim import Schedule, build_optimizer, build_schedule
from polytrain.train.progress import Reporter, SilentReporter, console_reporter
from polytrain.train.result import Result

EVAL_BATCH = 1024
# Settings that may differ when resuming: they do not change what has been computed so far.
RESUMABLE_CHANGES = ("epochs", "out", "target_accuracy", "checkpoint_steps", "threads", "timeout_s", "device")
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
    correct: int = 0
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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Summed loss and number of correct predictions of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH].to(device))
        target = y[start:start + EVAL_BATCH].to(device)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return loss_sum, correct


def rank_device(device: str, comm: Communicator | None) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK under torchrun, else the rank modulo the GPUs) or the CPU."""
    if device != "cuda":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", comm.rank if comm is not None else 0)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def load_run_data(exp: Experiment) -> Dataset:
    """The run's dataset, checked against the augmentation it asks for."""
    data = load_dataset(exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction, **exp.dataset_args)
    if (exp.augment_shift or exp.augment_flip) and len(data.in_shape) != 3:
        raise ConfigError(f"augmentation needs image samples (C, H, W); dataset {exp.dataset} gives "
                          f"{data.in_shape} (set augment_shift=0 and augment_flip=false)")
    return data


class Trainer:
    """One training run of a resolved Experiment on this rank: mesh x step schedule x update policy.

    Args:
        exp: the resolved experiment.
        reporter: progress output.
        on_step: called with the global step number after every step (single-process runs).
        comm: this rank's communicator over the run's ranks (None: a single process).
    """

    def __init__(self, exp: Experiment, reporter: Reporter, on_step: Callable[[int], None] | None,
                 comm: Communicator | None = None) -> None:
        self.exp = exp
        self.reporter = reporter
        self.on_step = on_step
        torch.set_num_threads(exp.threads)
        # Subnormal floats (tiny weights and gradients late in training) slow CPU arithmetic ~10x; flushing
        # them to zero is what accelerators do anyway.
        torch.set_flush_denormal(True)
        self.device = rank_device(exp.device, comm)
        if comm is not None:
            comm.device = self.device
            comm.reset_stats()  # the run's counts start here, also when ranks run several runs in sequence
        self.mesh = Mesh.build(MeshShape.from_sizes(exp.mesh), comm)
        self.rank = self.mesh.rank
        self.data = load_run_data(exp)
        torch.manual_seed(exp.seed)
        self.policy, optimizer_name, optimizer_args = self.build_policy()
        model = build_model(exp.model, self.data.num_classes, self.data.in_shape, **exp.model_args).to(self.device)
        self.model = self.policy.prepare(model)
        self.number_format = parse_format(exp.precision)
        quantize_parameters_(self.model, self.number_format, "nearest")  # stored in the format from step 0
        self.optimizer = build_optimizer(optimizer_name, self.model.parameters(), lr=exp.lr,
                                         weight_decay=exp.weight_decay, args=optimizer_args)
        self.schedule: Schedule = build_schedule(exp.schedule, exp.schedule_args, lr=exp.lr, epochs=exp.epochs,
                                                 batch_size=exp.batch_size, warmup_epochs=exp.warmup_epochs,
                                                 lr_reference_batch=exp.lr_reference_batch)
        self.step_schedule = STEP_SCHEDULES.get(exp.step_schedule)()
        self.precision = MixedPrecision(exp.amp, self.device)
        self.position = _Position()
        self.out = Path(exp.out) if exp.out else None
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)  # fail on an unwritable --out before training

    def build_policy(self) -> tuple[UpdatePolicy, str, dict]:
        """This rank's update policy (with its compressor), and the optimizer and its arguments the run
        steps with (momentum moves in front of an error-feedback compressor: polytrain.train.compression)."""
        exp = self.exp
        if exp.compressor is None:
            return build_policy(exp.strategy, self.mesh, exp.strategy_args), exp.optimizer, dict(exp.optimizer_args)
        plan = plan_compression(exp, self.rank)
        if plan.notice is not None and self.rank == 0:
            print(f"polytrain: {plan.notice}", file=sys.stderr)
        return (build_policy(exp.strategy, self.mesh, exp.strategy_args, plan.compressor), plan.optimizer,
                plan.optimizer_args)

    # -- checkpoints -------------------------------------------------------------------------------------

    def rank_part(self) -> dict:
        """This rank's own part of a checkpoint: the policy's state, the epoch's running totals, its RNGs."""
        return {"policy": self.policy.state_dict(self.model, self.optimizer),
                "totals": vars(self.position.totals).copy(), "rng": rng_state()}

    def checkpoint_state(self, parts: list[dict]) -> dict:
        """Everything needed to continue exactly where training stands, with every rank's part."""
        position = self.position
        return {
            "config": self.exp.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "amp": self.precision.state_dict(),
            "sampler": {"epoch": position.epoch, "step": position.step, "seed": self.exp.seed,
                        "batch_size": self.schedule.batch_size_at(position.epoch)},
            "global_step": position.global_step,
            "wall_s": position.wall_s + self.elapsed(),
            "history": position.history,
            "ranks": parts,
        }

    def save(self) -> None:
        if self.out is None:
            return
        part = self.rank_part()
        # Collective: every rank's part reaches rank 0, counted as bookkeeping.
        parts = gather_objects(self.mesh.bookkeeping, part) if self.mesh.bookkeeping is not None else [part]
        if self.rank == 0:
            save_checkpoint(checkpoint_path(self.out), self.checkpoint_state(parts))

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint written by `save`, at its world size or, for synchronous policies
        whose state is the same on every rank, at another one (the sampler re-shards each global batch)."""
        parts = state["ranks"]
        same_world = len(parts) == self.mesh.world_size
        if not same_world:
            error = reshard_error(parts, self.exp.strategy, self.mesh.world_size)
            if error is not None:
                raise CheckpointError(error)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["amp"])
        mine = parts[self.rank] if same_world else parts[0]
        self.policy.load_state_dict(mine["policy"], self.model, self.optimizer)
        if same_world:
            totals = _EpochTotals(**mine["totals"])
        elif self.rank == 0:  # the epoch's running sums of all old ranks, kept by one new rank
            totals = _EpochTotals(**{key: sum(p["totals"][key] for p in parts) for key in mine["totals"]})
            totals.train_s = mine["totals"]["train_s"]
        else:
            totals = _EpochTotals()
        sampler = state["sampler"]
        self.position = _Position(epoch=sampler["epoch"], step=sampler["step"], global_step=state["global_step"],
                                  wall_s=state["wall_s"], history=list(state["history"]), totals=totals)
        set_rng_state(parts[min(self.rank, len(parts) - 1)]["rng"])

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
            return self.finish()
        finally:
            self.reporter.close()
            self.policy.close()

    def sampler(self, epoch: int) -> ShardedBatchSampler:
        """This replica's shards: data is sharded by the mesh's dp coordinate."""
        return ShardedBatchSampler(len(self.data.y_train), self.schedule.batch_size_at(epoch),
                                   world_size=self.mesh.dp_size, rank=self.mesh.dp_rank, seed=self.exp.seed)

    def train_epoch(self) -> None:
        position, epoch = self.position, self.position.epoch
        sampler = self.sampler(epoch)
        steps = sampler.steps_per_epoch()
        self.policy.set_batch_size(sampler.global_batch_size)
        self.augmentation = self.draw_augmentation(epoch)
        for indices in sampler.epoch(epoch, start_step=position.step):
            started = time.perf_counter()
            lr = self.schedule.lr_at(epoch, position.step, steps)
            loss_sum = self.train_step(indices, sampler.global_batch_len(position.step), lr)
            position.totals.train_s += time.perf_counter() - started
            self.reporter.step(epoch, position.step, steps, loss_sum / max(1, len(indices)))
            position.step += 1
            position.global_step += 1
            if self.exp.checkpoint_steps and position.global_step % self.exp.checkpoint_steps == 0:
                self.save()
            if self.on_step is not None:
                self.on_step(position.global_step)
        if position.epoch == self.exp.epochs - 1:
            self.policy.finish(self.model)  # e.g. a last average: the final evaluation sees the final model
        self.end_epoch(lr, sampler.global_batch_size, steps)

    def draw_augmentation(self, epoch: int) -> torch.Tensor | None:
        exp = self.exp
        if not (exp.augment_shift or exp.augment_flip):
            return None
        return draw_augmentation(len(self.data.y_train), exp.augment_shift, exp.augment_flip, exp.seed, epoch)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) training samples and labels at `indices`, on this rank's device."""
        x = self.data.x_train[indices]
        if self.augmentation is not None:
            x = augment_images(x, self.augmentation[indices], self.exp.augment_shift)
        return x.to(self.device), self.data.y_train[indices].to(self.device)

    def update(self) -> None:
        """The run's local update: (fp16: unscale,) clip, the optimizer's step. Policies decide when."""
        self.precision.step(self.optimizer, self.model.parameters(), self.exp.grad_clip)

    def train_step(self, indices: torch.Tensor, global_batch: int, lr: float) -> float:
        """The step schedule's forward/backward passes, then the update policy's step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.batch(indices)
        context = StepContext(global_batch, self.policy.before_backward, self.precision.autocast,
                              self.precision.scale_loss)
        output = self.step_schedule.run(self.model, x, y, self.exp.microbatches, context)
        if not math.isfinite(output.loss_sum):
            self.diverged(output.loss_sum)
        self.policy.step(self.model, self.update, self.position.global_step)
        quantize_parameters_(self.model, self.number_format, self.exp.rounding,
                             rounding_generator(self.exp.seed, self.position.global_step))
        totals = self.position.totals
        totals.loss_sum += output.loss_sum
        totals.correct += output.correct
        totals.samples += len(indices)
        return output.loss_sum

    def diverged(self, loss: float) -> None:
        position = self.position
        path = checkpoint_path(self.out) if self.out is not None else None
        kept = f"last good checkpoint kept at {path}" if path is not None and path.exists() else "no checkpoint"
        raise TrainingDiverged(f"loss is {loss} at step {position.global_step + 1} (epoch {position.epoch + 1}, "
                               f"step {position.step + 1} of the epoch); training stopped; {kept}")

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """Sums per-replica numbers (metrics) over the dp replicas, as bookkeeping traffic."""
        summed = sum_over(self.mesh.bookkeeping, torch.tensor(values, dtype=torch.float64, device=self.device))
        return summed.tolist()

    def evaluate(self) -> tuple[float, float]:
        """Mean test loss and accuracy of the policy's consensus model; each replica evaluates its share."""
        data, replicas, replica = self.data, self.mesh.dp_size, self.mesh.dp_rank
        x, y = data.x_test.tensor_split(replicas)[replica], data.y_test.tensor_split(replicas)[replica]
        with self.policy.evaluation_model(self.model) as model:
            loss_sum, correct = evaluate(model, x, y, self.device)
        loss_sum, correct = self.sum_over_replicas([loss_sum, float(correct)])
        return loss_sum / len(data.y_test), correct / len(data.y_test)

    def end_epoch(self, lr: float, batch_size: int, steps: int) -> None:
        position, totals = self.position, self.position.totals
        # Training metrics of the whole global batch, not of this rank's shard; time is this rank's.
        loss_sum, correct, samples = self.sum_over_replicas([totals.loss_sum, float(totals.correct),
                                                             float(totals.samples)])
        eval_started = time.perf_counter()
        test_loss, test_accuracy = self.evaluate()
        row = {
            "epoch": position.epoch + 1,
            "train_loss": loss_sum / max(1.0, samples),
            "train_accuracy": correct / max(1.0, samples),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": lr,
            "batch_size": batch_size,
            "steps": steps,
            "samples": int(samples),
            "train_s": totals.train_s,
            "eval_s": time.perf_counter() - eval_started,
            "samples_per_s": samples / totals.train_s if totals.train_s > 0 else 0.0,
            "wall_s": position.wall_s + self.elapsed(),
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
        per_rank = [mine]
        if self.mesh.bookkeeping is not None:
            per_rank = [None] * self.mesh.world_size
            dist.all_gather_object(per_rank, mine, group=self.mesh.bookkeeping.group)
        rank0 = per_rank[0]
        return {"bytes_sent": rank0["bytes_sent"], "bytes_received": rank0["bytes_received"],
                "messages": rank0["messages_sent"], "bytes_sent_per_step": rank0["bytes_sent"] / max(1, steps),
                "estimated": any(stats["estimated"] for stats in per_rank), "bookkeeping": rank0["bookkeeping"],
                "mesh": self.mesh.shape.sizes(), "per_rank": [{"rank": rank, **stats} for rank, stats in enumerate(per_rank)],
                **self.policy.report()}

    def finish(self) -> Result:
        result = Result.from_history(self.exp, self.position.history, comm=self.comm_section(self.position.global_step),
                                     steps=self.position.global_step, data=self.data,
                                     environment=environment(self.exp.seed))
        if self.out is not None and self.rank == 0:
            buffer = io.BytesIO()
            torch.save(self.model.state_dict(), buffer)
            atomic_write_bytes(self.out / "model.pt", buffer.getvalue())
            atomic_write_json(self.out / "result.json", result.to_dict())
        return result


def _check_resumable(exp: Experiment, state: dict, directory: Path) -> None:
    """Raises ConfigError when `exp` cannot continue the checkpoint `state` of run `directory`.

    Only RESUMABLE_CHANGES may differ, and the world size (WORLD_CHANGES) when every rank's policy state is
    the same, so that it can be re-sharded.
    """
    requested, saved = exp.to_dict(), state["config"]
    allowed_keys = RESUMABLE_CHANGES + WORLD_CHANGES
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


def stored_experiment(directory: str | Path) -> Experiment:
    """The resolved Experiment saved in the checkpoint of run directory `directory`."""
    return Experiment(**load_checkpoint(checkpoint_path(directory))["config"])


def _resume_state(exp: Experiment, resume: str | Path | None) -> dict | None:
    """The checkpoint to continue from, checked against `exp`; refuses to overwrite another run."""
    if resume is None:
        if exp.out is not None and checkpoint_path(exp.out).exists():
            raise ConfigError(f"{exp.out} already holds a run ({checkpoint_path(exp.out).name}); "
                              f"continue it with --resume {exp.out} or choose another --out")
        return None
    state = load_checkpoint(checkpoint_path(resume))
    if "ranks" not in state:
        raise CheckpointError(f"{checkpoint_path(resume)} was written by an older polytrain without per-rank "
                              f"state; it cannot be resumed by this version")
    _check_resumable(exp, state, Path(resume))
    return state


def _run(exp: Experiment, state: dict | None, reporter: Reporter, on_step, comm: Communicator | None) -> Result:
    trainer = Trainer(exp, reporter, on_step, comm)
    if state is not None:
        trainer.restore(state)
    return trainer.run()


def _train_rank(comm: Communicator, exp: Experiment, resume: str | None, report: bool) -> Result | None:
    """One spawned rank of a multi-worker run; rank 0 returns the Result."""
    state = load_checkpoint(checkpoint_path(resume)) if resume is not None else None
    reporter = console_reporter(sys.stdout) if report and comm.rank == 0 else SilentReporter()
    result = _run(exp, state, reporter, None, comm)
    return result if comm.rank == 0 else None


def _train_ranks_sequence(comm: Communicator, experiments: list[Experiment], report: bool) -> list[Result] | None:
    """Several runs, one after the other, on the same spawned ranks; rank 0 returns the Results."""
    results = []
    for exp in experiments:
        reporter = console_reporter(sys.stdout) if report and comm.rank == 0 else SilentReporter()
        results.append(_run(exp, None, reporter, None, comm))
    return results if comm.rank == 0 else None


def train_sequence(experiments: list[Experiment], *, report: bool = False) -> list[Result]:
    """Trains several multi-worker experiments one after the other on one set of spawned workers.

    Saves the process start-up (importing torch in every rank) between runs, as the demo and the tests
    need; each run's Result is the same as from `train`. All experiments need the same worker count.
    """
    resolved = [resolve(exp) for exp in experiments]
    workers = {exp.workers for exp in resolved}
    if len(workers) != 1 or workers == {1}:
        raise ConfigError(f"train_sequence needs one worker count above 1 for all runs; got {sorted(workers)}")
    for exp in resolved:
        _resume_state(exp, None)
    return run_workers(_train_ranks_sequence, workers.pop(), (resolved, report), threads=resolved[0].threads,
                       backend=backend_for(resolved[0].device), timeout_s=max(exp.timeout_s for exp in resolved))[0]


def backend_for(device: str) -> str:
    """nccl for ranks on GPUs, gloo for CPU ranks."""
    return "nccl" if device == "cuda" else "gloo"


def _with_torchrun_world(exp: Experiment) -> Experiment:
    """Under torchrun the world size comes from its environment; an explicit other --workers is an error."""
    world_size = int(os.environ["WORLD_SIZE"])
    if exp.workers not in (None, 1, world_size):
        raise ConfigError(f"--workers {exp.workers} does not match torchrun's WORLD_SIZE={world_size}")
    return exp.replace(workers=world_size)


def train(exp: Experiment, *, resume: str | Path | None = None, reporter: Reporter | None = None,
          on_step: Callable[[int], None] | None = None) -> Result:
    """Trains `exp` and returns its Result (rank 0's); writes the contract files when `exp.out` is set.

    With `workers` above 1, spawns that many local worker processes, or, when started by torchrun, runs
    this process as the rank torchrun's environment names.

    Args:
        exp: the experiment; None settings take the defaults of its model and dataset.
        resume: a run directory whose checkpoint to continue from (the settings must match it, except
            those in RESUMABLE_CHANGES).
        reporter: progress output (default: none; spawned workers report on rank 0's console instead).
        on_step: called with the global step number after every optimizer step (and its checkpoint);
            single-process runs only.
    """
    torchrun = under_torchrun()
    exp = resolve(_with_torchrun_world(exp) if torchrun else exp)
    state = _resume_state(exp, resume)
    if exp.workers > 1 and not torchrun:
        if on_step is not None:
            raise ConfigError("on_step callbacks need a single process; spawned workers cannot call back")
        resume_dir = str(resume) if resume is not None else None
        results = run_workers(_train_rank, exp.workers, (exp, resume_dir, reporter is not None),
                              threads=exp.threads, backend=backend_for(exp.device), timeout_s=exp.timeout_s)
        return results[0]
    comm = init_from_torchrun(exp.timeout_s, backend=backend_for(exp.device)) if torchrun else None
    if reporter is None or (comm is not None and comm.rank != 0):
        reporter = SilentReporter()  # one progress display per run: rank 0's
    return _run(exp, state, reporter, on_step, comm)


__all__ = ["train", "train_sequence", "Trainer", "TrainingDiverged", "CheckpointError", "evaluate",
           "stored_experiment"]
