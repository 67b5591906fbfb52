"""Packed input for create_model models (issue #17): images of mixed sizes as one cu_seqlens
sequence give the same logits and parameter gradients as each image run alone."""

from __future__ import annotations

import copy

import pytest
import torch

from vit_fast import create_model
from vit_fast.models.packed import forward_packed, pack_images
from vit_fast.testing import TINY_VIT, compare

SIZES = [(32, 32), (16, 24), (8, 8), (32, 32), (24, 8)]


def _model(**kw):
    torch.manual_seed(0)
    cfg = {**TINY_VIT, "num_classes": 5, "dynamic_img_size": True, **kw}
    return create_model("vit_tiny_patch16_224", **cfg)


def _images():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=gen) for h, w in SIZES]


def _run(model, images, dtype, packed):
    model = model.to(dtype)
    model.zero_grad()
    imgs = [im.to(dtype) for im in images]
    out = forward_packed(model, imgs) if packed else torch.cat([model(im[None]) for im in imgs])
    out.square().sum().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "reg_tokens": 2}, {"no_embed_class": True}])
def test_packed_matches_per_image(kw):
    model, images = _model(**kw).train(False), _images()
    ref = copy.deepcopy(model)
    ref.impl = "reference"
    ref64, g64 = _run(copy.deepcopy(ref), images, torch.float64, packed=False)
    ref32, g32 = _run(copy.deepcopy(ref), images, torch.float32, packed=False)
    ours, g = _run(model, images, torch.float32, packed=True)
    results = [compare("logits", ours, ref64, ref32)] + [
        compare(f"grad[{k}]", g[k], g64[k], g32[k]) for k in g64
    ]
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_pack_images_layout():
    model = _model(reg_tokens=1)
    x, cu = pack_images(model, _images())
    lengths = [2 + (h // 8) * (w // 8) for h, w in SIZES]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert x.shape == (1, sum(lengths), 32)
    # Image 2's run starts with the class token (+ its position embedding row 0).
    want = model.cls_token[0, 0] + model.pos_embed[0, 0]
    torch.testing.assert_close(x[0, cu[2]], want)


def test_packed_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="images\\[1\\]"):
        pack_images(model, [torch.randn(3, 8, 8), torch.randn(3, 9, 8)])
    with pytest.raises(ValueError, match="non-empty list"):
        pack_images(model, [])
    with pytest.raises(TypeError, match="VisionTransformer"):
        pack_images(torch.nn.Linear(2, 2), [torch.randn(3, 8, 8)])
    dp = _model(drop_path_rate=0.1).train()
    with pytest.raises(ValueError, match="drop_path"):
        forward_packed(dp, [torch.randn(3, 8, 8)])


def test_attention_module_and_block_take_lengths():
    """nn.Attention and nn.Block with cu_seqlens (packed) or seq_lens (padded) equal the same
    modules run on each sequence alone; padded rows of the padded batch's attention are ignored."""
    from vit_fast.nn import Attention, Block

    torch.manual_seed(0)
    attn = Attention(32, 2, qkv_bias=True).eval()
    block = Block(32, 2, init_values=0.5).eval()
    lengths = [5, 3, 7]
    seqs = [torch.randn(1, n, 32) for n in lengths]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    padded = torch.zeros(3, 7, 32)
    for i, s in enumerate(seqs):
        padded[i, : lengths[i]] = s[0]
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    with torch.no_grad():
        for module in (attn, block):
            alone = [module(s) for s in seqs]
            packed = module(torch.cat(seqs, dim=1), cu_seqlens=cu)
            torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
            out = module(padded, seq_lens=seq_lens)
            for i, want in enumerate(alone):
                torch.testing.assert_close(out[i : i + 1, : lengths[i]], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        block(padded, cu_seqlens=cu)
