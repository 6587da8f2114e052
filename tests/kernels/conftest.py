"""Fixtures for the kernel tests. The Triton interpreter (``TRITON_INTERPRET=1``, where there is no
GPU) is turned on by ``tests/conftest.py``, before any test module can import triton."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """Where the Triton tests run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def needs_triton() -> None:
    """Skip when the optional dependency triton is not installed (the reference tests still run)."""
    pytest.importorskip("triton", reason="triton is an optional dependency and is not installed")
