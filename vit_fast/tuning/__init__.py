"""Choose by measurement, on the machine it runs on (CPU and CUDA alike).

- `selector.Selector`: a measured choice among named candidates, cached on disk per device model
  (`cache.TuningCache`, `cache.cache_dir`), with VIT_FAST_TUNE=off and per-call forcing.
- `gemm`: the C++ backend's per-shape GEMM library choice (oneDNN or at::mm and their layout
  variants, measured inside the extension) and its disk cache.
- `ops`: the per-call choice between a fused backend and the plain-PyTorch one.

Running all of it for one model's shapes (`vit-fast tune`) is `vit_fast.perf.tune.tune_model`: it
builds models, a higher layer than the ops this package serves.
"""

from __future__ import annotations

from vit_fast.tuning.cache import TuningCache, cache_dir, device_model
from vit_fast.tuning.selector import Decision, Selector, tuning_enabled

__all__ = ["Decision", "Selector", "TuningCache", "cache_dir", "device_model", "tuning_enabled"]
