"""The on-disk tuning cache: one JSON file per device model, under the user's cache directory.

Directory: `$VIT_FAST_CACHE_DIR`, else `$XDG_CACHE_HOME/vit_fast`, else `~/.cache/vit_fast`. File
`tuning-<device model>.json`:

    {"format": "vit_fast-tuning", "version": 1, "device": "<model>", "torch": "<torch version>",
     "entries": {"<key>": {"pick": "<candidate>", "ms": {"<candidate>": <median ms>, ...}}}}

A measurement is only worth reusing on the same device model and the same torch build (its GEMM
libraries and kernels decide the timings), so a file of another format version, device or torch
version counts as stale: it is ignored with a warning and overwritten by the next save. An unreadable
or malformed file is treated the same way. Writes go to a temporary file in the same directory and
are moved into place with `os.replace`, so readers (other processes, a crash mid-write) never see a
half-written file; a save re-reads the file first and merges, so concurrent processes lose nothing
but a race on the same key.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = "vit_fast-tuning"
# 2: the C++ GEMM candidates are timed interleaved (csrc/gemm.cpp `measure`); picks of version 1 came
# from back-to-back timings that a drifting machine could decide, so they are measured again.
# 3: the op-level candidates are timed interleaved too (selector.cpu_times), and the plain backend's
# LayerNorm runs on aten's LN kernels (9x faster on CPU), so its op-level picks are measured again.
VERSION = 3


def cache_dir() -> Path:
    """Where the tuning files live (see the module docstring for the precedence)."""
    override = os.environ.get("VIT_FAST_CACHE_DIR", "").strip()
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vit_fast"


#: ISA extensions that change which GEMM / attention kernel wins (and whether some can run at all).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


CPUINFO = "/proc/cpuinfo"


@functools.cache
def _cpuinfo(path: str) -> tuple[str, str, str]:
    """(model name, "family F model M stepping S", the CPU_FEATURES present) of the first CPU in
    `path` (CPUINFO; by argument so that the cache tells files apart)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name", "")
    if not name:
        import platform

        name = platform.processor() or platform.machine() or "unknown-cpu"
    parts = [f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    flags = set(fields.get("flags", "").split())
    return name, " ".join(parts), " ".join(f for f in CPU_FEATURES if f in flags)


def cpu_model() -> str:
    """The CPU model string (`model name` in /proc/cpuinfo; platform.processor() elsewhere)."""
    return _cpuinfo(CPUINFO)[0]


def cpu_identity() -> str:
    """What a CPU measurement is valid for: the model name, the family / model / stepping numbers,
    the ISA extensions that decide kernels, and torch's thread count, e.g. "AMD EPYC (family 26
    model 2 stepping 0; avx2 avx512f avx512_vnni avx512_bf16; 2 threads)".

    Virtual machines often report a bare model name ("AMD EPYC", "Intel(R) Xeon(R) Processor") for
    CPU generations with different ISAs (Zen 4 vs Zen 5, AMX or not), and a pick measured on 2
    threads need not win on 16, so the name alone would share one cache between machines that
    disagree."""
    name, numbers, features = _cpuinfo(CPUINFO)
    details = "; ".join(p for p in (numbers, features, f"{torch.get_num_threads()} threads") if p)
    return f"{name} ({details})"


def device_model(device: torch.device | str) -> str:
    """What a measurement is valid for: `cpu_identity()` on CPU, the GPU name
    (torch.cuda.get_device_name) on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_identity()
    return device.type


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


class TuningCache:
    """The entries of one device model's cache file, loaded lazily, saved atomically.

    Entries are `{"pick": str, "ms": {candidate: float}}` keyed by a string the caller builds (op,
    shapes, layout, dtype). Thread-safe: the selector may be called from autograd worker threads.
    """

    def __init__(self, device_model: str, directory: Path | None = None) -> None:
        self.device_model = device_model
        self.directory = directory if directory is not None else cache_dir()
        self.path = self.directory / f"tuning-{_slug(device_model)}.json"
        self._entries: dict[str, dict[str, Any]] | None = None
        self._dirty: set[str] = set()
        self._lock = threading.RLock()

    # -- reading ---------------------------------------------------------------------------------
    def _read_file(self, *, warn: bool) -> dict[str, dict[str, Any]]:
        """The valid entries on disk; {} (with a warning when `warn`) for a missing, corrupt or stale file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            if warn:
                warnings.warn(
                    f"vit_fast tuning cache {self.path} unreadable ({err}); measuring again", stacklevel=3
                )
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a vit_fast tuning file")
            if not isinstance(data.get("entries"), dict):
                raise ValueError("no 'entries' object")
        except ValueError as err:
            if warn:
                warnings.warn(
                    f"vit_fast tuning cache {self.path} is corrupt ({err}); measuring again", stacklevel=3
                )
            return {}
        stale = []
        if data.get("version") != VERSION:
            stale.append(f"version {data.get('version')!r} != {VERSION}")
        if data.get("device") != self.device_model:
            stale.append(f"device {data.get('device')!r}")
        if data.get("torch") != torch.__version__:
            stale.append(f"torch {data.get('torch')!r} != {torch.__version__}")
        if stale:
            if warn:
                warnings.warn(
                    f"vit_fast tuning cache {self.path} is stale ({', '.join(stale)}); measuring again",
                    stacklevel=3,
                )
            return {}
        return {k: v for k, v in data["entries"].items() if _valid_entry(v)}

    def _loaded(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read_file(warn=True)
        return self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._loaded().get(key)

    def entries(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._loaded())

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key: str, pick: str, ms: dict[str, float], *, save: bool = True) -> None:
        entry = {"pick": pick, "ms": {k: float(v) for k, v in ms.items()}}
        with self._lock:
            self._loaded()[key] = entry
            self._dirty.add(key)
            if save:
                self.save()

    def save(self) -> None:
        """Merge this process's new entries into the file and replace it atomically.

        A failure to write (read-only home, full disk) only warns: the choices still hold for this
        process."""
        with self._lock:
            if not self._dirty:
                return
            merged = self._read_file(warn=False)
            merged.update({k: self._loaded()[k] for k in self._dirty})
            data = {
                "format": FORMAT,
                "version": VERSION,
                "device": self.device_model,
                "torch": torch.__version__,
                "entries": dict(sorted(merged.items())),
            }
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.directory)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(data, f, indent=1)
                        f.write("\n")
                    os.replace(tmp, self.path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            except OSError as err:
                warnings.warn(f"vit_fast tuning cache {self.path} not written ({err})", stacklevel=2)
                return
            self._entries = merged
            self._dirty.clear()


def _valid_entry(v: object) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("pick"), str)
        and isinstance(v.get("ms", {}), dict)
        and all(isinstance(x, (int, float)) for x in v.get("ms", {}).values())
    )


_caches: dict[tuple[str, str], TuningCache] = {}
_caches_lock = threading.Lock()


def get_cache(model: str) -> TuningCache:
    """The process-wide cache object of device model `model` in the current cache directory."""
    directory = cache_dir()
    with _caches_lock:
        key = (str(directory), model)
        if key not in _caches:
            _caches[key] = TuningCache(model, directory)
        return _caches[key]


def reset_caches() -> None:
    """Forget the loaded cache objects (tests; a changed VIT_FAST_CACHE_DIR)."""
    with _caches_lock:
        _caches.clear()
