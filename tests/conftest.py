"""Shared test setup.

Without a GPU, Triton kernels are tested in the interpreter: TRITON_INTERPRET=1 must be set before
any kernel module is imported, so it is set here, at collection start. Set VIT_FAST_TEST_DEVICE=cuda
on a GPU machine to run the same tests on real kernels.
"""

import os

if os.environ.get("VIT_FAST_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests run on: CPU (interpreter) here, CUDA when asked for."""
    return torch.device(os.environ.get("VIT_FAST_TEST_DEVICE", "cpu"))


@pytest.fixture
def triton_backend():
    """Force the Triton backend (interpreted on CPU) for the duration of a test."""
    from vit_fast.ops import use_backend

    with use_backend("triton"):
        yield
