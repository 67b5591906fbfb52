"""Models of the supported libraries built from configs with random weights (nothing downloaded):
the cases of the patch tests and of `vit-fast bench --zoo`.

`build(name, size)`: name is one of `ZOO`; size 'tiny' (hidden 32, 2 heads, 2 layers, 32 px
images, 8 px patches) or 'base' (ViT-B/16: hidden 768, 12 heads, 12 layers, 224 px, 16 px
patches). Returns (model, image_size).
"""

from __future__ import annotations

from torch import nn

SIZES = {
    "tiny": {"dim": 32, "heads": 2, "layers": 2, "image": 32, "patch": 8},
    "base": {"dim": 768, "heads": 12, "layers": 12, "image": 224, "patch": 16},
}


def _geometry(s: dict) -> dict:
    """The image and patch size, under the keywords all three libraries use for them."""
    return {"image_size": s["image"], "patch_size": s["patch"]}


def _hf(name: str, s: dict) -> nn.Module:
    import transformers as T

    common = {
        "hidden_size": s["dim"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        **_geometry(s),
    }
    if name == "hf-vit":
        return T.ViTModel(T.ViTConfig(intermediate_size=4 * s["dim"], **common), add_pooling_layer=False)
    if name == "hf-vit-cls":
        return T.ViTForImageClassification(
            T.ViTConfig(intermediate_size=4 * s["dim"], num_labels=5, **common)
        )
    if name == "hf-deit":
        return T.DeiTModel(T.DeiTConfig(intermediate_size=4 * s["dim"], **common), add_pooling_layer=False)
    if name == "hf-clip":
        return T.CLIPVisionModel(T.CLIPVisionConfig(intermediate_size=4 * s["dim"], **common))
    if name == "hf-clipmodel":
        text = {"hidden_size": s["dim"], "intermediate_size": 4 * s["dim"], "num_hidden_layers": s["layers"]}
        text.update(num_attention_heads=s["heads"], vocab_size=64, max_position_embeddings=16)
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = {**common, "intermediate_size": 4 * s["dim"]}
        return T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["dim"]))
    if name == "hf-siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(intermediate_size=4 * s["dim"], **common))
    if name == "hf-dinov2":
        return T.Dinov2Model(T.Dinov2Config(mlp_ratio=4, **common))
    if name == "hf-dinov2-reg":
        return T.Dinov2WithRegistersModel(
            T.Dinov2WithRegistersConfig(mlp_ratio=4, num_register_tokens=2, **common)
        )
    raise KeyError(name)


def build(name: str, size: str = "tiny") -> tuple[nn.Module, int]:
    """A randomly initialised model of the zoo; see the module docstring."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    s = SIZES[size]
    if name.startswith("hf-"):
        return _hf(name, s), s["image"]
    if name == "tv-vit":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            **_geometry(s),
            num_layers=s["layers"],
            num_heads=s["heads"],
            hidden_dim=s["dim"],
            mlp_dim=4 * s["dim"],
            num_classes=5 if size == "tiny" else 1000,
        )
        return model, s["image"]
    if name in ("oc-vit", "oc-vit-quickgelu"):
        from open_clip.transformer import QuickGELU, VisionTransformer

        model = VisionTransformer(
            **_geometry(s),
            width=s["dim"],
            layers=s["layers"],
            heads=s["heads"],
            mlp_ratio=4.0,
            output_dim=s["dim"] // 2 if size == "tiny" else 512,
            act_layer=QuickGELU if name == "oc-vit-quickgelu" else nn.GELU,
            ls_init_value=0.5 if size == "tiny" else None,  # tiny: exercise the layer-scale path
        )
        return model, s["image"]
    raise KeyError(name)


#: Every zoo model name, with the library it needs.
ZOO = {
    "hf-vit": "transformers",
    "hf-vit-cls": "transformers",
    "hf-deit": "transformers",
    "hf-clip": "transformers",
    "hf-clipmodel": "transformers",
    "hf-siglip": "transformers",
    "hf-dinov2": "transformers",
    "hf-dinov2-reg": "transformers",
    "tv-vit": "torchvision",
    "oc-vit": "open_clip",
    "oc-vit-quickgelu": "open_clip",
}
