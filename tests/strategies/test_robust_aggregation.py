"""Byzantine-robust aggregation in training (--aggregator, polytrain.aggregators) against its references.

One spawn of 5 ranks runs every case in sequence: the allreduce family with 5 workers, the parameter server
with 4 workers and its server. References: the gathered `mean`, trimmed mean with beta 0 and multi-Krum with
m = n equal the plain allreduce sum (DESIGN.md section 8); on the server, trimmed mean with beta 0 equals the
plain synchronous server, and so does a server with b = 0 backup workers. Under one sign-flipping worker of 5 (LeNet-5 on mnist5k), the mean does not train
while Krum and the median do.
"""

import pytest

from polytrain.config import Experiment
from polytrain.train import train, train_sequence
from polytrain.train.result import load_weights, max_weight_difference

EQUAL = Experiment(model="lenet5", dataset="digits", workers=5, epochs=1, batch_size=40, lr=0.05, schedule="constant")
PS = EQUAL.replace(workers=4, strategy="ps", strategy_args={"servers": 1})
ATTACKED = Experiment(dataset="mnist5k", workers=5, epochs=3, batch_size=120, seed=0)
SIGNFLIP = [{"kind": "byzantine", "ranks": 1, "attack": "signflip"}]

CASES = {
    "sum": EQUAL,
    "mean": EQUAL.replace(aggregator="mean"),
    "trimmed mean beta 0": EQUAL.replace(aggregator="trimmed_mean", aggregator_args={"beta": 0.0, "f": 0}),
    "multikrum m=n": EQUAL.replace(aggregator="multikrum", aggregator_args={"m": 5, "f": 0}),
    "ps sum": PS,
    "ps trimmed mean beta 0": PS.replace(aggregator="trimmed_mean", aggregator_args={"beta": 0.0, "f": 0}),
    "ps median signflip": PS.replace(aggregator="median", faults=SIGNFLIP),
    "ps backup 0": PS.replace(strategy_args={"servers": 1, "backup": 0}),
    "ps backup 1 slow": PS.replace(strategy_args={"servers": 1, "backup": 1},
                                   faults=[{"kind": "slow", "rank": 3, "factor": 4}]),
    "clean": ATTACKED,
    "mean signflip": ATTACKED.replace(aggregator="mean", faults=SIGNFLIP),
    "krum signflip": ATTACKED.replace(aggregator="krum", faults=SIGNFLIP),
    "median signflip": ATTACKED.replace(aggregator="median", faults=SIGNFLIP),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    names = list(CASES)
    results = train_sequence([CASES[name].replace(out=str(root / name.replace(" ", "_"))) for name in names])
    return dict(zip(names, results)), {name: root / name.replace(" ", "_") for name in names}


@pytest.mark.parametrize("name", ["mean", "trimmed mean beta 0", "multikrum m=n"])
def test_aggregators_that_reduce_to_the_mean_equal_the_allreduce_sum(runs, name):
    results, out = runs
    assert max_weight_difference(load_weights(out["sum"]), load_weights(out[name])) <= 1e-5
    assert results[name].comm["aggregator"]["name"] == results[name].config["aggregator"]


def test_gathering_whole_gradients_is_counted_as_an_allgather(runs):
    # The ring allgather of equal blocks: every rank sends n - 1 whole gradients of d floats per step (no
    # length headers), against the ring allreduce's 2 (n - 1) / n d.
    results, out = runs
    d = sum(p.numel() for p in load_weights(out["sum"]).values() if p.is_floating_point())
    steps, n = results["mean"].steps, 5
    assert results["mean"].comm["per_rank"][0]["by_operation"] == {"allgather": steps * (n - 1) * d * 4}
    assert results["mean"].comm["bytes_sent"] == steps * (n - 1) * d * 4


def test_the_parameter_server_combines_its_workers_gradients(runs):
    results, out = runs
    assert max_weight_difference(load_weights(out["ps sum"]), load_weights(out["ps trimmed mean beta 0"])) <= 1e-5
    attacked = results["ps median signflip"]
    assert attacked.comm["aggregator"] == {"name": "median", "f": 1,
                                           "byzantine": {"ranks": [1], "attack": "signflip", "scale": 4.0}}
    # The server's median of its 4 workers' pushes is the gathered median of 4 allreduce replicas.
    gathered = train(PS.replace(strategy=None, strategy_args={}, aggregator="median", faults=SIGNFLIP,
                                out=str(out["ps sum"].parent / "allreduce_median")))
    assert gathered.config["strategy"] == "allreduce"
    assert max_weight_difference(load_weights(out["ps median signflip"]),
                                 load_weights(out["ps sum"].parent / "allreduce_median")) <= 1e-5


def test_one_sign_flipping_worker_of_five_stops_the_mean_but_not_krum_or_the_median(runs):
    results, _ = runs
    clean = results["clean"].final_test_accuracy
    assert clean >= 0.85
    assert results["mean signflip"].final_test_accuracy <= 0.2
    for name in ("krum signflip", "median signflip"):
        assert results[name].final_test_accuracy >= 0.75, name


def test_backup_workers_b0_is_synchronous_and_b1_leaves_the_straggler_behind(runs):
    results, out = runs
    assert max_weight_difference(load_weights(out["ps sum"]), load_weights(out["ps backup 0"])) <= 1e-5
    backup = results["ps backup 1 slow"].comm["backup"]
    steps = results["ps backup 1 slow"].steps
    # The 4x slower rank 3 is late, its gradients dropped and the steps the others applied meanwhile skipped;
    # every step was applied once (n - 1 gradients each).
    assert backup["workers"] == 1 and backup["dropped_gradients"] >= 1 and backup["skipped_steps"][3] >= 1
    assert results["ps backup 1 slow"].comm["staleness"]["applied"] == 3 * steps
    assert results["ps backup 1 slow"].final_test_accuracy > 0.2  # learning (chance: 0.1)


@pytest.mark.slow
def test_krum_and_the_median_train_within_a_point_of_the_clean_run_under_a_sign_flipper():
    # The full claim (measured: clean 97.0 %, Krum 96.4 %, median 96.1 %; the mean stays at chance): 20 epochs
    # at batch 240, lr 0.03, where Krum's single selected gradient (a fifth of the batch) is not too noisy.
    base = Experiment(dataset="mnist5k", workers=5, epochs=20, batch_size=240, lr=0.03, seed=0)
    clean, krum, median, mean = train_sequence(
        [base] + [base.replace(aggregator=name, faults=SIGNFLIP) for name in ("krum", "median", "mean")])
    assert krum.final_test_accuracy >= clean.final_test_accuracy - 0.01
    assert median.final_test_accuracy >= clean.final_test_accuracy - 0.01
    assert mean.final_test_accuracy <= clean.final_test_accuracy - 0.5
