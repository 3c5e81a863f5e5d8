"""Optimizer tests use tiny shapes: one intra-op thread is faster for them than two, and avoids
OpenMP spin contention when other processes share the CPU."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
