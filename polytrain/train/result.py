"""The Result of a training run: the result.json contract (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from polytrain.config import Experiment
from polytrain.tasks import ACCURACY, Task


@dataclass(frozen=True)
class Result:
    """What a training run achieved, with the settings and environment that produced it.

    Rates exclude the first epoch (warm-up: allocation, caches) when there is more than one epoch; the
    first epoch's time is reported as `first_epoch_train_s`. `time_to_target_s` counts wall time from the
    start, evaluation included, until the task's test metric first reaches `target` (in its direction).
    The accuracy fields are the metric's when the task is judged by accuracy, else None.
    """

    config: dict
    dataset: dict
    task: dict
    metric: str
    final_test_metric: float
    best_test_metric: float
    final_test_accuracy: float | None
    best_test_accuracy: float | None
    target: float | None
    time_to_target_s: float | None
    wall_s: float
    train_s: float
    first_epoch_train_s: float
    samples_per_s: float
    rate_epochs: str
    steps: int
    epochs: list[dict]
    comm: dict
    environment: dict
    faults: dict = field(default_factory=dict)  # injected faults and every restart (polytrain.train.loop.supervise)
    performance: dict = field(default_factory=dict)  # predicted beside measured step (polytrain.perf.predict)
    model: dict = field(default_factory=dict)  # the whole model's size: {"parameters": N}

    @classmethod
    def from_history(cls, exp: Experiment, history: list[dict], *, comm: dict, steps: int, data: dict, task: Task,
                     environment: dict) -> "Result":
        """Summarises the per-epoch metrics of a finished run (`data`: RunData.describe())."""
        rated = history[1:] if len(history) > 1 else history
        rated_s = sum(row["train_s"] for row in rated)
        rated_samples = sum(row["samples"] for row in rated)
        metric, target = task.metric, exp.target
        values = [row[f"test_{metric.name}"] for row in history]
        reached = [row["wall_s"] for row, value in zip(history, values)
                   if target is not None and metric.reached(value, target)]
        best = max(values) if metric.higher_is_better else min(values)
        is_accuracy = metric == ACCURACY
        return cls(
            config=exp.to_dict(),
            dataset=data,
            task=task.describe(),
            metric=metric.name,
            final_test_metric=values[-1],
            best_test_metric=best,
            final_test_accuracy=values[-1] if is_accuracy else None,
            best_test_accuracy=best if is_accuracy else None,
            target=target,
            time_to_target_s=reached[0] if reached else None,
            wall_s=history[-1]["wall_s"],
            train_s=sum(row["train_s"] for row in history),
            first_epoch_train_s=history[0]["train_s"],
            samples_per_s=rated_samples / rated_s if rated_s > 0 else 0.0,
            rate_epochs=f"{rated[0]['epoch']}..{rated[-1]['epoch']}",
            steps=steps,
            epochs=list(history),
            comm=comm,
            environment=environment,
        )

    def to_dict(self) -> dict:
        """The result.json form."""
        return asdict(self)


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """A finished run's model.pt (the whole, unsplit model's state; loaded with weights_only)."""
    return torch.load(Path(directory) / "model.pt", weights_only=True)


def max_weight_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between two states of the same model (as N workers are compared with
    one worker), in float64; ValueError if their keys or shapes differ."""
    if a.keys() != b.keys() or any(a[key].shape != b[key].shape for key in a):
        raise ValueError("the two states are not of the same model: their keys or shapes differ")
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)
