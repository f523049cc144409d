"""Sufficient factor broadcasting: the rebuilt gradients equal the dense sum, the bytes equal the formula.

The reference is one process running the whole global batch: the gradient of the global batch's summed
loss / global batch equals the sum of the shards' gradients, which is what every rank must end with.
Four ranks are spawned once; smaller worlds are process groups of the last p ranks (as in
tests/comm/test_allreduce_conformance.py). Each case runs two steps without an update: a global batch of 10
(uneven shards for p = 3, 4) and the smaller last batch of an epoch, 7, both padded to ceil(10 / p).
"""

import functools
import hashlib
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import all_gather_bytes_sent
from polytrain.launch import run_on_every_world_size
from polytrain.models import build_model
from polytrain.strategies.sufficient_factors import (OPERATION, SufficientFactors, factor_bytes_sent,
                                                     prefers_factors)
from polytrain.schedules import local_step

TIMEOUT_S = 60
WORLD_SIZES = (1, 2, 3, 4)
BATCHES = (10, 7)  # global batch of each step: a full one, then the smaller last batch of an epoch
MICROBATCHES = (1, 2)
SEED = 7
TOLERANCE = 1e-5  # max absolute difference; the gradients are of order 1e-2


class SharedTwice(nn.Module):
    """One Linear applied twice per forward: its rows per sample double, so it falls back to dense."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(12, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.hidden(x)))))


class Tied(nn.Module):
    """Two Linear layers holding the same weight: neither layer's factors give the whole gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(12, 12), nn.Linear(12, 12, bias=False), nn.Linear(12, 10)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


class Attention(nn.Module):
    """nn.MultiheadAttention applies its out_proj with F.linear, never calling the module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8, 10))

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def sequence_model():
    """A Linear on (b, t, n) inputs (5 rows per sample), followed by an in-place ReLU."""
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(5 * 8, 10))


def two_sizes():
    """A wide layer (factors are cheaper at small batches) and a narrow one (the dense sum is cheaper)."""
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))


@dataclass(frozen=True)
class Case:
    build: object
    in_shape: tuple
    num_classes: int
    algorithm: str
    mode: str
    dense_layers: tuple = ()  # layers that must fall back to the dense sum whatever the mode


CASES = {
    "mlp": Case(functools.partial(build_model, "mlp", 10, (1, 28, 28)), (1, 28, 28), 10, "ring", "always"),
    "mlp_auto": Case(functools.partial(build_model, "mlp", 10, (1, 28, 28)), (1, 28, 28), 10, "rabenseifner",
                     "auto"),
    "lenet5": Case(functools.partial(build_model, "lenet5", 10, (1, 28, 28)), (1, 28, 28), 10, "central",
                   "always"),
    "sequence": Case(sequence_model, (5, 6), 10, "butterfly", "always"),
    "two_sizes": Case(two_sizes, (512,), 4, "ring", "auto"),
    "shared": Case(SharedTwice, (12,), 10, "tree", "always", ("hidden",)),
    "tied": Case(Tied, (12,), 10, "ring", "always", ("first", "second")),
    "attention": Case(Attention, (3, 8), 10, "native", "always", ("attention.out_proj",)),
}


def make_model(case: Case) -> nn.Module:
    torch.manual_seed(SEED)
    return case.build()


def make_batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCHES[step], *case.in_shape, generator=generator)
    return x, torch.randint(0, case.num_classes, (BATCHES[step],), generator=generator)


def local_batch(world_size: int) -> int:
    return math.ceil(max(BATCHES) / world_size)


def digest(tensors: dict) -> str:
    hasher = hashlib.sha256()
    for value in tensors.values():
        hasher.update(value.contiguous().view(torch.uint8).numpy())
    return hasher.hexdigest()


def run_case(comm, case: Case, microbatches: int) -> dict:
    """Two steps on this rank's shards; each step's gradients of the handled parameters and byte counts."""
    model = make_model(case)
    factors = SufficientFactors(comm, model, case.algorithm, local_batch(comm.world_size), case.mode)
    handled = [name for name, param in model.named_parameters() if param in factors.parameters()]
    steps = []
    for step in range(len(BATCHES)):
        x, y = make_batch(case, step)
        shard_x, shard_y = x.tensor_split(comm.world_size)[comm.rank], y.tensor_split(comm.world_size)[comm.rank]
        model.zero_grad(set_to_none=True)
        comm.reset_stats()
        local_step(model, shard_x, shard_y, microbatches, len(x))
        factors.reduce()
        params = dict(model.named_parameters())
        grads = {name: params[name].grad.clone() for name in handled}
        steps.append({"grads": grads if comm.rank == 0 else None, "digest": digest(grads),
                      "by_operation": dict(comm.stats.by_operation), "messages_sent": comm.stats.messages_sent})
    report = factors.report()
    factors.close()
    return {"handled": handled, "steps": steps, "report": report}


def run_cases(comm) -> dict:
    return {(name, microbatches): run_case(comm, case, microbatches)
            for name, case in CASES.items() for microbatches in MICROBATCHES}




@functools.cache
def all_records() -> dict[int, list[dict]]:
    return run_on_every_world_size(run_cases, max(WORLD_SIZES), timeout_s=TIMEOUT_S)


def records(world_size: int, name: str, microbatches: int) -> list[dict]:
    """The records of every rank of a world of `world_size`, in group-rank order."""
    return [outcome[(name, microbatches)] for outcome in all_records()[world_size]]


@functools.cache
def reference_grads(name: str, step: int) -> dict:
    """The gradients of the whole global batch in one process: the dense sum of every shard's gradient."""
    case = CASES[name]
    model = make_model(case)
    x, y = make_batch(case, step)
    local_step(model, x, y, 1, len(x))
    return {key: param.grad.clone() for key, param in model.named_parameters()}


def layer_choices(world: list[dict]) -> dict:
    return {row["name"]: row for row in world[0]["report"]["layers"]}


def expected_factors(case: Case, row: dict, world_size: int) -> bool:
    """The choice the byte formula makes, computed here from the layer's shape and the algorithm."""
    if row["name"] in case.dense_layers:
        return False
    if case.mode == "always":
        return True
    algorithm = ALLREDUCE_ALGORITHMS.get(case.algorithm)
    n, m = row["in_features"], row["out_features"]
    rows = local_batch(world_size) * row["rows_per_sample"]
    factor_total = world_size * (world_size - 1) * rows * (n + m) * 4
    dense_total = sum(algorithm.bytes_sent((m * n + m * row["bias"]) * 4, world_size, rank, 4)
                      for rank in range(world_size))
    return factor_total < dense_total


@pytest.mark.parametrize("microbatches", MICROBATCHES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_rebuilt_gradients_equal_the_dense_sum(name, world_size, microbatches):
    world = records(world_size, name, microbatches)
    for step in range(len(BATCHES)):
        assert len({rank["steps"][step]["digest"] for rank in world}) == 1, "ranks disagree"
        reference = reference_grads(name, step)
        for key, grad in world[0]["steps"][step]["grads"].items():
            assert (grad - reference[key]).abs().max().item() <= TOLERANCE, f"{key}, step {step}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_choices_and_bytes_follow_the_formula(name, world_size):
    case = CASES[name]
    algorithm = ALLREDUCE_ALGORITHMS.get(case.algorithm)
    for microbatches in MICROBATCHES:
        world = records(world_size, name, microbatches)
        choices = layer_choices(world)
        assert all(row["choice"] in ("factors", "dense") for row in choices.values()), choices
        factorised = [row for row in choices.values() if row["choice"] == "factors"]
        dense = [row for row in choices.values() if row["choice"] == "dense"]
        for row in choices.values():
            assert (row["choice"] == "factors") == expected_factors(case, row, world_size), row
        factor_bytes = sum(factor_bytes_sent(row["factor_rows"], row["in_features"], row["out_features"],
                                             world_size) for row in factorised)
        packed_bytes = sum(row["factor_rows"] * (row["in_features"] + row["out_features"]) * 4 for row in factorised)
        dense_numel = sum(row["in_features"] * row["out_features"] + row["out_features"] * row["bias"]
                          for row in dense)
        for rank, record in enumerate(world):
            for step in record["steps"]:
                counted = step["by_operation"]
                assert counted.get(OPERATION, 0) == factor_bytes
                assert factor_bytes == all_gather_bytes_sent([packed_bytes] * world_size, world_size, rank, True)
                dense_bytes = algorithm.bytes_sent(dense_numel * 4, world_size, rank, 4)
                assert counted.get(f"allreduce:{case.algorithm}", counted.get("native_all_reduce", 0)) == dense_bytes
                if case.algorithm != "native":  # native's messages are the backend's; factors are ours
                    dense_messages = algorithm.messages_sent(dense_numel, world_size, rank) if dense else 0
                    factor_messages = (world_size - 1) if factorised else 0
                    assert step["messages_sent"] == factor_messages + dense_messages


def test_fallback_reasons_are_reported():
    for name in ("shared", "tied", "attention"):
        choices = layer_choices(records(2, name, 2))
        for layer in CASES[name].dense_layers:
            assert choices[layer]["choice"] == "dense"
            assert choices[layer]["reason"].startswith("cannot factorise"), choices[layer]
    assert layer_choices(records(2, "sequence", 1))["0"]["rows_per_sample"] == 5


def test_auto_takes_both_sides_of_the_formula():
    """In two_sizes the 512x512 layer is sent as factors and the 512x4 one densely, at every p > 1."""
    for world_size in WORLD_SIZES[1:]:
        choices = layer_choices(records(world_size, "two_sizes", 1))
        assert (choices["0"]["choice"], choices["2"]["choice"]) == ("factors", "dense")
    # One rank sends nothing either way; a tie keeps the dense sum.
    assert all(row["choice"] == "dense" for row in layer_choices(records(1, "two_sizes", 1)).values())


@pytest.mark.parametrize("name", ALLREDUCE_ALGORITHMS.names())
def test_prefers_factors_on_a_tiny_and_a_large_layer(name):
    algorithm = ALLREDUCE_ALGORITHMS.get(name)
    for world_size in range(2, 9):
        assert not prefers_factors(algorithm, 64, 4, 4, True, world_size)
        assert prefers_factors(algorithm, 8, 1024, 1024, True, world_size)
    assert not prefers_factors(algorithm, 8, 1024, 1024, True, 1)


# -- one process: hooks, validation and fallbacks without communication ----------------------------------

def single_rank():
    """A stand-in communicator of one rank: nothing is ever sent, so no process group is needed."""
    return SimpleNamespace(rank=0, world_size=1, reset_stats=lambda: None,
                           stats=SimpleNamespace(by_operation={}, messages_sent=0))


def test_invalid_arguments_are_one_line_errors():
    model = two_sizes()
    with pytest.raises(ValueError, match="mode must be one of auto, always, never; got 'sometimes'"):
        SufficientFactors(single_rank(), model, "ring", 8, "sometimes")
    with pytest.raises(ValueError, match="local_batch must be a positive"):
        SufficientFactors(single_rank(), model, "ring", 0)
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        SufficientFactors(single_rank(), model, "rign", 8)


def test_report_is_undecided_until_the_first_forward_and_evaluation_captures_nothing():
    model = two_sizes()
    factors = SufficientFactors(single_rank(), model, "ring", 4, "always")
    assert {row["choice"] for row in factors.report()["layers"]} == {"undecided"}
    with torch.no_grad():
        model(torch.randn(4, 512))
    assert all(not layer.inputs for layer in factors.layers)
    model(torch.randn(4, 512)).sum().backward()
    assert {row["choice"] for row in factors.report()["layers"]} == {"factors"}
    factors.close()


def test_too_many_rows_name_the_layer_and_close_removes_the_hooks():
    model = two_sizes()
    factors = SufficientFactors(single_rank(), model, "ring", 4, "always")
    model(torch.randn(5, 512)).sum().backward()
    with pytest.raises(ValueError, match=r"layer 0: 5 rows .* exceed its capacity of 4"):
        factors.reduce()
    factors.close()
    model(torch.randn(5, 512)).sum().backward()
    assert all(not layer.inputs for layer in factors.layers)


def test_frozen_layers_are_left_to_the_strategy():
    model = two_sizes()
    model[2].requires_grad_(False)
    factors = SufficientFactors(single_rank(), model, "ring", 4)
    assert factors.parameters() == {model[0].weight, model[0].bias}
    factors.close()


def test_never_leaves_every_layer_dense_and_one_rank_keeps_its_gradient():
    model = two_sizes()
    factors = SufficientFactors(single_rank(), model, "ring", 4, "never")
    model(torch.randn(4, 512)).sum().backward()
    local = {name: param.grad.clone() for name, param in model.named_parameters()}
    factors.reduce()
    assert {row["choice"] for row in factors.report()["layers"]} == {"dense"}
    assert all(torch.equal(param.grad, local[name]) for name, param in model.named_parameters())
    factors.close()


def test_a_new_local_batch_revisits_the_choice():
    """At p = 4 the 512x4 layer is cheaper as factors of 1 sample per rank, densely at 64."""
    model = two_sizes()
    factors = SufficientFactors(SimpleNamespace(rank=0, world_size=4), model, "ring", 1)
    model(torch.randn(1, 512))
    assert [row["choice"] for row in factors.report()["layers"]] == ["factors", "factors"]
    factors.set_local_batch(64)
    assert [row["choice"] for row in factors.report()["layers"]] == ["factors", "dense"]
    factors.close()
