"""A user's own model, data and task through polytrain.train: N workers against one, streamed against in memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

import polytrain
from polytrain.config import ConfigError, Experiment
from polytrain.data import load_dataset
from polytrain.tasks import Metric, Task, task_of_loss
from polytrain.train.result import Result


class NoisyPlane(TorchDataset):
    """y = x . w + noise for 10 features: a user's own map-style dataset (picklable, built on every rank)."""

    def __init__(self, num_samples: int = 400) -> None:
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(num_samples, 10, generator=generator)
        weights = torch.linspace(-1, 1, 10)
        self.y = (self.x @ weights + 0.1 * torch.randn(num_samples, generator=generator)).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class Regressor(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def absolute_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).abs().flatten(1).mean(dim=1).sum()


HUBER = Task("huber", nn.SmoothL1Loss(), Metric("mae", absolute_error, higher_is_better=False), "smooth_l1")


def own_run(workers: int, out) -> Result:
    exp = Experiment(workers=workers, epochs=3, batch_size=32, optimizer="adam", lr=0.01, schedule="constant",
                     weight_decay=0.0, out=str(out))
    return polytrain.train(exp, model=Regressor, data=NoisyPlane(), task=HUBER)


def test_own_module_dataset_and_task_on_two_workers_equal_one_worker(tmp_path):
    one, two = own_run(1, tmp_path / "one"), own_run(2, tmp_path / "two")
    assert one.config["model"].endswith("Regressor") and one.config["dataset"] == "NoisyPlane"
    assert one.task == {"name": "huber", "loss": "smooth_l1", "metric": "mae", "higher_is_better": False}
    assert one.final_test_accuracy is None and one.metric == "mae"
    assert one.dataset["read"] == "dataloader" and one.dataset["num_train"] == 320
    first, last = one.epochs[0]["test_mae"], one.epochs[-1]["test_mae"]
    assert last < 0.5 * first  # it learns the plane
    for a, b in zip(one.epochs, two.epochs):
        assert a["test_mae"] == pytest.approx(b["test_mae"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    weights_one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    weights_two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], atol=1e-5, rtol=1e-4)


def test_a_streamed_dataset_gives_the_weights_of_the_in_memory_one(tmp_path):
    # The digits split as .npy files, memory-mapped and read by two DataLoader workers, against the same
    # tensors indexed in memory: the same seed must give the same weights, bit for bit.
    digits = load_dataset("digits", seed=0)
    folder = tmp_path / "digits_npy"
    folder.mkdir()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.save(folder / f"{name}.npy", getattr(digits, name).numpy())
    settings = dict(model="lenet5", epochs=2, batch_size=32, optimizer="momentum", lr=0.02, weight_decay=5e-4,
                    schedule="cosine", augment_shift=0, augment_flip=False)
    memory = polytrain.train(Experiment(dataset="digits", out=str(tmp_path / "memory"), **settings))
    streamed = polytrain.train(Experiment(dataset="arrays", dataset_args={"path": str(folder)}, loader_workers=2,
                                          out=str(tmp_path / "streamed"), **settings))
    assert memory.dataset["read"] == "memory" and streamed.dataset["read"] == "dataloader"
    assert streamed.dataset["num_classes"] == 10 and streamed.dataset["in_shape"] == [1, 8, 8]
    assert [row["test_accuracy"] for row in streamed.epochs] == [row["test_accuracy"] for row in memory.epochs]
    a = torch.load(tmp_path / "memory" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "streamed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[name], b[name]) for name in a)
    # Cut mid-epoch (step 30 of 45) after a checkpoint, then resumed: the loader starts at the saved step.
    cut = Experiment(dataset="arrays", dataset_args={"path": str(folder)}, loader_workers=2, checkpoint_steps=10,
                     out=str(tmp_path / "cut"), **settings)

    def stop(global_step: int) -> None:
        if global_step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        polytrain.train(cut, on_step=stop)
    polytrain.train(cut, resume=tmp_path / "cut")
    c = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[name], c[name]) for name in a)


def test_a_loss_alone_is_its_own_metric():
    task = task_of_loss(nn.MSELoss())
    assert task.metric.name == "loss" and not task.metric.higher_is_better
    output, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]])
    assert float(task.metric.per_sample_sum(output, target)) == pytest.approx(10.0)  # (1 + 9) / 2 per sample * 2


def test_registered_metrics_are_computed_from_per_sample_sums():
    from polytrain.tasks import LANGUAGE_MODEL, REGRESSION

    output, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    summed = float(REGRESSION.metric.per_sample_sum(output, target))
    assert REGRESSION.metric.value(summed, 2) == pytest.approx(math.sqrt((1 + 4) / 2))
    logits = torch.randn(3, 5, 7)
    tokens = torch.randint(0, 7, (3, 5))
    summed = float(LANGUAGE_MODEL.metric.per_sample_sum(logits, tokens))
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())))
    assert LANGUAGE_MODEL.metric.value(summed, 3) == pytest.approx(expected, rel=1e-5)
    assert float(LANGUAGE_MODEL.loss_sum(logits, tokens)) == pytest.approx(summed, rel=1e-5)


def test_time_to_target_follows_the_metric_direction():
    lower = Task("t", nn.MSELoss(), Metric("rmse", absolute_error, higher_is_better=False))
    history = [{"epoch": e, "test_rmse": v, "wall_s": float(e), "train_s": 1.0, "samples": 10}
               for e, v in enumerate([3.0, 2.0, 1.5, 1.8], start=1)]
    result = Result.from_history(Experiment(target=1.9), history, comm={}, steps=4, data={}, task=lower,
                                 environment={})
    assert result.time_to_target_s == 3.0 and result.best_test_metric == 1.5 and result.final_test_metric == 1.8
    never = Result.from_history(Experiment(target=1.0), history, comm={}, steps=4, data={}, task=lower,
                                environment={})
    assert never.time_to_target_s is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(model=Regressor()), "model is a Regressor; expected a registered name or a picklable callable"),
    (dict(model=Regressor, data=NoisyPlane(), task=nn.MSELoss()), "task is a MSELoss; expected a polytrain.tasks.Task"),
    (dict(model=lambda: 3, data=NoisyPlane(), task=HUBER), "returned a int; expected a torch.nn.Module"),
    (dict(data=NoisyPlane(), task=HUBER), "does not say its classes"),
    (dict(model=Regressor, data=[1, 2, 3], task=HUBER), "expected a dataset or a (train, test) pair"),
])
def test_bad_own_objects_are_one_line_errors(kwargs, message):
    with pytest.raises((ConfigError, ValueError)) as error:
        polytrain.train(Experiment(epochs=1, batch_size=16), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
