"""Fixtures for the kernel tests: Triton's interpreter (CPU) switched on per test."""
from __future__ import annotations

import pytest


@pytest.fixture
def interpret():
    """Triton kernels can run here: on a GPU, or on the CPU in Triton's interpreter (tests/conftest.py
    sets TRITON_INTERPRET=1 before Triton is imported on machines without a GPU). The kernel tests
    use CPU tensors, so on a GPU machine they need TRITON_INTERPRET=1 in the environment."""
    pytest.importorskip("triton")
    from lmrun.kernels.runtime import interpreter_enabled, language_interpreted

    if not (interpreter_enabled() and language_interpreted()):
        pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported")


@pytest.fixture
def no_gpu_no_interpreter(monkeypatch):
    """A CPU-only machine without TRITON_INTERPRET (skipped where a GPU is present)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
