"""Gossip's graphs and mixing matrices against their definitions, for every world size up to 9 (no processes)."""

import pytest
import torch

from polytrain.strategies import policy_args
from polytrain.strategies.gossip import TOPOLOGIES, mixing_matrix, spectral_gap


@pytest.mark.parametrize("topology", TOPOLOGIES.names())
@pytest.mark.parametrize("p", range(1, 10))
def test_mixing_matrices_are_symmetric_doubly_stochastic_and_connected(topology, p):
    weights = mixing_matrix(topology, p)
    ones = torch.ones(p, dtype=torch.float64)
    torch.testing.assert_close(weights, weights.T)
    torch.testing.assert_close(weights @ ones, ones)
    torch.testing.assert_close(ones @ weights, ones)
    assert (weights >= 0).all()
    # Connected (and aperiodic, every diagonal entry > 0): repeated mixing reaches the uniform average.
    assert (torch.linalg.matrix_power(weights, 256) - 1 / p).abs().max() < 1e-6
    assert 0 < spectral_gap(weights) <= 1


@pytest.mark.parametrize("p", range(2, 10))
def test_the_complete_graph_mixes_to_the_mean_in_one_step(p):
    torch.testing.assert_close(mixing_matrix("complete", p), torch.full((p, p), 1 / p, dtype=torch.float64))
    assert spectral_gap(mixing_matrix("complete", p)) == pytest.approx(1.0)


def test_neighbours_follow_the_definitions():
    assert TOPOLOGIES.get("ring")(0, 5) == {1, 4} and TOPOLOGIES.get("ring")(0, 2) == {1}
    # 6 ranks as a 2 x 3 torus: rank 4 = (1, 1) has (0, 1) above and below, (1, 0) and (1, 2) beside.
    assert TOPOLOGIES.get("torus")(4, 6) == {1, 3, 5}
    assert TOPOLOGIES.get("torus")(5, 9) == {2, 8, 3, 4}  # 3 x 3: (1, 2)
    assert TOPOLOGIES.get("torus")(0, 7) == TOPOLOGIES.get("ring")(0, 7)  # prime p: a ring
    assert TOPOLOGIES.get("exponential")(0, 8) == {1, 2, 4, 6, 7}  # 0 +- 1, 2, 4
    assert TOPOLOGIES.get("complete")(2, 4) == {0, 1, 3}


def test_ring_of_four_has_the_spectral_gap_of_its_eigenvalues():
    # W = circulant(1/3, 1/3, 0, 1/3): eigenvalues 1/3 + 2/3 cos(2 pi k / 4) = 1, 1/3, -1/3, 1/3.
    assert spectral_gap(mixing_matrix("ring", 4)) == pytest.approx(2 / 3)


def test_adpsgd_pairs_active_even_ranks_with_passive_odd_neighbours():
    from polytrain.strategies.gossip import bipartite_neighbours
    assert [bipartite_neighbours("ring", r, 4) for r in range(4)] == [[1, 3], [0, 2], [1, 3], [0, 2]]
    assert bipartite_neighbours("ring", 4, 5) == [3]  # 4's other neighbour, 0, is even
    assert bipartite_neighbours("exponential", 0, 8) == [1, 7]  # +-2 and 4 join even ranks
    assert bipartite_neighbours("complete", 1, 6) == [0, 2, 4]


def test_bad_arguments_name_what_is_valid():
    with pytest.raises(ValueError, match="unknown topology 'star'; available: .*complete.*exponential.*ring.*torus"):
        policy_args("gossip", {"topology": "star"})
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\], got 2"):
        policy_args("easgd", {"alpha": 2})
    with pytest.raises(ValueError, match="tau must be a whole number >= 1, got 0"):
        policy_args("easgd", {"tau": 0})
    with pytest.raises(ValueError, match="beta = p alpha = 2 > 1.*use alpha <= 0.25"):
        policy_args("easgd", {"alpha": 0.5}).check_replicas(4)
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        policy_args("adpsgd", {"topology": "star"})
    with pytest.raises(ValueError, match="servers must be a whole number >= 0"):
        policy_args("easgd", {"servers": -1})
    with pytest.raises(ValueError, match="algorithm is the synchronous form's allreduce"):
        policy_args("easgd", {"servers": 1, "algorithm": "ring"})


def test_adpsgd_is_refused_on_gpus_before_any_worker_starts():
    from polytrain.config import ConfigError, Experiment
    from polytrain.train.defaults import resolve, validate
    exp = resolve(Experiment(model="lenet5", dataset="digits", workers=4, batch_size=48, strategy="adpsgd"))
    with pytest.raises(ConfigError, match="strategy adpsgd receives from whichever rank is first.*use --device cpu"):
        validate(exp.replace(device="cuda"))
