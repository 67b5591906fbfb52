"""Swap a timm VisionTransformer's layers for fused ones in place, and back.

`patch_timm(model)` replaces each stock `Block` with a `vit_fast.nn.Block` built on the very same
sub-modules (so parameter tensors, `state_dict` keys and optimizer state are unchanged), and routes
the patch embedding + class/register tokens + position embedding through the fused `patch_embed`
op by overriding the instance's `forward_features`. Anything it cannot fuse stays stock, with one
warning naming it. `unpatch_timm(model)` restores the original modules and methods.
"""

from __future__ import annotations

import types
import warnings

from torch import Tensor, nn

from vit_fast.models.vision_transformer import embed_tokens
from vit_fast.nn.block import Block, op_namespace

_ORIGINAL_BLOCKS = "_vit_fast_original_blocks"
_PATCHED_FEATURES = "_vit_fast_patched_features"


def _block_blockers(block: nn.Module) -> list[str]:
    """Why a timm block cannot be fused (empty list: it can)."""
    from timm.layers import DropPath, LayerScale, Mlp
    from timm.models.vision_transformer import Attention

    why = []
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
            why.append(f"{name} is {type(norm).__name__}, not an affine LayerNorm")
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if type(attn) is not Attention:
        why.append(f"attn is {type(attn).__name__}, not timm's Attention")
    elif not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        why.append("attn has scale_norm")
    if type(mlp) is not Mlp:
        why.append(f"mlp is {type(mlp).__name__}, not timm's Mlp")
    else:
        if not isinstance(mlp.act, nn.GELU):
            why.append(f"mlp activation is {type(mlp.act).__name__}, not GELU")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            why.append("mlp has scale_mlp_norm")
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(block, name, None), (LayerScale, nn.Identity)):
            why.append(f"{name} is not a LayerScale")
    for name in ("drop_path1", "drop_path2"):
        if not isinstance(getattr(block, name, None), (DropPath, nn.Identity)):
            why.append(f"{name} is not DropPath")
    if hasattr(block, "drop_path1") and hasattr(block, "drop_path2"):
        p1 = getattr(block.drop_path1, "drop_prob", 0.0)
        if p1 != getattr(block.drop_path2, "drop_prob", 0.0):
            why.append("drop_path1 and drop_path2 rates differ")
    return why


def _embed_blockers(model: nn.Module) -> list[str]:
    pe = model.patch_embed
    why = []
    if type(pe).__name__ != "PatchEmbed" or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        why.append(f"patch_embed is {type(pe).__name__}")
        return why
    if pe.patch_size[0] != pe.patch_size[1] or pe.proj.stride != pe.proj.kernel_size:
        why.append("patch_embed has non-square patches or overlapping stride")
    if not isinstance(pe.norm, nn.Identity):
        why.append("patch_embed has a norm layer")
    if getattr(pe, "dynamic_img_pad", False):
        why.append("patch_embed pads images dynamically")
    if model.pos_embed is None:
        why.append("model has no position embedding")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        why.append("model uses patch dropout")
    return why


def _fused_forward_features(
    self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
):
    """Replacement for timm's forward_features: one fused patch-embed launch, then the blocks."""
    if attn_mask is not None or is_causal:
        raise ValueError(
            "vit_fast's patched model does not support attn_mask / is_causal; unpatch_timm() first"
        )
    pe = self.patch_embed
    p = pe.patch_size[0]
    if x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"images {tuple(x.shape)}: need [B, C, H, W] with H, W divisible by patch size {p}")
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    if getattr(pe, "strict_img_size", False) and grid != tuple(pe.grid_size):
        raise ValueError(f"image size {tuple(x.shape[-2:])} != model img_size {tuple(pe.img_size)}")
    x = embed_tokens(self, x, op_namespace(self._vit_fast_impl))
    x = self.pos_drop(x)
    x = self.norm_pre(x)
    x = self.blocks(x)
    return self.norm(x)


def patch_timm(model: nn.Module, impl: str = "fused") -> nn.Module:
    """Fuse a timm `VisionTransformer` in place; returns the same model.

    Blocks become `vit_fast.nn.Block`s over the original sub-modules; the patch embedding goes
    through `vit_fast.ops.patch_embed` when the model's embedding is the stock one. Unsupported
    parts are left stock with a single warning listing them. Calling it twice is a no-op.
    """
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from vit_fast.integrations.naflex import is_naflex, patch_naflex

    if is_naflex(model):  # variable resolution: its own patcher (patch_valid -> sequence lengths)
        return patch_naflex(model, impl)
    if not isinstance(model, TimmViT):
        raise TypeError(f"patch_timm expects a timm VisionTransformer, got {type(model).__name__}")
    op_namespace(impl)
    if hasattr(model, _ORIGINAL_BLOCKS):
        return model
    skipped: list[str] = []
    originals: dict[int, nn.Module] = {}
    for i, block in enumerate(model.blocks):
        why = ["not a timm Block"] if type(block) is not TimmBlock else _block_blockers(block)
        if why:
            skipped.append(f"blocks.{i}: {'; '.join(why)}")
            continue
        drop = getattr(block.drop_path1, "drop_prob", 0.0)
        fused = Block.wrapping(
            block.norm1, block.attn, block.ls1, block.norm2, block.mlp, block.ls2, drop, impl
        )
        # A new module starts in training mode: take the stock block's (an eval() model stays in eval).
        model.blocks[i] = fused.train(block.training)
        originals[i] = block
    # Keep the originals out of the module tree (no duplicate state-dict keys) but reachable.
    object.__setattr__(model, _ORIGINAL_BLOCKS, originals)
    embed_why = _embed_blockers(model)
    if embed_why:
        skipped.append(f"patch_embed: {'; '.join(embed_why)}")
    else:
        object.__setattr__(model, "_vit_fast_impl", impl)
        model.forward_features = types.MethodType(_fused_forward_features, model)
        object.__setattr__(model, _PATCHED_FEATURES, True)
    if skipped:
        warnings.warn("vit_fast.patch_timm left these parts stock: " + " | ".join(skipped), stacklevel=2)
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo `patch_timm`: the original timm modules and methods come back (same parameters)."""
    from vit_fast.integrations.naflex import is_naflex, unpatch_naflex

    if is_naflex(model):
        return unpatch_naflex(model)
    originals = getattr(model, _ORIGINAL_BLOCKS, None)
    if originals is None:
        return model
    for i, block in originals.items():
        # train()/eval() calls made while patched reached the fused block only: carry the mode back.
        model.blocks[i] = block.train(model.blocks[i].training)
    object.__delattr__(model, _ORIGINAL_BLOCKS)
    if getattr(model, _PATCHED_FEATURES, False):
        del model.forward_features
        object.__delattr__(model, _PATCHED_FEATURES)
        object.__delattr__(model, "_vit_fast_impl")
    return model


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _ORIGINAL_BLOCKS)
