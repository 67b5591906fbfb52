"""Op-level choice by measurement: for each fused op call (family, function, argument shapes and
dtypes), the fused backend or the plain-PyTorch one, whichever is faster on this device.

On CPU the candidates are "cpu" (the C++ extension) and "reference" (`vit_fast/plain/`
and friends: torch GEMMs and elementwise ops); on CUDA "triton" and "reference" (there the reference
is the cuBLAS path: torch's GEMMs with the elementwise work around them). Both implement the same
backend contract (docs/backend_contract.md: pure functions, same outputs and saved tensors), so a
forward and its backward may pick differently.

Only automatic choices are tuned: a backend forced with VIT_FAST_BACKEND or `use_backend` is used
as is. Not tuned either: Triton in the interpreter (a test tool, not a speed candidate), calls made
while another call is being measured, calls during CUDA graph capture (cached picks still apply).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vit_fast.tuning.selector import Decision, Selector, Timer, tuning_enabled

_local = threading.local()
_selectors: dict[str, Selector] = {}
_session: dict[str, Any] = {}
# Picks already decided in this process, by a tuple key that is cheap to build: the string key and the
# selector's cache are consulted once per call signature, not on every op call (that costs ~20 us a
# call, a few % of a batch-1 forward). Only outside a customised tuning_session, which clears it.
_picks: dict[tuple, str] = {}


@contextlib.contextmanager
def tuning_session(
    *,
    timer: Timer | None = None,
    remeasure: bool = False,
    on_decision: Callable[[Decision], None] | None = None,
    enabled: bool | None = None,
    model: str | None = None,
) -> Iterator[None]:
    """Change how op-level choices are made inside a `with` block (tests, `vit-fast tune`).

    timer: replaces the device's timer; remeasure: ignore cached picks; on_decision: sees every
    decision; enabled: overrides VIT_FAST_TUNE; model: the device model the cache is keyed by.
    """
    saved = dict(_session)
    _session.update(timer=timer, remeasure=remeasure, on_decision=on_decision, enabled=enabled, model=model)
    _selectors.clear()
    _picks.clear()
    try:
        yield
    finally:
        _session.clear()
        _session.update(saved)
        _selectors.clear()
        _picks.clear()


def enabled() -> bool:
    forced = _session.get("enabled")
    return tuning_enabled() if forced is None else forced


def selector(device: torch.device) -> Selector:
    """The selector of `device` under the current `tuning_session` settings."""
    name = str(device)
    if name not in _selectors:
        _selectors[name] = Selector(
            device,
            timer=_session.get("timer"),
            model=_session.get("model"),
            remeasure=bool(_session.get("remeasure")),
            on_decision=_session.get("on_decision"),
        )
    return _selectors[name]


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream: nothing may be timed
    then (only cached picks apply)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def signature(args: Sequence[Any]) -> str:
    """The part of a key that describes the call: shape, dtype and layout of every tensor argument
    (`c` contiguous, `s` strided), and the value of every other argument."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            dims = "x".join(str(s) for s in a.shape)
            parts.append(f"{str(a.dtype).removeprefix('torch.')}[{dims}]{'c' if a.is_contiguous() else 's'}")
        elif a is None:
            parts.append("-")
        else:
            parts.append(repr(a))
    return ",".join(parts)


def _memo_key(
    device: torch.device, family: str, op: str, args: Sequence[Any], names: Sequence[str]
) -> tuple | None:
    """`_picks`' key of a call (what `signature` describes, as a tuple: dtype, shape and contiguity of
    each tensor, other arguments as they are), or None when the call may not use the memo: inside a
    customised tuning_session."""
    if any(_session.values()):
        return None
    return (
        device,
        family,
        op,
        tuple(names),
        *[(a.dtype, a.shape, a.is_contiguous()) if isinstance(a, torch.Tensor) else a for a in args],
    )


def memoised_pick(
    device: torch.device, family: str, op: str, key_args: Sequence[Any], names: Sequence[str]
) -> str | None:
    """The pick already decided in this process for this call signature, or None (then ask
    `choose_backend`). The caller has checked that tuning is on for this call."""
    if getattr(_local, "measuring", False):
        return None
    key = _memo_key(device, family, op, key_args, names)
    if key is None:
        return None
    try:
        return _picks.get(key)
    except TypeError:  # an argument that is not hashable (a list): no memo for this call
        return None


def candidates(device: torch.device, default: str) -> list[str]:
    """The backends measured against each other for an automatic choice of `default` on `device`."""
    if device.type == "cuda" and default == "triton":
        return ["triton", "reference"]
    if device.type == "cpu" and default == "cpu":
        return ["cpu", "reference"]
    return [default]


def choose_backend(
    device: torch.device,
    family: str,
    op: str,
    key_args: Sequence[Any],
    run: Callable[[str], Any],
    default: str,
    *,
    names: Sequence[str] | None = None,
) -> str:
    """The backend for one call of `family`'s function `op`: `default` unless measuring says otherwise.

    `run(backend)` performs the call on that backend (its result is discarded); `key_args` are the
    arguments that decide the speed (seeds and the like left out); `names` overrides `candidates`.
    The caller has already handled forced backends (they never reach here).
    """
    names = list(names) if names is not None else candidates(device, default)
    if len(names) < 2 or not enabled() or getattr(_local, "measuring", False):
        return default
    memo = memoised_pick(device, family, op, key_args, names)
    if memo is not None:
        return memo
    chooser = selector(device)
    key = f"op/{family}/{op}/{signature(key_args)}"
    if capturing(device):
        cached = chooser.cache.get(key)
        return cached["pick"] if cached is not None and cached["pick"] in names else default

    def measured(name: str) -> Callable[[], Any]:
        return lambda: run(name)

    _local.measuring = True
    try:
        decision = chooser.choose(key, {n: measured(n) for n in names}, default=default, enabled=True)
    finally:
        _local.measuring = False
    if decision.source == "measured" and device.type == "cpu":
        from vit_fast.tuning import gemm

        gemm.save()  # the extension attached when it was first loaded
    if decision.source in ("measured", "cache"):
        memo_key = _memo_key(device, family, op, key_args, names)
        with contextlib.suppress(TypeError):  # unhashable arguments: no memo
            if memo_key is not None:
                _picks[memo_key] = decision.pick
    return decision.pick
