"""Position-embedding resampling: the ViT paper's 2-D interpolation of the learned 1-D embedding
when the patch grid changes (fine-tuning at a higher resolution, or `dynamic_img_size`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    *,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample pos_embed [1, P + gh*gw, D] (P prefix tokens, kept as they are) to the grid `new_grid`.

    The grid part is viewed as a [D, gh, gw] image and interpolated in fp32 (bicubic with
    antialiasing by default, as timm does), so checkpoints move between resolutions unchanged.
    `old_grid` defaults to a square grid. Returns [1, P + new_h*new_w, D] in the input dtype.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, L, D], got {tuple(pos_embed.shape)}")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(f"pos_embed has {num_grid} grid tokens, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(f"old_grid {old_grid} does not match the {num_grid} grid tokens of pos_embed")
    if tuple(old_grid) == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    image = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=new_grid, mode=interpolation, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
