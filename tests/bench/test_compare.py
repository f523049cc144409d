"""`polytrain compare` and `polytrain report`: the matrix, real runs with their baseline, resume, failed runs,
per-seed speed-ups, guardrails, the stopping rule, and the report rendered in a real browser."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest

from polytrain.bench.compare import (Stat, build_matrix, compare, load_matrix, run_dir, summarize)
from polytrain.bench.report import alpha_beta_bound, write_report
from polytrain.cli import main
from polytrain.train.result import load_weights, max_weight_difference

# Real 8x8 digits, a small MLP, 2 epochs: a run takes a few seconds.
BASE = ["--model", "mlp", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
        "--optimizer", "momentum", "--target", "0.8", "--set", "augment_shift=0", "--set", "schedule=constant"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare") / "ring"
    code = main(["compare", *BASE, "--workers", "2", "--strategy", "allreduce:algorithm=ring", "--seeds", "2",
                 "--out", str(root)])
    assert code == 0
    return root


def test_the_matrix_crosses_every_axis_and_adds_one_baseline_per_varied_setting():
    matrix = build_matrix({"model": "mlp", "dataset": "digits"},
                          {"strategies": ["allreduce", "local_sgd:period=4"], "workers": [2, 4],
                           "vary": {"lr": [0.05, 0.1]}, "seeds": 3})
    parallel = [cell for cell in matrix.cells if not cell.baseline]
    baselines = [cell for cell in matrix.cells if cell.baseline]
    assert len(parallel) == 2 * 2 * 2 and len(baselines) == 2
    assert {json.dumps(c.vary) for c in baselines} == {json.dumps(c.vary) for c in parallel}
    assert all(c.settings["workers"] == 1 and c.settings["strategy"] is None for c in baselines)
    assert len({cell.key for cell in matrix.cells}) == len(matrix.cells)
    runs = matrix.runs()
    assert sorted((c.key, s) for c, s in runs) == sorted((c.key, s) for c in matrix.cells for s in range(3))
    assert [(c.key, s) for c, s in runs] == [(c.key, s) for c, s in matrix.runs()]  # seeded: the same order again
    other = build_matrix({"model": "mlp", "dataset": "digits"}, {"strategies": ["allreduce", "local_sgd:period=4"],
                         "workers": [2, 4], "vary": {"lr": [0.05, 0.1]}, "seeds": 3, "order_seed": 1})
    assert [(c.key, s) for c, s in other.runs()] != [(c.key, s) for c, s in runs]
    compressed = build_matrix({"model": "mlp", "dataset": "digits"}, {"workers": [2], "compressors": ["none", "fp16"]})
    assert [c.label for c in compressed.cells] == ["1 worker (baseline)", "2 workers, uncompressed", "2 workers, fp16"]


@pytest.mark.parametrize("axes, message", [
    ({"strategy": ["allreduce"]}, "unknown axis strategy"),
    ({"strategies": ["nonsense"]}, "nonsense"),
    ({"workers": [2], "bandwidths": ["fast"]}, "bandwidth 'fast'"),
    ({"seeds": 0}, "seeds must be"),
    ({"vary": {"lr": 0.1}}, "vary must be a table"),
])
def test_a_bad_matrix_fails_in_one_line_before_any_run(axes, message):
    with pytest.raises(ValueError, match=message):  # ConfigError among them
        build_matrix({"model": "mlp", "dataset": "digits"}, axes)


def test_bad_compare_flags_exit_with_one_line(tmp_path, capsys):
    assert main(["compare", "--model", "mlp", "--strategy", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert main(["compare", "--model", "mlp", "--ci-within", "5", "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("polytrain: error:") for line in errors)
    assert not (tmp_path / "x" / "runs").exists()


def test_every_run_is_kept_and_the_parallel_run_equals_its_single_worker_baseline(compared):
    matrix = load_matrix(compared)
    baseline = next(c for c in matrix.cells if c.baseline)
    ring = next(c for c in matrix.cells if not c.baseline)
    for seed in (0, 1):
        for cell in (baseline, ring):
            directory = run_dir(compared, cell, seed)
            assert {"config.toml", "log.txt", "result.json", "metrics.jsonl"} <= {p.name for p in directory.iterdir()}
            assert json.loads((directory / "result.json").read_text())["config"]["seed"] == seed
        # 2 workers with global batch 64 end where 1 worker with batch 64 ends: the baseline is the same code
        assert max_weight_difference(load_weights(run_dir(compared, ring, seed)),
                                     load_weights(run_dir(compared, baseline, seed))) <= 1e-5


def test_speedups_are_per_seed_against_the_baseline_and_accuracy_stands_beside_them(compared):
    matrix = load_matrix(compared)
    summary = summarize(compared, matrix)
    baseline = next(c for c in matrix.cells if c.baseline)
    ring = next(c for c in matrix.cells if not c.baseline)

    def result(cell, seed):
        return json.loads((run_dir(compared, cell, seed) / "result.json").read_text())

    rates = [result(ring, s)["samples_per_s"] / result(baseline, s)["samples_per_s"] for s in (0, 1)]
    stat = summary.cells[ring.key].speedup["samples_per_s"]
    assert stat.median == pytest.approx(sorted(rates)[0] / 2 + sorted(rates)[1] / 2)
    assert (stat.low, stat.high) == pytest.approx((min(rates), max(rates)))
    times = [result(baseline, s)["time_to_target_s"] / result(ring, s)["time_to_target_s"] for s in (0, 1)]
    assert summary.cells[ring.key].speedup["time_to_target"].median == pytest.approx(sum(times) / 2)
    assert any("2 seed(s) < 5" in flag for flag in summary.cells[ring.key].flags)
    rows = list(csv.DictReader((compared / "summary.csv").open()))
    assert [row["cell"] for row in rows] == [c.label for c in matrix.cells]
    for row in rows:  # no speed-up without the accuracy beside it
        assert float(row["final_test_accuracy_median"]) > 0.8
    markdown = (compared / "summary.md").read_text()
    assert "speed-up to target" in markdown and "test acc" in markdown


def test_a_second_call_resumes_finished_runs_and_reruns_a_failed_one(compared, tmp_path, capsys):
    root = tmp_path / "resumed"
    shutil.copytree(compared, root)
    matrix = load_matrix(root)
    ring = next(c for c in matrix.cells if not c.baseline)
    kept = {c.key: (run_dir(root, c, 0) / "result.json").stat().st_mtime_ns for c in matrix.cells}
    (run_dir(root, ring, 1) / "result.json").unlink()  # as a run that died leaves its directory
    capsys.readouterr()
    assert main(["compare", *BASE, "--workers", "2", "--strategy", "allreduce:algorithm=ring", "--seeds", "2",
                 "--out", str(root)]) == 0
    output = capsys.readouterr().out
    assert output.count("[run ") == 1 and "[run 1/1]" in output  # only the one without a result ran again
    assert {c.key: (run_dir(root, c, 0) / "result.json").stat().st_mtime_ns for c in matrix.cells} == kept
    assert (run_dir(root, ring, 1) / "result.json").exists()
    assert run_dir(root, ring, 1).with_name("seed-1.failed-1").is_dir()  # the earlier attempt is kept
    assert main(["compare", *BASE, "--epochs", "3", "--workers", "2", "--out", str(root)]) == 2  # other settings


def test_a_failed_run_counts_as_never_reaching_the_target(tmp_path):
    root = tmp_path / "failing"
    assert main(["compare", *BASE, "--workers", "2", "--fault", "kill:rank=1,step=2", "--seeds", "1",
                 "--out", str(root)]) == 0
    matrix = load_matrix(root)
    summary = summarize(root, matrix)
    killed = summary.cells[next(c for c in matrix.cells if not c.baseline).key]
    assert [run["ok"] for run in killed.runs] == [False]
    assert json.loads((root / killed.runs[0]["dir"] / "failed.json").read_text())["exit"] != 0
    assert math.isinf(killed.stats["time_to_target_s"].median)
    assert killed.speedup["time_to_target"].median == 0.0
    assert any("1 run(s) failed" in flag for flag in killed.flags)
    baseline = summary.cells[next(c for c in matrix.cells if c.baseline).key]
    assert [run["ok"] for run in baseline.runs] == [True]  # the baseline drops the parallel settings, faults too


def test_the_stopping_rule_adds_seeds_until_the_ci_is_narrow(tmp_path):
    # A stand-in runner writes the results (the rule, not training, is under test): the cell's times spread
    # until seed 5, then agree, so its CI narrows once the order statistics pass the early outliers.
    times = {0: 10.0, 1: 20.0, 2: 10.5, 3: 10.2, 4: 10.1, 5: 10.3, 6: 10.2, 7: 10.4, 8: 10.3, 9: 10.2}

    def runner(matrix, cell, seed, root, progress, timeout):
        directory = run_dir(root, cell, seed)
        directory.mkdir(parents=True, exist_ok=True)
        value = 5.0 if cell.baseline else times[seed]
        (directory / "result.json").write_text(json.dumps({
            "time_to_target_s": value, "wall_s": value, "samples_per_s": 100 / value, "final_test_accuracy": 0.9,
            "best_test_accuracy": 0.9, "final_test_metric": 0.9, "metric": "accuracy", "steps": 1, "epochs": [],
            "comm": {"bytes_sent_per_step": 0}, "dataset": {"synthetic": False}, "config": {"workers": 1}}))
        return True

    matrix = build_matrix({"model": "mlp", "dataset": "digits", "target": 0.8}, {"workers": [2], "seeds": 2})
    summary = compare(matrix, tmp_path, ci_within=0.05, max_seeds=10, runner=runner)
    cell = next(s for s in summary.cells.values() if not s.cell.baseline)
    assert cell.within(0.05)
    seeds = json.loads((tmp_path / "matrix.json").read_text())["seeds"]
    assert 2 < len(seeds) < 10 and len(cell.runs) == len(seeds)
    smaller = Stat.of([times[s] for s in seeds[:-1]])
    assert (smaller.high - smaller.low) / 2 > 0.05 * smaller.median  # one seed fewer was not yet within


def test_staleness_histograms_add_up_over_seeds_into_the_summary(tmp_path):
    # A stand-in runner writes the results: parameter-server runs report their staleness histogram.
    histograms = {0: {"0": 6, "1": 3}, 1: {"0": 4, "2": 1}}

    def runner(matrix, cell, seed, root, progress, timeout):
        directory = run_dir(root, cell, seed)
        directory.mkdir(parents=True, exist_ok=True)
        comm = {"bytes_sent_per_step": 0} | ({} if cell.baseline else {"staleness": {"histogram": histograms[seed]}})
        (directory / "result.json").write_text(json.dumps({
            "time_to_target_s": None, "wall_s": 1.0, "samples_per_s": 10.0, "final_test_accuracy": 0.9,
            "best_test_accuracy": 0.9, "final_test_metric": 0.9, "metric": "accuracy", "steps": 1, "epochs": [],
            "comm": comm, "dataset": {"synthetic": True}, "config": {"workers": 1}}))
        return True

    matrix = build_matrix({"model": "mlp", "dataset": "digits"}, {"workers": [2], "seeds": 2})
    summary = compare(matrix, tmp_path, runner=runner)
    cell = next(s for s in summary.cells.values() if not s.cell.baseline)
    assert cell.staleness == {"0": 10, "1": 3, "2": 1}
    row = next(r for r in csv.DictReader((tmp_path / "summary.csv").open()) if r["cell"] == cell.cell.label)
    assert json.loads(row["staleness"]) == {"0": 10, "1": 3, "2": 1}
    assert "staleness max 2, mean 0.36" in (tmp_path / "summary.md").read_text()
    assert any("synthetic data" in flag for flag in summary.flags)
    assert any("no target set" in flag for flag in summary.flags)


def test_the_olympic_mean_drops_the_best_and_the_worst_from_five_runs():
    assert Stat.of([1.0, 2.0, 3.0, 4.0]).olympic is None
    assert Stat.of([9.0, 1.0, 2.0, 3.0, 100.0]).olympic == pytest.approx((2 + 3 + 9) / 3)


def test_the_alpha_beta_bound_is_the_survey_formula():
    # T1 = 1 s on 4 workers with 1 MB sent per step at 1 GB/s and 10 messages of 1 ms: 1 / (0.25 + 0.01 + 0.001)
    assert alpha_beta_bound(1.0, 4, 1e6, 10, 1e-4, 1e-9) == pytest.approx(1 / 0.252)
    assert alpha_beta_bound(1.0, 4, 0, 0, 1e-4, 1e-9) == pytest.approx(4.0)


def test_the_report_holds_every_plot_and_table_in_html_and_markdown(compared):
    html_path, md_path = write_report(compared)
    page = html_path.read_text()
    for name in ("scaling", "accuracy", "target", "bytes", "steps"):
        assert f"<figure id='{name}'><img" in page
        assert (compared / "report" / f"{name}.png").stat().st_size > 1000
        assert f"](report/{name}.png)" in md_path.read_text()
    assert "src='http" not in page and page.count("data:image/png;base64,") == 5  # self-contained
    assert '<table id="summary">' in page and '<table id="manifests">' in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("POLYTRAIN_REQUIRE_BROWSER"),
                    reason="no chromium here (.ci/run installs it and sets POLYTRAIN_REQUIRE_BROWSER)")
def test_the_report_renders_in_headless_chromium_with_every_image_loaded(compared, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "chromium is missing: apt-get install chromium"
    html_path, _ = write_report(compared)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(html_path.resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            summary_rows = page.locator("#summary tbody tr").count()
            manifest_rows = page.locator("#manifests tbody tr").count()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == 5 and all(done and width > 100 and height > 100 for done, width, height in images)
    assert summary_rows == 2 and manifest_rows == 4
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_the_demo_has_the_baseline_and_one_strategy_of_each_family():
    from polytrain.bench.demo import demo_matrix

    matrix = demo_matrix()
    settings = [cell.settings for cell in matrix.cells if not cell.baseline]
    assert sum(cell.baseline for cell in matrix.cells) == 1
    assert {s.get("strategy") for s in settings} == {"allreduce", "local_sgd", "ps", None}  # None: the pipeline's
    assert any(s.get("compressor") for s in settings) and any(s.get("mesh", {}).get("pp", 1) > 1 for s in settings)
    assert {s["strategy_args"]["algorithm"] for s in settings if s.get("strategy") == "allreduce"} >= {"ring", "central"}


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_writes_its_report(tmp_path):
    from polytrain.bench.demo import run_demo

    page = run_demo(epochs=1, out=tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert page.exists() and all(run["ok"] for cell in summary["cells"] for run in cell["runs"])


def test_a_bandwidth_cell_runs_on_the_emulated_cluster(tmp_path):
    from polytrain.launch.cluster import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no emulated cluster on this machine: {reason}")
    root = tmp_path / "cluster"
    assert main(["compare", *BASE, "--epochs", "1", "--workers", "2", "--bandwidth", "1gbit", "--seeds", "1",
                 "--out", str(root)]) == 0
    matrix = load_matrix(root)
    (cell,) = [c for c in matrix.cells if not c.baseline]
    result = json.loads((run_dir(root, cell, 0) / "result.json").read_text())
    assert cell.bandwidth == "1gbit" and result["environment"]["network"].startswith("emulated cluster: 2 hosts")
    baseline = next(c for c in matrix.cells if c.baseline)
    assert max_weight_difference(load_weights(run_dir(root, cell, 0)), load_weights(run_dir(root, baseline, 0))) <= 1e-5
