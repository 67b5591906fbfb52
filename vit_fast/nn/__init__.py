"""Modules with timm's parameter names, running on vit_fast ops."""

from vit_fast.nn.attention import Attention
from vit_fast.nn.block import Block
from vit_fast.nn.mlp import LayerNormMLP, LayerScale, Mlp
from vit_fast.nn.patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "LayerNormMLP", "LayerScale", "Mlp", "PatchEmbed"]
