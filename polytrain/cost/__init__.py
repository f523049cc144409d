"""Analytic cost model: parameters, activations, arithmetic, memory, work and depth of a network.

`model_cost(model, input_shape, batch_size)` traces any nn.Module once on the meta device and applies one
cited formula per layer type (`polytrain.cost.layers`); `registered_model_cost(name)` does the same for a
zoo model at its natural input. `polytrain cost MODEL` prints the result.
"""

from polytrain.cost.model import (
    NATURAL_INPUTS,
    CostTotals,
    LayerRow,
    ModelCost,
    model_cost,
    registered_model_cost,
)

__all__ = ["NATURAL_INPUTS", "CostTotals", "LayerRow", "ModelCost", "model_cost", "registered_model_cost"]
