"""Which ops cost nothing, which group ("kind") an op is reported under, and which kernel class
(what kind of kernel runs it on a GPU) the calibrated predictor charges it as."""

from __future__ import annotations

import re
from typing import Any

#: Ops that only create metadata or an uninitialised allocation: 0 launches, 0 bytes.
FREE_OPS = {
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

#: Suffixes that mark the forward / backward op of one family: every custom op is
#: `vit_fast::<family>_fwd` or `vit_fast::<family>_bwd`.
_FWD_SUFFIXES = ("_fwd",)
_BWD_SUFFIXES = ("_bwd",)


def op_name(func: Any) -> tuple[str, str]:
    """(namespace, base name) of an OpOverload, e.g. ("aten", "addmm"), ("vit_fast", "attention_fwd")."""
    ns, _, name = func._schema.name.partition("::")
    return ns, name


def family(name: str) -> tuple[str, str]:
    """(family, direction) of a custom op name: "layer_norm_mlp_bwd" -> ("layer_norm_mlp", "bwd");
    a name without a direction suffix is a forward."""
    for suffix in _BWD_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix), "bwd"
    for suffix in _FWD_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix), "fwd"
    return name, "fwd"


def op_kind(namespace: str, name: str) -> str:
    """The group an op is reported under. Our fused ops are their own kind ("vit_fast::attention")."""
    if namespace == "vit_fast":
        return f"vit_fast::{family(name)[0]}"
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "elementwise"


# ----------------------------------------------------------------------------------------------
# Kernel classes: what the calibrated predictor (predict.py) charges an op as.
# ----------------------------------------------------------------------------------------------

#: The classes, each with its own fitted (or assumed) efficiency; launch gaps are charged per launch.
KERNEL_CLASSES = ("cublas_gemm", "triton_gemm", "flash_attention", "memory")

#: Our fused families whose FLOPs are GEMMs run by our Triton GEMM (the rest of their work rides on it).
TRITON_GEMM_FAMILIES = {
    "layer_norm_linear",
    "layer_norm_linear_rows",
    "linear_residual",
    "layer_norm_mlp",
    "patch_embed",
}

#: Kinds that never start a GEMM: the memory-bound elementwise / normalisation / reduction work that
#: torch.compile fuses into one kernel per chain (see compiled.py).
MEMORY_KINDS = {"elementwise", "norm", "softmax", "dropout", "copy/cast", "reduction"}


def kernel_class(kind: str) -> str:
    """The kernel class of a record of `kind` (from `op_kind`)."""
    if kind in ("gemm", "conv"):
        return "cublas_gemm"
    if kind.endswith(("attention", "attention_varlen")):
        return "flash_attention"
    if kind.startswith("vit_fast::") and kind.removeprefix("vit_fast::") in TRITON_GEMM_FAMILIES:
        return "triton_gemm"
    return "memory"  # elementwise, norms, reductions, copies, the optimizer, our LayerNorm ops
