"""Gradient compression end to end: real multi-worker training runs through every compressor.

Spawning ranks costs seconds, so runs share them: every 4-worker run is on one set of workers
(`four_workers`, one train_sequence), every 3-worker run on another (`three_workers`); only the resume
through the public `train(exp, resume=dir)` spawns its own. Runs are deterministic (seeded data order,
weights and compressor draws; the allreduce algorithms sum in a fixed order), so every measured accuracy
is the same from run to run on one machine and torch version.

- Conformance: LeNet-5 on the 4,000 real MNIST training digits, 4 workers, one epoch of 63 steps, reaches
  the uncompressed run's test accuracy within the bound stated per compressor in CASES.
- Bytes: with one bucket and the ring algorithm, what the communicator counts on every rank equals the
  analytic volume of the compressor's payloads (sum: ring allreduce per dtype and round; gather: ring
  allgather of the packed payloads) plus the evaluation's two small allreduces per epoch.
- Checkpoints: 2 epochs straight equal 1 epoch + a resume from its checkpoint bit for bit, compressor
  state (residuals, PowerSGD's Q and error, DGC's u and v) included.
- Momentum correction: wherever error feedback meets the momentum optimizer, the momentum moves in front of
  the compressor (DGC's own, or MomentumCorrection) and the optimizer runs plain: top-k with error feedback
  is at least as accurate as DGC at the same density, the other error-feedback compressors come within a
  stated bound of their plain-SGD runs, and with nothing dropped the run is momentum SGD.
- Microbatching compresses once per step; sufficient factors give the dense run's weights; bad settings
  fail before any worker starts.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.gather import all_gather_bytes_sent
from polytrain.compress import COMPRESSORS, build_compressor
from polytrain.config import ConfigError, Experiment
from polytrain.launch import run_workers
from polytrain.models import build_model
from polytrain.strategies.sufficient_factors import prefers_factors
from polytrain.train import train, train_sequence
from polytrain.train.checkpoint import checkpoint_path, load_checkpoint
from polytrain.compress.momentum import MomentumCorrection
from polytrain.train.compression import plan_compression
from polytrain.train.defaults import resolve
from polytrain.train.loop import Trainer
from polytrain.train.progress import SilentReporter
from polytrain.train.result import load_weights, max_weight_difference

WORKERS = 4
RING = ALLREDUCE_ALGORITHMS.get("ring")
# One bucket (64 MiB > LeNet-5's 0.25 MB), so each aggregation kind is one collective per step and round.
ONE_BUCKET = {"algorithm": "ring", "bucket_mb": 64.0}
# One epoch of batch 64 (63 steps, the last of 32 samples) at lr 0.1 with momentum 0.9 and the cosine
# schedule: 0.908 test accuracy uncompressed, still rising, so a compressor that slows learning shows.
BASE = Experiment(model="lenet5", dataset="mnist5k", workers=WORKERS, strategy="allreduce",
                  strategy_args=ONE_BUCKET, epochs=1, batch_size=64, lr=0.1, augment_shift=0, threads=1)
# Error feedback releases what it held back in bursts, and heavy-ball momentum after the compressor amplifies
# each burst up to 10x (1 / (1 - 0.9)); under the momentum optimizer the run therefore applies momentum
# correction (Lin et al., ICLR 2018, sec. 3.2; polytrain.train.compression). Measured here after the epoch at
# lr 0.1, uncorrected -> corrected: topk:ef 0.867 -> 0.881, onebit 0.693 -> 0.870, efsignsgd 0.647 -> 0.817,
# threshold:ef 0.442 -> 0.745, randomk:ef 0.400 -> 0.431 (uncompressed 0.900). Corrected, randomk:ef and
# threshold:ef still miss their 10-point bound: their elements wait several steps before going out (random-k
# at 25 %: 4 on average; tau 3e-3 lies above almost every element) and momentum behind such delays overshoots
# (staleness itself acts as momentum; Mitliagkas et al. 2016), which momentum correction does not remove. So
# their battery cases train with plain SGD at lr 0.5, and their momentum runs are compared with those
# (CORRECTED); onebit, efsignsgd and topk:ef train with momentum in the battery.
PLAIN_SGD = {"optimizer": "sgd", "lr": 0.5}


@dataclass(frozen=True)
class Case:
    """One compressor setting of the battery and the accuracy bound it must meet, with the reason."""

    compressor: str
    args: dict = field(default_factory=dict)
    bound: float = 0.15  # max drop below the uncompressed accuracy, as a fraction
    why: str = "default settings; the bound of aggressive compressors"
    settings: dict = field(default_factory=dict)  # Experiment changes for this case

    def experiment(self, **changes) -> Experiment:
        return BASE.replace(compressor=self.compressor, compressor_args=self.args, **{**self.settings, **changes})


# Settings and bounds. In brackets: the drop below the uncompressed 0.908 measured here, in percentage
# points (negative: a gain). A registered compressor missing from this table runs with its defaults and
# the 15-point bound. LeNet-5's per-rank gradient elements are ~7e-5 (median) to 1.4e-3 (99th percentile).
SETTINGS: dict[str, Case] = {
    "none": Case("none", {}, 0.0, "the same float32 sums in the same order as no compressor: equal [0]"),
    "fp16": Case("fp16", {}, 0.02, "unit roundoff 2^-11, and no gradient near fp16's limits [-0.7]"),
    "bf16": Case("bf16", {}, 0.02, "unit roundoff 2^-8 on each rank's share and on the sum [1.2]"),
    "kbit": Case("kbit", {}, 0.03, "8 unbiased bits per element [-0.6]"),
    "qsgd": Case("qsgd", {}, 0.03, "16 levels plus sign, unbiased [0.3]"),
    "powersgd": Case("powersgd", {"rank": 4}, 0.03, "rank 4 with error feedback on a 120x400 layer [1.1]"),
    "terngrad": Case("terngrad", {}, 0.10, "unbiased but ~1.6 bits: high variance [3.1]"),
    "signsgd": Case("signsgd", {}, 0.10, "majority vote of signs scaled by mean |g|: biased [4.0]"),
    "topk": Case("topk", {"ratio": 0.1}, 0.10, "10 % without error feedback: the rest is lost [3.9]"),
    "randomk": Case("randomk", {"ratio": 0.5, "unbiased": True}, 0.10,
                    "half the elements scaled by 2 (unbiased, variance x2); 1 % unscaled does not train [2.3]"),
    "threshold": Case("threshold", {"tau": 3e-4}, 0.15,
                      "+-tau where |g| >= tau (~20 % at the start), the rest lost: a sign code, lr 0.5 [7.3]",
                      {"lr": 0.5}),
    "dgc": Case("dgc", {"ratio": 0.05}, 0.15, "5 % with momentum correction, no warm-up [7.7]"),
    "onebit": Case("onebit", {}, 0.10, "built-in error feedback, momentum corrected: 0.870, within 5 points of "
                   "plain SGD at lr 0.5 (0.908; see CORRECTED) [3.0 below 0.900]"),
    "efsignsgd": Case("efsignsgd", {}, 0.10, "built-in error feedback, momentum corrected: 0.817, within 10 points "
                      "of plain SGD at lr 0.5 (0.905; see CORRECTED) [8.3 below 0.900]"),
}
EF_CASES: dict[str, Case] = {
    "topk:ef": Case("topk", {"ratio": 0.05, "ef": True}, 0.10,
                    "5 % with error feedback, momentum 0.9 corrected: 0.881, at least dgc's 0.831 at 5 % [1.9 below "
                    "0.900]"),
    "randomk:ef": Case("randomk", {"ratio": 0.25, "ef": True}, 0.10,
                       "25 % with error feedback: plain SGD at lr 0.5 (see PLAIN_SGD; corrected momentum in "
                       "CORRECTED) [1.8]", PLAIN_SGD),
    "threshold:ef": Case("threshold", {"tau": 3e-3, "ef": True}, 0.10,
                         "tau 3e-3, above almost every gradient element, so residuals build up and go out "
                         "whole; 3e-4 caps each element's step at tau (0.54), 1e-3 gives 0.83; plain SGD at "
                         "lr 0.5 (see PLAIN_SGD; corrected momentum in CORRECTED) [1.0]", PLAIN_SGD),
}
CASES: dict[str, Case] = {**{name: SETTINGS.get(name, Case(name)) for name in COMPRESSORS.names()}, **EF_CASES}


@dataclass(frozen=True)
class Corrected:
    """An error-feedback run under the momentum optimizer (corrected) and its bound below plain SGD."""

    run: str  # key of the momentum run in four_workers' results
    reference: str  # key of the same compressor's plain-SGD run (lr 0.5)
    bound: float  # max drop of `run` below `reference`, as a fraction
    why: str


# Measured drops below plain SGD in brackets, in percentage points. The momentum runs of randomk:ef and
# threshold:ef, and the plain-SGD runs of onebit and efsignsgd, are extra runs (extra_runs).
CORRECTED: dict[str, Corrected] = {
    "onebit": Corrected("onebit", "onebit plain sgd", 0.05, "0.870 against 0.908 [3.8]"),
    "efsignsgd": Corrected("efsignsgd", "efsignsgd plain sgd", 0.10, "0.817 against 0.905 [8.8]"),
    "threshold:ef": Corrected("threshold:ef momentum", "threshold:ef", 0.20,
                              "0.745 against 0.898: residuals above tau drain at tau per step, behind the momentum "
                              "(uncorrected 0.442) [15.3]"),
    "randomk:ef": Corrected("randomk:ef momentum", "randomk:ef", 0.50,
                            "0.431 against 0.890: each element waits 4 steps on average; correction barely helps "
                            "in one epoch (uncorrected 0.400; 4 epochs at mnist5k's defaults: 0.718 -> 0.818, "
                            "BENCHMARKS.md) [45.9]"),
}

# Extra 4-worker runs sharing the workers: microbatching, and DGC's momentum takeover without weight decay.
# The microbatch pair runs at lr 0.01: at 0.1, the 1e-9 differences between an accumulated and a whole
# gradient move a top-k or ReLU decision during the epoch and the weights part by ~4e-5 (measured), which
# is arithmetic, not a second compression (that would change the residuals by the size of a gradient).
# Under momentum correction lr 0.02 moves one too (2.1e-4); at 0.01 they agree to 1.5e-8.
FULL_BATCH, MICROBATCHED = "topk:ef lr=0.01", "topk:ef lr=0.01 microbatches=2"
DGC_TAKEOVER = "dgc:ratio=1,momentum_masking=false"
PLAIN_NO_DECAY = "no compressor, weight_decay=0"
# Error feedback around no compression drops nothing, so momentum correction sends torch's momentum buffer.
CORRECTED_NONE = "none:ef=true, weight_decay=0"


def extra_runs(directory) -> dict[str, Experiment]:
    return {
        FULL_BATCH: EF_CASES["topk:ef"].experiment(lr=0.01, out=str(directory / "full_batch")),
        MICROBATCHED: EF_CASES["topk:ef"].experiment(lr=0.01, microbatches=2, out=str(directory / "microbatched")),
        DGC_TAKEOVER: BASE.replace(compressor="dgc", compressor_args={"ratio": 1.0, "momentum_masking": False},
                                   weight_decay=0.0, out=str(directory / "dgc")),
        PLAIN_NO_DECAY: BASE.replace(weight_decay=0.0, out=str(directory / "plain")),
        CORRECTED_NONE: BASE.replace(compressor="none", compressor_args={"ef": True}, weight_decay=0.0,
                                     out=str(directory / "corrected_none")),
        "onebit plain sgd": SETTINGS["onebit"].experiment(**PLAIN_SGD),
        "efsignsgd plain sgd": SETTINGS["efsignsgd"].experiment(**PLAIN_SGD),
        "threshold:ef momentum": EF_CASES["threshold:ef"].experiment(optimizer="momentum", lr=BASE.lr),
        "randomk:ef momentum": EF_CASES["randomk:ef"].experiment(optimizer="momentum", lr=BASE.lr),
    }


@pytest.fixture(scope="module")
def four_workers(tmp_path_factory):
    """Every 4-worker run, on one set of spawned workers: {"uncompressed" or case or extra name: Result}.

    The extra runs write their weights under `directory`.
    """
    directory = tmp_path_factory.mktemp("four")
    runs = {"uncompressed": BASE}
    runs.update({key: case.experiment() for key, case in CASES.items()})
    runs.update(extra_runs(directory))
    results = train_sequence(list(runs.values()))
    return dict(zip(runs, results)), directory


# -- 1. conformance battery ---------------------------------------------------------------------------------


def test_the_battery_covers_every_registered_compressor():
    assert set(COMPRESSORS.names()) <= set(CASES)
    assert set(SETTINGS) <= set(COMPRESSORS.names()), "a table entry names no registered compressor"


@pytest.mark.parametrize("key", list(CASES))
def test_compressor_trains_to_within_its_bound_of_uncompressed(four_workers, key):
    results, _ = four_workers
    case, reference = CASES[key], results["uncompressed"].final_test_accuracy
    accuracy = results[key].final_test_accuracy
    print(f"{key}: {accuracy:.3f} (uncompressed {reference:.3f}, bound {case.bound:.2f}: {case.why})")
    assert accuracy >= reference - case.bound - 1e-9, f"{key}: {accuracy} < {reference} - {case.bound} ({case.why})"
    # The compressor that ran: build_compressor's, behind momentum correction where error feedback meets momentum.
    built = build_compressor(case.compressor, case.args).name
    ran = plan_compression(resolve(case.experiment()), rank=0).compressor.name
    assert results[key].comm["compressor"]["name"] == ran and ran in (built, f"momentum_correction({built})")


def test_no_compression_through_the_compressor_is_the_plain_allreduce(four_workers):
    results, _ = four_workers
    plain, none = results["uncompressed"], results["none"]
    assert [e["test_accuracy"] for e in none.epochs] == [e["test_accuracy"] for e in plain.epochs]
    assert [e["train_loss"] for e in none.epochs] == [e["train_loss"] for e in plain.epochs]
    assert none.comm["per_rank"] == plain.comm["per_rank"]


# -- 2. bytes counted in training == analytic volume ----------------------------------------------------------


def lenet_parameters() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [(name, p.detach()) for name, p in build_model("lenet5", 10, (1, 28, 28)).named_parameters()]


def sum_step_bytes(compressor, rank: int) -> int:
    """Bytes `rank` sends per step for a "sum" compressor: one ring allreduce per round and wire dtype.

    The wire tensors' sizes per round and dtype come from compressing a tensor of each parameter's shape
    (summing does not change sizes); their total over the rounds must equal payload_bytes.
    """
    parameters = lenet_parameters()
    rounds: list[dict[torch.dtype, int]] = []
    total_payload = 0
    for _, tensor in parameters:
        gradient = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
        payload, state = compressor.compress(gradient, compressor.init(gradient))
        for round_number in range(compressor.rounds):
            if round_number:
                payload, state = compressor.refine(payload, state)
            if len(rounds) <= round_number:
                rounds.append({})
            for wire in payload.wire:
                size = wire.numel() * wire.element_size()
                rounds[round_number][wire.dtype] = rounds[round_number].get(wire.dtype, 0) + size
        total_payload += compressor.payload_bytes(tensor.numel())
    assert sum(size for by_dtype in rounds for size in by_dtype.values()) == total_payload
    return sum(RING.bytes_sent(size, WORKERS, rank, dtype.itemsize)
               for by_dtype in rounds for dtype, size in by_dtype.items() if size)


def gather_step_bytes(compressor, rank: int) -> int:
    """Bytes `rank` sends per step for a fixed-size "gather" compressor: one ring allgather of every
    rank's packed payloads, as long as the sum of payload_bytes over the parameters."""
    packed = sum(compressor.payload_bytes(tensor.numel()) for _, tensor in lenet_parameters())
    return all_gather_bytes_sent([packed] * WORKERS, WORKERS, rank, fixed_size=True)


def evaluation_bytes(rank: int) -> int:
    """Per epoch the trainer sums 3 float64 training totals and 2 float64 test totals over the ranks (by the
    ring, counted as bookkeeping)."""
    return RING.bytes_sent(3 * 8, WORKERS, rank, 8) + RING.bytes_sent(2 * 8, WORKERS, rank, 8)


FIXED_SIZE = ["none", "fp16", "bf16", "kbit", "qsgd", "terngrad", "onebit", "signsgd", "efsignsgd", "randomk",
              "randomk:ef", "powersgd"]


@pytest.mark.parametrize("key", FIXED_SIZE)
def test_counted_bytes_equal_the_payload_volume(four_workers, key):
    results, _ = four_workers
    result, case = results[key], CASES[key]
    epochs = len(result.epochs)
    for rank, stats in enumerate(result.comm["per_rank"]):
        compressor = build_compressor(case.compressor, case.args, rank=rank)
        if compressor.aggregation == "sum":
            expected = {"allreduce:ring": result.steps * sum_step_bytes(compressor, rank)}
        else:
            assert compressor.aggregation == "gather" and compressor.fixed_size
            expected = {"allgather": result.steps * gather_step_bytes(compressor, rank)}
        assert stats["by_operation"] == expected, f"{key} rank {rank}"
        assert stats["bytes_sent"] == sum(expected.values())
        assert stats["by_axis"] == {"dp": expected, "bookkeeping": {"allreduce:ring": epochs * evaluation_bytes(rank)}}


def test_uncompressed_bytes_are_the_ring_volume_of_the_model(four_workers):
    results, _ = four_workers
    result = results["uncompressed"]
    model_bytes = sum(4 * tensor.numel() for _, tensor in lenet_parameters())
    for rank, stats in enumerate(result.comm["per_rank"]):
        assert stats["by_operation"] == {"allreduce:ring": result.steps * RING.bytes_sent(model_bytes, WORKERS, rank, 4)}
        assert stats["by_axis"]["bookkeeping"] == {"allreduce:ring": evaluation_bytes(rank)}
    assert result.comm["bytes_sent_per_step"] == RING.bytes_sent(model_bytes, WORKERS, 0, 4)


@pytest.mark.parametrize("key", ["topk", "topk:ef", "dgc", "threshold", "threshold:ef"])
def test_data_dependent_payloads_send_less_than_dense(four_workers, key):
    # The volume of a sparse allreduce or a variable-size allgather depends on every rank's selection in
    # every step, which the run does not report; exactness is tested on the collectives themselves
    # (tests/comm/test_sparse_allreduce.py, tests/comm/test_allgather.py). Here: the right collective,
    # and fewer bytes than the dense float32 ring allreduce.
    results, _ = four_workers
    result = results[key]
    aggregation = build_compressor(CASES[key].compressor, CASES[key].args).aggregation
    label = "sparse_allreduce:ssar_recursive_doubling" if aggregation == "sparse" else "allgather"
    dense = sum(4 * tensor.numel() for _, tensor in lenet_parameters())
    for rank, stats in enumerate(result.comm["per_rank"]):
        assert set(stats["by_operation"]) == {label}, key
        assert stats["by_axis"]["bookkeeping"] == {"allreduce:ring": evaluation_bytes(rank)}
        assert 0 < stats["by_operation"][label] < result.steps * RING.bytes_sent(dense, WORKERS, rank, 4)


# -- 3. checkpoint and resume keep the compressor state --------------------------------------------------------

# Digits (1,437 training images of 8x8) at 3 workers: 30 steps of batch 48 per epoch. A constant learning
# rate, since a cosine schedule over 1 epoch is not the first half of one over 2.
RESUME = Experiment(model="lenet5", dataset="digits", workers=3, strategy="allreduce", strategy_args=ONE_BUCKET,
                    epochs=2, batch_size=48, lr=0.05, schedule="constant", threads=1)
# Compressor, arguments, and the state entry that must be nonzero after the first epoch.
# (topk:ef runs under momentum, so behind momentum correction: its state is u and the inner residual.)
RESUMED = {"topk:ef": ("topk", {"ratio": 0.05, "ef": True}, "inner.residual"),
           "powersgd": ("powersgd", {}, "error"),
           "dgc": ("dgc", {"ratio": 0.05}, "v")}
# Resumed through the public train(exp, resume=dir), which spawns its own workers; the others resume on the
# fixture's workers through Trainer.restore, which is what train(exp, resume=dir) runs on every rank.
PUBLIC_RESUME = "topk:ef"

# MLP (784-512-256-10) on mnist5k at 3 workers, one epoch of batch 120 (local batch 40): "auto" sends the
# factors of the two wide layers and the dense gradient of the 256x10 head.
FACTORS = Experiment(model="mlp", dataset="mnist5k", workers=3, strategy="allreduce", epochs=1, batch_size=120,
                     lr=0.05, augment_shift=0, threads=1)


def train_in_order(comm, jobs: list[tuple[Experiment, str | None]]):
    """Trains each resolved experiment in turn on this rank, continuing from the checkpoint of the run
    directory given with it (as train(exp, resume=dir) does on each spawned rank); rank 0 returns the Results."""
    results = []
    for exp, resume in jobs:
        trainer = Trainer(exp, SilentReporter(), None, comm)
        if resume is not None:
            trainer.restore(load_checkpoint(checkpoint_path(resume)))
        results.append(trainer.run())
    return results if comm.rank == 0 else None


def resume_runs(key: str, directory) -> dict[str, tuple[Experiment, str | None]]:
    """A straight 2-epoch run ("whole"), its first epoch ("cut") and, unless resumed through the public API,
    the second epoch continued from the first's checkpoint into another directory ("resumed")."""
    name, args, _ = RESUMED[key]
    exp = RESUME.replace(compressor=name, compressor_args=args)
    runs = {f"{key} whole": (exp.replace(out=str(directory / key / "whole")), None),
            f"{key} cut": (exp.replace(epochs=1, out=str(directory / key / "cut")), None)}
    if key != PUBLIC_RESUME:
        runs[f"{key} resumed"] = (exp.replace(out=str(directory / key / "resumed")), str(directory / key / "cut"))
    return runs


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    """The 3-worker runs on one set of workers: the sufficient-factor pair and the resume runs."""
    directory = tmp_path_factory.mktemp("three")
    runs = {mode: (FACTORS.replace(strategy_args={"algorithm": "ring", "sufficient_factors": mode},
                                   out=str(directory / mode)), None) for mode in ("off", "auto")}
    for key in RESUMED:
        runs.update(resume_runs(key, directory))
    jobs = [(resolve(exp), resume) for exp, resume in runs.values()]
    results = run_workers(train_in_order, 3, (jobs,), threads=1, timeout_s=60)[0]
    return dict(zip(runs, results)), directory


def compressor_states(directory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Every rank's compressor state per parameter, from the run's checkpoint."""
    return [part["policy"]["compressor"] for part in load_checkpoint(checkpoint_path(directory))["ranks"]]


@pytest.mark.parametrize("key", list(RESUMED))
def test_resume_keeps_the_compressor_state(three_workers, key):
    results, directory = three_workers
    name, args, carried = RESUMED[key]
    whole, cut, resumed = (directory / key / part for part in ("whole", "cut", "resumed"))
    # The state that must survive is not trivial: every rank carries a nonzero residual / error / velocity.
    for rank_states in compressor_states(cut):
        assert any(state[carried].abs().sum() > 0 for state in rank_states.values() if carried in state)
    if key == PUBLIC_RESUME:
        result = train(RESUME.replace(compressor=name, compressor_args=args, out=str(resumed)), resume=cut)
    else:
        result = results[f"{key} resumed"]
    assert [e["test_accuracy"] for e in result.epochs] == [e["test_accuracy"] for e in results[f"{key} whole"].epochs]
    assert max_weight_difference(load_weights(whole), load_weights(resumed)) == 0.0, key
    for straight, continued in zip(compressor_states(whole), compressor_states(resumed), strict=True):
        assert straight.keys() == continued.keys()
        for parameter in straight:
            for item, value in straight[parameter].items():
                assert torch.equal(value, continued[parameter][item]), (key, parameter, item)


# -- 4. momentum correction: the momentum moves in front of error feedback ----------------------------------


def test_dgc_takes_the_runs_momentum_and_the_optimizer_runs_plain():
    unresolved = BASE.replace(compressor="dgc", compressor_args={"ratio": 0.05}, optimizer_args={"momentum": 0.8})
    exp = resolve(unresolved)
    plan = plan_compression(exp, rank=2)
    assert (exp.optimizer, plan.optimizer, plan.compressor.momentum) == ("momentum", "sgd", 0.8)
    assert plan.optimizer_args == {}  # plain SGD has no arguments
    assert "momentum 0.8" in plan.notice and "plain sgd" in plan.notice
    plan = plan_compression(exp.replace(compressor_args={"momentum": 0.5}), rank=0)
    assert (plan.optimizer, plan.compressor.momentum) == ("sgd", 0.5)
    plan = plan_compression(resolve(unresolved.replace(optimizer="sgd", optimizer_args={})), rank=0)
    assert (plan.optimizer, plan.compressor.momentum) == ("sgd", 0.0)  # plain SGD has no momentum to hand over
    plan = plan_compression(resolve(unresolved.replace(compressor="topk")), rank=0)
    assert (plan.optimizer, plan.optimizer_args["momentum"], plan.notice) == ("momentum", 0.8, None)


@pytest.mark.parametrize("changes, nesterov", [
    (dict(compressor="topk", compressor_args={"ratio": 0.05, "ef": True}), False),
    (dict(compressor="onebit", optimizer_args={"momentum": 0.8}), False),
    (dict(compressor="efsignsgd", optimizer="nesterov"), True),
    (dict(compressor="threshold", compressor_args={"ef": True, "exclude_biases": True},
          optimizer_args={"nesterov": True}), True),
])
def test_error_feedback_meets_momentum_and_the_momentum_moves_in_front(changes, nesterov):
    exp = resolve(BASE.replace(**changes))
    plan = plan_compression(exp, rank=1)
    assert isinstance(plan.compressor, MomentumCorrection)
    assert plan.compressor.inner.name == build_compressor(exp.compressor, exp.compressor_args, rank=1).name
    assert (plan.compressor.momentum, plan.compressor.nesterov) == (exp.optimizer_args["momentum"], nesterov)
    assert (plan.optimizer, plan.optimizer_args) == ("sgd", {})  # lr and weight decay stay the run's
    assert "momentum correction" in plan.notice and "plain sgd" in plan.notice and "\n" not in plan.notice


@pytest.mark.parametrize("changes", [
    dict(compressor="topk", compressor_args={"ratio": 0.05}),  # no error feedback
    dict(compressor="topk", compressor_args={"ef": True}, optimizer="sgd"),  # no momentum
    dict(compressor="topk", compressor_args={"ef": True}, optimizer_args={"momentum": 0.0}),
    dict(compressor="onebit", optimizer="adam", lr=1e-3),  # adaptive: uncorrected
    dict(compressor="efsignsgd", optimizer="rmsprop", lr=1e-3),
    dict(compressor="powersgd"),  # keeps the optimizer's momentum after it (Vogels et al. 2019, Algorithm 2)
])
def test_without_error_feedback_and_momentum_the_plan_is_the_run_as_configured(changes):
    exp = resolve(BASE.replace(**changes))
    plan = plan_compression(exp, rank=0)
    assert plan.compressor.name == build_compressor(exp.compressor, exp.compressor_args).name
    assert (plan.optimizer, plan.optimizer_args, plan.notice) == (exp.optimizer, exp.optimizer_args, None)


def test_momentum_correction_with_dampening_fails_validation_in_one_line():
    message = one_line_error(BASE.replace(compressor="onebit", optimizer_args={"dampening": 0.1}))
    assert "momentum correction" in message and "dampening 0" in message and "0.1" in message


def test_top_k_with_error_feedback_is_at_least_as_accurate_as_dgc(four_workers):
    results, _ = four_workers
    topk, dgc = CASES["topk:ef"], CASES["dgc"]
    assert topk.args["ratio"] == dgc.args["ratio"] and topk.settings == dgc.settings  # same density and run
    assert results["topk:ef"].comm["compressor"]["name"] == "momentum_correction(ef(topk))"
    assert results["topk:ef"].final_test_accuracy >= results["dgc"].final_test_accuracy


@pytest.mark.parametrize("key", list(CORRECTED))
def test_error_feedback_under_momentum_comes_within_its_bound_of_plain_sgd(four_workers, key):
    results, _ = four_workers
    check = CORRECTED[key]
    run, reference = results[check.run], results[check.reference]
    assert run.config["optimizer"] == "momentum" and reference.config["optimizer"] == "sgd"
    assert run.comm["compressor"]["name"].startswith("momentum_correction(")
    accuracy, plain = run.final_test_accuracy, reference.final_test_accuracy
    print(f"{key}: {accuracy:.3f} under momentum (plain SGD {plain:.3f}, bound {check.bound:.2f}: {check.why})")
    assert accuracy >= plain - check.bound - 1e-9, f"{key}: {accuracy} < {plain} - {check.bound} ({check.why})"


def test_momentum_correction_around_no_compression_is_momentum_sgd(four_workers):
    # Error feedback around `none` drops nothing, so the run sends u = m u + g, torch's momentum buffer, and
    # steps plain SGD: momentum SGD without compression (weight decay off, as for DGC above). The sum over
    # the ranks is the ring's either way, but of the buffers rather than of the gradients.
    results, directory = four_workers
    difference = max_weight_difference(load_weights(directory / "corrected_none"), load_weights(directory / "plain"))
    assert difference <= 1e-5, difference
    assert results[CORRECTED_NONE].comm["compressor"]["name"] == "momentum_correction(ef(none))"


def test_dgc_sending_everything_is_momentum_sgd(four_workers):
    # With ratio 1 and no masking DGC sends u = m u + g, torch's momentum buffer (module docstring of
    # polytrain.compress.dgc), so the run equals momentum SGD without compression only if the optimizer
    # really ran without momentum (with both, momentum would apply twice). Weight decay off: torch adds it
    # inside the momentum buffer, DGC outside. The sparse allreduce sums in another order than the ring.
    results, directory = four_workers
    difference = max_weight_difference(load_weights(directory / "dgc"), load_weights(directory / "plain"))
    assert difference <= 1e-5, difference
    assert results[DGC_TAKEOVER].final_test_accuracy == pytest.approx(results[PLAIN_NO_DECAY].final_test_accuracy,
                                                                    abs=0.002)


def test_dgc_with_adam_fails_validation_in_one_line():
    with pytest.raises(ConfigError) as error:
        resolve(BASE.replace(compressor="dgc", optimizer="adam", lr=1e-3))
    message = str(error.value)
    assert "\n" not in message and "dgc" in message and "adam" in message and "momentum" in message


# -- 5. microbatches: compressed once per step, on the accumulated gradient ----------------------------------


def test_microbatches_compress_the_accumulated_gradient_once(four_workers):
    # Measured 1.5e-8 apart. Compressing each microbatch's half instead (top-k of each half, both sent)
    # ends 8.6e-3 away in a single-process replay of the same 63 steps (at lr 0.02, without momentum
    # correction), so the bound tells the two apart.
    results, directory = four_workers
    difference = max_weight_difference(load_weights(directory / "full_batch"), load_weights(directory / "microbatched"))
    assert difference <= 1e-5, difference
    assert results[MICROBATCHED].config["microbatches"] == 2


# -- 6. sufficient factors in training ------------------------------------------------------------------------


def test_sufficient_factors_train_to_the_dense_weights(three_workers):
    results, directory = three_workers
    assert max_weight_difference(load_weights(directory / "off"), load_weights(directory / "auto")) <= 1e-5
    report = results["auto"].comm["sufficient_factors"]
    assert "sufficient_factors" not in results["off"].comm
    assert report["mode"] == "auto" and report["local_batch"] == 40
    choices = {row["name"]: row["choice"] for row in report["layers"]}
    for row in report["layers"]:
        cheaper = prefers_factors(RING, 40, row["in_features"], row["out_features"], row["bias"], 3)
        assert row["choice"] == ("factors" if cheaper else "dense"), row["name"]
    assert list(choices.values()) == ["factors", "factors", "dense"]
    assert report["factor_layers"] == 2
    for stats in results["auto"].comm["per_rank"]:
        assert stats["by_operation"]["sufficient_factors"] > 0


# -- 7. invalid settings fail before any worker starts --------------------------------------------------------


def one_line_error(exp: Experiment, kind: type[ValueError] = ConfigError) -> str:
    with pytest.raises(kind) as error:
        resolve(exp)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_compressor_with_one_worker_names_allreduce():
    message = one_line_error(Experiment(model="lenet5", dataset="mnist5k", compressor="topk"))
    assert "allreduce" in message and "--workers" in message


def test_unknown_compressor_lists_the_available_ones():
    # Registry misses raise UnknownNameError and bad arguments ValueError, as for models and strategies;
    # both are ValueErrors, which the CLI reports in one line with exit code 2 (ConfigError is one too).
    message = one_line_error(BASE.replace(compressor="bogus"), ValueError)
    assert "bogus" in message and all(name in message for name in COMPRESSORS.names())


def test_bad_compressor_argument_names_the_valid_ones():
    message = one_line_error(BASE.replace(compressor="topk", compressor_args={"ratoi": 0.1}), ValueError)
    assert "ratoi" in message and "ratio" in message and "ef" in message


def test_cli_rejects_an_unknown_compressor_with_exit_code_2():
    completed = subprocess.run([sys.executable, "-m", "polytrain", "train", "--model", "lenet5", "--dataset",
                                "mnist5k", "--workers", "2", "--compressor", "bogus"],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown compressor 'bogus'" in lines[0] and "topk" in lines[0]
