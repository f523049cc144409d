"""Shared setup of the model zoo tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Runs each test on one intra-op thread, then restores the previous count.

    The tensors here are tiny (batch 2, maps of at most 32x32), so a second thread buys little; and when
    another process holds one of this machine's two cores, every two-thread OpenMP region waits for the
    descheduled thread (measured: a 2x64x8x8 batch norm took 23 ms on two threads, 0.04 ms on one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
