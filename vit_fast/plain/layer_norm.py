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


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def layer_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # aten's own LN kernel, one vectorised pass per row: `torch.var_mean` over rows took 350 us at
    # [197, 384] on a Zen 3 CPU against its 39 us, and made this backend lose measured choices it
    # should win. It runs on the fp32 upcast, so the statistics are fp32 whatever x's dtype (a bf16
    # call would return bf16 statistics).
    y, mean, rstd = torch.native_layer_norm(x.float(), (x.shape[1],), _f32(weight), _f32(bias), eps)
    return y.to(x.dtype), mean.view(-1), rstd.view(-1)


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The closed-form LN backward (mean and rstd depend on x) in fp32, by aten's kernel for it (8x
    # faster than the same formula in separate tensor ops on CPU at ViT-S sizes).
    dyf = dy.float()
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dyf, x.float(), [x.shape[1]], mean[:, None], rstd[:, None], _f32(weight), None,
        [True, weight is not None, False],
    )  # fmt: skip
    if weight is None:
        return dx.to(x.dtype), None, None
    return dx.to(x.dtype), dw.to(weight.dtype), dyf.sum(0).to(weight.dtype)


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
    dx, dlw, dlb = layer_norm_backward(dy, x, ln_weight, mean, rstd)
    if ln_bias is None:
        dlb = None
    elif dlb is None:  # an LN bias without an LN weight: its gradient is the column sum of dy
        dlb = dy.float().sum(0)
    return dx, dlw, None if dlb is None else dlb.to(ln_bias.dtype), dw, db
