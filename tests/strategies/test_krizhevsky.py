"""Krizhevsky's hybrid (`--strategy krizhevsky`: data-parallel convolutions, model-parallel fully connected
layers, the batch exchanged at the boundary) against its references: whole runs of 2 and 4 ranks against one
worker with the same microbatches (DESIGN.md section 8), on LeNet-5 / digits and on small-input AlexNet, whose
fully connected part has two dropouts, on synthetic data; the counted bytes of every step against the analytic
formula; the unsplit model.pt and an exact resume; bad settings in one line before any worker starts.

Three spawns: the runs of 2 ranks, those of 4, and the resumed run with the uninterrupted one.
"""

import json
import shutil

import pytest
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import all_gather_bytes_sent
from polytrain.config import Experiment
from polytrain.models import build_model
from polytrain.parallel.hybrid import boundary
from polytrain.parallel.tensor import plan
from polytrain.train import train, train_sequence
from polytrain.train.result import load_weights, max_weight_difference

RING = ALLREDUCE_ALGORITHMS.get("ring")
KRIZHEVSKY = dict(strategy="krizhevsky", strategy_args={"algorithm": "ring"})
# Digits at batch 48, momentum SGD at a constant rate: 30 steps (1438 training samples, the last batch 46),
# 359 test samples.
DIGITS = Experiment(model="lenet5", dataset="digits", epochs=1, batch_size=48, optimizer="momentum", lr=0.05,
                    schedule="constant", augment_shift=0, threads=1)
# Small-input AlexNet (dropout, fc 256 -> 512, ReLU, dropout, fc 512 -> 512 | fc 512 -> 10) on 125 training
# samples (4 steps, the last batch 29) and 3 test samples: on 4 ranks one replica's test share is empty, so its
# evaluation only answers the others' exchanges.
ALEXNET = Experiment(model="alexnet", dataset="synthetic", dataset_args={"shape": "1,4,4", "num_samples": 128},
                     test_fraction=3 / 128, epochs=1, batch_size=32, optimizer="momentum", lr=0.01,
                     schedule="constant", augment_shift=0, threads=1)
BASES = {"lenet": DIGITS, "alexnet": ALEXNET}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("krizhevsky")
    out = {}
    results = {}

    def run_sequence(group, resume=None):
        for key in group:
            out[key] = str(directory / key.replace(" ", "_"))
        results.update(zip(group, train_sequence([exp.replace(out=out[key]) for key, exp in group.items()],
                                                 resume=resume)))

    for workers in (2, 4):
        run_sequence({f"{name} {workers}": base.replace(workers=workers, **KRIZHEVSKY) for name, base in BASES.items()})
        for name, base in BASES.items():
            key = f"{name} 1 x {workers} microbatches"
            out[key] = str(directory / key.replace(" ", "_"))
            results[key] = train(base.replace(workers=1, microbatches=workers, out=out[key]))
    resumed = str(directory / "alexnet_2_resumed")
    shutil.copytree(out["alexnet 2"], resumed)  # the 1-epoch run's own directory stays as it is
    two_epochs = ALEXNET.replace(workers=2, epochs=2, **KRIZHEVSKY)
    run_sequence({"alexnet 2 x 2 epochs": two_epochs, "alexnet 2 resumed": two_epochs}, resume=[None, resumed])
    return results, out


@pytest.mark.parametrize("name", ["lenet", "alexnet"])
@pytest.mark.parametrize("workers", [2, 4])
def test_a_krizhevsky_run_equals_one_worker_with_the_same_microbatches(runs, name, workers):
    # AlexNet's dropout masks too: the fully connected part runs the K batches in rank order, as one worker
    # runs its K microbatches, from the random state every rank holds alike.
    results, out = runs
    run, reference = f"{name} {workers}", f"{name} 1 x {workers} microbatches"
    assert max_weight_difference(load_weights(out[run]), load_weights(out[reference])) <= 1e-5
    mine, theirs = results[run].epochs[0], results[reference].epochs[0]
    for key in ("train_loss", "test_loss"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"], abs=2e-3)
    assert results[run].final_test_accuracy == pytest.approx(results[reference].final_test_accuracy, abs=2e-3)


def expected_bytes(model: nn.Sequential, global_batches: list[int], workers: int, rank: int) -> dict:
    """What rank `rank` sends in one epoch, by axis and operation (derivation in the test below)."""
    start = boundary(model)
    modules = dict(model.named_modules())
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    features, outputs = linear[0].in_features, linear[-1].out_features
    conv_bytes = 4 * sum(p.numel() for p in model[:start].parameters())
    widths = [(modules[pair.column].in_features, modules[pair.row].out_features) for pair in plan(model)]
    right = (rank + 1) % workers
    dp = {"allreduce:ring": 0, "krizhevsky:activation": 0, "krizhevsky:gradient": 0}
    tp = {"allreduce:ring": 0}
    for global_batch in global_batches:
        sizes = [global_batch // workers + (k < global_batch % workers) for k in range(workers)]  # tensor_split's
        dp["krizhevsky:activation"] += all_gather_bytes_sent([4 * features * b for b in sizes], workers, rank)
        dp["krizhevsky:gradient"] += 4 * outputs * (sum(sizes) - sizes[right])
        dp["allreduce:ring"] += RING.bytes_sent(conv_bytes, workers, rank, 4)
        tp["allreduce:ring"] += sum(RING.bytes_sent(4 * b * column_in, workers, rank, 4)
                                    + RING.bytes_sent(4 * b * row_out, workers, rank, 4)
                                    for b in sizes for column_in, row_out in widths)
    return {"dp": dp, "tp": tp}


@pytest.mark.parametrize("name, classes, shape, global_batches", [
    ("lenet", 10, (1, 8, 8), [48] * 29 + [46]), ("alexnet", 10, (1, 4, 4), [32] * 3 + [29])])
@pytest.mark.parametrize("workers", [2, 4])
def test_counted_bytes_equal_the_formula(runs, name, classes, shape, global_batches, workers):
    # Per step, with b_k the samples of rank k (the global batch's tensor_split) and B their sum, rank r sends:
    #   activations, all-gather (ring): every block but its right neighbour's, plus the 4-byte sizes to the
    #       K-1 others: 4 F (B - b_{r+1}) + 4 (K-1) bytes, F the boundary's features (K-1)/K x the gathered
    #       4 F B bytes and the sizes, when the shards are equal;
    #   the outputs' gradients, all-gather (sizes known): 4 C (B - b_{r+1}), C the model's outputs;
    #   per batch k and Megatron pair (column in-features I, row out-features O), on axis tp: the g allreduce of
    #       the (b_k, O) partial outputs and the f allreduce of the (b_k, I) input gradient, ring 2(K-1)/K each;
    #   the convolutional part's gradients, one bucket, ring: 2(K-1)/K x their bytes.
    # LeNet-5: F = 400, the pair 400 -> 120 | 120 -> 84, C = 10, 2,572 conv parameters. Evaluation's exchanges
    # are bookkeeping. result.json's per-rank counts hold the same.
    results, out = runs
    run = f"{name} {workers}"
    model = build_model(BASES[name].model, classes, shape)
    with open(f"{out[run]}/result.json") as handle:
        per_rank = json.load(handle)["comm"]["per_rank"]
    for stats in per_rank:
        expected = expected_bytes(model, global_batches, workers, stats["rank"])
        assert {axis: stats["by_axis"][axis] for axis in ("dp", "tp")} == expected, stats["rank"]
        by_operation = {"allreduce:ring": expected["dp"]["allreduce:ring"] + expected["tp"]["allreduce:ring"],
                        "krizhevsky:activation": expected["dp"]["krizhevsky:activation"],
                        "krizhevsky:gradient": expected["dp"]["krizhevsky:gradient"]}
        assert stats["by_operation"] == by_operation, stats["rank"]
    assert results[run].comm["per_rank"] == per_rank
    assert results[run].comm["pairs"] == [[pair.column, pair.row] for pair in plan(model)]


def test_a_resumed_krizhevsky_run_equals_the_uninterrupted_one(runs):
    # The checkpoint holds the unsplit model, every rank's optimizer state of its shards and its random state
    # (AlexNet's dropout masks go on as they would have).
    results, out = runs
    assert max_weight_difference(load_weights(out["alexnet 2 resumed"]), load_weights(out["alexnet 2 x 2 epochs"])) == 0
    assert [row["test_loss"] for row in results["alexnet 2 resumed"].epochs] == \
        [row["test_loss"] for row in results["alexnet 2 x 2 epochs"].epochs]


def test_the_boundary_is_before_the_first_linear_layer_and_its_dropout():
    assert boundary(build_model("lenet5", 10, (1, 8, 8))) == 7  # the flatten is the last convolutional module
    assert boundary(build_model("alexnet", 10, (1, 4, 4))) == 15  # the dropout in front of fc 256 -> 512
    assert boundary(build_model("mlp", 10, (1, 8, 8))) == 1


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc(x.flatten(1))


def no_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())


def one_linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("changes, model, message", [
    ({"workers": 4, "mesh": {"dp": 2, "tp": 2}}, None,
     "strategy krizhevsky splits the model over the dp ranks itself; mesh dp 2 x tp 2 = 4 ranks splits it too "
     "\\(use --mesh dp=4\\)"),
    ({"workers": 4, "mesh": {"dp": 2, "pp": 2}, "step_schedule": "gpipe"}, None,
     "mesh dp 2 x pp 2 = 4 ranks splits it"),
    ({"workers": 2, "grad_clip": 1.0}, None, "with strategy krizhevsky each rank holds a shard of the model"),
    ({"workers": 2, "compressor": "fp16"}, None, "--compressor needs a strategy that sums gradients"),
    ({"workers": 2, "strategy_args": {"overlap": "yes"}}, None, "overlap must be true or false"),
    ({"workers": 7, "batch_size": 42}, None, "strategy krizhevsky splits the fully connected layers over its 7 "
                                             "workers as tp 7 does: tp 7 does not divide the 120 output features "
                                             "of linear layer 7 \\(split by columns, feeding 9\\)"),
    ({"workers": 2}, no_linear, "the model has no linear layer \\(nn.Linear\\); use allreduce"),
    ({"workers": 2}, one_linear, "in Megatron pairs of linear layers, but the model has none"),
    ({"workers": 2}, NotSequential, "cuts an nn.Sequential at its top-level modules; the model is a NotSequential"),
])
def test_bad_settings_fail_in_one_line_before_any_worker_starts(changes, model, message):
    # The model's checks build it once in this process (polytrain.train.loop.check_model_fits).
    with pytest.raises(ValueError, match=message) as error:
        train(DIGITS.replace(strategy="krizhevsky", **changes), model=model)
    assert "\n" not in str(error.value)
