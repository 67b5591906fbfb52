"""Helpers shared by the `layer_norm` and `mlp` op families: backend dispatch to the contract
functions, autocast handling and argument validation (all checks run before any launch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vit_fast.ops import _ln_mlp_ref
from vit_fast.ops._checks import (  # noqa: F401  (autocast_args: re-exported for the families)
    autocast_args,
    check_no_overlap,
    check_nonempty,
    check_shape,
    check_tensor,
)
from vit_fast.ops.backend import cpu_extension, forced_backend, select_backend, tuned_backend
from vit_fast.tuning import ops as tuning_ops


def backend_module(backend: str) -> Any:
    """The module implementing the layer_norm / mlp contract functions on `backend`."""
    if backend == "triton":
        # Imported lazily: triton is optional for CPU-only installs.
        from vit_fast.kernels import matmul

        return matmul
    if backend == "cpu":
        return cpu_extension()
    return _ln_mlp_ref


class _TunedFns:
    """Stands in for a backend module when the choice is automatic: each contract function call
    picks its backend by measurement for its argument shapes (vit_fast.tuning.ops)."""

    def __init__(self, device: torch.device, family: str, dtype: torch.dtype | None) -> None:
        self._device, self._family, self._dtype = device, family, dtype

    def __getattr__(self, op: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            def run(backend: str) -> Any:
                return getattr(backend_module(backend), op)(*args, **kwargs)

            key_args = (*args, *(x for k, v in sorted(kwargs.items()) for x in (k, v)))
            return run(tuned_backend(self._device, self._family, op, key_args, run, self._dtype))

        return call


def backend_fns(device: torch.device, family: str, dtype: torch.dtype | None = None, *weights: Tensor) -> Any:
    """The module implementing the contract functions of `family` on the selected backend (a
    measuring stand-in for it when no backend is forced and tuning is on).

    `weights`: the op's GEMM weights. A zero-sized one (a layer of width 0) leaves nothing to
    multiply; the C++ GEMM wrappers do not take empty operands, so such a call runs the
    plain-PyTorch functions, which give the exact result (bias/residual terms only).
    """
    backend = select_backend(device, family, dtype)
    if backend == "cpu" and any(w.numel() == 0 for w in weights):
        return _ln_mlp_ref
    if forced_backend() is None and len(tuning_ops.candidates(device, backend)) > 1 and tuning_ops.enabled():
        return _TunedFns(device, family, dtype)
    return backend_module(backend)


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
