"""`polytrain tune`: the search space, seeds from (study seed, trial number), real trials in a SQLite study, the
winner re-run on fresh seeds, and a killed study that resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib

import pytest

from polytrain.cli import main
from polytrain.config import ConfigError
from polytrain.tune import Objective, SearchSpace, TuneSpec, derive_seed, pareto_front
from polytrain.tune.run import CONFIRM_SEED_BASE
from polytrain.tune.schedulers import Job
from polytrain.tune.study import TrialRow

STUDY = """
model = "mlp"
dataset = "digits"
epochs = 1
batch_size = 64
optimizer = "momentum"
schedule = "constant"
augment_shift = 0

[tune]
sampler = "random"
trials = 3
seed = 7
parallel = 2
confirm_seeds = 2

[tune.space]
lr = { loguniform = [0.005, 0.3] }
"""


def test_each_kind_samples_inside_its_range_and_the_grid_takes_every_point():
    space = SearchSpace.parse({"lr": {"loguniform": [1e-3, 1e-1]}, "m": {"uniform": [0.5, 0.9]},
                               "k": {"int": [1, 4]}, "p": {"logint": [1, 64]}, "b": {"choice": [32, 64]}})
    rng = random.Random(0)
    samples = [space.sample(rng) for _ in range(500)]
    assert all(1e-3 <= s["lr"] <= 1e-1 and 0.5 <= s["m"] <= 0.9 and s["b"] in (32, 64) for s in samples)
    assert {s["k"] for s in samples} == {1, 2, 3, 4} and all(isinstance(s["k"], int) for s in samples)
    assert min(s["p"] for s in samples) == 1 and max(s["p"] for s in samples) <= 64
    # log-uniform: each decade of [1e-3, 1e-1] about half the samples
    assert 200 < sum(s["lr"] < 1e-2 for s in samples) < 300
    grid = SearchSpace.parse({"lr": {"loguniform": [1e-3, 1e-1]}, "b": {"choice": [32, 64]}}).grid(3)
    assert [g["lr"] for g in grid[::2]] == pytest.approx([1e-3, 1e-2, 1e-1]) and len(grid) == 6


@pytest.mark.parametrize("table, message", [
    ({"lr": {"normal": [0, 1]}}, "expected one of uniform"),
    ({"lr": {"uniform": [1, 0]}}, "low < high"),
    ({"lr": {"loguniform": [0, 1]}}, "low > 0"),
    ({"k": {"int": [1.5, 3]}}, "whole bounds"),
    ({}, "at least one setting"),
])
def test_a_bad_space_is_one_line(table, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.parse(table)


def planned(spec: TuneSpec) -> list[dict]:
    """Every trial a fifo study hands out, in order, before any is told."""
    scheduler, found = spec.build(), []
    while isinstance(job := scheduler.ask(), Job):
        found.append(job.params)
    return found


def test_a_trial_depends_only_on_the_study_seed_and_its_number():
    table = {"sampler": "random", "trials": 5, "seed": 3, "space": {"lr": {"loguniform": [1e-3, 1.0]}}}
    five = planned(TuneSpec.parse({"model": "mlp", "dataset": "digits"}, table))
    eight = planned(TuneSpec.parse({"model": "mlp", "dataset": "digits"}, {**table, "trials": 8}))
    assert eight[:5] == five and len({p["lr"] for p in eight}) == 8
    assert derive_seed(3, 4) == derive_seed(3, 4) != derive_seed(3, 5) != derive_seed(4, 4)
    with pytest.raises(ConfigError, match="no setting 'lrr'|search space lrr"):
        TuneSpec.parse({"model": "mlp"}, {**table, "space": {"lrr": {"uniform": [0, 1]}}})
    with pytest.raises(ConfigError, match="unknown objective"):
        TuneSpec.parse({"model": "mlp"}, {**table, "objective": "accuracy"})


def test_the_pareto_front_keeps_the_trials_nothing_dominates():
    objectives = (Objective.parse("final_test_accuracy"), Objective.parse("wall_s"))
    rows = [TrialRow(n, "complete", {}, 0, values, 1.0, "") for n, values in
            enumerate([[0.9, 10.0], [0.8, 5.0], [0.85, 12.0], [0.9, 9.0], [0.7, 5.0]])]
    assert [r.number for r in pareto_front(rows, objectives)] == [1, 3]


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    (root / "study.toml").write_text(STUDY)
    assert main(["tune", "--config", str(root / "study.toml"), "--out", str(root / "study")]) == 0
    return root / "study"


def test_trials_are_real_runs_with_their_settings_and_the_winner_is_the_best_of_them(studied):
    summary = json.loads((studied / "tune.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 3
    accuracies = {}
    for trial in summary["trials"]:
        result = json.loads((studied / trial["directory"] / "result.json").read_text())
        assert result["config"]["lr"] == pytest.approx(trial["params"]["lr"])
        assert result["config"]["seed"] == derive_seed(7, trial["number"])
        assert trial["values"] == [result["final_test_accuracy"]]
        accuracies[trial["number"]] = result["final_test_accuracy"]
    assert summary["best"] == [max(accuracies, key=lambda n: (accuracies[n], -n))]
    assert summary["total_seconds"] == pytest.approx(sum(t["seconds"] for t in summary["trials"]))


def test_the_result_is_the_winner_on_fresh_seeds_beside_one_worker(studied):
    matrix = json.loads((studied / "confirm" / "matrix.json").read_text())
    assert matrix["seeds"] == [CONFIRM_SEED_BASE, CONFIRM_SEED_BASE + 1]
    winner = next(c for c in matrix["cells"] if not c["baseline"])
    trials = json.loads((studied / "tune.json").read_text())
    best = next(t for t in trials["trials"] if t["number"] == trials["best"][0])
    assert winner["settings"] == best["params"]
    assert trials["confirmation"]["final_test_accuracy"]["n"] == 2


def test_a_killed_study_keeps_its_finished_trials_and_runs_the_running_one_again(tmp_path):
    (tmp_path / "study.toml").write_text(STUDY.replace("trials = 3", "trials = 2").replace("parallel = 2", "parallel = 1")
                                         .replace("confirm_seeds = 2", "confirm_seeds = 0"))
    root = tmp_path / "study"
    command = [sys.executable, "-m", "polytrain", "tune", "--config", str(tmp_path / "study.toml"), "--out", str(root)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    states = []
    while time.monotonic() < deadline:
        if (root / "study.db").exists():
            with sqlite3.connect(root / "study.db") as db:
                try:
                    states = [s for (s,) in db.execute("select state from polytrain_trials order by number")]
                except sqlite3.OperationalError:
                    states = []
            if states == ["complete", "running"]:
                break
        time.sleep(0.2)
    assert states == ["complete", "running"]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    first = (root / "trials" / "0000" / "result.json").stat().st_mtime_ns
    time.sleep(1)  # the killed trial's process dies with its parent (PR_SET_PDEATHSIG)
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(root)]) == 0
    summary = json.loads((root / "tune.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"]
    assert (root / "trials" / "0000" / "result.json").stat().st_mtime_ns == first
    assert (root / "trials" / "0001.failed-1").is_dir()  # the interrupted attempt, kept
    assert not os.path.exists(root / "trials" / "0001.failed-1" / "result.json")


ASHA_STUDY = """
model = "mlp"
dataset = "digits"
epochs = 3
batch_size = 64
optimizer = "momentum"
schedule = "cosine"
augment_shift = 0

[tune]
sampler = "random"
trials = 3
seed = 2
scheduler = "asha"
confirm_seeds = 0
scheduler_args = { min = 1, eta = 3 }

[tune.space]
lr = { loguniform = [0.01, 0.3] }
"""


def test_asha_pauses_and_continues_trials_to_the_weights_of_uninterrupted_runs(tmp_path):
    import torch

    from polytrain.train.result import max_weight_difference

    (tmp_path / "study.toml").write_text(ASHA_STUDY)
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "tune.json").read_text())
    assert summary["jobs"] == 4  # three trials to epoch 1, the best of them on to 3 (its cosine over 3 epochs)
    winner = summary["trials"][summary["best"][0]]
    assert winner["level"] == 3 and sorted(t["level"] for t in summary["trials"]) == [1, 1, 3]
    best_at_1 = max((t for t in summary["trials"]), key=lambda t: json.loads(
        (tmp_path / "s" / t["directory"] / "metrics.jsonl").read_text().splitlines()[0])["test_accuracy"])
    assert best_at_1["number"] == winner["number"]
    reference = tmp_path / "reference"
    assert main(["train", "--config", str(tmp_path / "s" / winner["directory"] / "config.toml"), "--set",
                 "stop_at={}", "--out", str(reference)]) == 0
    paused = torch.load(tmp_path / "s" / winner["directory"] / "model.pt")
    assert max_weight_difference(paused, torch.load(reference / "model.pt")) == 0.0
    assert summary["total_seconds"] == pytest.approx(sum(t["seconds"] for t in summary["trials"]))
    logs = {path: path.stat().st_mtime_ns for path in (tmp_path / "s" / "trials").glob("*/log.txt")}
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s")]) == 0
    again = json.loads((tmp_path / "s" / "tune.json").read_text())  # every job answered from the database
    assert again["trials"] == summary["trials"] and again["best"] == summary["best"]
    assert {path: path.stat().st_mtime_ns for path in logs} == logs


PBT_STUDY = """
model = "mlp"
dataset = "digits"
epochs = 3
batch_size = 64
optimizer = "momentum"
schedule = "constant"
augment_shift = 0

[tune]
sampler = "random"
trials = 2
seed = 4
scheduler = "pbt"
scheduler_args = { population = 2, interval = 1 }

[tune.space]
lr = { loguniform = [0.001, 0.3] }
"optimizer_args.momentum" = { uniform = [0.5, 0.95] }
"""


def test_pbt_copies_weights_with_hyper_parameters_and_replays_its_winner_bit_for_bit(tmp_path):
    from polytrain.train.checkpoint import load_checkpoint

    (tmp_path / "study.toml").write_text(PBT_STUDY)
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "tune.json").read_text())
    assert summary["jobs"] == 6 and summary["lineage_replay"]["identical"] is True
    lineage = summary["lineage"]
    assert [e["level"] for e in lineage] == [1, 2, 3]
    exploited = [e for e in lineage if e["source"] is not None]
    trials = {t["number"]: t for t in summary["trials"]}
    for entry in exploited:  # the clone trains on with the source's seed and the explored hyper-parameters
        clone = trials[entry["trial"]]
        config = tomllib.loads((tmp_path / "s" / clone["directory"] / "config.toml").read_text())
        assert config["seed"] == trials[entry["source"]]["seed"]
    last = lineage[-1]
    state = load_checkpoint(tmp_path / "s" / f"trials/{last['trial']:04d}" / "checkpoint.pt")
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == pytest.approx(last["params"]["optimizer_args.momentum"])
    assert group["lr"] == pytest.approx(last["params"]["lr"])
    assert summary["confirmation"] is None and summary["total_seconds"] > 0


EVOLUTION_STUDY = """
model = "mlp"
dataset = "digits"
epochs = 1
batch_size = 64
optimizer = "momentum"
lr = 0.05
augment_shift = 0

[tune]
sampler = "evolution"
sampler_args = { population = 3, sample = 2 }
trials = 5
seed = 1
objective = ["final_test_accuracy", "parameters"]
confirm_seeds = 0

[tune.space]
"model_args.hidden" = { choice = [[8], [32], [8, 8], [32, 16]] }
lr = { choice = [0.02, 0.1] }
"""


def mlp_parameters(hidden: list[int]) -> int:
    widths = [64, *hidden, 10]  # digits: 8 x 8 inputs, 10 classes
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def test_regularized_evolution_searches_architectures_for_an_accuracy_size_front(tmp_path):
    (tmp_path / "study.toml").write_text(EVOLUTION_STUDY)
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "tune.json").read_text())
    trials = summary["trials"]
    assert summary["objectives"] == ["max:final_test_accuracy", "min:parameters"]
    for trial in trials:  # the size objective is the model's real parameter count
        assert trial["values"][1] == mlp_parameters(trial["params"]["model_args.hidden"])
    for child in trials[3:]:  # one dimension changed from a member of the 3 trials before it
        parents = trials[child["number"] - 3:child["number"]]
        assert any(sum(child["params"][k] != p["params"][k] for k in child["params"]) == 1 for p in parents)
    front = [trials[n] for n in summary["best"]]
    assert front
    for member in front:  # nothing on the front is dominated by another trial
        acc, size = member["values"]
        assert not any(t["values"][0] >= acc and t["values"][1] <= size and t["values"] != member["values"]
                       for t in trials)


def test_trials_may_be_multi_worker_runs_paused_and_continued(tmp_path):
    import torch

    from polytrain.train.result import max_weight_difference

    study = ASHA_STUDY.replace('epochs = 3', 'epochs = 2\nworkers = 2').replace('scheduler = "asha"', 'scheduler = "sh"') \
        .replace("trials = 3", "trials = 2").replace("eta = 3", "eta = 2")
    (tmp_path / "study.toml").write_text(study)
    assert main(["tune", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "tune.json").read_text())
    assert summary["jobs"] == 3
    winner = summary["trials"][summary["best"][0]]
    result = json.loads((tmp_path / "s" / winner["directory"] / "result.json").read_text())
    assert result["config"]["workers"] == 2 and result["comm"]["bytes_sent"] > 0
    reference = tmp_path / "reference"
    assert main(["train", "--config", str(tmp_path / "s" / winner["directory"] / "config.toml"), "--set",
                 "stop_at={}", "--out", str(reference)]) == 0
    paused = torch.load(tmp_path / "s" / winner["directory"] / "model.pt")
    assert max_weight_difference(paused, torch.load(reference / "model.pt")) == 0.0
