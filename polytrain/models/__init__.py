"""Model zoo: plain builder functions over torch.nn, registered by name.

Every builder has the signature `builder(num_classes: int, in_shape: tuple[int, ...], **metaparameters)
-> nn.Module`, where `in_shape` is the shape of one sample without the batch dimension.
"""

from __future__ import annotations

from torch import nn

from polytrain.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...], **metaparameters) -> nn.Module:
    """Builds the registered model `name` for samples of shape `in_shape` and `num_classes` classes."""
    return MODELS.get(name)(num_classes, tuple(in_shape), **metaparameters)


# Imported last, once MODELS exists, so that each family's @MODELS.register decorators run on import.
from polytrain.models import (  # noqa: E402,F401
    alexnet,
    densenet,
    googlenet,
    lenet,
    mlp,
    nin,
    recurrent,
    resnet,
    squeezenet,
    transformer,
    vgg,
)
