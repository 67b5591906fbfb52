"""`PatchEmbed`: timm-compatible patch embedding module on the fused `vit_fast.ops.patch_embed` op."""

from __future__ import annotations

from torch import Tensor, nn

from vit_fast.ops.patch_embed import patch_embed

__all__ = ["PatchEmbed"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Image to patch tokens, with timm's parameter names and attributes.

    Parameters: `proj.weight` [D, C, p, p] (Conv2d layout, so timm checkpoints load unchanged) and
    `proj.bias` [D]. Attributes: `img_size` and `patch_size` as (h, w) tuples, `grid_size`
    (H/p, W/p), `num_patches`. `forward` returns the patch tokens [B, N, D] (timm's flatten=True
    output), or adds class/register tokens and the position embedding in the same fused launch
    when given them. Only square patches are supported (the fused kernel's constraint).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1] or self.patch_size[0] < 1:
            raise ValueError(f"patch_size must be a positive square size, got {patch_size!r}")
        p = self.patch_size[0]
        if self.img_size[0] % p or self.img_size[1] % p:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {p}")
        self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias)

    def _check_size(self, x: Tensor) -> None:
        if self.strict_img_size and isinstance(x, Tensor) and x.dim() == 4:
            if tuple(x.shape[-2:]) != self.img_size:
                raise ValueError(
                    f"images size {tuple(x.shape[-2:])} != img_size {self.img_size} "
                    "(strict_img_size=True; pass strict_img_size=False for other sizes)"
                )

    def forward(
        self,
        x: Tensor,
        pos_embed: Tensor | None = None,
        cls_token: Tensor | None = None,
        reg_tokens: Tensor | None = None,
        no_embed_class: bool = False,
    ) -> Tensor:
        """images [B, C, H, W] -> tokens in the images' dtype, one fused launch: the patch tokens
        [B, (H/p)*(W/p), D] alone (timm's output) or, given them, [cls, reg..., patches] + pos_embed
        [B, (1 if cls) + R + N, D]. pos_embed [1, L, D] must already match the grid of x (L = N with
        `no_embed_class`, else prefix + N); cls_token [1, 1, D]; reg_tokens [1, R, D]."""
        self._check_size(x)
        return patch_embed(
            x,
            self.proj.weight,
            self.proj.bias,
            pos_embed,
            cls_token,
            reg_tokens,
            patch_size=self.patch_size[0],
            no_embed_class=no_embed_class,
        )

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, grid_size={self.grid_size}"
