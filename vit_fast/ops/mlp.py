"""The `mlp` op family: the attention output projection with its residual epilogue
(`linear_residual`) and the whole pre-LN MLP sub-block (`layer_norm_mlp`).

Each public op validates its arguments, applies autocast, and calls a `torch.library` custom op
(`vit_fast::linear_residual_fwd`, `vit_fast::layer_norm_mlp_fwd` and their `_bwd` ops) whose body
runs the backend `select_backend(device, "mlp")` picks (Triton kernels, the C++ extension or the
plain-PyTorch reference, all with the signatures of docs/backend_contract.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vit_fast.ops._checks import (
    autocast_args,
    autocast_off,
    check_approximate,
    check_dps,
    check_eps,
    check_input,
    check_params,
    check_shape,
    check_tensor,
    contig,
    empty_like_none,
    none_if_empty,
    rows2d,
)
from vit_fast.ops._eager import run_op
from vit_fast.ops.backend import backend_fns
from vit_fast.ops.contract import bind, schema

__all__ = ["layer_norm_mlp", "linear_residual"]


# ------------------------------------------------------------------------- linear_residual


@torch.library.custom_op(
    "vit_fast::linear_residual_fwd", mutates_args=(), schema=schema("linear_residual_forward", "Tensor")
)
def _linear_residual_fwd(*args: Any) -> Tensor:
    """Inputs: contract `linear_residual_forward` -> out [M, N]."""
    a = bind("linear_residual_forward", args)
    return backend_fns(a.x.device, "mlp", a.x.dtype, a.weight).linear_residual_forward(*args)


@_linear_residual_fwd.register_fake
def _(*args):
    return torch.empty_like(bind("linear_residual_forward", args).residual)


@torch.library.custom_op(
    "vit_fast::linear_residual_bwd",
    mutates_args=(),
    schema=schema("linear_residual_backward", "(Tensor, Tensor, Tensor, Tensor)"),
)
def _linear_residual_bwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs: contract `linear_residual_backward` -> (dx, dweight, dbias or empty, dgamma or empty);
    dresidual is dout itself (handled by the autograd formula without a copy, since custom-op
    outputs may not alias inputs)."""
    a = bind("linear_residual_backward", args)
    dx, dw, db, _, dg = backend_fns(a.x.device, "mlp", a.x.dtype, a.weight).linear_residual_backward(*args)
    return dx, dw, empty_like_none(db, a.x), empty_like_none(dg, a.x)


@_linear_residual_bwd.register_fake
def _(*args):
    a = bind("linear_residual_backward", args)
    n = a.weight.shape[0]
    return (
        torch.empty_like(a.x),
        torch.empty_like(a.weight),
        a.x.new_empty(n if a.bias is not None else 0),
        a.x.new_empty(n if a.gamma is not None and a.needs_gamma_grad else 0),
    )


def _lr_setup(ctx, inputs, output):
    x, weight, bias, _, gamma, dps, tokens = inputs
    # Saved: the GEMM input x and the parameters; the GEMM output (needed for dgamma) is not
    # saved, the backward recovers dgamma from the weight-gradient product.
    ctx.save_for_backward(x, weight, bias, gamma, dps)
    ctx.tokens = tokens


def _lr_backward(ctx, dout):
    x, weight, bias, gamma, dps = ctx.saved_tensors
    needs_dgamma = gamma is not None and ctx.needs_input_grad[4]
    dout = dout.contiguous()
    dx, dw, db, dg = _linear_residual_bwd(dout, x, weight, bias, gamma, dps, ctx.tokens, needs_dgamma)
    return dx, dw, none_if_empty(db), dout, none_if_empty(dg), None, None


_linear_residual_fwd.register_autograd(_lr_backward, setup_context=_lr_setup)


def linear_residual(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    *,
    gamma: Tensor | None = None,
    drop_path_scale: Tensor | None = None,
) -> Tensor:
    """residual + gamma * drop_path_scale * (x @ weight^T + bias), one GEMM with the rest in its epilogue.

    x [B, T, K] (or [..., K] without drop_path_scale); weight [N, K]; bias [N]; residual
    [..., N]; gamma [N] (layer-scale); drop_path_scale [B], any float dtype (0 for a dropped
    sample, 1/keep_prob for a kept one). Returns [..., N] in x's dtype (autocast dtype under
    autocast). Saved for backward: x and the parameters (not the GEMM output).
    """
    x = check_input(x)
    check_tensor(weight, "weight", ndim=2)
    residual = check_input(residual, "residual")
    x, weight, bias, residual, gamma = autocast_args(x.device.type, x, weight, bias, residual, gamma)
    n, k = weight.shape[0], x.shape[-1]
    check_params(
        x, (weight, "weight", (n, k), False), (bias, "bias", (n,), True), (gamma, "gamma", (n,), True)
    )
    check_tensor(residual, "residual", device=x.device, dtype=x.dtype)
    check_shape(residual, "residual", (*x.shape[:-1], n))
    drop_path_scale = check_dps(drop_path_scale, x)
    tokens = x.shape[1] if drop_path_scale is not None else 1
    with autocast_off(x.device.type):
        out = run_op(
            _linear_residual_fwd,
            rows2d(x),
            weight.contiguous(),
            contig(bias),
            rows2d(residual),
            contig(gamma),
            drop_path_scale,
            tokens,
        )
    return out.reshape(residual.shape)


# -------------------------------------------------------------------------- layer_norm_mlp


@torch.library.custom_op(
    "vit_fast::layer_norm_mlp_fwd",
    mutates_args=(),
    schema=schema("mlp_forward", "(Tensor, Tensor, Tensor, Tensor)"),
)
def _mlp_fwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs: contract `mlp_forward` -> (out [M, D], mean [M], rstd [M], h_pre [M, F])."""
    a = bind("mlp_forward", args)
    return tuple(backend_fns(a.x.device, "mlp", a.x.dtype, a.fc1_weight).mlp_forward(*args))


@_mlp_fwd.register_fake
def _(*args):
    a = bind("mlp_forward", args)
    m = a.x.shape[0]
    stats = a.x.new_empty(m, dtype=torch.float32)
    return torch.empty_like(a.x), stats, torch.empty_like(stats), a.x.new_empty(m, a.fc1_weight.shape[0])


@torch.library.custom_op(
    "vit_fast::layer_norm_mlp_bwd", mutates_args=(), schema=schema("mlp_backward", "Tensor[]")
)
def _mlp_bwd(*args: Any) -> list[Tensor]:
    """Inputs: contract `mlp_backward` -> [dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias,
    dfc2_weight, dfc2_bias, dgamma], absent ones as 0-element tensors."""
    a = bind("mlp_backward", args)
    grads = backend_fns(a.x.device, "mlp", a.x.dtype, a.fc1_weight).mlp_backward(*args)
    return [empty_like_none(g, a.x) for g in grads]


@_mlp_bwd.register_fake
def _(*args):
    a = bind("mlp_backward", args)
    d, f = a.x.shape[1], a.fc1_weight.shape[0]

    def maybe(cond: bool, n: int) -> Tensor:
        return a.x.new_empty(n if cond else 0)

    return [
        torch.empty_like(a.x),
        maybe(a.ln_weight is not None, d),
        maybe(a.ln_bias is not None, d),
        torch.empty_like(a.fc1_weight),
        maybe(a.has_fc1_bias, f),
        torch.empty_like(a.fc2_weight),
        maybe(a.fc2_bias is not None, d),
        maybe(a.gamma is not None and a.needs_gamma_grad, d),
    ]


def _mlp_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _, gamma, dps, tokens, approximate = (
        inputs
    )
    _, mean, rstd, h_pre = output
    # Saved activations: x (LN input), mean/rstd (fp32 [M]) and h_pre (fc1 pre-activation); the
    # LN output and the GELU output are recomputed in the backward GEMMs' prologues.
    ctx.save_for_backward(
        x, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias, gamma, dps, mean, rstd, h_pre
    )
    ctx.tokens = tokens
    ctx.approximate = approximate
    ctx.has_fc1_bias = fc1_bias is not None
    # mean/rstd/h_pre never get gradients: no materialised zero tensors (one launch each) for them.
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, dout, _dmean, _drstd, _dh_pre):
    x, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias, gamma, dps, mean, rstd, h_pre = ctx.saved_tensors
    if dout is None:
        return (None,) * 12
    needs_dgamma = gamma is not None and ctx.needs_input_grad[8]
    grads = _mlp_bwd(
        dout.contiguous(),
        x,
        ln_weight,
        ln_bias,
        fc1_weight,
        fc2_weight,
        fc2_bias,
        gamma,
        dps,
        ctx.tokens,
        mean,
        rstd,
        h_pre,
        ctx.approximate,
        ctx.has_fc1_bias,
        needs_dgamma,
    )
    dx, dlw, dlb, dw1, db1, dw2, db2, dg = grads
    e = none_if_empty
    return dx, e(dlw), e(dlb), dw1, e(db1), dw2, e(db2), None, e(dg), None, None, None


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def layer_norm_mlp(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    eps: float,
    *,
    gamma: Tensor | None = None,
    drop_path_scale: Tensor | None = None,
    approximate: str = "none",
) -> Tensor:
    """The pre-LN MLP sub-block x + gamma * dps * fc2(gelu(fc1(LN(x)))) in three launches.

    x [B, T, D] (or [..., D] without drop_path_scale); ln_weight, ln_bias [D]; fc1_weight [F, D];
    fc1_bias [F]; fc2_weight [D, F]; fc2_bias [D]; gamma [D]; drop_path_scale [B] (any float
    dtype). All other tensors share x's dtype (fp32/fp16/bf16; the autocast dtype under
    autocast). GELU: exact (erf), 'tanh' or 'quick' (x * sigmoid(1.702 x)). Returns [..., D] in x's dtype.
    Saved for backward: x, mean [M] and rstd [M] (fp32), h_pre [M, F] (fc1 pre-activation) and
    the parameters; LN(x) and GELU(h_pre) are recomputed.
    """
    x = check_input(x)
    eps = check_eps(eps)
    approximate = check_approximate(approximate)
    check_tensor(fc1_weight, "fc1_weight", ndim=2)
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma = autocast_args(
        x.device.type, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma
    )
    d, f = x.shape[-1], fc1_weight.shape[0]
    check_params(
        x,
        (fc1_weight, "fc1_weight", (f, d), False),
        (fc2_weight, "fc2_weight", (d, f), False),
        (ln_weight, "ln_weight", (d,), True),
        (ln_bias, "ln_bias", (d,), True),
        (fc1_bias, "fc1_bias", (f,), True),
        (fc2_bias, "fc2_bias", (d,), True),
        (gamma, "gamma", (d,), True),
    )
    drop_path_scale = check_dps(drop_path_scale, x)
    tokens = x.shape[1] if drop_path_scale is not None else 1
    with autocast_off(x.device.type):
        out, _, _, _ = run_op(
            _mlp_fwd,
            rows2d(x),
            contig(ln_weight),
            contig(ln_bias),
            fc1_weight.contiguous(),
            contig(fc1_bias),
            fc2_weight.contiguous(),
            contig(fc2_bias),
            eps,
            contig(gamma),
            drop_path_scale,
            tokens,
            approximate,
        )
    return out.reshape(x.shape)
