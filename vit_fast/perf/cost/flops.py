"""FLOP formulas, reading each op's arguments by the names in its schema (never by position).

Ops in `torch.utils.flop_counter.flop_registry` (mm, addmm, bmm, convolution, the CUDA SDPA kernels...)
use torch's formulas. Our `vit_fast::` custom ops are looked up by family and direction (see
`taxonomy.family`: "layer_norm_mlp_bwd" -> ("layer_norm_mlp", "bwd")), so a renamed suffix
(`_backward` -> `_bwd`) needs no new entry; other ops by full name in `CUSTOM_FLOPS`. Elementwise,
normalisation and reduction aten ops count 0 FLOPs (the convention of flop_counter and fvcore; they
are memory bound, so the roofline does not depend on it). Every formula gets `(a, out)`: `a` maps the
schema's argument names to the call's values (defaults filled in), `out` is the op's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vit_fast.perf.cost.taxonomy import family, op_name

FlopFormula = Callable[[dict[str, Any], Any], int]

#: Formulas of our fused op families, by (family, "fwd" | "bwd").
FAMILY_FLOPS: dict[tuple[str, str], FlopFormula] = {}

#: Formulas by full op name ("aten::_foo", "myns::op"): ops that are not a vit_fast family.
CUSTOM_FLOPS: dict[str, FlopFormula] = {}

#: Launches per call for ops that are more than one kernel at the op level (default 1).
CUSTOM_LAUNCHES: dict[str, int] = {}


def register_flops(name: str, launches: int = 1) -> Callable[[FlopFormula], FlopFormula]:
    """Decorator registering the FLOP formula (and launch count) of op `name` ("ns::op")."""

    def deco(fn: FlopFormula) -> FlopFormula:
        CUSTOM_FLOPS[name] = fn
        if launches != 1:
            CUSTOM_LAUNCHES[name] = launches
        return fn

    return deco


def _family_formula(fam: str, direction: str) -> Callable[[FlopFormula], FlopFormula]:
    def deco(fn: FlopFormula) -> FlopFormula:
        FAMILY_FLOPS[(fam, direction)] = fn
        return fn

    return deco


def bind_arguments(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in (`func` is an OpOverload)."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def formula_for(key: str) -> FlopFormula | None:
    """The formula of op `key` ("ns::name"), or None when there is none (torch's registry aside)."""
    if key in CUSTOM_FLOPS:
        return CUSTOM_FLOPS[key]
    ns, _, name = key.partition("::")
    if ns == "vit_fast":
        return FAMILY_FLOPS.get(family(name))
    return None


def has_flop_formula(key: str) -> bool:
    """Whether op `key` ("vit_fast::attention_fwd") has a formula here (used by a completeness test)."""
    return formula_for(key) is not None


def count_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int | None:
    """FLOPs of one op call; None when the op has no formula (an unknown custom op)."""
    ns, name = op_name(func)
    formula = formula_for(f"{ns}::{name}")
    if formula is not None:
        return int(formula(bind_arguments(func, args, kwargs), out))
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if ns == "aten":
        return 0  # elementwise, normalisation, reductions, copies: FLOPs not counted (module doc)
    return None


# ----------------------------------------------------------------------------------------------
# Our families (argument names: docs/backend_contract.md and the op schemas in vit_fast/ops/).
# ----------------------------------------------------------------------------------------------


def _gemm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _linear(x: Tensor, weight: Tensor) -> int:
    """One GEMM of x [..., K] with weight [N, K]."""
    return _gemm(_rows(x), weight.shape[0], weight.shape[1])


def _attention(qkv: Tensor) -> int:
    # QK^T and PV: 2 GEMMs of 2*T*T*hd per head = 4*B*T^2*D (softmax not counted).
    batch, tokens, width3 = qkv.shape[0], qkv.shape[-2], qkv.shape[-1]
    return 4 * batch * tokens * tokens * (width3 // 3)


@_family_formula("attention", "fwd")
def _attn_fwd(a: dict[str, Any], out: Any) -> int:
    return _attention(a["qkv"])


@_family_formula("attention", "bwd")
def _attn_bwd(a: dict[str, Any], out: Any) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, plus recomputing S = Q K^T: 2.5x forward.
    return _attention(a["qkv"]) * 5 // 2


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
        return qkv.shape[0] ** 2 // max(1, lengths.shape[0] - 1)


@_family_formula("attention_varlen", "fwd")
def _attn_varlen_fwd(a: dict[str, Any], out: Any) -> int:
    # Per sequence 4 * len^2 * D (QK^T and PV), so 4 * sum(len^2) * D: no work on padding.
    return 4 * _varlen_sum_sq(a["qkv"], a["lengths"], a["padded"]) * (a["qkv"].shape[-1] // 3)


@_family_formula("attention_varlen", "bwd")
def _attn_varlen_bwd(a: dict[str, Any], out: Any) -> int:
    return _attn_varlen_fwd(a, out) * 5 // 2


def _linear_gemms(weight: str, gemms: int) -> FlopFormula:
    """`gemms` GEMMs of the size of x [..., K] times the argument `weight` [N, K]."""
    return lambda a, out: gemms * _linear(a["x"], a[weight])


#: Our GEMM families: (family, the weight argument, GEMMs of that size in the forward, in the backward).
#: layer_norm_linear, linear_residual: one GEMM; backward dx = dout W and dW = dout^T x, two.
#: layer_norm_mlp: fc1 [H, D] and fc2 [D, H], two of one size; backward dfc2_w, dh, dfc1_w and dx_ln,
#: four (h_pre is saved, nothing is recomputed).
_LINEAR_FAMILIES = (
    ("layer_norm_linear", "weight", 1, 2),
    ("linear_residual", "weight", 1, 2),
    ("layer_norm_mlp", "fc1_weight", 2, 4),
)
for _fam, _weight, _fwd, _bwd in _LINEAR_FAMILIES:
    FAMILY_FLOPS[(_fam, "fwd")] = _linear_gemms(_weight, _fwd)
    FAMILY_FLOPS[(_fam, "bwd")] = _linear_gemms(_weight, _bwd)


def _row_blocks_gemms(gemms: int) -> FlopFormula:
    """layer_norm_linear over row blocks: the GEMMs of the stacked weight [sum N_i, K]."""
    return lambda a, out: (
        gemms * _gemm(_rows(a["x"]), sum(w.shape[0] for w in a["weights"]), a["x"].shape[-1])
    )


FAMILY_FLOPS[("layer_norm_linear_rows", "fwd")] = _row_blocks_gemms(1)
FAMILY_FLOPS[("layer_norm_linear_rows", "bwd")] = _row_blocks_gemms(2)


def _patch_gemm(images: Tensor, weight: Tensor) -> int:
    patches = (images.shape[-2] // weight.shape[-2]) * (images.shape[-1] // weight.shape[-1])
    return _gemm(images.shape[0] * patches, weight.shape[0], math.prod(weight.shape[1:]))


@_family_formula("patch_embed", "fwd")
def _patch_fwd(a: dict[str, Any], out: Any) -> int:
    return _patch_gemm(a["images"], a["weight"])


@_family_formula("patch_embed", "bwd")
def _patch_bwd(a: dict[str, Any], out: Any) -> int:
    # dW always; dimages only when the image needs a gradient (the schema says so).
    return _patch_gemm(a["images"], a["weight"]) * (2 if a["needs_image_grad"] else 1)


def _no_gemm(a: dict[str, Any], out: Any) -> int:
    return 0


# Plain LayerNorm families: no GEMM FLOPs, listed so the completeness test knows it is intentional.
for _fam in ("layer_norm", "add_layer_norm"):
    for _direction in ("fwd", "bwd"):
        FAMILY_FLOPS[(_fam, _direction)] = _no_gemm


@register_flops("aten::_scaled_dot_product_flash_attention_for_cpu")
def _sdpa_cpu(a: dict[str, Any], out: Any) -> int:
    # query, key, value are [B, H, T, hd]: the CPU flash kernel SDPA picks under fake CPU tensors.
    q, k, v = a["query"], a["key"], a["value"]
    return 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


@register_flops("aten::_scaled_dot_product_flash_attention_for_cpu_backward")
def _sdpa_cpu_bwd(a: dict[str, Any], out: Any) -> int:
    # 2.5x the forward, as for our attention: four GEMMs plus recomputing Q K^T (flash-style).
    return _sdpa_cpu(a, out) * 5 // 2
