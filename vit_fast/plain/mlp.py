"""The `mlp` family of vit_fast/ops/contract.py in plain PyTorch: `linear_residual_*` and `mlp_*`
(composed from the layer_norm family's LN+Linear), with explicit backward formulas; the GELU output
is recomputed from the saved h_pre, as the fused backends do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vit_fast.plain.layer_norm import layer_norm_linear_backward, layer_norm_linear_forward


def gelu(x: Tensor, approximate: str) -> Tensor:
    """GELU: 'none' (erf), 'tanh', or 'quick' (CLIP's x * sigmoid(1.702 x), in fp32 for 16-bit x)."""
    if approximate == "quick":
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.sigmoid(1.702 * xf)).to(x.dtype)
    return F.gelu(x, approximate=approximate)


def gelu_backward(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    """dy * GELU'(x) by formula (no autograd below the custom op); the variants of `gelu`."""
    if approximate == "quick":
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        s = torch.sigmoid(1.702 * xf)
        return (dy.to(xf.dtype) * (s + 1.702 * xf * s * (1 - s))).to(dy.dtype)
    return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)


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
    h = gelu(h_pre, approximate)
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
    h = gelu(h_pre, approximate)
    dh, dw2, db2, _, dgamma = linear_residual_backward(
        dout, h, fc2_weight, fc2_bias, gamma, dps, tokens_per_sample, needs_gamma_grad
    )
    dh_pre = gelu_backward(dh, h_pre, approximate)
    dx, dlw, dlb, dw1, db1 = layer_norm_linear_backward(
        dh_pre, x, ln_weight, ln_bias, fc1_weight, mean, rstd, has_fc1_bias
    )
    return dx + dout, dlw, dlb, dw1, db1, dw2, db2, dgamma
