"""`polytrain run SCRIPT.py`: a user's own script on N ranks with torchrun's environment.

Scripts that need no collective import no torch, so most of these runs take well under a second.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from polytrain.launch.cluster import unavailable_reason
from polytrain.launch.script import (
    TIMEOUT_STATUS,
    add_run_parser,
    command_run,
    rank_environment,
    rank_threads,
    run_script,
    split_script_args,
)

# Joins the group from the environment, all-reduces its rank, writes the sum and the environment it saw.
ALL_REDUCE = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank())])
dist.all_reduce(value)
names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS", "POLYTRAIN_THREADS"]
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as file:
    json.dump({"sum": value.item(), "argv": sys.argv[2:], **{name: os.environ[name] for name in names}}, file)
dist.destroy_process_group()
"""
# Rank 1 gives up at once; rank 0 would sleep for a minute.
RANK_ONE_FAILS = """
import os, sys, time
if os.environ["RANK"] == "1":
    print("rank 1 gives up", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
"""
# Every rank writes its pid, then sleeps.
SLEEPER = """
import os, sys, time
with open(os.path.join(sys.argv[1], "pid" + os.environ["RANK"]), "w") as file:
    file.write(str(os.getpid()))
time.sleep(60)
"""


def write(tmp_path, source, name="train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is dead too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_ranks_all_reduce_with_torchruns_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # two ranks share eight cores: four threads each
    script = write(tmp_path, ALL_REDUCE)
    assert run_script(script, [str(tmp_path), "--lr", "0.1"], 2, timeout_s=60) == 0
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, environment in enumerate(seen):
        assert environment == {"sum": 1.0, "argv": ["--lr", "0.1"], "RANK": str(rank), "LOCAL_RANK": str(rank),
                               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                               "OMP_NUM_THREADS": "4", "POLYTRAIN_THREADS": "4"}


def test_the_threads_follow_the_flag_then_the_users_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert rank_threads(4, environment={}) == 1 and rank_threads(2, environment={}) == 3
    assert rank_threads(8, environment={}) == 1  # never zero
    assert rank_threads(2, environment={"OMP_NUM_THREADS": "5"}) == 5
    assert rank_threads(2, 2, environment={"OMP_NUM_THREADS": "5"}) == 2
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many' is not a positive integer"):
        rank_threads(2, environment={"OMP_NUM_THREADS": "many"})
    environment = rank_environment(1, 2, 29999, 3, env={"RANK": "7", "MINE": "x"})
    assert (environment["RANK"], environment["MINE"], environment["MASTER_PORT"]) == ("1", "x", "29999")
    assert environment["OMP_NUM_THREADS"] == environment["POLYTRAIN_THREADS"] == "3"
    assert environment["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # the launcher holds the store, as torchrun


def test_a_failing_rank_is_named_and_stops_the_others(tmp_path, capfd):
    script = write(tmp_path, RANK_ONE_FAILS)
    started = time.monotonic()
    assert run_script(script, [], 2, timeout_s=60) == 3  # rank 1's own status
    assert time.monotonic() - started < 10  # rank 0 is not waited for
    err = capfd.readouterr().err
    assert "rank 1 gives up" in err  # the ranks write to the terminal
    assert err.splitlines()[-1] == "polytrain run: rank 1 of 2 exited with status 3; the others were stopped"


def test_the_deadline_stops_every_rank(tmp_path, capfd):
    script = write(tmp_path, SLEEPER)
    started = time.monotonic()
    assert run_script(script, [str(tmp_path)], 2, timeout_s=1) == TIMEOUT_STATUS
    assert time.monotonic() - started < 10
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    assert not any(alive(pid) for pid in pids)
    assert capfd.readouterr().err.splitlines()[-1] == ("polytrain run: rank(s) 0, 1 of 2 still running at the 1 s "
                                                       "timeout (--timeout); every rank was stopped")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_the_ranks(tmp_path, signum):
    script = write(tmp_path, SLEEPER)
    launch = ("import signal, sys; from polytrain.launch.script import run_script; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "  # not ignored, even in a background job
              f"sys.exit(run_script({str(script)!r}, [{str(tmp_path)!r}], 2, timeout_s=60))")
    process = subprocess.Popen([sys.executable, "-c", launch], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"pid{rank}").exists() for rank in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 128 + signum
    assert stderr.splitlines()[-1] == f"polytrain run: stopped by {signum.name}; every rank was stopped"
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("call, message", [
    (lambda tmp: run_script(tmp / "missing.py", [], 2), "script '.*missing.py' not found; expected the path"),
    (lambda tmp: run_script(tmp, [], 2), "is not a file"),
    (lambda tmp: run_script(write(tmp, "pass"), [], 0), "workers must be an integer of at least 1, got 0"),
    (lambda tmp: run_script(write(tmp, "pass"), [], 1, timeout_s=0), "timeout must be a positive number"),
])
def test_bad_input_is_refused_before_anything_starts(tmp_path, call, message):
    with pytest.raises(ValueError, match=message) as raised:
        call(tmp_path)
    assert "\n" not in str(raised.value)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="polytrain")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["run", *argv])


def test_options_may_follow_the_script_and_everything_else_is_the_scripts():
    args = parse("--timeout", "9", "train.py", "--lr", "0.1", "--workers", "2", "data", "--time", "3",
                 "--", "--workers", "8")
    assert (args.script, args.timeout) == ("train.py", 9.0)
    assert split_script_args(args.script_args) == ({"workers": 2},
                                                   ["--lr", "0.1", "data", "--time", "3", "--workers", "8"])
    with pytest.raises(ValueError, match="argument --workers: invalid int value: 'two'"):
        split_script_args(["--workers", "two"])


@pytest.mark.parametrize("argv, message", [
    (["--cluster-hosts", "2", "--workers", "3", "{script}"], "--workers 3 differs from --cluster-hosts 2"),
    (["{script}", "--bandwidth", "1gbit"], ("--bandwidth limits the links of the emulated cluster; it needs "
                                            "--cluster-hosts H")),
    (["{script}", "--cluster-hosts", "2", "--bandwidth", "fast"], "bandwidth 'fast' is not a rate"),
    (["missing.py", "--workers", "2"], "script 'missing.py' not found"),
])
def test_bad_command_lines_are_one_line_errors(tmp_path, argv, message):
    script = str(write(tmp_path, "pass"))
    with pytest.raises(ValueError, match=message):
        command_run(parse(*[arg.format(script=script) for arg in argv]))


def test_polytrain_run_on_the_command_line(tmp_path):
    script = write(tmp_path, RANK_ONE_FAILS)
    done = subprocess.run([sys.executable, "-m", "polytrain", "run", str(script), "--workers", "2"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3
    assert done.stderr.splitlines()[-1] == "polytrain run: rank 1 of 2 exited with status 3; the others were stopped"
    done = subprocess.run([sys.executable, "-m", "polytrain", "run", str(tmp_path / "missing.py")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("polytrain: error: script ") and "not found" in done.stderr


@pytest.fixture(scope="module")
def cluster_available():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no emulated cluster on this machine: {reason}")


def test_two_emulated_hosts_run_the_script(cluster_available, tmp_path):
    script = write(tmp_path, ALL_REDUCE)
    args = parse("--cluster-hosts", "2", "--bandwidth", "100mbit", "--timeout", "60", str(script), str(tmp_path))
    assert command_run(args) == 0
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(environment["sum"], environment["RANK"], environment["LOCAL_WORLD_SIZE"]) for environment in seen] == \
        [(1.0, "0", "1"), (1.0, "1", "1")]
    assert seen[0]["MASTER_ADDR"].startswith("10.77.")

