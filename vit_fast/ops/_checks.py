"""Argument validation shared by the op launchers: every check raises before any kernel launch."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from vit_fast.ops._eager import PLAIN_TYPES

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
    non-trivial dims sorted by stride, each stride must exceed the span of all smaller ones. In eager
    mode a contiguous tensor (the usual weight) is answered by one C call.
    """
    if not torch.compiler.is_compiling() and t.is_contiguous():
        return False
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


_NOTHING_TO_TURN_OFF = contextlib.nullcontext()  # reusable: one object for every op call


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """`torch.autocast(device_type, enabled=False)`, or a no-op where autocast does not exist (meta)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return _NOTHING_TO_TURN_OFF
    return torch.autocast(device_type, enabled=False)


def autocast_args(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, run in the autocast dtype: cast floating inputs to it (the op keeps LN
    statistics and GEMM accumulation in fp32 internally either way)."""
    dt = autocast_dtype(device_type)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def empty_like_none(t: Tensor | None, like: Tensor) -> Tensor:
    """custom_op outputs cannot be None: an absent gradient travels as a 0-element tensor."""
    return like.new_empty(0) if t is None else t


def none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def check_eps(eps: object) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return float(eps)


def check_input(x: object, name: str = "x", min_dim: int = 1) -> Tensor:
    x = check_tensor(x, name)
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    check_nonempty(x, name)
    return x


def check_param(t: object, name: str, shape: tuple[int, ...], like: Tensor, *, optional: bool = True) -> None:
    """A weight-like argument: None (when optional) or a tensor of `shape`, like's dtype and device."""
    if t is None:
        if not optional:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        return
    t = check_tensor(t, name, device=like.device, dtype=like.dtype)
    check_shape(t, name, shape)
    check_no_overlap(t, name)


def check_params(like: Tensor, *params: tuple[object, str, tuple[int, ...], bool]) -> None:
    """`check_param` for each (tensor, name, shape, optional) in `params`, against `like`'s dtype and
    device: one call per op, the usual case (plain contiguous tensors of the right dtype, device and
    shape) answered without building an error message's worth of checks per parameter."""
    dtype, device = like.dtype, like.device
    fast = not torch.compiler.is_compiling()
    for t, name, shape, optional in params:
        if (
            fast
            and type(t) in PLAIN_TYPES
            and t.dtype == dtype
            and t.shape == shape
            and t.is_contiguous()  # no overlap either
            and t.device == device
        ):
            continue
        check_param(t, name, shape, like, optional=optional)


def check_dps(dps: object, x: Tensor) -> Tensor | None:
    """drop_path_scale [B] for x [B, T, D] (any float dtype, x's device) -> float32 contiguous [B].

    The scales are 0 or 1/keep_prob: every backend reads them in float32 (a bfloat16 1/0.9 would be
    off by 2e-3), whatever dtype the caller built them in.
    """
    if dps is None:
        return None
    dps = check_tensor(dps, "drop_path_scale", ndim=1, device=x.device)
    if x.dim() != 3:
        raise ValueError(f"drop_path_scale needs x as [B, T, D], got shape {tuple(x.shape)}")
    check_shape(dps, "drop_path_scale", (x.shape[0],))
    return dps.to(torch.float32).contiguous()


def check_approximate(approximate: object) -> str:
    if approximate not in ("none", "tanh", "quick"):
        raise ValueError(f"approximate must be 'none', 'tanh' or 'quick', got {approximate!r}")
    return str(approximate)


def rows2d(t: Tensor) -> Tensor:
    """[..., D] -> contiguous [M, D] (copies non-contiguous or overlapping inputs)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()
