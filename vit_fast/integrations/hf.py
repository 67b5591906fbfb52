"""Hugging Face transformers adapter of `vit_fast.patch` (the transformers 5 module layout).

Layers: ViTLayer / DeiTLayer (`layernorm_before`, `attention.{q,k,v,o}_proj`, `layernorm_after`,
`mlp.fc1/fc2`, hidden dropout `dropout`; LN eps 1e-12 by default), CLIPEncoderLayer /
SiglipEncoderLayer (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp`; quick GELU
for CLIP, tanh GELU for SigLIP), Dinov2Layer / Dinov2WithRegistersLayer (`norm1`, `attention`,
`layer_scale1.lambda1`, `drop_path`, `norm2`, `mlp`, `layer_scale2.lambda1`; SwiGLU MLPs stay
stock). Embeddings: ViT/DeiT (class + distillation token), CLIP (bias-free projection, class
embedding [D], `position_embedding` an nn.Embedding), SigLIP (no class token), DINOv2 (registers
inserted after the class token, without position embedding). Text towers (modules whose class
name contains "Text") and heads (SigLIP's attention-pool head, classifiers) stay stock.

Per call, a layer runs its stock forward when given an attention mask, when attention weights
are requested (`output_attentions`, in the call or the config), or when its hidden dropout is
active in training; an embedding runs stock with `bool_masked_pos` or a resolution other than
its position table's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vit_fast.integrations.patch import (
    BlockSpec,
    PatchPlan,
    fused_embed,
    gelu_variant,
    layer_norm_blocker,
    patch_conv_blocker,
    run_block,
)

LAYERS = {
    "ViTLayer",
    "DeiTLayer",
    "CLIPEncoderLayer",
    "SiglipEncoderLayer",
    "Dinov2Layer",
    "Dinov2WithRegistersLayer",
}


def _first(module: nn.Module, names: tuple[str, ...]):
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    return None


def layer_spec(layer: nn.Module, impl: str) -> tuple[BlockSpec | None, list[str]]:
    """The BlockSpec of a transformers-5 ViT-style layer, or the reasons it cannot be fused."""
    why: list[str] = []
    norm1 = _first(layer, ("layernorm_before", "layer_norm1", "norm1"))
    norm2 = _first(layer, ("layernorm_after", "layer_norm2", "norm2"))
    attn = _first(layer, ("attention", "self_attn"))
    mlp = getattr(layer, "mlp", None)
    q, k, v = (getattr(attn, f"{n}_proj", None) for n in "qkv")
    proj = _first(attn, ("o_proj", "out_proj")) if attn is not None else None
    if not all(isinstance(m, nn.Linear) for m in (q, k, v, proj)):
        return None, ["attention is not q/k/v/o projections (transformers < 5 layout?)"]
    dim = q.in_features
    for norm, name in ((norm1, "norm1"), (norm2, "norm2")):
        bad = layer_norm_blocker(norm, name, dim)
        if bad:
            why.append(bad)
    heads = _first(attn, ("num_attention_heads", "num_heads"))
    scale = _first(attn, ("scaling", "scale"))
    if not isinstance(heads, int) or q.out_features != dim or k.out_features != dim or v.out_features != dim:
        why.append("q/k/v widths differ from the hidden size")
    if (q.bias is None) != (k.bias is None) or (q.bias is None) != (v.bias is None):
        why.append("q/k/v do not all have (or all lack) a bias")
    if getattr(attn, "is_causal", False):
        why.append("attention is causal")
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    approximate = None
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        why.append(f"mlp is {type(mlp).__name__}, not fc1 -> GELU -> fc2")
    else:
        approximate = gelu_variant(getattr(mlp, "activation_fn", None))
        if approximate is None:
            why.append(f"mlp activation is {type(getattr(mlp, 'activation_fn', None)).__name__}, not a GELU")
    gammas = []
    for name in ("layer_scale1", "layer_scale2"):
        ls = getattr(layer, name, None)
        gammas.append((ls, "lambda1") if isinstance(getattr(ls, "lambda1", None), Tensor) else None)
        if ls is not None and gammas[-1] is None:
            why.append(f"{name} has no lambda1")
    if why:
        return None, why
    drop = getattr(layer, "dropout", None)
    attn_p_name = "attention_dropout" if hasattr(attn, "attention_dropout") else "dropout"
    return BlockSpec(
        norm1=norm1,
        num_heads=heads,
        scale=float(scale) if scale is not None else (dim // heads) ** -0.5,
        proj=proj,
        norm2=norm2,
        fc1=fc1,
        fc2=fc2,
        approximate=approximate,
        attn_dropout=lambda: float(getattr(attn, attn_p_name, 0.0)),
        separate_qkv=(q, k, v),
        layer_scale1=gammas[0],
        layer_scale2=gammas[1],
        drop_path=float(getattr(getattr(layer, "drop_path", None), "drop_prob", 0.0)),
        stock_dropouts=(drop,) if isinstance(drop, nn.Dropout) else (),
        impl=impl,
    ), []


def _layer_forward(
    self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs
):
    """Instance forward of a patched layer: fused unless this call needs what only stock does."""
    attn_config = getattr(_first(self, ("attention", "self_attn")), "config", None)
    stock_call = (
        attention_mask is not None
        or bool(args)
        or bool(kwargs.get("output_attentions"))
        or kwargs.get("head_mask") is not None
        or bool(getattr(attn_config, "output_attentions", False))
    )
    stock = lambda: type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    # What GradientCheckpointingLayer's class-level forward wrapper does for the stock forward.
    checkpointing = (
        getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
    )
    checkpoint = self._gradient_checkpointing_func if checkpointing else None
    return run_block(self, hidden_states, stock, stock_call=stock_call, checkpoint=checkpoint)


# ------------------------------------------------------------------------------- embeddings


def _vit_embed_forward(
    self: nn.Module,
    pixel_values: Tensor,
    bool_masked_pos: Tensor | None = None,
    interpolate_pos_encoding=False,
) -> Tensor:
    """ViT / DeiT: [cls, (distillation,) patches] + position_embeddings, then dropout."""
    if (
        bool_masked_pos is not None
        or interpolate_pos_encoding
        or tuple(pixel_values.shape[-2:]) != tuple(self.image_size)
    ):
        return type(self).forward(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)
    conv = self.patch_embeddings.projection
    distill = getattr(self, "distillation_token", None)
    x = fused_embed(self, pixel_values, conv, self.position_embeddings, self.cls_token, distill)
    return self.dropout(x)


def _clip_embed_forward(self: nn.Module, pixel_values: Tensor, interpolate_pos_encoding=False) -> Tensor:
    """CLIP / SigLIP: [(class_embedding,) patches] + position_embedding.weight (no dropout)."""
    if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
        return type(self).forward(self, pixel_values, interpolate_pos_encoding)
    conv = self.patch_embedding
    cls = getattr(self, "class_embedding", None)
    cls = cls.view(1, 1, -1) if cls is not None else None
    pos = self.position_embedding.weight.unsqueeze(0)
    return fused_embed(self, pixel_values, conv, pos, cls, None, no_embed_class=cls is None)


def _dinov2_embed_forward(
    self: nn.Module, pixel_values: Tensor, bool_masked_pos: Tensor | None = None
) -> Tensor:
    """DINOv2: [cls, (registers,) patches]; the position table covers cls and patches only."""
    conv = self.patch_embeddings.projection
    p = conv.kernel_size[0]
    h, w = pixel_values.shape[-2:]
    if (
        bool_masked_pos is not None
        or h != w
        or h % p
        or (h // p) * (w // p) != self.position_embeddings.shape[1] - 1
    ):
        return type(self).forward(self, pixel_values, bool_masked_pos)
    pos = self.position_embeddings
    reg = getattr(self, "register_tokens", None)
    if reg is not None:  # registers get no position embedding: zero rows in their slots
        pos = torch.cat([pos[:, :1], pos.new_zeros(1, reg.shape[1], pos.shape[2]), pos[:, 1:]], dim=1)
    return self.dropout(fused_embed(self, pixel_values, conv, pos, self.cls_token, reg))


def _embed_plan(module: nn.Module):
    """(forward, reason it cannot be fused or None) for a supported embedding class, else None."""
    name = type(module).__name__
    if name in ("ViTEmbeddings", "DeiTEmbeddings"):
        conv = getattr(getattr(module, "patch_embeddings", None), "projection", None)
        return _vit_embed_forward, patch_conv_blocker(conv)
    if name in ("CLIPVisionEmbeddings", "SiglipVisionEmbeddings"):
        bad = patch_conv_blocker(getattr(module, "patch_embedding", None))
        ids = getattr(module, "position_ids", None)
        if bad is None and (ids is None or not torch.equal(ids.flatten().cpu(), torch.arange(ids.numel()))):
            bad = "position_ids are not 0..L-1"
        return _clip_embed_forward, bad
    if name in ("Dinov2Embeddings", "Dinov2WithRegistersEmbeddings"):
        conv = getattr(getattr(module, "patch_embeddings", None), "projection", None)
        bad = patch_conv_blocker(conv)
        if bad is None and getattr(module, "position_embeddings", None) is None:
            bad = "no position embeddings"
        return _dinov2_embed_forward, bad
    return None


def plan(model: nn.Module, impl: str) -> PatchPlan:
    out = PatchPlan()
    text_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in text_prefixes):
            continue
        if "Text" in type(module).__name__:
            text_prefixes.append(name + ".")
            continue
        if type(module).__name__ in LAYERS:
            spec, why = layer_spec(module, impl)
            out.add(name, module, "forward", _layer_forward, spec, why)
            continue
        emb = _embed_plan(module)
        if emb is not None:
            fn, bad = emb
            out.add(name, module, "forward", fn, impl, bad)
    return out
