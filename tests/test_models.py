"""The reference ViT against timm: same state_dict layout, same logits; configs, resampling, errors."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

import vit_fast
from vit_fast.models import create_model, list_models, model_config, resample_pos_embed
from vit_fast.testing import TINY_HYBRID

timm = pytest.importorskip("timm")


def _pair(name, img_size=224, **kw):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, img_size=img_size, **kw).eval()
    ours = create_model(name, impl="reference", img_size=img_size, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"reg_tokens": 4}], ids=["token", "avg", "reg4"])
def test_logits_match_timm(name, kw):
    ref, ours = _pair(name, **kw)
    assert set(ref.state_dict()) == set(ours.state_dict())
    for key, val in ref.state_dict().items():
        assert ours.state_dict()[key].shape == val.shape, key
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize(
    "kw",
    [
        {"no_embed_class": True, "reg_tokens": 2, "global_pool": "avg"},
        {"init_values": 1e-2, "qk_norm": True},
        {"class_token": False, "global_pool": "avg"},
        {"qkv_bias": False},
        {"global_pool": "avg", "fc_norm": False},
    ],
)
def test_options_match_timm(kw):
    ref, ours = _pair("vit_tiny_patch16_224", img_size=64, depth=2, **kw)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= 1e-5


def test_gradients_match_timm():
    ref, ours = _pair("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=1)
    x = torch.randn(2, 3, 64, 64)
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    ours_params = dict(ours.named_parameters())
    for key, p in ref.named_parameters():
        err = (ours_params[key].grad - p.grad).abs().max().item()
        assert err <= 1e-5 * p.grad.abs().max().item() + 1e-9, (key, err)


def test_pos_embed_resample_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 64)
    ours = resample_pos_embed(pos, (24, 24), num_prefix_tokens=1)
    theirs = resample_abs_pos_embed(pos, (24, 24), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + 24 * 24, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, :1], pos[:, :1])  # the class token's embedding is kept as is


def test_load_224_checkpoint_into_384_model():
    from timm.layers import resample_abs_pos_embed

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    ours = create_model("vit_tiny_patch16_224", impl="reference", img_size=384, depth=1)
    ours.load_state_dict(src.state_dict(), strict=True)
    want = resample_abs_pos_embed(src.pos_embed.detach(), (24, 24), num_prefix_tokens=1)
    torch.testing.assert_close(ours.pos_embed.detach(), want, rtol=0, atol=1e-6)
    assert ours(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_dynamic_img_size_matches_timm():
    kw = {"depth": 2, "img_size": 64, "dynamic_img_size": True}
    ref, ours = _pair("vit_tiny_patch16_224", **kw)
    x = torch.randn(2, 3, 96, 80)  # a 6x5 grid, resampled from 4x4
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= 1e-5


def test_paper_configs():
    widths = {name: model_config(name)["embed_dim"] for name in list_models()}
    assert widths["vit_tiny_patch16_224"] == 192 and widths["vit_huge_patch14_224"] == 1280
    m = create_model("vit_base_patch16_224", impl="reference")
    assert vit_fast.models.num_params(m) == sum(
        p.numel() for p in timm.create_model("vit_base_patch16_224").parameters()
    )


def test_pre_logits_head():
    m = create_model(
        "vit_tiny_patch16_224", impl="reference", img_size=32, depth=1, pre_logits_size=64, num_classes=5
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = m.forward_features(x)
        feats = m.forward_head(tokens, pre_logits=True)
        # token pooling, then Linear + tanh, then the head on those features
        torch.testing.assert_close(feats, torch.tanh(m.pre_logits.fc(tokens[:, 0])))
        torch.testing.assert_close(m(x), m.head(feats))
    assert feats.shape == (2, 64) and m.head.in_features == 64


def test_hybrid_resnet_stem():
    m = create_model("vit_base_r50_s16_224", impl="reference", img_size=64, num_classes=3, **TINY_HYBRID)
    assert m.patch_embed.grid_size == (4, 4) and m.patch_embed.proj.kernel_size == (1, 1)
    assert m.patch_embed.proj.in_channels == 1024
    out = m(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 3)
    assert m.patch_embed.backbone.stem[0].weight.grad.abs().sum() > 0  # the stem is trained too


def test_hybrid_accepts_any_backbone():
    """A user backbone (here a strided conv) feeds a 1x1 patch projection: timm's HybridEmbed over
    the same backbone gives the same state-dict keys and logits."""
    from timm.layers import HybridEmbed

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU())
    kw = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 2}
    embed = partial(HybridEmbed, backbone=copy.deepcopy(backbone))
    ref = timm.models.VisionTransformer(patch_size=1, embed_layer=embed, **kw).eval()
    m = create_model("vit_base_r50_s16_224", impl="reference", backbone=backbone, **kw).eval()
    assert m.patch_embed.grid_size == (8, 8) and m.pos_embed.shape == (1, 65, 32)
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - m(x)).abs().max().item() <= 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("vit_tiny_patch16_224", img_size=100)
    m = create_model("vit_tiny_patch16_224", impl="reference", img_size=64, depth=1)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 96, 96))
    dyn = create_model("vit_tiny_patch16_224", impl="reference", img_size=64, depth=1, dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dyn(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="impl"):
        create_model("vit_tiny_patch16_224", impl="cuda")
    other = create_model("vit_small_patch16_224", impl="reference", img_size=64, depth=1)
    with pytest.raises((RuntimeError, ValueError), match=r"pos_embed|size mismatch"):
        m.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "head.weight"})


@pytest.mark.parametrize("name", list_models())
def test_default_config_loads_timm_state_dict_strictly(name):
    """create_model(name) has timm's defaults for the same name (heads, widths, stem layout), so
    timm's state dict loads with strict=True. Built on the meta device: no memory, no init time."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = create_model(name, impl="reference")
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


def test_hybrid_logits_match_timm():
    """The hybrid stem (weight-standardised convs, GroupNorm, TF-"SAME" padding) computes timm's
    ResNetV2 features: same logits from the same weights."""
    torch.manual_seed(0)
    kw = dict(img_size=32, num_classes=5, depth=1)
    ref = timm.create_model("vit_base_r50_s16_224", pretrained=False, **kw).eval()
    ours = create_model("vit_base_r50_s16_224", impl="reference", **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= 1e-4


def test_constructor_arguments_are_validated():
    bad = [
        ("num_heads", 0),
        ("depth", -1),
        ("reg_tokens", -1),
        ("embed_dim", -32),
        ("patch_size", 2.5),
        ("img_size", (224, 0)),
        ("in_chans", 0),
        ("mlp_ratio", 0.0),
        ("norm_eps", 0.0),
        ("drop_path_rate", 1.0),
        ("attn_drop_rate", -0.1),
        ("num_classes", -1),
        ("pre_logits_size", -3),
        ("init_values", float("nan")),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            create_model("vit_tiny_patch16_224", **{name: value})


def test_two_dimensional_pos_embed_is_reported_by_rank():
    model = create_model("vit_tiny_patch16_224", impl="reference", depth=1)
    sd = model.state_dict()
    sd["pos_embed"] = sd["pos_embed"][0]
    with pytest.raises(ValueError, match="2-D"):
        model.load_state_dict(sd)
