"""The training loop, optimizers and schedules, checkpoints, metrics and the Result."""

from polytrain.train.loop import TrainingDiverged, evaluate, local_step, stored_experiment, train
from polytrain.train.result import Result

__all__ = ["train", "Result", "TrainingDiverged", "evaluate", "local_step", "stored_experiment"]
