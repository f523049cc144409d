"""Tensor parallelism against its references: every split layer's forward and backward (linear layers by
columns and rows, convolutions by filters and input channels, dropout between them) against the unsplit
layer (float64, 1e-10) on 1..4 ranks; whole runs with tp = 2 (both plans), tp = 4 and dp 2 x tp 2 against one
worker with the same microbatches (DESIGN.md section 8); the counted bytes against the Megatron pairing's two
allreduces per pair; the consolidated model.pt and an exact resume; plans and bad meshes.

The split layers share one spawn of 4 ranks (every sub-world); the runs of 2 and of 4 ranks one each.
"""

import shutil

import pytest
import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.config import ConfigError, Experiment
from polytrain.launch import run_on_every_world_size
from polytrain.models import build_model
from polytrain.parallel.tensor import ColumnParallel, Pair, RowParallel, check_plan, plan
from polytrain.train import train, train_sequence
from polytrain.train.defaults import resolve
from polytrain.train.result import load_weights, max_weight_difference

RING = ALLREDUCE_ALGORITHMS.get("ring")
# Digits at batch 48, momentum SGD at a constant rate (the same for 1 and 2 epochs, so a 1-epoch run continues
# the 2-epoch one): 30 steps an epoch (1438 training samples, 359 test samples).
DIGITS = Experiment(model="lenet5", dataset="digits", epochs=1, batch_size=48, optimizer="momentum", lr=0.05,
                    schedule="constant", augment_shift=0, threads=1)


def stack() -> nn.Module:
    """Two Megatron pairs (dropout between the first), a whole classifier; 24 features divide by 1..4."""
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 12), nn.Tanh(),
                         nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12), nn.Linear(12, 6)).double()


def conv_stack() -> nn.Module:
    """Filters then input channels, filters flattened into a linear layer's split inputs (through pools and
    a dropout), then a linear pair: the plan conv+linear splits all six layers."""
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(12, 12, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(12, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(96, 24), nn.ReLU(), nn.Linear(24, 12), nn.Tanh(),
                         nn.Linear(12, 6)).double()


def split_against_whole(comm):
    """Rank's side: each split stack's output, input gradient and this rank's shard of every gradient
    against the unsplit stack's, both in training mode from the same random state."""
    return max(split_error(comm, stack, (5, 12), "linear"), split_error(comm, conv_stack, (5, 3, 8, 8), "conv+linear"))


def split_error(comm, build, shape, plan_name):
    from polytrain.parallel.tensor import split_model

    torch.manual_seed(0)
    whole, x = build(), torch.randn(*shape, dtype=torch.float64)
    split = build()
    split.load_state_dict(whole.state_dict())
    split_model(split, comm, plan_name)
    errors = []
    outputs = []
    for model in (whole, split):
        torch.manual_seed(1)  # the dropout masks
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        (out * torch.arange(out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outputs.append((out.detach(), inputs.grad))
    errors.append((outputs[0][0] - outputs[1][0]).abs().max().item())
    errors.append((outputs[0][1] - outputs[1][1]).abs().max().item())
    modules = dict(whole.named_modules())
    for name, module in split.named_modules():
        reference = modules[name]
        if isinstance(module, ColumnParallel):
            rows = slice(comm.rank * module.weight.shape[0], (comm.rank + 1) * module.weight.shape[0])
            errors.append((module.weight.grad - reference.weight.grad[rows]).abs().max().item())
            errors.append((module.bias.grad - reference.bias.grad[rows]).abs().max().item())
        elif isinstance(module, RowParallel):
            columns = slice(comm.rank * module.weight.shape[1], (comm.rank + 1) * module.weight.shape[1])
            errors.append((module.weight.grad - reference.weight.grad[:, columns]).abs().max().item())
            errors.append((module.bias.grad - reference.bias.grad).abs().max().item())
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            errors.append((module.weight.grad - reference.weight.grad).abs().max().item())
    assert sum(isinstance(m, (ColumnParallel, RowParallel)) for m in split.modules()) == \
        sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in whole.modules()) - (build is stack)
    return max(errors)


def test_split_layers_equal_the_unsplit_ones_forward_and_backward():
    # Columns, rows, the dropout between them and the whole classifier, on 1, 2, 3 and 4 ranks.
    outcomes = run_on_every_world_size(split_against_whole, 4, timeout_s=60)
    for p, errors in outcomes.items():
        assert max(errors) <= 1e-10, p


def test_the_plan_pairs_layers_through_element_wise_modules():
    assert plan(stack()) == [Pair("0", ("1", "2"), "3"), Pair("5", ("6",), "7")]
    assert plan(conv_stack(), "conv+linear") == [Pair("0", ("1", "2"), "3"), Pair("5", ("6", "7", "8", "9"), "10"),
                                                 Pair("12", ("13",), "14")]
    assert plan(conv_stack()) == [Pair("10", ("11",), "12")]  # the default plan splits linear layers only
    alexnet = build_model("alexnet", 10, (3, 32, 32))
    # Small-input AlexNet: conv 3->64 | conv 64->192, conv 192->384 | conv 384->256, conv 256->256 | (pools,
    # flatten, dropout) fc 256->512, fc 512->512 | fc 512->10: every layer split.
    assert [(p.column, p.row) for p in plan(alexnet, "conv+linear")] == [("0", "3"), ("6", "8"), ("10", "16"),
                                                                        ("19", "21")]
    assert [(p.column, p.row) for p in plan(alexnet)] == [("16", "19")]
    with pytest.raises(ValueError, match="unknown tp plan 'rows'; available: linear, conv\\+linear"):
        plan(stack(), "rows")
    lenet = build_model("lenet5", 10, (1, 8, 8))
    assert [(p.column, p.row) for p in plan(lenet)] == [("7", "9")]  # 400 -> 120 -> 84; the classifier whole
    with pytest.raises(ValueError, match="tp 7 does not divide the 120 output features of linear layer 7 "
                                         "\\(split by columns, feeding 9\\)"):
        check_plan(lenet, 7)
    with pytest.raises(ValueError, match="tp 2 splits pairs of consecutive layers"):
        check_plan(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)), 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tp")
    two = {"tp 2": DIGITS.replace(workers=2, mesh={"tp": 2}, epochs=2),
           "tp 2 cut": DIGITS.replace(workers=2, mesh={"tp": 2}),
           "tp 2 conv+linear": DIGITS.replace(workers=2, mesh={"tp": 2}, tp_plan="conv+linear")}
    four = {"tp 4": DIGITS.replace(workers=4, mesh={"tp": 4}),
            "dp 2 x tp 2": DIGITS.replace(workers=4, mesh={"dp": 2, "tp": 2})}
    out = {key: str(directory / key.replace(" ", "_")) for key in {**two, **four}}
    results = {}
    for group in (two, four):
        experiments = [exp.replace(out=out[key]) for key, exp in group.items()]
        results.update(zip(group, train_sequence(experiments)))
    out["tp 2 resumed"] = str(directory / "tp_2_resumed")
    shutil.copytree(out["tp 2 cut"], out["tp 2 resumed"])  # the cut's own directory stays the 1-epoch run
    results["tp 2 resumed"] = train(two["tp 2"].replace(out=out["tp 2 resumed"]), resume=out["tp 2 resumed"])
    for key, microbatches in (("1 microbatch", 1), ("2 microbatches", 2)):
        out[key] = str(directory / key.replace(" ", "_"))
        results[key] = train(DIGITS.replace(workers=1, microbatches=microbatches, out=out[key]))
    return results, out


@pytest.mark.parametrize("run, reference", [("tp 2 cut", "1 microbatch"), ("tp 4", "1 microbatch"),
                                            ("tp 2 conv+linear", "1 microbatch"), ("dp 2 x tp 2", "2 microbatches")])
def test_a_tensor_parallel_run_equals_one_worker(runs, run, reference):
    results, out = runs
    assert max_weight_difference(load_weights(out[run]), load_weights(out[reference])) <= 1e-5
    assert results[run].final_test_accuracy == pytest.approx(results[reference].final_test_accuracy, abs=2e-3)
    assert results[run].epochs[0]["train_loss"] == pytest.approx(results[reference].epochs[0]["train_loss"],
                                                                 rel=1e-5)


def test_tensor_parallel_bytes_are_two_allreduces_per_pair(runs):
    # LeNet-5's pair is 400 -> 120 (columns) -> 84 (rows): each step one allreduce of the rows' (b, 84)
    # partial outputs forward and one of the columns' (b, 400) input gradient backward, b the replica's
    # samples; evaluation's forward sums are bookkeeping.
    results, _ = runs
    global_batches = [48] * 29 + [1438 - 29 * 48]
    for run, dp, tp in (("tp 2 cut", 1, 2), ("tp 4", 1, 4), ("dp 2 x tp 2", 2, 2)):
        for stats in results[run].comm["per_rank"]:
            rank = stats["rank"] % tp  # the coordinate on tp, the fastest axis
            expected = sum(RING.bytes_sent(4 * (g // dp) * 84, tp, rank, 4) + RING.bytes_sent(4 * (g // dp) * 400, tp,
                                                                                               rank, 4)
                           for g in global_batches)
            assert stats["by_axis"]["tp"] == {"allreduce:ring": expected}, (run, stats["rank"])


def test_a_resumed_tensor_parallel_run_equals_the_uninterrupted_one(runs):
    # The checkpoint holds the unsplit model and every rank's optimizer state of its shards.
    results, out = runs
    assert max_weight_difference(load_weights(out["tp 2 resumed"]), load_weights(out["tp 2"])) == 0
    assert [row["test_loss"] for row in results["tp 2 resumed"].epochs] == [row["test_loss"] for row in
                                                                            results["tp 2"].epochs]


def test_settings_tp_cannot_take_are_refused_before_any_worker_starts():
    with pytest.raises(ConfigError, match="--grad-clip clips the norm of the whole gradient, but with tp 2"):
        resolve(DIGITS.replace(workers=2, mesh={"tp": 2}, grad_clip=1.0))
    with pytest.raises(ConfigError, match="unknown tp plan 'rows'; available: linear, conv\\+linear"):
        resolve(DIGITS.replace(workers=2, mesh={"tp": 2}, tp_plan="rows"))
