"""`Attention`: timm's multi-head self-attention module running the fused flash-attention op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vit_fast import ops

__all__ = ["Attention", "normalize_qk"]


def normalize_qk(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Apply `attn.q_norm` / `attn.k_norm` per head to the packed qkv [B, T, 3D] (a no-op without
    qk-norm). Works on our Attention and on timm's, which share these names."""
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        return qkv
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).unbind(2)
    return torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=2).reshape(batch, tokens, -1)


class Attention(nn.Module):
    """Drop-in for `timm.models.vision_transformer.Attention` (same parameter names: `qkv`,
    `q_norm`, `k_norm`, `proj`), computed by `vit_fast.ops.attention`.

    x [B, T, dim] -> [B, T, dim]. The qkv Linear output [B, T, 3*dim] goes to the kernel as is
    (packed, no permute); with `qk_norm`, q and k are normalised per head (norm over head_dim) first
    and repacked. Attention dropout (`attn_drop.p`) runs inside the kernel, only in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        # Kept as a module (timm's attribute) so its `p` and repr match; the kernel applies it.
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None:
            raise NotImplementedError("vit_fast Attention does not support attn_mask")
        qkv = self.qkv(x)
        qkv = normalize_qk(self, qkv)
        p = self.attn_drop.p if self.training else 0.0
        out = ops.attention(qkv, self.num_heads, scale=self.scale, dropout_p=p)
        return self.proj_drop(self.proj(out))
