"""64-bit offsets in the Triton kernels (issue: int32 offsets overflow past 2**31 elements).

Three parts: (1) the selection rule `needs_int64` on shapes; (2) the launchers at the issue's real
shapes (ViT-B layer_norm_mlp backward at x [3600, 197, 768], layer_norm_linear backward at
[4800, 197, 768], one 2048x2048 image at patch size 1) planned on meta tensors with the kernels
replaced by recorders, so nothing is allocated and nothing runs: every launch that addresses a
tensor past 2**31 elements must pick the int64 variant and the others the int32 one; (3) the int64
variants forced (VIT_FAST_FORCE_INT64=1) on small shapes and run in the interpreter through the
public ops, forward and every gradient against the float64 reference.

The LayerNorm kernels have no int32 variant (their offsets are always int64; see the comment in
kernels/layer_norm.py), so every LayerNorm test of the suite already runs their 64-bit path.
"""

from __future__ import annotations

import pytest
import torch

from vit_fast import ops, reference
from vit_fast.kernels import _common
from vit_fast.kernels import gemm as gm
from vit_fast.kernels import layer_norm as ln
from vit_fast.kernels import mlp as mk
from vit_fast.kernels import patch_embed as pe
from vit_fast.testing import check_numerics

META = torch.device("meta")


# ------------------------------------------------------------------------------ (1) selection


def test_extent_and_needs_int64_on_shapes(monkeypatch):
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    edge = torch.empty(2**31 - 1, device=META)
    assert _common.extent(edge) == 2**31 - 1 and not _common.needs_int64(edge)
    assert _common.needs_int64(torch.empty(2**31, device=META))
    # A transposed view spans what its base spans; the issue's h_pre [3600*197, 3072] passes 2**31.
    h_pre_t = torch.empty(3600 * 197, 3072, device=META).t()
    assert _common.extent(h_pre_t) == 3600 * 197 * 3072 and _common.needs_int64(h_pre_t)
    # Few elements but a large stride: the offsets, not the element count, decide.
    strided = torch.empty_strided((2, 4), (2**31, 1), device=META)
    assert strided.numel() == 8 and _common.needs_int64(strided)
    # A stride-0 broadcast of a small tensor addresses only that tensor.
    assert not _common.needs_int64(torch.empty(1, 768, device=META).expand(2**22, 768))
    assert _common.extent(torch.empty(0, 5, device=META)) == 0
    assert not _common.needs_int64(None, torch.empty(3, 4), None)
    monkeypatch.setenv(_common.FORCE_INT64_ENV, "1")
    assert _common.needs_int64(torch.empty(3, 4))


# -------------------------------------------------------------------- (2) launch planning, meta


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` only records."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def _record(monkeypatch, module, names: tuple[str, ...]) -> list:
    launches: list = []
    for name in names:
        monkeypatch.setattr(module, name, _Recorder(name, launches))
    return launches


def _assert_widths(launches: list, expect_big: bool) -> None:
    """Each recorded launch uses IDX64 exactly when one of its tensors spans past 2**31."""
    assert launches
    seen_big = False
    for name, args, kwargs in launches:
        big = any(isinstance(a, torch.Tensor) and _common.extent(a) > _common.I32_MAX for a in args)
        seen_big |= big
        if "IDX64" in kwargs:
            assert kwargs["IDX64"] == big, (
                name,
                [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
            )
    assert seen_big == expect_big


@pytest.mark.parametrize("tokens", [3600 * 197, 64])
def test_mlp_backward_plans_int64_at_issue_shape(monkeypatch, tokens):
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    launches = _record(monkeypatch, gm, ("_gemm_kernel",))
    ln_launches = _record(monkeypatch, ln, ("_ln_fwd_kernel", "_ln_bwd_kernel"))
    d, f = 768, 3072
    t = lambda *s, dt=torch.bfloat16: torch.empty(*s, device=META, dtype=dt)
    x, dout, h_pre = t(tokens, d), t(tokens, d), t(tokens, f)
    stats = t(tokens, dt=torch.float32)
    mk.mlp_backward(
        dout, x, t(d), t(d), t(f, d), t(d, f), t(d), t(d), None, 197, stats, stats, h_pre, "none", True, True
    )
    _assert_widths(launches, expect_big=tokens > 64)
    wgrad = [kw for name, args, kw in launches if kw["PROLOGUE"] == gm.PRO_LN_COL]
    assert len(wgrad) == 1 and wgrad[0]["IDX64"] == (tokens > 64)  # the dW1 GEMM of the issue
    assert len(launches) == 4 and ln_launches  # four GEMMs, then the LN backward


def test_layer_norm_linear_backward_plans_int64_at_issue_shape(monkeypatch):
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    launches = _record(monkeypatch, gm, ("_gemm_kernel",))
    _record(monkeypatch, ln, ("_ln_fwd_kernel", "_ln_bwd_kernel"))
    m, d, n = 4800 * 197, 768, 3 * 768
    t = lambda *s, dt=torch.bfloat16: torch.empty(*s, device=META, dtype=dt)
    stats = t(m, dt=torch.float32)
    ln.layer_norm_linear_backward(t(m, n), t(m, d), t(d), t(d), t(n, d), stats, stats, True)
    _assert_widths(launches, expect_big=True)
    assert all(kw["IDX64"] for _, _, kw in launches)  # both GEMMs read dout [m, 2304]: 2.18e9


def test_linear_residual_forward_plans_int32_below_and_int64_above(monkeypatch):
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    launches = _record(monkeypatch, gm, ("_gemm_kernel",))
    t = lambda *s: torch.empty(*s, device=META, dtype=torch.bfloat16)
    for m in (2**31 // 768, 2**31 // 768 + 1):  # out [m, 768] just below / just past 2**31 elements
        mk.linear_residual_forward(t(m, 768), t(768, 768), t(768), t(m, 768), None, None, 1)
    assert [kw["IDX64"] for _, _, kw in launches] == [False, True]


@pytest.mark.parametrize(("side", "big"), [(2048, True), (64, False)])
def test_patch_embed_plans_int64_for_one_large_image(monkeypatch, side, big):
    """One 2048x2048 image at patch size 1: 4M tokens, pos_embed [1, 4M + 1, 768] (3.2e9)."""
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    kernels = ("_fwd_kernel", "_dweight_kernel", "_dimage_kernel", "_batch_sum_kernel", "_split_sum_kernel")
    launches = _record(monkeypatch, pe, kernels)
    d, np_ = 768, side * side
    t = lambda *s: torch.empty(*s, device=META, dtype=torch.bfloat16)
    images, weight = t(1, 3, side, side), t(d, 3, 1, 1)
    pe.patch_embed_forward(images, weight, t(d), t(1, np_ + 1, d), t(1, 1, d), None, 1, False)
    pe.patch_embed_backward(t(1, np_ + 1, d), images, weight, True, True, True, 0, 1, False, True)
    order = ["_fwd_kernel", "_dweight_kernel", "_split_sum_kernel", "_batch_sum_kernel", "_dimage_kernel"]
    assert [name for name, _, _ in launches] == order
    _assert_widths(launches, expect_big=big)


# ------------------------------------------------------------- (3) forced int64, interpreted


class _Spy:
    """Wraps a kernel and records the IDX64 of each launch, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.idx64 = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.idx64.append(kwargs.get("IDX64"))
            return launch(*args, **kwargs)

        return run


def _spy(monkeypatch, module, name: str) -> _Spy:
    spy = _Spy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


@pytest.fixture
def forced_int64(monkeypatch, triton_backend):
    monkeypatch.setenv(_common.FORCE_INT64_ENV, "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_int64_layer_norm_mlp(forced_int64, monkeypatch, device, dtype):
    spy = _spy(monkeypatch, gm, "_gemm_kernel")
    b, t, d, f = 2, 5, 32, 48
    x = torch.randn(b, t, d, device=device).requires_grad_()
    lw = (1.0 + 0.1 * torch.randn(d, device=device)).requires_grad_()
    lb = (0.1 * torch.randn(d, device=device)).requires_grad_()
    w1 = (torch.randn(f, d, device=device) / d**0.5).requires_grad_()
    b1 = (0.1 * torch.randn(f, device=device)).requires_grad_()
    w2 = (torch.randn(d, f, device=device) / f**0.5).requires_grad_()
    b2 = (0.1 * torch.randn(d, device=device)).requires_grad_()
    kw = {
        "gamma": (0.5 + torch.rand(d, device=device)).requires_grad_(),
        "drop_path_scale": torch.tensor([0.0, 1.25], device=device),
    }
    args = [x, lw, lb, w1, b1, w2, b2, 1e-6]
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, kw, dtype=dtype)
    # 2 forward + 4 backward GEMMs per run (check_numerics runs ours once), all 64-bit.
    assert len(spy.idx64) >= 6 and all(spy.idx64)


def test_forced_int64_linear_residual_and_layer_norm_linear(forced_int64, monkeypatch, device):
    spy = _spy(monkeypatch, gm, "_gemm_kernel")
    b, t, k, n = 2, 7, 48, 40
    x = torch.randn(b, t, k, device=device).requires_grad_()
    w = (torch.randn(n, k, device=device) / k**0.5).requires_grad_()
    bias = (0.1 * torch.randn(n, device=device)).requires_grad_()
    res = torch.randn(b, t, n, device=device).requires_grad_()
    gamma = (0.5 + torch.rand(n, device=device)).requires_grad_()
    check_numerics(ops.linear_residual, reference.linear_residual, [x, w, bias, res], {"gamma": gamma})
    lw = (1.0 + 0.1 * torch.randn(k, device=device)).requires_grad_()
    lb = (0.1 * torch.randn(k, device=device)).requires_grad_()
    check_numerics(
        ops.layer_norm_linear, reference.layer_norm_linear, [x, lw, lb, w, bias, 1e-6], dtype=torch.float16
    )
    assert len(spy.idx64) >= 6 and all(spy.idx64)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_forced_int64_patch_embed_patch1(forced_int64, monkeypatch, device, no_embed_class):
    """Patch size 1 (the shape that reaches 2**31 with one image), registers and both position
    embedding layouts, so the pos_row * D, register and batch-sum offsets all run in int64."""
    spies = [
        _spy(monkeypatch, pe, n)
        for n in ("_fwd_kernel", "_dweight_kernel", "_dimage_kernel", "_batch_sum_kernel")
    ]
    bsz, c, h, w, d, nreg = 2, 8, 4, 6, 32, 2
    x = torch.randn(bsz, c, h, w, device=device).requires_grad_()
    wt = (torch.randn(d, c, 1, 1, device=device) / c**0.5).requires_grad_()
    bias = torch.randn(d, device=device).requires_grad_()
    length = h * w + (0 if no_embed_class else 1 + nreg)
    pos = torch.randn(1, length, d, device=device).requires_grad_()
    cls = torch.randn(1, 1, d, device=device).requires_grad_()
    reg = torch.randn(1, nreg, d, device=device).requires_grad_()
    check_numerics(
        ops.patch_embed,
        reference.patch_embed,
        (x, wt, bias, pos, cls, reg),
        {"patch_size": 1, "no_embed_class": no_embed_class},
    )
    for spy in spies:
        assert spy.idx64 and all(spy.idx64), spy.kernel


# ------------------------------------------- (4) real offsets past 2**31, without the memory


@pytest.fixture
def sparse_base(monkeypatch):
    """A float32 buffer of 2**31 + 2**20 elements (8.6 GB of address space) of which the tests touch
    a few KB: torch.empty does not write its memory, so the OS backs only the touched pages. The
    interpreter copies every argument's storage back onto itself after a launch (a no-op for CPU
    tensors that would touch every page); that copy is skipped for storages that are their own
    host copy. Should a product be formed in int32 again, the kernel reads a wrapped address:
    expect a crash of the interpreter (segfault) rather than a failed assert."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not _common.triton_interpreting():
        pytest.skip("runs the kernels in the interpreter")
    try:
        base = torch.empty(2**31 + 2**20, dtype=torch.float32)
    except RuntimeError as err:  # no overcommit on this machine
        pytest.skip(f"cannot reserve 8.6 GB of address space: {err}")
    orig = interpreter.GridExecutor._restore_args_dev

    def restore(self, args_dev, args_hst, kwargs, kwargs_hst):
        same = lambda d, h: (
            not isinstance(d, torch.Tensor)
            or d.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
        )
        if all(same(d, h) for d, h in zip(args_dev, args_hst)) and all(
            same(kwargs[k], kwargs_hst[k]) for k in kwargs
        ):
            return None
        return orig(self, args_dev, args_hst, kwargs, kwargs_hst)

    monkeypatch.setattr(interpreter.GridExecutor, "_restore_args_dev", restore)
    monkeypatch.delenv(_common.FORCE_INT64_ENV, raising=False)
    return base


_BIG_STRIDE = 2**30 + 1  # below 2**31 (passed as i32), but 2 * stride is not


def test_wgrad_gemm_reads_past_2_31_elements(sparse_base):
    """The issue's wgrad case in miniature: A = X^T with X's rows 2**30 + 1 elements apart, so
    k * stride_ak passes 2**31 at k = 2. Selected automatically (no forcing); an int32 product
    would wrap and read the wrong memory."""
    x = sparse_base.as_strided((3, 40), (_BIG_STRIDE, 1))
    x.copy_(torch.randn(3, 40))
    a = x.t()  # [M=40, K=3], strides (1, 2**30 + 1)
    assert _common.needs_int64(a)
    b = torch.randn(24, 3)
    out = torch.empty(40, 24)
    gm.gemm(a, b, out)
    torch.testing.assert_close(out, a.contiguous() @ b.t(), rtol=1e-5, atol=1e-5)


def test_patch_embed_gathers_images_past_2_31_elements(sparse_base):
    """Images 2**30 + 1 elements apart: b * sB passes 2**31 from the third image on, in the
    forward gather and the dweight gather (both select the int64 variant on their own)."""
    images = sparse_base.as_strided((3, 3, 8, 8), (_BIG_STRIDE, 64, 8, 1))
    images.copy_(torch.randn(3, 3, 8, 8))
    w, bias = torch.randn(16, 3, 4, 4) / 48**0.5, torch.randn(16)
    pos, cls = torch.randn(1, 5, 16), torch.randn(1, 1, 16)
    out = pe.patch_embed_forward(images, w, bias, pos, cls, None, 4, False)
    dense = images.contiguous()
    ref = reference.patch_embed(dense, w, bias, pos, cls, None, patch_size=4, no_embed_class=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    _, dw, *_ = pe.patch_embed_backward(grad, images, w, True, True, True, 0, 4, False, False)
    _, dw_ref, *_ = pe.patch_embed_backward(grad, dense, w, True, True, True, 0, 4, False, False)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)
