"""A GPU cost model that runs without a GPU (DESIGN.md section 4): **modeled numbers, not measurements.**

A `CostMode` (TorchDispatchMode) runs under a FakeTensorMode, so a ViT-B at batch 256 is traced
without allocating memory. Every op that reaches the Python dispatcher is taken as one kernel launch:

* bytes = bytes read + written = the sizes of all input and output tensors (a broadcast input, with a
  zero stride, is counted once per distinct element; in-place ops count their target as read and written);
* FLOPs = torch.utils.flop_counter's formulas for the aten ops that have them (mm, addmm, bmm,
  convolution, the SDPA kernels...), our formulas for the `vit_fast::` custom ops (`CUSTOM_FLOPS`,
  keyed by op name, easy to extend), and 0 for elementwise/normalisation/reduction ops (the usual
  convention of `flop_counter` and fvcore; such ops are memory bound, so the roofline is unaffected);
* views, reshapes, detach, allocation without initialisation and other metadata ops: 0 launches, 0 bytes.

A `vit_fast::` custom op with a registered fake kernel is seen as ONE op here (the mode never
descends into its body) and counted as one launch whose traffic is its inputs plus outputs. With
`kernel_level=True` the mode instead runs the op's Triton launcher on the fake tensors with every
Triton launch intercepted, which counts the kernels the op really launches and the operand bytes of
each (intermediates between its kernels included); ops whose launcher cannot run on fake tensors
fall back to one launch and are listed.

Roofline per launch: ``time = max(flops / peak, bytes / bandwidth) + launch_overhead`` with spec
sheet peaks (H100 SXM: 989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32, 3.35 TB/s; A100 SXM:
312 / 19.5 TFLOP/s, 2.0 TB/s) and an assumed ``launch_overhead`` of 3 us per launch (the CPU-side
launch cost plus the ramp-up/tail of a short kernel; what a stream of small kernels pays per kernel
when the CPU does not run far ahead). Real kernels reach 60-80% of these peaks, so the modeled time is
a lower bound; its value is in comparing two programs under the same assumptions.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Assumed fixed cost of one kernel launch, seconds.
LAUNCH_OVERHEAD_S = 3e-6

#: Custom-op namespaces whose ops `CostMode(kernel_level=True)` traces through their Triton launcher.
KERNEL_LEVEL_NAMESPACES = {"vit_fast"}


@dataclass(frozen=True)
class GPUSpec:
    """Spec-sheet peaks of one GPU: dense FLOP/s per dtype (tensor cores for 16-bit) and HBM bytes/s."""

    name: str
    peak_flops: dict[torch.dtype, float]
    bandwidth: float

    def peak(self, dtype: torch.dtype) -> float:
        return self.peak_flops.get(dtype, self.peak_flops[torch.float32])


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec(
        "H100 SXM", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}, 3.35e12
    ),
    "a100": GPUSpec(
        "A100 SXM", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}, 2.0e12
    ),
}

# ----------------------------------------------------------------------------------------------
# Which ops cost nothing, and how ops are grouped into kinds.
# ----------------------------------------------------------------------------------------------

#: Ops that only create metadata or an uninitialised allocation: 0 launches, 0 bytes.
_FREE_OPS = {
    "detach",
    "alias",
    "lift_fresh",
    "lift_fresh_copy",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "_unsafe_view",
    "_reshape_alias",
    "set_",
    "resize_",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_to_copy_noop",
    "record_stream",
    "_has_compatible_shallow_copy_type",
}

_KIND_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("gemm", re.compile(r"^(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_scaled_mm)$")),
    ("conv", re.compile(r"conv")),
    ("attention", re.compile(r"attention")),
    ("softmax", re.compile(r"softmax")),
    ("norm", re.compile(r"(layer_norm|batch_norm|group_norm|rms_norm)")),
    ("dropout", re.compile(r"(dropout|bernoulli)")),
    ("optimizer", re.compile(r"(^_foreach_|^_fused_(adam|sgd)|adam)")),
    (
        "reduction",
        re.compile(r"^(sum|mean|amax|amin|max|min|var|std|norm|argmax|cumsum|nll_loss.*|_log_softmax.*)$"),
    ),
    (
        "copy/cast",
        re.compile(
            r"^(_to_copy|copy_|clone|contiguous|cat|stack|_copy_from|index_select|gather|scatter.*|zeros|zeros_like|zero_|fill_|ones|ones_like|full|full_like|new_zeros|new_ones|new_full|constant_pad_nd|slice_scatter|select_scatter|index_put_?|masked_fill_?)$"
        ),
    ),
]


def op_name(func: Any) -> tuple[str, str]:
    """(namespace, base name) of an OpOverload, e.g. ("aten", "addmm"), ("vit_fast", "attention")."""
    packet = func._schema.name  # "aten::addmm"
    ns, _, name = packet.partition("::")
    return ns, name


def op_kind(namespace: str, name: str) -> str:
    """The group an op is reported under. Our fused ops are their own kind ("vit_fast::attention")."""
    if namespace == "vit_fast":
        return f"vit_fast::{name.removesuffix('_backward').removesuffix('_forward').removesuffix('_bwd').removesuffix('_fwd')}"
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "elementwise"


# ----------------------------------------------------------------------------------------------
# FLOP formulas.
# ----------------------------------------------------------------------------------------------

FlopFormula = Callable[[tuple, dict, Any], int]

#: FLOP formulas by op name ("vit_fast::attention", "aten::_foo"); each gets (args, kwargs, out).
#: Ops in torch.utils.flop_counter.flop_registry need no entry.
CUSTOM_FLOPS: dict[str, FlopFormula] = {}

#: Launches per call for custom ops that are more than one kernel (default 1).
CUSTOM_LAUNCHES: dict[str, int] = {}


def register_flops(name: str, launches: int = 1) -> Callable[[FlopFormula], FlopFormula]:
    """Decorator registering the FLOP formula (and launch count) of op `name` ("ns::op")."""

    def deco(fn: FlopFormula) -> FlopFormula:
        CUSTOM_FLOPS[name] = fn
        if launches != 1:
            CUSTOM_LAUNCHES[name] = launches
        return fn

    return deco


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _attention_fwd_flops(qkv: Tensor) -> int:
    # QK^T and PV: 2 GEMMs of 2*T*T*hd per head = 4*B*T^2*D (softmax not counted).
    batch, tokens, width3 = qkv.shape[0], qkv.shape[-2], qkv.shape[-1]
    return 4 * batch * tokens * tokens * (width3 // 3)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


# Our ops, registered under several plausible names so forward and backward variants are covered;
# the names follow docs/backend_contract.md (the custom ops wrap these functions).


def _attn_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    return _attention_fwd_flops(_arg(args, kwargs, 0, "qkv"))


def _attn_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, plus recomputing S = Q K^T: 2.5x forward.
    # The packed qkv is the widest [B, T, 3D] tensor among the arguments (grad_out and out are [B, T, D]).
    qkv = max((t for t in _tensors((args, kwargs)) if t.dim() == 3), key=lambda t: t.shape[-1])
    return _attention_fwd_flops(qkv) * 5 // 2


def _varlen_sum_sq(qkv: Tensor, lengths: Tensor, padded: bool) -> int:
    """sum(len^2) of a varlen attention call. Fake/meta length tables have no values: then each
    sequence is taken as equally long (packed: total^2 / N; padded: B * T^2, the masked cost)."""
    try:
        host = lengths.detach().to("cpu", torch.int64)
        lens = host if padded else host[1:] - host[:-1]
        return int((lens * lens).sum())
    except Exception:  # FakeTensor / meta: data-dependent values are not available
        if padded:
            return qkv.shape[0] * qkv.shape[1] ** 2
        n = max(1, lengths.shape[0] - 1)
        return qkv.shape[0] ** 2 // n


@register_flops("vit_fast::attention_varlen_fwd")
def _attn_varlen_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    # Per sequence 4 * len^2 * D (QK^T and PV), so 4 * sum(len^2) * D: no work on padding.
    qkv, lengths, padded = (_arg(args, kwargs, i, n) for i, n in enumerate(("qkv", "lengths", "padded")))
    return 4 * _varlen_sum_sq(qkv, lengths, padded) * (qkv.shape[-1] // 3)


@register_flops("vit_fast::attention_varlen_bwd")
def _attn_varlen_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    qkv, lengths, padded = (
        _arg(args, kwargs, 1, "qkv"),
        _arg(args, kwargs, 4, "lengths"),
        _arg(args, kwargs, 5, "padded"),
    )
    return 10 * _varlen_sum_sq(qkv, lengths, padded) * (qkv.shape[-1] // 3)


def _ln_linear_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 3, "weight")
    return _gemm_flops(_rows(x), weight.shape[0], weight.shape[1])


def _ln_linear_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    # dx = dout W and dW = dout^T LN(x): two GEMMs of the forward's size.
    x, weight = _arg(args, kwargs, 1, "x"), _arg(args, kwargs, 4, "weight")
    return 2 * _gemm_flops(_rows(x), weight.shape[0], weight.shape[1])


def _lin_res_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "weight")
    return _gemm_flops(_rows(x), weight.shape[0], weight.shape[1])


def _lin_res_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = _arg(args, kwargs, 1, "x"), _arg(args, kwargs, 2, "weight")
    return 2 * _gemm_flops(_rows(x), weight.shape[0], weight.shape[1])


def _mlp_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    x, fc1 = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 3, "fc1_weight")
    return 2 * _gemm_flops(_rows(x), fc1.shape[0], fc1.shape[1])


def _mlp_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    # dfc2_w, dh, dfc1_w, dx_ln: four GEMMs of one forward GEMM's size each (h_pre is saved).
    x, fc1 = _arg(args, kwargs, 1, "x"), _arg(args, kwargs, 4, "fc1_weight")
    return 4 * _gemm_flops(_rows(x), fc1.shape[0], fc1.shape[1])


def _patch_fwd(args: tuple, kwargs: dict, out: Any) -> int:
    images, weight = _arg(args, kwargs, 0, "images"), _arg(args, kwargs, 1, "weight")
    patches = (images.shape[-2] // weight.shape[-2]) * (images.shape[-1] // weight.shape[-1])
    return _gemm_flops(images.shape[0] * patches, weight.shape[0], math.prod(weight.shape[1:]))


def _patch_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    # dW always; dimages only when the image needs a gradient (an output that is not None).
    images, weight = _arg(args, kwargs, 1, "images"), _arg(args, kwargs, 2, "weight")
    patches = (images.shape[-2] // weight.shape[-2]) * (images.shape[-1] // weight.shape[-1])
    one = _gemm_flops(images.shape[0] * patches, weight.shape[0], math.prod(weight.shape[1:]))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    # An absent gradient may travel as None or as a 0-element tensor (custom ops cannot return None).
    needs_dimages = bool(outs) and outs[0] is not None and outs[0].numel() > 0
    return one * (2 if needs_dimages else 1)


for _prefix in ("vit_fast::",):
    for _fwd, _bwd, _names in (
        (_attn_fwd, _attn_bwd, ("attention",)),
        (_ln_linear_fwd, _ln_linear_bwd, ("layer_norm_linear",)),
        (_lin_res_fwd, _lin_res_bwd, ("linear_residual",)),
        (_mlp_fwd, _mlp_bwd, ("mlp", "layer_norm_mlp")),
        (_patch_fwd, _patch_bwd, ("patch_embed",)),
    ):
        for _n in _names:
            for _suffix in ("", "_forward", "_fwd"):
                CUSTOM_FLOPS[f"{_prefix}{_n}{_suffix}"] = _fwd
            for _suffix in ("_backward", "_bwd"):
                CUSTOM_FLOPS[f"{_prefix}{_n}{_suffix}"] = _bwd

# Plain LayerNorm: no GEMM FLOPs, listed so a completeness check knows it is intentional.
for _base in ("layer_norm", "add_layer_norm"):
    for _suffix in ("", "_forward", "_backward", "_fwd", "_bwd"):
        CUSTOM_FLOPS[f"vit_fast::{_base}{_suffix}"] = lambda args, kwargs, out: 0


@register_flops("aten::_scaled_dot_product_flash_attention_for_cpu")
def _sdpa_cpu(args: tuple, kwargs: dict, out: Any) -> int:
    # q, k, v are [B, H, T, hd]: the CPU flash kernel that SDPA picks under fake CPU tensors.
    q, k, v = args[:3]
    return 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


@register_flops("aten::_scaled_dot_product_flash_attention_for_cpu_backward")
def _sdpa_cpu_bwd(args: tuple, kwargs: dict, out: Any) -> int:
    # 2.5x the forward, as for our attention: four GEMMs plus recomputing Q K^T (flash-style).
    q, k, v = args[1:4]
    return 5 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


def count_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int | None:
    """FLOPs of one op call; None when the op has no formula (an unknown custom op)."""
    ns, name = op_name(func)
    key = f"{ns}::{name}"
    if key in CUSTOM_FLOPS:
        return int(CUSTOM_FLOPS[key](args, kwargs, out))
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if ns == "aten":
        return 0  # elementwise, normalisation, reductions, copies: FLOPs not counted (see module doc)
    return None


# ----------------------------------------------------------------------------------------------
# Bytes.
# ----------------------------------------------------------------------------------------------


def tensor_bytes(t: Tensor) -> int:
    """Bytes one pass over `t` touches: distinct elements (zero-stride dims once) x element size."""
    if t.numel() == 0:
        return 0
    distinct = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return distinct * t.element_size()


# ----------------------------------------------------------------------------------------------
# The dispatch mode.
# ----------------------------------------------------------------------------------------------


@dataclass
class OpRecord:
    """One op call: its name, kind, phase (forward / backward / optimizer), launches, bytes, FLOPs."""

    op: str
    kind: str
    phase: str
    launches: int
    bytes: int
    flops: int
    dtype: torch.dtype
    flops_known: bool = True

    def time_s(self, gpu: GPUSpec, launch_overhead_s: float = LAUNCH_OVERHEAD_S) -> float:
        """Roofline time of this call on `gpu` (modeled)."""
        if self.launches == 0:
            return 0.0
        compute = self.flops / gpu.peak(self.dtype)
        memory = self.bytes / gpu.bandwidth
        return max(compute, memory) + self.launches * launch_overhead_s


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

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ns, name = op_name(func)
        key = f"{ns}::{name}"
        if self.kernel_level and ns in KERNEL_LEVEL_NAMESPACES:
            traced = self._kernel_level(func, key, args, kwargs)
            if traced is not None:
                return traced
        out = func(*args, **kwargs)
        if ns in ("prim", "profiler") or name in _FREE_OPS or getattr(func, "is_view", False):
            return out
        flops = count_flops(func, args, kwargs, out)
        if flops is None:
            self.unknown_ops.add(key)
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
        if nbytes == 0 and not flops:
            return out  # only 0-element tensors (e.g. an absent gradient): no kernel runs
        floats = [t.dtype for t in ins + outs if t.is_floating_point()]
        dtype = min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32
        self.records.append(
            OpRecord(
                op=key,
                kind=op_kind(ns, name),
                phase=self.phase,
                launches=CUSTOM_LAUNCHES.get(key, 1),
                bytes=nbytes,
                flops=flops or 0,
                dtype=dtype,
                flops_known=flops is not None,
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
        floats = [t.dtype for t in _tensors((args, kwargs)) if t.is_floating_point()]
        self.records.append(
            OpRecord(
                op=key,
                kind=op_kind(*op_name(func)),
                phase=self.phase,
                launches=len(kernels) + sum(r.launches for r in inner.records),
                bytes=sum(kernels) + sum(r.bytes for r in inner.records),
                flops=flops or 0,
                dtype=min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32,
                flops_known=flops is not None,
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


# ----------------------------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------------------------


@dataclass
class KindCost:
    kind: str
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    time_s: dict[str, float] = field(default_factory=dict)


@dataclass
class CostReport:
    """The modeled cost of one program (e.g. a training step of one model variant)."""

    label: str
    records: list[OpRecord]
    saved_bytes: int = 0
    batch: int = 1
    launch_overhead_s: float = LAUNCH_OVERHEAD_S
    unknown_ops: set[str] = field(default_factory=set)
    kernel_level_failed: dict[str, str] = field(default_factory=dict)

    def select(self, phases: Iterable[str] | None = None) -> list[OpRecord]:
        phases = None if phases is None else set(phases)
        return [r for r in self.records if phases is None or r.phase in phases]

    def total(self, phases: Iterable[str] | None = None) -> KindCost:
        tot = KindCost("total")
        for r in self.select(phases):
            _add(tot, r, self.launch_overhead_s)
        return tot

    def by_kind(self, phases: Iterable[str] | None = None) -> dict[str, KindCost]:
        kinds: dict[str, KindCost] = {}
        for r in self.select(phases):
            _add(kinds.setdefault(r.kind, KindCost(r.kind)), r, self.launch_overhead_s)
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1].time_s.get("h100", 0.0)))

    def flops(self, phases: Iterable[str] | None = None) -> int:
        return sum(r.flops for r in self.select(phases))

    def to_dict(self) -> dict[str, Any]:
        phases = sorted({r.phase for r in self.records})
        return {
            "label": self.label,
            "batch": self.batch,
            "saved_bytes": self.saved_bytes,
            "launch_overhead_s": self.launch_overhead_s,
            "unknown_ops": sorted(self.unknown_ops),
            "kernel_level_failed": dict(self.kernel_level_failed),
            "phases": {p: _kc_dict(self.total([p])) for p in phases},
            "total": _kc_dict(self.total()),
            "by_kind": {k: _kc_dict(v) for k, v in self.by_kind().items()},
        }


def _add(acc: KindCost, r: OpRecord, overhead: float) -> None:
    acc.launches += r.launches
    acc.bytes += r.bytes
    acc.flops += r.flops
    for key, gpu in GPUS.items():
        acc.time_s[key] = acc.time_s.get(key, 0.0) + r.time_s(gpu, overhead)


def _kc_dict(k: KindCost) -> dict[str, Any]:
    return {"launches": k.launches, "bytes": k.bytes, "flops": k.flops, "time_s": dict(k.time_s)}


# ----------------------------------------------------------------------------------------------
# Tracing models under fake tensors.
# ----------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Model variants `trace_step` can build (see `build_model`).
VARIANTS = ("timm", "timm-math", "reference", "fused", "auto")


def build_model(name: str, impl: str, **kwargs: Any) -> torch.nn.Module:
    """A model for `impl`: "timm" (stock timm, its SDPA attention), "timm-math" (stock timm with the
    attention written out: QK^T, softmax, PV), or "fused"/"reference"/"auto" (vit_fast.models).

    Build under `torch.device("meta")` to get shapes only (see `fake_model`).
    """
    if impl in ("timm", "timm-math"):
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        if impl == "timm-math":
            for mod in model.modules():
                if hasattr(mod, "fused_attn"):
                    mod.fused_attn = False
        return model
    try:
        from vit_fast.models import create_model
    except ImportError as err:
        raise RuntimeError(
            f"impl={impl!r} needs vit_fast.models.create_model, which is not available yet"
        ) from err
    return create_model(name, impl=impl, **kwargs)


def meta_model(name: str, impl: str, **kwargs: Any) -> torch.nn.Module:
    """`build_model` on the meta device. Call it OUTSIDE a FakeTensorMode: model init code may read
    values of small CPU tensors (timm's drop-path schedule does), which fake tensors cannot give.
    If the constructor cannot run on meta tensors (it reads a value of a tensor it created), the
    model is built on the CPU for real (memory = its parameters, freed once converted)."""
    try:
        with torch.device("meta"):
            return build_model(name, impl, **kwargs)
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err):
            raise
    return build_model(name, impl, **kwargs)


def to_fake(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every parameter and buffer of a meta `model` by an uninitialised fake CPU tensor,
    floating ones in `dtype` (call inside a FakeTensorMode)."""

    def convert(t: Tensor) -> Tensor:
        dt = dtype if t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=dt, device="cpu")

    return model._apply(convert)


@contextlib.contextmanager
def fake_mode() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


def trace_step(
    name: str,
    impl: str,
    batch: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    train: bool = True,
    optimizer: str | None = "adamw",
    img_size: int | None = None,
    label: str | None = None,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    kernel_level: bool = False,
    **model_kwargs: Any,
) -> CostReport:
    """Model one step of `name` built with `impl` at `batch` in `dtype` (parameters in `dtype`).

    train=False: one inference forward. train=True: forward, cross-entropy loss, backward, and the
    optimizer step ("adamw": fused AdamW, one launch per step; None: no optimizer). Also records the
    saved-for-backward bytes of the forward (parameters excluded, deduplicated by storage).
    kernel_level=True: each vit_fast:: op is traced through its Triton launcher (its real number of
    kernels and their operand bytes, see `CostMode._kernel_level`) instead of counting one launch.
    """
    from vit_fast.perf.memory import SavedTensorRecorder

    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")
    if impl not in VARIANTS:
        raise ValueError(f"impl must be one of {VARIANTS}, got {impl!r}")
    mode = CostMode(kernel_level=kernel_level)
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    model = meta_model(name, impl, **model_kwargs)
    with fake_mode():
        model = to_fake(model, dtype)
        size = img_size or _model_img_size(model)
        images = torch.empty(batch, 3, size, size, dtype=dtype)
        labels = torch.zeros(batch, dtype=torch.long)
        model.train(train)
        params = [p for p in model.parameters() if p.requires_grad]
        recorder = SavedTensorRecorder(params)
        if not train:
            with torch.no_grad(), mode:
                model(images)
        else:
            opt = None
            if optimizer == "adamw":
                opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
                # Create the optimizer state outside the recording: a steady-state step does not
                # allocate exp_avg / exp_avg_sq.
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                opt.zero_grad(set_to_none=True)
            elif optimizer is not None:
                raise ValueError(f"optimizer must be 'adamw' or None, got {optimizer!r}")
            with mode:
                mode.phase = "forward"
                with recorder:
                    logits = model(images)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                mode.phase = "backward"
                loss.backward()
                if opt is not None:
                    mode.phase = "optimizer"
                    opt.step()
    return CostReport(
        label=label or impl,
        records=mode.records,
        saved_bytes=recorder.result.activation_bytes,
        batch=batch,
        launch_overhead_s=launch_overhead_s,
        unknown_ops=mode.unknown_ops,
        kernel_level_failed=mode.kernel_level_failed,
    )


def _model_img_size(model: torch.nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return 224
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def forward_gflops_per_image(name: str, impl: str = "timm", dtype: torch.dtype = torch.float32) -> float:
    """Forward FLOPs per image (GFLOPs), from an inference trace at batch 1."""
    rep = trace_step(name, impl, 1, dtype, train=False)
    return rep.flops() / 1e9


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def format_comparison(reports: list[CostReport], gpus: Iterable[str] = ("h100", "a100")) -> str:
    """A plain-text table: totals per variant, ratios to the first variant, and per-kind rows.

    Labelled MODELED: these are roofline estimates, not measurements.
    """
    gpus = list(gpus)
    base = reports[0]
    head = (
        f"{'variant':24} {'kind':28} {'launches':>9} {'GB r+w':>10} {'GFLOP':>10} {'saved GB':>9}"
        + "".join(f" {'ms ' + g.upper():>10}" for g in gpus)
    )
    lines = [
        "MODELED (roofline over fake tensors, not measured): "
        f"launch overhead {base.launch_overhead_s * 1e6:.1f} us, "
        + ", ".join(
            f"{GPUS[g].name} {GPUS[g].peak(torch.bfloat16) / 1e12:.0f} TFLOP/s {GPUS[g].bandwidth / 1e12:.2f} TB/s"
            for g in gpus
        ),
        head,
        "-" * len(head),
    ]
    for rep in reports:
        tot = rep.total()
        lines.append(
            f"{rep.label:24} {'TOTAL':28} {tot.launches:>9,} {_gb(tot.bytes):>10} {tot.flops / 1e9:>10,.1f} "
            f"{_gb(rep.saved_bytes):>9}" + "".join(f" {tot.time_s[g] * 1e3:>10.2f}" for g in gpus)
        )
        for kind, kc in rep.by_kind().items():
            lines.append(
                f"{'':24} {kind[:28]:28} {kc.launches:>9,} {_gb(kc.bytes):>10} {kc.flops / 1e9:>10,.1f} "
                f"{'':>9}" + "".join(f" {kc.time_s[g] * 1e3:>10.2f}" for g in gpus)
            )
    if len(reports) > 1:
        lines.append("-" * len(head))
        ratio = lambda a, c: f"{a / c:.3f}" if c else "n/a"
        # every later variant against every earlier one (e.g. fused vs timm and fused vs reference)
        for j, rep in enumerate(reports[1:], start=1):
            for other in reports[:j]:
                t, b = rep.total(), other.total()
                lines.append(
                    f"{rep.label[:24]:24} {'ratio vs ' + other.label[:19]:28} {ratio(t.launches, b.launches):>9} "
                    f"{ratio(t.bytes, b.bytes):>10} {ratio(t.flops, b.flops):>10} "
                    f"{ratio(rep.saved_bytes, other.saved_bytes):>9}"
                    + "".join(f" {ratio(t.time_s[g], b.time_s[g]):>10}" for g in gpus)
                )
    for rep in reports:
        for op, why in sorted(rep.kernel_level_failed.items()):
            lines.append(f"{rep.label}: {op} not traced at kernel level (counted as 1 launch): {why}")
    unknown = sorted(set().union(*(r.unknown_ops for r in reports)))
    if unknown:
        lines.append(f"ops without a FLOP formula (counted as 0 FLOPs): {', '.join(unknown)}")
    return "\n".join(lines)
