import json

import pytest
import torch

from polytrain.config import ConfigError, Experiment
from polytrain.train import TrainingDiverged, train
from polytrain.train.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from polytrain.train.result import load_weights

# Small real runs: scikit-learn's digits (1,437 train / 360 test samples) and LeNet-5 or an MLP.
FAST = Experiment(dataset="digits", model="mlp", epochs=2, batch_size=64, lr=0.05, schedule="cosine",
                  threads=1)


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), key


def test_same_seed_same_weights(tmp_path):
    for name in ("a", "b"):
        train(FAST.replace(model="lenet5", out=str(tmp_path / name), seed=7))
    assert_same_weights(load_weights(tmp_path / "a"), load_weights(tmp_path / "b"))
    train(FAST.replace(model="lenet5", out=str(tmp_path / "c"), seed=8))
    a, c = load_weights(tmp_path / "a"), load_weights(tmp_path / "c")
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_microbatches_equal_the_full_batch(tmp_path):
    # LeNet-5 has no batch norm, so gradient accumulation over 4 microbatches is the full-batch gradient.
    base = FAST.replace(model="lenet5", epochs=1, optimizer="sgd")
    train(base.replace(out=str(tmp_path / "full")))
    train(base.replace(out=str(tmp_path / "micro"), microbatches=4))
    assert_same_weights(load_weights(tmp_path / "full"), load_weights(tmp_path / "micro"), atol=1e-5)


class Interrupt(Exception):
    pass


def stop_at(step):
    def on_step(global_step):
        if global_step == step:
            raise Interrupt

    return on_step


@pytest.mark.parametrize("stop_step", [23, 30])  # mid-epoch (after the step-20 checkpoint) and epoch end
def test_resumed_run_equals_uninterrupted(tmp_path, stop_step):
    # 23 steps per epoch; augmentation and data order change every epoch and must resume exactly.
    exp = FAST.replace(model="lenet5", epochs=3, optimizer="momentum", checkpoint_steps=10, augment_shift=1,
                       augment_flip=True)
    train(exp.replace(out=str(tmp_path / "whole")))
    with pytest.raises(Interrupt):
        train(exp.replace(out=str(tmp_path / "cut")), on_step=stop_at(stop_step))
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = train(exp.replace(out=str(tmp_path / "cut")), resume=tmp_path / "cut")
    assert_same_weights(load_weights(tmp_path / "whole"), load_weights(tmp_path / "cut"))
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert [e["test_accuracy"] for e in whole["epochs"]] == [e["test_accuracy"] for e in resumed.epochs]


def test_resume_refuses_other_settings(tmp_path):
    train(FAST.replace(epochs=1, out=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"cannot resume .* with lr=0.1: the checkpoint was trained with lr=0.05"):
        train(FAST.replace(epochs=2, lr=0.1, out=str(tmp_path)), resume=tmp_path)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(FAST.replace(out=str(tmp_path)))


def test_corrupt_or_truncated_checkpoint_is_never_loaded(tmp_path):
    train(FAST.replace(epochs=1, out=str(tmp_path)))
    path = checkpoint_path(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        train(FAST.replace(epochs=2, out=str(tmp_path)), resume=tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a polytrain checkpoint"):
        load_checkpoint(path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    exp = FAST.replace(model="lenet5", epochs=3, lr=1e6, schedule="constant", optimizer="sgd",
                       checkpoint_steps=1, out=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step (\d+) .*last good checkpoint kept"):
        train(exp)
    state = load_checkpoint(checkpoint_path(tmp_path))
    assert all(torch.isfinite(p).all() for p in state["model"].values())
    assert not (tmp_path / "result.json").exists()


def test_out_dir_holds_the_contract_files(tmp_path):
    result = train(FAST.replace(out=str(tmp_path), target=0.5))
    data = json.loads((tmp_path / "result.json").read_text())
    for key in ("config", "final_test_accuracy", "best_test_accuracy", "time_to_target_s", "wall_s",
                "samples_per_s", "epochs", "comm", "environment"):
        assert key in data, key
    assert data["config"]["model"] == "mlp" and data["config"]["optimizer"] == "momentum"
    assert None not in (data["config"]["epochs"], data["config"]["batch_size"], data["config"]["lr"])
    assert set(data["comm"]) >= {"bytes_sent", "bytes_received", "messages", "bytes_sent_per_step", "per_rank"}
    assert set(data["environment"]) >= {"git_sha", "python", "torch", "numpy", "cpu", "cores", "threads",
                                        "hostname", "seed", "argv"}
    assert 0 <= data["final_test_accuracy"] <= 1 and data["final_test_accuracy"] == result.final_test_accuracy
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert data["epochs"][1]["test_accuracy"] == json.loads(lines[1])["test_accuracy"]
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert data["time_to_target_s"] is not None and data["time_to_target_s"] <= data["wall_s"]


@pytest.mark.parametrize("changes, message", [
    (dict(workers=3, batch_size=100), "global batch 100 is not divisible by 3 workers"),
    (dict(workers=2, strategy="local"), "--workers 2 needs a parallel strategy"),
    (dict(microbatches=100), "100 microbatches cannot split a per-worker batch of 64"),
    (dict(model="rsnet20"), "unknown model 'rsnet20'; available: "),
    (dict(optimizer="adamm"), "unknown optimizer 'adamm'; available: adagrad, adam, adamw, momentum"),
    (dict(warmup_epochs=5), "warm-up of 5.0 epochs must be >= 0 and shorter than the 2 epochs"),
    (dict(target=97.0), r"target accuracy must be a fraction in \(0, 1\], got 97.0"),
    (dict(dataset="mnist1d", augment_shift=2), r"augmentation needs image samples \(C, H, W\); dataset mnist1d"),
])
def test_bad_settings_explain_themselves(changes, message):
    with pytest.raises(ValueError, match=message):
        train(FAST.replace(**changes))


def test_top_level_api():
    import polytrain
    import polytrain.train.checkpoint  # submodules stay importable beside the train() function

    result = polytrain.train(polytrain.Experiment(dataset="digits", model="mlp", epochs=1, threads=1))
    assert isinstance(result, polytrain.Result) and result.config["dataset"] == "digits"


def test_weights_of_different_models_are_not_compared():
    from polytrain.models import build_model
    from polytrain.train.result import max_weight_difference

    lenet = build_model("lenet5", 10, (1, 8, 8)).state_dict()
    assert max_weight_difference(lenet, lenet) == 0.0
    with pytest.raises(ValueError, match="not of the same model: their keys or shapes differ"):
        max_weight_difference(lenet, build_model("mlp", 10, (1, 8, 8)).state_dict())
