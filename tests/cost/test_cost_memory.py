"""Memory: saved tensors against autograd's own record, optimizer state against torch.optim, and the
predicted training peak against the measured peak of real CPU training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from measured_memory import measured_step_peak
from polytrain.cost import NATURAL_INPUTS, model_cost, registered_model_cost
from polytrain.cost.model import UNCOSTED
from polytrain.cost.memory import OPTIMIZER_STATES
from polytrain.models import MODELS, build_model
from polytrain.train.optim import OPTIMIZERS, build_optimizer


@pytest.mark.parametrize("name", [name for name in MODELS.names() if name not in UNCOSTED])
def test_saved_tensors_are_exactly_what_autograd_keeps(name):
    """`saved_tensors_hooks` sees every tensor autograd saves; the distinct storages among them (parameters,
    buffers and the input excluded) must add up to the formulas' saved tensors, deduplicated the same way
    (a ReLU's output that the next convolution also keeps is one tensor)."""
    shape, classes = NATURAL_INPUTS[name]
    if len(shape) == 3 and shape[1] > 64:
        shape = (3, 64, 64)  # the published architecture still; smaller maps only shorten the test
    with torch.device("meta"):
        model = build_model(name, classes, shape)
    x = torch.empty(2, *shape, device="meta")
    known = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers(), x]}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in known:
            saved[id(storage)] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    predicted = model_cost(model, shape, 2).total.saved_activation_bytes
    assert predicted == sum(storage.nbytes() for storage in saved.values())


def test_optimizer_names_match_polytrains_optimizers():
    assert sorted(OPTIMIZER_STATES) == OPTIMIZERS.names()


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_optimizer_state_bytes_match_torch_optim(optimizer):
    model = build_model("mlp", 10, (1, 8, 8), hidden=(16,))
    opt = build_optimizer(optimizer, model.parameters(), lr=0.1, weight_decay=0.0)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert model_cost(model, (1, 8, 8), optimizer=optimizer).total.optimizer_state_bytes == state


# (model, sample shape, batch, optimizer): the brief's moderate batches; squeezenet1_1 at 64x64 keeps its
# published architecture, mlp with adam exercises the optimizer's temporaries.
STEPS = [
    ("lenet5", (1, 32, 32), 256, "momentum"),
    ("resnet20", (3, 32, 32), 32, "momentum"),
    ("squeezenet1_1", (3, 64, 64), 8, "momentum"),
    ("mlp", (1, 28, 28), 64, "momentum"),
    ("mlp", (1, 28, 28), 64, "adam"),
]


@pytest.mark.parametrize("name, shape, batch, optimizer", STEPS, ids=[f"{s[0]}-{s[3]}" for s in STEPS])
def test_training_memory_is_within_20_percent_of_the_measured_peak(name, shape, batch, optimizer):
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    opt = build_optimizer(optimizer, model.parameters(), lr=0.01, weight_decay=0.0)
    measured = measured_step_peak(model, opt, torch.randn(batch, *shape), torch.randint(0, 10, (batch,)))
    predicted = model_cost(model, shape, batch, optimizer=optimizer).total.training_memory_bytes
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)


class _ConvReLUConv(nn.Sequential):
    def __init__(self, inplace: bool) -> None:
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Flatten(), nn.Linear(16 * 16 * 16, 10))


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_relu_writes_into_its_input(inplace):
    """An in-place ReLU outputs no new tensor and keeps its output, the convolution's output storage;
    the out-of-place one allocates its output and lets the convolution's output go."""
    torch.manual_seed(0)
    model = _ConvReLUConv(inplace)
    cost = model_cost(model, (3, 16, 16), 32)
    relu = cost.layers[1]
    assert relu.activation_bytes == (0 if inplace else 32 * 16 * 16 * 16 * 4)
    assert relu.saved_bytes == 32 * 16 * 16 * 16 * 4  # its output, which conv2 keeps too
    opt = build_optimizer("momentum", model.parameters(), lr=0.01, weight_decay=0.0)
    measured = measured_step_peak(model, opt, torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    assert abs(cost.total.training_memory_bytes - measured) <= 0.2 * measured


def test_recurrent_rows_say_their_memory_follows_the_reference_cell():
    rows = {row.kind: row for row in registered_model_cost("lstm").layers}
    assert "oneDNN" in rows["LSTM"].note
