"""Backend choice for the fused ops: Triton on CUDA, the C++ extension on CPU, else the reference.

`VIT_FAST_BACKEND=triton|cpu|reference` (or the `use_backend` context manager) forces one. With
`TRITON_INTERPRET=1` the Triton backend runs its kernels on CPU tensors: that is how the GPU kernels
are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

# The interpreter flag lives with the kernels (the ground floor); re-exported for existing callers.
from vit_fast.kernels._common import triton_interpreting

BACKENDS = ("triton", "cpu", "reference")
_override: list[str] = []


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled `vit_fast._C` module, or None when it was not built."""
    try:
        return importlib.import_module("vit_fast._C")
    except ImportError:
        return None


def has_cpu_kernel(family: str) -> bool:
    """Whether the C++ extension implements op family `family` (it exports `<family>_forward`)."""
    ext = cpu_extension()
    return ext is not None and hasattr(ext, f"{family}_forward")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a `with` block (takes precedence over VIT_FAST_BACKEND)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or VIT_FAST_BACKEND, or None for automatic choice."""
    if _override:
        return _override[-1]
    env = os.environ.get("VIT_FAST_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"VIT_FAST_BACKEND must be one of {(*BACKENDS, 'auto')}, got {env!r}")
    return env


def select_backend(device: torch.device, family: str) -> str:
    """The backend that runs op `family` on tensors on `device`.

    Forced choices are checked: Triton on CPU tensors needs TRITON_INTERPRET=1, and `cpu` needs the
    extension to implement the family, otherwise a RuntimeError says what is missing.
    """
    forced = forced_backend()
    if forced is not None:
        if forced == "triton":
            if not triton_available():
                raise RuntimeError("backend 'triton' forced but triton is not installed")
            if device.type != "cuda" and not triton_interpreting():
                raise RuntimeError(
                    f"backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before import"
                )
        elif forced == "cpu":
            if device.type != "cpu":
                raise RuntimeError(f"backend 'cpu' forced but the tensors are on {device.type}")
            if not has_cpu_kernel(family):
                raise RuntimeError(f"backend 'cpu' forced but the C++ extension has no '{family}' kernels")
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and has_cpu_kernel(family):
        return "cpu"
    if device.type == "cpu" and triton_interpreting() and triton_available():
        return "triton"
    return "reference"


def active_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend each op family uses on `device` right now (for `vit-fast check`)."""
    device = torch.device(device)
    return {f: select_backend(device, f) for f in ("patch_embed", "attention", "layer_norm", "mlp")}
