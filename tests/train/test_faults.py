"""Fault injection and self-restarting runs (polytrain.faults, polytrain.train.loop.supervise).

A 4-worker synchronous run that loses a worker mid-epoch finishes by itself, and its weights equal the
uninterrupted run (one worker accumulating the same 4 microbatches: DESIGN.md section 8's reference) both
when it restarts with 4 workers and when it continues with the 3 survivors.
"""

import json
import re

import pytest
import torch

from polytrain.config import ConfigError, Experiment
from polytrain.faults import Byzantine, alie_z, check_faults, flip_byte, parse_fault
from polytrain.train import train
from polytrain.train.checkpoint import (checkpoint_path, checkpoints_newest_first, keep_previous, load_newest_intact,
                                        save_checkpoint)
from polytrain.train.result import load_weights, max_weight_difference

RUN = Experiment(model="lenet5", dataset="digits", workers=4, epochs=2, batch_size=48, lr=0.05, schedule="constant",
                 checkpoint_steps=5, timeout_s=5.0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(RUN.replace(workers=1, microbatches=4, checkpoint_steps=0, out=str(out)))
    return load_weights(out)


def test_a_killed_worker_restarts_with_four_from_the_checkpoint_before_a_corrupt_one(uninterrupted, tmp_path):
    out = tmp_path / "run"
    result = train(RUN.replace(out=str(out), keep_checkpoints=2, max_restarts=1,
                               faults=[{"kind": "kill", "rank": 2, "step": 12}, {"kind": "corrupt-checkpoint"}]))
    assert max_weight_difference(uninterrupted, load_weights(out)) <= 1e-5
    faults = json.loads((out / "result.json").read_text())["faults"]
    assert faults == result.faults and faults["restarts"] == 1
    failure = faults["failures"][0]
    # The newest checkpoint (step 10) was corrupted when the kill was noticed: the restart passed over it and
    # redid the 7 steps since step 5.
    assert (failure["kind"], failure["lost_ranks"], failure["step"], failure["workers_after"]) == ("kill", [2], 12, 4)
    assert failure["corrupted"] == "checkpoint.pt" and len(failure["passed_over"]) == 1
    assert "checksum mismatch" in failure["passed_over"][0]
    assert (failure["resumed_from"], failure["resumed_step"], failure["steps_redone"]) == ("checkpoint.5.pt", 5, 7)
    assert 0 <= failure["detection_s"] < 5 and 0 < failure["restart_s"] <= failure["recovery_s"]
    assert (out / "checkpoint.pt.corrupt").exists()
    assert result.steps == 2 * result.epochs[0]["steps"] and result.config["workers"] == 4


def test_a_hung_worker_is_detected_within_the_timeout_and_the_survivors_continue(uninterrupted, tmp_path):
    out = tmp_path / "run"
    result = train(RUN.replace(out=str(out), max_restarts=1, elastic=True,
                               faults=[{"kind": "hang", "rank": 1, "step": 12}]))
    assert max_weight_difference(uninterrupted, load_weights(out)) <= 1e-5
    failure = result.faults["failures"][0]
    assert (failure["kind"], failure["lost_ranks"], failure["workers_after"]) == ("hang", [1], 3)
    assert (failure["resumed_step"], failure["steps_redone"]) == (10, 2)
    # Noticed by the others' collective timeout (5 s), not by a person.
    assert RUN.timeout_s - 1 <= failure["detection_s"] <= RUN.timeout_s + 5
    assert result.config["workers"] == 3 and len(result.comm["per_rank"]) == 3


def test_without_restarts_a_lost_worker_fails_the_run_in_one_line(tmp_path):
    from polytrain.launch import WorkerFailed

    with pytest.raises(WorkerFailed, match="rank 1 was killed by SIGKILL"):
        train(RUN.replace(workers=2, epochs=1, out=str(tmp_path / "run"), faults=[{"kind": "kill", "rank": 1, "step": 2}]))
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.parametrize("faults, message", [
    ([{"kind": "explode"}], "unknown fault 'explode'"),
    ([{"kind": "kill", "rank": 1}], "fault kill needs step"),
    ([{"kind": "kill", "rank": 9, "step": 1}], "worker rank in 0..3"),
    ([{"kind": "hang", "rank": 1, "step": -1}], "global step >= 0"),
    ([{"kind": "kill", "rank": 1, "step": 1, "when": 3}], "takes no argument 'when'"),
    ([{"kind": "slow", "rank": 1, "factor": 0.5}], "factor must be a number >= 1"),
    ([{"kind": "corrupt-checkpoint"}], "add one"),
    ([{"kind": "byzantine", "ranks": "1+2", "attack": "signflip"}], "honest majority"),
    ([{"kind": "byzantine", "ranks": 1, "attack": "lie"}], "unknown byzantine attack 'lie'"),
    ([{"kind": "byzantine", "ranks": "x", "attack": "ipm"}], "distinct replica numbers"),
    ([{"kind": "byzantine", "ranks": 5, "attack": "ipm"}], "replicas in 0..3"),
    ("kill", "list of fault tables"),
])
def test_bad_faults_are_refused_in_one_line(faults, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_faults(faults, workers=4, replicas=4)


@pytest.mark.parametrize("changes, message", [
    (dict(max_restarts=1), "give --out DIR"),
    (dict(elastic=True, out="x"), "give --max-restarts"),
    (dict(max_restarts=1, elastic=True, out="x", strategy="local_sgd"), "--elastic continues with fewer replicas"),
    (dict(aggregator="krum"), "krum needs n > 2f + 2"),
    (dict(aggregator="median", strategy="gossip"), "which strategy gossip does not gather"),
    (dict(aggregator="median", compressor="topk"), "--compressor topk sums compressed buckets"),
    (dict(faults=[{"kind": "byzantine", "ranks": 1, "attack": "ipm"}], strategy="local_sgd"), "does not gather"),
    (dict(workers=1, faults=[{"kind": "kill", "rank": 0, "step": 1}]), "single-process run"),
])
def test_bad_restart_and_aggregator_settings_are_refused_before_a_worker_starts(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(RUN.replace(**changes))


def test_the_cli_spells_faults_and_a_slow_fault_is_the_straggler():
    assert parse_fault("kill:rank=2,step=30") == {"kind": "kill", "rank": 2, "step": 30}
    assert parse_fault("byzantine:ranks=1+3,attack=alie")["ranks"] == "1+3"
    from polytrain.train.defaults import resolve

    exp = resolve(RUN.replace(faults=[{"kind": "slow", "rank": 1, "factor": 3},
                                      {"kind": "byzantine", "ranks": 3, "attack": "signflip"}]))
    assert exp.straggler == {"rank": 1, "slowdown": 3}
    assert (exp.aggregator, exp.aggregator_args) == ("mean", {"f": 1})  # a gradient attack meets the plain mean


def test_attacks_replace_only_the_byzantine_rows():
    torch.manual_seed(0)
    rows = torch.randn(5, 7, dtype=torch.float64)
    honest = rows[[0, 2, 3, 4]]
    assert torch.equal(Byzantine((1,), "signflip", 4.0).corrupt(rows, 0)[1], -4 * rows[1])
    ipm = Byzantine((1,), "ipm", 0.1).corrupt(rows, 0)
    assert torch.equal(ipm[[0, 2, 3, 4]], honest) and torch.allclose(ipm[1], -0.1 * honest.mean(0))
    z = alie_z(5, 1)  # s = floor(5/2 + 1) - 1 = 2: Phi^-1(3/5)
    assert z == pytest.approx(0.2533471, abs=1e-6)
    alie = Byzantine((1,), "alie", None).corrupt(rows, 0)
    assert torch.allclose(alie[1], honest.mean(0) - z * honest.std(0))
    noise = Byzantine((1,), "gaussian", 2.0, seed=3)
    assert torch.equal(noise.corrupt(rows, 7), noise.corrupt(rows, 7))  # the same on every combining rank
    assert not torch.equal(noise.corrupt(rows, 7), noise.corrupt(rows, 8))
    assert torch.equal(Byzantine((1,), "labelflip", None).corrupt(rows, 0), rows)


def test_only_the_newest_checkpoints_are_kept_and_a_corrupt_one_is_passed_over(tmp_path):
    for step in (5, 10, 15):
        keep_previous(tmp_path, step - 5, keep=2)
        save_checkpoint(checkpoint_path(tmp_path), {"global_step": step})
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == ["checkpoint.pt", "checkpoint.10.pt"]
    flip_byte(checkpoint_path(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    path, state, skipped = load_newest_intact(tmp_path)
    assert (path.name, state["global_step"], len(skipped)) == ("checkpoint.10.pt", 10, 1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # reading alone changes nothing
    load_newest_intact(tmp_path, quarantine=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.10.pt", "checkpoint.pt.corrupt"]
