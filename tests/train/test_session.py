"""The loop-level API in one process: a hand-written loop on a Session equals polytrain's Trainer, checkpoints
resume bit for bit, misuse is a one-line error. Several processes: tests/train/test_own_loop_example.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import polytrain
from polytrain.config import ConfigError, Experiment
from polytrain.data import load_dataset
from polytrain.models import build_model
from polytrain.train.loop import Trainer
from polytrain.train.defaults import resolve
from polytrain.train.progress import SilentReporter

SETTINGS = dict(model="lenet5", dataset="digits", epochs=2, batch_size=32, optimizer="momentum", lr=0.02,
                weight_decay=0.0, schedule="constant", augment_shift=0, augment_flip=False)


def own_loop(session: polytrain.Session, epochs: range, model=None, optimizer=None):
    """The loop a user writes: the digits split, lenet5, SGD with momentum, plain cross-entropy."""
    data = load_dataset("digits", seed=0)
    if model is None:
        torch.manual_seed(0)
        model = build_model("lenet5", 10, data.in_shape)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        model, optimizer = session.setup(model, optimizer)
    train_set = TensorDataset(data.x_train, data.y_train)
    for epoch in epochs:
        for x, y in session.loader(train_set, batch_size=32, epoch=epoch):
            optimizer.zero_grad()
            session.backward(F.cross_entropy(model(x), y))
            session.step()
    return model, optimizer


def test_an_own_loop_on_a_session_equals_the_trainer():
    trainer = Trainer(resolve(Experiment(**SETTINGS)), SilentReporter(), None)
    trainer.run()
    model, _ = own_loop(polytrain.setup(), range(2))
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_session_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    whole, _ = own_loop(polytrain.setup(), range(2))
    first = polytrain.setup()
    own_loop(first, range(1))
    first.save(tmp_path / "run.pt", {"epoch": 1})
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    resumed = polytrain.setup()
    torch.manual_seed(123)  # other initial weights: the checkpoint must replace them
    data = load_dataset("digits", seed=0)
    model = build_model("lenet5", 10, data.in_shape)
    model, optimizer = resumed.setup(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))
    assert resumed.load(tmp_path / "run.pt")["epoch"] == 1 and resumed.global_step == first.global_step
    own_loop(resumed, range(1, 2), model, optimizer)
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in model.state_dict().items())


def test_metrics_sum_and_shares_in_one_process():
    session = polytrain.setup()
    assert session.sum({"correct": 3, "samples": 4.0}) == {"correct": 3.0, "samples": 4.0}
    assert session.share(10) == range(0, 10) and session.world_size == 1 and session.strategy == "local"


def test_misuse_is_a_one_line_error():
    session = polytrain.setup()
    with pytest.raises(RuntimeError, match="call session.setup"):
        session.step()
    model = torch.nn.Linear(2, 2)
    session.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="called twice"):
        session.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="strategy allreduce needs at least 2"):
        polytrain.setup(strategy="allreduce").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="unknown amp 'fp8'"):
        polytrain.setup(amp="fp8")
    with pytest.raises(ConfigError, match="needs a strategy that sums gradients"):
        polytrain.setup(compressor="fp16").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_error_feedback_moves_a_user_optimizers_momentum_in_front_of_the_compressor():
    from polytrain.train.compression import compress_for

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compressor, notice = compress_for("topk", {"ratio": 0.5, "ef": True}, optimizer, rank=0)
    assert compressor.name.startswith("momentum_correction") and "momentum correction" in notice
    assert optimizer.param_groups[0]["momentum"] == 0.0
    adam = torch.optim.Adam(model.parameters())
    compressor, notice = compress_for("topk", {"ratio": 0.5, "ef": True}, adam, rank=0)
    assert notice is None and adam.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ConfigError, match="needs torch.optim.SGD; got Adam"):
        compress_for("dgc", {}, adam, rank=0)



STRATEGIES_IN_AN_OWN_LOOP = [
    ("allreduce", {"algorithm": "ring"}, None, {}),
    ("allreduce", {"algorithm": "butterfly", "bucket_mb": 0.01}, None, {}),
    ("local_sgd", {"period": 1}, None, {}),
    ("diloco", {"period": 2, "outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}, None, {}),
    ("local_sgd", {"period": 2}, None, {}),
    ("allreduce", {}, "topk", {"ratio": 0.05, "ef": True}),
    ("gossip", {"topology": "complete"}, None, {}),
    ("easgd", {"alpha": 0.0, "tau": 1}, None, {}),
    ("local_sgd", {"period": 10**9}, None, {}),
    ("hogwild", {}, None, {}),
    ("adpsgd", {"topology": "ring"}, None, {}),
]


def own_loops_on_ranks(comm):
    """Rank's side: the same hand-written loop under each policy; rank 0 returns its weights after the last
    step and after `finish`, and the counted bytes."""
    from polytrain.train.session import Session

    outcomes = []
    for strategy, args, compressor, compressor_args in STRATEGIES_IN_AN_OWN_LOOP:
        session = Session(comm, strategy=strategy, strategy_args=args, compressor=compressor,
                          compressor_args=compressor_args)
        model, _ = own_loop(session, range(1))
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        session.finish()
        stats = session.comm_stats()
        session.close()
        outcomes.append(({k: v.clone() for k, v in model.state_dict().items()}, stats["bytes_sent"], trained))
    return outcomes if comm.rank == 0 else None


def test_every_update_policy_runs_unchanged_in_an_own_loop():
    from polytrain.launch import run_workers

    single, _ = own_loop(polytrain.setup(), range(1))
    outcomes = run_workers(own_loops_on_ranks, 2, threads=1, timeout_s=60)[0]
    weights = {i: state for i, (state, _, _) in enumerate(outcomes)}
    sent = [bytes_sent for _, bytes_sent, _ in outcomes]
    for i in (0, 1, 2, 6):  # allreduce with two algorithms, local SGD with H = 1, gossip on the complete graph
        for name, value in single.state_dict().items():
            torch.testing.assert_close(weights[i][name], value, atol=1e-5, rtol=1e-4)
    # EASGD with alpha = 0 is independent workers: the replicas local SGD trains before its only average.
    independent, never_averaged = outcomes[7][2], outcomes[8][2]
    assert all(torch.equal(independent[name], value) for name, value in never_averaged.items())
    assert not all(torch.equal(independent[name], value) for name, value in single.state_dict().items())
    for name, value in weights[4].items():  # DiLoCo with outer SGD lr 1 is local SGD with H = 2
        torch.testing.assert_close(weights[3][name], value, atol=1e-5, rtol=1e-4)
    assert sent[4] < 0.6 * sent[2]  # averaging every second step sends half as much
    assert sent[5] < 0.5 * sent[0]  # top-k 5 % with error feedback sends far less than dense
    # Hogwild's two ranks step one model in shared memory: no byte sent, and it trained as far as one worker
    # (in expectation the same steps; the lock-free interleaving is timing's).
    assert sent[9] == 0
    gap = max((weights[9][name] - value).abs().max().item() for name, value in single.state_dict().items())
    assert 0 < gap < 0.1
    # AD-PSGD's active rank 0 averages with rank 1 after each of its steps, and the pairs complete by
    # themselves before `finish` averages the two (the loop calls nothing of its own).
    gap = max((weights[10][name] - value).abs().max().item() for name, value in single.state_dict().items())
    assert 0 < gap < 0.1 and sent[10] > 0  # measured: 0.025


RESUMED_IN_AN_OWN_LOOP = [("gossip", {"topology": "ring"}), ("easgd", {"tau": 4})]


def resumed_loops_on_ranks(comm, directory):
    """Rank's side: two epochs straight, and one epoch, a checkpoint and a resumed epoch, for each policy whose
    replicas differ between ranks (digits: 45 steps an epoch, so EASGD is cut 1 step after a pull)."""
    from polytrain.train.session import Session

    outcomes = []
    for strategy, args in RESUMED_IN_AN_OWN_LOOP:
        sessions = [Session(comm, strategy=strategy, strategy_args=args) for _ in range(3)]
        straight, _ = own_loop(sessions[0], range(2))
        own_loop(sessions[1], range(1))
        sessions[1].save(f"{directory}/{strategy}.pt", {"epoch": 1})
        torch.manual_seed(123)  # other initial weights: the checkpoint must replace them
        model = build_model("lenet5", 10, (1, 8, 8))
        model, optimizer = sessions[2].setup(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))
        sessions[2].load(f"{directory}/{strategy}.pt")
        resumed, _ = own_loop(sessions[2], range(1, 2), model, optimizer)
        outcomes.append(all(torch.equal(value, resumed.state_dict()[name])
                            for name, value in straight.state_dict().items()))
        for session in sessions:
            session.close()
    return outcomes


def test_replicas_that_differ_resume_bit_for_bit_at_the_same_world_size(tmp_path):
    from polytrain.launch import run_workers

    outcomes = run_workers(resumed_loops_on_ranks, 2, (str(tmp_path),), threads=1, timeout_s=60)
    assert outcomes == [[True, True], [True, True]]  # every rank's replica, every policy
