import json
import subprocess
import sys

import pytest

from polytrain.cli import main

FAST = ["--dataset", "digits", "--model", "mlp", "--epochs", "1", "--set", "threads=1"]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "polytrain", *argv], capture_output=True, text=True, timeout=120)


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["models", "datasets", "tasks", "optimizers", "schedules", "step schedules",
                                                      "strategies", "allreduce algorithms",
                                                      "sparse allreduce algorithms", "compressors",
                                                      "convolution algorithms", "aggregators"]
    assert "lenet5" in lines[0] and "mnist5k" in lines[1] and "language_model" in lines[2]
    assert "cosine" in lines[4] and "accumulate" in lines[5]
    assert "allreduce" in lines[6] and "local_sgd" in lines[6] and "diloco" in lines[6]
    assert "rabenseifner" in lines[7] and "dsar_split_allgather" in lines[8] and "powersgd" in lines[9]
    assert "winograd2" in lines[10] and "krum" in lines[11]


def test_train_writes_results_and_flags_override_config(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('lr = 0.5\nbatch_size = 32\n[schedule_args]\n')
    out = tmp_path / "run"
    assert main(["train", *FAST, "--config", str(config), "--lr", "0.05", "--set", "batch_size=16",
                 "--out", str(out)]) == 0
    settings = json.loads((out / "result.json").read_text())["config"]
    assert (settings["lr"], settings["batch_size"], settings["epochs"]) == (0.05, 16, 1)
    assert "final test accuracy" in capsys.readouterr().out


def test_resume_continues_a_run_from_the_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet"], "unknown model 'resnet'; available: "),
    (["train", "--dataset", "cifar10"], "dataset cifar10 needs path="),
    (["train", "--set", "epochz=1"], "unknown setting 'epochz'; valid: "),
    (["train", "--workers", "3", "--batch-size", "100"], "global batch 100 is not divisible by 3 workers"),
    (["train", "--resume", "/nonexistent/run"], "no checkpoint at /nonexistent/run/checkpoint.pt"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(argv, message):
    done = run_cli(*argv)
    assert done.returncode == 2
    assert done.stderr.startswith("polytrain: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_debug_shows_the_traceback():
    done = run_cli("--debug", "train", "--model", "resnet")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """A real interruption: SIGKILL the training process once it has checkpointed, then resume."""
    import signal
    import time

    import torch

    argv = ["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "3", "--set", "threads=1", "--set",
            "checkpoint_steps=5"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "polytrain", *argv, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (killed / "result.json").exists(), "the run finished before it could be interrupted"
    assert main(["train", "--resume", str(killed)]) == 0
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(killed / "model.pt", weights_only=True)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_resume_at_another_world_size_from_the_cli(tmp_path):
    # 2 workers for one epoch, then one worker: the mesh, threads and strategy follow the new world size.
    # In this process (the CLI's own entry point), so that torch is not imported again for each command.
    out = tmp_path / "run"
    common = ["--dataset", "digits", "--model", "mlp", "--schedule", "constant"]
    assert main(["train", *common, "--epochs", "1", "--workers", "2", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--workers", "1"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (result["config"]["workers"], result["config"]["strategy"], result["config"]["mesh"]["dp"]) == (1, "local", 1)
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
