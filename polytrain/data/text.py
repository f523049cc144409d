"""A byte-level language-modelling dataset that needs no download: CPython's own documentation text."""

from __future__ import annotations

import sys

import numpy as np
import torch

from polytrain.data import DataError, Dataset
from polytrain.data.prepare import num_test_samples, positive_int, register_loader

VOCABULARY = 256  # bytes


def pydoc_bytes() -> bytes:
    """The prose of `pydoc_data.topics` (the help() topics of the Python documentation, ~465 KB of English,
    bundled with every CPython install), its topics joined in sorted order, as UTF-8."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


@register_loader("pydoc")
def load_pydoc(*, seed: int, test_fraction: float, context: int = 64, max_bytes: int | None = None) -> Dataset:
    """Next-byte prediction over CPython's bundled documentation (`pydoc_data.topics`), offline.

    The text is cut into non-overlapping chunks of context + 1 bytes; a sample is a chunk's first `context`
    bytes and its targets the same chunk shifted by one (x = chunk[:-1], y = chunk[1:], int64). The test
    split is the last `test_fraction` of the chunks in text order, contiguous, so no test text appears
    in training inside an overlapping window; `seed` does not change the split (the sampler still shuffles
    the training chunks by it).

    Args:
        context: positions per sample (the model's context length).
        max_bytes: use only the corpus's first max_bytes bytes (quick runs).
    """
    context = positive_int("pydoc", "context", context)
    text = pydoc_bytes()
    if max_bytes is not None:
        text = text[:positive_int("pydoc", "max_bytes", max_bytes)]
    chunks = len(text) // (context + 1)
    if chunks < 2:
        raise DataError(f"dataset pydoc: {len(text)} bytes make {chunks} chunks of context {context} + 1; "
                        f"expected at least 2 (raise max_bytes or lower context)")
    tokens = torch.from_numpy(np.frombuffer(text[:chunks * (context + 1)], dtype=np.uint8).astype(np.int64))
    tokens = tokens.view(chunks, context + 1)
    num_train = chunks - num_test_samples(chunks, test_fraction)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Dataset("pydoc", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=VOCABULARY,
                   synthetic=False, source=f"pydoc_data.topics (CPython {version}), {len(text)} bytes",
                   task="language_model")
