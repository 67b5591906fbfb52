"""Choose by measurement, on the machine it runs on (CPU and CUDA alike).

- `selector.Selector`: a measured choice among named candidates, cached on disk per device model
  (`cache.TuningCache`, `cache.cache_dir`), with VIT_FAST_TUNE=off and per-call forcing.
- `gemm`: the C++ backend's per-shape GEMM library choice (oneDNN or at::mm and their layout
  variants, measured inside the extension) and its disk cache.
- `ops`: the per-call choice between a fused backend and the plain-PyTorch one.
- `tune_model`: run all of it for one model's shapes (`vit-fast tune`).
"""

from __future__ import annotations

from typing import Any

import torch

from vit_fast.tuning.cache import TuningCache, cache_dir, device_model
from vit_fast.tuning.selector import Decision, Selector, tuning_enabled

__all__ = ["Decision", "Selector", "TuningCache", "cache_dir", "device_model", "tune_model", "tuning_enabled"]


def tune_model(
    model_name: str,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_s: float | None = None,
    **model_kwargs: Any,
) -> list[dict[str, Any]]:
    """Measure every choice a fused `model_name` makes at `batch` x `dtype` on `device`; one dict per
    op and shape: kind, op, shape, ms ({candidate: median ms}), pick, device (see
    vit_fast.tuning.model.tune_model)."""
    from vit_fast.tuning.model import tune_model as _tune

    return _tune(model_name, batch, dtype, device, budget_s, **model_kwargs)
