"""Shared test setup.

Without a GPU, Triton kernels are tested in the interpreter: TRITON_INTERPRET=1 must be set before
any kernel module is imported, so it is set here, at collection start. Set VIT_FAST_TEST_DEVICE=cuda
on a GPU machine to run the same tests on real kernels.
"""

import os
import tempfile

if os.environ.get("VIT_FAST_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Choice by measurement (vit_fast.tuning) is off unless a test turns it on: kernel tests must run the
# backend they name, and a test run must not write into the user's cache directory.
os.environ.setdefault("VIT_FAST_TUNE", "off")
os.environ.setdefault("VIT_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="vit_fast_test_cache_"))

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
