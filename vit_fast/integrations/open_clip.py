"""open_clip adapter of `vit_fast.patch`: `open_clip.transformer.VisionTransformer` (alone or as
the `visual` tower of an open_clip CLIP model; the text tower stays stock).

Blocks (`ResidualAttentionBlock`): `ln_1`, `attn` (batch-first nn.MultiheadAttention, packed
`in_proj_weight`), `ls_1` (LayerScale `gamma` or Identity), `ln_2`, `mlp` = Sequential(`c_fc`,
`gelu` (nn.GELU or QuickGELU), `c_proj`), `ls_2`; LN eps 1e-5. The image embedding (`conv1`
without bias, `class_embedding` [D], `positional_embedding` [1 + N, D]) goes through the fused
patch_embed op by an instance `_embeds`; patch dropout and `ln_pre` stay stock. A block call with
`k_x`, `v_x` or `attn_mask` runs the stock block.
"""

from __future__ import annotations

from torch import Tensor, nn

from vit_fast.integrations.patch import (
    BlockSpec,
    PatchPlan,
    fused_embed,
    mha_block_spec,
    patch_conv_blocker,
    run_block,
)


def block_spec(block: nn.Module, impl: str) -> tuple[BlockSpec | None, list[str]]:
    """The BlockSpec of a ResidualAttentionBlock, or the reasons it cannot be fused."""
    why = ["block is a cross-attention block"] if hasattr(block, "ln_1_kv") else []
    gammas = []
    for name in ("ls_1", "ls_2"):
        ls = getattr(block, name, None)
        if isinstance(ls, nn.Identity):
            gammas.append(None)
        elif isinstance(getattr(ls, "gamma", None), nn.Parameter):
            gammas.append((ls, "gamma"))
        else:
            why.append(f"{name} is {type(ls).__name__}, not LayerScale")
            gammas.append(None)
    mlp = getattr(block, "mlp", None)
    fc1, act, fc2 = (getattr(mlp, n, None) for n in ("c_fc", "gelu", "c_proj"))
    stock = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and len(mlp) == 3
    return mha_block_spec(
        block,
        "attn",
        (fc1, act, fc2) if stock else None,
        "c_fc, gelu, c_proj",
        impl,
        why,
        layer_scale1=gammas[0],
        layer_scale2=gammas[1],
    )


def _block_forward(self: nn.Module, q_x: Tensor, k_x=None, v_x=None, attn_mask=None) -> Tensor:
    cross_or_masked = k_x is not None or v_x is not None or attn_mask is not None
    return run_block(
        self, q_x, lambda: type(self).forward(self, q_x, k_x, v_x, attn_mask), stock_call=cross_or_masked
    )


def _embeds(self: nn.Module, x: Tensor) -> Tensor:
    """The stock `_embeds` with conv1 + class token + position embedding in one fused op."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != tuple(self.image_size):
        return type(self)._embeds(self, x)
    pos, cls = self.positional_embedding.unsqueeze(0), self.class_embedding.view(1, 1, -1)
    x = fused_embed(self, x, self.conv1, pos, cls, None)
    return self.ln_pre(self.patch_dropout(x))


def plan(model: nn.Module, impl: str) -> PatchPlan:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    out = PatchPlan()
    found = False
    for vname, vit in model.named_modules():
        if not isinstance(vit, VisionTransformer):
            continue
        found = True
        prefix = f"{vname}." if vname else ""
        for i, block in enumerate(vit.transformer.resblocks):
            where = f"{prefix}transformer.resblocks.{i}"
            out.add_block(where, block, ResidualAttentionBlock, block_spec, _block_forward, impl)
        pos = getattr(vit, "positional_embedding", None)
        bad = patch_conv_blocker(vit.conv1)
        if not hasattr(type(vit), "_embeds"):
            bad = "this open_clip has no VisionTransformer._embeds"
        elif bad is None and not (
            isinstance(pos, Tensor)
            and pos.dim() == 2
            and pos.shape[0] == vit.grid_size[0] * vit.grid_size[1] + 1
        ):
            bad = "positional_embedding is not [1 + patches, D]"
        out.add(f"{prefix}conv1", vit, "_embeds", _embeds, impl, bad)
    if not found:
        raise TypeError(f"vit_fast.patch: no open_clip VisionTransformer in {type(model).__name__}")
    return out
