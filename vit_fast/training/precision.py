"""Mixed precision: the autocast dtype a precision name means on a device, and the autocast context."""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `name` on `device` (None = plain fp32). 'auto': bf16 on CUDA devices
    that support it, fp16 on older CUDA devices, fp32 on CPU (bf16 on CPU is opt-in: it is slower
    than fp32 on CPUs without bf16 instructions)."""
    if name == "fp32":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (use 'bf16' on CPU)")
        return torch.float16
    return torch.bfloat16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
