"""Vision Transformer (Dosovitskiy et al., 2021) with timm's parameter layout, on vit_fast ops.

`impl="fused"` (or "auto") runs every block and the patch embedding through `vit_fast.ops`;
`impl="reference"` runs the same math in plain PyTorch. Both build identical parameters, so a
state dict moves freely between them and timm's `VisionTransformer` of the same configuration.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from vit_fast.models.hybrid import HybridEmbed, ResNetStem
from vit_fast.models.pos_embed import resample_pos_embed
from vit_fast.nn.block import Block, op_namespace
from vit_fast.nn.patch_embed import PatchEmbed

POOLS = ("token", "avg", "")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_size(name: str, value: object) -> None:
    """An image or patch size: a positive int or a pair of them."""
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive integer or a pair of them, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float | None, *, low_open: bool = False) -> None:
    """A real number in [low, high) (or (low, high) when low_open; no upper bound when high is None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high})"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")


def check_config(**cfg: Any) -> None:
    """Validate VisionTransformer arguments, raising a ValueError that names the bad one."""
    _check_size("img_size", cfg["img_size"])
    _check_size("patch_size", cfg["patch_size"])
    for name, minimum in (
        ("in_chans", 1),
        ("num_classes", 0),
        ("embed_dim", 1),
        ("depth", 0),
        ("num_heads", 1),
    ):
        _check_int(name, cfg[name], minimum)
    _check_int("reg_tokens", cfg["reg_tokens"], 0)
    if cfg["pre_logits_size"] is not None:
        _check_int("pre_logits_size", cfg["pre_logits_size"], 0)
    _check_float("mlp_ratio", cfg["mlp_ratio"], 0.0, None, low_open=True)
    if int(cfg["embed_dim"] * cfg["mlp_ratio"]) < 1:
        raise ValueError(
            f"mlp_ratio={cfg['mlp_ratio']!r} gives an MLP of width 0 at embed_dim={cfg['embed_dim']}"
        )
    _check_float("norm_eps", cfg["norm_eps"], 0.0, None, low_open=True)
    for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        _check_float(name, cfg[name], 0.0, 1.0)
    if cfg["init_values"] is not None:
        _check_float("init_values", cfg["init_values"], -math.inf, None)
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise ValueError(
            f"embed_dim ({cfg['embed_dim']}) must be divisible by num_heads ({cfg['num_heads']})"
        )


def embed_tokens(model: nn.Module, x: Tensor, f: ModuleType) -> Tensor:
    """The embedding step: images (or a hybrid backbone's features) x [B, C, H, W], H and W
    multiples of the patch size -> tokens [B, prefix + patches, D], in x's dtype: patch
    projection, class / register tokens and position embedding in one `f.patch_embed` launch (f =
    `vit_fast.ops` or `vit_fast.reference`). The position embedding is resampled (bicubic, prefix
    rows kept) when x's patch grid is not the model's. Reads timm's attribute names
    (`patch_embed.proj`, `.patch_size`, `.grid_size`, `pos_embed`, `cls_token`, `reg_token`,
    `no_embed_class`, `num_prefix_tokens`): it serves this VisionTransformer and a patched timm one."""
    pe = model.patch_embed
    p = pe.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    pos = model.pos_embed
    if grid != tuple(pe.grid_size):
        prefix_tokens = 0 if model.no_embed_class else model.num_prefix_tokens
        pos = resample_pos_embed(pos, grid, tuple(pe.grid_size), prefix_tokens)
    return f.patch_embed(
        x,
        pe.proj.weight,
        pe.proj.bias,
        pos,
        model.cls_token,
        model.reg_token,
        patch_size=p,
        no_embed_class=model.no_embed_class,
    )


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding (+ cls/register tokens, learned position embedding),
    `depth` pre-LN blocks, final LayerNorm, pooling ('token' = class token, 'avg' = mean of patch
    tokens with the norm moved after pooling as timm's fc_norm), optional pre-logits (Linear + tanh),
    and a linear head. Input [B, in_chans, H, W] -> logits [B, num_classes].
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        fc_norm: bool | None = None,
        pre_logits_size: int | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backbone: nn.Module | None = None,
        norm_eps: float = 1e-6,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        op_namespace(impl)
        check_config(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            reg_tokens=reg_tokens,
            pre_logits_size=pre_logits_size,
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            init_values=init_values,
        )
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self._impl = impl
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size

        if backbone is not None:
            self.patch_embed = HybridEmbed(backbone, img_size, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(
                img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size
            )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    qk_norm,
                    proj_bias,
                    init_values,
                    proj_drop_rate,
                    attn_drop_rate,
                    rates[i],
                    norm_eps,
                    impl,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.Identity() if use_fc_norm else norm(embed_dim)
        self.fc_norm = norm(embed_dim) if use_fc_norm else nn.Identity()
        if pre_logits_size:
            self.pre_logits = nn.Sequential(
                OrderedDict([("fc", nn.Linear(embed_dim, pre_logits_size)), ("act", nn.Tanh())])
            )
            head_in = pre_logits_size
        else:
            self.pre_logits = nn.Identity()
            head_in = embed_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_in, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- construction helpers -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) Linear weights and pos_embed, tiny cls/reg tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        op_namespace(value)
        self._impl = value
        for blk in self.blocks:
            blk.impl = value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution: resample its position embedding to our grid.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            src = state_dict[key]
            if src.dim() != 3:
                raise ValueError(
                    f"{key}: checkpoint tensor is {src.dim()}-D {tuple(src.shape)}; the model's is 3-D "
                    f"{tuple(self.pos_embed.shape)} ([1, tokens, width])"
                )
            if src.shape[-1] != self.pos_embed.shape[-1]:
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(src.shape)} is incompatible with "
                    f"the model's {tuple(self.pos_embed.shape)} (embedding width differs)"
                )
            prefix_tokens = 0 if self.no_embed_class else self.num_prefix_tokens
            state_dict[key] = resample_pos_embed(src, self.patch_embed.grid_size, None, prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a 4-D tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"images have {x.shape[1]} channels but the model expects in_chans={self.in_chans}"
            )
        if x.shape[0] == 0:
            raise ValueError("images is an empty batch")
        h, w = x.shape[-2:]
        if getattr(self.patch_embed, "backbone", None) is None:
            p = self.patch_embed.patch_size[0]
            if h % p or w % p:
                raise ValueError(f"image size ({h}, {w}) is not divisible by the patch size {p}")
        if not self.dynamic_img_size and (h, w) != self.patch_embed.img_size:
            raise ValueError(
                f"image size ({h}, {w}) != model img_size {self.patch_embed.img_size}; "
                "create the model with that img_size or dynamic_img_size=True"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> normalised tokens [B, prefix + patches, D]."""
        self._check_input(x)
        if isinstance(self.patch_embed, HybridEmbed):
            x = self.patch_embed.backbone(x)
        x = embed_tokens(self, x, op_namespace(self._impl))
        x = self.pos_drop(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """tokens [B, T, D] -> logits [B, num_classes] (or pooled features when pre_logits)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -- model registry ------------------------------------------------------------------------------
_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # timm ships these two without a classifier (num_classes=0): same default, so their state dicts load strictly.
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0),
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_r50_s16_224": dict(
        embed_dim=768, depth=12, num_heads=12, hybrid_layers=(3, 4, 9), num_classes=0
    ),
}


def list_models() -> list[str]:
    """Names accepted by `create_model` (timm's names for the same configurations)."""
    return sorted(_CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return dict(_CONFIGS[name])


def create_model(name: str, impl: str = "auto", pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build a named ViT with random weights; `kwargs` override the configuration (e.g. img_size,
    num_classes, global_pool, reg_tokens, drop_path_rate, depth). impl: 'auto' | 'fused' | 'reference'.

    Hybrid models ('_r50_') build the ResNet stem (`hybrid_layers` overrides its stage depths) unless
    a `backbone` module is given. Pretrained weights cannot be downloaded: load a state dict instead.
    """
    if pretrained:
        raise ValueError("pretrained weights are not downloaded by vit_fast; load a timm state_dict instead")
    cfg = model_config(name)
    cfg.update(kwargs)
    layers = cfg.pop("hybrid_layers", None)
    if layers is not None and cfg.get("backbone") is None:
        cfg["backbone"] = ResNetStem(tuple(layers), in_chans=cfg.get("in_chans", 3))
    return VisionTransformer(impl=impl, **cfg)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
