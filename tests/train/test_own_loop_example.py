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


def test_the_example_resumed_on_two_workers_equals_one_process(tmp_path):
    # Epoch 1 in one process, checkpointed; epoch 2 on two workers from that checkpoint (another world
    # size); against both epochs in one process: the same model, the same test accuracy.
    one_process(tmp_path, "--epochs", "1", "--checkpoint", "after_one.pt", "--out", "first")
    printed = two_workers(tmp_path, "--epochs", "2", "--resume", "after_one.pt", "--out", "two")
    one_process(tmp_path, "--epochs", "2", "--out", "one")
    assert printed.count("test accuracy") == 1  # rank 0 alone reports, the resumed epoch only
    assert_same_weights(tmp_path / "one.pt", tmp_path / "two.pt")
    first, two, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "two", "one"))
    assert two["world_size"] == 2 and two["steps"] == one["steps"] and two["test_accuracy"] == one["test_accuracy"]
    # Counted gradient bytes: the native allreduce of every step of the resumed epoch.
    parameters = sum(t.numel() for t in torch.load(tmp_path / "one.pt", weights_only=True).values())
    assert two["comm"]["by_operation"]["native_all_reduce"] == (two["steps"] - first["steps"]) * 4 * parameters
