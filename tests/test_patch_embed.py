"""Fused patch embedding: numerics of the output and every gradient against the fp64 reference
(Triton kernels run in the interpreter on CPU), validation, torch.library registration,
torch.compile, autocast and the PatchEmbed module."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vit_fast import reference
from vit_fast.nn.patch_embed import PatchEmbed
from vit_fast.ops import use_backend
from vit_fast.ops.patch_embed import patch_embed
from vit_fast.plain import patch_embed as plain_pe
from vit_fast.testing import check_numerics

# The module (vit_fast.ops.patch_embed is also the name of the op function re-exported by vit_fast.ops).
pe_ops = sys.modules["vit_fast.ops.patch_embed"]


def make_args(
    batch: int,
    chans: int,
    height: int,
    width: int,
    p: int,
    dim: int,
    *,
    cls: bool = True,
    num_reg: int = 0,
    no_embed_class: bool = False,
    channels_last: bool = False,
    bias: bool = True,
    pos: bool = True,
    image_grad: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[tuple, dict]:
    """fp32 master tensors (all requiring grad) for check_numerics, plus the keyword arguments."""
    x = torch.randn(batch, chans, height, width, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(image_grad)
    # Conv2d-like init keeps the output O(1), so the absolute error bounds are meaningful.
    w = (torch.randn(dim, chans, p, p, device=device) / (chans * p * p) ** 0.5).requires_grad_(True)
    b = torch.randn(dim, device=device).requires_grad_(True) if bias else None
    num_patches = (height // p) * (width // p)
    prefix = int(cls) + num_reg
    length = num_patches if no_embed_class else num_patches + prefix
    pe = torch.randn(1, length, dim, device=device).requires_grad_(True) if pos else None
    c = torch.randn(1, 1, dim, device=device).requires_grad_(True) if cls else None
    r = torch.randn(1, num_reg, dim, device=device).requires_grad_(True) if num_reg else None
    return (x, w, b, pe, c, r), {"patch_size": p, "no_embed_class": no_embed_class}


def run_check(args: tuple, kwargs: dict, dtype: torch.dtype = torch.float32) -> None:
    check_numerics(patch_embed, reference.patch_embed, args, kwargs, dtype=dtype)


# -- numerics, Triton backend (interpreter) -----------------------------------------------------------


def _slow(*case):
    """A realistic shape: slow in the interpreter, so it runs in the slow tier."""
    return pytest.param(case, marks=pytest.mark.slow)


# (B, C, H, W, p, D, cls, R, no_embed_class, channels_last): every patch size of the issue, batch 1
# and 3, with/without class token, register tokens, no_embed_class, channels-last, non-square grids.
CASES = [
    (3, 64, 8, 8, 1, 32, True, 0, False, False),  # hybrid: 1x1 over a many-channel feature map
    (1, 96, 6, 10, 1, 48, True, 4, False, True),  # hybrid, channels-last, non-square, registers
    (3, 3, 32, 32, 4, 32, True, 0, False, False),
    (1, 3, 32, 32, 8, 48, False, 0, False, True),
    (3, 3, 28, 28, 14, 32, True, 4, False, False),
    (1, 3, 32, 32, 16, 48, True, 0, True, False),
    (3, 3, 64, 48, 16, 32, True, 2, True, True),
    (3, 1, 32, 64, 32, 32, False, 4, False, False),
    (3, 4, 32, 32, 8, 32, False, 0, False, False),  # no prefix at all
    _slow(1, 3, 224, 224, 16, 192, True, 0, False, False),
    _slow(3, 3, 224, 160, 16, 96, True, 4, False, True),
    _slow(1, 3, 224, 224, 14, 96, True, 0, True, False),
    _slow(3, 3, 224, 224, 32, 96, False, 0, False, True),
    _slow(1, 3, 224, 160, 8, 64, True, 4, True, False),
    _slow(1, 3, 224, 224, 4, 48, True, 0, False, True),
    _slow(1, 256, 14, 14, 1, 192, True, 0, False, True),  # hybrid: ResNet stage feature map, 1x1
]


def run_case(case: tuple, device: str, dtype: torch.dtype = torch.float32) -> None:
    """The numerics rule on one (B, C, H, W, p, D, cls, R, no_embed_class, channels_last) case."""
    B, C, H, W, p, D, cls, R, nec, cl = case
    args, kwargs = make_args(
        B, C, H, W, p, D, cls=cls, num_reg=R, no_embed_class=nec, channels_last=cl, device=device
    )
    run_check(args, kwargs, dtype)


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "B{}C{}_{}x{}_p{}_D{}_cls{}_reg{}_nec{}_cl{}".format(*c),
)
def test_numerics_fp32(case, device, triton_backend):
    run_case(case, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [(3, 3, 32, 32, 16, 48, True, 0, False, True), (1, 32, 4, 6, 1, 32, True, 4, True, False)],
    ids=["p16_cl", "p1_reg_nec"],
)
def test_numerics_low_precision(case, dtype, device, triton_backend):
    run_case(case, device, dtype)


def test_numerics_optional_parts_absent(device, triton_backend):
    """No bias, no pos_embed, and an image that needs no grad (dimages path skipped)."""
    args, kwargs = make_args(2, 3, 32, 32, 8, 32, bias=False, pos=False, image_grad=False, device=device)
    run_check(args, kwargs)


def test_non_contiguous_image(device, triton_backend):
    """A strided view (every other row/column of a larger image) is gathered without a copy."""
    big = torch.randn(2, 3, 64, 64, device=device)
    x = big[:, :, ::2, 1::2].detach().requires_grad_(True)
    assert not x.is_contiguous()
    (_, w, b, pe, c, r), kwargs = make_args(2, 3, 32, 32, 8, 32, device=device)
    run_check((x, w, b, pe, c, r), kwargs)


def test_int64_indexing_path(device, triton_backend, monkeypatch):
    """The 64-bit offset variant (chosen for tensors past 2**31 elements, too big to test directly) is
    forced on a small problem and must give the same answers."""
    monkeypatch.setenv("VIT_FAST_FORCE_INT64", "1")
    args, kwargs = make_args(3, 3, 32, 32, 8, 32, num_reg=2, channels_last=True, device=device)
    run_check(args, kwargs)


def test_broadcast_image_batch(device, triton_backend):
    """An expand()ed batch (stride 0 over B) is only read by the forward; its gradient sums over B."""
    (x, w, b, pe, c, r), kwargs = make_args(1, 3, 16, 16, 8, 16, device=device)
    xe = x.expand(3, -1, -1, -1)
    out = patch_embed(xe, w, b, pe, c, r, **kwargs)
    (gx,) = torch.autograd.grad(out.sum(), x)
    xd = x.detach().double().requires_grad_(True)
    ref = reference.patch_embed(
        xd.expand(3, -1, -1, -1), *(t.detach().double() for t in (w, b, pe, c)), **kwargs
    )
    (gref,) = torch.autograd.grad(ref.sum(), xd)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx.double(), gref, atol=1e-4, rtol=1e-4)


def test_image_grad_layout_and_determinism(device, triton_backend):
    """dimages keeps channels-last; two backward passes give bitwise equal gradients (no atomics).
    B*N = 192 rows with D = K = 32 makes the dweight reduction split over 2 row ranges."""
    (x, w, b, pe, c, r), kwargs = make_args(3, 2, 32, 32, 4, 32, num_reg=1, channels_last=True, device=device)
    grads = []
    for _ in range(2):
        out = patch_embed(x, w, b, pe, c, r, **kwargs)
        grads.append(torch.autograd.grad(out, (x, w, b, pe, c, r), torch.ones_like(out)))
    assert grads[0][0].is_contiguous(memory_format=torch.channels_last)
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_triton_kernels_really_run(device, triton_backend, monkeypatch):
    """Guard against a silent fallback: the Triton launchers must be the ones called."""
    import vit_fast.kernels.patch_embed as kern

    calls = []
    for name in ("patch_embed_forward", "patch_embed_backward"):
        orig = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    (x, w, b, pe, c, r), kwargs = make_args(1, 3, 16, 16, 8, 16, device=device)
    patch_embed(x, w, b, pe, c, r, **kwargs).sum().backward()
    assert calls == ["patch_embed_forward", "patch_embed_backward"]


# -- other backends -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cl", [False, True])
def test_reference_backend(cl):
    args, kwargs = make_args(2, 3, 28, 28, 14, 32, num_reg=2, channels_last=cl)
    with use_backend("reference"):
        run_check(args, kwargs)


def test_cpu_backend_contract_call(monkeypatch):
    """The op calls its backend with exactly the contract's positional arguments: a stand-in
    extension implementing the contract with the plain-PyTorch functions must reproduce the result."""
    calls = []

    def fwd(*a):
        assert len(a) == 8 and isinstance(a[6], int) and isinstance(a[7], bool)
        calls.append("fwd")
        return plain_pe.patch_embed_forward(*a)

    def bwd(*a):
        assert len(a) == 10 and isinstance(a[6], int) and isinstance(a[9], bool)
        calls.append("bwd")
        return list(plain_pe.patch_embed_backward(*a))

    fake_ext = types.SimpleNamespace(patch_embed_forward=fwd, patch_embed_backward=bwd)
    monkeypatch.setattr(pe_ops, "backend_fns", lambda device, family, *rest: fake_ext)
    args, kwargs = make_args(2, 3, 16, 16, 8, 16, num_reg=1)
    run_check(args, kwargs)
    assert "fwd" in calls and "bwd" in calls


# -- validation -----------------------------------------------------------------------------------------


def _valid(**over):
    (x, w, b, pe, c, r), kwargs = make_args(2, 3, 32, 32, 16, 32, num_reg=1)
    d = dict(
        images=x.detach(), weight=w.detach(), bias=b.detach(), pos_embed=pe.detach(), cls_token=c.detach()
    )
    d["reg_tokens"] = r.detach()
    d.update(kwargs)
    d.update(over)
    return d


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(images=torch.randn(2, 3, 30, 32)), ValueError, "not divisible by patch_size"),
        (dict(images=torch.randn(2, 4, 32, 32)), ValueError, "channels"),
        (dict(pos_embed=torch.randn(1, 5, 32)), ValueError, "pos_embed must have shape"),
        (
            dict(pos_embed=torch.randn(1, 4, 32), no_embed_class=False),
            ValueError,
            r"\(1, 6, 32\)",
        ),  # grid only, prefix missing
        (dict(images=torch.randn(3, 32, 32)), ValueError, "images must be 4-D"),
        (dict(weight=torch.randn(32, 3, 16, 8)), ValueError, "weight must be"),
        (dict(weight=torch.randn(32, 3, 8, 8)), ValueError, "patch_size"),
        (dict(images=torch.randn(0, 3, 32, 32)), ValueError, "images is an empty batch"),
        (dict(images=torch.randn(2, 3, 32, 32).half()), TypeError, "weight"),
        (dict(bias=torch.randn(31)), ValueError, "bias"),
        (dict(cls_token=torch.randn(1, 2, 32)), ValueError, "cls_token"),
        (dict(reg_tokens=torch.randn(2, 1, 32)), ValueError, "reg_tokens"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(images=torch.randn(2, 3, 32, 32, dtype=torch.float64)), TypeError, "images"),
        (dict(images=[[1.0]]), TypeError, "images"),
    ],
)
def test_bad_input_raises_before_launch(over, exc, match, monkeypatch):
    def no_launch(*a):
        raise AssertionError("a kernel was launched despite invalid input")

    monkeypatch.setattr(pe_ops, "backend_fns", no_launch)
    d = _valid(**over)
    with pytest.raises(exc, match=match):
        patch_embed(
            d["images"],
            d["weight"],
            d["bias"],
            d["pos_embed"],
            d["cls_token"],
            d["reg_tokens"],
            patch_size=d["patch_size"],
            no_embed_class=d["no_embed_class"],
        )


def test_pos_embed_no_embed_class_length():
    """With no_embed_class the prefix tokens get no position embedding: L must equal the grid."""
    d = _valid(no_embed_class=True)
    with pytest.raises(ValueError, match=r"\(1, 4, 32\)"):
        patch_embed(d["images"], d["weight"], d["bias"], d["pos_embed"], d["cls_token"], d["reg_tokens"],
                    patch_size=16, no_embed_class=True)  # fmt: skip


# -- registration, compile, autocast --------------------------------------------------------------------


def test_opcheck(device, triton_backend):
    (x, w, b, pe, c, r), _ = make_args(2, 3, 16, 16, 8, 16, num_reg=1, device=device)
    torch.library.opcheck(
        torch.ops.vit_fast.patch_embed_fwd.default,
        (x, w, b, pe, c, r, 8, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=16)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):
        return self.patch_embed(x, self.pos_embed, self.cls_token).square().mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device, triton_backend):
    torch._dynamo.reset()
    model = _Tiny().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    ref_loss = model(x)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_autocast_casts_inputs(device, triton_backend):
    (x, w, b, pe, c, r), kwargs = make_args(2, 3, 16, 16, 8, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = patch_embed(x, w, b, pe, c, r, **kwargs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32  # grads flow back to fp32 masters
    expected = reference.patch_embed(
        *(t.detach() if t is not None else None for t in (x, w, b, pe, c, r)), **kwargs
    )
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


# -- PatchEmbed module ------------------------------------------------------------------------------


def test_patch_embed_module_attributes_and_forward(device, triton_backend):
    m = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=32).to(device)
    assert m.img_size == (32, 48) and m.patch_size == (16, 16)
    assert m.grid_size == (2, 3) and m.num_patches == 6
    assert set(dict(m.named_parameters())) == {"proj.weight", "proj.bias"}
    assert m.proj.weight.shape == (32, 3, 16, 16)
    x = torch.randn(2, 3, 32, 48, device=device)
    out = m(x)
    expected = F.conv2d(x, m.proj.weight, m.proj.bias, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(2, 3, 32, 32, device=device))
    loose = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=32, strict_img_size=False)
    assert loose.to(device)(torch.randn(1, 3, 32, 32, device=device)).shape == (1, 4, 32)


def test_patch_embed_module_with_tokens(device, triton_backend):
    m = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    cls, reg = torch.randn(1, 1, 16), torch.randn(1, 2, 16)
    pos = torch.randn(1, 16, 16)
    out = m(x, pos, cls, reg, no_embed_class=True)
    expected = reference.patch_embed(
        x, m.proj.weight, m.proj.bias, pos, cls, reg, patch_size=8, no_embed_class=True
    )
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.timm
def test_patch_embed_matches_timm(device, triton_backend):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=24).to(device)
    ours = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=24).to(device)
    ours.load_state_dict(theirs.state_dict())  # same parameter names and shapes
    assert ours.grid_size == theirs.grid_size and ours.num_patches == theirs.num_patches
    assert ours.patch_size == theirs.patch_size and ours.img_size == theirs.img_size
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


# -- realistic shapes (slow in the interpreter) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numerics_realistic_low_precision(dtype, device, triton_backend):
    args, kwargs = make_args(3, 3, 224, 160, 16, 192, num_reg=1, channels_last=True, device=device)
    run_check(args, kwargs, dtype)


# -- ahead-of-time compilation ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name_filter", ["patch_embed_fwd_fp16_16bit_p16", "patch_embed_dweight_bf16", "patch_embed_dimage_fp16"]
)
def test_aot_compiles_without_spills(name_filter):
    """A sample of the shipped configs (the whole family: `python -m vit_fast.perf.aot patch_embed`)
    compiles for sm_80 and sm_90 with 0 spills and shared memory within the limit."""
    pytest.importorskip("triton")
    from vit_fast.perf.aot import format_table, report

    results = report(name_filter)
    assert {r.arch for r in results} == {80, 90} and len(results) >= 4
    assert all(r.ok for r in results), format_table(results)
