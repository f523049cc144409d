"""Shared setup of the operator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Runs each test on one intra-op thread, then restores the previous count.

    The tensors are tiny, and on a shared two-core machine a two-thread OpenMP region waits whenever the
    other core is busy (see tests/models/conftest.py).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
