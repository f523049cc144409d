"""Tasks: what a run learns and how it is judged, its loss and the metric that time-to-target uses.

A task's loss is the mean over the samples of a batch (torch's default reduction), so that a user's own
`nn.CrossEntropyLoss()` or `F.mse_loss` is a task's loss as it is; the trainer multiplies it by the batch's
samples to get sums, which add up over microbatches and replicas. A metric is likewise summed per sample
and turned into its reported value from the mean per sample (`finalize`: exp for perplexity, sqrt for RMSE).

Registered: classification (cross-entropy, accuracy), regression (mean squared error, RMSE) and
language_model (next-token cross-entropy, perplexity). A dataset names its task (polytrain.data.Dataset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from polytrain.registry import Registry

TASKS: Registry = Registry("task")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _identity(value: float) -> float:
    return value


@dataclass(frozen=True)
class Metric:
    """How a run is judged.

    Attributes:
        name: the metric's name in results (`test_<name>` in every epoch row).
        per_sample_sum: (output, target) -> the sum over the batch's samples of each sample's value.
        finalize: the reported value from the mean per sample (identity, exp, sqrt, ...).
        higher_is_better: the direction time-to-target and the best epoch use.
    """

    name: str
    per_sample_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finalize: Callable[[float], float] = _identity
    higher_is_better: bool = True

    def value(self, summed: float, samples: float) -> float:
        """The reported value from the per-sample sum over `samples` samples."""
        return self.finalize(summed / max(1.0, samples))

    def reached(self, value: float, target: float) -> bool:
        """Whether `value` is at least as good as `target`."""
        return value >= target if self.higher_is_better else value <= target


@dataclass(frozen=True)
class Task:
    """A loss and a metric.

    Attributes:
        name: registered name, or the user's name for their own task.
        loss: (output, target) -> the mean loss over the batch's samples (differentiable).
        metric: see Metric.
        loss_name: what the loss is, for results.
    """

    name: str
    loss: Loss
    metric: Metric
    loss_name: str = "loss"

    def loss_sum(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss summed over the batch's samples (the first axis of `target`)."""
        return self.loss(output, target) * len(target)

    def describe(self) -> dict:
        """result.json's `task`."""
        return {"name": self.name, "loss": self.loss_name, "metric": self.metric.name,
                "higher_is_better": self.metric.higher_is_better}


def _correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(dim=1) == target).sum()


def _squared_error_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target).pow(2).flatten(1).mean(dim=1).sum()


def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of (B, T, V) logits and (B, T) targets."""
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def _token_cross_entropy_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
    return losses.view(target.shape).flatten(1).mean(dim=1).sum()


ACCURACY = Metric("accuracy", _correct)
RMSE = Metric("rmse", _squared_error_per_sample, math.sqrt, higher_is_better=False)
PERPLEXITY = Metric("perplexity", _token_cross_entropy_per_sample, math.exp, higher_is_better=False)

CLASSIFICATION = TASKS.register("classification")(Task("classification", F.cross_entropy, ACCURACY, "cross_entropy"))
REGRESSION = TASKS.register("regression")(Task("regression", F.mse_loss, RMSE, "mse"))
LANGUAGE_MODEL = TASKS.register("language_model")(
    Task("language_model", _token_cross_entropy, PERPLEXITY, "next_token_cross_entropy"))


@dataclass(frozen=True)
class _SummedLoss:
    """A mean loss as a per-sample sum (a class, not a lambda, so that spawned workers can unpickle it)."""

    loss: Loss

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output, target) * len(target)


def task_of_loss(loss: Loss, name: str = "custom") -> Task:
    """The task of a user's loss alone: judged by that loss on the test split (lower is better)."""
    metric = Metric("loss", _SummedLoss(loss), higher_is_better=False)
    return Task(name, loss, metric, getattr(loss, "__name__", type(loss).__name__))


__all__ = ["TASKS", "Task", "Metric", "ACCURACY", "RMSE", "PERPLEXITY", "CLASSIFICATION", "REGRESSION",
           "LANGUAGE_MODEL", "task_of_loss"]
