"""Mixed precision on the CPU: autocast bf16/fp16 trains as float32 does, and fp16's loss scale is checkpointed."""

import pytest
import torch

from polytrain.config import ConfigError, Experiment
from polytrain.train import train
from polytrain.train.checkpoint import checkpoint_path, load_checkpoint
from polytrain.train.result import load_weights

MLP = Experiment(model="mlp", dataset="digits", epochs=2, threads=1)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_reduced_precision_forward_trains_like_float32(tmp_path, amp):
    full = train(MLP)
    reduced = train(MLP.replace(amp=amp, out=str(tmp_path)))
    assert reduced.config["amp"] == amp
    # bf16 keeps 8 bits of mantissa, fp16 11: the runs part, but not by much after two epochs.
    assert abs(reduced.final_test_accuracy - full.final_test_accuracy) <= 0.03
    if amp == "fp16":
        scaler = load_checkpoint(checkpoint_path(tmp_path))["amp"]
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # steps since the last overflow


def test_fp16_resume_equals_uninterrupted(tmp_path):
    exp = MLP.replace(amp="fp16", schedule="constant")
    whole = tmp_path / "whole"
    train(exp.replace(out=str(whole)))
    cut = tmp_path / "cut"
    train(exp.replace(epochs=1, out=str(cut)))
    train(exp.replace(out=str(cut)), resume=cut)
    assert all(torch.equal(a, b) for a, b in zip(load_weights(whole).values(), load_weights(cut).values()))


def test_unknown_amp_and_missing_gpu_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown amp 'fp8'; expected none, bf16, fp16"):
        train(MLP.replace(amp="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device cuda: torch sees no GPU here"):
            train(MLP.replace(device="cuda"))
