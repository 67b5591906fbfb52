"""The `layer_norm` family of vit_fast/ops/contract.py in plain PyTorch: the backend used when
neither Triton nor the C++ extension serves the device (and a measured candidate on CPU). Forwards
compute statistics in fp32; backwards recompute the LN output from the same saved tensors the
kernels use (x, mean, rstd) with explicit gradient formulas (custom-op bodies run below autograd),
so this backend saves exactly what the fused ones save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor) -> Tensor:
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
    return normalize(x, weight, bias, mean, rstd), mean, rstd


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
    y = normalize(x, ln_weight, ln_bias, mean, rstd)  # recomputed, as the fused backends do
    dw = dout.t() @ y
    db = dout.float().sum(0).to(weight.dtype) if has_bias else None
    dy = dout @ weight
    dx, _, _ = layer_norm_backward(dy, x, ln_weight, mean, rstd)
    dyf = dy.float()
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dlw = (dyf * xhat).sum(0).to(ln_weight.dtype) if ln_weight is not None else None
    dlb = dyf.sum(0).to(ln_bias.dtype) if ln_bias is not None else None
    return dx, dlw, dlb, dw, db
