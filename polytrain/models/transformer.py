"""A GPT-style decoder-only transformer language model (Radford et al. 2019), laid out for Megatron splits.

Each block is pre-LayerNorm self-attention then an MLP, both residual. The layers Megatron-LM (Shoeybi et
al. 2019) splits over tensor-parallel ranks are single modules here: `attn.qkv` (columns: heads), then
`attn.proj` (rows), `mlp.fc` (columns) then `mlp.proj` (rows), so a later tensor-parallel schedule can
replace exactly these four Linears per block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.models import MODELS
from polytrain.models.common import checked, require_int

# name -> (layers, heads, width). tiny trains in a test in well under a second; small learns ~465 KB of
# text on two CPU cores in minutes.
GPT_SIZES = {"tiny": (2, 2, 64), "small": (4, 4, 128), "medium": (6, 6, 192)}
INIT_STD = 0.02  # GPT-2's


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: one fused qkv projection, scaled dot-product attention, one output."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, T') with T' <= context -> next-token logits (B, T', vocab)."""

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int, dropout: float,
                 tie_weights: bool) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.apply(_init)
        for block in self.blocks:  # residual projections scaled so the residual stream's variance stays put
            for projection in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(projection.weight, std=INIT_STD / math.sqrt(2 * layers))
        if tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"model gpt: {length} tokens exceed its context of {self.context} positions")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.tok(tokens) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@MODELS.register("gpt")
@checked
def gpt(num_classes: int, in_shape: tuple[int, ...], *, size: str = "tiny", layers: int | None = None,
        heads: int | None = None, width: int | None = None, dropout: float = 0.0,
        tie_weights: bool = True) -> nn.Module:
    """A decoder-only transformer language model over a vocabulary of `num_classes` tokens.

    Args:
        num_classes: vocabulary size (256 for bytes).
        in_shape: (T,), the context length in positions.
        size: tiny (2 layers, 2 heads, width 64), small (4, 4, 128) or medium (6, 6, 192).
        layers, heads, width: override the size's.
        dropout: after embeddings, inside attention and after each MLP.
        tie_weights: the output layer shares the token embedding's weights (GPT-2).
    """
    if size not in GPT_SIZES:
        raise ValueError(f"model gpt: unknown size {size!r}; expected {', '.join(GPT_SIZES)}")
    if len(in_shape) != 1:
        raise ValueError(f"model gpt needs token sequences (T,); got sample shape {tuple(in_shape)}")
    default_layers, default_heads, default_width = GPT_SIZES[size]
    layers = require_int("gpt", "layers", default_layers if layers is None else layers)
    heads = require_int("gpt", "heads", default_heads if heads is None else heads)
    width = require_int("gpt", "width", default_width if width is None else width)
    if width % heads:
        raise ValueError(f"model gpt: width {width} is not divisible by {heads} heads")
    if not 0 <= dropout < 1:
        raise ValueError(f"model gpt: dropout must be in [0, 1); got {dropout!r}")
    return GPT(num_classes, in_shape[0], layers, heads, width, dropout, tie_weights)
