"""Argument validation shared by the op launchers: every check raises before any kernel launch."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor of the required rank, dtype, device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input dtype {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    return t


def check_shape(t: Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_no_overlap(t: Tensor, name: str) -> None:
    """Reject tensors whose elements alias each other (e.g. expand()ed views): kernels write or
    reduce per element, and an aliased layout would make the answer silently wrong."""
    if has_internal_overlap(t):
        raise ValueError(f"{name} has overlapping memory (stride 0 or aliasing view); pass .contiguous()")


def has_internal_overlap(t: Tensor) -> bool:
    """True when two indices of `t` may address the same element.

    Sufficient test on sizes/strides alone (plain Python, so torch.compile traces it): with the
    non-trivial dims sorted by stride, each stride must exceed the span of all smaller ones.
    """
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_nonempty(t: Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None when autocast is off there.

    Device types autocast does not know (meta, the fake tensors of torch.compile's tracing on such
    devices) have no autocast state at all: asking torch would raise, so they count as "off".
    """
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """`torch.autocast(device_type, enabled=False)`, or a no-op where autocast does not exist (meta)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_args(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, run in the autocast dtype: cast floating inputs to it (the op keeps LN
    statistics and GEMM accumulation in fp32 internally either way)."""
    dt = autocast_dtype(device_type)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)
