"""Local worker processes, and the torchrun environment, for running a function on every rank."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from polytrain.comm import DEFAULT_TIMEOUT_S, Communicator

# How long the parent waits, once a rank has failed, for the others to report their own error before
# it terminates them.
FAILURE_GRACE_S = 2.0
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Local ranks talk over loopback: gloo otherwise listens on the address the host name resolves to (the
# caller's own GLOO_SOCKET_IFNAME wins).
LOOPBACK_ENVIRONMENT = {"GLOO_SOCKET_IFNAME": "lo"}


class WorkerFailed(RuntimeError):
    """A rank raised or died; the message names the rank and what happened to it.

    Attributes:
        worker_traceback: the failed rank's traceback, when it could report one (shown by --debug).
        lost_ranks: the ranks that died without a word or, when none did, those that never reported and had
            to be stopped (hung); the others noticed them.
        detected_at: when the launcher first saw the failure (time.time()).
    """

    def __init__(self, message: str, worker_traceback: str = "", lost_ranks: list[int] | None = None,
                 detected_at: float | None = None) -> None:
        super().__init__(message)
        self.worker_traceback = worker_traceback
        self.lost_ranks = list(lost_ranks or [])
        self.detected_at = detected_at if detected_at is not None else time.time()


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher setting its environment)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend() -> str:
    """nccl when this process can own a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_torchrun(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Communicator:
    """Joins the process group described by torchrun's environment and returns its Communicator."""
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Communicator(timeout_s=timeout_s)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _worker(rank: int, world_size: int, store_port: int, backend: str, threads: int, timeout_s: float,
            environment: dict, results: mp.Queue, fn: Callable[..., Any], args: tuple) -> None:
    """Body of one spawned rank: join the group, run `fn(comm, *args)`, report the outcome."""
    # The fork server keeps the environment of its first use; a rank sees the caller's of now.
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                              timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        value = fn(Communicator(timeout_s=timeout_s), *args)
        # Plain pickle copies tensors into the message; the queue's own pickler would share their storage
        # through file descriptors that vanish when this process exits.
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException as error:  # report every failure, including KeyboardInterrupt, to the parent
        results.put(("error", rank, _one_line(error), traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_reason(code: int | None) -> str:
    """How a process ended, for messages: "was killed by SIGKILL" or "exited with status 1"."""
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def worker_context() -> mp.context.BaseContext:
    """The multiprocessing context ranks start from: a fork server that has imported torch once.

    Every rank is a fork of a process that holds torch but has run nothing (no threads, no CUDA), so it is
    as clean as a spawned one but starts without importing torch again (seconds per rank, and the ranks of
    a local run share the cores).
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "polytrain.train.loop"])
    return context


def run_workers(fn: Callable[..., Any], world_size: int, args: tuple = (), *, threads: int | None = None,
                backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Runs `fn(comm, *args)` on `world_size` new local processes and returns each rank's return value.

    The parent holds the rendezvous store on a free port, so no port has to be guessed. When a rank raises
    or dies, the others are given FAILURE_GRACE_S to report and are then terminated, and WorkerFailed names
    the first rank that failed. `fn` and `args` must be picklable (module-level functions).

    Args:
        fn: the work of one rank; receives this rank's Communicator first.
        world_size: number of ranks.
        args: further arguments of `fn`.
        threads: torch threads per rank (default: the cores divided by the ranks, at least 1).
        backend: torch.distributed backend (default: nccl with GPUs, else gloo).
        timeout_s: the longest any collective may wait, and the deadline for joining.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    # The store's own server would listen on every interface whatever its host name; a socket bound to
    # loopback keeps the rendezvous off the network (the store takes the socket over and closes it).
    listener = socket.create_server(("127.0.0.1", 0))
    store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], world_size, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                          master_listen_fd=listener.detach())
    context = worker_context()
    results = context.Queue()
    # Not daemonic: a rank may start processes of its own (DataLoader workers); the parent still ends
    # every rank in the `finally` below.
    processes = [context.Process(target=_worker, daemon=False,
                                 args=(rank, world_size, store.port, backend or default_backend(), threads,
                                       timeout_s, {**LOOPBACK_ENVIRONMENT, **os.environ}, results, fn, args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
        del store


def run_on_subworlds(comm: Communicator, fn: Callable[[Communicator], Any]) -> dict[int, Any]:
    """Runs `fn` on the last p ranks of `comm` for every p from its world size down to 1.

    Conformance batteries use it to cover every world size with one spawn (spawning dominates their run
    time). Worlds go largest first, so no rank waits on a group it is not in; the groups' ranks differ
    from the global ones, which the batteries want too. Returns {p: fn's result} for the worlds this rank
    belongs to.
    """
    size = comm.world_size
    groups = {p: dist.new_group(list(range(size - p, size))) for p in range(size - 1, 0, -1)}
    results = {size: fn(comm)}
    for p, group in groups.items():
        if comm.rank >= size - p:
            results[p] = fn(Communicator(group, timeout_s=comm.timeout.total_seconds()))
    return results


def run_on_every_world_size(fn: Callable[[Communicator], Any], max_world_size: int, *,
                            timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[int, list[Any]]:
    """Spawns `max_world_size` ranks (one thread each) once and runs `fn` on every sub-world of them.

    Returns {p: [fn's result on each of the p ranks, in group-rank order]} for p = 1..max_world_size
    (see run_on_subworlds).
    """
    outcomes = run_workers(run_on_subworlds, max_world_size, (fn,), threads=1, timeout_s=timeout_s)
    return {p: [outcome[p] for outcome in outcomes[max_world_size - p:]] for p in range(1, max_world_size + 1)}


def _collect(processes: list, results: mp.Queue) -> list[Any]:
    """Waits for every rank's outcome; raises WorkerFailed naming the rank that failed first.

    A rank that died without a word (killed, crashed) is named before ranks that reported an error,
    since those errors are usually the others noticing the dead peer.
    """
    values: dict[int, Any] = {}
    reported: dict[int, str] = {}
    tracebacks: dict[int, str] = {}
    died: dict[int, str] = {}
    first_failure_at: float | None = None
    detected_at = 0.0
    while len(values) < len(processes):
        try:
            outcome = results.get(timeout=0.1)
        except queue.Empty:
            outcome = None
        if outcome is not None and outcome[0] == "ok":
            values[outcome[1]] = pickle.loads(outcome[2])
        elif outcome is not None:
            reported.setdefault(outcome[1], outcome[2])
            tracebacks.setdefault(outcome[1], outcome[3])
        for rank, process in enumerate(processes):
            if rank not in values and rank not in reported and process.exitcode not in (None, 0):
                died.setdefault(rank, exit_reason(process.exitcode))
        if (reported or died) and first_failure_at is None:
            first_failure_at, detected_at = time.monotonic(), time.time()
        if first_failure_at is not None and time.monotonic() - first_failure_at > FAILURE_GRACE_S:
            rank, message = _first_failure(reported, died)
            silent = [r for r, process in enumerate(processes)
                      if r not in values and r not in reported and process.exitcode is None]
            raise WorkerFailed(message, tracebacks.get(rank, ""), sorted(died) or silent, detected_at)
    return [values[rank] for rank in range(len(processes))]


def _first_failure(reported: dict[int, str], died: dict[int, str]) -> tuple[int, str]:
    if died:
        rank = min(died)
        return rank, f"rank {rank} {died[rank]}; the other ranks were stopped"
    rank = next(iter(reported))
    return rank, f"rank {rank} failed: {reported[rank]}; the other ranks were stopped"
