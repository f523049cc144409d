"""`polytrain cost`: the table, the JSON contract of DESIGN.md Sec. 4, metaparameters and bad input."""

from __future__ import annotations

import json

import pytest

from polytrain.cli import main

CONTRACT_TOTALS = {"params", "macs_forward", "flops_forward", "flops_backward", "weight_bytes", "activation_bytes",
                   "training_memory_bytes", "work", "depth"}


def test_table_lists_every_layer_and_the_totals(capsys):
    assert main(["cost", "resnet20"]) == 0
    out = capsys.readouterr().out
    header, *rest = out.splitlines()
    assert header.split()[:4] == ["layer", "type", "output", "params"]
    assert any(line.startswith("layer1.0.add ") for line in rest)
    assert "parameters |W|                269,722" in out
    assert "data/weight ratio" in out and "training memory (peak)" in out and "average parallelism" in out


def test_json_follows_the_contract(capsys):
    assert main(["cost", "lenet5", "--batch-size", "4", "--json", "--optimizer", "adam"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"model", "input_shape", "batch_size", "layers", "total"} <= result.keys()
    assert CONTRACT_TOTALS <= result["total"].keys()
    assert (result["model"], result["input_shape"], result["batch_size"]) == ("lenet5", [1, 32, 32], 4)
    assert result["total"]["params"] == 61_706 and result["total"]["macs_forward"] == 416_520
    assert result["total"]["optimizer_state_bytes"] == 2 * 61_706 * 4 + 10 * 4  # two moments, ten step counters
    first = result["layers"][0]
    assert (first["name"], first["kind"], first["output_shape"]) == ("0", "Conv2d", [4, 6, 28, 28])


def test_set_passes_model_metaparameters(capsys):
    main(["cost", "squeezenet1_0", "--json"])
    default = json.loads(capsys.readouterr().out)["total"]["params"]
    main(["cost", "squeezenet1_0", "--set", "sr=0.25", "--json"])
    assert json.loads(capsys.readouterr().out)["total"]["params"] > default == 1_248_424


def test_input_shape_and_classes_override_the_natural_input(capsys):
    main(["cost", "resnet18", "--input-shape", "3,32,32", "--num-classes", "10", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["input_shape"] == [3, 32, 32] and result["layers"][-1]["output_shape"] == [1, 10]


@pytest.mark.parametrize("argv, message", [
    (["cost", "resnet"], "unknown model 'resnet'; available: "),
    (["cost", "lenet5", "--input-shape", "3,x,2"], "--input-shape '3,x,2': expected positive integers"),
    (["cost", "lenet5", "--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'; available: adagrad, adam"),
    (["cost", "lenet5", "--dtype", "int8"], "unknown dtype 'int8'; available: float32"),
    (["cost", "lenet5", "--batch-size", "0"], "batch size must be an integer >= 1; got 0"),
    (["cost", "mlp", "--set", "hiden=3"], "model mlp has no metaparameter 'hiden'; valid: hidden"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytrain: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
