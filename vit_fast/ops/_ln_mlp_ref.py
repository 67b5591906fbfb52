"""The "reference" backend of the `layer_norm` and `mlp` families: plain PyTorch functions with the
names and signatures of docs/backend_contract.md, used when neither Triton nor the C++ extension
serves the device. Forwards compute statistics in fp32; backwards recompute the forward from the
same saved tensors the kernels use (x, mean/rstd, h_pre) with explicit gradient formulas, so
this backend saves exactly what the fused ones save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vit_fast import reference


def _ln(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor) -> Tensor:
    """LN(x) from given fp32 statistics, in x's dtype."""
    y = (x.float() - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def layer_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    var, mean = torch.var_mean(x.float(), dim=1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    return _ln(x, weight, bias, mean, rstd), mean, rstd


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # Closed-form LN backward in fp32 (mean and rstd depend on x; the formula accounts for it).
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    c1 = (g * xhat).mean(1, keepdim=True)
    c2 = g.mean(1, keepdim=True)
    dx = ((g - xhat * c1 - c2) * rstd[:, None]).to(x.dtype)
    if weight is None:
        return dx, None, None
    return dx, (dyf * xhat).sum(0).to(weight.dtype), dyf.sum(0).to(weight.dtype)


def layer_norm_linear_forward(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = layer_norm_forward(x, ln_weight, ln_bias, eps)
    return F.linear(y, weight, bias), mean, rstd


def layer_norm_linear_backward(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
    y = _ln(x, ln_weight, ln_bias, mean, rstd)  # recomputed, as the fused backends do
    dw = dout.t() @ y
    db = dout.float().sum(0).to(weight.dtype) if has_bias else None
    dy = dout @ weight
    dx, _, _ = layer_norm_backward(dy, x, ln_weight, mean, rstd)
    dyf = dy.float()
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dlw = (dyf * xhat).sum(0).to(ln_weight.dtype) if ln_weight is not None else None
    dlb = dyf.sum(0).to(ln_bias.dtype) if ln_bias is not None else None
    return dx, dlw, dlb, dw, db


def linear_residual_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    gamma: Tensor | None,
    dps: Tensor | None,
    tokens_per_sample: int,
) -> Tensor:
    # The epilogue runs in float32 like the fused kernels': a float16 GEMM result can pass 65504
    # before a small layer-scale brings it back into range, so float16 GEMMs also produce float32.
    if x.dtype == torch.float16:
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    else:
        y = F.linear(x, weight, bias).float()
    if gamma is not None:
        y = y * gamma.float()
    if dps is not None:
        y = y * dps.float().repeat_interleave(tokens_per_sample)[:, None]
    return (residual.float() + y).to(residual.dtype)


def linear_residual_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    dps: Tensor | None,
    tokens_per_sample: int,
    needs_gamma_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    # Explicit formulas: custom-op bodies run below the autograd dispatch key, so autograd
    # cannot be used here.
    s = dout if dps is None else dout * dps.to(dout.dtype).repeat_interleave(tokens_per_sample)[:, None]
    dgamma = None
    if gamma is not None and needs_gamma_grad:
        y = F.linear(x, weight, bias)  # recomputed: the forward does not save it
        dgamma = (s.float() * y.float()).sum(0).to(gamma.dtype)
    sg = s * gamma if gamma is not None else s
    dw = sg.t() @ x
    db = sg.float().sum(0).to(weight.dtype) if bias is not None else None
    return sg @ weight, dw, db, dout, dgamma


def mlp_forward(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    eps: float,
    gamma: Tensor | None,
    dps: Tensor | None,
    tokens_per_sample: int,
    approximate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h_pre, mean, rstd = layer_norm_linear_forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps)
    h = reference.gelu(h_pre, approximate)
    out = linear_residual_forward(h, fc2_weight, fc2_bias, x, gamma, dps, tokens_per_sample)
    return out, mean, rstd, h_pre


def mlp_backward(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    gamma: Tensor | None,
    dps: Tensor | None,
    tokens_per_sample: int,
    mean: Tensor,
    rstd: Tensor,
    h_pre: Tensor,
    approximate: str,
    has_fc1_bias: bool,
    needs_gamma_grad: bool,
) -> tuple[Tensor, ...]:
    h = reference.gelu(h_pre, approximate)
    dh, dw2, db2, _, dgamma = linear_residual_backward(
        dout, h, fc2_weight, fc2_bias, gamma, dps, tokens_per_sample, needs_gamma_grad
    )
    dh_pre = reference.gelu_backward(dh, h_pre, approximate)
    dx, dlw, dlb, dw1, db1 = layer_norm_linear_backward(
        dh_pre, x, ln_weight, ln_bias, fc1_weight, mean, rstd, has_fc1_bias
    )
    return dx + dout, dlw, dlb, dw1, db1, dw2, db2, dgamma
