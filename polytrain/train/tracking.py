"""Experiment logging in the ecosystem's formats: TensorBoard event files and MLflow tracking (`--log`).

Both are optional extras (`pip install polytrain[tensorboard]`, `polytrain[mlflow]`) and run on rank 0 as
a Reporter around the progress display, so they see what it sees: the loss of every step, every epoch's
metrics.jsonl row and, when the run ends, its result files.

- `tensorboard[:dir=D]`: scalars `train/loss` per step and every number of the epoch row under `epoch/`
  (test accuracy, losses, samples/s, wall time) per epoch, the settings as text; D defaults to OUT/tensorboard.
- `mlflow[:uri=U,experiment=E]`: the settings as params (tables flattened as key.sub), the same metrics,
  and result.json, metrics.jsonl and model.pt as artifacts. U defaults to $MLFLOW_TRACKING_URI, else the
  tracking directory OUT/mlruns (MLflow's file store, which the skinny client writes without a database).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from polytrain.config import ConfigError, Experiment, parse_named
from polytrain.train.progress import Reporter

LOGGERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
ARTIFACTS = ("result.json", "metrics.jsonl", "model.pt")


def parse_loggers(specs: list) -> list[tuple[str, dict[str, Any]]]:
    """[(name, args)] of `log` entries such as "tensorboard" or "mlflow:uri=http://host:5000"."""
    parsed = []
    for spec in specs:
        if not isinstance(spec, str):
            raise ConfigError(f"log entry {spec!r}: expected NAME[:k=v,...] with NAME {' or '.join(LOGGERS)}")
        name, args = parse_named(spec, "--log")
        if name not in LOGGERS:
            raise ConfigError(f"unknown logger '{name}'; expected {' or '.join(LOGGERS)}")
        allowed = {"tensorboard": {"dir"}, "mlflow": {"uri", "experiment"}}[name]
        if set(args) - allowed:
            raise ConfigError(f"--log {name} takes {', '.join(sorted(allowed))}; got {', '.join(sorted(args))}")
        parsed.append((name, args))
    return parsed


def check_loggers(exp: Experiment) -> None:
    """Fails in one line before any worker starts: unknown loggers, a missing package, nowhere to write."""
    import importlib.util

    for name, args in parse_loggers(exp.log):
        module, extra = LOGGERS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"--log {name} needs the {extra} package: pip install 'polytrain[{extra}]'")
        needs_out = (name == "tensorboard" and "dir" not in args) or (
            name == "mlflow" and "uri" not in args and not os.environ.get("MLFLOW_TRACKING_URI"))
        if needs_out and exp.out is None:
            where = "dir=" if name == "tensorboard" else "uri= (or set MLFLOW_TRACKING_URI)"
            raise ConfigError(f"--log {name} writes below the run's directory: give --out DIR or {where}")


def flat_settings(settings: dict, prefix: str = "") -> dict[str, str]:
    """{"strategy_args.algorithm": "ring", ...}: the settings as MLflow params (strings, tables flattened)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _numbers(row: dict) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}


class TensorBoardLog:
    def __init__(self, exp: Experiment, args: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=args.get("dir") or str(Path(exp.out) / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(exp.to_dict(), indent=1) + "\n```")

    def step(self, global_step: int, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, global_step)

    def epoch(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])

    def close(self, out: Path | None) -> None:
        self.writer.close()


class MLflowLog:
    def __init__(self, exp: Experiment, args: dict) -> None:
        import mlflow

        uri = args.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or (Path(exp.out) / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the tracking directory the issue asks for
        self.client = mlflow.tracking.MlflowClient(uri)
        name = str(args.get("experiment", "polytrain"))
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        run_name = Path(exp.out).name if exp.out else f"{exp.model}-{exp.strategy}-seed{exp.seed}"
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        params = flat_settings(exp.to_dict())
        for batch in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            chunk = list(params.items())[batch:batch + 100]
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in chunk])

    def step(self, global_step: int, loss: float) -> None:
        self.client.log_metric(self.run_id, "train_loss_step", loss, step=global_step)

    def epoch(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.client.log_metric(self.run_id, key, value, step=row["epoch"])

    def close(self, out: Path | None) -> None:
        finished = out is not None and (out / "result.json").exists()
        for name in ARTIFACTS if finished else ():
            if (out / name).exists():
                self.client.log_artifact(self.run_id, str(out / name))
        self.client.set_terminated(self.run_id, status="FINISHED" if finished or out is None else "FAILED")


class TrackingReporter:
    """Passes everything to the progress display and to each logger of `exp.log`."""

    def __init__(self, inner: Reporter, exp: Experiment) -> None:
        self.inner, self.exp = inner, exp
        self.logs = [{"tensorboard": TensorBoardLog, "mlflow": MLflowLog}[name](exp, args)
                     for name, args in parse_loggers(exp.log)]

    def start(self, description: str, epochs: int, first_epoch: int) -> None:
        self.inner.start(description, epochs, first_epoch)

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        self.inner.step(epoch, step, steps, loss)
        for log in self.logs:
            log.step(epoch * steps + step, loss)

    def epoch(self, row: dict) -> None:
        self.inner.epoch(row)
        for log in self.logs:
            log.epoch(row)

    def close(self) -> None:
        self.inner.close()
        for log in self.logs:
            log.close(Path(self.exp.out) if self.exp.out else None)


def with_tracking(reporter: Reporter, exp: Experiment) -> Reporter:
    """`reporter`, with the run's loggers when it has any (rank 0 only: the caller decides)."""
    return TrackingReporter(reporter, exp) if exp.log else reporter
