"""Patch timm's NaFlexVit (variable resolution / aspect ratio ViT) onto the fused kernels.

timm's NaFlexVit pads every image's patches to one length N and builds an additive [B, 1, T, T]
mask from `patch_valid` for SDPA (which rules out SDPA's flash kernels). Its valid patches come
first (the NaFlex collator pads at the end), so the mask is fully described by one length per image:
`seq_lens = num_prefix_tokens + patch_valid.sum(1)`. `patch_naflex(model)` swaps each stock Block for
a `NaFlexBlock` over the same sub-modules that calls `vit_fast.ops.attention(..., seq_lens=...)`,
and replaces the instance's `forward_features` with one that passes those lengths instead of the
mask: no T x T mask is ever built, and no work is spent on padded keys.

Padded query rows then come out of attention as zeros (timm gives them a uniform average of the
keys, which is never used): the valid tokens, the masked pooling and the logits are the same.
Anything the fused path does not cover (an explicit attn_mask, patch dropout in training, patch_valid
not in prefix form) runs the stock timm code on the same parameters. `unpatch_naflex` undoes it.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from vit_fast.integrations.timm import _block_blockers
from vit_fast.nn.block import Block, op_namespace

__all__ = [
    "NaFlexBlock",
    "is_naflex",
    "patch_naflex",
    "prefix_lengths",
    "unpatch_naflex",
]

_ORIGINAL_BLOCKS = "_vit_fast_original_blocks"
_PATCHED_FEATURES = "_vit_fast_patched_features"


class NaFlexBlock(Block):
    """`vit_fast.nn.Block` whose forward also takes timm's NaFlex keywords.

    forward(x [B, T, D], rope=None, attn_mask=None, seq_lens=None): with seq_lens [B] (int), keys at
    or past each row's length are ignored and padded rows of the attention output are zero; an
    explicit attn_mask runs the original timm block instead (same parameters)."""

    _stock: nn.Module

    def forward(  # type: ignore[override]
        self, x: Tensor, rope: Any = None, attn_mask: Tensor | None = None, seq_lens: Tensor | None = None
    ) -> Tensor:
        if rope is not None:
            raise ValueError("NaFlexBlock does not take rope (patch_naflex leaves RoPE models stock)")
        if attn_mask is not None:
            self._stock.train(self.training)  # its DropPath modules are its own, not registered here
            return self._stock(x, attn_mask=attn_mask)
        return super().forward(x, seq_lens=seq_lens)


def prefix_lengths(patch_valid: Tensor, num_prefix_tokens: int) -> Tensor | None:
    """seq_lens [B] int32 (prefix tokens + valid patches) when every row of patch_valid [B, N] is
    a run of valid patches followed by padding, else None (reads the mask: one host sync)."""
    valid = patch_valid.bool()
    counts = valid.sum(1)
    positions = torch.arange(valid.shape[1], device=valid.device)
    if not bool((valid == (positions[None, :] < counts[:, None])).all()):
        return None
    return (counts + num_prefix_tokens).to(torch.int32)


def _naflex_forward_features(
    self: nn.Module,
    patches: Tensor,
    patch_coord: Tensor | None = None,
    patch_valid: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor | dict[str, Tensor]:
    """Replacement for NaFlexVit.forward_features: patch_valid becomes seq_lens, no mask is built."""
    cls = type(self)
    seq_lens = None
    if patch_valid is not None:
        seq_lens = prefix_lengths(patch_valid, self.num_prefix_tokens)
    stock = (
        attn_mask is not None
        or (patch_valid is not None and seq_lens is None)
        or (self.training and self.patch_drop is not None)
    )
    if stock:
        return cls.forward_features(self, patches, patch_coord, patch_valid, attn_mask)
    x, _ = self.embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid)
    x = self.norm_pre(x)
    for blk in self.blocks:
        if self.grad_checkpointing and self.training:
            x = torch.utils.checkpoint.checkpoint(blk, x, None, None, seq_lens, use_reentrant=False)
        else:
            x = blk(x, seq_lens=seq_lens)
    x = self.norm(x)
    if patch_coord is not None:
        return {"patches": x, "patch_valid": patch_valid}
    return x


def is_naflex(model: nn.Module) -> bool:
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:  # older timm
        return False
    return isinstance(model, NaFlexVit)


def patch_naflex(model: nn.Module, impl: str = "fused") -> nn.Module:
    """Fuse a timm `NaFlexVit` in place; returns the same model (a no-op if already patched).

    Every block must be a stock timm Block that `patch_timm` could fuse (no RoPE / EVA blocks);
    otherwise the model is left stock with one warning saying why. The embedding (NaFlexEmbeds:
    patch coordinates, per-image position-embedding resampling) stays timm's."""
    from timm.models.vision_transformer import Block as TimmBlock

    if not is_naflex(model):
        raise TypeError(f"patch_naflex expects a timm NaFlexVit, got {type(model).__name__}")
    op_namespace(impl)
    if hasattr(model, _ORIGINAL_BLOCKS):
        return model
    why = [f"rope position embedding ({type(model.rope).__name__})"] if model.rope is not None else []
    for i, block in enumerate(model.blocks):
        reasons = ["not a timm Block"] if type(block) is not TimmBlock else _block_blockers(block)
        why += [f"blocks.{i}: {'; '.join(reasons)}"] if reasons else []
    if why:
        warnings.warn("vit_fast.patch_naflex left the model stock: " + " | ".join(why), stacklevel=2)
        return model
    originals: dict[int, nn.Module] = {}
    for i, block in enumerate(model.blocks):
        drop = getattr(block.drop_path1, "drop_prob", 0.0)
        new = NaFlexBlock.wrapping(
            block.norm1, block.attn, block.ls1, block.norm2, block.mlp, block.ls2, drop, impl
        )
        object.__setattr__(new, "_stock", block)  # reachable, but not a registered sub-module
        new.train(block.training)
        model.blocks[i] = new
        originals[i] = block
    object.__setattr__(model, _ORIGINAL_BLOCKS, originals)
    model.forward_features = types.MethodType(_naflex_forward_features, model)
    object.__setattr__(model, _PATCHED_FEATURES, True)
    return model


def unpatch_naflex(model: nn.Module) -> nn.Module:
    """Undo `patch_naflex`: the original timm blocks and forward_features come back."""
    originals = getattr(model, _ORIGINAL_BLOCKS, None)
    if originals is None:
        return model
    for i, block in originals.items():
        block.train(model.blocks[i].training)
        model.blocks[i] = block
    object.__delattr__(model, _ORIGINAL_BLOCKS)
    if getattr(model, _PATCHED_FEATURES, False):
        del model.forward_features
        object.__delattr__(model, _PATCHED_FEATURES)
    return model
