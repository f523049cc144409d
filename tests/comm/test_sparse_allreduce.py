"""Every sparse allreduce algorithm against the dense sum of the densified inputs, on gloo, for p = 1..8.

Eight ranks are spawned once and every smaller world is a process group of the last p ranks. Inputs are
a deterministic function of (case, group rank), so each rank rebuilds every rank's input to form the
exact float64 sum, and the parent rebuilds them to replay the message volume. Ranks return compact
records; the assertions happen here in the parent.
"""

import functools
import hashlib
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS, piece_sizes
from polytrain.comm.sparse import (SPARSE_ALLREDUCE_ALGORITHMS, WireFormat, sparse_all_reduce,
                                   sparse_all_reduce_bytes_sent, sparse_all_reduce_messages_sent,
                                   sparse_all_reduce_volume)
from polytrain.compress.base import index_dtype
from polytrain.launch import run_on_every_world_size
from polytrain.registry import UnknownNameError

TIMEOUT_S = 60
WORLD_SIZES = range(1, 9)
ALGORITHMS = ("dsar_split_allgather", "ssar_recursive_doubling", "ssar_split_allgather")


@dataclass(frozen=True)
class Case:
    """One input family: `density` is each rank's fraction of entries under the index `pattern`."""

    numel: int
    density: float
    pattern: str  # "random" (independent, overlapping), "disjoint", "identical", "one_rank" (others empty)
    data: str  # "integers" (every sum exact in every order) or "random" (reals in [-0.5, 0.5))
    dtype: torch.dtype = torch.float32
    index: torch.dtype | None = None  # index dtype on the wire; default index_dtype(numel), the smallest


CASES = (
    Case(0, 0.5, "random", "integers"),
    Case(1, 1.0, "random", "integers"),  # numel < p
    Case(5, 0.5, "random", "integers"),  # numel < p for p > 5
    Case(37, 0.0, "random", "integers"),  # every rank empty
    Case(37, 0.05, "disjoint", "integers"),
    Case(37, 1.0, "identical", "integers"),  # dense from the first message
    Case(37, 0.1, "identical", "integers"),  # stays sparse
    Case(200, 0.3, "random", "random"),  # sparse at first, dense once unions grow
    Case(200, 0.5, "one_rank", "integers", torch.bfloat16),
    Case(1000, 0.02, "disjoint", "integers", torch.float16),  # int16 indices
    Case(1000, 0.15, "random", "random"),
    Case(40000, 0.002, "random", "integers"),  # int32 indices
    Case(37, 0.3, "random", "integers", torch.float16, torch.int64),  # a wider index dtype than needed
)
DENSE_CASE, SPARSE_CASE = 5, 6


def make_input(case: Case, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices in index_dtype(numel), values in case.dtype) of group rank `rank`; a function of its arguments."""
    seed = 7919 * CASES.index(case) + 104729 * world_size
    own = torch.Generator().manual_seed(seed + rank)
    shared = torch.Generator().manual_seed(seed + 1000)
    n = case.numel
    if case.pattern == "identical":
        mask = torch.rand(n, generator=shared) < case.density
    elif case.pattern == "disjoint":
        mask = (torch.arange(n) % world_size == rank) & (torch.rand(n, generator=own) < case.density * world_size)
    elif case.pattern == "one_rank":
        mask = (torch.rand(n, generator=own) < case.density) & (rank == 0)
    else:
        mask = torch.rand(n, generator=own) < case.density
    indices = mask.nonzero().squeeze(1)
    if case.data == "integers":
        values = torch.randint(-8, 9, (indices.numel(),), generator=own, dtype=torch.float64)
    else:
        values = torch.rand(indices.numel(), generator=own, dtype=torch.float64) - 0.5
    return indices.to(case.index or index_dtype(n)), values.to(case.dtype)


def dense_sums(case: Case, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact sum of every rank's densified input and the sum of magnitudes, in float64."""
    exact, magnitude = torch.zeros(case.numel, dtype=torch.float64), torch.zeros(case.numel, dtype=torch.float64)
    for rank in range(world_size):
        indices, values = make_input(case, rank, world_size)
        exact[indices.long()] += values.double()
        magnitude[indices.long()] += values.double().abs()
    return exact, magnitude


@dataclass(frozen=True)
class Record:
    """One sparse allreduce on one rank: its error against the exact sum and what the Communicator counted."""

    algorithm: str
    case: int
    dtype: torch.dtype
    numel: int
    error_ratio: float  # max |result - exact| / sum |x_i| over elements (inf if an all-zero element is not 0)
    digest: str  # of the result's bits, to compare across ranks
    bytes_sent: int
    messages_sent: int
    bytes_received: int
    messages_received: int
    by_operation: int  # bytes counted under "sparse_allreduce:<algorithm>"


def counts(comm) -> tuple[int, int, int, int]:
    stats = comm.stats
    return stats.bytes_sent, stats.messages_sent, stats.bytes_received, stats.messages_received


def reduce_once(comm, name: str, case_index: int) -> Record:
    case = CASES[case_index]
    indices, values = make_input(case, comm.rank, comm.world_size)
    before, operation = counts(comm), f"sparse_allreduce:{name}"
    before_operation = comm.stats.by_operation.get(operation, 0)
    result = sparse_all_reduce(comm, indices, values, case.numel, name)
    counted = [after - start for after, start in zip(counts(comm), before)]
    exact, magnitude = dense_sums(case, comm.world_size)
    assert result.dtype == case.dtype and result.shape == (case.numel,)
    error = (result.double() - exact).abs()
    ratio = torch.where(magnitude > 0, error / magnitude.clamp_min(1e-300), torch.where(error > 0, math.inf, 0.0))
    return Record(name, case_index, case.dtype, case.numel, ratio.max().item() if case.numel else 0.0,
                  hashlib.sha256(result.view(torch.uint8).numpy()).hexdigest(), *counted,
                  comm.stats.by_operation.get(operation, 0) - before_operation)


def run_battery(comm) -> list[Record]:
    return [reduce_once(comm, name, case_index) for name in ALGORITHMS for case_index in range(len(CASES))]




@functools.cache
def all_batteries() -> dict[int, list[list[Record]]]:
    return run_on_every_world_size(run_battery, max(WORLD_SIZES), timeout_s=TIMEOUT_S)


def battery(world_size: int) -> list[list[Record]]:
    """The records of every rank of a world of `world_size`, indexed [rank][case]."""
    return all_batteries()[world_size]


def summation_bound(dtype: torch.dtype, world_size: int) -> float:
    """gamma_{p-1} = (p-1)u / (1 - (p-1)u): a sum of p terms in any order is within gamma * sum |x_i| of the
    exact one (Higham, Accuracy and Stability of Numerical Algorithms, 2002, eq. 4.4); u the unit roundoff."""
    u = torch.finfo(dtype).eps / 2
    return (world_size - 1) * u / (1 - (world_size - 1) * u)


def replayed(record: Record, world_size: int) -> list[tuple[int, int]]:
    case = CASES[record.case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: on a busy machine handing them to a second thread costs more
    try:
        indices = [make_input(case, rank, world_size)[0] for rank in range(world_size)]
        return sparse_all_reduce_volume(indices, case.numel, record.algorithm, case.dtype)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# Against the processes


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_result_equals_the_dense_sum_of_the_densified_inputs(world_size):
    for records in battery(world_size):
        for record in records:
            if CASES[record.case].data == "integers":
                assert record.error_ratio == 0, record
            else:
                assert record.error_ratio <= summation_bound(record.dtype, world_size), record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_holds_bitwise_the_same_result(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        assert {records[case].digest for records in ranks} == {record.digest}, record


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_counted_bytes_and_messages_equal_the_replayed_volume(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        volume = replayed(record, world_size)
        for rank, records in enumerate(ranks):
            counted = records[case]
            assert (counted.bytes_sent, counted.messages_sent) == volume[rank], (rank, counted)
            assert counted.by_operation == counted.bytes_sent, counted


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_everything_sent_is_received(world_size):
    ranks = battery(world_size)
    for case, record in enumerate(ranks[0]):
        outcomes = [records[case] for records in ranks]
        assert sum(r.bytes_sent for r in outcomes) == sum(r.bytes_received for r in outcomes), record
        assert sum(r.messages_sent for r in outcomes) == sum(r.messages_received for r in outcomes), record


def dense_volume(name: str, numel: int, world_size: int, rank: int, wire: WireFormat) -> tuple[int, int]:
    """(bytes, messages) `rank` sends when every message goes dense: the dense algorithm plus one header each."""
    p, vb, hb = world_size, wire.value_bytes, wire.header_bytes
    if name == "ssar_recursive_doubling":
        butterfly = ALLREDUCE_ALGORITHMS.get("butterfly")
        messages = butterfly.messages_sent(numel, p, rank)
        return butterfly.bytes_sent(numel * vb, p, rank, vb) + hb * messages, 2 * messages
    sizes = piece_sizes(numel, p)
    others = [size for owner, size in enumerate(sizes) if owner != rank and size]
    pieces = [(sum(others) * vb + hb * len(others), 2 * len(others))]  # the reduce-scatter
    if name == "dsar_split_allgather":
        forwarded = [size for owner, size in enumerate(sizes) if owner != (rank + 1) % p and size]
        headers = p - 1 if sizes[rank] else 0
        pieces.append((sum(forwarded) * vb + hb * headers, len(forwarded) + headers))
    else:  # recursive doubling over the ranges, p a power of two: at distance d the aligned run of d ranges
        distance = 1
        while distance < p:
            run = sum(sizes[rank & ~(distance - 1):(rank & ~(distance - 1)) + distance])
            pieces.append((run * vb + hb, 2) if run else (0, 0))
            distance <<= 1
    return sum(b for b, _ in pieces), sum(m for _, m in pieces)


@pytest.mark.parametrize("world_size", (2, 4, 8))
def test_at_full_density_every_message_switches_to_dense(world_size):
    case = CASES[DENSE_CASE]
    wire = WireFormat(case.numel, index_dtype(case.numel).itemsize, case.dtype.itemsize)
    for rank, records in enumerate(battery(world_size)):
        for record in records:
            if record.case == DENSE_CASE:
                expected = dense_volume(record.algorithm, case.numel, world_size, rank, wire)
                assert (record.bytes_sent, record.messages_sent) == expected, record


@pytest.mark.parametrize("world_size", (2, 4, 8))
def test_at_low_density_messages_stay_sparse(world_size):
    case = CASES[SPARSE_CASE]
    wire = WireFormat(case.numel, index_dtype(case.numel).itemsize, case.dtype.itemsize)
    entries = make_input(case, 0, world_size)[0].numel()  # identical on every rank
    for rank, records in enumerate(battery(world_size)):
        for record in records:
            if record.case != SPARSE_CASE:
                continue
            assert record.bytes_sent < dense_volume(record.algorithm, case.numel, world_size, rank, wire)[0]
            if record.algorithm == "ssar_recursive_doubling":  # the union never grows: lg p rounds of k entries
                rounds = world_size.bit_length() - 1
                assert record.bytes_sent == rounds * (wire.header_bytes + entries * wire.entry_bytes), record


# ---------------------------------------------------------------------------------------------------------
# Without processes


ONE_RANK = SimpleNamespace(rank=0, world_size=1)


def test_every_algorithm_is_registered_and_a_typo_lists_them():
    assert SPARSE_ALLREDUCE_ALGORITHMS.names() == list(ALGORITHMS)
    with pytest.raises(UnknownNameError, match="unknown sparse allreduce algorithm 'ssar'; available: dsar_"):
        sparse_all_reduce(ONE_RANK, torch.zeros(0, dtype=torch.uint8), torch.zeros(0), 4, "ssar")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_rank_returns_its_densified_input(name):
    result = sparse_all_reduce(ONE_RANK, torch.tensor([1, 3], dtype=torch.uint8), torch.tensor([2.0, -1.0]), 5, name)
    assert torch.equal(result, torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0]))


@pytest.mark.parametrize("indices, values, numel, message", [
    (torch.tensor([3, 1]), torch.ones(2), 5, "sorted ascending, unique"),
    (torch.tensor([1, 1]), torch.ones(2), 5, "sorted ascending, unique"),
    (torch.tensor([1, 5]), torch.ones(2), 5, r"in \[0, 5\)"),
    (torch.tensor([-1, 2]), torch.ones(2), 5, r"in \[0, 5\)"),
    (torch.tensor([1, 2], dtype=torch.uint8), torch.ones(2), 300, "cannot hold index 299"),
    (torch.tensor([1.0, 2.0]), torch.ones(2), 5, "integer indices"),
    (torch.tensor([1, 2]), torch.ones(2, dtype=torch.int32), 5, "floating-point values"),
    (torch.tensor([1, 2]), torch.ones(3), 5, "one length"),
    (torch.tensor([1, 2]), torch.ones(2), -1, "numel >= 0"),
])
def test_invalid_inputs_are_refused_with_what_was_expected(indices, values, numel, message):
    with pytest.raises(ValueError, match=message):
        sparse_all_reduce(ONE_RANK, indices, values, numel)


def evenly_spread(k_per_range: int, numel: int, world_size: int, overlap: str) -> list[torch.Tensor]:
    """Indices with k_per_range entries of every range per rank, disjoint between ranks or identical."""
    span = numel // world_size
    ranks = []
    for rank in range(world_size):
        offset = rank * k_per_range if overlap == "disjoint" else 0
        ranks.append(torch.tensor([start + offset + i for start in range(0, numel, span) for i in range(k_per_range)],
                                  dtype=index_dtype(numel)))
    return ranks


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("world_size", (2, 4, 8))
@pytest.mark.parametrize("overlap", ("disjoint", "identical"))
@pytest.mark.parametrize("k_per_range", (0, 1, 3, 20))
def test_cost_model_charges_exactly_the_replayed_messages_and_bytes(name, world_size, overlap, k_per_range):
    # With k spread evenly over the ranges and p a power of two, every rank sends what the bounds assume.
    numel = 256 * world_size  # ranges of 256 hold 20 entries from each of 8 ranks
    indices = evenly_spread(k_per_range, numel, world_size, overlap)
    k = k_per_range * world_size
    algorithm = SPARSE_ALLREDUCE_ALGORITHMS.get(name)
    bytes_model = algorithm.cost_s(k, numel, world_size, 0.0, 1.0, index_bytes=2, value_bytes=4, overlap=overlap)
    messages_model = algorithm.cost_s(k, numel, world_size, 1.0, 0.0, index_bytes=2, value_bytes=4, overlap=overlap)
    assert set(sparse_all_reduce_bytes_sent(indices, numel, name)) == {bytes_model}
    assert set(sparse_all_reduce_messages_sent(indices, numel, name)) == {messages_model}


def test_paper_bounds_recursive_doubling():
    # SparCML section 5: lg p a + (p-1) k (c_i + c_v) b for disjoint indices, lg p (a + k (c_i + c_v) b) for
    # identical ones, far below the dense switch; plus a 4-byte header message per transfer here.
    algorithm = SPARSE_ALLREDUCE_ALGORITHMS.get("ssar_recursive_doubling")
    alpha, beta, k, n, p = 1e-5, 1e-9, 100, 10 ** 6, 8
    assert algorithm.cost_s(k, n, p, alpha, beta) == pytest.approx(3 * 2 * alpha + (3 * 4 + 7 * k * 8) * beta)
    assert algorithm.cost_s(k, n, p, alpha, beta, overlap="identical") == pytest.approx(
        3 * 2 * alpha + 3 * (4 + k * 8) * beta)


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("world_size", (2, 3, 5, 8))
def test_disjoint_indices_cost_at_least_identical_ones_and_never_more_than_dense(name, world_size):
    algorithm = SPARSE_ALLREDUCE_ALGORITHMS.get(name)
    n = 4096
    for k in (0, 10, 200, 2000, 4096):
        disjoint = algorithm.cost_s(k, n, world_size, 1e-5, 1e-9)
        identical = algorithm.cost_s(k, n, world_size, 1e-5, 1e-9, overlap="identical")
        dense = algorithm.cost_s(n, n, world_size, 1e-5, 1e-9)
        assert identical <= disjoint <= dense * (1 + 1e-12)
    with pytest.raises(ValueError, match="overlap must be 'disjoint' or 'identical'"):
        algorithm.cost_s(10, n, world_size, 1e-5, 1e-9, overlap="some")


def test_replay_of_disjoint_recursive_doubling_doubles_the_message_each_round():
    # p = 8, 5 disjoint entries per rank: 5, 10, 20 entries of 2 + 4 bytes, each after a 4-byte header.
    indices = [torch.arange(rank * 5, rank * 5 + 5, dtype=torch.int16) for rank in range(8)]
    assert sparse_all_reduce_volume(indices, 1000) == [(3 * 4 + 35 * 6, 6)] * 8
