"""Frozen experiment configuration: TOML loading and typed `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """An invalid setting; the message is one line naming what was wrong and what was expected."""


@dataclass(frozen=True)
class Experiment:
    """Everything that defines one training run.

    Fields left as None are filled by `polytrain.train.defaults.resolve` with the defaults for the chosen
    model and dataset, so a resolved Experiment states every setting explicitly.

    Attributes:
        model: model zoo name (None: the dataset's default model).
        model_args: metaparameters passed to the model builder (e.g. SqueezeNet's `sr`).
        dataset: dataset name.
        dataset_args: arguments of the dataset loader (e.g. `path` for user files).
        augment_shift: translate training images by up to this many pixels (0: off).
        augment_flip: mirror training images left-right with probability 1/2.
        test_fraction: share of samples held out for testing (datasets with an official split ignore it).
        task: what is learned and judged, a registered task (polytrain.tasks: classification, regression,
            language_model; None: the dataset's).
        loader_workers: DataLoader worker processes per rank for data read sample by sample (streamed
            datasets, a user's torch Dataset; 0: read in the training process). In-memory datasets ignore it.
        workers: number of ranks (None: the product of the mesh's axes, or 1).
        mesh: sizes of the mesh axes, e.g. {"dp": 2, "pp": 2} (polytrain.comm.mesh; None or missing axes:
            all ranks data-parallel).
        step_schedule: how one replica computes the forward and backward passes of a step
            (polytrain.schedules).
        tp_plan: which layers a tp axis above 1 splits: linear (pairs of linear layers, Megatron) or
            conv+linear (convolutions by filters and input channels too; polytrain.parallel.tensor).
        virtual_stages: stages per pp rank under the interleaved schedule (the model is cut into pp x v).
        partition: how a pp axis cuts the model into stages at its top-level modules: flops (balanced by the
            cost model), time (balanced by each module's measured forward and backward on a microbatch), or
            the module indices where stages 2, 3, ... begin, e.g. [3, 7] (polytrain.parallel.pipeline).
        strategy: the update policy, how replicas stay consistent (None: local for one worker, allreduce
            for more).
        strategy_args: arguments of the strategy.
        device: where each rank computes: auto (its GPU when there is one, else the CPU), cpu or cuda.
        amp: mixed precision of forward passes: none, bf16 or fp16 (fp16 with loss scaling).
        compressor: gradient compressor (None: gradients are sent uncompressed), a registered name or
            `first+second` (polytrain.compress.build).
        compressor_args: arguments of the compressor and its wrappers (ef, min_numel, exclude_biases,
            exclude, min_rate).
        aggregator: how the replicas' whole gradients are combined (polytrain.aggregators: mean, median,
            trimmed_mean, krum, multikrum, bulyan, geometric_median, centered_clipping; None: summed by the
            policy's allreduce, without gathering them).
        aggregator_args: arguments of the aggregator, and f, the Byzantine replicas it must tolerate (default:
            the byzantine fault's ranks, else 1).
        epochs: passes over the training split.
        stop_at: pause the run at the end of the first epoch where one of these is reached, with its
            checkpoint to continue from: {"epochs": E}, {"wall_s": S} (rank 0's training wall time) or
            {"bytes_sent": B} (rank 0's bytes sent); the schedule still spans `epochs` ({}: run them all).
            The schedulers of `polytrain tune` pause trials at their rungs with it.
        batch_size: global batch: samples per optimizer step over all workers.
        optimizer: torch.optim optimizer by registered name.
        lr: learning rate (for `lr_reference_batch` samples when the linear scaling rule is on).
        optimizer_args: keywords of the torch.optim constructor, by torch's own names (momentum,
            dampening, nesterov for SGD; betas, eps, amsgrad for Adam; alpha, eps, centered, momentum
            for RMSprop; ...); missing ones are made explicit by `resolve` (momentum 0.9 for the
            momentum and nesterov optimizers, torch's defaults otherwise).
        weight_decay: L2 penalty (decoupled for adamw).
        schedule: learning-rate schedule name.
        schedule_args: arguments of the schedule (e.g. `milestones`, `gamma`, `power`).
        warmup_epochs: linear learning-rate warm-up length in epochs (Goyal et al. 2017).
        lr_reference_batch: when set, `lr` is scaled by batch_size / lr_reference_batch (linear scaling rule).
        grad_clip: clip the global gradient norm to this value.
        precision: number format the weights are stored in after every step: fp32, fp16, bf16 or
            fixed:IL.FL (Gupta et al. 2015).
        rounding: how weights are rounded to `precision`: stochastic or nearest.
        microbatches: split each worker's batch into this many microbatches (gradient accumulation).
        seed: seed of weights, data order and split.
        target: the value of the task's test metric that time-to-target waits for (an accuracy in (0, 1],
            a perplexity, an RMSE; reached when the metric is at least, or for lower-is-better metrics at
            most, this).
        checkpoint_steps: also checkpoint every this many steps (0: only at the end of each epoch).
        straggler: slow one rank down reproducibly, {"rank": R, "slowdown": S}: rank R's forward and
            backward passes take S times as long (polytrain.train.straggler); {} (default): none.
        faults: faults injected on purpose, a list of tables such as {kind = "kill", rank = 2, step = 30}
            (polytrain.faults: kill, hang, slow, corrupt-checkpoint, byzantine).
        max_restarts: how often a run whose rank died or hung restarts itself from its newest intact
            checkpoint (local worker processes; under torchrun its own --max-restarts).
        elastic: restart with the surviving workers instead of as many as before (synchronous data
            parallelism: the global batch stays and is re-sharded).
        keep_checkpoints: checkpoints kept, the newest as checkpoint.pt and the ones before as
            checkpoint.STEP.pt; a corrupt newest one falls back to the one before.
        threads: torch threads per worker (None: the machine's cores divided by the workers).
        timeout_s: the longest any communication may wait for a peer before the run fails.
        out: directory for result.json, metrics.jsonl, model.pt and checkpoints.
        log: experiment loggers on rank 0, e.g. ["tensorboard", "mlflow:uri=http://host:5000"]
            (polytrain.train.tracking; optional extras).
    """

    model: str | None = None
    model_args: dict = field(default_factory=dict)
    dataset: str = "mnist5k"
    dataset_args: dict = field(default_factory=dict)
    test_fraction: float = 0.2
    task: str | None = None
    loader_workers: int = 1
    augment_shift: int | None = None
    augment_flip: bool | None = None
    workers: int | None = None
    mesh: dict = field(default_factory=dict)
    step_schedule: str = "accumulate"
    tp_plan: str = "linear"
    virtual_stages: int = 2
    partition: str | list = "flops"
    strategy: str | None = None
    strategy_args: dict = field(default_factory=dict)
    device: str = "auto"
    amp: str = "none"
    compressor: str | None = None
    compressor_args: dict = field(default_factory=dict)
    aggregator: str | None = None
    aggregator_args: dict = field(default_factory=dict)
    epochs: int | None = None
    stop_at: dict = field(default_factory=dict)
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    optimizer_args: dict = field(default_factory=dict)
    weight_decay: float | None = None
    schedule: str | None = None
    schedule_args: dict = field(default_factory=dict)
    warmup_epochs: float = 0.0
    lr_reference_batch: int | None = None
    grad_clip: float | None = None
    precision: str = "fp32"
    rounding: str = "stochastic"
    microbatches: int = 1
    seed: int = 0
    target: float | None = None
    checkpoint_steps: int = 0
    straggler: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    max_restarts: int = 0
    elastic: bool = False
    keep_checkpoints: int = 1
    threads: int | None = None
    timeout_s: float = 60.0
    out: str | None = None
    log: list = field(default_factory=list)

    def replace(self, **changes: Any) -> "Experiment":
        """Returns a copy with `changes` applied (validated like overrides)."""
        return apply_overrides(self, changes)

    def to_dict(self) -> dict:
        """Plain-dict form for result.json and checkpoints."""
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    """The valid configuration keys."""
    return [f.name for f in dataclasses.fields(Experiment)]


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Experiment)


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """The runtime types a field accepts: `int | None` -> (int, NoneType)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(a for a in typing.get_args(annotation))
    return (annotation,)


def _coerce(key: str, value: Any) -> Any:
    """Checks `value` against the type of field `key`, converting int to float where a float is due."""
    allowed = _allowed_types(_field_types()[key])
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} may not be none")
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key}={value!r}: expected {_type_words(allowed)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dict in allowed and isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
        raise ConfigError(f"{key}={value!r}: expected {_type_words(allowed)}")
    return value


def _type_words(allowed: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "a table of key=value", list: "a list", type(None): "none"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


def parse_value(text: str) -> Any:
    """Parses an override's value as a TOML literal (`3`, `0.1`, `true`, `[1, 2]`); anything else is a string.

    `none` and `null` mean None.
    """
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: list[str], what: str = "--set") -> dict[str, Any]:
    """Turns ["a=1", "b.c=x"] into {"a": 1, "b.c": "x"}; values parsed by `parse_value`."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r}: expected key=value")
        parsed[key.strip()] = parse_value(text.strip())
    return parsed


def parse_named(spec: str, what: str) -> tuple[str, dict[str, Any]]:
    """Parses `NAME[:k=v,...]` (the --strategy and --compressor syntax) into (name, args)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ConfigError(f"{what} {spec!r}: expected NAME[:k=v,...]")
    args = parse_assignments([part for part in rest.split(",") if part], what) if rest else {}
    return name, args


def apply_overrides(base: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """Returns `base` with `overrides` applied; `key.sub=value` sets one entry of a dict field.

    Unknown keys and wrongly typed values raise ConfigError naming the valid keys or the expected type.
    """
    changes: dict[str, Any] = {}
    valid = field_names()
    for key, value in overrides.items():
        name, _, sub = key.partition(".")
        if name not in valid:
            raise ConfigError(f"unknown setting '{name}'; valid: {', '.join(valid)}")
        if sub:
            if dict not in _allowed_types(_field_types()[name]):
                raise ConfigError(f"setting '{name}' has no entries; '{key}' is not valid")
            current = changes.get(name, dict(getattr(base, name)))
            changes[name] = {**current, sub: value}
        else:
            changes[name] = _coerce(name, value)
    return dataclasses.replace(base, **changes)


def flatten_toml(table: Mapping[str, Any]) -> dict[str, Any]:
    """Flattens grouping sections ([train], [data]); a table named after a dict field is kept whole."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and key not in field_names():
            flat.update(flatten_toml(value))
        else:
            flat[key] = value
    return flat


def toml_value(value: Any) -> str:
    """A setting's value as a TOML literal (strings escaped as JSON escapes them, which TOML reads alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"cannot write {value!r} as TOML; expected a string, number, boolean, list or table")


def to_toml(settings: Mapping[str, Any]) -> str:
    """Settings as a TOML config file that `load_toml` reads back; None values are left out (TOML has none)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items() if value is not None)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML config file into overrides; sections such as [train] only group keys."""
    return flatten_toml(load_toml_tables(path))


def load_toml_tables(path: str | Path) -> dict[str, Any]:
    """Reads a TOML file as its tables, with a one-line error for an unreadable or invalid file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}); expected a TOML file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in {path}: {error}") from None
