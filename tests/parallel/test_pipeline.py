"""Pipelines against their references: GPipe's, 1F1B's and interleaved 1F1B's action lists (every microbatch
forward and back, sends matched by the neighbour's receives, 1F1B's in-flight bound, no deadlock, the simulated
bubble equal to (p-1)/(vm+p-1)), the balanced cut against brute force, whole runs (pp 2 and 4, interleaved,
dp 2 x pp 2, pp 2 x tp 2) against one worker with the same microbatches (DESIGN.md section 8), the counted
activation bytes against their formula, the measured microbatches in flight and activation memory, an exact
resume, and bad meshes in one line.

The runs of 2 ranks share one spawn, those of 4 another.
"""

import itertools
import shutil

import pytest
import torch

from polytrain.config import ConfigError, Experiment
from polytrain.models import build_model
from polytrain.parallel.pipeline import balanced_cuts, cut_points, module_times
from polytrain.schedules import STEP_SCHEDULES
from polytrain.schedules.pipeline import simulate
from polytrain.train import train, train_sequence
from polytrain.train.defaults import resolve
from polytrain.train.loop import check_model_fits
from polytrain.train.result import load_weights, max_weight_difference

# Digits at batch 48, 4 microbatches of 12, momentum SGD at a constant rate: 30 steps an epoch (1438 training
# samples; the last step's 46 split 12, 12, 11, 11).
DIGITS = Experiment(model="lenet5", dataset="digits", epochs=1, batch_size=48, optimizer="momentum", lr=0.05,
                    schedule="constant", augment_shift=0, threads=1, microbatches=4)


def in_flight(actions) -> int:
    """The most microbatches whose forward ran and whose backward has not."""
    most = current = 0
    for action in actions:
        current += {"forward": 1, "backward": -1}.get(action.op, 0)
        most = max(most, current)
    return most


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, microbatches", [(2, 1), (2, 4), (4, 3), (4, 8)])
def test_every_stage_runs_every_microbatch_and_its_neighbours_agree(name, stages, microbatches):
    schedule = STEP_SCHEDULES.get(name)()
    plans = [schedule.actions(microbatches, s, stages) for s in range(stages)]
    for s, actions in enumerate(plans):
        for op in ("forward", "backward"):
            assert sorted(a.microbatch for a in actions if a.op == op) == list(range(microbatches))
        # A microbatch's backward comes after its forward on every stage.
        order = [(a.op, a.microbatch) for a in actions]
        assert all(order.index(("forward", i)) < order.index(("backward", i)) for i in range(microbatches))
        if s + 1 < stages:  # what s sends, s + 1 receives, in the same order
            assert [a.microbatch for a in actions if a.op == "send_activation"] == \
                [a.microbatch for a in plans[s + 1] if a.op == "recv_activation"]
            assert [a.microbatch for a in plans[s + 1] if a.op == "send_gradient"] == \
                [a.microbatch for a in actions if a.op == "recv_gradient"]
        bound = microbatches if name == "gpipe" else min(stages - s, microbatches)
        assert in_flight(actions) == bound  # 1F1B: at most p - s microbatches in flight on stage s


@pytest.mark.parametrize("stages, microbatches, chunks", [(2, 2, 2), (2, 4, 3), (4, 4, 2), (4, 8, 2), (3, 6, 4)])
def test_interleaved_runs_every_microbatch_on_every_virtual_stage_of_its_rank(stages, microbatches, chunks):
    schedule = STEP_SCHEDULES.get("interleaved")()
    for rank in range(stages):
        actions = schedule.actions(microbatches, rank, stages, chunks)
        own = [chunk * stages + rank for chunk in range(chunks)]
        for op in ("forward", "backward"):
            assert sorted((a.stage, a.microbatch) for a in actions if a.op == op) == \
                [(stage, i) for stage in own for i in range(microbatches)]
    with pytest.raises(ValueError, match="3 microbatches is not a multiple of 2"):
        schedule.actions(3, 0, 2, 2)


@pytest.mark.parametrize("name, chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
@pytest.mark.parametrize("stages, microbatches", [(2, 2), (2, 4), (2, 16), (4, 4), (4, 8), (4, 16)])
def test_the_simulated_step_runs_without_deadlock_and_idles_as_the_formula_says(name, chunks, stages, microbatches):
    # Every receive is matched to the message it expects (per tag, in order) and the bubble of a balanced
    # pipeline with forward 1 and backward 2 is (p-1)/(vm+p-1) (Huang et al. 2019; Narayanan et al. 2021).
    step = simulate(STEP_SCHEDULES.get(name)(), microbatches, stages, chunks)
    assert step["bubble"] == pytest.approx((stages - 1) / (chunks * microbatches + stages - 1), abs=1e-12)


def test_1f1b_on_the_last_stage_alternates_forward_and_backward():
    actions = STEP_SCHEDULES.get("1f1b")().actions(3, 1, 2)
    assert [(a.op, a.microbatch) for a in actions] == [
        ("recv_activation", 0), ("forward", 0), ("backward", 0), ("send_gradient", 0),
        ("recv_activation", 1), ("forward", 1), ("backward", 1), ("send_gradient", 1),
        ("recv_activation", 2), ("forward", 2), ("backward", 2), ("send_gradient", 2)]


def brute_force(costs, stages):
    best = None
    for inner in itertools.combinations(range(1, len(costs)), stages - 1):
        cuts = [0, *inner, len(costs)]
        value = max(sum(costs[a:b]) for a, b in zip(cuts, cuts[1:]))
        if best is None or value < best[0]:
            best = (value, cuts)
    return best


def test_the_cut_balances_the_stages_as_well_as_any_contiguous_cut():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        count = int(torch.randint(2, 9, (1,), generator=generator))
        stages = int(torch.randint(1, count + 1, (1,), generator=generator))
        costs = torch.rand(count, generator=generator).tolist()
        cuts = balanced_cuts(costs, stages)
        assert cuts[0] == 0 and cuts[-1] == count and all(a < b for a, b in zip(cuts, cuts[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(cuts, cuts[1:])) == pytest.approx(brute_force(costs, stages)[0])
    # LeNet-5 on 8x8 digits: the second convolution is 70 % of the FLOPs; it starts the second stage.
    assert cut_points(build_model("lenet5", 10, (1, 8, 8)), 2, (1, 8, 8)) == [0, 3, 12]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pp")
    two = {"gpipe pp 2": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="gpipe"),
           "1f1b pp 2": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="1f1b", epochs=2),
           "1f1b pp 2 cut": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="1f1b"),
           "interleaved pp 2": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="interleaved"),
           "1f1b pp 2 given cuts": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="1f1b", partition=[5]),
           "gpipe pp 2 timed": DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="gpipe", partition="time")}
    four = {"1f1b pp 4": DIGITS.replace(workers=4, mesh={"pp": 4}, step_schedule="1f1b"),
            "gpipe dp 2 x pp 2": DIGITS.replace(workers=4, mesh={"dp": 2, "pp": 2}, step_schedule="gpipe",
                                                microbatches=2),
            "1f1b pp 2 x tp 2": DIGITS.replace(workers=4, mesh={"pp": 2, "tp": 2}, step_schedule="1f1b")}
    out = {key: str(directory / key.replace(" ", "_")) for key in {**two, **four}}
    results = {}
    for group in (two, four):
        results.update(zip(group, train_sequence([exp.replace(out=out[key]) for key, exp in group.items()])))
    out["1f1b pp 2 resumed"] = str(directory / "resumed")
    shutil.copytree(out["1f1b pp 2 cut"], out["1f1b pp 2 resumed"])  # the cut's directory stays the 1-epoch run
    results["1f1b pp 2 resumed"] = train(two["1f1b pp 2"].replace(out=out["1f1b pp 2 resumed"]),
                                         resume=out["1f1b pp 2 resumed"])
    out["4 microbatches"] = str(directory / "reference")
    results["4 microbatches"] = train(DIGITS.replace(workers=1, out=out["4 microbatches"]))
    return results, out


@pytest.mark.parametrize("run", ["gpipe pp 2", "1f1b pp 2 cut", "1f1b pp 4", "interleaved pp 2", "gpipe dp 2 x pp 2",
                                 "1f1b pp 2 x tp 2", "1f1b pp 2 given cuts", "gpipe pp 2 timed"])
def test_a_pipelined_run_equals_one_worker_with_the_same_microbatches(runs, run):
    # dp 2 x pp 2 with 2 microbatches per replica: the reference's 4 microbatches, 2 on each replica.
    results, out = runs
    assert max_weight_difference(load_weights(out[run]), load_weights(out["4 microbatches"])) <= 1e-5
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert results[run].epochs[0][key] == pytest.approx(results["4 microbatches"].epochs[0][key], rel=1e-5)


def test_activations_and_their_gradients_are_counted_between_neighbours(runs):
    # LeNet-5 cut after its first pool: the first stage sends each microbatch's activations (6 x 14 x 14 per
    # sample), the second sends their gradients back; nothing else is training traffic (received bytes show
    # as 0 sent).
    results, _ = runs
    boundary = build_model("lenet5", 10, (1, 8, 8))[:3](torch.zeros(1, 1, 8, 8)).numel()
    per_epoch = 1438 * boundary * 4  # every training sample's activation once
    stats = results["gpipe pp 2"].comm["per_rank"]
    assert stats[0]["by_operation"] == {"pp:activation": per_epoch, "pp:gradient": 0}
    assert stats[1]["by_operation"] == {"pp:activation": 0, "pp:gradient": per_epoch}


def test_the_measured_step_holds_what_the_schedule_says_in_flight(runs):
    # Stage s holds every microbatch under GPipe, at most p - s under 1F1B; the activations saved for backward
    # grow with them (4 of 12 samples against 2 of 12 on the first stage).
    results, _ = runs
    gpipe, one_f_one_b = results["gpipe pp 2"].comm["pipeline"], results["1f1b pp 2 cut"].comm["pipeline"]
    assert [stage["peak_in_flight"] for stage in gpipe["per_stage"]] == [4, 4]
    assert [stage["peak_in_flight"] for stage in one_f_one_b["per_stage"]] == [2, 1]
    assert gpipe["per_stage"][0]["peak_activation_bytes"] == 2 * one_f_one_b["per_stage"][0]["peak_activation_bytes"]
    assert gpipe["bubble_formula"] == pytest.approx(1 / 5) and gpipe["steps_measured"] == 29
    assert 0 <= gpipe["bubble_measured"] < 1
    assert results["interleaved pp 2"].comm["pipeline"]["bubble_formula"] == pytest.approx(1 / 9)
    assert results["interleaved pp 2"].comm["pipeline"]["cuts"] == cut_points(build_model("lenet5", 10, (1, 8, 8)),
                                                                              4, (1, 8, 8))


def test_stages_are_cut_where_the_user_says_or_by_measured_time(runs):
    results, _ = runs
    assert results["1f1b pp 2 given cuts"].comm["pipeline"]["cuts"] == [0, 5, 12]
    timed = results["gpipe pp 2 timed"].comm["pipeline"]["cuts"]
    assert timed[0] == 0 < timed[1] < timed[2] == 12


def test_module_times_measure_a_copy_and_leave_the_run_as_it_was():
    model = build_model("lenet5", 10, (1, 8, 8))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(1)
    before = torch.get_rng_state()
    times = module_times(model, (1, 8, 8), batch=16)
    assert len(times) == len(model) and all(t > 0 for t in times)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert all(p.grad is None for p in model.parameters())
    # Balanced by these costs as by any others (`balanced_cuts`).
    assert cut_points(model, 3, (1, 8, 8), "time", costs=times) == balanced_cuts(times, 3)


def test_a_resumed_pipelined_run_equals_the_uninterrupted_one(runs):
    results, out = runs
    assert max_weight_difference(load_weights(out["1f1b pp 2 resumed"]), load_weights(out["1f1b pp 2"])) == 0
    assert [row["test_loss"] for row in results["1f1b pp 2 resumed"].epochs] == \
        [row["test_loss"] for row in results["1f1b pp 2"].epochs]


@pytest.mark.parametrize("changes, message", [
    ({"workers": 2, "mesh": {"pp": 2}}, "splits the model over pp, but step schedule accumulate does not split it "
                                        "over pp \\(schedules that do: 1f1b, gpipe, interleaved, pipedream; set pp=1\\)"),
    ({"workers": 1, "step_schedule": "interleaved"}, "interleaves pipeline stages over a pp axis; mesh dp 1 = 1 rank has none"),
    ({"workers": 2, "mesh": {"pp": 2}, "step_schedule": "interleaved", "virtual_stages": 1}, "virtual_stages >= 2"),
    ({"workers": 2, "mesh": {"pp": 2}, "step_schedule": "interleaved", "microbatches": 3}, "groups of the pp 2 ranks; "
                                                                                           "3 microbatches is not"),
    ({"workers": 2, "mesh": {"pp": 2}, "step_schedule": "gpipe", "grad_clip": 1.0}, "with pp 2 each rank holds one "
                                                                                      "stage"),
    ({"workers": 2, "mesh": {"pp": 2}, "step_schedule": "gpipe", "amp": "fp16"}, "amp fp16 scales the loss on the "
                                                                                   "last of pp 2 stages"),
])
def test_bad_meshes_fail_in_one_line_before_any_worker_starts(changes, message):
    with pytest.raises(ConfigError, match=message):
        resolve(DIGITS.replace(**changes))


@pytest.mark.parametrize("changes, message", [
    ({"workers": 13, "mesh": {"pp": 13}, "microbatches": 12},
     "pp 13 cuts the model into 13 stages at its top-level modules, but it has 12; use pp <= 12"),
    ({"partition": [20]}, "partition \\[20\\]: expected 1 increasing module indices in 1 .. 11, where stages 2 to 2 of "
                          "the 12 top-level modules begin"),
    ({"partition": [3, 5]}, "expected 1 increasing module indices"),
    ({"step_schedule": "interleaved", "partition": [3]}, "expected 3 increasing module indices"),
])
def test_a_model_the_pipeline_cannot_cut_fails_in_one_line_before_any_worker_starts(changes, message):
    exp = resolve(DIGITS.replace(**{"workers": 2, "mesh": {"pp": 2}, "step_schedule": "gpipe", **changes}))
    with pytest.raises(ConfigError, match=message):
        check_model_fits(exp)


def test_an_unknown_partition_is_one_line():
    with pytest.raises(ConfigError, match="unknown partition 'fast'; expected flops or time, or a list"):
        resolve(DIGITS.replace(workers=2, mesh={"pp": 2}, step_schedule="gpipe", partition="fast"))


@pytest.mark.slow
def test_dp_pp_tp_on_eight_ranks_equals_one_worker(tmp_path):
    # dp 2 x pp 2 x tp 2: each replica's 2 microbatches through a pipeline whose linear layers are split.
    run = train(DIGITS.replace(workers=8, mesh={"dp": 2, "pp": 2, "tp": 2}, step_schedule="1f1b", microbatches=2,
                               out=str(tmp_path / "hybrid")))
    reference = train(DIGITS.replace(workers=1, out=str(tmp_path / "reference")))
    assert max_weight_difference(load_weights(tmp_path / "hybrid"), load_weights(tmp_path / "reference")) <= 1e-5
    assert run.epochs[0]["test_loss"] == pytest.approx(reference.epochs[0]["test_loss"], rel=1e-5)


def in_place_after_the_cut():
    # The cost model cuts before the ReLU (2048 multiply-adds | 320): the second stage begins in place.
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(32, 10))


def test_a_stage_that_begins_in_place_works_on_a_copy_of_what_it_receives(tmp_path):
    exp = DIGITS.replace(model=None, workers=2, mesh={"pp": 2}, step_schedule="1f1b", out=str(tmp_path / "pp"))
    result = train(exp, model=in_place_after_the_cut)
    train(exp.replace(workers=1, mesh={}, step_schedule="accumulate", out=str(tmp_path / "one")),
          model=in_place_after_the_cut)
    assert result.comm["pipeline"]["cuts"] == [0, 2, 4]
    assert max_weight_difference(load_weights(tmp_path / "pp"), load_weights(tmp_path / "one")) <= 1e-5


def test_a_first_stage_without_parameters_has_nothing_to_backpropagate(tmp_path):
    # Stage 1 is the Flatten alone: its output needs no gradient, the run still equals one worker.
    exp = DIGITS.replace(model=None, workers=2, mesh={"pp": 2}, step_schedule="1f1b", partition=[1],
                         out=str(tmp_path / "pp"))
    result = train(exp, model=in_place_after_the_cut)
    train(exp.replace(workers=1, mesh={}, step_schedule="accumulate", partition="flops", out=str(tmp_path / "one")),
          model=in_place_after_the_cut)
    assert result.comm["pipeline"]["cuts"] == [0, 1, 4]
    assert max_weight_difference(load_weights(tmp_path / "pp"), load_weights(tmp_path / "one")) <= 1e-5
