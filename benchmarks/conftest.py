"""pytest-benchmark suites: `pytest benchmarks/` (add `--benchmark-json out.json` to keep numbers).

Runs on CUDA when present (bf16), else on the CPU (fp32) with the backends `select_backend` picks;
TRITON_INTERPRET is NOT set here: interpreted kernels are a correctness tool, timing them is
meaningless. Set VIT_FAST_BENCH_DEVICE to choose the device.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(os.environ.get("VIT_FAST_BENCH_DEVICE", default))


@pytest.fixture(scope="session")
def dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.fixture(scope="session")
def synced(device: torch.device):
    """Wraps a callable so it ends with a device synchronisation (the timer sees the kernels finish)."""

    def wrap(fn):
        if device.type != "cuda":
            return fn

        def run():
            out = fn()
            torch.cuda.synchronize(device)
            return out

        return run

    return wrap
