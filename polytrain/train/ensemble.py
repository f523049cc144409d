"""Ensembles and knowledge distillation: k models trained in parallel, one per group of workers, judged
together, and consolidated into one model (Ben-Nun & Hoefler 2019, section 6.4: model consolidation;
Hinton, Vinyals & Dean 2015).

`train_ensemble(exp, members=k)` (and `polytrain ensemble --members k ...`) splits the run's W workers into
k contiguous groups of W/k and trains member i on group i, all at once in one spawn: the same settings and
data, each member with seed exp.seed + i (its own initial weights, data order and augmentation; the
train/test split is exp.seed's for all, so every member is judged on the same test samples). Each member
is an ordinary run (its own strategy among its W/k workers, its own directory `member-i/` with
result.json); the ensemble predicts the mean of the members' softmax probabilities, and its test accuracy
is reported beside each member's.

Distillation (on by default) then trains one student (the members' model, or `student_model`) on all W
workers to match the ensemble: its loss is

    soft_weight * T^2 * KL(p_T(ensemble) || softmax(z / T)) + (1 - soft_weight) * CE(z, label)

with p_T the mean over the members of softmax(z_i / T) (Hinton et al.'s soft targets; the T^2 keeps the
soft term's gradients on the scale of the hard one). The teacher's targets are computed once, on the
unaugmented training samples; the student's metric is its accuracy on the true labels. `ensemble.json`
holds every accuracy, and `student/` the student's run. The defaults, T = 2 and soft_weight 0.5, are the
common choice (e.g. PyTorch's distillation tutorial uses T = 2); at T = 4 the soft term's gradient, T times
(softmax(z / T) - p_T), is large while the student's logits are far from the teacher's, and LeNet-5 at the
lr (0.05 with momentum) that trains its members collapsed to one class (measured): lower the lr for high T.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polytrain.comm import Communicator
from polytrain.config import ConfigError, Experiment
from polytrain.data import Dataset, load_dataset
from polytrain.launch import run_workers
from polytrain.models import build_model
from polytrain.strategies import server_ranks
from polytrain.tasks import Metric, Task
from polytrain.train.defaults import resolve
from polytrain.train.io import atomic_write_json
from polytrain.train.loop import OwnObjects, _run, train
from polytrain.train.progress import SilentReporter
from polytrain.train.result import load_weights
from polytrain.train.result import Result

# Strategies whose ranks create process groups of their own: a member's group cannot, since the other
# members' ranks do not take part.
GROUP_MAKING = ("adpsgd",)
INFERENCE_BATCH = 1000


@dataclass(frozen=True)
class DistillationLoss:
    """Hinton et al.'s loss on targets packed as [label, p_T(class 0), ..., p_T(class C-1)] (see the module
    docstring)."""

    temperature: float = 2.0
    soft_weight: float = 0.5

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, soft = target[:, 0].long(), target[:, 1:]
        t = self.temperature
        wide = output.to(torch.promote_types(output.dtype, torch.float32))  # bf16 logits under amp
        soft_loss = F.kl_div(F.log_softmax(wide / t, dim=1), soft, reduction="batchmean") * t * t
        return self.soft_weight * soft_loss + (1 - self.soft_weight) * F.cross_entropy(output, labels)


def _correct_on_labels(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(dim=1) == target[:, 0].long()).sum()


def distillation_task(temperature: float, soft_weight: float) -> Task:
    """The student's task: the distillation loss, judged by accuracy on the true labels."""
    return Task("distillation", DistillationLoss(temperature, soft_weight), Metric("accuracy", _correct_on_labels),
                f"distillation (T={temperature:g}, soft weight {soft_weight:g})")


@dataclass
class EnsembleResult:
    """What an ensemble run gives: its members' runs and accuracies, the ensemble's, and the student's."""

    members: list[Result]
    member_accuracy: list[float]
    ensemble_accuracy: float
    student: Result | None
    temperature: float
    soft_weight: float

    def to_dict(self) -> dict:
        student = None
        if self.student is not None:
            student = {"model": self.student.config["model"], "test_accuracy": self.student.final_test_metric,
                       "temperature": self.temperature, "soft_weight": self.soft_weight,
                       "workers": self.student.config["workers"], "wall_s": self.student.wall_s}
        return {"members": [{"seed": m.config["seed"], "workers": m.config["workers"], "test_accuracy": accuracy,
                             "wall_s": m.wall_s} for m, accuracy in zip(self.members, self.member_accuracy)],
                "mean_member_accuracy": sum(self.member_accuracy) / len(self.member_accuracy),
                "ensemble": {"test_accuracy": self.ensemble_accuracy, "members": len(self.members),
                             "combination": "mean of the members' softmax probabilities"},
                "student": student}


def _train_members(comm: Communicator, experiments: list[Experiment], own: OwnObjects) -> Result | None:
    """A rank's side: the member of its group of W/k ranks (every rank creates every group, in order)."""
    size = comm.world_size // len(experiments)
    groups = [dist.new_group(list(range(i * size, (i + 1) * size))) for i in range(len(experiments))] if size > 1 else []
    member = comm.rank // size
    group = Communicator(groups[member], timeout_s=comm.timeout.total_seconds()) if size > 1 else None
    result = _run(experiments[member], None, SilentReporter(), None, group, own)
    return result if comm.rank % size == 0 else None


def _check(exp: Experiment, members: int, temperature: float, soft_weight: float) -> None:
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {members!r}")
    if exp.workers is None or exp.workers % members:
        raise ConfigError(f"--workers {exp.workers} cannot be split into {members} equal groups, one per member; "
                          f"use a multiple of {members}")
    if exp.mesh and any(size > 1 for axis, size in exp.mesh.items() if axis != "dp"):
        raise ConfigError("ensemble members train data-parallel only; drop --mesh")
    if exp.strategy in GROUP_MAKING or (exp.strategy and server_ranks(exp.strategy, exp.strategy_args)):
        raise ConfigError(f"strategy {exp.strategy} makes process groups or server ranks of its own, which one "
                          f"member's workers cannot do alone; use allreduce, local_sgd, gossip, easgd or hogwild")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if not 0 <= soft_weight <= 1:
        raise ConfigError(f"soft_weight must be in [0, 1], got {soft_weight}")


def _load_data(exp: Experiment) -> Dataset:
    data = load_dataset(exp.dataset, seed=exp.seed, test_fraction=exp.test_fraction, **exp.dataset_args)
    if not isinstance(data, Dataset) or data.task != "classification":
        raise ConfigError(f"ensembles combine class probabilities of in-memory classification data; dataset "
                          f"{exp.dataset} is {'streamed' if not isinstance(data, Dataset) else data.task}")
    return data


def _member_model(exp: Experiment, data: Dataset, directory: Path) -> nn.Module:
    model = build_model(exp.model, data.num_classes, data.in_shape, **exp.model_args)
    model.load_state_dict(load_weights(directory))
    return model.eval()


@torch.no_grad()
def ensemble_probabilities(models: list[nn.Module], x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The mean over `models` of softmax(logits / temperature) for every sample of `x` (N, classes)."""
    total = None
    for model in models:
        probabilities = torch.cat([F.softmax(model(x[i:i + INFERENCE_BATCH]).float() / temperature, dim=1)
                                   for i in range(0, len(x), INFERENCE_BATCH)])
        total = probabilities if total is None else total + probabilities
    return total / len(models)


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels).sum().item() / len(labels)


def train_ensemble(exp: Experiment, *, members: int, distill: bool = True, temperature: float = 2.0,
                   soft_weight: float = 0.5, student_model: str | None = None) -> EnsembleResult:
    """Trains `members` models in parallel on exp.workers // members workers each, judges them alone and
    together on the test split, and (with `distill`) trains one student on all exp.workers workers to match
    the ensemble. Writes ensemble.json (and the members' and student's runs) under exp.out when set."""
    _check(exp, members, temperature, soft_weight)
    data = _load_data(exp)
    size = exp.workers // members
    with tempfile.TemporaryDirectory(prefix="polytrain-ensemble-") as scratch:
        root = Path(exp.out) if exp.out is not None else Path(scratch)
        if (root / "ensemble.json").exists():
            raise ConfigError(f"{root} already holds an ensemble (ensemble.json); choose another --out")
        threads = exp.threads or max(1, (os.cpu_count() or 1) // exp.workers)
        strategy = exp.strategy if size > 1 else "local"
        own = OwnObjects(data=data)
        experiments = [resolve(exp.replace(workers=size, seed=exp.seed + i, threads=threads, out=str(root / f"member-{i}"),
                                           strategy=strategy, strategy_args=exp.strategy_args if size > 1 else {},
                                           dataset=data.name, mesh={}), own=("dataset",))
                       for i in range(members)]
        ranks = run_workers(_train_members, exp.workers, (experiments, own), threads=threads,
                            timeout_s=max(e.timeout_s for e in experiments))
        results = [ranks[i * size] for i in range(members)]
        models = [_member_model(e, data, Path(e.out)) for e in experiments]
        member_accuracy = [_accuracy(ensemble_probabilities([m], data.x_test), data.y_test) for m in models]
        ensemble_accuracy = _accuracy(ensemble_probabilities(models, data.x_test), data.y_test)
        student = None
        if distill:
            model_args = exp.model_args if student_model in (None, exp.model) else {}
            student = train(exp.replace(model=student_model or exp.model, model_args=model_args, seed=exp.seed + members,
                                        out=str(root / "student") if exp.out is not None else None),
                            data=_with_teacher(data, models, temperature),
                            task=distillation_task(temperature, soft_weight))
        result = EnsembleResult(results, member_accuracy, ensemble_accuracy, student, temperature, soft_weight)
        if exp.out is not None:
            atomic_write_json(root / "ensemble.json", result.to_dict())
    return result


def _with_teacher(data: Dataset, models: list[nn.Module], temperature: float) -> Dataset:
    """`data` with every target packed as [label, the ensemble's p_T(class)...] (DistillationLoss)."""
    def packed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.float().unsqueeze(1), ensemble_probabilities(models, x, temperature)], dim=1)

    return dataclasses.replace(data, name=f"{data.name}+ensemble", y_train=packed(data.x_train, data.y_train),
                               y_test=packed(data.x_test, data.y_test), source=f"{data.source}, ensemble targets")
