"""`--log tensorboard` and `--log mlflow`: what rank 0 logs equals what the run wrote to metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from polytrain.config import ConfigError, Experiment
from polytrain.train import train

RUN = Experiment(model="mlp", dataset="digits", epochs=2, batch_size=64, lr=0.05, optimizer="momentum",
                 schedule="constant", augment_shift=0, workers=2)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "run"
    result = train(RUN.replace(out=str(out), log=["tensorboard", "mlflow:experiment=checks"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, result, rows


def test_tensorboard_holds_every_step_loss_every_epoch_metric_and_the_config(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result, rows = logged
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == result.steps
    assert [e.step for e in events.Scalars("train/loss")] == list(range(result.steps))
    for key in ("test_accuracy", "train_loss", "test_loss", "samples_per_s"):
        logged_values = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")]
        assert logged_values == [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in rows]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_holds_the_settings_the_metrics_and_the_result_files(logged, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own switch for reading a tracking directory
    out, result, rows = logged
    client = mlflow.tracking.MlflowClient((out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("checks")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["workers"] == "2" and run.data.params["model"] == "mlp"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(row["epoch"], pytest.approx(row["test_accuracy"])) for row in rows]
    assert len(client.get_metric_history(run.info.run_id, "train_loss_step")) == result.steps
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"result.json", "metrics.jsonl", "model.pt"}


@pytest.mark.parametrize("log, out, message", [
    (["wandb"], "x", "unknown logger 'wandb'"),
    (["tensorboard:path=x"], "x", "tensorboard takes dir"),
    (["tensorboard"], None, "give --out DIR or dir="),
])
def test_bad_loggers_fail_in_one_line_before_any_worker_starts(tmp_path, log, out, message):
    with pytest.raises(ConfigError, match=message):
        train(RUN.replace(log=log, out=str(tmp_path / out) if out else None))
