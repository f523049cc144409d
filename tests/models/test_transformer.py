"""The GPT language model: shapes, causality, tied weights, parameter counts, argument errors, it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.models import build_model
from polytrain.models.transformer import GPT_SIZES


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


@pytest.mark.parametrize("size", sorted(GPT_SIZES))
def test_parameter_count_is_the_formula(size):
    layers, heads, width = GPT_SIZES[size]
    vocab, context = 256, 64
    per_block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)
    expected = vocab * width + context * width + layers * per_block + 2 * width  # embeddings, blocks, ln_f
    assert parameters(build_model("gpt", vocab, (context,), size=size)) == expected
    untied = build_model("gpt", vocab, (context,), size=size, tie_weights=False)
    assert parameters(untied) == expected + vocab * width


def test_shapes_tied_weights_and_overrides():
    model = build_model("gpt", 50, (16,), layers=1, heads=4, width=32)
    assert len(model.blocks) == 1 and model.blocks[0].attn.qkv.out_features == 96
    assert model.head.weight is model.tok.weight
    logits = model(torch.randint(0, 50, (3, 10)))  # fewer positions than the context
    assert logits.shape == (3, 10, 50) and torch.isfinite(logits).all()


def test_a_token_never_changes_the_logits_before_it():
    torch.manual_seed(0)
    model = build_model("gpt", 30, (12,)).eval()
    tokens = torch.randint(0, 30, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 30
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_a_few_steps_learn_a_repeated_sequence():
    torch.manual_seed(0)
    model = build_model("gpt", 16, (32,))
    tokens = torch.arange(33).remainder(16).repeat(4, 1)
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("in_shape, args, message", [
    ((16,), {"size": "huge"}, "unknown size 'huge'; expected tiny, small, medium"),
    ((1, 16), {}, r"needs token sequences \(T,\); got sample shape \(1, 16\)"),
    ((16,), {"width": 30, "heads": 4}, "width 30 is not divisible by 4 heads"),
    ((16,), {"layers": 0}, "layers must be an integer >= 1"),
    ((16,), {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_arguments_are_one_line_errors(in_shape, args, message):
    with pytest.raises(ValueError, match=message):
        build_model("gpt", 10, in_shape, **args)


def test_more_tokens_than_the_context_is_an_error():
    with pytest.raises(ValueError, match="20 tokens exceed its context of 16 positions"):
        build_model("gpt", 10, (16,))(torch.zeros(1, 20, dtype=torch.long))
