"""ViT models: the paper's configurations under timm's names, a hybrid ResNet stem, pos-embed resampling."""

from vit_fast.models.hybrid import HybridEmbed, ResNetStem, StdConv2d
from vit_fast.models.pos_embed import resample_pos_embed
from vit_fast.models.vision_transformer import (
    VisionTransformer,
    create_model,
    embed_tokens,
    list_models,
    model_config,
    num_params,
)

__all__ = [
    "HybridEmbed",
    "ResNetStem",
    "StdConv2d",
    "VisionTransformer",
    "create_model",
    "embed_tokens",
    "list_models",
    "model_config",
    "num_params",
    "resample_pos_embed",
]
