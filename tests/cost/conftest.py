"""Shared setup of the cost model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Runs each test on one intra-op thread (two cores are shared; see tests/models/conftest.py), then
    restores the previous count. The memory model reads the thread count, so the measured steps and the
    predictions agree on which convolutions PyTorch sends to oneDNN."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
