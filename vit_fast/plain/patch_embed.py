"""The `patch_embed` family of vit_fast/ops/contract.py in plain PyTorch: the patch projection as
one GEMM over the gathered patches, then bias, class/register tokens and position embedding; the
backward by explicit formulas (the patches are gathered again from the images for dweight).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _patches(images: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B*Np, C*p*p], rows row-major over the grid, columns in Conv2d weight order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * (H // p) * (W // p), C * p * p)


def patch_embed_forward(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None,
    reg_tokens: Tensor | None,
    patch_size: int,
    no_embed_class: bool,
) -> Tensor:
    """Contract `patch_embed_forward`: fp32 math, result in the images' dtype."""
    B, _, H, W = images.shape
    p = patch_size
    Np = (H // p) * (W // p)
    D = weight.shape[0]
    x = (_patches(images.float(), p) @ weight.float().reshape(D, -1).t()).reshape(B, Np, D)
    if bias is not None:
        x = x + bias.float()
    prefix = [t.float().expand(B, -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    if pos_embed is not None and no_embed_class:
        x = x + pos_embed.float()
    if prefix:
        x = torch.cat([*prefix, x], dim=1)
    if pos_embed is not None and not no_embed_class:
        x = x + pos_embed.float()
    return x.to(images.dtype)


def patch_embed_backward(
    grad: Tensor,
    images: Tensor,
    weight: Tensor,
    has_bias: bool,
    has_pos: bool,
    has_cls: bool,
    num_reg: int,
    patch_size: int,
    no_embed_class: bool,
    needs_image_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Contract `patch_embed_backward` (fp32 reductions, grads in the weight's dtype)."""
    B, C, H, W = images.shape
    p = patch_size
    gh, gw = H // p, W // p
    D = weight.shape[0]
    prefix = int(has_cls) + num_reg
    g = grad.float()
    gp = g[:, prefix:].reshape(B * gh * gw, D)
    dweight = (gp.t() @ _patches(images.float(), p)).reshape(weight.shape).to(weight.dtype)
    dbias = gp.sum(0).to(weight.dtype) if has_bias else None
    gsum = g.sum(0, keepdim=True)  # [1, T, D]
    dpos = (gsum[:, prefix:] if no_embed_class else gsum).to(weight.dtype) if has_pos else None
    dcls = gsum[:, :1].to(weight.dtype) if has_cls else None
    dreg = gsum[:, int(has_cls) : prefix].to(weight.dtype) if num_reg else None
    dimages = None
    if needs_image_grad:
        dx = (gp @ weight.float().reshape(D, -1)).reshape(B, gh, gw, C, p, p)
        dx = dx.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        dimages = torch.empty_like(images).copy_(dx)
    # Distinct storage per output: custom ops must not return aliasing tensors.
    return tuple(None if t is None else t.clone() for t in (dimages, dweight, dbias, dpos, dcls, dreg))
