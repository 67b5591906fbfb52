"""timm's NaFlexVit patched onto varlen attention (issue #17): same logits and parameter gradients
as stock timm (its SDPA mask) under the numerics rule, on a tiny model built from a config."""

from __future__ import annotations

import copy

import pytest
import torch

from vit_fast.integrations.naflex import NaFlexBlock, patch_naflex, prefix_lengths, unpatch_naflex
from vit_fast.testing import compare

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")

PATCH = 4


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = naflexvit.NaFlexVitCfg(
        patch_size=PATCH,
        embed_dim=32,
        depth=2,
        num_heads=2,
        pos_embed_grid_size=(4, 4),
        **{"class_token": True, "reg_tokens": 1, "global_pool": "avg", **kw},
    )
    return naflexvit.NaFlexVit(cfg, num_classes=5)


def _batch(grids: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """NaFlex input for images of the given patch grids: patches padded at the end to the longest."""
    n = max(h * w for h, w in grids)
    patches = torch.zeros(len(grids), n, PATCH * PATCH * 3)
    coord = torch.zeros(len(grids), n, 2, dtype=torch.long)
    valid = torch.zeros(len(grids), n, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        patches[b, : h * w] = torch.randn(h * w, PATCH * PATCH * 3)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[b, : h * w] = torch.stack((ys.flatten(), xs.flatten()), -1)
        valid[b, : h * w] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def _run(model, batch, dtype):
    model = model.to(dtype)
    model.zero_grad()
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


GRIDS = [(3, 4), (1, 1), (4, 4), (2, 3)]  # lengths 12, 1, 16, 6 (+ 2 prefix tokens)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "map"}, {"global_pool": "token", "reg_tokens": 0}])
def test_patched_naflex_matches_stock(kw):
    batch = _batch(GRIDS)
    stock = _model(**kw)
    ref64, g64 = _run(copy.deepcopy(stock), batch, torch.float64)
    ref32, g32 = _run(copy.deepcopy(stock), batch, torch.float32)
    model = copy.deepcopy(stock)
    params = dict(model.named_parameters())
    patch_naflex(model)
    assert all(isinstance(b, NaFlexBlock) for b in model.blocks)
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == list(stock.state_dict())
    ours, g_ours = _run(model, batch, torch.float32)
    results = [compare("logits", ours, ref64, ref32)]
    results += [compare(f"grad[{k}]", g_ours[k], g64[k], g32[k]) for k in g64]
    assert all(r.ok for r in results), "\n".join(map(str, results))
    unpatch_naflex(model)
    assert not any(isinstance(b, NaFlexBlock) for b in model.blocks)
    torch.testing.assert_close(_run(model, batch, torch.float32)[0], ref32)


def test_patched_naflex_builds_no_mask(monkeypatch):
    # The patched path never calls timm's mask builder; padded rows never reach the valid ones.
    model = patch_naflex(_model().eval())
    monkeypatch.setattr(naflexvit, "create_attention_mask", lambda *a, **k: pytest.fail("mask built"))
    batch = _batch(GRIDS)
    a = model(batch)
    batch["patches"][0, 12:] = 1e3  # garbage in image 0's padding
    torch.testing.assert_close(model(batch), a, rtol=0, atol=0)


def test_prefix_lengths():
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert prefix_lengths(valid, 2).tolist() == [4, 6, 2]
    assert prefix_lengths(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), 1) is None


def test_non_prefix_valid_runs_stock():
    # A patch_valid with holes cannot be lengths: the patched model runs timm's masked path.
    model = _model().eval()
    stock = copy.deepcopy(model)
    patch_naflex(model)
    batch = _batch([(2, 2), (2, 2)])
    batch["patch_valid"][0, 1] = False
    torch.testing.assert_close(model(batch), stock(batch))


def test_rope_model_left_stock():
    model = _model(pos_embed="none", rope_type="axial")
    with pytest.warns(UserWarning, match="left the model stock"):
        patch_naflex(model)
    assert not any(isinstance(b, NaFlexBlock) for b in model.blocks)
    with pytest.raises(TypeError, match="NaFlexVit"):
        patch_naflex(torch.nn.Linear(2, 2))


def test_generic_and_timm_entry_points_dispatch_to_naflex():
    """vit_fast.patch and vit_fast.patch_timm both route a NaFlexVit to patch_naflex; unpatch too."""
    import vit_fast

    for patch, unpatch in ((vit_fast.patch, vit_fast.unpatch), (vit_fast.patch_timm, vit_fast.unpatch_timm)):
        model = _model()
        assert patch(model) is model and vit_fast.is_patched(model)
        assert all(isinstance(b, NaFlexBlock) for b in model.blocks)
        unpatch(model)
        assert not vit_fast.is_patched(model) and not any(isinstance(b, NaFlexBlock) for b in model.blocks)
