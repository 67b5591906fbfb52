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
    SPEC_ATTR,
    BlockSpec,
    PatchPlan,
    fused_block,
    gelu_variant,
    mha_pre_ln_block,
    mha_spec_kwargs,
)
from vit_fast.nn.block import op_namespace


def block_spec(block: nn.Module, impl: str) -> tuple[BlockSpec | None, list[str]]:
    attn, why = mha_pre_ln_block(block, "self_attention")
    if attn is None:
        return None, why
    mlp = getattr(block, "mlp", None)
    layers = list(mlp) if isinstance(mlp, nn.Sequential) else []
    kinds = [type(m) for m in layers]
    if (
        len(layers) != 5
        or kinds[0] is not nn.Linear
        or kinds[3] is not nn.Linear
        or kinds[2] is not nn.Dropout
    ):
        return None, [*why, "mlp is not Linear, GELU, Dropout, Linear, Dropout"]
    approximate = gelu_variant(layers[1])
    if approximate is None:
        why.append(f"mlp activation is {kinds[1].__name__}, not a GELU")
    if why:
        return None, why
    return BlockSpec(
        norm1=block.ln_1,
        norm2=block.ln_2,
        fc1=layers[0],
        fc2=layers[3],
        approximate=approximate,
        packed_qkv=attn,
        stock_dropouts=(block.dropout, layers[2], layers[4]),
        impl=impl,
        **mha_spec_kwargs(attn),
    ), []


def _block_forward(self: nn.Module, input: Tensor) -> Tensor:
    spec: BlockSpec = self.__dict__[SPEC_ATTR]
    if input.dim() != 3 or spec.stock_dropout_active(self.training):
        return type(self).forward(self, input)
    return fused_block(spec, input, self.training)


def _model_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The stock forward with the conv projection, class token and position embedding fused."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
        return type(self).forward(self, x)  # the stock checks raise
    enc = self.encoder
    x = op_namespace(self.__dict__[SPEC_ATTR]).patch_embed(
        x, self.conv_proj.weight, self.conv_proj.bias, enc.pos_embedding, self.class_token, None,
        patch_size=self.patch_size,
    )  # fmt: skip
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
            if type(block) is not EncoderBlock:
                out.skipped.append(
                    f"{prefix}encoder.layers.{name}: {type(block).__name__} is not EncoderBlock"
                )
                continue
            spec, why = block_spec(block, impl)
            if spec is None:
                out.skipped.append(f"{prefix}encoder.layers.{name}: {'; '.join(why)}")
            else:
                out.overrides.append((block, "forward", _block_forward, spec))
        conv = vit.conv_proj
        if (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (vit.patch_size, vit.patch_size)
            and conv.stride == conv.kernel_size
            and conv.padding == (0, 0)
            and conv.groups == 1
        ):
            out.overrides.append((vit, "forward", _model_forward, impl))
        else:
            out.skipped.append(f"{prefix}conv_proj: {type(conv).__name__} is not a p x p patch convolution")
    return out
