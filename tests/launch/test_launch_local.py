import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from polytrain.cli import main
from polytrain.launch import WorkerFailed, run_workers


def rank_and_sum(comm):
    value = torch.tensor([float(comm.rank + 1)])
    comm.native_all_reduce(value)
    return comm.rank, comm.world_size, value.item(), torch.get_num_threads()


def test_every_rank_runs_and_reports():
    outcomes = run_workers(rank_and_sum, 3, threads=1, timeout_s=30)
    assert outcomes == [(rank, 3, 6.0, 1) for rank in range(3)]


def fail_on_rank_one(comm):
    if comm.rank == 1:
        raise ValueError("bad things on purpose")
    comm.barrier()


def test_an_error_on_one_rank_names_it():
    with pytest.raises(WorkerFailed, match="rank 1 failed: ValueError: bad things on purpose"):
        run_workers(fail_on_rank_one, 3, threads=1, timeout_s=30)


def die_on_rank_two(comm):
    comm.barrier()
    if comm.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    buffer = torch.zeros(4)
    comm.recv(buffer, src=2)  # waits on the dead peer: must not hang


def test_a_killed_rank_stops_the_others_within_the_limit():
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="rank 2 was killed by SIGKILL; the other ranks were stopped"):
        run_workers(die_on_rank_two, 4, threads=1, timeout_s=30)
    assert time.monotonic() - started < 60


def test_the_same_command_under_torchrun_equals_spawned_workers(tmp_path):
    """torchrun's environment replaces spawning: same ranks, same result."""
    argv = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--workers", "2",
            "--set", "threads=1"]
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch"
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "polytrain", *argv,
                    "--out", str(tmp_path / "torchrun")], check=True, timeout=180, capture_output=True)
    assert main([*argv, "--out", str(tmp_path / "spawned")]) == 0  # spawned from this process
    a = torch.load(tmp_path / "torchrun" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "spawned" / "model.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def hang_on_rank_one(comm):
    if comm.rank == 1:
        time.sleep(30)  # alive but silent: the peer must not wait forever
        return None
    comm.recv(torch.zeros(4), src=1)


def test_a_silent_peer_times_out_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"rank 0 failed: CommError: rank 0: p2p with ranks \[1\] (timed out|failed)"):
        run_workers(hang_on_rank_one, 2, threads=1, timeout_s=3)
    assert time.monotonic() - started < 25
