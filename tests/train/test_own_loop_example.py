"""examples/own_loop.py, a user's own loop on a Session, run by `polytrain run` with 2 workers against 1 process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_loop.py"


def run(command: list[str], tmp_path: Path) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def two_workers(tmp_path: Path, *script_args: str) -> str:
    return run([sys.executable, "-m", "polytrain", "run", str(EXAMPLE), "--workers", "2", "--", *script_args],
               tmp_path)


def one_process(tmp_path: Path, *script_args: str) -> str:
    return run([sys.executable, str(EXAMPLE), *script_args], tmp_path)


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-5, rtol=1e-4)


def test_the_example_on_two_workers_equals_one_process_and_resumes_at_another_world_size(tmp_path):
    printed = two_workers(tmp_path, "--epochs", "2", "--out", "two")
    one_process(tmp_path, "--epochs", "2", "--out", "one")
    assert printed.count("test accuracy") == 2  # rank 0 alone reports
    assert_same_weights(tmp_path / "one.pt", tmp_path / "two.pt")
    two, one = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] and two["test_accuracy"] == one["test_accuracy"]
    # Counted gradient bytes: the native allreduce of every step, nothing for the single process.
    parameters = sum(t.numel() for t in torch.load(tmp_path / "one.pt", weights_only=True).values())
    assert two["comm"]["by_operation"]["native_all_reduce"] == two["steps"] * 4 * parameters
    # One epoch in one process, checkpointed, then the second epoch on two workers: the same model.
    one_process(tmp_path, "--epochs", "1", "--checkpoint", "after_one.pt")
    two_workers(tmp_path, "--epochs", "2", "--resume", "after_one.pt", "--out", "resumed")
    assert_same_weights(tmp_path / "one.pt", tmp_path / "resumed.pt")
