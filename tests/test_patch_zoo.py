"""`vit_fast.patch` / `unpatch` / `is_patched` on Hugging Face transformers, torchvision and open_clip
ViTs built from tiny configs with random weights (no downloads): the same Parameters and state-dict
keys, outputs and every parameter gradient as the stock model under the numerics rule (float64
stock model as the oracle, the fp32 stock model as PyTorch's own error), the fused ops really
running, train()/eval() followed, per-call stock fallbacks, unpatch restoring stock behaviour,
one warning for unfusable parts, saved-for-backward bytes vs the timm-patched block."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_fast
from vit_fast.integrations.zoo import build
from vit_fast.ops import use_backend
from vit_fast.ops.backend import cpu_extension
from vit_fast.testing import TINY_VIT, compare

transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

HF = ["hf-vit", "hf-vit-cls", "hf-deit", "hf-clip", "hf-clipmodel", "hf-siglip", "hf-dinov2", "hf-dinov2-reg"]
MODELS = [*HF, "tv-vit", "oc-vit", "oc-vit-quickgelu"]
#: Interpreted Triton is slow: the fast tier covers separate q/k/v (quick GELU, bias-free embedding),
#: layer-scale + registers, and packed in_proj; the rest run in the slow tier (and all on the cpu backend).
TRITON_FAST = {"hf-clip", "hf-dinov2-reg", "tv-vit"}
needs_c = pytest.mark.skipif(cpu_extension() is None, reason="C++ extension not built")


class FusedOps(TorchDispatchMode):
    """Records the names of the `vit_fast::` ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("vit_fast."):
            self.seen.add(name.split(".")[1])
        return func(*args, **(kwargs or {}))


def _model(name: str):
    torch.manual_seed(0)
    model, img = build(name, "tiny")
    if name == "tv-vit":  # torchvision zero-initialises the head: give the logits a signal
        torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval(), img


def _inputs(name: str, img: int, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(1)
    kw = {"pixel_values": torch.randn(batch, 3, img, img, generator=gen)}
    if name == "hf-clipmodel":
        kw["input_ids"] = torch.randint(2, 64, (batch, 7), generator=gen)
    return kw


def _run(name: str, model, kw: dict) -> torch.Tensor:
    """Every output of the model, flattened into one tensor."""
    if name.startswith("hf-"):
        out = model(**kw)
        parts = [
            getattr(out, k, None)
            for k in ("last_hidden_state", "pooler_output", "logits", "logits_per_image", "image_embeds")
        ]
        return torch.cat([p.flatten() for p in parts if isinstance(p, torch.Tensor)])
    return model(kw["pixel_values"]).flatten()


def _out_and_grads(name, model, kw, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
    out = _run(name, model, kw)
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check_same_as_stock(name, model, stock, kw):
    """Numerics rule on the output and every parameter gradient; the oracle is the stock model in
    float64, PyTorch's own error the stock model in fp32."""
    ours, g_ours = _out_and_grads(name, model, kw)
    lp, g_lp = _out_and_grads(name, stock, kw)
    ref64, g64 = _out_and_grads(name, copy.deepcopy(stock).double(), kw, torch.float64)
    assert g_ours.keys() == g64.keys()
    # Gradients that are 0 in exact arithmetic (e.g. a key bias: softmax ignores it) are rounding
    # noise in every run, so their own scale is no yardstick: the floor is relative to the largest
    # gradient of the model.
    floor = 1e-5 * max(g.abs().max().item() for g in g64.values())
    results = [compare("out", ours, ref64, lp)]
    results += [compare(f"grad[{n}]", g_ours[n], g64[n], g_lp[n], atol_abs=floor) for n in g64]
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return ours


def _backend_params():
    for name in MODELS:
        marks = () if name in TRITON_FAST else (pytest.mark.slow,)
        yield pytest.param(name, "triton", id=f"{name}-triton", marks=marks)
        yield pytest.param(name, "cpu", id=f"{name}-cpu", marks=(needs_c,))


@pytest.mark.parametrize(("name", "backend"), list(_backend_params()))
def test_patch_matches_stock(name, backend):
    model, img = _model(name)
    stock = copy.deepcopy(model)
    kw = _inputs(name, img)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every part of these models is fusable: no warning
        assert vit_fast.patch(model) is model
    assert vit_fast.is_patched(model) and not vit_fast.is_patched(stock)
    assert dict(model.named_parameters()) == params  # the very same Parameter objects
    assert list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types

    with use_backend(backend):
        with FusedOps() as mode:
            ours = _check_same_as_stock(name, model, stock, kw)
        # Separate q/k/v projections (HF) take the row-block LN+Linear; packed ones the plain one.
        qkv_op = "layer_norm_linear_rows_fwd" if name in HF else "layer_norm_linear_fwd"
        assert {"patch_embed_fwd", qkv_op, "attention_fwd", "linear_residual_fwd"} <= mode.seen
        assert {"layer_norm_mlp_fwd", "attention_bwd", "layer_norm_mlp_bwd"} <= mode.seen
        with torch.no_grad():  # eval mode: deterministic, and the same without autograd
            torch.testing.assert_close(_run(name, model, kw), ours, rtol=0, atol=0)

    vit_fast.unpatch(model)
    assert not vit_fast.is_patched(model)
    assert all("forward" not in m.__dict__ and "_embeds" not in m.__dict__ for m in model.modules())
    assert dict(model.named_parameters()) == params
    with FusedOps() as mode, torch.no_grad():
        torch.testing.assert_close(_run(name, model, kw), _run(name, stock, kw), rtol=0, atol=0)
    assert not mode.seen


@pytest.fixture
def cpu_or_triton():
    with use_backend("cpu" if cpu_extension() is not None else "triton"):
        yield


def test_train_eval_followed(cpu_or_triton):
    """Attention dropout runs inside the fused kernel only in training: train() makes two calls
    differ, eval() makes them equal to stock again; the layer's own flag is the one read."""
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, attention_dropout=0.5,
    )  # fmt: skip
    model = transformers.CLIPVisionModel(cfg).eval()
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with FusedOps() as mode:
        a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert "attention_fwd" in mode.seen
    assert (a - b).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model(x).last_hidden_state, stock(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_hidden_dropout_in_training_runs_stock(cpu_or_triton):
    """HF ViT's hidden dropout sits between the GEMM and the residual: in training with p > 0 the
    layers run stock (same random stream: equal to the stock model under the same seed)."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, hidden_dropout_prob=0.2,
    )  # fmt: skip
    model = transformers.ViTModel(cfg, add_pooling_layer=False).train()
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    with FusedOps() as mode:
        ours = model(x).last_hidden_state
    torch.manual_seed(5)
    want = stock(x).last_hidden_state
    assert "layer_norm_mlp_fwd" not in mode.seen and "patch_embed_fwd" in mode.seen
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_hf_gradient_checkpointing(cpu_or_triton):
    """With HF gradient checkpointing on, the fused layer is checkpointed too (recomputed in the
    backward: its forward ops run twice) and the gradients are the stock ones."""
    model, img = _model("hf-dinov2")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    kw = _inputs("hf-dinov2", img)
    counts: dict[str, int] = {}

    class Count(FusedOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] = counts.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        ours, g_ours = _out_and_grads("hf-dinov2", model, kw)
    want, g_want = _out_and_grads("hf-dinov2", stock, kw)
    assert counts["vit_fast.layer_norm_mlp_fwd.default"] == 4  # 2 layers, forward + recompute
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    for n, g in g_want.items():
        torch.testing.assert_close(g_ours[n], g, rtol=1e-3, atol=1e-5 * g.abs().max().item() + 1e-7)


def test_weight_writes_through_data_are_seen(cpu_or_triton):
    """An EMA / teacher update through `.data` (no version bump) reaches the next no-grad call."""
    model, img = _model("hf-vit")
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = _inputs("hf-vit", img)["pixel_values"]
    with torch.no_grad():
        before = model(x).last_hidden_state
        for m in (model, stock):
            m.layers[0].attention.k_proj.weight.data.mul_(3.0)
        after = model(x).last_hidden_state
        want = stock(x).last_hidden_state
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["oc-vit", "hf-dinov2"])
def test_parameters_replaced_after_patch_are_used(cpu_or_triton, name):
    """load_state_dict(assign=True) puts new Parameter objects in the modules: the patched forward
    reads them (packed in_proj, layer-scale, q/k/v), it holds no stale references."""
    model, img = _model(name)
    vit_fast.patch(model)
    torch.manual_seed(7)
    other, _ = build(name, "tiny")
    other.eval()
    model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    kw = _inputs(name, img)
    with torch.no_grad():
        torch.testing.assert_close(_run(name, model, kw), _run(name, other, kw), rtol=1e-4, atol=1e-5)


def test_separate_qkv_weights_are_read_in_place(cpu_or_triton, monkeypatch):
    """After patching, an HF layer's q/k/v weights and biases are views of one buffer (same
    Parameters, same values), and the fused LN+Linear reads them as one weight with no copy in the
    forward or the backward; each projection still gets its own gradient, equal to stock's."""
    import importlib

    ln_ops = importlib.import_module("vit_fast.ops.layer_norm")
    model, img = _model("hf-vit")
    stock = copy.deepcopy(model)
    attn = model.layers[0].attention
    before = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    values = [p.detach().clone() for p in before]
    vit_fast.patch(model)
    after = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    assert all(a is b for a, b in zip(after, before))
    assert all(torch.equal(p, v) for p, v in zip(after, values))
    base = after[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in after)
    assert [p.storage_offset() for p in after] == [0, after[0].numel(), 2 * after[0].numel()]
    shared = []

    def spy(blocks, dtype):
        out = spy.real(blocks, dtype)
        shared.append(out.untyped_storage().data_ptr() == blocks[0].untyped_storage().data_ptr())
        return out

    spy.real = ln_ops.join_rows
    monkeypatch.setattr(ln_ops, "join_rows", spy)
    kw = _inputs("hf-vit", img)
    _check_same_as_stock("hf-vit", model, stock, kw)  # output and every gradient vs stock
    assert len(shared) >= 2 and all(shared), shared  # every forward and backward stacking was a view


def test_output_attentions_runs_stock_for_that_call(cpu_or_triton):
    model, img = _model("hf-vit")
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = _inputs("hf-vit", img)["pixel_values"]
    with FusedOps() as mode:
        out = model(x, output_attentions=True)
    assert "attention_fwd" not in mode.seen
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    want = stock(x, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    with FusedOps() as mode:  # the next plain call is fused again
        model(x)
    assert "attention_fwd" in mode.seen


def test_unfusable_part_stays_stock_with_one_warning(cpu_or_triton):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        use_swiglu_ffn=True,
    )  # fmt: skip
    model = transformers.Dinov2Model(cfg).eval()
    stock = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"encoder\.layer\.0: mlp is Dinov2SwiGLUFFN") as record:
        vit_fast.patch(model)
    assert len(record) == 1 and "encoder.layer.1" in str(record[0].message)
    x = torch.randn(2, 3, 32, 32)
    with FusedOps() as mode:
        out = model(x).last_hidden_state
    assert mode.seen == {"patch_embed_fwd"}  # the embedding is still fused
    torch.testing.assert_close(out, stock(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_patch_dispatches_timm_and_rejects_others():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "depth": 1})
    vit_fast.patch(model)
    assert vit_fast.is_patched(model) and type(model.blocks[0]).__module__ == "vit_fast.nn.block"
    vit_fast.unpatch(model)
    assert not vit_fast.is_patched(model)
    with pytest.raises(TypeError, match="not a model from"):
        vit_fast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="impl"):
        vit_fast.patch(_model("hf-vit")[0], impl="fast")


def test_patch_twice_is_a_noop_and_deepcopy_keeps_it(cpu_or_triton):
    model, img = _model("oc-vit")
    vit_fast.patch(model)
    vit_fast.patch(model)
    clone = copy.deepcopy(model)  # the instance methods are rebound to the copy
    x = _inputs("oc-vit", img)["pixel_values"]
    with FusedOps() as mode:
        torch.testing.assert_close(clone(x), model(x))
    assert "patch_embed_fwd" in mode.seen
    assert all(p is not q for p, q in zip(clone.parameters(), model.parameters()))


def _saved_bytes(fn, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def test_saved_bytes_per_block_match_timm_patched_block(cpu_or_triton):
    """The HF layer (separate q/k/v, concatenated in autograd) saves what the timm-patched block
    saves (packed qkv), within 10%."""
    timm = pytest.importorskip("timm")
    from vit_fast.integrations import patch_timm

    hf, _ = build("hf-vit", "tiny")
    vit_fast.patch(hf)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "depth": 1})
    patch_timm(tm)
    x = torch.randn(4, 17, 32, requires_grad=True)
    ours = _saved_bytes(hf.layers[0], x)
    theirs = _saved_bytes(tm.blocks[0], x)
    stock = _saved_bytes(copy.deepcopy(build("hf-vit", "tiny")[0]).layers[0], x)
    assert abs(ours - theirs) <= 0.1 * theirs, (ours, theirs)
    assert ours < stock  # and less than the stock HF layer


def test_bf16_autocast(cpu_or_triton):
    """Under bf16 autocast the patched model meets the rule against the float64 stock model, with
    the autocast stock model as PyTorch's own error."""
    model, img = _model("hf-clip")
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = _inputs("hf-clip", img)["pixel_values"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(x).last_hidden_state.float()
        lp = stock(x).last_hidden_state.float()
    ref64 = copy.deepcopy(stock).double()(x.double()).last_hidden_state
    r = compare("out", ours, ref64, lp, atol_rel=8e-3)
    assert r.ok, str(r)


@pytest.mark.slow
def test_torch_compile_fullgraph(cpu_or_triton):
    model, img = _model("hf-vit")
    stock = copy.deepcopy(model)
    vit_fast.patch(model)
    x = _inputs("hf-vit", img)["pixel_values"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x).last_hidden_state
    out.sum().backward()
    want = stock(x).last_hidden_state
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), stock.parameters()):  # the concatenated q/k/v included
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_bench_zoo_cli(tmp_path, capsys):
    """`vit-fast bench --zoo`: stock and patched rows for each model and mode, in one run."""
    import json

    from vit_fast.cli import main as cli

    argv = "bench --zoo hf-vit,oc-vit --zoo-size tiny --batch 1 --model-runs 1 --min-run-time 0.001"
    rc = cli.main([*argv.split(), "--out", str(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "hf-vit" in table and "oc-vit" in table and "stock/patched" in table
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    got = {(r["name"], r["mode"], r["impl"]) for r in rows if not r["error"]}
    assert got == {
        (n, m, i) for n in ("hf-vit", "oc-vit") for m in ("inference", "train") for i in ("stock", "patched")
    }
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["bench", "--zoo", "resnet50"])
