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
import torch.nn.functional as F
from torch import nn

from polytrain.comm import Communicator
from polytrain.config import ConfigError, Experiment
from polytrain.data import Dataset, load_dataset
from polytrain.data.augment import augment_images, draw_augmentation
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.launch import init_from_torchrun, run_workers, under_torchrun
from polytrain.models import build_model
from polytrain.ops.precision import parse_format, quantize_parameters_, rounding_generator
from polytrain.strategies import STRATEGIES, Strategy
from polytrain.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, rng_state,
                                        save_checkpoint, set_rng_state)
from polytrain.train.compression import build_run_compressor
from polytrain.train.defaults import resolve
from polytrain.train.environment import environment
from polytrain.train.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from polytrain.train.optim import Schedule, build_optimizer, build_schedule
from polytrain.train.progress import Reporter, SilentReporter, console_reporter
from polytrain.train.result import Result

EVAL_BATCH = 1024
# Settings that may differ when resuming: they do not change what has been computed so far.
RESUMABLE_CHANGES = ("epochs", "out", "target_accuracy", "checkpoint_steps", "threads", "timeout_s")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class _EpochTotals:
    """This rank's running sums of the epoch in progress; summed over the ranks at the end of the epoch.

    Kept in mid-epoch checkpoints (rank 0's: after a multi-worker resume the epoch's training loss is
    approximate; weights are exact).
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


def local_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatches: int, global_batch: int,
               before_backward: Callable[[bool], None] | None = None) -> tuple[float, int]:
    """Forward and backward of one worker's batch, accumulating gradients over microbatches.

    Each microbatch's summed loss is divided by the global batch size, so the accumulated gradient equals
    that of the full batch's mean loss, and summing the workers' gradients gives the global mean.

    Args:
        before_backward: called with `last_microbatch` before each backward (strategies hook in here).

    Returns:
        The summed loss of the batch and the number of correct predictions.
    """
    loss_sum, correct = 0.0, 0
    pieces = list(zip(x.tensor_split(microbatches), y.tensor_split(microbatches)))
    for index, (x_micro, y_micro) in enumerate(pieces):
        logits = model(x_micro)
        loss = F.cross_entropy(logits, y_micro, reduction="sum")
        if before_backward is not None:
            before_backward(index == len(pieces) - 1)
        (loss / global_batch).backward()
        loss_sum += loss.item()
        correct += int((logits.argmax(dim=1) == y_micro).sum())
    return loss_sum, correct


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Summed loss and number of correct predictions of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return loss_sum, correct


class Trainer:
    """One training run of a resolved Experiment on this process."""

    def __init__(self, exp: Experiment, reporter: Reporter, on_step: Callable[[int], None] | None,
                 comm: Communicator | None = None) -> None:
        self.exp = exp
        self.reporter = reporter
        self.on_step = on_step
        torch.set_num_threads(exp.threads)
        # Subnormal floats (tiny weights and gradients late in training) slow CPU arithmetic ~10x; flushing
        # them to zero is what accelerators do anyway.
        torch.set_flush_denormal(True)
        self.data: Dataset = load_dataset(exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction,
                                          **exp.dataset_args)
        if (exp.augment_shift or exp.augment_flip) and len(self.data.in_shape) != 3:
            raise ConfigError(f"augmentation needs image samples (C, H, W); dataset {exp.dataset} gives "
                              f"{self.data.in_shape} (set augment_shift=0 and augment_flip=false)")
        torch.manual_seed(exp.seed)
        optimizer_name, strategy_args = exp.optimizer, dict(exp.strategy_args)
        if exp.compressor is not None:
            compressor, optimizer_name, notice = build_run_compressor(exp, comm.rank if comm is not None else 0)
            strategy_args["compressor"] = compressor
            if notice is not None and (comm is None or comm.rank == 0):
                print(f"polytrain: {notice}", file=sys.stderr)
        self.strategy: Strategy = STRATEGIES.get(exp.strategy)(comm, **strategy_args)
        self.rank = self.strategy.rank
        model = build_model(exp.model, self.data.num_classes, self.data.in_shape, **exp.model_args)
        self.model = self.strategy.prepare(model)
        self.number_format = parse_format(exp.precision)
        quantize_parameters_(self.model, self.number_format, "nearest")  # stored in the format from step 0
        self.optimizer = build_optimizer(optimizer_name, self.model.parameters(), lr=exp.lr,
                                         momentum=exp.momentum, weight_decay=exp.weight_decay)
        self.schedule: Schedule = build_schedule(exp.schedule, exp.schedule_args, lr=exp.lr, epochs=exp.epochs,
                                                 batch_size=exp.batch_size, warmup_epochs=exp.warmup_epochs,
                                                 lr_reference_batch=exp.lr_reference_batch)
        self.position = _Position()
        self.out = Path(exp.out) if exp.out else None
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)  # fail on an unwritable --out before training

    # -- checkpoints -------------------------------------------------------------------------------------

    def checkpoint_state(self, strategy_state: dict) -> dict:
        """Everything needed to continue exactly where training stands."""
        position = self.position
        return {
            "strategy": strategy_state,
            "config": self.exp.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": {"epoch": position.epoch, "step": position.step, "seed": self.exp.seed,
                        "batch_size": self.schedule.batch_size_at(position.epoch)},
            "global_step": position.global_step,
            "wall_s": position.wall_s + self.elapsed(),
            "history": position.history,
            "totals": vars(position.totals).copy(),
            "rng": rng_state(),
        }

    def save(self) -> None:
        if self.out is None:
            return
        strategy_state = self.strategy.state_dict()  # collective: every rank's compressor state
        if self.rank == 0:
            save_checkpoint(checkpoint_path(self.out), self.checkpoint_state(strategy_state))

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint written by `checkpoint_state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        sampler = state["sampler"]
        self.position = _Position(epoch=sampler["epoch"], step=sampler["step"], global_step=state["global_step"],
                                  wall_s=state["wall_s"], history=list(state["history"]),
                                  totals=_EpochTotals(**state["totals"]))
        set_rng_state(state["rng"])

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
            self.strategy.close()

    def sampler(self, epoch: int) -> ShardedBatchSampler:
        return ShardedBatchSampler(len(self.data.y_train), self.schedule.batch_size_at(epoch),
                                   world_size=self.exp.workers, rank=self.rank, seed=self.exp.seed)

    def train_epoch(self) -> None:
        position, epoch = self.position, self.position.epoch
        sampler = self.sampler(epoch)
        steps = sampler.steps_per_epoch()
        self.strategy.set_batch_size(sampler.global_batch_size)
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
        self.end_epoch(lr, sampler.global_batch_size, steps)

    def draw_augmentation(self, epoch: int) -> torch.Tensor | None:
        exp = self.exp
        if not (exp.augment_shift or exp.augment_flip):
            return None
        return draw_augmentation(len(self.data.y_train), exp.augment_shift, exp.augment_flip, exp.seed, epoch)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) training samples and labels at `indices`."""
        x = self.data.x_train[indices]
        if self.augmentation is not None:
            x = augment_images(x, self.augmentation[indices], self.exp.augment_shift)
        return x, self.data.y_train[indices]

    def train_step(self, indices: torch.Tensor, global_batch: int, lr: float) -> float:
        """The shared local step, the strategy's exchange, clipping and the optimizer update."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.batch(indices)
        loss_sum, correct = local_step(self.model, x, y, self.exp.microbatches, global_batch,
                                       self.strategy.before_backward)
        if not math.isfinite(loss_sum):
            self.diverged(loss_sum)
        self.strategy.after_backward(self.model)
        if self.exp.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.exp.grad_clip)
        self.optimizer.step()
        quantize_parameters_(self.model, self.number_format, self.exp.rounding,
                             rounding_generator(self.exp.seed, self.position.global_step))
        totals = self.position.totals
        totals.loss_sum += loss_sum
        totals.correct += correct
        totals.samples += len(indices)
        return loss_sum

    def diverged(self, loss: float) -> None:
        position = self.position
        path = checkpoint_path(self.out) if self.out is not None else None
        kept = f"last good checkpoint kept at {path}" if path is not None and path.exists() else "no checkpoint"
        raise TrainingDiverged(f"loss is {loss} at step {position.global_step + 1} (epoch {position.epoch + 1}, "
                               f"step {position.step + 1} of the epoch); training stopped; {kept}")

    def evaluate(self) -> tuple[float, float]:
        """Mean test loss and accuracy; each rank evaluates its share of the test split."""
        world, data = self.strategy.world_size, self.data
        self.strategy.sync_buffers(self.model)
        x, y = data.x_test.tensor_split(world)[self.rank], data.y_test.tensor_split(world)[self.rank]
        loss_sum, correct = evaluate(self.model, x, y)
        totals = self.strategy.sum_across_ranks(torch.tensor([loss_sum, float(correct)], dtype=torch.float64))
        return totals[0].item() / len(data.y_test), totals[1].item() / len(data.y_test)

    def end_epoch(self, lr: float, batch_size: int, steps: int) -> None:
        position, totals = self.position, self.position.totals
        # Training metrics of the whole global batch, not of this rank's shard; time is this rank's.
        loss_sum, correct, samples = self.strategy.sum_across_ranks(torch.tensor(
            [totals.loss_sum, float(totals.correct), float(totals.samples)], dtype=torch.float64)).tolist()
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

    def finish(self) -> Result:
        result = Result.from_history(self.exp, self.position.history, comm=self.strategy.comm_stats(self.position.global_step),
                                     steps=self.position.global_step, data=self.data,
                                     environment=environment(self.exp.seed))
        if self.out is not None and self.rank == 0:
            buffer = io.BytesIO()
            torch.save(self.model.state_dict(), buffer)
            atomic_write_bytes(self.out / "model.pt", buffer.getvalue())
            atomic_write_json(self.out / "result.json", result.to_dict())
        return result


def _check_resumable(exp: Experiment, stored: Experiment, directory: Path) -> None:
    requested, saved = exp.to_dict(), stored.to_dict()
    for key in saved:
        if key not in RESUMABLE_CHANGES and requested[key] != saved[key]:
            raise ConfigError(f"cannot resume {directory} with {key}={requested[key]!r}: the checkpoint was "
                              f"trained with {key}={saved[key]!r} (only {', '.join(RESUMABLE_CHANGES)} may change)")


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
    _check_resumable(exp, Experiment(**state["config"]), Path(resume))
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
                       backend="gloo", timeout_s=max(exp.timeout_s for exp in resolved))[0]


def _with_torchrun_world(exp: Experiment) -> Experiment:
    """Under torchrun the world size comes from its environment; an explicit other --workers is an error."""
    world_size = int(os.environ["WORLD_SIZE"])
    if exp.workers not in (1, world_size):
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
                              threads=exp.threads, backend="gloo", timeout_s=exp.timeout_s)
        return results[0]
    comm = init_from_torchrun(exp.timeout_s, backend="gloo") if torchrun else None
    if reporter is None or (comm is not None and comm.rank != 0):
        reporter = SilentReporter()  # one progress display per run: rank 0's
    return _run(exp, state, reporter, on_step, comm)


__all__ = ["train", "train_sequence", "Trainer", "TrainingDiverged", "CheckpointError", "local_step", "evaluate",
           "stored_experiment"]
