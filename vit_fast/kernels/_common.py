"""The ground floor every kernel family builds on: the interpreter flag, the GPU architectures the
kernels ship for, the ahead-of-time spec type, the choice between 32- and 64-bit offsets, and the
`@triton.jit` helpers used by more than one kernel.

This module imports nothing from the rest of vit_fast, and Triton only if it is installed:
`vit_fast.ops.backend` re-exports `triton_interpreting` from here on CPU-only installs too.

Index width. A kernel computes element offsets `index * stride`; in int32 they wrap once they pass
2**31 - 1 and the kernel reads or writes the wrong address. The GEMM and patch-embedding kernels
therefore take an `IDX64` constexpr: False keeps the offset arithmetic in int32 (one register per
offset and cheaper integer ops: the common case), True forms every product of an index with a
stride or width in int64 via `index()` (indices themselves fit int32, as every size does; the GEMM
widens its index vectors where they are created, the patch-embedding kernels at each product, so
their divisions stay 32-bit). Launchers pick it with `needs_int64(...)` from the tensors the launch
addresses: every offset a launch forms for an in-bounds element is at most the largest element
offset of the tensor it points into (masked-off lanes may wrap, but are never accessed), so int32
is safe exactly when every such tensor's strided extent fits. (A stride of 2**31 or more arrives
as an i64 argument, so its products are 64-bit in either variant.) The LayerNorm kernels are
always int64 (kernels/layer_norm.py says why). Setting VIT_FAST_FORCE_INT64=1 selects the 64-bit
variants at every shape, which is how the tests run them in the interpreter on small tensors.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: GPU architectures (compute capability x 10) the kernels ship configs for and are AOT-compiled
#: for. Newer GPUs use the sm_90 tables, older ones sm_80's.
ARCHS: tuple[int, ...] = (80, 90)

#: Largest element offset an int32 offset can hold.
I32_MAX = 2**31 - 1

#: Environment variable that forces the 64-bit offset variants (tests, debugging).
FORCE_INT64_ENV = "VIT_FAST_FORCE_INT64"


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def force_int64() -> bool:
    """True when VIT_FAST_FORCE_INT64=1 asks for the 64-bit offset variants at every shape."""
    return os.environ.get(FORCE_INT64_ENV, "0") == "1"


def arch_key(capability: tuple[int, int]) -> int:
    """The ARCHS entry whose configs a GPU of this compute capability uses."""
    cc = capability[0] * 10 + capability[1]
    return max([a for a in ARCHS if a <= cc] or [ARCHS[0]])


def extent(t: Any) -> int:
    """One past the largest element offset of tensor t (its strided footprint); 0 when empty.
    Needs only shape and strides, so meta and fake tensors work."""
    if t.numel() == 0:
        return 0
    return 1 + sum(st * (n - 1) for st, n in zip(t.stride(), t.shape))


def needs_int64(*tensors: Any) -> bool:
    """Whether a launch addressing these tensors (None entries ignored) must use 64-bit offsets:
    some tensor's extent passes int32, or VIT_FAST_FORCE_INT64=1."""
    return force_int64() or any(extent(t) > I32_MAX for t in tensors if t is not None)


def kernel_parameters(fn: Any) -> dict[str, bool]:
    """{parameter name: is tl.constexpr} of a @triton.jit kernel, in order. Read from the Python
    function itself, so it works for compiled and interpreted (TRITON_INTERPRET=1) kernels alike."""
    sig = inspect.signature(getattr(fn, "fn", fn))
    # Annotations may be strings (from __future__ import annotations): "tl.constexpr".
    return {n: "constexpr" in str(p.annotation) for n, p in sig.parameters.items()}


@dataclass
class KernelSpec:
    """One kernel at one config, for `vit_fast.perf.aot`. `signature` maps every argument to a
    Triton type ('*fp16', 'i32', 'fp32', 'constexpr'); `constexprs` gives the constexpr values;
    `divisible_by_16` names the pointer/int args that the launcher guarantees divisible by 16 (as
    the JIT would specialise). Build one from the kernel's own parameter list with `for_kernel`."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple[str, ...] = ()
    archs: tuple[int, ...] = ARCHS

    @classmethod
    def for_kernel(
        cls,
        name: str,
        fn: Any,
        constexprs: Mapping[str, Any],
        *,
        ptr: str,
        types: Mapping[str, str] | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
        divisible_by_16: tuple[str, ...] = (),
        archs: tuple[int, ...] = ARCHS,
    ) -> KernelSpec:
        """A spec whose signature is generated from `fn`'s parameters, in order: a parameter with a
        value in `constexprs` is 'constexpr' (tl.constexpr parameters, and arguments the JIT
        specialises such as unit strides), one named in `types` gets that type, other `*_ptr`
        parameters are `*{ptr}` and other scalars 'i32'. Names that are not parameters, and
        tl.constexpr parameters without a value, raise ValueError, so the spec cannot drift from
        the kernel."""
        types = dict(types or {})
        params = kernel_parameters(fn)
        names = set(params)
        unknown = (set(constexprs) | set(types) | set(divisible_by_16)) - names
        if unknown:
            raise ValueError(f"{name}: {sorted(unknown)} are not parameters of {fn.__name__}")
        sig: dict[str, str] = {}
        for p, is_constexpr in params.items():
            if p in constexprs:
                sig[p] = "constexpr"
            elif is_constexpr:
                raise ValueError(f"{name}: constexpr parameter {p} of {fn.__name__} has no value")
            else:
                sig[p] = types.get(p, f"*{ptr}" if p.endswith("_ptr") else "i32")
        return cls(name, fn, sig, dict(constexprs), num_warps, num_stages, tuple(divisible_by_16), archs)


#: Row tiles per group in the grouped tile order (`grouped_tile`): 8 keeps a group's B tiles in L2.
GROUP_M = 8


def tile_meta(config: Sequence[int]) -> dict[str, int]:
    """A GEMM-like kernel's tile config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, ...) as
    the launch keywords every grouped-tile kernel takes."""
    bm, bn, bk, warps, stages = config[:5]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)


#: How a launcher with several candidate configs picks one for a call: installed by
#: vit_fast.tuning.kernels (measured on the device at first use, cached per GPU model). Without it,
#: or with one candidate, the first (default) config runs.
_config_chooser: list[Callable[..., Any]] = []


def set_config_chooser(chooser: Callable[..., Any] | None) -> None:
    """Install `chooser(device, key, configs, launch) -> config` (None removes it)."""
    _config_chooser[:] = [] if chooser is None else [chooser]


def choose_config(
    device: Any, configs: Sequence[Any], launch: Callable[[Any], None], key: Callable[[], str]
) -> Any:
    """The config to launch with: configs[0] unless there are several and a chooser is installed.
    `launch(config)` runs the call with a config (the chooser times it); `key()` names the call's
    shape class for the cache (only built when there is a choice to make)."""
    if len(configs) == 1 or not _config_chooser:
        return configs[0]
    return _config_chooser[0](device, key(), list(configs), launch)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the flag and the spec type above still work
    pass
else:

    @triton.jit
    def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of program `pid` over a num_m x num_n tile grid in grouped order:
        GROUP_M consecutive row tiles visit each column tile in turn, so the operand tiles they
        share stay in L2 across the group."""
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % rows
        pid_n = (pid % group) // rows
        return pid_m, pid_n

    @triton.jit
    def index(x, IDX64: tl.constexpr):
        """Index vector or scalar x in the launch's offset width: int64 when IDX64, else as is."""
        # One return: Triton checks all return statements agree in type, even pruned ones.
        if IDX64:
            # tl.cast, not .to: x may be a scalar argument the JIT specialised to a constexpr 1.
            y = tl.cast(x, tl.int64)
        else:
            y = x
        return y
