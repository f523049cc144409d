"""The parameter server against its references: synchronous and stale-synchronous (s = 0) modes, sharded
and hierarchical, against one worker accumulating the same microbatches (so against allreduce, DESIGN.md
section 8); counted bytes against the protocol's volume; the staleness bound of SSP; the asynchronous
modes' accuracy against synchronous training on LeNet-5/mnist5k; resume in every mode; bad arguments.
DistBelief (2 replicas of a 2-stage pipeline beside the server) against the same reference, its stages'
bytes against their tensors' sizes.
Asynchronous EASGD, whose center sits on a server rank, shares the battery: alpha = 0 against independent
workers, its bytes, its accuracy and its resume.

All runs share one spawn of 5 ranks (4 workers and a server, or 3 workers and 2 servers); the resumed runs
share a second one.
"""

import shutil

import pytest
import torch

from polytrain.config import ConfigError, Experiment
from polytrain.strategies.ps import ParameterServerArgs, shard_tensors, worker_groups
from polytrain.train import train, train_sequence
from polytrain.train.defaults import resolve
from polytrain.train.result import load_weights, max_weight_difference

# Digits with momentum at batch 48 (divisible by 3 and 4); a constant schedule is the same for 1 and 2 epochs,
# so the 1-epoch run's checkpoint continues the 2-epoch run.
DIGITS = Experiment(model="lenet5", dataset="digits", workers=4, epochs=1, batch_size=48, optimizer="momentum",
                    lr=0.05, weight_decay=0.0, schedule="constant", augment_shift=0, threads=1, strategy="ps")
# Adam: under asynchrony stale gradients act as extra momentum (Mitliagkas et al. 2016); with momentum 0.9 on
# top, asynchronous LeNet-5 stalled near 0.47 in 2 epochs where synchronous reached 0.86 (measured), and
# plain SGD sits on LeNet-5's early plateau for an epoch, which a stale run leaves later.
MNIST = Experiment(model="lenet5", dataset="mnist5k", workers=4, epochs=2, batch_size=100, optimizer="adam",
                   lr=2e-3, schedule="constant", augment_shift=0, threads=1, strategy="ps")
SLOW_RANK = {"rank": 1, "slowdown": 3}
# Test accuracy each stale run may lose to the synchronous one after 2 epochs. Measured (sync 0.924): async
# 0.920 on an idle machine, 0.844 while the rest of the suite ran (staleness mean 2.9 pushes: asynchronous
# runs depend on timing); SSP s=2 0.80 with a 3x slower worker (the fast workers' gradients are up to 2
# whole steps old, while async's are fractions of a step: 4 pushes make one); asynchronous EASGD 0.895 (the
# center trails the replicas, each exchange moving it alpha = 0.225 of the way to one of them).
BOUNDS = {"mnist async resumed": 0.15, "mnist ssp s=2": 0.25, "mnist easgd async": 0.1}
# Asynchronous EASGD: the center on the server, every worker's elastic exchange every 4 of its steps.
EASGD_ASYNC = {"servers": 1, "tau": 4}
DISTBELIEF = {"dp": 2, "pp": 2}


def runs() -> dict[str, Experiment]:
    return {
        "sync": DIGITS.replace(epochs=2),
        "sync cut": DIGITS,
        "ssp s=0": DIGITS.replace(strategy_args={"mode": "ssp", "staleness": 0}),
        "sync groups=2": DIGITS.replace(strategy_args={"groups": 2}),
        "sync servers=2": DIGITS.replace(workers=3, strategy_args={"servers": 2}),
        "ssp s=2 straggler": DIGITS.replace(strategy_args={"mode": "ssp", "staleness": 2}, straggler=SLOW_RANK),
        "async groups=2": DIGITS.replace(strategy_args={"mode": "async", "push_every": 2, "fetch_every": 2,
                                                        "groups": 2}),
        # DistBelief: 2 replicas, each a 2-stage pipeline (2 microbatches of 12); each stage exchanges its own
        # tensors with the server.
        "distbelief sync": DIGITS.replace(mesh=DISTBELIEF, step_schedule="1f1b", microbatches=2),
        "distbelief async": DIGITS.replace(mesh=DISTBELIEF, step_schedule="1f1b", microbatches=2,
                                           strategy_args={"mode": "async"}),
        "mnist sync": MNIST,
        "mnist ssp s=2": MNIST.replace(strategy_args={"mode": "ssp", "staleness": 2}),
        "mnist async cut": MNIST.replace(epochs=1, strategy_args={"mode": "async"}),
        "easgd async alpha=0": DIGITS.replace(strategy="easgd", strategy_args={**EASGD_ASYNC, "alpha": 0.0}),
        "mnist easgd async": MNIST.replace(strategy="easgd", strategy_args=EASGD_ASYNC),
        "mnist easgd async cut": MNIST.replace(epochs=1, strategy="easgd", strategy_args=EASGD_ASYNC),
    }


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ps")
    experiments = {key: exp.replace(out=str(directory / key.replace(" ", "_"))) for key, exp in runs().items()}
    results = dict(zip(experiments, train_sequence(list(experiments.values()))))
    resumed = {"sync resumed": experiments["sync cut"].replace(epochs=2, out=str(directory / "sync_resumed")),
               "mnist async resumed": experiments["mnist async cut"].replace(epochs=2),
               "mnist easgd async resumed": experiments["mnist easgd async cut"].replace(epochs=2)}
    cuts = [experiments["sync cut"].out, experiments["mnist async cut"].out, experiments["mnist easgd async cut"].out]
    # The sync run resumes from a copy: its own directory stays the 1-epoch run it was.
    shutil.copytree(cuts[0], resumed["sync resumed"].out)
    results.update(zip(resumed, train_sequence(list(resumed.values()), resume=[resumed["sync resumed"].out, *cuts[1:]])))
    out = {key: exp.out for key, exp in {**experiments, **resumed}.items()}
    references = {"4 microbatches": train(DIGITS.replace(workers=1, strategy="local", microbatches=4,
                                                        out=str(directory / "reference4"))),
                  "3 microbatches": train(DIGITS.replace(workers=1, strategy="local", microbatches=3,
                                                        out=str(directory / "reference3")))}
    out.update({key: str(directory / f"reference{key[0]}") for key in references})
    # Independent workers: local SGD whose first average would come after the epoch (of 30 steps).
    references["independent"] = train(DIGITS.replace(strategy="local_sgd", strategy_args={"period": 60}))
    return {**results, **references}, out


def parameter_bytes(side: int = 8) -> int:
    from polytrain.models import build_model
    return sum(4 * p.numel() for p in build_model("lenet5", 10, (1, side, side)).parameters())


@pytest.mark.parametrize("run, reference", [("sync cut", "4 microbatches"), ("ssp s=0", "4 microbatches"),
                                            ("sync groups=2", "4 microbatches"),
                                            ("sync servers=2", "3 microbatches"),
                                            ("distbelief sync", "4 microbatches")])
def test_synchronous_modes_equal_one_worker_with_the_same_microbatches(battery, run, reference):
    # The server sums the workers' gradients (each weighted by its shard of the global batch) in rank order
    # and takes one optimizer step: the reference's accumulation, up to the groups' reassociation.
    results, out = battery
    assert max_weight_difference(load_weights(out[run]), load_weights(out[reference])) <= 1e-5
    assert results[run].final_test_accuracy == pytest.approx(results[reference].final_test_accuracy, abs=2e-3)
    assert results[run].comm["staleness"]["max"] == 0


def test_ssp_with_staleness_0_is_the_synchronous_server(battery):
    _, out = battery
    assert max_weight_difference(load_weights(out["ssp s=0"]), load_weights(out["sync cut"])) == 0


def test_bytes_are_the_protocols_volume(battery):
    results, _ = battery
    result = results["sync cut"]
    steps, n, header = result.steps, parameter_bytes(), 8 * (5 + 1)  # 5 fields and one lr per param group
    worker, server = result.comm["per_rank"][0]["by_operation"], result.comm["per_rank"][4]["by_operation"]
    assert worker["ps:push"] == steps * n
    assert worker["ps:header"] == (steps + 1) * header  # one per step and one at the epoch's end
    assert server["ps:pull"] == steps * 4 * n  # every worker every step; none at the end (nothing newer)
    assert server["ps:header"] == (steps + 1) * 4 * 8 * 2
    assert result.comm["staleness"]["histogram"] == {"0": steps * 4}
    grouped = results["sync groups=2"].comm["per_rank"]
    assert grouped[0]["by_operation"]["ps:push"] == steps * n  # the leader pushes its group's sum
    assert grouped[1]["by_operation"]["ps:group_reduce"] == steps * n  # the member sends to its leader
    assert grouped[4]["by_operation"]["ps:pull"] == steps * 2 * n  # two contributors
    sharded = results["sync servers=2"].comm
    assert sum(sharded["shard_bytes"]) == n
    assert [sharded["per_rank"][rank]["by_operation"]["ps:pull"] for rank in (3, 4)] == \
        [steps * 3 * part for part in sharded["shard_bytes"]]
    grouped = results["async groups=2"]  # pushing every 2 steps, and what is left at the epoch's end
    pushes = -(-grouped.steps // 2)
    assert grouped.comm["per_rank"][0]["by_operation"]["ps:push"] == pushes * n
    assert grouped.comm["staleness"]["applied"] == 2 * pushes


def test_distbelief_stages_exchange_their_own_tensors(battery):
    from polytrain.models import build_model
    from polytrain.parallel.pipeline import cut_points

    results, _ = battery
    model = build_model("lenet5", 10, (1, 8, 8))
    cuts = cut_points(model, 2, (1, 8, 8))
    stage_bytes = [sum(4 * p.numel() for p in model[cuts[s]:cuts[s + 1]].parameters()) for s in range(2)]
    for run in ("distbelief sync", "distbelief async"):
        result = results[run]
        per_rank = [rank["by_operation"] for rank in result.comm["per_rank"]]
        # Ranks 0, 1: replica 0's stages; 2, 3: replica 1's; 4: the server, which answers every stage's pull.
        assert [per_rank[rank]["ps:push"] for rank in range(4)] == [result.steps * b for b in stage_bytes * 2]
        pulls = result.steps * 2 * sum(stage_bytes)  # each stage of each replica every step
        if run == "distbelief sync":
            assert per_rank[4]["ps:pull"] == pulls  # and none at the end: nothing newer
        else:  # at the end, every stage the others' pushes left behind its shard's version pulls once more
            assert pulls < per_rank[4]["ps:pull"] <= pulls + 2 * sum(stage_bytes)
        assert result.comm["staleness"]["applied"] == result.steps * 4  # every stage's gradient of every step
    # Asynchronous stages apply their gradients one by one: stale by the pushes of the others.
    assert results["distbelief async"].comm["staleness"]["max"] > 0
    assert results["distbelief async"].final_test_accuracy >= results["distbelief sync"].final_test_accuracy - 0.1


def test_ssp_staleness_stays_within_its_bound(battery):
    results, _ = battery
    for run in ("ssp s=2 straggler", "mnist ssp s=2"):
        assert results[run].comm["staleness"]["max"] <= 2
        assert all(row["staleness_max"] <= 2 for row in results[run].epochs)
    assert results["ssp s=2 straggler"].comm["staleness"]["mean"] > 0  # the others run ahead of the slow worker


@pytest.mark.parametrize("run", list(BOUNDS))
def test_stale_modes_train_to_within_a_bound_of_synchronous_training(battery, run):
    results, _ = battery
    assert results[run].final_test_accuracy >= results["mnist sync"].final_test_accuracy - BOUNDS[run]


def test_a_resumed_synchronous_run_equals_the_uninterrupted_one(battery):
    results, out = battery
    assert max_weight_difference(load_weights(out["sync resumed"]), load_weights(out["sync"])) == 0
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert [row[key] for row in results["sync resumed"].epochs] == [row[key] for row in results["sync"].epochs]


def test_a_resumed_asynchronous_run_continues_its_servers(battery):
    results, _ = battery
    cut, resumed = results["mnist async cut"], results["mnist async resumed"]
    assert resumed.epochs[0]["test_accuracy"] == cut.epochs[0]["test_accuracy"]
    assert resumed.steps == 2 * cut.steps
    # Every push of both epochs is counted: the staleness histogram went on from the checkpoint's.
    assert resumed.comm["staleness"]["applied"] == 2 * cut.comm["staleness"]["applied"]


def test_asynchronous_easgd_with_alpha_0_is_independent_workers(battery):
    # The center never moves from the initial model, and no pull moves a replica: each worker trains alone,
    # as local SGD does before its first average (its replicas' losses and spread, bit for bit).
    results, out = battery
    run, independent = results["easgd async alpha=0"], results["independent"]
    for key in ("train_loss", "consensus_distance"):
        assert run.epochs[0][key] == independent.epochs[0][key]
    assert run.epochs[0]["consensus_distance"] > 0
    from polytrain.models import build_model
    torch.manual_seed(DIGITS.seed)
    initial = build_model("lenet5", 10, (1, 8, 8)).state_dict()
    assert max_weight_difference(load_weights(out["easgd async alpha=0"]), initial) == 0


def test_asynchronous_easgd_exchanges_with_the_server_every_tau_steps(battery):
    results, _ = battery
    result = results["mnist easgd async"]
    exchanges, settles, n = result.steps // 4, 2, parameter_bytes(28)  # 20 exchanges; one settle per epoch
    worker, server = result.comm["per_rank"][0]["by_operation"], result.comm["per_rank"][4]["by_operation"]
    assert worker == {"easgd:header": (exchanges + settles) * 16, "easgd:push": exchanges * n,
                      "easgd:pull": 0, "easgd:center": 0}
    assert server == {"easgd:header": 0, "easgd:push": 0, "easgd:pull": 4 * exchanges * n,
                      "easgd:center": 4 * settles * n}
    assert (result.comm["alpha"], result.comm["beta"], result.comm["servers"]) == \
        (pytest.approx(0.9 / 4), pytest.approx(0.9), 1)
    assert result.epochs[-1]["consensus_distance"] > 0


def test_a_resumed_asynchronous_easgd_run_continues_from_its_center(battery):
    # Asynchronous, so not bit for bit (and the cut ended with its replicas at the center): the first epoch
    # is the cut's, and the second trains on from it as far as the uninterrupted run (measured: cut 0.803,
    # resumed 0.894, uninterrupted 0.895).
    results, _ = battery
    cut, resumed = results["mnist easgd async cut"], results["mnist easgd async resumed"]
    straight = results["mnist easgd async"]
    assert resumed.epochs[0]["test_accuracy"] == cut.epochs[0]["test_accuracy"]
    assert resumed.steps == straight.steps
    assert resumed.final_test_accuracy >= straight.final_test_accuracy - 0.05


@pytest.mark.parametrize("args, message", [
    ({"mode": "bsp"}, "unknown ps mode 'bsp'"),
    ({"mode": "ssp"}, "needs its bound: staleness=S"),
    ({"staleness": 1}, "mode=sync is staleness 0"),
    ({"mode": "sync", "push_every": 2}, "push_every and fetch_every are async's"),
    ({"servers": 0}, "servers must be a whole number >= 1"),
    ({"mode": "ssp", "staleness": -1}, "staleness must be a whole number >= 0"),
])
def test_bad_arguments_fail_in_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        ParameterServerArgs(**args)


@pytest.mark.parametrize("changes, message", [
    ({"strategy_args": {"groups": 5}}, "groups=5 needs at least as many workers"),
    ({"strategy_args": {"servers": 2}, "grad_clip": 1.0}, "servers each see one shard"),
    ({"amp": "fp16"}, "amp fp16"),
    ({"precision": "bf16"}, "precision bf16"),
    ({"strategy_args": {"speed": 1}}, "takes no argument 'speed'"),
    ({"mesh": {"dp": 2, "tp": 2}}, "ps serves whole tensors to replicas or to their pipeline stages; mesh dp 2 x tp 2"),
    ({"mesh": DISTBELIEF, "step_schedule": "1f1b", "strategy_args": {"groups": 2}},
     "with pp 2 each rank holds one stage; use no groups"),
    ({"mesh": DISTBELIEF, "step_schedule": "1f1b", "strategy": "easgd", "strategy_args": EASGD_ASYNC},
     "easgd puts servers beside data-parallel workers; mesh dp 2 x pp 2 = 4 ranks splits the model"),
])
def test_settings_the_servers_cannot_take_are_refused_before_any_worker_starts(changes, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        resolve(DIGITS.replace(**changes))


def test_shards_are_whole_tensors_balanced_by_bytes():
    assert shard_tensors([10, 50, 20, 30], 2) == [[0, 1], [2, 3]]  # 50, then 30 and 20, then 10: 60 and 50
    assert shard_tensors([4, 4, 4], 3) == [[0], [1], [2]]
    assert worker_groups(5, 2) == [[0, 1, 2], [3, 4]]


def test_own_loops_are_told_that_servers_need_polytrains_loop():
    from polytrain.train.session import setup
    with pytest.raises(ConfigError, match="runs server ranks"):
        setup(strategy="ps:servers=1")
