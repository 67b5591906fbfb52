"""torchvision adapter of `vit_fast.patch`: `torchvision.models.VisionTransformer` (vit_b_16 ...).

Blocks (`EncoderBlock`): `ln_1`, `self_attention` (batch-first nn.MultiheadAttention, packed
`in_proj_weight`), `dropout`, `ln_2`, `mlp` = [Linear, GELU, Dropout, Linear, Dropout]; LN eps
1e-6. The patch embedding (`conv_proj`, a p x p Conv2d), `class_token` and
`encoder.pos_embedding` go through the fused patch_embed op by an instance `forward` on the
model; a conv stem (`conv_stem_configs`) stays stock. While any of the block's dropouts is active
in training, that call runs the stock block.
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
    """The BlockSpec of an EncoderBlock, or the reasons it cannot be fused."""
    mlp = getattr(block, "mlp", None)
    layers = list(mlp) if isinstance(mlp, nn.Sequential) else []
    # [Linear, activation, Dropout, Linear, Dropout]; the activation is checked by mha_block_spec.
    kinds = [type(m) for m in layers]
    stock = kinds[:1] + kinds[2:] == [nn.Linear, nn.Dropout, nn.Linear, nn.Dropout]
    return mha_block_spec(
        block,
        "self_attention",
        (layers[0], layers[1], layers[3]) if stock else None,
        "Linear, GELU, Dropout, Linear, Dropout",
        impl,
        [],
        stock_dropouts=(block.dropout, layers[2], layers[4]) if stock else (),
    )


def _block_forward(self: nn.Module, input: Tensor) -> Tensor:
    return run_block(self, input, lambda: type(self).forward(self, input))


def _model_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The stock forward with the conv projection, class token and position embedding fused."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
        return type(self).forward(self, x)  # the stock checks raise
    enc = self.encoder
    x = fused_embed(self, x, self.conv_proj, enc.pos_embedding, self.class_token, None)
    x = enc.ln(enc.layers(enc.dropout(x)))
    return self.heads(x[:, 0])


def plan(model: nn.Module, impl: str) -> PatchPlan:
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    out = PatchPlan()
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if not vits:
        raise TypeError(f"vit_fast.patch: no torchvision VisionTransformer in {type(model).__name__}")
    for vit in vits:
        prefix = "" if vit is model else "vit."
        for name, block in vit.encoder.layers.named_children():
            where = f"{prefix}encoder.layers.{name}"
            out.add_block(where, block, EncoderBlock, block_spec, _block_forward, impl)
        bad = patch_conv_blocker(vit.conv_proj)
        if bad is None and vit.conv_proj.kernel_size[0] != vit.patch_size:
            bad = f"patch projection is not {vit.patch_size} x {vit.patch_size}"
        out.add(f"{prefix}conv_proj", vit, "forward", _model_forward, impl, bad)
    return out
