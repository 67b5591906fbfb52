"""The pre-LN transformer block, written once against an op namespace.

`impl="reference"` runs `vit_fast.reference` (plain PyTorch, same math as timm), `impl="fused"`
runs `vit_fast.ops` (Triton on CUDA, C++ on CPU). Parameter names are timm's (`norm1`,
`attn.qkv`, `attn.q_norm`, `attn.k_norm`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`,
`mlp.fc2`, `ls2.gamma`), so timm checkpoints load unchanged.

Per block the fused path is four launches of our ops:
  layer_norm_linear (norm1 + qkv) -> attention -> linear_residual (proj, ls1, drop-path, + x)
  -> layer_norm_mlp (norm2, fc1, GELU, fc2, ls2, drop-path, + x).
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from vit_fast.nn.attention import Attention, attention_core
from vit_fast.nn.impl import op_namespace
from vit_fast.nn.mlp import LayerScale, Mlp, drop_path_scale, mlp_dropout_p, scale_residual

__all__ = ["Block", "op_namespace"]


class Block(nn.Module):
    """Pre-LN ViT block: x + DP(ls1(attn(norm1(x)))), then x + DP(ls2(mlp(norm2(x)))).

    x [B, T, D] -> [B, T, D]. `impl` picks the op namespace (see module docstring); it can be
    changed after construction (`block.impl = "reference"`), the parameters are the same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.impl = impl
        op_namespace(impl)  # validate early
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias,
            qk_norm,
            proj_bias,
            attn_drop,
            proj_drop,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps),
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, bias=proj_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    @classmethod
    def wrapping(cls, norm1, attn, ls1, norm2, mlp, ls2, drop_path: float, impl: str = "auto") -> Block:
        """A Block that runs on existing sub-modules (e.g. a timm Block's), sharing their parameters:
        the state-dict keys stay the same and optimizer state stays valid."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.impl, block.drop_path = impl, drop_path
        block.norm1, block.attn, block.ls1 = norm1, attn, ls1
        block.norm2, block.mlp, block.ls2 = norm2, mlp, ls2
        return block

    @staticmethod
    def _gamma(ls: nn.Module) -> Tensor | None:
        return getattr(ls, "gamma", None)

    def _drop_path_scale(self, x: Tensor) -> Tensor | None:
        """Stochastic depth for x [B, ...]: a per-sample scale [B] in training, else None."""
        return drop_path_scale(x.shape[0], self.drop_path, self.training, x.device)

    def forward(
        self, x: Tensor, *, seq_lens: Tensor | None = None, cu_seqlens: Tensor | None = None
    ) -> Tensor:
        """x [B, T, D] -> [B, T, D]. Variable-length attention (see `vit_fast.ops.attention`), at most
        one of: seq_lens [B] int, x a padded batch (keys at or past a row's length are ignored,
        padded rows of the attention output are zero); cu_seqlens [N+1] int, x [1, total, D] holding
        N packed sequences (drop-path would then need one draw per sequence: rejected in training)."""
        f = op_namespace(self.impl)
        attn, mlp = self.attn, self.mlp
        if cu_seqlens is not None and self.training and self.drop_path > 0.0:
            raise ValueError("packed (cu_seqlens) blocks do not support drop_path in training")

        qkv = f.layer_norm_linear(
            x, self.norm1.weight, self.norm1.bias, attn.qkv.weight, attn.qkv.bias, self.norm1.eps
        )
        o = attention_core(attn, qkv, self.training, f, seq_lens=seq_lens, cu_seqlens=cu_seqlens)
        # Each drop-path mask is drawn after the dropout masks of its branch, as timm's Block does:
        # one seed gives timm's answer in training too.
        if self.training and attn.proj_drop.p > 0.0:  # dropout between the GEMM and the residual: not fused
            o = attn.proj_drop(F.linear(o, attn.proj.weight, attn.proj.bias))
            x = scale_residual(o, x, self._gamma(self.ls1), self._drop_path_scale(x))
        else:
            dps = self._drop_path_scale(x)
            x = f.linear_residual(
                o, attn.proj.weight, attn.proj.bias, x, gamma=self._gamma(self.ls1), drop_path_scale=dps
            )

        if self.training and mlp_dropout_p(mlp) > 0.0:  # dropouts after GELU / fc2: not fused either
            y = mlp(self.norm2(x))
            return scale_residual(y, x, self._gamma(self.ls2), self._drop_path_scale(x))
        dps = self._drop_path_scale(x)
        return f.layer_norm_mlp(
            x,
            self.norm2.weight,
            self.norm2.bias,
            mlp.fc1.weight,
            mlp.fc1.bias,
            mlp.fc2.weight,
            mlp.fc2.bias,
            self.norm2.eps,
            gamma=self._gamma(self.ls2),
            drop_path_scale=dps,
            approximate=getattr(mlp.act, "approximate", "none"),
        )
