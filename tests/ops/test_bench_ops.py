"""The convolution algorithm finder, its statistics and its command line."""

from __future__ import annotations

import json

import pytest

from polytrain.bench.ops import TORCH, find_algorithms, parse_input_shape
from polytrain.bench.stats import median_ci
from polytrain.cli import main


def test_median_ci_takes_the_binomial_order_statistics():
    # n = 11: P(B <= 1) = 12/2048, so [x_(2), x_(10)] covers the median with 1 - 24/2048 >= 0.95, while
    # [x_(3), x_(9)] would cover it with only 1 - 2 * 67/2048 = 0.935.
    ci = median_ci([float(v) for v in (7, 1, 9, 3, 11, 5, 2, 10, 4, 8, 6)])
    assert (ci.median, ci.low, ci.high) == (6.0, 2.0, 10.0)
    assert ci.confidence == pytest.approx(1 - 24 / 2048)


def test_median_ci_of_few_samples_is_the_range_with_its_true_coverage():
    ci = median_ci([3.0, 1.0, 2.0])
    assert (ci.median, ci.low, ci.high) == (2.0, 1.0, 3.0)
    assert ci.confidence == pytest.approx(0.75)


def test_median_ci_rejects_no_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        median_ci([])


def test_finder_times_every_supporting_algorithm_on_each_distinct_convolution():
    results = find_algorithms("resnet20", (3, 8, 8), batch_size=1, repeats=1, warmup=0)
    # ResNet-20's 19 convolutions come in 6 configurations: the stem, 16->16 (x6), 16->32/2, 32->32 (x5),
    # 32->64/2 and 64->64 (x5).
    assert sum(len(result.layers) for result in results) == 19 and len(results) == 6
    strided = [result for result in results if result.config.stride == (2, 2)]
    assert len(strided) == 2
    for result in strided:
        assert set(result.times) == {TORCH, "direct", "fft", "im2col"}
        assert set(result.unsupported) == {"winograd2", "winograd4"}
    for result in results:
        assert result.fastest in result.times and result.fastest_ours != TORCH
        timing = result.times[TORCH]
        assert timing.ci_low_s <= timing.median_s <= timing.ci_high_s


def test_bench_ops_prints_json(capsys):
    argv = ["bench", "ops", "lenet5", "--input-shape", "1,28,28", "--repeats", "2", "--warmup", "0",
            "--forward-only", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pass"] == "forward" and report["input_shape"] == [1, 28, 28]
    assert [row["layers"] for row in report["layers"]] == [["0"], ["3"]]
    assert set(report["layers"][0]["unsupported"]) == {"winograd2", "winograd4"}  # LeNet's kernels are 5x5


def test_bench_ops_prints_a_table(capsys):
    assert main(["bench", "ops", "lenet5", "--input-shape", "1,12,12", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "im2col ms" in out and "fastest" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "ops", "resnet", "--repeats", "1"], "unknown model 'resnet'; available: "),
    (["bench", "ops", "lenet5", "--input-shape", "1x28x28"], "--input-shape must be positive integers"),
    (["bench", "ops", "mlp", "--repeats", "1"], "model mlp has no 2-D convolutions"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytrain: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_parse_input_shape():
    assert parse_input_shape("3,224,224") == (3, 224, 224)
    with pytest.raises(ValueError, match="got '3,0,2'"):
        parse_input_shape("3,0,2")
