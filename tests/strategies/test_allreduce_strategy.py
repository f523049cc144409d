"""Synchronous data parallelism: N workers end with the weights of one worker with the same global batch."""

import functools

import pytest
import torch
import torch.nn.functional as F

from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.config import Experiment
from polytrain.launch import run_workers
from polytrain.models import build_model
from polytrain.comm.mesh import Mesh, MeshShape
from polytrain.strategies.allreduce import AllReduce, AllReduceArgs
from polytrain.train import train
from polytrain.train.defaults import resolve
from polytrain.train.loop import Trainer
from polytrain.train.progress import SilentReporter
from polytrain.train.result import max_weight_difference

ALGORITHMS = ["native", "central", "tree", "butterfly", "ring", "rabenseifner"]
# One epoch of LeNet-5 on the real MNIST digits; batch 120 divides over 2, 3, 4 and 5 workers. The learning
# rate is 0.02 rather than the default 0.05: at 0.05 with weight decay, reassociated float sums (1e-8 after a
# step) flip a ReLU or max-pool decision during the epoch and the weights part by ~2e-4 -- exactly as much
# as one worker with 2 microbatches parts from one without (see the bitwise test below), so that is
# arithmetic, not the algorithm.
LENET = Experiment(model="lenet5", dataset="mnist5k", epochs=1, batch_size=120, lr=0.02, threads=1)


def final_weights(comm, experiments):
    """Trains each experiment on this rank; returns rank 0's weights and whether all ranks agree."""
    outcomes = []
    for exp in experiments:
        trainer = Trainer(resolve(exp), SilentReporter(), None, comm)
        result = trainer.run()
        state = {key: value.clone() for key, value in trainer.model.state_dict().items()}
        flat = torch.cat([value.reshape(-1).double() for value in state.values()])
        everywhere = [torch.zeros_like(flat) for _ in range(comm.world_size)]
        torch.distributed.all_gather(everywhere, flat)
        identical = all(torch.equal(other, flat) for other in everywhere)
        outcomes.append((state, identical, result.comm) if comm.rank == 0 else (None, identical, None))
    return outcomes


def reference(exp):
    trainer = Trainer(resolve(exp), SilentReporter(), None, None)
    trainer.run()
    return trainer.model.state_dict()


@functools.cache
def lenet_reference():
    """One worker's weights after LENET's epoch, the reference of several tests (computed once)."""
    return reference(LENET)


@pytest.mark.parametrize("workers", [2, 3, 4, 5])
def test_every_algorithm_equals_one_worker(workers):
    single = lenet_reference()
    experiments = [LENET.replace(workers=workers, strategy="allreduce", strategy_args={"algorithm": name})
                   for name in ALGORITHMS]
    outcomes = run_workers(final_weights, workers, (experiments,), threads=1, timeout_s=60)
    for name, (state, identical, _) in zip(ALGORITHMS, outcomes[0]):
        assert identical, f"{name}: ranks disagree"
        assert max_weight_difference(single, state) <= 1e-5, name


def test_two_workers_are_bitwise_one_worker_with_two_microbatches():
    # a + b is the same sum in either order, so at the default settings 2 workers must equal bit for bit
    # one worker that accumulates the same two halves.
    exp = LENET.replace(lr=None)
    single = reference(exp.replace(microbatches=2))
    (state, identical, _), = run_workers(final_weights, 2, ([exp.replace(workers=2, strategy="allreduce")],),
                                        threads=1, timeout_s=60)[0]
    assert identical and max_weight_difference(single, state) == 0.0


def test_buckets_overlap_and_microbatches_do_not_change_the_result():
    single = lenet_reference()
    variants = [{"algorithm": "ring", "bucket_mb": 0.01}, {"algorithm": "ring", "overlap": False},
                {"algorithm": "tree", "bucket_mb": 0.05}]
    experiments = [LENET.replace(workers=2, strategy="allreduce", strategy_args=args) for args in variants]
    experiments.append(LENET.replace(workers=2, strategy="allreduce", microbatches=3))
    # A straggler changes the time of a step, not its arithmetic.
    experiments.append(LENET.replace(workers=2, strategy="allreduce", straggler={"rank": 1, "slowdown": 2}))
    outcomes = run_workers(final_weights, 2, (experiments,), threads=1, timeout_s=60)[0]
    for (state, identical, comm), args in zip(outcomes, variants + [{"microbatches": 3}, {"straggler": 1}]):
        assert identical and max_weight_difference(single, state) <= 1e-5, args
    assert outcomes[0][2]["buckets"] > 1
    slowed = outcomes[-1][2]
    assert slowed["straggler"]["rank"] == 1 and slowed["straggler"]["waited_s"] > 0
    assert "straggler_wait_s" in slowed["per_rank"][1] and "straggler" not in outcomes[0][2]


def test_counted_bytes_equal_the_algorithms_volume():
    exp = LENET.replace(workers=3, strategy="allreduce", strategy_args={"algorithm": "ring", "bucket_mb": 0.1})
    (state, _, comm), = run_workers(final_weights, 3, ([exp],), threads=1, timeout_s=60)[0]
    model_bytes = sum(value.numel() * 4 for value in state.values())
    assert comm["algorithm"] == "ring" and comm["buckets"] >= 2
    ring = ALLREDUCE_ALGORITHMS.get("ring")
    steps = -(-4000 // 120)
    # Every step reduces every gradient once; the epoch's metric sums (3 and 2 float64 numbers, by the ring)
    # are bookkeeping, counted apart.
    for rank, stats in enumerate(comm["per_rank"]):
        gradient_bytes = sum(stats["by_operation"].values())
        assert gradient_bytes >= steps * ring.bytes_sent(model_bytes, 3, rank) * 0.99
        assert stats["bytes_sent"] == gradient_bytes
        assert stats["by_axis"]["bookkeeping"] == {"allreduce:ring": ring.bytes_sent(24, 3, rank, 8)
                                                   + ring.bytes_sent(16, 3, rank, 8)}
        assert stats["bookkeeping"]["bytes_sent"] == sum(stats["by_axis"]["bookkeeping"].values())
    assert comm["bytes_sent_per_step"] == comm["bytes_sent"] / steps


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10, (1, 8, 8))


def batch_of_digits():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, 8, 8, generator=generator), torch.randint(0, 10, (12,), generator=generator)


def gradients_with_batch_norm(comm, sync_bn):
    """One data-parallel step of ResNet-20 (batch norm in every block) on this rank's share of 12 samples."""
    strategy = AllReduce(Mesh.build(MeshShape(dp=comm.world_size), comm), AllReduceArgs(sync_bn=sync_bn))
    model = resnet20()
    model = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batch_of_digits()
    x, y = x.tensor_split(comm.world_size)[comm.rank], y.tensor_split(comm.world_size)[comm.rank]
    strategy.before_backward(True)
    (F.cross_entropy(model(x), y, reduction="sum") / 12).backward()
    strategy.reduce_gradients()
    with strategy.evaluation_model(model):
        pass
    strategy.close()
    return {name: p.grad for name, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("workers", [2, 3])
def test_synchronized_batch_norm_gives_the_global_batch_gradient(workers):
    # Per step rather than per epoch: on 8x8 digits the deepest ResNet-20 maps are 2x2, so batch norm
    # divides by tiny variances and float reassociation grows chaotically over an epoch.
    model = resnet20()
    x, y = batch_of_digits()
    (F.cross_entropy(model(x), y, reduction="sum") / 12).backward()
    synced, local = run_workers(gradients_with_batch_norm, workers, (True,), threads=1)[0], \
        run_workers(gradients_with_batch_norm, workers, (False,), threads=1)[0]
    for name, param in model.named_parameters():
        scale = param.grad.abs().max().item() + 1e-12
        assert (synced[0][name] - param.grad).abs().max().item() <= 1e-5 * scale, name
    assert max((local[0][n] - p.grad).abs().max().item() for n, p in model.named_parameters()) > 1e-3
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            assert torch.allclose(synced[1][name], buffer, rtol=1e-5, atol=1e-6), name


def test_spawned_workers_through_the_public_api(tmp_path):
    result = train(LENET.replace(workers=2, strategy="allreduce", strategy_args={"algorithm": "ring"},
                                 out=str(tmp_path)))
    assert result.config["workers"] == 2 and result.comm["bytes_sent"] > 0
    assert result.epochs[0]["samples"] == 4000  # rates and training metrics count every rank's samples
    assert (tmp_path / "result.json").exists() and len(result.comm["per_rank"]) == 2


def test_large_batch_schedules_work_with_workers():
    # Linear scaling with warm-up (Goyal et al.) and batch growth (Smith et al.) on 2 workers equal 1 worker.
    exp = Experiment(model="mlp", dataset="digits", epochs=3, batch_size=32, lr=0.02, threads=1,
                     lr_reference_batch=16, warmup_epochs=1.0, schedule="batchgrow",
                     schedule_args={"milestones": [1, 2], "factor": 2})
    single = reference(exp)
    (state, identical, _), = run_workers(final_weights, 2, ([exp.replace(workers=2)],), threads=1,
                                        timeout_s=60)[0]
    assert identical and max_weight_difference(single, state) <= 1e-5
