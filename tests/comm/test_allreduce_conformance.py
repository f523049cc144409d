"""Every allreduce algorithm against dist.all_reduce, on gloo, for many world sizes, dtypes and lengths.

Spawning dominates the run time, so eight ranks are spawned once and every smaller world is a process
group of the last p ranks, whose group ranks differ from the global ones. The ranks return compact
records; the assertions happen here in the parent.
"""

import functools
import hashlib
from dataclasses import dataclass

import pytest
import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.launch import run_on_every_world_size

TIMEOUT_S = 60
WORLD_SIZES = range(1, 9)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
RANDOM_LENGTHS = (1000, 100003)  # rounding needs many elements to show; small lengths use integers only


def lengths(world_size: int) -> list[int]:
    return sorted({0, 1, 2, world_size - 1, world_size, world_size + 1, 7, *RANDOM_LENGTHS})


def relative_tolerance(dtype: torch.dtype, world_size: int) -> float:
    """Bound on the relative difference of two sums of p positive numbers taken in different orders.

    Each sum is within gamma = (p-1)u / (1 - (p-1)u) of the exact one, u the unit roundoff (Higham,
    Accuracy and Stability of Numerical Algorithms, 2002, eq. 4.4): 2 gamma / (1 - gamma) relative to
    either. About 8e-7 for float32, 2e-15 for float64 and 6e-2 for bfloat16 at 8 ranks.
    """
    gamma = (world_size - 1) * (torch.finfo(dtype).eps / 2)
    gamma /= 1 - gamma
    return 2 * gamma / (1 - gamma)


@dataclass(frozen=True)
class Record:
    """One allreduce on one rank: how it compared with dist.all_reduce and what the Communicator counted."""

    algorithm: str
    dtype: torch.dtype
    n_elements: int
    data: str  # "integers" (sums exact in every dtype and order) or "random" (positive reals)
    max_relative_difference: float
    digest: str  # of the result's bits, to compare across ranks
    bytes_sent: int
    messages_sent: int
    bytes_received: int
    messages_received: int


def make_data(rank: int, n_elements: int, dtype: torch.dtype, data: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + n_elements)
    if data == "integers":
        return torch.randint(-8, 9, (n_elements,), generator=generator).to(dtype)
    return (torch.rand(n_elements, generator=generator, dtype=torch.float64) + 0.5).to(dtype)


def counts(comm) -> tuple[int, int, int, int]:
    stats = comm.stats
    return stats.bytes_sent, stats.messages_sent, stats.bytes_received, stats.messages_received


def reduce_once(comm, name: str, dtype: torch.dtype, n_elements: int, data: str) -> Record:
    ours = make_data(comm.rank, n_elements, dtype, data)
    reference = ours.clone()
    comm.native_all_reduce(reference)
    before = counts(comm)
    ALLREDUCE_ALGORITHMS.get(name).all_reduce(comm, ours)
    counted = [after - start for after, start in zip(counts(comm), before)]
    difference = ((ours.double() - reference.double()).abs() / reference.double().abs()).nan_to_num()
    return Record(name, dtype, n_elements, data, difference.max().item() if n_elements else 0.0,
                  hashlib.sha256(ours.view(torch.uint8).numpy()).hexdigest(), *counted)


def run_battery(comm) -> list[Record]:
    return [reduce_once(comm, name, dtype, n_elements, data)
            for name in ALLREDUCE_ALGORITHMS.names() for dtype in DTYPES
            for n_elements in lengths(comm.world_size)
            for data in (("integers", "random") if n_elements in RANDOM_LENGTHS else ("integers",))]




@functools.cache
def all_batteries() -> dict[int, list[list[Record]]]:
    return run_on_every_world_size(run_battery, max(WORLD_SIZES), timeout_s=TIMEOUT_S)


def battery(world_size: int) -> list[list[Record]]:
    """The records of every rank of a world of `world_size`, indexed [rank][case]."""
    return all_batteries()[world_size]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_integer_data_matches_dist_all_reduce_exactly(world_size):
    for records in battery(world_size):
        for record in records:
            if record.data == "integers":
                assert record.max_relative_difference == 0, record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_random_data_matches_dist_all_reduce_within_dtype_tolerance(world_size):
    for records in battery(world_size):
        for record in records:
            assert record.max_relative_difference <= relative_tolerance(record.dtype, world_size), record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_holds_bitwise_the_same_result(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        assert {records[case].digest for records in ranks} == {record.digest}, record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bytes_and_messages_sent_equal_the_analytic_volume(world_size):
    for rank, records in enumerate(battery(world_size)):
        for record in records:
            algorithm = ALLREDUCE_ALGORITHMS.get(record.algorithm)
            element_bytes = torch.empty((), dtype=record.dtype).element_size()
            n_bytes = record.n_elements * element_bytes
            assert record.bytes_sent == algorithm.bytes_sent(n_bytes, world_size, rank, element_bytes), record
            assert record.messages_sent == algorithm.messages_sent(record.n_elements, world_size, rank), record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_everything_sent_is_received(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        outcomes = [records[case] for records in ranks]
        assert sum(r.bytes_sent for r in outcomes) == sum(r.bytes_received for r in outcomes), record
        assert sum(r.messages_sent for r in outcomes) == sum(r.messages_received for r in outcomes), record
