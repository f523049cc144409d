"""The variable-size ring allgather against dist.all_gather_object and the expected lists, for p = 1..8.

Eight ranks are spawned once and every smaller world is a process group of the last p ranks. Each rank's
tensor is a deterministic function of (case, group rank), so the expected list is rebuilt anywhere.
"""

import functools
import hashlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from polytrain.comm.gather import (COUNT_BYTES, all_gather, all_gather_bytes_sent, all_gather_cost_s,
                                   all_gather_messages_sent)
from polytrain.launch import run_on_every_world_size

TIMEOUT_S = 60
WORLD_SIZES = range(1, 9)


@dataclass(frozen=True)
class Case:
    lengths: str  # "varying" (zero for some ranks), "zero", "equal", "one_long"
    dtype: torch.dtype
    fixed_size: bool = False
    shape_2d: bool = False  # contributed as a (2, length / 2) tensor: gathered flattened


CASES = (
    Case("varying", torch.float32),
    Case("zero", torch.float32),
    Case("equal", torch.int64),
    Case("equal", torch.int64, fixed_size=True),
    Case("one_long", torch.uint8),
    Case("varying", torch.bfloat16, shape_2d=True),
)
REFERENCE_CASES = (0, 4)  # also compared with dist.all_gather_object


def length(case: Case, rank: int) -> int:
    return {"varying": (3 * rank) % 5 * 2, "zero": 0, "equal": 6, "one_long": 1000 if rank == 1 else rank}[case.lengths]


def make_tensor(case_index: int, rank: int) -> torch.Tensor:
    case = CASES[case_index]
    generator = torch.Generator().manual_seed(1000 * case_index + rank)
    values = torch.randint(0, 200, (length(case, rank),), generator=generator).to(case.dtype)
    return values.view(2, -1) if case.shape_2d else values


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()


@dataclass(frozen=True)
class Record:
    case: int
    matches_expected: bool  # dtypes, 1-D shapes and bits of every gathered tensor
    matches_all_gather_object: bool | None  # None where not compared
    bytes_sent: int
    messages_sent: int
    bytes_received: int
    messages_received: int
    by_operation: int  # bytes counted under "allgather"


def counts(comm) -> tuple[int, int, int, int]:
    stats = comm.stats
    return stats.bytes_sent, stats.messages_sent, stats.bytes_received, stats.messages_received


def gather_once(comm, group, case_index: int) -> Record:
    case = CASES[case_index]
    mine = make_tensor(case_index, comm.rank)
    before, before_operation = counts(comm), comm.stats.by_operation.get("allgather", 0)
    gathered = all_gather(comm, mine, fixed_size=case.fixed_size)
    counted = [after - start for after, start in zip(counts(comm), before)]
    expected = [make_tensor(case_index, rank).reshape(-1) for rank in range(comm.world_size)]
    matches = len(gathered) == len(expected) and all(
        ours.dtype == theirs.dtype and ours.shape == theirs.shape and digest(ours) == digest(theirs)
        for ours, theirs in zip(gathered, expected))
    reference = None
    if case_index in REFERENCE_CASES:
        objects = [None] * comm.world_size
        dist.all_gather_object(objects, mine.reshape(-1), group=group)
        reference = all(digest(ours) == digest(theirs) for ours, theirs in zip(gathered, objects))
    return Record(case_index, matches, reference, *counted,
                  comm.stats.by_operation.get("allgather", 0) - before_operation)


def run_battery(comm) -> list[Record]:
    return [gather_once(comm, comm.group, case_index) for case_index in range(len(CASES))]




@functools.cache
def all_batteries() -> dict[int, list[list[Record]]]:
    return run_on_every_world_size(run_battery, max(WORLD_SIZES), timeout_s=TIMEOUT_S)


def battery(world_size: int) -> list[list[Record]]:
    """The records of every rank of a world of `world_size`, indexed [rank][case]."""
    return all_batteries()[world_size]


def lengths_in_bytes(case_index: int, world_size: int) -> list[int]:
    return [make_tensor(case_index, rank).numel() * CASES[case_index].dtype.itemsize for rank in range(world_size)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_gets_every_tensor_in_rank_order(world_size):
    for records in battery(world_size):
        for record in records:
            assert record.matches_expected, record
            assert record.matches_all_gather_object in (None, True), record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_counted_bytes_and_messages_equal_the_formula(world_size):
    for rank, records in enumerate(battery(world_size)):
        for record in records:
            fixed_size = CASES[record.case].fixed_size
            lengths = lengths_in_bytes(record.case, world_size)
            assert record.bytes_sent == all_gather_bytes_sent(lengths, world_size, rank, fixed_size), record
            assert record.messages_sent == all_gather_messages_sent(lengths, world_size, rank, fixed_size), record
            assert record.by_operation == record.bytes_sent, record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_everything_sent_is_received(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        outcomes = [records[case] for records in ranks]
        assert sum(r.bytes_sent for r in outcomes) == sum(r.bytes_received for r in outcomes), record
        assert sum(r.messages_sent for r in outcomes) == sum(r.messages_received for r in outcomes), record


def test_the_fixed_size_variant_skips_only_the_count_headers():
    for world_size in (2, 5, 8):
        for rank in range(world_size):
            lengths = [24] * world_size
            variable = all_gather_bytes_sent(lengths, world_size, rank)
            assert variable - all_gather_bytes_sent(lengths, world_size, rank, fixed_size=True) == \
                COUNT_BYTES * (world_size - 1)
            # Ring allgather: (p-1)/p of the data (Thakur et al. 2005).
            assert all_gather_bytes_sent(lengths, world_size, rank, fixed_size=True) == 24 * (world_size - 1)


def test_volume_formula_on_uneven_blocks():
    # Rank 1 forwards every block but rank 2's: 10 + 0 + 30 bytes, plus three 4-byte counts.
    assert all_gather_bytes_sent([10, 0, 20, 30], 4, 1) == 40 + 12
    assert all_gather_messages_sent([10, 0, 20, 30], 4, 1) == 2 + 3
    assert all_gather_bytes_sent([7], 1, 0) == 0
    with pytest.raises(ValueError, match="one length per rank; got 2 lengths for 3 ranks"):
        all_gather_bytes_sent([1, 2], 3, 0)


def test_cost_is_thakur_ring_allgather_for_equal_blocks():
    alpha, beta, p, n_bytes = 1e-5, 1e-9, 8, 8 * 1000
    assert all_gather_cost_s([n_bytes // p] * p, alpha, beta, fixed_size=True) == pytest.approx(
        (p - 1) * alpha + (p - 1) / p * n_bytes * beta)
    assert all_gather_cost_s([n_bytes // p] * p, alpha, beta) == pytest.approx(
        2 * (p - 1) * alpha + (p - 1) / p * n_bytes * beta + (p - 1) * COUNT_BYTES * beta)
