"""`polytrain cost`: the per-layer table and totals of a model's cost, as text or JSON."""

from __future__ import annotations

import json
from typing import Any, TextIO

import torch

from polytrain.cost.model import ModelCost, registered_model_cost

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

_COLUMNS = ("layer", "type", "output", "params", "MACs fwd", "FLOPs fwd", "FLOPs bwd", "act bytes", "work", "depth")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parses "3,224,224" into (3, 224, 224); anything else raises a ValueError saying what was expected."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--input-shape {text!r}: expected positive integers separated by commas, like 3,32,32")
    return tuple(int(part) for part in parts)


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; available: {', '.join(DTYPES)}")
    return DTYPES[name]


def si(value: float) -> str:
    """`value` with an SI prefix and three significant digits: 1814073344 -> "1.81G"."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def binary(nbytes: int) -> str:
    """Bytes with a binary prefix: 46758912 -> "44.6 MiB"."""
    for prefix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {prefix}"
    return f"{nbytes} B"


def _layer_cells(row) -> tuple[str, ...]:
    shape = "x".join(map(str, row.output_shape))
    if not row.counted:
        return row.name, row.kind, shape, si(row.params), "not counted", "", "", binary(row.activation_bytes), "", ""
    return (row.name, row.kind, shape, si(row.params), si(row.macs_forward), si(row.flops_forward),
            si(row.flops_backward), binary(row.activation_bytes), si(row.work), str(row.depth))


def format_table(cost: ModelCost) -> str:
    """The per-layer table: arithmetic per sample, bytes and work at the batch size."""
    rows = [_COLUMNS, *(_layer_cells(row) for row in cost.layers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def format_totals(cost: ModelCost) -> str:
    """The totals, one per line, with units."""
    t = cost.total
    shape = "x".join(map(str, cost.input_shape))
    ratio = "n/a" if t.data_weight_ratio is None else f"{t.data_weight_ratio:.3g}"
    lines = [
        f"model {cost.model}, input {shape}, batch {cost.batch_size}, {cost.dtype}, optimizer {t.optimizer}",
        f"parameters |W|                {t.params:,} ({binary(t.weight_bytes)}); trainable {t.trainable_params:,}",
        f"weight gradients |grad W|     {binary(t.weight_grad_bytes)}",
        f"activations |D|               {binary(t.activation_bytes)} at batch {cost.batch_size}",
        f"activation gradients |grad D| {binary(t.activation_grad_bytes)}",
        f"data/weight ratio |D|/|W|     {ratio} (Iandola Table 3.1)",
        f"saved for backward            {binary(t.saved_activation_bytes)}",
        f"optimizer state               {binary(t.optimizer_state_bytes)}",
        f"training memory (peak)        {binary(t.training_memory_bytes)}, at {t.peak_at} ({t.conv_backend})",
        f"MACs per sample               {si(t.macs_forward)} forward, {si(t.macs_backward)} backward",
        f"FLOPs per sample              {si(t.flops_inference)} inference, {si(t.flops_training)} training "
        f"({si(t.flops_forward)} forward + {si(t.flops_backward)} backward)",
        f"work W, depth D               {si(t.work)}, {t.depth}; average parallelism W/D {si(t.average_parallelism)}",
    ]
    if t.not_counted:
        lines.append(f"not counted (missing from every total): {', '.join(t.not_counted)}")
    lines += [f"note on {row.name}: {row.note}" for row in cost.layers if row.counted and row.note]
    return "\n".join(lines)


def run_cost(model: str, input_shape: str | None, num_classes: int | None, batch_size: int,
             model_args: dict[str, Any], optimizer: str, dtype: str, as_json: bool, out: TextIO) -> None:
    """Computes the cost of zoo model `model` and writes it to `out` as a table and totals, or as JSON."""
    cost = registered_model_cost(model, parse_shape(input_shape) if input_shape else None, num_classes,
                                 batch_size, model_args, optimizer=optimizer, dtype=parse_dtype(dtype))
    if as_json:
        json.dump(cost.to_dict(), out, indent=1)
        out.write("\n")
    else:
        out.write(f"{format_table(cost)}\n\n{format_totals(cost)}\n")
