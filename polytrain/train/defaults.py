"""Default hyper-parameters per model and dataset, and validation of a whole Experiment.

The accuracies these defaults reach are measured and listed in README.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from polytrain.aggregators import check_resilience
from polytrain.comm.mesh import MeshShape
from polytrain.compress import check_compressor
from polytrain.config import ConfigError, Experiment
from polytrain.data import DATASETS
from polytrain.faults import Byzantine, check_faults, is_whole
from polytrain.models import MODELS
from polytrain.ops.precision import ROUNDING_MODES, parse_format
from polytrain.plugins import load_plugins
from polytrain.schedules import STEP_SCHEDULES
from polytrain.parallel.pipeline import PARTITIONS
from polytrain.parallel.tensor import TP_PLANS
from polytrain.strategies import STRATEGIES, policy_args, server_ranks
from polytrain.train.tracking import check_loggers
from polytrain.tasks import ACCURACY, TASKS
from polytrain.train.compression import check_compression_plan
from polytrain.train.optim import OPTIMIZERS, SCHEDULES, check_optimizer, optimizer_defaults
from polytrain.train.straggler import straggler_error

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16", "fp16")

# The model a dataset trains when none is named.
DEFAULT_MODEL = {"pydoc": "gpt", "diabetes": "mlp", "digits": "lenet5", "mnist5k": "lenet5", "mnist": "lenet5", "mnist1d": "gru",
                 "synthetic": "mlp", "cifar10": "resnet20", "cifar100": "resnet20", "imagefolder": "resnet18"}

# The task of each registered dataset that is not classification (polytrain.tasks).
DATASET_TASKS = {"pydoc": "language_model", "diabetes": "regression"}

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
    # Measured in README.md "Tasks": the small GPT reaches a test perplexity below PYDOC_TARGET, the MLP the
    # least-squares line's RMSE.
    "pydoc": dict(epochs=10, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="cosine",
                  augment_shift=0, augment_flip=False),
    "diabetes": dict(epochs=100, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=1e-2, schedule="cosine",
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

# Model metaparameters a dataset's default model takes (the user's model_args win key by key).
_PAIR_MODEL_ARGS = {("gpt", "pydoc"): {"size": "small"}, ("mlp", "diabetes"): {"hidden": [16]}}

# Pairs measured to need more: the LSTM sits on a plateau near 20 % on MNIST-1D for ~30 epochs, then learns.
_PAIR_DEFAULTS = {("lstm", "mnist1d"): dict(epochs=60)}


def dataset_task(exp: Experiment) -> str:
    """The task of exp's dataset: the registered loader's (arrays: its `task` argument), else classification."""
    if exp.dataset == "arrays":
        return exp.dataset_args.get("task", "classification")
    return DATASET_TASKS.get(exp.dataset, "classification")


def resolve(exp: Experiment, *, own: tuple[str, ...] = ()) -> Experiment:
    """Fills every None setting with its default and validates the result.

    Args:
        exp: the experiment.
        own: the settings ("model", "dataset", "task") a user's own objects stand in for: their names are
            not looked up in the registries.
    """
    load_plugins()  # names registered by other packages
    model = exp.model or DEFAULT_MODEL.get(exp.dataset, "mlp")
    filled = {**_DATASET_DEFAULTS.get(exp.dataset, _DATASET_DEFAULTS["synthetic"]),
              **_MODEL_DEFAULTS.get(model, {}), **_PAIR_DEFAULTS.get((model, exp.dataset), {})}
    changes = {key: value for key, value in filled.items() if getattr(exp, key) is None}
    changes["model_args"] = {**_PAIR_MODEL_ARGS.get((model, exp.dataset), {}), **exp.model_args}
    shape = MeshShape.from_sizes(exp.mesh)
    workers = exp.workers if exp.workers is not None else shape.world_size
    _check(workers >= 1, f"workers must be at least 1, got {workers}")
    if not exp.mesh:  # every rank a data-parallel replica
        shape = MeshShape(dp=workers)
    shape.check_workers(workers)
    changes.update(workers=workers, mesh=shape.sizes(), device=resolve_device(exp.device),
                   task=exp.task or dataset_task(exp))
    if exp.strategy is None:
        changes["strategy"] = "local" if shape.dp == 1 else "allreduce"
    if exp.threads is None:  # every rank's share of the cores, servers' included
        strategy = changes.get("strategy", exp.strategy)
        changes["threads"] = max(1, (os.cpu_count() or 1) // (workers + server_ranks(strategy, exp.strategy_args)))
    # Every optimizer keyword explicit in result.json: momentum 0.9 for momentum/nesterov, else torch's defaults.
    changes["optimizer_args"] = {**optimizer_defaults(changes.get("optimizer", exp.optimizer)), **exp.optimizer_args}
    changes.update(_resolve_faults(exp, workers, shape.dp))
    resolved = dataclasses.replace(exp, model=model, **changes)
    validate(resolved, own=own)
    return resolved


def run_ranks(exp: Experiment) -> int:
    """The processes a resolved run takes: its workers and its policy's server ranks."""
    return exp.workers + server_ranks(exp.strategy, exp.strategy_args)


STOP_AT = {"epochs": int, "wall_s": (int, float), "bytes_sent": (int, float)}


def _check_stop_at(stop_at: dict) -> None:
    for key, value in stop_at.items():
        _check(key in STOP_AT, f"stop_at has no measure '{key}'; expected {', '.join(STOP_AT)}")
        _check(isinstance(value, STOP_AT[key]) and not isinstance(value, bool) and value > 0,
               f"stop_at {key} must be a positive number; got {value!r}")


def resolve_device(device: str) -> str:
    """`auto` becomes cuda where a GPU is visible, else cpu; cpu and cuda stay (cuda needs a GPU)."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device '{device}'; expected {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: torch sees no GPU here (torch.cuda.is_available() is false); use --device cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _check_mesh_schedule(shape: MeshShape, step_schedule: str) -> None:
    """Axes that split the model (pp, tp) need a step schedule that splits it over them."""
    splits = STEP_SCHEDULES.get(step_schedule).splits
    for axis in ("pp", "tp"):
        if getattr(shape, axis) > 1 and axis not in splits:
            able = [name for name in STEP_SCHEDULES.names() if axis in STEP_SCHEDULES.get(name).splits]
            raise ConfigError(f"mesh {shape.describe()} splits the model over {axis}, but step schedule "
                              f"{step_schedule} does not split it over {axis} (schedules that do: "
                              f"{', '.join(able) or 'none yet'}; set {axis}=1)")


def chunks_per_rank(exp: Experiment) -> int:
    """Pipeline stages per pp rank: the virtual stages of an interleaving schedule, else 1."""
    return exp.virtual_stages if getattr(STEP_SCHEDULES.get(exp.step_schedule), "interleaves", False) else 1


def _check_interleaving(exp: Experiment, shape: MeshShape) -> None:
    """An interleaving schedule needs a pipeline, at least 2 virtual stages and whole groups of pp microbatches."""
    if not getattr(STEP_SCHEDULES.get(exp.step_schedule), "interleaves", False):
        return
    _check(shape.pp > 1, f"step schedule {exp.step_schedule} interleaves pipeline stages over a pp axis; mesh "
                         f"{shape.describe()} has none (use --mesh pp=P)")
    _check(exp.virtual_stages >= 2, f"step schedule {exp.step_schedule} holds virtual_stages >= 2 stages per rank, "
                                    f"got {exp.virtual_stages}")
    _check(exp.microbatches % shape.pp == 0,
           f"step schedule {exp.step_schedule} runs microbatches in groups of the pp {shape.pp} ranks; "
           f"{exp.microbatches} microbatches is not a multiple of {shape.pp}")


def _check_asynchronous_pipeline(exp: Experiment, shape: MeshShape, strategy_args) -> None:
    """A schedule that pipelines across steps (pipedream) needs a pipeline, a policy that applies its delayed
    gradient as a synchronous step would (its `policies`), and m >= pp microbatches."""
    schedule = STEP_SCHEDULES.get(exp.step_schedule)
    policies = getattr(schedule, "policies", None)
    if policies is None:
        return
    name = exp.step_schedule
    _check(shape.pp > 1, f"step schedule {name} pipelines stages over a pp axis; mesh {shape.describe()} has none "
                         f"(use --mesh pp=P)")
    _check(exp.strategy in policies,
           f"step schedule {name} hands each stage's gradient over one step late, for the update policy to reduce and "
           f"apply at once; strategy {exp.strategy} does not (use {' or '.join(policies)})")
    _check(getattr(strategy_args, "sufficient_factors", "off") == "off",
           f"step schedule {name} applies a batch's gradient in the next step, but sufficient factors rebuild it from "
           f"the activations of the step's own forwards; use sufficient_factors=off")
    _check(exp.microbatches >= shape.pp,
           f"step schedule {name} needs --microbatches >= pp (a new weight version every m >= p microbatches, so "
           f"that two versions suffice: Narayanan et al. 2021, sec. 3.1); got {exp.microbatches} microbatches for "
           f"pp {shape.pp}")


def _check_servers(exp: Experiment, shape: MeshShape, servers: int) -> None:
    """Servers sit beside data-parallel CPU workers; where they apply the optimizer to their shards, what needs
    the whole model in one place is refused."""
    args = policy_args(exp.strategy, exp.strategy_args)
    if getattr(args, "serves_stages", False):  # DistBelief: model-parallel replicas, their stages' tensors served
        _check(shape.tp == 1, f"strategy {exp.strategy} serves whole tensors to replicas or to their pipeline stages; "
                              f"mesh {shape.describe()} splits layers over tp (use dp and pp)")
        _check(shape.pp == 1 or args.groups is None,
               f"{exp.strategy} groups sum whole replicas' gradients at a leader, but with pp {shape.pp} each rank "
               f"holds one stage; use no groups")
    else:
        _check(shape.world_size == shape.dp, f"strategy {exp.strategy} puts servers beside data-parallel workers; "
                                             f"mesh {shape.describe()} splits the model (use dp only)")
    _check(exp.device == "cpu", f"the servers of {exp.strategy} take messages from whichever worker is first, "
                                f"which gloo does on CPU ranks and nccl does not; use --device cpu")
    if not args.servers_step:
        return  # the workers step their own optimizers (easgd's center on servers)
    _check(exp.grad_clip is None or servers == 1,
           f"--grad-clip clips the norm of the whole gradient, but {servers} servers each see one shard; use "
           f"servers=1 or no clipping")
    _check(exp.amp != "fp16", "amp fp16 scales the loss on the workers and unscales in the optimizer step, which "
                              f"the servers of {exp.strategy} take; use amp bf16 or none")
    _check(exp.precision == Experiment.precision,
           f"precision {exp.precision} rounds the parameters after each step on the workers, but the servers of "
           f"{exp.strategy} hold them; use the default precision")


def _resolve_faults(exp: Experiment, workers: int, replicas: int) -> dict:
    """A slow fault becomes the run's straggler; a gradient attack without an aggregator meets the plain
    mean of the gathered gradients; the aggregator's f defaults to the Byzantine replicas (else 1)."""
    try:
        check_faults(exp.faults, workers, replicas)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    changes: dict = {}
    slow = next((f for f in exp.faults if f["kind"] == "slow"), None)
    if slow is not None:
        straggler = {"rank": slow["rank"], "slowdown": slow["factor"]}
        _check(exp.straggler in ({}, straggler), "--fault slow and --straggler both slow a rank down; give one")
        changes["straggler"] = straggler
    byzantine = Byzantine.of(exp.faults)
    aggregator = exp.aggregator
    if aggregator is None and byzantine is not None and byzantine.attacks_gradients:
        aggregator = changes["aggregator"] = "mean"
    if aggregator is not None:
        changes["aggregator_args"] = {"f": len(byzantine.ranks) if byzantine is not None else 1,
                                      **exp.aggregator_args}
    return changes


def _check_faults(exp: Experiment, shape: MeshShape) -> None:
    """The faults, the aggregator and what restarts a run: refused in one line before any worker starts."""
    try:
        check_faults(exp.faults, exp.workers, shape.dp)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    byzantine = Byzantine.of(exp.faults)
    if exp.aggregator is not None:
        _check(STRATEGIES.get(exp.strategy).aggregates,
               f"--aggregator combines the replicas' gathered gradients, which strategy {exp.strategy} does not "
               f"gather; use allreduce or ps")
        _check(shape.world_size == shape.dp, f"--aggregator combines whole gradient vectors, but mesh "
                                             f"{shape.describe()} splits the model; use dp only")
        _check(exp.compressor is None, f"--aggregator gathers every replica's whole gradient; --compressor "
                                       f"{exp.compressor} sums compressed buckets instead (use one of them)")
        strategy_args = policy_args(exp.strategy, exp.strategy_args)
        _check(getattr(strategy_args, "sufficient_factors", "off") == "off",
               "--aggregator gathers whole gradients; sufficient factors rebuild them from activations "
               "(use sufficient_factors=off)")
        if exp.strategy == "ps":
            _check(strategy_args.servers == 1 and strategy_args.bound is not None and strategy_args.groups is None
                   and not strategy_args.backup,
                   "--aggregator with ps combines whole gradient vectors of every worker's step: use servers=1, "
                   "mode sync or ssp, no groups and no backup workers")
        args = dict(exp.aggregator_args)
        f = args.pop("f")
        _check(is_whole(f) and f >= 0, f"aggregator f is the number of Byzantine replicas to tolerate, a whole "
                                            f"number >= 0; got {f!r}")
        try:
            check_resilience(exp.aggregator, args, shape.dp, f)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if byzantine is not None and byzantine.attacks_gradients:
        _check(exp.aggregator is not None, f"byzantine attack {byzantine.attack} replaces gradients where they are "
                                           f"combined; it needs --aggregator")
    if byzantine is not None and byzantine.attack == "labelflip":
        _check(TASKS.get(exp.task).metric == ACCURACY, f"byzantine attack labelflip flips class labels; task "
                                                      f"{exp.task} has none")
    _check(is_whole(exp.max_restarts) and exp.max_restarts >= 0,
           f"max restarts must be a whole number >= 0, got {exp.max_restarts!r}")
    _check(is_whole(exp.keep_checkpoints) and exp.keep_checkpoints >= 1,
           f"keep checkpoints must be a whole number >= 1, got {exp.keep_checkpoints!r}")
    if exp.max_restarts:
        _check(exp.out is not None, "--max-restarts restarts from the run's checkpoints; give --out DIR")
    if exp.strategy == "ddp":
        _check(shape.world_size == shape.dp and exp.microbatches == 1 and exp.step_schedule == "accumulate",
               f"strategy ddp is torch's DistributedDataParallel over data parallelism with one microbatch per "
               f"step; got mesh {shape.describe()}, {exp.microbatches} microbatches, step schedule {exp.step_schedule}")
    if exp.elastic:
        _check(exp.max_restarts >= 1, "--elastic says how a run restarts; give --max-restarts R >= 1 too")
        _check(exp.strategy in ("allreduce", "local") and shape.world_size == shape.dp and exp.compressor is None,
               f"--elastic continues with fewer replicas, which needs synchronous data parallelism without per-rank "
               f"state (allreduce over dp, no compressor); got strategy {exp.strategy}, mesh {shape.describe()}"
               f"{', compressor ' + exp.compressor if exp.compressor else ''}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(exp: Experiment, *, own: tuple[str, ...] = ()) -> None:
    """Raises ConfigError, with the arithmetic, for the first invalid setting of a resolved Experiment
    (`own`: see resolve)."""
    for key, registry, name in (("model", MODELS, exp.model), ("dataset", DATASETS, exp.dataset),
                                ("task", TASKS, exp.task), ("strategy", STRATEGIES, exp.strategy),
                                ("optimizer", OPTIMIZERS, exp.optimizer), ("schedule", SCHEDULES, exp.schedule)):
        if key not in own:
            registry.get(name)
    strategy_args = policy_args(exp.strategy, exp.strategy_args)
    shape = MeshShape.from_sizes(exp.mesh)
    shape.check_workers(exp.workers)
    _check_mesh_schedule(shape, exp.step_schedule)
    replicas = shape.dp
    # Messages speak of workers while every rank is a replica, as they did before meshes.
    who = f"{replicas} workers" if replicas == exp.workers else f"{replicas} data-parallel replicas ({shape.describe()})"
    _check(exp.epochs >= 1, f"epochs must be at least 1, got {exp.epochs}")
    _check(exp.batch_size >= 1, f"batch size must be at least 1, got {exp.batch_size}")
    _check(exp.batch_size % replicas == 0,
           f"global batch {exp.batch_size} is not divisible by {who}")
    parallel = STRATEGIES.get(exp.strategy).parallel
    _check(replicas == 1 or parallel,
           f"--workers {exp.workers} needs a parallel strategy; '{exp.strategy}' runs a single worker "
           f"(strategies: {', '.join(STRATEGIES.names())})")
    _check(replicas > 1 or not parallel,
           f"strategy {exp.strategy} needs at least 2 data-parallel replicas; mesh {shape.describe()} has 1")
    _check(exp.grad_clip is None or shape.pp == 1,
           f"--grad-clip clips the norm of the whole gradient, but with pp {shape.pp} each rank holds one stage; "
           f"use pp=1 or no clipping")
    _check(exp.amp != "fp16" or shape.pp == 1, f"amp fp16 scales the loss on the last of pp {shape.pp} stages "
                                               f"and unscales on every one; use amp bf16 or none")
    _check_interleaving(exp, shape)
    _check_asynchronous_pipeline(exp, shape, strategy_args)
    _check(exp.tp_plan in TP_PLANS, f"unknown tp plan '{exp.tp_plan}'; available: {', '.join(TP_PLANS)}")
    _check(not isinstance(exp.partition, str) or exp.partition in PARTITIONS,
           f"unknown partition '{exp.partition}'; expected {' or '.join(PARTITIONS)}, or a list of the module "
           f"indices where stages 2, 3, ... begin")
    _check(exp.grad_clip is None or shape.tp == 1,
           f"--grad-clip clips the norm of the whole gradient, but with tp {shape.tp} each rank holds a shard of "
           f"the split layers; use tp=1 or no clipping")
    if STRATEGIES.get(exp.strategy).splits_model:
        _check(shape.world_size == shape.dp,
               f"strategy {exp.strategy} splits the model over the dp ranks itself; mesh {shape.describe()} splits "
               f"it too (use --mesh dp={shape.world_size})")
        _check(exp.grad_clip is None, f"--grad-clip clips the norm of the whole gradient, but with strategy "
                                      f"{exp.strategy} each rank holds a shard of the model; use no clipping")
    straggler = straggler_error(exp.straggler, exp.workers)
    _check(straggler is None, straggler or "")
    _check_stop_at(exp.stop_at)
    _check_faults(exp, shape)
    if hasattr(strategy_args, "check_replicas"):
        strategy_args.check_replicas(replicas)
    _check(not getattr(strategy_args, "receives_from_any_rank", False) or exp.device == "cpu",
           f"strategy {exp.strategy} receives from whichever rank is first, which gloo does on CPU ranks and nccl "
           f"does not; use --device cpu")
    servers = server_ranks(exp.strategy, exp.strategy_args)
    if servers:
        _check_servers(exp, shape, servers)
    _check(exp.amp in AMP_MODES, f"unknown amp '{exp.amp}'; expected {', '.join(AMP_MODES)}")
    if exp.compressor is not None:
        _check(STRATEGIES.get(exp.strategy).compresses,
               f"--compressor needs a strategy that sums gradients over workers (allreduce); "
               f"'{exp.strategy}' does not (use --workers 2 or more)")
        check_compressor(exp.compressor, exp.compressor_args)
        check_compression_plan(exp)
    local_batch = exp.batch_size // replicas
    _check(1 <= exp.microbatches <= local_batch,
           f"{exp.microbatches} microbatches cannot split a per-worker batch of {local_batch} "
           f"(global batch {exp.batch_size} / {who}); expected 1..{local_batch}")
    _check(exp.lr > 0, f"learning rate must be positive, got {exp.lr}")
    _check(exp.weight_decay >= 0, f"weight decay must be >= 0, got {exp.weight_decay}")
    check_optimizer(exp.optimizer, exp.optimizer_args, exp.lr, exp.weight_decay)
    _check(0 < exp.test_fraction < 1, f"test fraction must be in (0, 1), got {exp.test_fraction}")
    _check(0 <= exp.warmup_epochs < exp.epochs,
           f"warm-up of {exp.warmup_epochs} epochs must be >= 0 and shorter than the {exp.epochs} epochs")
    _check(exp.lr_reference_batch is None or exp.lr_reference_batch >= 1,
           f"lr reference batch must be at least 1, got {exp.lr_reference_batch}")
    _check(exp.grad_clip is None or exp.grad_clip > 0, f"gradient clip must be positive, got {exp.grad_clip}")
    accuracy = "task" not in own and TASKS.get(exp.task).metric == ACCURACY
    _check(exp.target is None or not accuracy or 0 < exp.target <= 1,
           f"target accuracy must be a fraction in (0, 1], got {exp.target}")
    _check(exp.target is None or math.isfinite(exp.target), f"target must be a finite number, got {exp.target}")
    _check(exp.loader_workers >= 0, f"loader workers must be >= 0, got {exp.loader_workers}")
    _check(exp.checkpoint_steps >= 0, f"checkpoint steps must be >= 0, got {exp.checkpoint_steps}")
    _check(exp.augment_shift >= 0, f"augment shift must be >= 0 pixels, got {exp.augment_shift}")
    parse_format(exp.precision)
    _check(exp.rounding in ROUNDING_MODES, f"unknown rounding '{exp.rounding}'; expected {' or '.join(ROUNDING_MODES)}")
    _check(exp.timeout_s > 0, f"timeout must be positive seconds, got {exp.timeout_s}")
    _check(exp.threads >= 1, f"threads must be at least 1, got {exp.threads}")
    _check_out(exp.out)
    check_loggers(exp)


def _check_out(out: str | None) -> None:
    """--out names a folder or where one can be made: neither an existing file nor a path below one."""
    if out is None:
        return
    path = Path(out)
    blocker = next((place for place in (path, *path.parents) if place.exists()), None)
    if blocker is None or blocker.is_dir():
        return
    where = "is an existing file" if blocker == path else f"is below {blocker}, an existing file"
    raise ConfigError(f"--out {out} {where}; expected a directory (for result.json, metrics.jsonl, model.pt "
                      f"and checkpoints)")
