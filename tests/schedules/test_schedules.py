"""Step schedules are data: the action lists, and their execution against the full-batch gradient."""

import pytest
import torch
import torch.nn.functional as F

from polytrain.models import build_model
from polytrain.schedules import STEP_SCHEDULES, Accumulate, Action, StepContext, run_actions


def model_and_batch():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8)).double()
    generator = torch.Generator().manual_seed(1)
    return model, torch.randn(12, 1, 8, 8, generator=generator, dtype=torch.float64), \
        torch.randint(0, 10, (12,), generator=generator)


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulate_is_forward_then_backward_of_each_microbatch():
    assert STEP_SCHEDULES.get("accumulate") is Accumulate
    assert Accumulate().actions(2, stage=0) == [Action("forward", 0), Action("backward", 0),
                                                Action("forward", 1), Action("backward", 1)]


@pytest.mark.parametrize("order", ["accumulate", "all forwards first"])
def test_any_order_of_microbatches_gives_the_full_batch_gradient(order):
    model, x, y = model_and_batch()
    (F.cross_entropy(model(x), y, reduction="sum") / 12).backward()
    reference = gradients(model)
    model.zero_grad(set_to_none=True)
    actions = Accumulate().actions(3) if order == "accumulate" else \
        [Action("forward", i) for i in range(3)] + [Action("backward", i) for i in (2, 1, 0)]
    seen = []
    output = run_actions(actions, model, x, y, 3, StepContext(12, before_backward=seen.append))
    assert seen == [False, False, True]  # the policy learns which backward is the last
    assert output.loss_sum == pytest.approx(F.cross_entropy(model(x), y, reduction="sum").item())
    for got, want in zip(gradients(model), reference):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_pipeline_actions_need_a_pipeline_runtime():
    model, x, y = model_and_batch()
    with pytest.raises(ValueError, match="action send_activation needs a pipeline runtime"):
        run_actions([Action("forward", 0), Action("send_activation", 0)], model, x, y, 1, StepContext(12))
