"""The allreduce algorithms' cost formulas and analytic volumes, without starting any process."""

import math
from types import SimpleNamespace

import pytest
import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.registry import UnknownNameError

ALPHA_S = 10e-6  # latency per message
BETA_S_PER_BYTE = 1e-9  # 1 GB/s
GAMMA_S_PER_BYTE = 1e-10  # 10 GB/s of summation
POINT_TO_POINT = ("butterfly", "central", "rabenseifner", "ring", "tree")


def cost_s(name: str, n_bytes: float, world_size: int, alpha_s=ALPHA_S, beta_s_per_byte=BETA_S_PER_BYTE,
           gamma_s_per_byte=GAMMA_S_PER_BYTE) -> float:
    return ALLREDUCE_ALGORITHMS.get(name).cost_s(n_bytes, world_size, alpha_s, beta_s_per_byte, gamma_s_per_byte)


def total_elements_sent(name: str, n_elements: int, world_size: int) -> int:
    algorithm = ALLREDUCE_ALGORITHMS.get(name)
    return sum(algorithm.bytes_sent(4 * n_elements, world_size, rank, 4) // 4 for rank in range(world_size))


def test_every_algorithm_is_registered_and_a_typo_lists_them():
    assert ALLREDUCE_ALGORITHMS.names() == ["butterfly", "central", "native", "rabenseifner", "ring", "tree"]
    assert all(ALLREDUCE_ALGORITHMS.get(name).name == name for name in ALLREDUCE_ALGORITHMS.names())
    with pytest.raises(UnknownNameError, match="unknown allreduce algorithm 'rign'; available: butterfly, "):
        ALLREDUCE_ALGORITHMS.get("rign")


@pytest.mark.parametrize("name", POINT_TO_POINT)
def test_a_non_contiguous_tensor_is_refused(name):
    with pytest.raises(ValueError, match="contiguous"):
        ALLREDUCE_ALGORITHMS.get(name).all_reduce(SimpleNamespace(rank=0, world_size=2), torch.zeros(4, 4).t())


@pytest.mark.parametrize("name", ALLREDUCE_ALGORITHMS.names())
def test_one_rank_or_an_empty_vector_costs_nothing(name):
    algorithm = ALLREDUCE_ALGORITHMS.get(name)
    assert algorithm.cost_s(1e6, 1, ALPHA_S, BETA_S_PER_BYTE, GAMMA_S_PER_BYTE) == 0
    assert algorithm.bytes_sent(4000, 1, 0, 4) == algorithm.messages_sent(1000, 1, 0) == 0
    if name != "native":  # the backend's messages are estimated whatever the length
        assert all(algorithm.messages_sent(0, 5, rank) == 0 for rank in range(5))


@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8, 12])
def test_ring_sends_2_p_minus_1_over_p_of_the_vector_per_rank(world_size):
    n_elements = 60 * world_size
    ring = ALLREDUCE_ALGORITHMS.get("ring")
    expected_bytes = 2 * (world_size - 1) * n_elements * 4 // world_size
    assert all(ring.bytes_sent(4 * n_elements, world_size, rank, 4) == expected_bytes for rank in range(world_size))
    assert all(ring.messages_sent(n_elements, world_size, rank) == 2 * (world_size - 1)
               for rank in range(world_size))


@pytest.mark.parametrize("world_size", [2, 3, 5, 7])
@pytest.mark.parametrize("n_elements", [1, 2, 6, 7, 100003])
def test_every_algorithm_totals_its_textbook_volume_for_uneven_lengths(world_size, n_elements):
    power_of_two = 1 << (world_size.bit_length() - 1)
    fold = 2 * (world_size - power_of_two) * n_elements  # fold in and unfold out, whole vectors
    assert total_elements_sent("ring", n_elements, world_size) == 2 * (world_size - 1) * n_elements
    assert total_elements_sent("tree", n_elements, world_size) == 2 * (world_size - 1) * n_elements
    assert total_elements_sent("central", n_elements, world_size) == 2 * (world_size - 1) * n_elements
    assert (total_elements_sent("butterfly", n_elements, world_size)
            == power_of_two * int(math.log2(power_of_two)) * n_elements + fold)
    assert total_elements_sent("rabenseifner", n_elements, world_size) == 2 * (power_of_two - 1) * n_elements + fold


@pytest.mark.parametrize("world_size", [2, 3, 4, 7, 8])
def test_tree_sends_one_message_per_edge_each_way(world_size):
    tree = ALLREDUCE_ALGORITHMS.get("tree")
    assert sum(tree.messages_sent(10, world_size, rank) for rank in range(world_size)) == 2 * (world_size - 1)


def test_central_server_traffic_grows_with_the_workers():
    central = ALLREDUCE_ALGORITHMS.get("central")
    for world_size in (2, 4, 8, 16):
        assert central.bytes_sent(4000, world_size, 0) == (world_size - 1) * 4000
        assert central.bytes_sent(4000, world_size, world_size - 1) == 4000
    # Iandola thesis eq. 3.3 vs 3.4: the server's time is linear in p, the tree's logarithmic.
    bandwidth_only = {"alpha_s": 0.0, "gamma_s_per_byte": 0.0}
    assert cost_s("central", 1e6, 16, **bandwidth_only) == pytest.approx(2 * 15 * 1e6 * BETA_S_PER_BYTE)
    assert cost_s("tree", 1e6, 16, **bandwidth_only) == pytest.approx(2 * 4 * 1e6 * BETA_S_PER_BYTE)


@pytest.mark.parametrize("world_size", [2, 3, 8, 13])
def test_ring_bandwidth_term_is_2_p_minus_1_over_p_n_beta(world_size):
    n_bytes = 4e6
    predicted = cost_s("ring", n_bytes, world_size, alpha_s=0.0, gamma_s_per_byte=0.0)
    assert predicted == pytest.approx(2 * (world_size - 1) / world_size * n_bytes * BETA_S_PER_BYTE)


def test_rabenseifner_matches_ring_bandwidth_on_a_power_of_two_and_pays_for_the_fold_otherwise():
    bandwidth_only = {"alpha_s": 0.0, "gamma_s_per_byte": 0.0}
    assert cost_s("rabenseifner", 1e6, 8, **bandwidth_only) == pytest.approx(cost_s("ring", 1e6, 8, **bandwidth_only))
    assert cost_s("rabenseifner", 1e6, 9, **bandwidth_only) > cost_s("rabenseifner", 1e6, 8, **bandwidth_only)
    assert cost_s("butterfly", 1e6, 9) > cost_s("butterfly", 1e6, 8)


@pytest.mark.parametrize("world_size", [8, 16, 64])
def test_latency_bound_algorithms_win_small_messages_and_bandwidth_bound_ones_large(world_size):
    small, large = 8.0, 64e6
    small_cost_s = {name: cost_s(name, small, world_size) for name in ("butterfly", "tree", "ring")}
    assert small_cost_s["butterfly"] < small_cost_s["tree"] < small_cost_s["ring"]
    for bandwidth_optimal in ("ring", "rabenseifner"):
        for latency_optimal in ("tree", "butterfly", "central"):
            assert cost_s(bandwidth_optimal, large, world_size) < cost_s(latency_optimal, large, world_size)


def test_butterfly_and_ring_cross_over_once():
    sizes_bytes = [2.0 ** k for k in range(3, 31)]
    ring_faster = [cost_s("ring", n, 8) < cost_s("butterfly", n, 8) for n in sizes_bytes]
    switch = ring_faster.index(True)
    assert switch > 0 and all(ring_faster[switch:])


def test_ring_counts_whole_elements_of_uneven_pieces():
    ring = ALLREDUCE_ALGORITHMS.get("ring")
    # 5 float32 elements on 4 ranks split 2,1,1,1: rank 0 skips pieces 1 and 2, sending 2*5 - 1 - 1 elements;
    # taken as 20 one-byte elements (split 5,5,5,5) it would send 2*20 - 5 - 5 bytes.
    assert ring.bytes_sent(20, 4, 0, element_bytes=4) == 32
    assert ring.bytes_sent(20, 4, 0) == 30


@pytest.mark.parametrize("name", POINT_TO_POINT)
def test_a_partial_element_is_refused(name):
    with pytest.raises(ValueError, match="21 bytes are not a whole number of 4-byte elements"):
        ALLREDUCE_ALGORITHMS.get(name).bytes_sent(21, 4, 0, element_bytes=4)
