"""Timing on the ranks: every algorithm at every size, on spawned local workers or torchrun's world."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from polytrain.bench.collectives.sizes import DTYPES, bytes_per_element, check_settings, parse_dtype
from polytrain.bench.collectives.summary import summarize
from polytrain.comm import DEFAULT_TIMEOUT_S, Communicator
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.launch import init_from_torchrun, run_workers, under_torchrun
from polytrain.train.environment import environment


def _time_round(comm: Communicator, algorithms: list, buffers: list[torch.Tensor], addend: torch.Tensor,
                rotation: int, times: np.ndarray, add_times: np.ndarray, counts: np.ndarray) -> None:
    """One repetition: every size, every algorithm (order rotated), then the local add, timed on this rank."""
    expected = comm.world_size * (comm.world_size + 1) / 2  # each rank contributes rank + 1
    order = algorithms[rotation % len(algorithms):] + algorithms[:rotation % len(algorithms)]
    for s, buffer in enumerate(buffers):
        for algorithm in order:
            a = algorithms.index(algorithm)
            buffer.fill_(comm.rank + 1)
            comm.barrier()
            sent, messages = comm.stats.bytes_sent, comm.stats.messages_sent
            started = time.perf_counter()
            algorithm.all_reduce(comm, buffer)
            times[a, s] = time.perf_counter() - started
            counts[a, s] = comm.stats.bytes_sent - sent, comm.stats.messages_sent - messages
            if buffer[0].item() != expected or buffer[-1].item() != expected:
                raise RuntimeError(f"allreduce {algorithm.name} of {buffer.numel()} elements returned "
                                   f"{buffer[0].item()}, not {expected}, on rank {comm.rank}")
        started = time.perf_counter()
        buffer.add_(addend[:buffer.numel()])
        add_times[s] = time.perf_counter() - started


def _max_over_ranks(comm: Communicator, values: np.ndarray) -> np.ndarray:
    # Bookkeeping after the timing, on the backend directly so that it is not counted as traffic.
    tensor = torch.from_numpy(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=comm.group)
    return tensor.numpy()


def _gather_counts(comm: Communicator, counts: np.ndarray) -> np.ndarray:
    everyone = torch.zeros((comm.world_size, *counts.shape), dtype=torch.int64)
    everyone[comm.rank] = torch.from_numpy(counts)
    dist.all_reduce(everyone, group=comm.group)
    return everyone.numpy()  # (ranks, algorithms, sizes, [bytes, messages])


def bench_collectives(comm: Communicator, algorithms: Sequence[str], sizes_bytes: Sequence[int], repeats: int = 11,
                      warmup: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """Times every algorithm at every size on this rank's group; call it on every rank.

    Each buffer is refilled with rank + 1 before every call (untimed) and the sum checked after it, so
    values neither grow nor turn subnormal, and a wrong result stops the benchmark.

    Returns:
        The same report on every rank (see `summarize`).
    """
    check_settings(sizes_bytes, repeats, warmup, dtype)
    if comm.world_size < 2:
        raise ValueError(f"a collective benchmark needs at least 2 ranks; got {comm.world_size}")
    chosen = [ALLREDUCE_ALGORITHMS.get(name) for name in algorithms]
    buffers = [torch.empty(n // bytes_per_element(dtype), dtype=dtype) for n in sizes_bytes]
    addend = torch.ones(max(b.numel() for b in buffers), dtype=dtype)
    rounds = warmup + repeats
    times = np.zeros((rounds, len(chosen), len(buffers)))
    add_times = np.zeros((rounds, len(buffers)))
    counts = np.zeros((len(chosen), len(buffers), 2), dtype=np.int64)
    for round_index in range(rounds):
        _time_round(comm, chosen, buffers, addend, round_index, times[round_index], add_times[round_index], counts)
    times = _max_over_ranks(comm, times)
    add_times = _max_over_ranks(comm, add_times)
    return summarize(comm.world_size, list(algorithms), list(sizes_bytes), times, add_times,
                     _gather_counts(comm, counts), warmup, dtype)


def _bench_rank(comm: Communicator, algorithms: list[str], sizes_bytes: list[int], repeats: int, warmup: int,
                dtype_name: str) -> dict | None:
    report = bench_collectives(comm, algorithms, sizes_bytes, repeats, warmup, DTYPES[dtype_name])
    return report if comm.rank == 0 else None


def collect_report(workers: int | None, algorithms: list[str], sizes_bytes: list[int], repeats: int = 11,
                   warmup: int = 2, dtype_name: str = "float32", threads: int | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> dict | None:
    """Runs the benchmark on `workers` spawned local ranks (gloo), or on torchrun's world from this process.

    Returns:
        The report with an environment manifest; None on torchrun ranks other than 0.
    """
    check_settings(sizes_bytes, repeats, warmup, parse_dtype(dtype_name))
    for name in algorithms:
        ALLREDUCE_ALGORITHMS.get(name)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1; got {threads}")
    args = (list(algorithms), list(sizes_bytes), repeats, warmup, dtype_name)
    if under_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if workers not in (None, world_size):
            raise ValueError(f"--workers {workers} does not match torchrun's WORLD_SIZE={world_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        comm = init_from_torchrun(timeout_s, backend="gloo")
        try:
            report = _bench_rank(comm, *args)
        finally:
            dist.destroy_process_group()
        launcher = "torchrun"
    else:
        workers = 2 if workers is None else workers
        if workers < 2:
            raise ValueError(f"--workers must be at least 2 for a collective; got {workers}")
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        report = run_workers(_bench_rank, workers, args, threads=threads, backend="gloo", timeout_s=timeout_s)[0]
        launcher = f"{workers} local processes, {threads} torch thread(s) each"
    if report is not None:
        report.update(backend="gloo", launcher=launcher, environment=environment(seed=0))
    return report
