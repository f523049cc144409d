"""The training loop, optimizers and schedules, checkpoints, metrics and the Result."""

from polytrain.schedules import local_step
from polytrain.train.loop import TrainingDiverged, evaluate, stored_experiment, train, train_sequence
from polytrain.train.result import Result

__all__ = ["train", "train_sequence", "Result", "TrainingDiverged", "evaluate", "local_step", "stored_experiment"]
