"""The tracing mode: every op that reaches the Python dispatcher becomes one `OpRecord`.

A `CostMode` (TorchDispatchMode) runs under a FakeTensorMode, so a ViT-B at batch 256 is traced
without allocating memory. Per op call:

* bytes = bytes read + written = the sizes of all input and output tensors (a broadcast input, with a
  zero stride, is counted once per distinct element; in-place ops count their target as read and written);
* FLOPs = `flops.count_flops`;
* views, reshapes, detach, allocation without initialisation and other metadata ops: not recorded.

A `vit_fast::` custom op with a registered fake kernel is seen as ONE op here (the mode never
descends into its body) and counted as one launch whose traffic is its inputs plus outputs. With
`kernel_level=True` the mode instead runs the op's Triton launcher on the fake tensors with every
Triton launch intercepted, which counts the kernels the op really launches and the operand bytes of
each (intermediates between its kernels included); ops whose launcher cannot run on fake tensors
fall back to one launch and are listed.

Each record also keeps which storages it read and wrote (`reads` / `writes`), so that a later pass can
fuse chains of memory-bound ops the way torch.compile does (`compiled.fuse_elementwise_chains`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vit_fast.perf.cost.flops import CUSTOM_LAUNCHES, count_flops
from vit_fast.perf.cost.gpus import LAUNCH_OVERHEAD_S, GPUSpec
from vit_fast.perf.cost.taxonomy import FREE_OPS, op_kind, op_name

#: Custom-op namespaces whose ops `CostMode(kernel_level=True)` traces through their Triton launcher.
KERNEL_LEVEL_NAMESPACES = {"vit_fast"}

#: (storage id, bytes touched) of one tensor operand.
Access = tuple[int, int]


def tensors(tree: Any) -> list[Tensor]:
    """The tensors in a pytree (args, kwargs, outputs)."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def tensor_bytes(t: Tensor) -> int:
    """Bytes one pass over `t` touches: distinct elements (zero-stride dims once) x element size."""
    if t.numel() == 0:
        return 0
    distinct = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return distinct * t.element_size()


@dataclass
class OpRecord:
    """One op call: its name, kind, phase (forward / backward / optimizer), launches, bytes, FLOPs.

    `reads` / `writes`: (storage id, bytes) of its tensor operands; ids are only comparable within
    one trace (the mode keeps the storages alive while it runs, so an id is never reused)."""

    op: str
    kind: str
    phase: str
    launches: int
    bytes: int
    flops: int
    dtype: torch.dtype
    flops_known: bool = True
    reads: tuple[Access, ...] = field(default=(), repr=False, compare=False)
    writes: tuple[Access, ...] = field(default=(), repr=False, compare=False)

    def time_s(self, gpu: GPUSpec, launch_overhead_s: float = LAUNCH_OVERHEAD_S) -> float:
        """Roofline time of this call on `gpu` at 100% of spec peaks (modeled)."""
        if self.launches == 0:
            return 0.0
        compute = self.flops / gpu.peak(self.dtype)
        memory = self.bytes / gpu.bandwidth
        return max(compute, memory) + self.launches * launch_overhead_s


def _smallest_float(ts: list[Tensor]) -> torch.dtype:
    floats = [t.dtype for t in ts if t.is_floating_point()]
    return min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32


class CostMode(TorchDispatchMode):
    """Records every op that reaches the Python dispatcher as an `OpRecord`.

    Use inside a FakeTensorMode (push FakeTensorMode first, then this) to trace without memory.
    Set `.phase` to label records ("forward", "backward", "optimizer").
    """

    def __init__(self, kernel_level: bool = False) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = "forward"
        self.unknown_ops: set[str] = set()
        #: kernel_level: run each vit_fast:: op's Triton body on the fake tensors with every Triton
        #: launch intercepted (see `_kernel_level`), instead of counting the op as one launch.
        self.kernel_level = kernel_level
        #: ops whose Triton body could not be traced (counted as one launch instead), with why.
        self.kernel_level_failed: dict[str, str] = {}
        # Storages seen, kept alive so that their ids stay unique for the whole trace (fake
        # storages hold no memory).
        self._alive: dict[int, Any] = {}

    def _access(self, ts: list[Tensor]) -> tuple[Access, ...]:
        out = []
        for t in ts:
            try:
                storage = t.untyped_storage()
            except (NotImplementedError, RuntimeError):
                continue
            key = storage._cdata  # the StorageImpl: shared by every view of it
            self._alive.setdefault(key, storage)
            out.append((key, tensor_bytes(t)))
        return tuple(out)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ns, name = op_name(func)
        key = f"{ns}::{name}"
        if self.kernel_level and ns in KERNEL_LEVEL_NAMESPACES:
            traced = self._kernel_level(func, key, args, kwargs)
            if traced is not None:
                return traced
        out = func(*args, **kwargs)
        if ns in ("prim", "profiler") or name in FREE_OPS or getattr(func, "is_view", False):
            return out
        flops = count_flops(func, args, kwargs, out)
        if flops is None:
            self.unknown_ops.add(key)
        ins, outs = tensors((args, kwargs)), tensors(out)
        nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
        if nbytes == 0 and not flops:
            return out  # only 0-element tensors (e.g. an absent gradient): no kernel runs
        self.records.append(
            OpRecord(
                op=key,
                kind=op_kind(ns, name),
                phase=self.phase,
                launches=CUSTOM_LAUNCHES.get(key, 1),
                bytes=nbytes,
                flops=flops or 0,
                dtype=_smallest_float(ins + outs),
                flops_known=flops is not None,
                reads=self._access(ins),
                writes=self._access(outs),
            )
        )
        return out

    def _kernel_level(self, func: Any, key: str, args: tuple, kwargs: dict) -> Any:
        """Run the Python body of custom op `func` on the Triton backend over the fake tensors,
        intercepting each Triton launch (nothing runs: a launch is recorded with the bytes of its
        tensor arguments, each operand read or written once) and recording the aten ops the
        launcher calls in between (allocations are free; casts, sums, zero-fills are launches).
        The op's FLOPs stay the op-level formula. Returns the op's outputs, or None (and notes why
        in `kernel_level_failed`) when the body cannot run on fake tensors."""
        from torch._library.custom_ops import _maybe_get_opdef

        from vit_fast.ops.backend import use_backend

        opdef = _maybe_get_opdef(key)
        if opdef is None:
            self.kernel_level_failed[key] = "not a torch.library.custom_op"
            return None
        kernels: list[int] = []
        inner = CostMode()
        inner.phase = self.phase
        # select_backend allows Triton on CPU tensors only under TRITON_INTERPRET=1; no kernel is
        # interpreted here (every launch is intercepted), the flag only lets the launcher run.
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            with use_backend("triton"), _intercept_triton_launches(kernels), inner:
                out = opdef._init_fn(*args, **kwargs)
        except Exception as err:
            self.kernel_level_failed[key] = (
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
            )
            return None
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
        flops = count_flops(func, args, kwargs, out)
        ins, outs = tensors((args, kwargs)), tensors(out)
        self.records.append(
            OpRecord(
                op=key,
                kind=op_kind(*op_name(func)),
                phase=self.phase,
                launches=len(kernels) + sum(r.launches for r in inner.records),
                bytes=sum(kernels) + sum(r.bytes for r in inner.records),
                flops=flops or 0,
                dtype=_smallest_float(ins),
                flops_known=flops is not None,
                reads=self._access(ins),
                writes=self._access(outs),
            )
        )
        return out


@contextlib.contextmanager
def _intercept_triton_launches(record: list[int]) -> Iterator[None]:
    """Replace the launch entry points of Triton (JIT, autotuner, heuristics, interpreter) by a
    recorder appending the tensor-argument bytes of each launch to `record`."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    targets: list[Any] = [jit.JITFunction, autotuner.Autotuner, autotuner.Heuristics]
    try:
        import triton.runtime.interpreter as interpreter

        targets.append(interpreter.InterpretedFunction)
    except ImportError:
        pass

    def launch(self: Any, *args: Any, **kwargs: Any) -> None:
        record.append(sum(tensor_bytes(a) for a in (*args, *kwargs.values()) if isinstance(a, Tensor)))

    saved = [(cls, cls.__dict__["run"]) for cls in targets if "run" in cls.__dict__]
    try:
        for cls, _ in saved:
            cls.run = launch
        yield
    finally:
        for cls, fn in saved:
            cls.run = fn
