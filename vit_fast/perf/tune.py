"""`tune_model`: run every measured choice one model makes, fresh, and report it (`vit-fast tune`)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from vit_fast.tuning import gemm as gemm_tuning
from vit_fast.tuning.cache import device_model
from vit_fast.tuning.ops import tuning_session
from vit_fast.tuning.selector import Decision


def _op_row(d: Decision, model: str) -> dict[str, Any]:
    _, family, op, shape = d.key.split("/", 3)
    return {
        "kind": "op",
        "op": f"{family}.{op}",
        "shape": shape,
        "ms": dict(d.ms),
        "pick": d.pick,
        "device": model,
    }


def _gemm_row(key: str, pick: str, ms: dict[str, float], model: str) -> dict[str, Any]:
    kind, shape = key.split("/", 1)
    return {
        "kind": "gemm",
        "op": f"gemm.{kind}",
        "shape": shape,
        "ms": dict(ms),
        "pick": pick,
        "device": model,
    }


def tune_model(
    model_name: str,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_s: float | None = None,
    **model_kwargs: Any,
) -> list[dict[str, Any]]:
    """Measure, ignoring earlier cached picks, every choice a fused `model_name` makes for a batch of
    `batch` images in `dtype` on `device`: an inference forward, then (budget permitting) a training
    step. The picks are written to the device's cache file, so later runs reuse them.

    Returns one row per op and shape: `kind` ("op": fused backend vs plain PyTorch; "gemm": the C++
    backend's GEMM library and layout variant), `op`, `shape` (the key's call signature), `ms`
    ({candidate: median ms}), `pick`, `device` (the device model). `budget_s` skips the training
    step when the inference pass already used it up. VIT_FAST_BACKEND / VIT_FAST_CPU_GEMM forces
    are respected (a forced choice is not measured, so it has no row). `model_kwargs` override the
    model configuration (depth, img_size, ...).
    """
    from vit_fast.models.vision_transformer import create_model, model_config
    from vit_fast.ops.backend import cpu_extension

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    start = time.perf_counter()
    model_str = device_model(device)
    cfg = model_config(model_name) | model_kwargs
    img = cfg.get("img_size", 224)
    img = (img, img) if isinstance(img, int) else tuple(img)
    model = create_model(model_name, impl="fused", **model_kwargs).to(device=device, dtype=dtype)
    images = torch.randn(batch, cfg.get("in_chans", 3), *img, device=device, dtype=dtype)

    ext = cpu_extension() if device.type == "cpu" else None
    tune_gemms = gemm_tuning.supported(ext) and not os.environ.get("VIT_FAST_CPU_GEMM", "").strip()
    previous_mode = ext.gemm_backend() if tune_gemms else None
    if tune_gemms:
        ext.set_gemm_backend("tuned")
        ext.clear_gemm_choices()  # measure afresh; other shapes' cached picks stay on disk

    decisions: list[Decision] = []
    try:
        with tuning_session(remeasure=True, on_decision=decisions.append, enabled=True):
            with torch.no_grad():
                model.eval()(images)
            if budget_s is None or time.perf_counter() - start < budget_s:
                model.train()
                model(images).float().sum().backward()
        if tune_gemms:
            gemm_tuning.save(ext, force=True)
    finally:
        if tune_gemms:
            ext.set_gemm_backend(previous_mode)

    rows = [_op_row(d, model_str) for d in decisions if d.source == "measured"]
    if tune_gemms:
        for key, (pick, ms, measured) in ext.gemm_choices().items():
            if measured:
                rows.append(_gemm_row(key, pick, ms, model_str))
    return rows
