"""Recurrent sequence classifiers (LSTM, GRU) that read a sample as a sequence of feature vectors."""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, require_int


class SequenceClassifier(nn.Module):
    """Runs a stacked recurrent network over a sample's steps and classifies from the last hidden state.

    A sample of shape (L,) is L steps of 1 feature, (C, L) is L steps of C features (channels first, as
    `nn.Conv1d` expects), and (C, H, W) is H steps of C*W features (an image read row by row).

    Args:
        cell: `nn.LSTM` or `nn.GRU`.
        in_shape: one sample's shape, (L,), (C, L) or (C, H, W).
        num_classes: output classes.
        hidden_size: features of the hidden state.
        num_layers: stacked recurrent layers.
    """

    def __init__(
        self,
        cell: type[nn.LSTM] | type[nn.GRU],
        in_shape: tuple[int, ...],
        num_classes: int,
        hidden_size: int,
        num_layers: int,
    ) -> None:
        super().__init__()
        self.sample_rank = len(in_shape)
        self.rnn = cell(_step_features(in_shape), hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for samples x (N, *in_shape)."""
        _, state = self.rnn(self.to_steps(x))
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        return self.fc(h_n[-1])  # h_n: (num_layers, N, hidden_size); [-1] is the top layer

    def to_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Samples x (N, *in_shape) as sequences (N, steps, features)."""
        if self.sample_rank == 1:
            return x.unsqueeze(-1)  # (N, L) -> (N, L, 1)
        if self.sample_rank == 2:
            return x.transpose(1, 2)  # (N, C, L) -> (N, L, C)
        return x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C*W)


def _step_features(in_shape: tuple[int, ...]) -> int:
    """Features per step: 1 for (L,), C for (C, L), C*W for (C, H, W)."""
    if len(in_shape) == 1:
        return 1
    if len(in_shape) == 2:
        return in_shape[0]
    return in_shape[0] * in_shape[2]


def _sequence_model(
    name: str,
    cell: type[nn.LSTM] | type[nn.GRU],
    num_classes: int,
    in_shape: tuple[int, ...],
    hidden_size: int,
    num_layers: int,
) -> SequenceClassifier:
    """Checks the shape and metaparameters of a recurrent classifier, then builds it."""
    if not 1 <= len(in_shape) <= 3:
        raise ValueError(f"model {name} needs samples shaped (L,), (C, L) or (C, H, W); got shape {in_shape}")
    require_int(name, "hidden_size", hidden_size)
    require_int(name, "num_layers", num_layers)
    return SequenceClassifier(cell, in_shape, num_classes, hidden_size, num_layers)


@MODELS.register("lstm")
@checked
def lstm(
    num_classes: int, in_shape: tuple[int, ...], *, hidden_size: int = 128, num_layers: int = 1
) -> nn.Module:
    """LSTM classifier (Hochreiter & Schmidhuber 1997, PyTorch's `nn.LSTM` cell); see `SequenceClassifier`."""
    return _sequence_model("lstm", nn.LSTM, num_classes, in_shape, hidden_size, num_layers)


@MODELS.register("gru")
@checked
def gru(
    num_classes: int, in_shape: tuple[int, ...], *, hidden_size: int = 128, num_layers: int = 1
) -> nn.Module:
    """GRU classifier (Cho et al. 2014, PyTorch's `nn.GRU` cell); see `SequenceClassifier`."""
    return _sequence_model("gru", nn.GRU, num_classes, in_shape, hidden_size, num_layers)
