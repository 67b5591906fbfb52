"""Packed input for `create_model` models: a batch of images of different sizes as one sequence.

`pack_images(model, images)` embeds each image on its own patch grid (the position embedding
resampled to that grid, cls/register tokens per image; images of one size share one fused
patch_embed launch) and concatenates the token runs into x [1, total_tokens, D] with
cu_seqlens [N+1] (int32), the layout of `vit_fast.ops.attention(..., cu_seqlens=...)`.
`forward_packed(model, images)` runs the blocks on that packed sequence (every image attends only to
itself; no padding anywhere) and pools per image: logits [N, num_classes].

Limits: drop-path in training needs one draw per image and is rejected; HybridEmbed models are not
covered. Images must each be [C, H, W] with H, W multiples of the patch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vit_fast.models.vision_transformer import VisionTransformer, embed_tokens
from vit_fast.nn.block import op_namespace

__all__ = ["forward_packed", "pack_images"]


def pack_images(model: torch.nn.Module, images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """images: N tensors [C, H_i, W_i] -> (tokens [1, total, D], cu_seqlens int32 [N+1]).

    Image i's run is [cls, reg..., patches] + its resampled position embedding, exactly what
    `model.forward_features` builds for that image alone (before the blocks)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a vit_fast VisionTransformer, got {type(model).__name__}")
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of [C, H, W] tensors")
    pe = model.patch_embed
    if not hasattr(pe, "proj"):
        raise ValueError("pack_images does not support hybrid (CNN backbone) embeddings")
    p = pe.patch_size[0]
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            raise ValueError(
                f"images[{i}] must be a [C, H, W] tensor, got {getattr(img, 'shape', type(img))}"
            )
        if img.shape[0] != model.in_chans or img.shape[1] % p or img.shape[2] % p:
            raise ValueError(
                f"images[{i}] has shape {tuple(img.shape)}: need {model.in_chans} channels and H, W "
                f"divisible by the patch size {p}"
            )
    f = op_namespace(model.impl)
    runs: list[Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault((img.shape[1], img.shape[2]), []).append(i)
    for idx in by_size.values():
        tokens = embed_tokens(model, torch.stack([images[i] for i in idx]), f)
        for j, i in enumerate(idx):
            runs[i] = tokens[j]
    lengths = torch.tensor([r.shape[0] for r in runs])  # type: ignore[union-attr]
    cu = torch.zeros(len(runs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return torch.cat(runs)[None], cu  # type: ignore[arg-type]


def forward_packed(model: torch.nn.Module, images: list[Tensor], pre_logits: bool = False) -> Tensor:
    """Logits [N, num_classes] (pooled features with pre_logits) of N images of mixed sizes, run
    as one packed sequence. Equal to running `model` on each image alone (dynamic_img_size)."""
    x, cu = pack_images(model, images)
    x = model.pos_drop(x)
    cu_dev = cu.to(x.device)
    for blk in model.blocks:
        x = blk(x, cu_seqlens=cu_dev)
    x = model.norm(x)[0]
    starts = cu[:-1].to(x.device, torch.long)
    if model.global_pool == "token":
        pooled = x[starts]
    elif model.global_pool == "avg":
        # Mean over each image's patch tokens (its prefix tokens excluded), by segment sums.
        lengths = (cu[1:] - cu[:-1]).to(x.device, torch.long)
        seg = torch.repeat_interleave(torch.arange(len(images), device=x.device), lengths)
        pos = torch.arange(x.shape[0], device=x.device) - starts[seg]
        keep = pos >= model.num_prefix_tokens
        sums = x.new_zeros(len(images), x.shape[-1]).index_add_(0, seg[keep], x[keep])
        pooled = sums / (lengths - model.num_prefix_tokens).clamp(min=1)[:, None].to(x.dtype)
    else:
        raise ValueError(f"forward_packed supports global_pool 'token' or 'avg', got {model.global_pool!r}")
    pooled = model.pre_logits(model.fc_norm(pooled))
    pooled = model.head_drop(pooled)
    return pooled if pre_logits else model.head(pooled)
