"""The performance model against hand-computed formulas, the simulator against the analytic model, the
planner against its memory limit, predicted bytes against counted bytes, and the commands end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from polytrain.cli import main
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.config import Experiment
from polytrain.perf.cluster import Cluster, Link, parse_cluster
from polytrain.perf.plan import rank_candidates
from polytrain.perf.predict import FLOAT_BYTES, buckets, overlap_timeline, predict, run_workload
from polytrain.perf.profile import load_profile
from polytrain.perf.simulate import simulate
from polytrain.schedules.pipeline import GPipe, simulate as play_pipeline

ALPHA, BETA, GAMMA = 1e-5, 1e-9, 2e-10
FORWARD, BACKWARD = 1e-3, 2e-3  # seconds per module at any batch
UPDATE, OVERHEAD = 3e-4, 5e-4


@dataclasses.dataclass(frozen=True)
class FixedCompute:
    """Every module takes FORWARD and BACKWARD seconds: the formulas below need no cost model."""

    source: str = "fixed"

    def block_times(self, workload, batch, ranks_sharing):
        return [(FORWARD, BACKWARD)] * len(workload.blocks)

    def update_s(self, params, optimizer, ranks_sharing):
        return UPDATE

    def step_overhead_s(self, workload, batch, ranks_sharing):
        return OVERHEAD

    def compression_s(self, compressor, n_bytes, ranks_sharing):
        return 0.0


def fixed_cluster(ranks: int = 4) -> Cluster:
    link = Link(ALPHA, BETA)
    return Cluster("fixed", 1, ranks, FixedCompute(), link, link, gamma_s_per_byte=GAMMA)


def lenet(**settings) -> Experiment:
    return Experiment(**{"model": "lenet5", "dataset": "mnist5k", "batch_size": 128, **settings})


def test_allreduce_without_overlap_is_compute_plus_every_bucket_plus_update():
    exp = lenet(workers=4, strategy="allreduce", strategy_args={"algorithm": "ring", "overlap": False, "bucket_mb": 100})
    blocks = len(run_workload(exp).blocks)
    n = FLOAT_BYTES * run_workload(exp).params
    p = 4
    ring = 2 * (p - 1) * ALPHA + 2 * (p - 1) / p * n * BETA + (p - 1) / p * n * GAMMA  # Thakur et al. 2005
    predicted = predict(exp, fixed_cluster())
    assert predicted.compute_s == pytest.approx(blocks * (FORWARD + BACKWARD))
    assert predicted.exposed_comm_s == pytest.approx(ring)
    assert predicted.step_s == pytest.approx(blocks * (FORWARD + BACKWARD) + ring + UPDATE + OVERHEAD)
    assert predicted.bytes_sent_per_rank == ALLREDUCE_ALGORITHMS.get("ring").bytes_sent(n, p, 0, FLOAT_BYTES)


def test_overlapped_buckets_hide_what_backward_covers():
    # Two transfers of 1 s, ready at 0.5 s and 2 s of a 3 s backward: the second ends at 3 s, nothing shows.
    assert overlap_timeline([0.5, 2.0], [1.0, 1.0], 3.0, 1.0, True) == pytest.approx(0.0)
    assert overlap_timeline([0.5, 2.5], [1.0, 1.0], 3.0, 1.0, True) == pytest.approx(0.5)
    assert overlap_timeline([0.5, 2.5], [1.0, 1.0], 3.0, 0.0, True) == pytest.approx(2.0)  # nothing hidden
    assert overlap_timeline([0.5, 2.5], [1.0, 1.0], 3.0, 1.0, False) == pytest.approx(2.0)


def test_buckets_are_cut_as_the_allreduce_policy_cuts_them():
    exp = lenet(workers=2, strategy="allreduce")
    from polytrain.perf.predict import Context
    from polytrain.comm.mesh import MeshShape

    wl = run_workload(exp)
    ctx = Context(exp, fixed_cluster(2), wl, MeshShape.from_sizes({"dp": 2}), 0, 64, [])
    cuts = buckets(ctx, 0.1)  # 100 KiB: lenet5's 193 KiB first linear layer weight closes a bucket alone
    assert sum(size for _, size in cuts) == FLOAT_BYTES * wl.params
    assert [i for indices, _ in cuts for i in indices] == list(reversed(range(len(wl.parameters))))
    assert all(size >= 0.1 * (1 << 20) for _, size in cuts[:-1])


def test_local_sgd_pays_one_average_every_period():
    exp = lenet(workers=4, strategy="local_sgd", strategy_args={"period": 8, "algorithm": "tree"})
    n = FLOAT_BYTES * run_workload(exp).params
    tree = ALLREDUCE_ALGORITHMS.get("tree").cost_s(n, 4, ALPHA, BETA, GAMMA)
    assert predict(exp, fixed_cluster()).exposed_comm_s == pytest.approx(tree / 8)


def test_gpipe_step_is_the_bubble_formula_with_equal_stages():
    # lenet5 has 12 modules; 2 stages of 6 equal modules, 4 microbatches, free messages:
    # span = (m + p - 1)(f + b) per stage (Huang et al. 2019), busy = m (f + b).
    exp = lenet(workers=2, mesh={"pp": 2}, step_schedule="gpipe", microbatches=4, strategy="local",
                partition=[6])
    cluster = dataclasses.replace(fixed_cluster(2), intra=Link(0.0, 0.0), inter=Link(0.0, 0.0))
    predicted = predict(exp, cluster)
    stage = 6 * (FORWARD + BACKWARD)
    assert predicted.compute_s == pytest.approx(4 * stage)
    assert predicted.compute_s + predicted.bubble_s == pytest.approx((4 + 2 - 1) * stage)
    played = play_pipeline(GPipe(), 4, 2, forward_s=[6 * FORWARD] * 2, backward_s=[6 * BACKWARD] * 2)
    assert played["span"] == pytest.approx((4 + 2 - 1) * stage)


def test_simulator_equals_the_analytic_model_when_the_ranks_are_alike():
    cluster = fixed_cluster(64)
    exp = lenet(workers=64, batch_size=64 * 16, strategy="allreduce")
    analytic = predict(exp, cluster)
    grouped = simulate(exp, cluster)
    played = simulate(exp, cluster, slowdowns={5: 1.0})  # every rank played, none slower
    assert grouped.groups == 1 and played.groups == 64
    assert grouped.step_s == pytest.approx(analytic.step_s)
    assert played.step_s == pytest.approx(analytic.step_s)
    # A straggler: the synchronous step waits for it, as the analytic model says.
    slowed = dataclasses.replace(exp, straggler={"rank": 3, "slowdown": 3.0})
    assert simulate(slowed, cluster).step_s == pytest.approx(predict(slowed, cluster).step_s)
    assert predict(slowed, cluster).bubble_s == pytest.approx(2 * analytic.compute_s)


def test_asynchronous_servers_do_not_wait_for_a_straggler_and_ssp_is_bounded():
    cluster = fixed_cluster(9)
    base = lenet(workers=8, batch_size=8 * 16, strategy="ps")
    slow = {7: 4.0}
    sync = simulate(dataclasses.replace(base, strategy_args={"servers": 1, "mode": "sync"}), cluster, slowdowns=slow)
    ssp = simulate(dataclasses.replace(base, strategy_args={"servers": 1, "mode": "ssp", "staleness": 3}), cluster,
                   slowdowns=slow, steps=40)
    asynchronous = simulate(dataclasses.replace(base, strategy_args={"servers": 1, "mode": "async"}), cluster,
                            slowdowns=slow)
    assert asynchronous.step_s < sync.step_s
    assert asynchronous.slowest_step_s > asynchronous.step_s  # the straggler itself is slow
    assert ssp.step_s <= sync.step_s * 1.0001


def test_8192_ranks_simulate_every_rank_of_an_asymmetric_run():
    cluster = parse_cluster("dgx-a100", ranks=8192)
    exp = Experiment(model="lenet5", dataset="mnist5k", workers=8192, batch_size=8192 * 4, strategy="allreduce",
                     strategy_args={"algorithm": "ring"})
    played = simulate(exp, cluster, noise=0.05, steps=5)
    assert played.ranks == 8192 and played.groups == 8192
    assert played.step_s > simulate(exp, cluster).step_s  # the slowest of 8192 noisy ranks sets every step


def test_planner_keeps_within_the_memory_limit_and_ranks_by_prediction():
    cluster = parse_cluster("generic", ranks=4)
    exp = lenet(workers=4)
    ranked, dropped = rank_candidates(exp, cluster, 4)
    steps = [r.prediction.step_s for r in ranked]
    assert steps == sorted(steps) and len(ranked) > 10
    memories = sorted(r.prediction.memory_per_rank_bytes for r in ranked)
    limit = memories[len(memories) // 2]
    kept, dropped = rank_candidates(exp, cluster, 4, memory_per_rank=limit)
    assert kept and all(r.prediction.memory_per_rank_bytes <= limit for r in kept)
    assert any("over the limit" in why for _, why in dropped)


def test_bad_cluster_and_profile_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="cluster 'nowhere' unknown"):
        parse_cluster("nowhere")
    with pytest.raises(ValueError, match="cluster field tflops must be a positive number"):
        parse_cluster("tflops=-1")
    with pytest.raises(ValueError, match="no calibration profile"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0, "cores": 2, "created": "", "compute": {}, "links": {}}))
    with pytest.raises(ValueError, match="version 0"):
        load_profile(tmp_path / "old.json")


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    """One real (quick) calibration of this machine, shared by the tests below."""
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    assert main(["calibrate", "--quick", "--profile", str(path)]) == 0
    return path


def test_calibration_profile_holds_every_part(quick_profile):
    profile = load_profile(quick_profile)
    data = profile.data
    assert set(data["compute"]["fits"]) == {"1", "2"}
    assert {row["model"] for row in data["compute"]["measured"]} == {"lenet5", "mlp"}
    assert "ring" in data["links"]["none"] and "2" in data["links"]["none"]["ring"]
    assert -1.0 <= data["overlap"]["none"] <= 1.0 and min(data["comm_scale"]["none"].values()) > 0
    assert {"topk", "powersgd", "fp16"} <= set(data["compression"])
    # Measured modules are used for a calibrated model and interpolate linearly in the batch.
    cluster = profile.cluster("none", 2)
    wl = run_workload(resolve_exp(lenet(workers=2)))
    low, mid, high = (cluster.compute.block_times(wl, b, 2) for b in (16, 72, 128))
    assert [m[0] for m in mid] == pytest.approx([(lo[0] + hi[0]) / 2 for lo, hi in zip(low, high)], rel=1e-9)


def resolve_exp(exp):
    from polytrain.train.defaults import resolve

    return resolve(exp)


def test_plan_runs_with_train_plan_and_records_predicted_beside_measured(quick_profile, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setenv("POLYTRAIN_PROFILE", str(quick_profile))
    plan = tmp_path / "plan.toml"
    assert main(["plan", "--model", "mlp", "--dataset", "mnist5k", "--workers", "2", "--batch-size", "200",
                 "--write", str(plan), "--top", "3"]) == 0
    shown = capsys.readouterr().out
    assert "1. " in shown and "plan written" in shown
    out = tmp_path / "run"
    assert main(["train", "--plan", str(plan), "--epochs", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    performance = result["performance"]
    assert performance["predicted_step_s"] > 0 and performance["measured_step_s"] > 0
    assert math.isclose(performance["relative_error"],
                        performance["predicted_step_s"] / performance["measured_step_s"] - 1, rel_tol=1e-9)
    # The run's counted training bytes are the prediction's, for the chosen plan.
    assert result["comm"]["bytes_sent_per_step"] == pytest.approx(
        performance["prediction"]["bytes_sent_per_rank"], rel=0.02)


def test_predicted_allreduce_bytes_equal_the_counted_bytes(quick_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTRAIN_PROFILE", str(quick_profile))
    out = tmp_path / "ring"
    assert main(["train", "--model", "mlp", "--dataset", "mnist5k", "--workers", "2", "--epochs", "1",
                 "--strategy", "allreduce:algorithm=ring,bucket_mb=0.5", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["comm"]["bytes_sent_per_step"] == result["performance"]["prediction"]["bytes_sent_per_rank"]


def test_predict_command_prints_the_split(capsys):
    assert main(["predict", "--model", "lenet5", "--dataset", "mnist5k", "--workers", "8", "--cluster",
                 "krizhevsky-8"]) == 0
    shown = capsys.readouterr().out
    assert "compute" in shown and "exposed comm" in shown and "bytes sent per rank" in shown
    assert main(["predict", "--model", "lenet5", "--dataset", "mnist5k", "--cluster", "nowhere"]) == 2
    assert "cluster 'nowhere' unknown" in capsys.readouterr().err
