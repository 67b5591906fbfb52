"""Helpers shared by the `layer_norm` and `mlp` op families: backend dispatch to the contract
functions, autocast handling and argument validation (all checks run before any launch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vit_fast.ops import _ln_mlp_ref
from vit_fast.ops._checks import check_no_overlap, check_nonempty, check_shape, check_tensor
from vit_fast.ops.backend import cpu_extension, select_backend


def backend_fns(device: torch.device, family: str) -> Any:
    """The module implementing the contract functions of `family` on the selected backend."""
    backend = select_backend(device, family)
    if backend == "triton":
        # Imported lazily: triton is optional for CPU-only installs.
        from vit_fast.kernels import matmul

        return matmul
    if backend == "cpu":
        return cpu_extension()
    return _ln_mlp_ref


def empty_like_none(t: Tensor | None, like: Tensor) -> Tensor:
    """custom_op outputs cannot be None: an absent gradient travels as a 0-element tensor."""
    return like.new_empty(0) if t is None else t


def none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def autocast_args(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, run in the autocast dtype: cast floating inputs to it (the op keeps LN
    statistics and GEMM accumulation in fp32 internally either way)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


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


def check_dps(dps: object, x: Tensor) -> None:
    """drop_path_scale [B] for x [B, T, D] (any float dtype, x's device)."""
    if dps is None:
        return
    dps = check_tensor(dps, "drop_path_scale", ndim=1, device=x.device)
    if x.dim() != 3:
        raise ValueError(f"drop_path_scale needs x as [B, T, D], got shape {tuple(x.shape)}")
    check_shape(dps, "drop_path_scale", (x.shape[0],))


def check_approximate(approximate: object) -> str:
    if approximate not in ("none", "tanh", "quick"):
        raise ValueError(f"approximate must be 'none', 'tanh' or 'quick', got {approximate!r}")
    return str(approximate)


def rows2d(t: Tensor) -> Tensor:
    """[..., D] -> contiguous [M, D] (copies non-contiguous or overlapping inputs)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()
