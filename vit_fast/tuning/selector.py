"""Choose among named candidates by measuring them, and remember the choice.

`Selector.choose(key, candidates)` returns the name of the fastest candidate for `key`: the cached
pick when the device's cache file has one (and it is still a candidate), else each candidate is
timed on the real call and the median winner is cached. `VIT_FAST_TUNE=off` turns measuring off
(the caller's default is used, the cache is neither read nor written); a `force` argument (from the
caller's own switch, e.g. VIT_FAST_BACKEND) always wins.

Timers take a zero-argument callable and return its median milliseconds; they are injectable so
tests can decide who wins. On CPU the candidates are timed interleaved (`cpu_times`): one untimed
warm-up of each, then rounds of one call of each until ~50 ms per candidate or 15 rounds (at least
3), medians. On CUDA: `triton.testing.do_bench` (median, it synchronises and
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


def cpu_times(
    fns: Mapping[str, Callable[[], Any]],
    *,
    target_ms: float = 50.0,
    min_reps: int = 3,
    max_reps: int = 15,
) -> dict[str, float | Exception]:
    """Median ms of each of `fns`, timed interleaved: one untimed warm-up call of each, then rounds of
    one timed call of each (the order rotated every round) until the rounds took ~`target_ms` per
    candidate or `max_reps` rounds (at least `min_reps`). A candidate that raises gets its exception.

    Interleaved because a shared VM drifts: timed back to back, two equally fast candidates read
    4% apart on a 2-core EPYC and the slower reading decided the pick."""
    out: dict[str, float | Exception] = {}
    live: list[tuple[str, Callable[[], Any]]] = []
    for name, fn in fns.items():
        try:
            fn()
        except Exception as err:  # a candidate that cannot run this call is no candidate
            out[name] = err
        else:
            live.append((name, fn))
    if not live:
        return out
    samples: dict[str, list[float]] = {name: [] for name, _ in live}
    start = time.perf_counter()
    for rnd in range(max_reps):
        first = rnd % len(live)
        for name, fn in live[first:] + live[:first]:
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if rnd + 1 >= min_reps and (time.perf_counter() - start) * 1e3 >= target_ms * len(live):
            break
    out.update({name: statistics.median(ms) for name, ms in samples.items()})
    return out


def cpu_timer(
    fn: Callable[[], Any], *, target_ms: float = 50.0, min_reps: int = 3, max_reps: int = 15
) -> float:
    """Median ms of `fn` over short timed blocks (one call per block) after one warm-up call."""
    ms = cpu_times({"fn": fn}, target_ms=target_ms, min_reps=min_reps, max_reps=max_reps)["fn"]
    if isinstance(ms, Exception):
        raise ms
    return ms


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
        for name, ms in self._measure(candidates).items():
            if isinstance(ms, Exception):
                decision.failed[name] = f"{type(ms).__name__}: {ms}"
            elif math.isfinite(ms):
                decision.ms[name] = float(ms)
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

    def _measure(self, candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float | Exception]:
        """Each candidate's ms (or the exception it raised): the CPU timer times them interleaved; an
        injected or CUDA timer times one after the other."""
        if self.timer is cpu_timer:
            return cpu_times(candidates)
        out: dict[str, float | Exception] = {}
        for name, fn in candidates.items():
            try:
                out[name] = float(self.timer(fn))
            except Exception as err:  # a candidate that cannot run this call is no candidate
                out[name] = err
        return out

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
