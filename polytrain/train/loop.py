"""The training loop: the shared local step, evaluation, checkpoints and results."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.config import ConfigError, Experiment
from polytrain.data import Dataset, load_dataset
from polytrain.data.augment import augment_images, draw_augmentation
from polytrain.data.sampler import ShardedBatchSampler
from polytrain.models import build_model
from polytrain.strategies import STRATEGIES, Strategy
from polytrain.train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, rng_state,
                                        save_checkpoint, set_rng_state)
from polytrain.train.defaults import resolve
from polytrain.train.environment import environment
from polytrain.train.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from polytrain.train.optim import Schedule, build_optimizer, build_schedule
from polytrain.train.progress import Reporter, SilentReporter
from polytrain.train.result import Result

EVAL_BATCH = 1024
# Settings that may differ when resuming: they do not change what has been computed so far.
RESUMABLE_CHANGES = ("epochs", "out", "target_accuracy", "checkpoint_steps", "threads")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class _EpochTotals:
    """Running sums of the epoch in progress (kept in mid-epoch checkpoints)."""

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


def local_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatches: int,
               global_batch: int) -> tuple[float, int]:
    """Forward and backward of one worker's batch, accumulating gradients over microbatches.

    Each microbatch's summed loss is divided by the global batch size, so the accumulated gradient equals
    that of the full batch's mean loss, and summing the workers' gradients gives the global mean.

    Returns:
        The summed loss of the batch and the number of correct predictions.
    """
    loss_sum, correct = 0.0, 0
    for x_micro, y_micro in zip(x.tensor_split(microbatches), y.tensor_split(microbatches)):
        logits = model(x_micro)
        loss = F.cross_entropy(logits, y_micro, reduction="sum")
        (loss / global_batch).backward()
        loss_sum += loss.item()
        correct += int((logits.argmax(dim=1) == y_micro).sum())
    return loss_sum, correct


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


class Trainer:
    """One training run of a resolved Experiment on this process."""

    def __init__(self, exp: Experiment, reporter: Reporter, on_step: Callable[[int], None] | None) -> None:
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
        self.model = build_model(exp.model, self.data.num_classes, self.data.in_shape, **exp.model_args)
        self.optimizer = build_optimizer(exp.optimizer, self.model.parameters(), lr=exp.lr,
                                         momentum=exp.momentum, weight_decay=exp.weight_decay)
        self.schedule: Schedule = build_schedule(exp.schedule, exp.schedule_args, lr=exp.lr, epochs=exp.epochs,
                                                 batch_size=exp.batch_size, warmup_epochs=exp.warmup_epochs,
                                                 lr_reference_batch=exp.lr_reference_batch)
        self.strategy: Strategy = STRATEGIES.get(exp.strategy)(**exp.strategy_args)
        self.rank = getattr(self.strategy, "rank", 0)
        self.position = _Position()
        self.out = Path(exp.out) if exp.out else None

    # -- checkpoints -------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly where training stands."""
        position = self.position
        return {
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
        if self.out is not None and self.rank == 0:
            save_checkpoint(checkpoint_path(self.out), self.checkpoint_state())

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint written by `checkpoint_state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
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
        finally:
            self.reporter.close()
        return self.finish()

    def sampler(self, epoch: int) -> ShardedBatchSampler:
        return ShardedBatchSampler(len(self.data.y_train), self.schedule.batch_size_at(epoch),
                                   world_size=self.exp.workers, rank=self.rank, seed=self.exp.seed)

    def train_epoch(self) -> None:
        position, epoch = self.position, self.position.epoch
        sampler = self.sampler(epoch)
        steps = sampler.steps_per_epoch()
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
        loss_sum, correct = local_step(self.model, x, y, self.exp.microbatches, global_batch)
        if not math.isfinite(loss_sum):
            self.diverged(loss_sum)
        self.strategy.after_backward(self.model)
        if self.exp.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.exp.grad_clip)
        self.optimizer.step()
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

    def end_epoch(self, lr: float, batch_size: int, steps: int) -> None:
        position, totals = self.position, self.position.totals
        eval_started = time.perf_counter()
        test_loss, test_accuracy = evaluate(self.model, self.data.x_test, self.data.y_test)
        row = {
            "epoch": position.epoch + 1,
            "train_loss": totals.loss_sum / max(1, totals.samples),
            "train_accuracy": totals.correct / max(1, totals.samples),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": lr,
            "batch_size": batch_size,
            "steps": steps,
            "samples": totals.samples,
            "train_s": totals.train_s,
            "eval_s": time.perf_counter() - eval_started,
            "samples_per_s": totals.samples / totals.train_s if totals.train_s > 0 else 0.0,
            "wall_s": position.wall_s + self.elapsed(),
        }
        position.history.append(row)
        position.epoch, position.step, position.totals = position.epoch + 1, 0, _EpochTotals()
        self.reporter.epoch(row)
        if self.out is not None and self.rank == 0:
            atomic_write_jsonl(self.out / "metrics.jsonl", position.history)
        self.save()

    def finish(self) -> Result:
        result = Result.from_history(self.exp, self.position.history, comm=self.strategy.comm_stats(),
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


def train(exp: Experiment, *, resume: str | Path | None = None, reporter: Reporter | None = None,
          on_step: Callable[[int], None] | None = None) -> Result:
    """Trains `exp` on this process and returns its Result; writes the contract files when `exp.out` is set.

    Args:
        exp: the experiment; None settings take the defaults of its model and dataset.
        resume: a run directory whose checkpoint to continue from (the settings must match it, except
            those in RESUMABLE_CHANGES).
        reporter: progress output (default: none).
        on_step: called with the global step number after every optimizer step (and its checkpoint).
    """
    exp = resolve(exp)
    state = None
    if resume is not None:
        resume = Path(resume)
        state = load_checkpoint(checkpoint_path(resume))
        _check_resumable(exp, Experiment(**state["config"]), resume)
    elif exp.out is not None and checkpoint_path(exp.out).exists():
        raise ConfigError(f"{exp.out} already holds a run ({checkpoint_path(exp.out).name}); "
                          f"continue it with --resume {exp.out} or choose another --out")
    trainer = Trainer(exp, reporter or SilentReporter(), on_step)
    if state is not None:
        trainer.restore(state)
    return trainer.run()


__all__ = ["train", "Trainer", "TrainingDiverged", "CheckpointError", "local_step", "evaluate",
           "stored_experiment"]
