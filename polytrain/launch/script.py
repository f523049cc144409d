"""`polytrain run SCRIPT.py`: a user's own training script on N ranks, as torchrun would start it.

Each rank is `python SCRIPT.py ARGS...` with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GROUP_RANK, ROLE_RANK, ...), so a script that calls
`torch.distributed.init_process_group()` or `polytrain.setup()` runs unchanged under `torchrun
--nproc-per-node N` and `polytrain run --workers N`. As torchrun does, the launcher holds the rendezvous
store itself (TORCHELASTIC_USE_AGENT_STORE=True; every rank is a client of it), so the port is free by
construction and no rank races another to bind it.

torch's own launcher (elastic_launch) is not used: it has no deadline for a whole run, it waits up to 30 s
for ranks to stop, and it reports a failure as a multi-line table plus log lines and error files. This
one writes one line naming the rank and its exit status, stops the others within STOP_GRACE_S, and kills
everything at the run's deadline.

With `--cluster-hosts H` the ranks run one per host of the emulated cluster (launch/cluster.py) instead.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from polytrain.launch.cluster import (
    ClusterError,
    EmulatedCluster,
    HostFailed,
    parse_bandwidth,
    stop_process_groups,
)
from polytrain.launch.local import exit_reason

DEFAULT_TIMEOUT_S = 24 * 3600.0  # generous: a deadline for runs that hang, not a limit on long ones
STOP_GRACE_S = 5.0  # how long a rank has to exit after the signal that stops it before it is killed
POLL_S = 0.5  # the longest the launcher waits between looks at the deadline
TIMEOUT_STATUS = 124  # as timeout(1)
HOST_OUTPUT_LINES = 30  # how much of each other host's output is shown when a cluster run fails
USAGE = ("polytrain run [--workers N | --cluster-hosts H [--bandwidth RATE]] [--threads T] [--timeout S] "
         "SCRIPT.py [ARG ...] [-- ARG ...]")
# The launcher's own signals, which it passes on to the ranks (each runs in a session of its own, so the
# terminal's Ctrl-C reaches only the launcher).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(Exception):
    """The launcher received `signum`; the ranks are to be stopped with it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _set_handlers(handler: object) -> dict[int, object]:
    """Installs `handler` for FORWARDED_SIGNALS where Python allows it (the main thread); returns the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in FORWARDED_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # ignored on purpose (a background job of a shell, nohup): stays so
        old = signal.signal(signum, handler)
        previous[signum] = signal.SIG_DFL if old is None else old
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# -- checks and the environment of a rank ------------------------------------------------------------------

def check_script(script: str | os.PathLike) -> None:
    """A one-line ValueError unless `script` is a file (checked before anything starts)."""
    path = Path(script)
    if not path.exists():
        raise ValueError(f"script {str(script)!r} not found; expected the path of a Python file to run on every rank")
    if not path.is_file():
        raise ValueError(f"script {str(script)!r} is not a file; expected the path of a Python file")


def _check_counts(workers: int, timeout_s: float, what: str = "workers") -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{what} must be an integer of at least 1, got {workers!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout_s!r}")


def rank_threads(workers: int, threads: int | None = None, environment: Mapping[str, str] | None = None) -> int:
    """Threads per rank: `threads`, else the user's OMP_NUM_THREADS, else the cores divided by the ranks.

    Ranks that each take every core slow one another down, hence the split (torchrun sets 1).
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
        return threads
    given = (environment if environment is not None else os.environ).get("OMP_NUM_THREADS")
    if given is not None:
        if not given.strip().isdigit() or int(given) < 1:
            raise ValueError(f"OMP_NUM_THREADS={given!r} is not a positive integer; unset it or give --threads")
        return int(given)
    return max(1, (os.cpu_count() or 1) // workers)


def rank_environment(rank: int, workers: int, master_port: int, threads: int,
                     env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local rank `rank`: ours, then `env`, then torchrun's variables for one node.

    OMP_NUM_THREADS and POLYTRAIN_THREADS both carry `threads` (polytrain.setup reads the latter).
    """
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(workers),
            "LOCAL_WORLD_SIZE": str(workers), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
            "ROLE_NAME": "default", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(workers),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": str(threads), "POLYTRAIN_THREADS": str(threads)}


def _status(code: int) -> int:
    """The launcher's exit status for a rank's return code: the same, or 128 + N when killed by signal N."""
    return 128 - code if code < 0 else code


def _error(message: str) -> None:
    sys.stdout.flush()
    print(f"polytrain run: {message}", file=sys.stderr, flush=True)


# -- local ranks -------------------------------------------------------------------------------------------

def run_script(script: str | os.PathLike, script_args: Sequence[str], workers: int, *, threads: int | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, env: Mapping[str, str] | None = None) -> int:
    """Runs `python script *script_args` on `workers` local ranks and returns the run's exit status.

    Every rank writes to this process's stdout and stderr. When a rank fails, the others are stopped
    (SIGTERM, then SIGKILL after STOP_GRACE_S) and one line on stderr names it; at the deadline every rank
    is stopped the same way; a SIGINT, SIGTERM or SIGHUP of the launcher is passed on to the ranks.

    Args:
        script: the Python file every rank runs.
        script_args: its arguments, the same on every rank.
        workers: number of ranks.
        threads: threads per rank (default: the user's OMP_NUM_THREADS, else cores / workers).
        timeout_s: deadline of the whole run.
        env: further environment variables of the ranks (the rendezvous variables cannot be overridden).

    Returns:
        0 when every rank exited 0; the first failed rank's status (128 + N if killed by signal N);
        TIMEOUT_STATUS at the deadline; 128 + N when the launcher was stopped by signal N.

    Raises:
        ValueError: a missing script or bad count, before anything starts.
    """
    check_script(script)
    _check_counts(workers, timeout_s)
    threads = rank_threads(workers, threads, {**os.environ, **(env or {})})
    # Held here for the whole run: the ranks' rendezvous (and torch's later barriers) go through it.
    store = dist.TCPStore("127.0.0.1", 0, workers, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    argv = [sys.executable, str(script), *script_args]
    processes: list[subprocess.Popen] = []
    stop_signal = signal.SIGTERM
    previous = _set_handlers(_raise_stopped)
    try:
        try:
            for rank in range(workers):
                # A session of its own: only the launcher decides when a rank stops, and stopping a rank
                # reaches its children (data loader workers) too. Rank 0 keeps the terminal's stdin.
                processes.append(subprocess.Popen(argv, env=rank_environment(rank, workers, store.port, threads, env),
                                                  stdin=None if rank == 0 else subprocess.DEVNULL,
                                                  start_new_session=True))
            status, message = _wait(processes, timeout_s)
        except _Stopped as stopped:
            stop_signal = stopped.signum
            status, message = 128 + stopped.signum, f"stopped by {stopped}; every rank was stopped"
        finally:
            _set_handlers(signal.SIG_IGN)  # a second Ctrl-C must not cut the stopping short
            stop_process_groups(processes, stop_signal, STOP_GRACE_S)
    finally:
        _restore_handlers(previous)
        del store
    if message:
        _error(message)
    return status


def _wait(processes: list[subprocess.Popen], timeout_s: float) -> tuple[int, str | None]:
    """Waits until every rank exited 0, one failed, or the deadline passed: (exit status, message or None).

    One thread per rank waits for it, so ranks are seen in the order they exited: the first to fail is
    named, not a peer that failed a moment later because it lost the connection to it.
    """
    exits: queue.Queue = queue.Queue()
    for rank, process in enumerate(processes):
        threading.Thread(target=lambda rank=rank, process=process: exits.put((rank, process.wait())),
                         name=f"polytrain-run-rank-{rank}", daemon=True).start()
    workers, finished = len(processes), set()
    deadline = time.monotonic() + timeout_s
    while len(finished) < workers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            running = ", ".join(str(rank) for rank in range(workers) if rank not in finished)
            return TIMEOUT_STATUS, (f"rank(s) {running} of {workers} still running at the {timeout_s:g} s "
                                    f"timeout (--timeout); every rank was stopped")
        try:
            rank, code = exits.get(timeout=min(POLL_S, remaining))
        except queue.Empty:
            continue
        if code != 0:
            others = "; the others were stopped" if workers > 1 else ""
            return _status(code), f"rank {rank} of {workers} {exit_reason(code)}{others}"
        finished.add(rank)
    return 0, None


# -- the emulated cluster ----------------------------------------------------------------------------------

def run_script_on_cluster(script: str | os.PathLike, script_args: Sequence[str], hosts: int,
                          bandwidth: str | None = "1gbit", *, threads: int | None = None,
                          timeout_s: float = DEFAULT_TIMEOUT_S, env: Mapping[str, str] | None = None) -> int:
    """Runs `python script *script_args` on each host of an emulated cluster, one rank per host.

    Host 0 writes to this process's stdout and stderr; when a host fails, the last HOST_OUTPUT_LINES of
    every other host's output are shown before the one-line error.

    Returns:
        0 when every host succeeded; the failed host's status as run_script; TIMEOUT_STATUS at the deadline; 130 on Ctrl-C.
        (A SIGTERM ends the process with status 143 once the cluster is removed.)

    Raises:
        ValueError: a missing script, a bad count or bandwidth, or no cluster can be built here (not root,
            no iproute2), before any script starts.
    """
    check_script(script)
    _check_counts(hosts, timeout_s, "cluster hosts")
    parse_bandwidth(bandwidth)
    threads = rank_threads(hosts, threads, {**os.environ, **(env or {})})
    variables = {**(env or {}), "OMP_NUM_THREADS": str(threads), "POLYTRAIN_THREADS": str(threads),
                 "TORCHELASTIC_USE_AGENT_STORE": "False"}  # host 0's rank holds the store on the cluster
    started = time.monotonic()
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(EmulatedCluster(hosts, bandwidth))
        except ClusterError as error:
            raise ValueError(str(error)) from None
        try:
            cluster.run([sys.executable, str(script), *script_args], env=variables, timeout_s=timeout_s)
        except HostFailed as error:
            for host, output in error.outputs.items():
                if output.strip():
                    tail = "\n".join(output.splitlines()[-HOST_OUTPUT_LINES:])
                    print(f"--- host {host}, last lines of its output ---\n{tail}", file=sys.stderr)
            if time.monotonic() - started >= timeout_s:
                _error(f"{error} (--timeout)")
                return TIMEOUT_STATUS
            _error(str(error))
            return _host_status(str(error))
        except KeyboardInterrupt:
            _error("stopped by SIGINT; every host was stopped")
            return 130
    return 0


def _host_status(message: str) -> int:
    """The exit status that HostFailed's message names ("exited with status 3", "was killed by SIGKILL"), else 1."""
    if match := re.search(r"exited with status (\d+)", message):
        return int(match.group(1)) or 1
    if (match := re.search(r"was killed by (SIG[A-Z0-9]+)", message)) and match.group(1) in signal.Signals.__members__:
        return 128 + signal.Signals[match.group(1)]
    return 1


# -- the command line --------------------------------------------------------------------------------------

class _OptionParser(argparse.ArgumentParser):
    """Parses `polytrain run`'s options found after SCRIPT; a bad one is a one-line ValueError."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _add_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("--workers", type=int, default=default, help="local ranks (default 1; with "
                                                                       "--cluster-hosts: one per host)")
    parser.add_argument("--cluster-hosts", type=int, default=default, metavar="H",
                        help="run on H emulated hosts instead, one rank each (network namespaces; root)")
    parser.add_argument("--bandwidth", default=default, metavar="RATE",
                        help="with --cluster-hosts: each host's link, each way, in tc's units (100mbit, 1gbit) "
                             "or none (default 1gbit)")
    parser.add_argument("--threads", type=int, default=default,
                        help="threads per rank (default: $OMP_NUM_THREADS, else cores / ranks)")
    parser.add_argument("--timeout", type=float, default=default, metavar="S",
                        help=f"seconds before every rank is stopped (default {DEFAULT_TIMEOUT_S:g})")


def add_run_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `polytrain run` to the subcommands `commands`; command_run carries it out."""
    parser = commands.add_parser("run", usage=USAGE, help="run your own training script on N ranks, as torchrun",
                                 description=__doc__.split("\n\n")[0] + " polytrain run's options may come before "
                                 "or after SCRIPT; everything else after SCRIPT, and all after --, goes to the script.")
    _add_options(parser)
    parser.add_argument("script", metavar="SCRIPT.py", help="the Python file every rank runs")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARG", help="the script's arguments")
    return parser


def split_script_args(arguments: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """Splits what follows SCRIPT into polytrain run's own options and the script's arguments.

    Before a `--`, the options of `polytrain run` (spelled out in full) are taken wherever they stand;
    everything else, in order, and everything after the first `--`, goes to the script.
    """
    arguments = list(arguments)
    cut = arguments.index("--") if "--" in arguments else len(arguments)
    parser = _OptionParser(prog="polytrain run", allow_abbrev=False, add_help=False)
    _add_options(parser, argparse.SUPPRESS)
    options, rest = parser.parse_known_args(arguments[:cut])
    return vars(options), rest + arguments[cut + 1:]


def command_run(args: argparse.Namespace) -> int:
    """`polytrain run`: the exit status of the run (see run_script); bad input raises ValueError."""
    options, script_args = split_script_args(args.script_args)
    settings = {name: getattr(args, name) for name in ("workers", "cluster_hosts", "bandwidth", "threads", "timeout")}
    settings.update(options)
    timeout_s = DEFAULT_TIMEOUT_S if settings["timeout"] is None else settings["timeout"]
    workers, hosts = settings["workers"], settings["cluster_hosts"]
    if hosts is None:
        if settings["bandwidth"] is not None:
            raise ValueError("--bandwidth limits the links of the emulated cluster; it needs --cluster-hosts H")
        return run_script(args.script, script_args, 1 if workers is None else workers, threads=settings["threads"],
                          timeout_s=timeout_s)
    if workers is not None and workers != hosts:
        raise ValueError(f"--workers {workers} differs from --cluster-hosts {hosts}; the emulated cluster runs "
                         f"one rank per host (leave --workers out)")
    bandwidth = "1gbit" if settings["bandwidth"] is None else settings["bandwidth"]
    return run_script_on_cluster(args.script, script_args, hosts, bandwidth, threads=settings["threads"],
                                 timeout_s=timeout_s)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_STATUS",
    "add_run_parser",
    "check_script",
    "command_run",
    "rank_environment",
    "rank_threads",
    "run_script",
    "run_script_on_cluster",
    "split_script_args",
]
