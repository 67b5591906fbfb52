"""Backend choice for the fused ops: Triton on CUDA, the C++ extension on CPU, else the reference.

`VIT_FAST_BACKEND=triton|cpu|reference` (or the `use_backend` context manager) forces one. Left to
choose, `backend_fns` hands out a stand-in that also measures the fused backend against the
plain-PyTorch one per call shape (vit_fast.tuning.ops; VIT_FAST_TUNE=off keeps the fixed order
below). With
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
from typing import Any

import torch
from torch import Tensor

# The interpreter flag lives with the kernels (the ground floor); re-exported for existing callers.
from vit_fast.kernels._common import triton_interpreting

# The Triton launchers choose their tile configs by measurement (vit_fast.tuning.kernels).
from vit_fast.tuning import kernels as _kernel_tuning

_kernel_tuning.install()

BACKENDS = ("triton", "cpu", "reference")
# The C++ kernels compute in float32 and store float32 or bfloat16; float16 CPU tensors (rare: CPU
# float16 GEMMs are slow everywhere) run on the plain-PyTorch backend instead.
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_override: list[str] = []


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled `vit_fast._C` module, or None when it was not built.

    On first load its per-shape GEMM table is filled from the tuning cache (vit_fast.tuning.gemm)."""
    try:
        ext = importlib.import_module("vit_fast._C")
    except ImportError:
        return None
    from vit_fast.tuning import gemm

    gemm.attach(ext)
    return ext


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


def select_backend(device: torch.device, family: str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs op `family` on tensors on `device` (of `dtype`, when given).

    Forced choices are checked: Triton on CPU tensors needs TRITON_INTERPRET=1, and `cpu` needs the
    extension to implement the family (and a dtype it computes in), otherwise a RuntimeError says
    what is missing. Automatic choice sends CPU dtypes the extension lacks (float16) to the
    plain-PyTorch backend.
    """
    return _select(device, family, dtype, forced_backend())


def _select(device: torch.device, family: str, dtype: torch.dtype | None, forced: str | None) -> str:
    """select_backend, given `forced_backend()`'s answer (backend_fns reads it once per call)."""
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
            if dtype is not None and dtype not in CPU_KERNEL_DTYPES:
                raise RuntimeError(
                    f"backend 'cpu' forced but its '{family}' kernels take float32 or bfloat16, got {dtype}"
                )
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and has_cpu_kernel(family) and (dtype is None or dtype in CPU_KERNEL_DTYPES):
        return "cpu"
    if device.type == "cpu" and dtype is not None and dtype not in CPU_KERNEL_DTYPES:
        return "reference"
    if device.type == "cpu" and triton_interpreting() and triton_available():
        return "triton"
    return "reference"


def backend_module(family: str, backend: str) -> Any:
    """The module implementing op family `family`'s contract functions (vit_fast.ops.contract) on
    `backend`: `vit_fast.kernels.<family>` (Triton), the C++ extension, or `vit_fast.plain.<family>`.

    Imported on first use: triton is optional for CPU-only installs."""
    if backend == "triton":
        return importlib.import_module(f"vit_fast.kernels.{family}")
    if backend == "cpu":
        return cpu_extension()
    return importlib.import_module(f"vit_fast.plain.{family}")


class _TunedFns:
    """Stands in for a backend module when the choice is automatic: each contract function call
    picks its backend by measurement for its argument shapes (vit_fast.tuning.ops).

    One stand-in per (device, family, default backend), kept by `backend_fns`; each contract function
    is looked up once and then kept as an attribute, so a call whose signature was decided before
    costs one memo lookup (`tuning_ops.memoised_pick`) on top of the backend function itself."""

    def __init__(self, device: torch.device, family: str, default: str) -> None:
        # `default`: select_backend's answer (nothing forced, or there would be no stand-in).
        self._device, self._family, self._default = device, family, default

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        from vit_fast.tuning import ops as tuning_ops

        device, family, default = self._device, self._family, self._default
        names = tuple(tuning_ops.candidates(device, default))

        def call(*args: Any, **kwargs: Any) -> Any:
            key_args = (*args, *(x for k, v in sorted(kwargs.items()) for x in (k, v))) if kwargs else args
            pick = tuning_ops.memoised_pick(device, family, op, key_args, names)
            if pick is None:

                def run(backend: str) -> Any:
                    return getattr(backend_module(family, backend), op)(*args, **kwargs)

                pick = tuning_ops.choose_backend(device, family, op, key_args, run, default)
            return getattr(backend_module(family, pick), op)(*args, **kwargs)

        self.__dict__[op] = call  # later lookups find it without __getattr__
        return call


_stand_ins: dict[tuple[torch.device, str, str], _TunedFns] = {}
# backend_fns' answers by everything they depend on (device, family, dtype, the forced backend, whether
# tuning is on, the interpreter flag): one dict lookup per op call instead of the selection logic.
_resolved: dict[tuple, tuple[str, Any]] = {}


def backend_fns(device: torch.device, family: str, dtype: torch.dtype | None = None, *weights: Tensor) -> Any:
    """The module implementing the contract functions of `family` on the selected backend (a
    measuring stand-in for it when no backend is forced and tuning is on).

    `weights`: the op's GEMM weights. A zero-sized one (a layer of width 0) leaves nothing to
    multiply; the C++ GEMM wrappers do not take empty operands, so such a call runs the
    plain-PyTorch functions, which give the exact result (bias/residual terms only).
    """
    from vit_fast.tuning import ops as tuning_ops

    forced = forced_backend()
    tune = forced is None and tuning_ops.enabled()
    key = (device, family, dtype, forced, tune, triton_interpreting())
    hit = _resolved.get(key)
    if hit is None:
        backend = _select(device, family, dtype, forced)  # raises for an impossible forced choice
        fns: Any = backend_module(family, backend)
        if tune and len(tuning_ops.candidates(device, backend)) > 1:
            fns = _stand_ins.get((device, family, backend))
            if fns is None:
                fns = _stand_ins[(device, family, backend)] = _TunedFns(device, family, backend)
        hit = _resolved[key] = (backend, fns)
    backend, fns = hit
    if backend == "cpu":
        for w in weights:
            if w.numel() == 0:
                return backend_module(family, "reference")
    return fns


def active_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend each op family uses on `device` right now (for `vit-fast check`)."""
    device = torch.device(device)
    from vit_fast.ops.contract import FAMILIES

    return {f: select_backend(device, f) for f in FAMILIES}
