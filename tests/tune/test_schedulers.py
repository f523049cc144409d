"""Samplers and schedulers on the replay test bed: learning curves recorded from real polytrain runs
(polytrain/tune/curves/digits_mlp.json), replayed in milliseconds with simulated time and workers."""

from __future__ import annotations

import math
import random

import pytest

from polytrain.config import ConfigError
from polytrain.tune import SearchSpace, TuneSpec, derive_seed
from polytrain.tune.replay import CURVES, CurveTable, simulate
from polytrain.tune.samplers import EvolutionSampler, History, RandomSampler, TPESampler, build_sampler, perturb
from polytrain.tune.schedulers import (WAIT, Asha, Hyperband, Job, PopulationBasedTraining, SuccessiveHalving, Trials,
                                       build_scheduler, rung_levels)

TABLE = CurveTable.load(CURVES / "digits_mlp.json")
SEED = lambda n: derive_seed(11, n)  # noqa: E731


def score_at(params: dict, epoch: int) -> float:
    return TABLE.curve(params)[epoch - 1]["score"]


def trials(limit: int, sampler=None) -> Trials:
    return Trials(sampler or RandomSampler(TABLE.space, SEED), limit)


def test_the_table_holds_real_curves():
    assert len(TABLE.curves) == 30 and "polytrain tune" in TABLE.made_by
    for curve in TABLE.curves.values():
        assert [row["epoch"] for row in curve] == list(range(1, 10))
        assert all(b["wall_s"] > a["wall_s"] for a, b in zip(curve, curve[1:]))
        assert all(0.0 <= row["score"] <= 1.0 for row in curve)


def test_rung_levels():
    assert rung_levels(1, 9, 3) == [1, 3, 9]
    assert rung_levels(1, 10, 3) == [1, 3, 9, 10]
    assert rung_levels(2, 9, 2) == [2, 4, 8, 9]


def test_successive_halving_promotes_the_best_third_at_each_rung():
    scheduler = SuccessiveHalving(trials(9), 9, [1, 3, 9], 3)
    sim = simulate(scheduler, TABLE, parallel=3)
    params = scheduler.trials.history.params
    by_level = {level: [j["trial"] for j in sim.jobs if j["level"] == level] for level in (1, 3, 9)}
    assert sorted(by_level[1]) == list(range(9))
    best_at_1 = sorted(range(9), key=lambda n: (-score_at(params[n], 1), n))[:3]
    assert sorted(by_level[3]) == sorted(best_at_1)
    assert by_level[9] == [max(best_at_1, key=lambda n: (score_at(params[n], 3), -n))]
    fifo_cost = sum(TABLE.curve(params[n])[-1]["wall_s"] for n in range(9))
    assert sim.cost_s < fifo_cost  # the stopped trials' epochs are saved, and counted where they ran


def test_asha_promotes_only_from_the_top_of_a_rung_and_never_twice():
    checked = []

    class Checked(Asha):
        def next_job(self):
            job = super().next_job()
            if isinstance(job, Job) and job.level > 1:  # a promotion: in the top third of its rung right now
                rung = self.rungs[self.levels.index(job.level) - 1]
                top = sorted(rung, key=lambda n: (-rung[n], n))[:len(rung) // self.eta]
                checked.append(job.trial in top)
            return job

    scheduler = Checked(trials(20), [1, 3, 9], 3)
    sim = simulate(scheduler, TABLE, parallel=4)
    seen: dict[float, dict[int, float]] = {1: {}, 3: {}, 9: {}}
    for job in sim.jobs:
        seen[job["level"]][job["trial"]] = job["score"]
    assert checked and all(checked)
    assert len(seen[1]) == 20 and 1 <= len(seen[9]) <= len(seen[3]) < 20
    assert set(seen[9]) <= set(seen[3]) <= set(seen[1])
    promoted = [j["trial"] for j in sim.jobs if j["level"] == 3]
    assert len(promoted) == len(set(promoted))
    assert sim.incumbent and sim.best == max(seen[9].values())


def test_hyperband_runs_its_brackets():
    scheduler = Hyperband(trials(17 + 9), 1, 9, 3)
    assert [(b.n, b.levels) for b in scheduler.brackets] == [(9, [1, 3, 9]), (5, [3, 9]), (3, [9])]
    sim = simulate(scheduler, TABLE, parallel=2)
    assert len(scheduler.trials.history.params) == 17 + 9  # a second pass begins while trials are left
    assert sum(j["level"] == 9 for j in sim.jobs) == 1 + 1 + 3 + 1


def test_a_replayed_search_is_the_same_every_time():
    def run():
        spec_trials = trials(12, TPESampler(TABLE.space, SEED, lag=1, startup=4))
        return simulate(Asha(spec_trials, [1, 3, 9], 3), TABLE, parallel=2).jobs

    assert run() == run()


def test_tpe_sees_only_the_trials_finished_lag_before():
    sampler = TPESampler(TABLE.space, SEED, lag=2, startup=3)
    history = History()
    rng = random.Random(0)
    for n in range(8):
        history.params[n] = TABLE.space.sample(rng)
    history.scores.update({n: score_at(history.params[n], 3) for n in range(6)})
    first = sampler.params(8, history)
    history.scores[7] = 0.99  # a trial still in flight when trial 8 was asked finishes
    assert sampler.params(8, history) == first
    assert sampler.params(9, history) is None  # trial 6 has not finished
    assert set(first) == {d.key for d in TABLE.space.dimensions}


def test_tpe_beats_random_on_the_replayed_curves_over_search_seeds():
    def best(sampler_name: str, seed: int) -> float:
        seed_of = lambda n: derive_seed(seed, n)  # noqa: E731
        sampler = build_sampler(sampler_name, TABLE.space, seed_of, lag=0, grid_points=3,
                                args={"startup": 5} if sampler_name == "tpe" else {})
        return simulate(build_scheduler("fifo", {}, Trials(sampler, 12), TABLE.space, 9, seed), TABLE).best

    tpe = sorted(best("tpe", s) for s in range(7))
    rand = sorted(best("random", s) for s in range(7))
    assert tpe[3] >= rand[3]  # medians over 7 search seeds, 12 trials each


def test_regularized_evolution_mutates_one_dimension_of_a_recent_tournament_winner():
    sampler = EvolutionSampler(TABLE.space, SEED, lag=0, population=5, sample=2)
    history = History()
    for n in range(12):
        history.params[n] = sampler.params(n, history)
        history.scores[n] = score_at(history.params[n], 9)
    for n in range(5, 12):
        child = history.params[n]
        parents = [history.params[m] for m in range(n - 5, n)]
        assert any(sum(child[k] != p[k] for k in child) == 1 for p in parents)
    with pytest.raises(ConfigError, match="sample <= population"):
        EvolutionSampler(TABLE.space, SEED, lag=0, population=2, sample=3)


def test_pbt_exploits_the_best_and_records_the_lineage():
    space = SearchSpace.parse({"lr": {"loguniform": [0.001, 0.5]}})
    scheduler = PopulationBasedTraining(Trials(RandomSampler(space, SEED), 4), space, 4, 1, 3, seed=5)
    first = [scheduler.ask() for _ in range(4)]
    assert scheduler.ask() == WAIT and all(j.level == 1 and j.source is None for j in first)
    for job, score in zip(first, (0.5, 0.9, 0.2, 0.7)):
        scheduler.tell(job, score)
    second = [scheduler.ask() for _ in range(4)]
    exploit = [j for j in second if j.source is not None]
    assert len(exploit) == 1 and exploit[0].trial == 2 and exploit[0].source == 1 and exploit[0].source_level == 1
    assert second[0] is exploit[0]  # copies are made before any trial trains on
    assert exploit[0].params != first[1].params and 0.001 <= exploit[0].params["lr"] <= 0.5
    assert all(j.params == first[j.trial].params for j in second if j.source is None)
    for job in second:
        scheduler.tell(job, 1.0 if job.trial == 2 else 0.1)
    third = [scheduler.ask() for _ in range(4)]
    assert scheduler.ask() == WAIT
    for job in third:
        scheduler.tell(job, 1.0 if job.trial == 2 else 0.1)
    assert scheduler.ask() is None
    chain = scheduler.ancestry(2)
    assert [(e["trial"], e["level"], e["source"]) for e in chain] == [(1, 1, None), (2, 2, 1), (2, 3, None)]


def test_perturb_stays_in_the_space():
    space = SearchSpace.parse({"lr": {"loguniform": [0.01, 0.1]}, "optimizer_args.momentum": {"choice": [0.0, 0.5, 0.9]},
                               "n": {"int": [1, 4]}})
    rng = random.Random(3)
    params = {"lr": 0.1, "optimizer_args.momentum": 0.9, "n": 4}
    for _ in range(50):
        params = perturb(space, params, rng)
        assert 0.01 <= params["lr"] <= 0.1 and params["optimizer_args.momentum"] in (0.0, 0.5, 0.9)
        assert params["n"] in (1, 2, 3, 4)


BASE = {"model": "mlp", "dataset": "digits", "epochs": 4}


@pytest.mark.parametrize("table, message", [
    ({"scheduler": "fast"}, "unknown scheduler 'fast'"),
    ({"scheduler": "asha", "scheduler_args": {"eta": 1}}, "eta >= 2"),
    ({"scheduler": "asha", "scheduler_args": {"rate": 2}}, "no argument 'rate'"),
    ({"scheduler": "pbt", "space": {"batch_size": {"choice": [32, 64]}}}, "pbt changes hyper-parameters"),
    ({"scheduler": "pbt", "resource": "wall_s", "budget": 10}, "generations are in epochs"),
    ({"resource": "seconds"}, "resource must be one of"),
    ({"budget": 9}, "more than the base's epochs"),
    ({"resource": "wall_s"}, "budget"),
    ({"sampler": "evolution", "sampler_args": {"population": 2, "sample": 3}}, "sample <= population"),
    ({"sampler": "tpe", "sampler_args": {"warm": 2}}, "no argument 'warm'"),
])
def test_bad_tune_settings_fail_in_one_line(table, message):
    full = {"sampler": "random", "trials": 4, "space": {"lr": {"loguniform": [0.01, 0.1]}}, **table}
    with pytest.raises(ConfigError, match=message) as error:
        TuneSpec.parse(BASE, full)
    assert "\n" not in str(error.value)


def test_fifo_gives_every_trial_the_whole_budget():
    spec = TuneSpec.parse(BASE, {"sampler": "random", "trials": 3, "space": {"lr": {"loguniform": [0.01, 0.1]}}})
    scheduler = spec.build()
    jobs = [scheduler.ask() for _ in range(3)]
    assert all(isinstance(j, Job) and j.level == 4 for j in jobs) and scheduler.ask() == WAIT
    for job in jobs:
        scheduler.tell(job, -math.inf)  # failed trials end the study too
    assert scheduler.ask() is None
