"""Triton launch configs chosen by measurement: the autotune space of a kernel (e.g.
`vit_fast.kernels.gemm.GEMM_CANDIDATES`) timed on the device at a call shape's first use, the
fastest cached per GPU model and shape, reused from then on.

The kernels cannot import this layer (they are the ground floor), so it installs itself as their
config chooser (`vit_fast.kernels._common.set_config_chooser`) when the ops are imported. It shares
the op-level selectors (vit_fast.tuning.ops): the same cache files, `VIT_FAST_TUNE=off`, and the
`tuning_session` overrides tests use to inject a timer. The default (first) config is kept while a
CUDA graph is being captured (a cached pick still applies), while tuning is off, and when every
candidate fails; a candidate that fails to compile or launch is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vit_fast.kernels import _common
from vit_fast.tuning import ops as tuning_ops


def _name(config: Any) -> str:
    return getattr(config, "name", None) or "_".join(str(v) for v in config)


def choose(device: torch.device, key: str, configs: Sequence[Any], launch: Callable[[Any], None]) -> Any:
    """The config of `configs` to launch the call `key` with on `device` (see the module doc)."""
    if not tuning_ops.enabled():
        return configs[0]
    by_name = {_name(c): c for c in configs}
    selector = tuning_ops.selector(device)
    if tuning_ops.capturing(device):
        cached = selector.cache.get(key)
        return by_name.get(cached["pick"], configs[0]) if cached is not None else configs[0]
    candidates = {name: (lambda c=c: launch(c)) for name, c in by_name.items()}
    decision = selector.choose(key, candidates, default=_name(configs[0]), enabled=True)
    return by_name[decision.pick]


def install() -> None:
    """Make the kernels' launchers choose their configs by measurement (idempotent)."""
    _common.set_config_chooser(choose)
