"""The oracle: every vit_fast op written in plain PyTorch.

Each function here has exactly the signature of the fused op of the same name in `vit_fast.ops`;
tests judge every fused kernel against these (run in float64 for the reference error, and in the
low dtype for PyTorch's own error, see docs/design.md, "Numerics"). Autograd through these functions is
the reference backward.

Shapes use B = batch, T = tokens, D = embedding width, H = heads, p = patch size.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention",
    "gelu",
    "layer_norm",
    "layer_norm_linear",
    "layer_norm_mlp",
    "linear_residual",
    "patch_embed",
    "scale_residual",
]


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None = None,
    reg_tokens: Tensor | None = None,
    *,
    patch_size: int,
    no_embed_class: bool = False,
) -> Tensor:
    """Image to tokens, exactly as timm's PatchEmbed + `_pos_embed`.

    images [B, C, H, W]; weight [D, C, p, p] (Conv2d layout); bias [D]; cls_token [1, 1, D];
    reg_tokens [1, R, D]. Patch tokens are numbered row-major over the (H/p, W/p) grid.
    pos_embed is [1, L, D] with L = H/p * W/p when `no_embed_class` (prefix tokens get no position
    embedding) and L = (1 if cls) + R + H/p * W/p otherwise. Returns [B, (1 if cls) + R + H/p*W/p, D]
    ordered [cls, reg..., patches...].
    """
    x = F.conv2d(images, weight, bias, stride=patch_size)  # [B, D, gh, gw]
    x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, D]
    batch = x.shape[0]
    prefix = []
    if cls_token is not None:
        prefix.append(cls_token.expand(batch, -1, -1))
    if reg_tokens is not None:
        prefix.append(reg_tokens.expand(batch, -1, -1))
    if no_embed_class:
        if pos_embed is not None:
            x = x + pos_embed
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
    else:
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if pos_embed is not None:
            x = x + pos_embed
    return x


def attention(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    cu_seqlens: Tensor | None = None,
    seq_lens: Tensor | None = None,
) -> Tensor:
    """Multi-head self-attention from the packed qkv projection (timm layout).

    qkv [B, T, 3*D] is the output of the qkv Linear, read as [B, T, 3, H, D/H].
    Returns softmax(q k^T * scale) v with heads merged, [B, T, D]. scale defaults to (D/H)^-0.5.
    Dropout (training only, torch RNG) is applied to the attention probabilities.

    Variable length, one sequence at a time: cu_seqlens [N+1] for packed qkv [total_tokens, 3*D]
    (returns [total_tokens, D]); seq_lens [B] for padded qkv [B, T, 3*D] (rows at or past a length
    are zero in the output and take no part in the attention).
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        parts = [
            _attention_fixed(qkv[a:b][None], num_heads, scale, dropout_p)[0]
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.cat(parts) if parts else qkv.new_zeros((0, qkv.shape[-1] // 3))
    if seq_lens is not None:
        rows = []
        for b, length in enumerate(seq_lens.tolist()):
            o = _attention_fixed(qkv[b : b + 1, :length], num_heads, scale, dropout_p)
            pad = o.new_zeros((1, qkv.shape[1] - length, o.shape[-1]))
            rows.append(torch.cat((o, pad), dim=1))
        return torch.cat(rows)
    return _attention_fixed(qkv, num_heads, scale, dropout_p)


def _attention_fixed(qkv: Tensor, num_heads: int, scale: float | None, dropout_p: float) -> Tensor:
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * num_heads)
    if scale is None:
        scale = head_dim**-0.5
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, T, T]
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = probs @ v  # [B, H, T, hd]
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-6,
    *,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim with statistics in fp32.

    x [..., D]; weight, bias [D]. With `residual` (same shape as x) the input is s = x + residual and
    the result is (LN(s), s), so a pre-LN block can fuse its residual add into the norm.
    """
    if residual is not None:
        x = x + residual
    # Statistics in at least fp32; float64 stays float64 so the fp64 oracle really is fp64.
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(stat_dtype), x.shape[-1:], _cast(weight, stat_dtype), _cast(bias, stat_dtype), eps)
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y


def layer_norm_linear(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """LN(x) @ weight^T + bias: x [..., D]; ln_weight, ln_bias [D]; weight [N, D]; bias [N] -> [..., N].
    weight (and bias) may be sequences of row blocks: their concatenation is the weight (bias)."""
    if isinstance(weight, (list, tuple)):
        weight = torch.cat(list(weight))
        bias = None if bias is None else torch.cat(list(bias))
    return F.linear(layer_norm(x, ln_weight, ln_bias, eps), weight, bias)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) by default, 'tanh' for the tanh approximation, 'quick' for CLIP's
    x * sigmoid(1.702 x) (computed in fp32 for low-precision x, like F.gelu)."""
    if approximate == "quick":
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.sigmoid(1.702 * xf)).to(x.dtype)
    return F.gelu(x, approximate=approximate)


def scale_residual(
    out: Tensor, residual: Tensor, gamma: Tensor | None, drop_path_scale: Tensor | None
) -> Tensor:
    """residual + gamma * drop_path_scale * out; gamma [D] (layer-scale), drop_path_scale [B] (per sample)."""
    if gamma is not None:
        out = out * gamma
    if drop_path_scale is not None:
        out = out * drop_path_scale.reshape(-1, *([1] * (out.dim() - 1)))
    return residual + out


def linear_residual(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    *,
    gamma: Tensor | None = None,
    drop_path_scale: Tensor | None = None,
) -> Tensor:
    """The attention output projection with its epilogue: residual + gamma * dps * (x @ weight^T + bias).

    x [B, T, K]; weight [D, K]; bias [D]; residual [B, T, D]; gamma [D]; drop_path_scale [B]
    (0 for a dropped sample, 1/keep_prob for a kept one). Returns [B, T, D].
    """
    return scale_residual(F.linear(x, weight, bias), residual, gamma, drop_path_scale)


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
    """The whole pre-LN MLP sub-block: x + gamma * dps * fc2(gelu(fc1(LN(x)))).

    x [B, T, D]; ln_weight, ln_bias [D]; fc1_weight [F, D]; fc1_bias [F]; fc2_weight [D, F];
    fc2_bias [D]; gamma [D]; drop_path_scale [B]. GELU: 'none' (erf), 'tanh' or 'quick'.
    """
    h = gelu(layer_norm_linear(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps), approximate)
    return scale_residual(F.linear(h, fc2_weight, fc2_bias), x, gamma, drop_path_scale)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
