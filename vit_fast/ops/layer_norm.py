"""The `layer_norm` op family: LayerNorm (optionally fused with a residual add) and LayerNorm fused
into the Linear that consumes it (the qkv projection).

Each public op validates its arguments, applies autocast, and calls a `torch.library` custom op
(`vit_fast::layer_norm_fwd`, `vit_fast::add_layer_norm_fwd`, `vit_fast::layer_norm_linear_fwd`
and their `_bwd` ops) whose body runs the backend `select_backend(device, "layer_norm")` picks.
All have fake kernels and autograd, so `torch.compile(fullgraph=True)` traces them as single
nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vit_fast.ops._checks import (
    autocast_args,
    autocast_off,
    check_eps,
    check_input,
    check_no_overlap,
    check_param,
    check_params,
    check_shape,
    check_tensor,
    contig,
    empty_like_none,
    none_if_empty,
    rows2d,
)
from vit_fast.ops._eager import run_op
from vit_fast.ops.backend import backend_fns, select_backend
from vit_fast.ops.contract import bind, schema

# ------------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "vit_fast::layer_norm_fwd",
    mutates_args=(),
    schema=schema("layer_norm_forward", "(Tensor, Tensor, Tensor)"),
)
def _layer_norm_fwd(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs: contract `layer_norm_forward` -> (y [M, D], mean [M], rstd [M])."""
    x = bind("layer_norm_forward", args).x
    return tuple(backend_fns(x.device, "layer_norm", x.dtype).layer_norm_forward(*args))


@_layer_norm_fwd.register_fake
def _(*args):
    x = bind("layer_norm_forward", args).x
    return (
        torch.empty_like(x),
        x.new_empty(x.shape[0], dtype=torch.float32),
        x.new_empty(x.shape[0], dtype=torch.float32),
    )


@torch.library.custom_op("vit_fast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if select_backend(x.device, "layer_norm", x.dtype) == "triton":
        from vit_fast.kernels.layer_norm import add_layer_norm_forward

        return add_layer_norm_forward(x, residual, weight, bias, eps)
    s = x + residual
    y, mean, rstd = backend_fns(x.device, "layer_norm", x.dtype).layer_norm_forward(s, weight, bias, eps)
    return y, s, mean, rstd


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    m = x.shape[0]
    stats = x.new_empty(m, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("vit_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    dres: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx [+ dres], dweight or empty, dbias or empty)."""
    if select_backend(x.device, "layer_norm", x.dtype) == "triton":
        from vit_fast.kernels.layer_norm import layer_norm_backward_fused

        dx, dw, db = layer_norm_backward_fused(dy, x, weight, mean, rstd, need_dbias=has_bias, dres=dres)
    else:
        dx, dw, db = backend_fns(x.device, "layer_norm", x.dtype).layer_norm_backward(
            dy, x, weight, mean, rstd
        )
        if dres is not None:
            dx = dx + dres
        if not has_bias:
            db = None
        elif db is None:  # LN with a bias but no weight: dbias is the column sum of dy.
            db = dy.float().sum(0).to(x.dtype)
    return dx, empty_like_none(dw, x), empty_like_none(db, x)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias, dres):
    d = x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty(d if weight is not None else 0),
        x.new_empty(d if has_bias else 0),
    )


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias, None)
    return dx, none_if_empty(dw), none_if_empty(db), None


_layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    _, s, mean, rstd = output
    # The sum s is an output the caller keeps anyway (the residual stream), so saving it costs
    # no extra memory.
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _add_ln_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dres = ds.contiguous() if ds is not None else None
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), s, weight, mean, rstd, ctx.has_bias, dres)
    return dx, dx, none_if_empty(dw), none_if_empty(db), None


_add_layer_norm_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


@torch.library.custom_op(
    "vit_fast::layer_norm_linear_fwd",
    mutates_args=(),
    schema=schema("layer_norm_linear_forward", "(Tensor, Tensor, Tensor)"),
)
def _layer_norm_linear_fwd(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs: contract `layer_norm_linear_forward` -> (out [M, N], mean [M], rstd [M])."""
    a = bind("layer_norm_linear_forward", args)
    return tuple(backend_fns(a.x.device, "layer_norm", a.x.dtype, a.weight).layer_norm_linear_forward(*args))


@_layer_norm_linear_fwd.register_fake
def _(*args):
    a = bind("layer_norm_linear_forward", args)
    stats = a.x.new_empty(a.x.shape[0], dtype=torch.float32)
    return a.x.new_empty(a.x.shape[0], a.weight.shape[0]), stats, torch.empty_like(stats)


@torch.library.custom_op(
    "vit_fast::layer_norm_linear_bwd",
    mutates_args=(),
    schema=schema("layer_norm_linear_backward", "(Tensor, Tensor, Tensor, Tensor, Tensor)"),
)
def _layer_norm_linear_bwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs: contract `layer_norm_linear_backward` -> (dx, dln_weight, dln_bias, dweight, dbias),
    absent ones as 0-element tensors."""
    a = bind("layer_norm_linear_backward", args)
    fns = backend_fns(a.x.device, "layer_norm", a.x.dtype, a.weight)
    dx, dlw, dlb, dw, db = fns.layer_norm_linear_backward(*args)
    return dx, empty_like_none(dlw, a.x), empty_like_none(dlb, a.x), dw, empty_like_none(db, a.x)


@_layer_norm_linear_bwd.register_fake
def _(*args):
    a = bind("layer_norm_linear_backward", args)
    d = a.x.shape[1]
    return (
        torch.empty_like(a.x),
        a.x.new_empty(d if a.ln_weight is not None else 0),
        a.x.new_empty(d if a.ln_bias is not None else 0),
        torch.empty_like(a.weight),
        a.x.new_empty(a.weight.shape[0] if a.has_bias else 0),
    )


def _lnl_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, _ = inputs
    _, mean, rstd = output
    # Saved: x, mean/rstd (fp32) and the parameters; the LN output is recomputed in the backward.
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
    ctx.has_bias = bias is not None
    # mean/rstd never get gradients: no materialised zero tensors (one launch each) for them.
    ctx.set_materialize_grads(False)


def _lnl_backward(ctx, dout, _dmean, _drstd):
    x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dx, dlw, dlb, dw, db = _layer_norm_linear_bwd(
        dout.contiguous(), x, ln_weight, ln_bias, weight, mean, rstd, ctx.has_bias
    )
    return dx, none_if_empty(dlw), none_if_empty(dlb), dw, none_if_empty(db), None


_layer_norm_linear_fwd.register_autograd(_lnl_backward, setup_context=_lnl_setup)


# ------------------------------------------- LN+Linear over a weight given as row blocks
# Separate q/k/v projections (Hugging Face) are one GEMM over their stacked weights. Stacking with
# torch.cat would copy 3*D*D elements every call and save that copy for backward; instead the op
# takes the blocks themselves and stacks them inside its body, as a view when they already lie one
# after another in one storage (what `vit_fast.patch` arranges), else as a copy. The blocks are
# read in their own dtype and cast once to x's (the compute dtype: autocast's, under autocast).


def join_rows(blocks: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Stack [N_i, ...] blocks along dim 0 in `dtype`: a zero-copy view when they are contiguous,
    of that dtype and adjacent in one storage (block i + 1 starts where block i ends), else a copy."""
    first = blocks[0]
    offset = first.storage_offset()
    adjacent = all(b.dtype == dtype and b.is_contiguous() for b in blocks)
    for b in blocks:
        adjacent = adjacent and b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        adjacent = adjacent and b.storage_offset() == offset
        offset += b.numel()
    if adjacent:
        rows = sum(b.shape[0] for b in blocks)
        shape = (rows, *first.shape[1:])
        return first.as_strided(shape, torch.empty(shape, device="meta").stride(), first.storage_offset())
    return torch.cat([b.to(dtype) for b in blocks])


@torch.library.custom_op("vit_fast::layer_norm_linear_rows_fwd", mutates_args=())
def _layer_norm_linear_rows_fwd(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """LN(x) @ stack(weights)^T + stack(biases) (biases: one per block, or an empty list) ->
    (out [M, sum N_i], mean [M], rstd [M])."""
    w = join_rows(weights, x.dtype)
    b = join_rows(biases, x.dtype) if biases else None
    return tuple(
        backend_fns(x.device, "layer_norm", x.dtype, w).layer_norm_linear_forward(
            x, ln_weight, ln_bias, w, b, eps
        )
    )


@_layer_norm_linear_rows_fwd.register_fake
def _(x, ln_weight, ln_bias, weights, biases, eps):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights)), stats, torch.empty_like(stats)


@torch.library.custom_op("vit_fast::layer_norm_linear_rows_bwd", mutates_args=())
def _layer_norm_linear_rows_bwd(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weights: list[Tensor],
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dln_weight, dln_bias, dweight [sum N_i, D], dbias [sum N_i]) in x's dtype, absent ones
    empty; the autograd formula splits dweight/dbias into the blocks (views, no copy)."""
    w = join_rows(weights, x.dtype)
    fns = backend_fns(x.device, "layer_norm", x.dtype, w)
    dx, dlw, dlb, dw, db = fns.layer_norm_linear_backward(
        dout, x, ln_weight, ln_bias, w, mean, rstd, has_bias
    )
    return dx, empty_like_none(dlw, x), empty_like_none(dlb, x), dw, empty_like_none(db, x)


@_layer_norm_linear_rows_bwd.register_fake
def _(dout, x, ln_weight, ln_bias, weights, mean, rstd, has_bias):
    d, n = x.shape[1], sum(w.shape[0] for w in weights)
    return (
        torch.empty_like(x),
        x.new_empty(d if ln_weight is not None else 0),
        x.new_empty(d if ln_bias is not None else 0),
        x.new_empty(n, d),
        x.new_empty(n if has_bias else 0),
    )


def _rows_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, weights, biases, _ = inputs
    _, mean, rstd = output
    # Saved: x, mean/rstd and the parameters themselves (no stacked copy of the weight).
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, *weights)
    ctx.bias_dtypes = [b.dtype for b in biases]
    ctx.set_materialize_grads(False)


def _rows_backward(ctx, dout, _dmean, _drstd):
    x, ln_weight, ln_bias, mean, rstd, *weights = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    has_bias = bool(ctx.bias_dtypes)
    dx, dlw, dlb, dw, db = _layer_norm_linear_rows_bwd(
        dout.contiguous(), x, ln_weight, ln_bias, weights, mean, rstd, has_bias
    )
    sizes = [w.shape[0] for w in weights]
    dws = [g.to(w.dtype) for g, w in zip(dw.split(sizes), weights)]
    dbs = [g.to(t) for g, t in zip(db.split(sizes), ctx.bias_dtypes)] if has_bias else []
    return dx, none_if_empty(dlw), none_if_empty(dlb), dws, dbs, None


_layer_norm_linear_rows_fwd.register_autograd(_rows_backward, setup_context=_rows_setup)


# ----------------------------------------------------------------------------- public ops


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-6,
    *,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim, statistics (mean, rstd) in fp32; see `vit_fast.reference.layer_norm`.

    x [..., D] (fp32/fp16/bf16; non-contiguous inputs are copied); weight, bias [D] or None, in
    x's dtype. With `residual` [..., D] the op computes s = x + residual and LN(s) in one pass
    and returns (LN(s), s). Output in x's dtype (the autocast dtype under autocast).
    Saved for backward: the LN input (x, or s with a residual), weight, mean [M] and rstd [M]
    (fp32); the normalised output is recomputed.
    """
    x = check_input(x)
    d = x.shape[-1]
    eps = check_eps(eps)
    if residual is not None:
        residual = check_input(residual, "residual")
    x, weight, bias, residual = autocast_args(x.device.type, x, weight, bias, residual)
    check_param(weight, "weight", (d,), x)
    check_param(bias, "bias", (d,), x)
    if residual is not None:
        check_tensor(residual, "residual", device=x.device, dtype=x.dtype)
        check_shape(residual, "residual", tuple(x.shape))
    shape = x.shape
    with autocast_off(x.device.type):
        if residual is None:
            y, _, _ = run_op(_layer_norm_fwd, rows2d(x), contig(weight), contig(bias), eps)
            return y.reshape(shape)
        y, s, _, _ = run_op(
            _add_layer_norm_fwd, rows2d(x), rows2d(residual), contig(weight), contig(bias), eps
        )
        return y.reshape(shape), s.reshape(shape)


def layer_norm_linear(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor | Sequence[Tensor],
    bias: Tensor | Sequence[Tensor] | None,
    eps: float,
) -> Tensor:
    """LN(x) @ weight^T + bias with the LN fused into the GEMM's A-tile prologue.

    x [..., D]; ln_weight, ln_bias [D] or None; weight [N, D]; bias [N] or None; all one dtype
    (fp32/fp16/bf16; the autocast dtype under autocast). Returns [..., N] in that dtype.
    Saved for backward: x, mean [M] and rstd [M] (fp32) and the parameters; the LN output is
    recomputed inside the weight-gradient GEMM's prologue.

    `weight` may also be a sequence of row blocks [N_i, D] (separate q/k/v projections), with
    `bias` None or one [N_i] per block: the result is that of their stacked weight, N = sum N_i,
    without stacking them per call when they are adjacent in memory (`join_rows`); the blocks may
    be float32 under autocast (read in their dtype, cast once inside the op) and each gets its own
    gradient in its own dtype.
    """
    x = check_input(x)
    eps = check_eps(eps)
    if isinstance(weight, (list, tuple)):
        return _layer_norm_linear_rows(x, ln_weight, ln_bias, list(weight), bias, eps)
    check_tensor(weight, "weight", ndim=2)
    x, ln_weight, ln_bias, weight, bias = autocast_args(x.device.type, x, ln_weight, ln_bias, weight, bias)
    d = x.shape[-1]
    n = weight.shape[0]
    check_params(
        x,
        (weight, "weight", (n, d), False),
        (ln_weight, "ln_weight", (d,), True),
        (ln_bias, "ln_bias", (d,), True),
        (bias, "bias", (n,), True),
    )
    with autocast_off(x.device.type):
        out, _, _ = run_op(
            _layer_norm_linear_fwd,
            rows2d(x),
            contig(ln_weight),
            contig(ln_bias),
            weight.contiguous(),
            contig(bias),
            eps,
        )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _layer_norm_linear_rows(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weights: list[Tensor],
    biases: object,
    eps: float,
) -> Tensor:
    """`layer_norm_linear` with the weight as row blocks: validation, then the rows op."""
    if not weights:
        raise ValueError("weight: a sequence of row blocks must hold at least one tensor")
    if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != len(weights)):
        raise ValueError(f"bias must be None or a sequence of {len(weights)} tensors, one per weight block")
    x, ln_weight, ln_bias = autocast_args(x.device.type, x, ln_weight, ln_bias)
    d = x.shape[-1]
    check_param(ln_weight, "ln_weight", (d,), x)
    check_param(ln_bias, "ln_bias", (d,), x)
    for i, w in enumerate(weights):
        check_tensor(w, f"weight[{i}]", ndim=2, device=x.device)
        check_shape(w, f"weight[{i}]", (w.shape[0], d))
        check_no_overlap(w, f"weight[{i}]")
        if biases is not None:
            check_tensor(biases[i], f"bias[{i}]", ndim=1, device=x.device)
            check_shape(biases[i], f"bias[{i}]", (w.shape[0],))
    bias_list = [] if biases is None else list(biases)
    with autocast_off(x.device.type):
        out, _, _ = run_op(
            _layer_norm_linear_rows_fwd,
            rows2d(x),
            contig(ln_weight),
            contig(ln_bias),
            weights,
            bias_list,
            eps,
        )
    return out.reshape(*x.shape[:-1], out.shape[-1])


__all__ = ["layer_norm", "layer_norm_linear"]
