"""The Result of a training run: the result.json contract (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from polytrain.config import Experiment
from polytrain.data import Dataset


@dataclass(frozen=True)
class Result:
    """What a training run achieved, with the settings and environment that produced it.

    Rates exclude the first epoch (warm-up: allocation, caches) when there is more than one epoch; the
    first epoch's time is reported as `first_epoch_train_s`. `time_to_target_s` counts wall time from the
    start, evaluation included.
    """

    config: dict
    dataset: dict
    final_test_accuracy: float
    best_test_accuracy: float
    target_accuracy: float | None
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

    @classmethod
    def from_history(cls, exp: Experiment, history: list[dict], *, comm: dict, steps: int, data: Dataset,
                     environment: dict) -> "Result":
        """Summarises the per-epoch metrics of a finished run."""
        rated = history[1:] if len(history) > 1 else history
        rated_s = sum(row["train_s"] for row in rated)
        rated_samples = sum(row["samples"] for row in rated)
        target = exp.target_accuracy
        reached = [row["wall_s"] for row in history if target is not None and row["test_accuracy"] >= target]
        return cls(
            config=exp.to_dict(),
            dataset={"name": data.name, "synthetic": data.synthetic, "source": data.source,
                     "num_train": len(data.y_train), "num_test": len(data.y_test),
                     "in_shape": list(data.in_shape), "num_classes": data.num_classes},
            final_test_accuracy=history[-1]["test_accuracy"],
            best_test_accuracy=max(row["test_accuracy"] for row in history),
            target_accuracy=target,
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
