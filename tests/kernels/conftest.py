"""Fixtures for the kernel tests; turns on the Triton interpreter where there is no GPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``visd.kernels.triton_*``
is first imported. ``visd.kernels`` imports those modules lazily, inside the tests, after pytest
has loaded this conftest, so setting the variable here (at collection) is early enough. Without
CUDA the rest of the suite never runs Triton, so the variable does not change other tests; with
CUDA it is left alone and the kernels are compiled and run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where the Triton tests run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def needs_triton() -> None:
    """Skip when the optional dependency triton is not installed (the reference tests still run)."""
    pytest.importorskip("triton", reason="triton is an optional dependency and is not installed")
