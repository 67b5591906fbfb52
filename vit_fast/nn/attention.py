"""`Attention`: timm's multi-head self-attention module running the fused flash-attention op."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from vit_fast import ops

__all__ = ["Attention", "attention_core", "normalize_qk"]


def normalize_qk(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Apply `attn.q_norm` / `attn.k_norm` per head to the packed qkv [B, T, 3D] (a no-op without
    qk-norm). Works on our Attention and on timm's, which share these names."""
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        return qkv
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).unbind(2)
    return torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=2).reshape(batch, tokens, -1)


def attention_core(
    attn: nn.Module,
    qkv: Tensor,
    training: bool,
    f: ModuleType = ops,
    *,
    seq_lens: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The part of `attn` (our Attention or timm's: `num_heads`, `scale`, `q_norm`, `k_norm`,
    `attn_drop`) between the qkv and output projections: packed qkv [B, T, 3D] -> [B, T, D] by
    `f.attention` (f = `vit_fast.ops` or `vit_fast.reference`), with qk-norm first and the attention
    dropout inside the op in training. seq_lens [B] or cu_seqlens [N+1] (then B = 1: the N packed
    sequences of qkv[0]) select variable-length attention, as in `vit_fast.ops.attention`."""
    qkv = normalize_qk(attn, qkv)
    p = attn.attn_drop.p if training else 0.0
    if cu_seqlens is not None:
        if qkv.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs x of shape [1, total, D] (packed), got batch {qkv.shape[0]}")
        return f.attention(qkv[0], attn.num_heads, scale=attn.scale, dropout_p=p, cu_seqlens=cu_seqlens)[None]
    return f.attention(qkv, attn.num_heads, scale=attn.scale, dropout_p=p, seq_lens=seq_lens)


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

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        seq_lens: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]; seq_lens / cu_seqlens as in `attention_core`."""
        if attn_mask is not None:
            raise NotImplementedError("vit_fast Attention does not support attn_mask")
        out = attention_core(self, self.qkv(x), self.training, seq_lens=seq_lens, cu_seqlens=cu_seqlens)
        return self.proj_drop(self.proj(out))
