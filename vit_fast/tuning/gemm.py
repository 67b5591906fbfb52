"""The C++ backend's per-shape GEMM choice (csrc/gemm.h) and the disk cache.

The extension keeps its own table (key -> candidate) and measures an unknown key itself, on the
real operands, inside the GIL-free op: calling back into Python there would need the GIL. This
module fills that table from the CPU model's cache file when the extension is first loaded (keys
stored with a `gemm/` prefix) and writes what the extension measured back: after every op-level
measurement, on `save()` and at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
import warnings
from types import ModuleType

from vit_fast.tuning.cache import cpu_identity, get_cache
from vit_fast.tuning.selector import tuning_enabled

PREFIX = "gemm/"
_saved: set[tuple[str, str]] = set()
_lock = threading.Lock()
_attached: list[ModuleType] = []
_identity: list[str] = []  # the cpu_identity() at first use: the table's picks belong to that file


def _cache():
    """The cache file of the CPU identity in force at the first load or save (attach loads first),
    pinned: a later torch.set_num_threads does not move the picks measured before it to another file."""
    if not _identity:
        _identity.append(cpu_identity())
    return get_cache(_identity[0])


def supported(ext: ModuleType | None) -> bool:
    return ext is not None and hasattr(ext, "gemm_choices") and hasattr(ext, "set_gemm_choices")


def attach(ext: ModuleType | None) -> None:
    """Load the cached GEMM picks into the extension and save new ones at exit (once per process)."""
    if not supported(ext) or _attached:
        return
    _attached.append(ext)
    if tuning_enabled():
        load(ext)
    atexit.register(_save_at_exit)


def load(ext: ModuleType) -> int:
    """Put the CPU model's cached GEMM picks into the extension's table; returns how many."""
    entries = _cache().entries()
    picks = {k[len(PREFIX) :]: v["pick"] for k, v in entries.items() if k.startswith(PREFIX)}
    refused = ext.set_gemm_choices(picks)
    if refused:
        warnings.warn(
            f"vit_fast tuning cache: unknown GEMM candidates for {refused}; measuring those again",
            stacklevel=2,
        )
    return len(picks) - len(refused)


def save(ext: ModuleType | None = None, *, force: bool = False) -> int:
    """Write the GEMM choices the extension measured in this process to the cache; returns how many new.

    Nothing is written with VIT_FAST_TUNE=off unless `force` (`vit-fast tune` measures on request)."""
    ext = ext if ext is not None else (_attached[0] if _attached else None)
    if not supported(ext) or not (force or tuning_enabled()):
        return 0
    cache = _cache()
    new = 0
    with _lock:
        for key, (pick, ms, measured) in ext.gemm_choices().items():
            if measured and (key, pick) not in _saved:
                cache.put(PREFIX + key, pick, dict(ms), save=False)
                _saved.add((key, pick))
                new += 1
        if new:
            cache.save()
    return new


def _save_at_exit() -> None:
    try:
        save()
    except Exception as err:  # never turn a clean exit into a traceback
        warnings.warn(f"vit_fast tuning: GEMM choices not saved ({err})", stacklevel=2)
