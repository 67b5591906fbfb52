"""Choose among named candidates by measuring them, and remember the choice.

`Selector.choose(key, candidates)` returns the name of the fastest candidate for `key`: the cached
pick when the device's cache file has one (and it is still a candidate), else each candidate is
timed on the real call and the median winner is cached. `VIT_FAST_TUNE=off` turns measuring off
(the caller's default is used, the cache is neither read nor written); a `force` argument (from the
caller's own switch, e.g. VIT_FAST_BACKEND) always wins.

Timers take a zero-argument callable and return its median milliseconds; they are injectable so
tests can decide who wins. On CPU: one untimed warm-up, then blocks of one call each until ~50 ms
or 15 calls (at least 3), median. On CUDA: `triton.testing.do_bench` (median, it synchronises and
flushes the L2 cache between calls).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vit_fast.tuning.cache import TuningCache, device_model, get_cache

Timer = Callable[[Callable[[], Any]], float]


def tuning_enabled() -> bool:
    """VIT_FAST_TUNE: 'on' (default) measures at first use; 'off' keeps the untuned defaults."""
    value = os.environ.get("VIT_FAST_TUNE", "on").strip().lower()
    if value in ("", "on", "1", "true"):
        return True
    if value in ("off", "0", "false"):
        return False
    raise ValueError(f"VIT_FAST_TUNE must be 'on' or 'off', got {value!r}")


def cpu_timer(
    fn: Callable[[], Any], *, target_ms: float = 50.0, min_reps: int = 3, max_reps: int = 15
) -> float:
    """Median ms of `fn` over short timed blocks (one call per block) after one warm-up call."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= min_reps and (time.perf_counter() - start) * 1e3 >= target_ms:
            break
    return statistics.median(samples)


def cuda_timer(fn: Callable[[], Any]) -> float:
    """Median ms of `fn` on the current CUDA device (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def default_timer(device: torch.device | str) -> Timer:
    return cuda_timer if torch.device(device).type == "cuda" else cpu_timer


@dataclass
class Decision:
    """What one `choose` call decided: the pick, how (`source`), and the timings when measured."""

    key: str
    pick: str
    source: str  # "measured", "cache", "forced", "off", "only"
    ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Selector:
    """Measured choice among named candidates, cached per device model.

    Args:
        device: where the candidates run (picks the default timer and the cache file).
        timer: overrides the timer (tests inject one).
        cache: overrides the cache (default: the process-wide one of the device's model).
        model: overrides the device model string the cache is keyed by (tests, CUDA-like calls).
        remeasure: ignore cached picks from before this selector existed (still write the new ones):
            `vit-fast tune`.
        on_decision: called with every Decision (`vit-fast tune` collects them).
        margin: another candidate replaces the default only when it is faster by more than this
            fraction (timing noise must not flip a choice between two equally fast candidates).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        timer: Timer | None = None,
        cache: TuningCache | None = None,
        model: str | None = None,
        remeasure: bool = False,
        on_decision: Callable[[Decision], None] | None = None,
        margin: float = 0.03,
    ) -> None:
        self.margin = margin
        self.device = torch.device(device)
        self.timer = timer if timer is not None else default_timer(self.device)
        self._cache = cache
        self._model = model
        self.remeasure = remeasure
        self.on_decision = on_decision
        self._fresh: set[str] = set()  # keys this selector measured (the cache hits `remeasure` allows)

    @property
    def cache(self) -> TuningCache:
        if self._cache is None:
            self._cache = get_cache(self._model if self._model is not None else device_model(self.device))
        return self._cache

    def choose(
        self,
        key: str,
        candidates: Mapping[str, Callable[[], Any]],
        *,
        default: str | None = None,
        force: str | None = None,
        enabled: bool | None = None,
    ) -> Decision:
        """Pick one of `candidates` (name -> zero-argument callable running it on the real call).

        `default` (first candidate if None) is used when tuning is off or every candidate fails;
        `force` must name a candidate and is returned as is; `enabled` overrides VIT_FAST_TUNE.
        """
        if not candidates:
            raise ValueError("candidates must not be empty")
        names = list(candidates)
        default = names[0] if default is None else default
        if default not in candidates:
            raise ValueError(f"default {default!r} is not one of the candidates {names}")
        if force is not None:
            if force not in candidates:
                raise ValueError(f"forced choice {force!r} for {key} is not one of the candidates {names}")
            return self._done(Decision(key, force, "forced"))
        if not (tuning_enabled() if enabled is None else enabled):
            return self._done(Decision(key, default, "off"))
        if len(names) == 1:
            return self._done(Decision(key, names[0], "only"))
        if not self.remeasure or key in self._fresh:
            cached = self.cache.get(key)
            if cached is not None and cached["pick"] in candidates:
                return self._done(Decision(key, cached["pick"], "cache", dict(cached.get("ms", {}))))
        decision = Decision(key, default, "measured")
        for name, fn in candidates.items():
            try:
                ms = float(self.timer(fn))
            except Exception as err:  # a candidate that cannot run this call is no candidate
                decision.failed[name] = f"{type(err).__name__}: {err}"
                continue
            if math.isfinite(ms):
                decision.ms[name] = ms
        if not decision.ms:
            warnings.warn(
                f"vit_fast tuning {key}: every candidate failed ({decision.failed}); using {default!r}",
                stacklevel=3,
            )
            return self._done(decision)
        decision.pick = _winner(decision.ms, default, self.margin)
        self.cache.put(key, decision.pick, decision.ms)
        self._fresh.add(key)
        return self._done(decision)

    def _done(self, decision: Decision) -> Decision:
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision


def _winner(ms: dict[str, float], default: str, margin: float) -> str:
    """The fastest candidate, except that the default keeps its place unless beaten by > `margin`."""
    best = min(ms, key=ms.__getitem__)
    if default in ms and ms[best] >= ms[default] * (1.0 - margin):
        return default
    return best
