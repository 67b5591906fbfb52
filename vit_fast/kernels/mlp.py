"""The `mlp` family of vit_fast/ops/contract.py on Triton: `linear_residual_*` (proj + bias, layer
scale, drop-path, residual add in the GEMM epilogue) and `mlp_*` (LN -> fc1 -> GELU -> fc2 -> residual,
as two GEMMs of kernels/gemm.py: the LN in fc1's prologue, the GELU in fc2's prologue, so neither the
LN output nor the GELU output goes to memory; h_pre = fc1's pre-activation is saved for backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vit_fast.kernels.gemm import PRO_LN_ROW, dgelu_epilogue, gelu_prologue, gemm
from vit_fast.kernels.layer_norm import layer_norm_linear_backward, row_stats

__all__ = ["linear_residual_backward", "linear_residual_forward", "mlp_backward", "mlp_forward"]


def _row_scale(t: Tensor, dps: Tensor | None, tokens_per_sample: int) -> Tensor:
    """t [M, N] * dps[row // T] (a transient, for the backward only); t itself when dps is None."""
    if dps is None:
        return t
    return t * dps.to(t.dtype).repeat_interleave(tokens_per_sample)[:, None]


def _scaled_weight_grads(
    g: Tensor, weight: Tensor, bias: Tensor | None, colsum: Tensor, gamma: Tensor | None, need_dgamma: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """From G = (dout * dps)^T @ input in fp32 [N, K] and colsum = sum_m dout * dps [N] (fp32):
    dweight = gamma * G, dbias = gamma * colsum and, without recomputing the GEMM output
    y = input @ W^T + b, dgamma[n] = sum_m dout' y = sum_k W[n, k] G[n, k] + b[n] colsum[n]."""
    dgamma = None
    if gamma is not None and need_dgamma:
        dgamma = (g * weight.float()).sum(1)
        if bias is not None:
            dgamma = dgamma + bias.float() * colsum
        dgamma = dgamma.to(gamma.dtype)
    gscale = gamma.float()[:, None] if gamma is not None else None
    dweight = (g * gscale if gscale is not None else g).to(weight.dtype)
    dbias = (colsum * gamma.float() if gamma is not None else colsum).to(weight.dtype)
    return dweight, dbias, dgamma


def linear_residual_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    gamma: Tensor | None,
    dps: Tensor | None,
    tokens_per_sample: int,
) -> Tensor:
    """Contract `linear_residual_forward`: residual + gamma * dps[row // T] * (x @ weight^T + bias),
    one GEMM launch with everything in the epilogue."""
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    return gemm(
        x,
        weight,
        out,
        bias=bias,
        gamma=gamma,
        dps=dps,
        tokens_per_sample=tokens_per_sample,
        residual=residual,
    )


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
    """Contract `linear_residual_backward`: (dx, dweight, dbias, dresidual, dgamma).

    dgamma needs the GEMM output y, which is not saved: it is recovered from the wgrad product
    G = (dout*dps)^T x as sum_k W*G + b*colsum (see _scaled_weight_grads), no recompute GEMM."""
    s = _row_scale(dout, dps, tokens_per_sample)
    g = torch.empty(weight.shape, device=x.device, dtype=torch.float32)
    gemm(s.t(), x.t(), g)
    colsum = s.float().sum(0)
    dw, db, dgamma = _scaled_weight_grads(g, weight, bias, colsum, gamma, needs_gamma_grad)
    # dx = (s * gamma) @ W: gamma folded into the weight side ([N, K], smaller than [M, N] for
    # ViT token counts) would change rounding; scale the activation grad instead.
    sg = s * gamma.to(s.dtype) if gamma is not None else s
    dx = torch.empty_like(x)
    gemm(sg, weight.t(), dx)
    return dx, dw, db if bias is not None else None, dout, dgamma


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
    """Contract `mlp_forward` -> (out [M, D], mean [M], rstd [M], h_pre [M, F]). Three launches:
    row stats; fc1 GEMM with LN prologue + bias, writing h_pre; fc2 GEMM with GELU prologue on
    h_pre and bias/gamma/drop-path/residual epilogue (the GELU output never goes to memory)."""
    mean, rstd = row_stats(x, eps)
    m, f = x.shape[0], fc1_weight.shape[0]
    h_pre = torch.empty(m, f, device=x.device, dtype=x.dtype)
    gemm(
        x,
        fc1_weight,
        h_pre,
        prologue=PRO_LN_ROW,
        mean=mean,
        rstd=rstd,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        bias=fc1_bias,
    )
    out = torch.empty_like(x)
    gemm(
        h_pre,
        fc2_weight,
        out,
        prologue=gelu_prologue(approximate),
        bias=fc2_bias,
        gamma=gamma,
        dps=dps,
        tokens_per_sample=tokens_per_sample,
        residual=x,
    )
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
    """Contract `mlp_backward` -> (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight,
    dfc2_bias, dgamma). Four GEMMs plus the LN backward:
      G2^T = GELU(h_pre)^T @ s          (GELU recomputed in the prologue; s = dout * dps)
      dh   = (s * gamma) @ W2 * dGELU(h_pre)   (dGELU in the epilogue)
      dW1^T = LN(x)^T @ dh              (LN recomputed in the prologue)
      dLN  = dh @ W1 (fp32), then LN backward with dout added as the residual-path gradient."""
    s = _row_scale(dout, dps, tokens_per_sample)
    d, f = fc2_weight.shape
    g2 = torch.empty(d, f, device=x.device, dtype=torch.float32)
    gemm(h_pre.t(), s.t(), g2.t(), prologue=gelu_prologue(approximate))
    colsum = s.float().sum(0)
    dw2, db2, dgamma = _scaled_weight_grads(g2, fc2_weight, fc2_bias, colsum, gamma, needs_gamma_grad)
    sg = s * gamma.to(s.dtype) if gamma is not None else s
    dh = torch.empty_like(h_pre)
    gemm(sg, fc2_weight.t(), dh, epilogue=dgelu_epilogue(approximate), aux=h_pre)
    dx, dlnw, dlnb, dw1, db1 = layer_norm_linear_backward(
        dh, x, ln_weight, ln_bias, fc1_weight, mean, rstd, has_fc1_bias, dres=dout
    )
    return dx, dlnw, dlnb, dw1, db1, dw2, db2 if fc2_bias is not None else None, dgamma
