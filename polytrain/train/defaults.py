"""Default hyper-parameters per model and dataset, and validation of a whole Experiment.

The accuracies these defaults reach are measured and listed in README.md.
"""

from __future__ import annotations

import dataclasses
import os

from polytrain.compress import check_compressor
from polytrain.config import ConfigError, Experiment
from polytrain.data import DATASETS
from polytrain.models import MODELS
from polytrain.ops.precision import ROUNDING_MODES, parse_format
from polytrain.strategies import STRATEGIES
from polytrain.train.compression import check_momentum_takeover
from polytrain.train.optim import OPTIMIZERS, SCHEDULES

# The model a dataset trains when none is named.
DEFAULT_MODEL = {"digits": "lenet5", "mnist5k": "lenet5", "mnist": "lenet5", "mnist1d": "gru",
                 "synthetic": "mlp", "cifar10": "resnet20", "cifar100": "resnet20", "imagefolder": "resnet18"}

# Training settings per dataset. Image datasets get pad-and-crop shifts (digits are only 8 px wide: none);
# CIFAR and photos also get mirroring, as in He et al. 2016. Sequences and synthetic data get none.
_DATASET_DEFAULTS = {
    "digits": dict(epochs=20, batch_size=32, optimizer="momentum", lr=0.02, weight_decay=5e-4, schedule="cosine",
                   augment_shift=0, augment_flip=False),
    "mnist5k": dict(epochs=20, batch_size=128, optimizer="momentum", lr=0.05, weight_decay=1e-3,
                    schedule="cosine", augment_shift=2, augment_flip=False),
    "mnist": dict(epochs=10, batch_size=128, optimizer="momentum", lr=0.05, weight_decay=5e-4, schedule="cosine",
                  augment_shift=2, augment_flip=False),
    "mnist1d": dict(epochs=30, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="cosine",
                    augment_shift=0, augment_flip=False),
    "synthetic": dict(epochs=2, batch_size=64, optimizer="momentum", lr=0.01, weight_decay=0.0,
                      schedule="constant", augment_shift=0, augment_flip=False),
    # He et al. 2016 CIFAR recipe: lr 0.1, batch 128, wd 1e-4, decayed 10x twice, 4-px shifts and mirroring.
    "cifar10": dict(epochs=160, batch_size=128, optimizer="momentum", lr=0.1, weight_decay=1e-4, schedule="step",
                    augment_shift=4, augment_flip=True),
    "cifar100": dict(epochs=160, batch_size=128, optimizer="momentum", lr=0.1, weight_decay=5e-4,
                     schedule="step", augment_shift=4, augment_flip=True),
    "imagefolder": dict(epochs=30, batch_size=64, optimizer="momentum", lr=0.05, weight_decay=1e-4,
                        schedule="cosine", augment_shift=4, augment_flip=True),
}

# Model families that want other settings than the dataset's (recurrent nets train best with Adam).
_MODEL_DEFAULTS = {
    "lstm": dict(optimizer="adam", lr=3e-3, weight_decay=0.0),
    "gru": dict(optimizer="adam", lr=3e-3, weight_decay=0.0),
}

# Pairs measured to need more: the LSTM sits on a plateau near 20 % on MNIST-1D for ~30 epochs, then learns.
_PAIR_DEFAULTS = {("lstm", "mnist1d"): dict(epochs=60)}


def resolve(exp: Experiment) -> Experiment:
    """Fills every None setting with its default and validates the result."""
    model = exp.model or DEFAULT_MODEL.get(exp.dataset, "mlp")
    filled = {**_DATASET_DEFAULTS.get(exp.dataset, _DATASET_DEFAULTS["synthetic"]),
              **_MODEL_DEFAULTS.get(model, {}), **_PAIR_DEFAULTS.get((model, exp.dataset), {})}
    changes = {key: value for key, value in filled.items() if getattr(exp, key) is None}
    if exp.strategy is None:
        changes["strategy"] = "local" if exp.workers == 1 else "allreduce"
    if exp.threads is None:
        changes["threads"] = max(1, (os.cpu_count() or 1) // max(1, exp.workers))
    resolved = dataclasses.replace(exp, model=model, **changes)
    validate(resolved)
    return resolved


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(exp: Experiment) -> None:
    """Raises ConfigError, with the arithmetic, for the first invalid setting of a resolved Experiment."""
    for registry, name in ((MODELS, exp.model), (DATASETS, exp.dataset), (STRATEGIES, exp.strategy),
                           (OPTIMIZERS, exp.optimizer), (SCHEDULES, exp.schedule)):
        registry.get(name)
    STRATEGIES.check_arguments(exp.strategy, exp.strategy_args, fixed=("comm", "compressor"))
    STRATEGIES.get(exp.strategy).check(**exp.strategy_args)
    _check(exp.workers >= 1, f"workers must be at least 1, got {exp.workers}")
    _check(exp.epochs >= 1, f"epochs must be at least 1, got {exp.epochs}")
    _check(exp.batch_size >= 1, f"batch size must be at least 1, got {exp.batch_size}")
    _check(exp.batch_size % exp.workers == 0,
           f"global batch {exp.batch_size} is not divisible by {exp.workers} workers")
    _check(exp.workers == 1 or getattr(STRATEGIES.get(exp.strategy), "parallel", False),
           f"--workers {exp.workers} needs a parallel strategy; '{exp.strategy}' runs a single worker "
           f"(strategies: {', '.join(STRATEGIES.names())})")
    if exp.compressor is not None:
        _check(getattr(STRATEGIES.get(exp.strategy), "compresses", False),
               f"--compressor needs a strategy that sums gradients over workers (allreduce); "
               f"'{exp.strategy}' does not (use --workers 2 or more)")
        check_compressor(exp.compressor, exp.compressor_args)
        check_momentum_takeover(exp.compressor, exp.compressor_args, exp.optimizer)
    local_batch = exp.batch_size // exp.workers
    _check(1 <= exp.microbatches <= local_batch,
           f"{exp.microbatches} microbatches cannot split a per-worker batch of {local_batch} "
           f"(global batch {exp.batch_size} / {exp.workers} workers); expected 1..{local_batch}")
    _check(exp.lr > 0, f"learning rate must be positive, got {exp.lr}")
    _check(exp.weight_decay >= 0, f"weight decay must be >= 0, got {exp.weight_decay}")
    _check(0 <= exp.momentum < 1, f"momentum must be in [0, 1), got {exp.momentum}")
    _check(0 < exp.test_fraction < 1, f"test fraction must be in (0, 1), got {exp.test_fraction}")
    _check(0 <= exp.warmup_epochs < exp.epochs,
           f"warm-up of {exp.warmup_epochs} epochs must be >= 0 and shorter than the {exp.epochs} epochs")
    _check(exp.lr_reference_batch is None or exp.lr_reference_batch >= 1,
           f"lr reference batch must be at least 1, got {exp.lr_reference_batch}")
    _check(exp.grad_clip is None or exp.grad_clip > 0, f"gradient clip must be positive, got {exp.grad_clip}")
    _check(exp.target_accuracy is None or 0 < exp.target_accuracy <= 1,
           f"target accuracy must be a fraction in (0, 1], got {exp.target_accuracy}")
    _check(exp.checkpoint_steps >= 0, f"checkpoint steps must be >= 0, got {exp.checkpoint_steps}")
    _check(exp.augment_shift >= 0, f"augment shift must be >= 0 pixels, got {exp.augment_shift}")
    parse_format(exp.precision)
    _check(exp.rounding in ROUNDING_MODES, f"unknown rounding '{exp.rounding}'; expected {' or '.join(ROUNDING_MODES)}")
    _check(exp.timeout_s > 0, f"timeout must be positive seconds, got {exp.timeout_s}")
    _check(exp.threads >= 1, f"threads must be at least 1, got {exp.threads}")
