import math

import pytest
import torch

from polytrain.config import Experiment, apply_overrides, load_toml, parse_assignments
from polytrain.train.defaults import resolve
from polytrain.train.optim import OPTIMIZERS, build_optimizer, build_schedule, optimizer_defaults


def schedule(name, args=None, **kw):
    settings = dict(lr=0.1, epochs=10, batch_size=32, warmup_epochs=0.0, lr_reference_batch=None)
    settings.update(kw)
    return build_schedule(name, args or {}, **settings)


# (name, optimizer_args, the torch.optim class and keywords it must equal); {} takes the defaults.
STEPS = [
    ("sgd", {}, torch.optim.SGD, {}),
    ("momentum", {}, torch.optim.SGD, {"momentum": 0.9}),
    ("momentum", {"momentum": 0.8, "dampening": 0.1}, torch.optim.SGD, {"momentum": 0.8, "dampening": 0.1}),
    ("momentum", {"nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("nesterov", {}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adagrad", {}, torch.optim.Adagrad, {}),
    ("adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1}, torch.optim.Adagrad,
     {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("rmsprop", {}, torch.optim.RMSprop, {}),
    ("rmsprop", {"alpha": 0.9, "momentum": 0.5, "centered": True}, torch.optim.RMSprop,
     {"alpha": 0.9, "momentum": 0.5, "centered": True}),
    ("adam", {}, torch.optim.Adam, {}),
    ("adam", {"betas": [0.8, 0.99], "amsgrad": True}, torch.optim.Adam, {"betas": (0.8, 0.99), "amsgrad": True}),
    ("adamw", {}, torch.optim.AdamW, {}),
    ("adamw", {"eps": 1e-6}, torch.optim.AdamW, {"eps": 1e-6}),
]


@pytest.mark.parametrize("name, args, torch_class, options", STEPS)
def test_optimizer_steps_equal_torch_optims(name, args, torch_class, options):
    torch.manual_seed(0)
    ours = torch.randn(5, requires_grad=True)
    reference = ours.detach().clone().requires_grad_(True)
    opt_ours = build_optimizer(name, [ours], lr=0.01, weight_decay=1e-3, args=args)
    opt_ref = torch_class([reference], lr=0.01, weight_decay=1e-3, **options)
    for _ in range(3):
        for param, opt in ((ours, opt_ours), (reference, opt_ref)):
            opt.zero_grad()
            (param ** 3).sum().backward()
            opt.step()
    assert torch.equal(ours, reference)
    assert sorted(OPTIMIZERS.names()) == ["adagrad", "adam", "adamw", "momentum", "nesterov", "rmsprop", "sgd"]


def test_defaults_are_torchs_except_sgd_momentum():
    assert optimizer_defaults("sgd") == {}
    assert optimizer_defaults("momentum") == {"momentum": 0.9, "dampening": 0, "nesterov": False}
    assert optimizer_defaults("nesterov") == {"momentum": 0.9}
    assert optimizer_defaults("adam") == {"betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}
    assert optimizer_defaults("adamw") == {"betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}
    assert optimizer_defaults("rmsprop") == {"alpha": 0.99, "eps": 1e-8, "momentum": 0, "centered": False}
    assert optimizer_defaults("adagrad") == {"lr_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10}


def test_resolve_makes_every_optimizer_argument_explicit():
    base = Experiment(model="mlp", dataset="synthetic", optimizer="adam", lr=1e-3)
    assert resolve(base).optimizer_args == {"betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}
    exp = resolve(base.replace(optimizer_args={"eps": 1e-6}))
    assert exp.optimizer_args == {"betas": [0.9, 0.999], "eps": 1e-6, "amsgrad": False}
    assert resolve(Experiment(model="mlp", dataset="synthetic")).optimizer_args["momentum"] == 0.9


def test_optimizer_args_come_from_set_and_toml(tmp_path):
    exp = apply_overrides(Experiment(), parse_assignments(["optimizer_args.momentum=0.8",
                                                           "optimizer_args.betas=[0.9,0.99]"]))
    assert exp.optimizer_args == {"momentum": 0.8, "betas": [0.9, 0.99]}
    path = tmp_path / "run.toml"
    path.write_text('optimizer = "rmsprop"\n[optimizer_args]\nalpha = 0.9\ncentered = true\n')
    assert apply_overrides(Experiment(), load_toml(path)).optimizer_args == {"alpha": 0.9, "centered": True}


@pytest.mark.parametrize("name, args, message", [
    ("adam", {"momentum": 0.9}, "optimizer adam takes no argument 'momentum'; valid: betas, eps, amsgrad$"),
    ("sgd", {"momentum": 0.9}, "optimizer sgd takes no argument 'momentum'; valid: none$"),
    ("nesterov", {"nesterov": False}, "optimizer nesterov takes no argument 'nesterov'; valid: momentum$"),
    ("momentum", {"momentum": 1.0}, r"optimizer_args.momentum must be a number in \[0, 1\), got 1.0"),
    ("adam", {"betas": [1.5, 0.999]}, r"optimizer adam with .*: Invalid beta parameter at index 0: 1.5"),
    ("adam", {"betas": 0.9}, "optimizer adam with .*: "),
])
def test_bad_optimizer_arguments_fail_resolve_in_one_line(name, args, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve(Experiment(model="mlp", dataset="synthetic", optimizer=name, optimizer_args=args))
    assert "\n" not in str(error.value)


def test_step_schedule_decays_at_milestones():
    s = schedule("step", {"milestones": [3, 6], "gamma": 0.5})
    assert [s.lr_at(e, 0, 10) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert s.lr_at(2, 9, 10) == pytest.approx(0.1)  # decays at the epoch boundary, not inside it


def test_poly_schedule_is_firecaffes():
    s = schedule("poly")  # power 0.5: lr0 * (1 - iter/max_iter) ** 0.5
    assert s.lr_at(2, 5, 10) == pytest.approx(0.1 * (1 - 2.5 / 10) ** 0.5)
    assert schedule("poly", {"power": 1.0}).lr_at(5, 0, 10) == pytest.approx(0.05)


def test_cosine_schedule():
    s = schedule("cosine")
    assert s.lr_at(0, 0, 10) == pytest.approx(0.1)
    assert s.lr_at(5, 0, 10) == pytest.approx(0.05)
    assert s.lr_at(7, 5, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 7.5 / 10)))


def test_linear_scaling_rule_with_warmup_goyal():
    # Goyal et al.: batch kn gets lr k*eta, reached by a linear ramp from eta over the warm-up.
    s = schedule("constant", lr=0.1, batch_size=1024, lr_reference_batch=256, warmup_epochs=2)
    assert s.peak_lr == pytest.approx(0.4)
    steps = 10
    assert s.lr_at(0, 0, steps) == pytest.approx(0.1 + 0.3 * (1 / steps) / 2)
    assert s.lr_at(0, 9, steps) == pytest.approx(0.1 + 0.3 * 0.5)
    assert s.lr_at(1, 9, steps) == pytest.approx(0.4)
    assert s.lr_at(5, 3, steps) == pytest.approx(0.4)


def test_warmup_without_scaling_ramps_from_zero():
    s = schedule("cosine", warmup_epochs=1)
    assert s.lr_at(0, 0, 4) == pytest.approx(0.1 * 0.25)
    assert s.lr_at(0, 3, 4) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.75 / 10)))


def test_batch_growth_replaces_decay_smith():
    s = schedule("batchgrow", {"milestones": [2, 4, 6], "factor": 2, "max_growth": 4})
    assert [s.batch_size_at(e) for e in range(8)] == [32, 32, 64, 64, 128, 128, 128, 128]
    assert [s.lr_at(e, 0, 5) for e in (0, 3, 5, 6, 7)] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="schedule step takes no argument 'gama'; valid: milestones, gamma"):
        schedule("step", {"gama": 0.5})
    with pytest.raises(ValueError, match="schedule cosine takes no argument 'x'; valid: none"):
        schedule("cosine", {"x": 1})
