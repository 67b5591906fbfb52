"""LayerNorm family: `vit_fast.ops.layer_norm` (with/without fused residual add) and
`vit_fast.ops.layer_norm_linear`, forward and backward, against the fp64 reference (docs/design.md
section 3), on the Triton backend (interpreted on CPU) and the plain-PyTorch reference backend."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from vit_fast import ops, reference
from vit_fast.ops import use_backend
from vit_fast.testing import check_numerics

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ln_params(d: int, affine: bool = True):
    if not affine:
        return None, None
    w = (1.0 + 0.1 * torch.randn(d)).requires_grad_()
    b = (0.1 * torch.randn(d)).requires_grad_()
    return w, b


def _ln_ref64(x, weight, bias, eps):
    """A true fp64 oracle for LN: `reference.layer_norm` upcasts with `.float()`, so its "fp64" run
    is really fp32, which is no oracle on rows where fp32 statistics lose digits (mean 1e4, std
    1e-3). Same math, computed in fp64 for fp64 inputs and with fp32 statistics otherwise."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(dt)
    return F.layer_norm(x.to(dt), x.shape[-1:], cast(weight), cast(bias), eps).to(x.dtype)


def _ln_linear_ref64(x, ln_weight, ln_bias, weight, bias, eps):
    return F.linear(_ln_ref64(x, ln_weight, ln_bias, eps), weight, bias)


@pytest.fixture(params=["triton", "reference"])
def backend(request):
    with use_backend(request.param):
        yield request.param


# ----------------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 5, 48), (3, 17, 64)])
def test_layer_norm_numerics(backend, device, dtype, shape):
    x = torch.randn(*shape, device=device).requires_grad_()
    w, b = _ln_params(shape[-1])
    check_numerics(ops.layer_norm, reference.layer_norm, [x, w, b, 1e-6], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_no_affine(triton_backend, device, dtype):
    x = torch.randn(4, 7, 48, device=device).requires_grad_()
    check_numerics(ops.layer_norm, reference.layer_norm, [x, None, None, 1e-5], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_residual(backend, device, dtype):
    """The fused add returns (LN(x + r), x + r); both outputs feed the loss so both gradient paths
    (LN backward and the residual stream) are checked."""
    x = torch.randn(2, 9, 48, device=device).requires_grad_()
    r = torch.randn(2, 9, 48, device=device).requires_grad_()
    w, b = _ln_params(48)

    def both(fn):
        def run(x, w, b, eps, r):
            y, s = fn(x, w, b, eps, residual=r)
            return torch.stack([y, s])

        return run

    check_numerics(both(ops.layer_norm), both(reference.layer_norm), [x, w, b, 1e-6, r], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_adversarial_rows(triton_backend, device, dtype):
    """Rows with mean 1e4 and std 1e-3 (cancellation trap for one-pass variance) and constant rows
    (variance 0: the output is the bias, rstd = 1/sqrt(eps) must not overflow)."""
    d = 64
    x = torch.randn(6, d, device=device, dtype=torch.float64)
    x[0] = 1e4 + 1e-3 * x[0]
    x[1] = -1e4 + 1e-3 * x[1]
    x[2] = 3.0
    x[3] = 0.0
    x[4] = 1e4
    x = x.float().requires_grad_()
    w, b = _ln_params(d)
    ref = reference.layer_norm(x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype), 1e-5)
    assert torch.isfinite(ref).all()  # PyTorch's own result is finite: the rule applies
    check_numerics(ops.layer_norm, _ln_ref64, [x, w, b, 1e-5], dtype=dtype)


def test_layer_norm_non_contiguous(triton_backend, device):
    x = torch.randn(48, 2, 6, device=device).permute(1, 2, 0).requires_grad_()  # [2, 6, 48], strided
    w, b = _ln_params(48)
    check_numerics(ops.layer_norm, reference.layer_norm, [x, w, b, 1e-6], dtype=torch.float32)


def test_layer_norm_uses_triton_kernels(triton_backend, device):
    """Guard against a silent fallback: the Triton launchers must actually run."""
    from vit_fast.kernels import layer_norm as k

    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    w, b = _ln_params(32)
    with (
        mock.patch.object(k, "_row_stats_launch", wraps=k._row_stats_launch) as fwd,
        mock.patch.object(k, "layer_norm_backward_fused", wraps=k.layer_norm_backward_fused) as bwd,
    ):
        ops.layer_norm(x, w, b).sum().backward()
    assert fwd.call_count == 1 and bwd.call_count == 1


# ---------------------------------------------------------------------------- layer_norm_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "n"), [((1, 1, 32), 16), ((2, 7, 48), 40), ((2, 20, 64), 3 * 64)])
def test_layer_norm_linear_numerics(backend, device, dtype, shape, n):
    d = shape[-1]
    x = torch.randn(*shape, device=device).requires_grad_()
    lw, lb = _ln_params(d)
    w = (torch.randn(n, d, device=device) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(n, device=device)).requires_grad_()
    check_numerics(ops.layer_norm_linear, reference.layer_norm_linear, [x, lw, lb, w, b, 1e-6], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_linear_no_bias_no_affine(triton_backend, device, dtype):
    x = torch.randn(3, 5, 48, device=device).requires_grad_()
    w = (torch.randn(24, 48, device=device) / 48**0.5).requires_grad_()
    check_numerics(
        ops.layer_norm_linear, reference.layer_norm_linear, [x, None, None, w, None, 1e-6], dtype=dtype
    )


def test_layer_norm_linear_adversarial_rows(triton_backend, device):
    d = 48
    x = torch.randn(4, d, device=device, dtype=torch.float64)
    x[0] = 1e4 + 1e-3 * x[0]
    x[1] = 2.5
    x = x.float().requires_grad_()
    lw, lb = _ln_params(d)
    w = (torch.randn(32, d) / d**0.5).requires_grad_()
    b = torch.zeros(32).requires_grad_()
    for dtype in (torch.float32, torch.float16):
        check_numerics(ops.layer_norm_linear, _ln_linear_ref64, [x, lw, lb, w, b, 1e-5], dtype=dtype)


# ------------------------------------------------------------------------------------ bad input


def test_layer_norm_bad_input(device):
    x = torch.randn(2, 3, 8, device=device)
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(x, torch.ones(7), None)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, w, None, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, w, None, eps=-1e-5)
    with pytest.raises(TypeError, match="x has dtype"):
        ops.layer_norm(x.long(), None, None)
    with pytest.raises(TypeError, match="bias"):
        ops.layer_norm(x, w, torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="x is empty"):
        ops.layer_norm(x[:0], w, None)
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, w, None, residual=torch.randn(2, 3, 9))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([1.0, 2.0], None, None)


def test_layer_norm_too_wide_for_kernels(triton_backend, device):
    with pytest.raises(ValueError, match="D=4100 exceeds"):
        ops.layer_norm(torch.randn(2, 4100, device=device), None, None)


def test_layer_norm_linear_bad_input(device):
    x = torch.randn(2, 3, 8, device=device)
    w = torch.randn(16, 8, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm_linear(x, None, None, torch.randn(16, 9), None, 1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.layer_norm_linear(x, None, None, w, torch.zeros(15), 1e-6)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        ops.layer_norm_linear(x, torch.ones(9), None, w, None, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_linear(x, None, None, w, None, 0)
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.layer_norm_linear(x, None, None, w.half(), None, 1e-6)


# ----------------------------------------------------------------- registration and compilation


def test_custom_ops_opcheck(triton_backend, device):
    """torch.library.opcheck: schema, fake kernels vs real outputs, autograd registration."""
    x = torch.randn(6, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    r = torch.randn(6, 32, device=device, requires_grad=True)
    lw = torch.randn(20, 32, device=device, requires_grad=True)
    lb = torch.randn(20, device=device, requires_grad=True)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.vit_fast.layer_norm_fwd.default, (x, w, b, 1e-6), test_utils=tests)
    torch.library.opcheck(torch.ops.vit_fast.add_layer_norm_fwd.default, (x, r, w, b, 1e-6), test_utils=tests)
    torch.library.opcheck(
        torch.ops.vit_fast.layer_norm_linear_fwd.default, (x, w, b, lw, lb, 1e-6), test_utils=tests
    )


class _LNBlock(torch.nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, eps=1e-6)
        self.norm1 = torch.nn.LayerNorm(d, eps=1e-6)
        self.qkv = torch.nn.Linear(d, n)

    def forward(self, x, r):
        y, s = ops.layer_norm(x, self.norm.weight, self.norm.bias, 1e-6, residual=r)
        q = ops.layer_norm_linear(s, self.norm1.weight, self.norm1.bias, self.qkv.weight, self.qkv.bias, 1e-6)
        return y.sum() + q.square().sum()


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_compile_fullgraph(triton_backend, device, compile_backend):
    """fullgraph=True fails on any graph break; forward and gradients match eager."""
    torch._dynamo.reset()
    mod = _LNBlock(32, 48).to(device)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    r = torch.randn(2, 5, 32, device=device)
    eager = mod(x, r)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(mod, fullgraph=True, backend=compile_backend)
    got = compiled(x, r)
    (gx,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(gx, gx_eager)


def test_autocast(triton_backend, device):
    """Under autocast the op runs in the autocast dtype (inputs cast), matching the reference run
    on inputs cast the same way."""
    x = torch.randn(2, 5, 32, device=device)
    w = torch.randn(24, 32, device=device) / 32**0.5
    lw, lb = torch.ones(32), torch.zeros(32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = ops.layer_norm_linear(x, lw, lb, w, None, 1e-6)
        y = ops.layer_norm(x, lw, lb)
    assert out.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    bf = torch.bfloat16
    ref = reference.layer_norm_linear(x.to(bf), lw.to(bf), lb.to(bf), w.to(bf), None, 1e-6)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------- realistic sizes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "tokens", "dtype"),
    [
        (192, 197, torch.float32),
        (384, 3 * 197, torch.float16),
        (768, 197, torch.bfloat16),
        (1000, 197, torch.float16),
        (1280, 1, torch.float32),
    ],
)
def test_layer_norm_realistic(triton_backend, device, d, tokens, dtype):
    x = (3.0 + torch.randn(1, tokens, d, device=device)).requires_grad_()
    w, b = _ln_params(d)
    r = torch.randn(1, tokens, d, device=device).requires_grad_()
    check_numerics(ops.layer_norm, reference.layer_norm, [x, w, b, 1e-6], dtype=dtype)

    def ln_res(fn):
        return lambda x, w, b, r: torch.stack(fn(x, w, b, 1e-6, residual=r))

    check_numerics(ln_res(ops.layer_norm), ln_res(reference.layer_norm), [x, w, b, r], dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "tokens", "dtype"),
    [(192, 3 * 197, torch.float16), (768, 197, torch.bfloat16), (1000, 1, torch.float32)],
)
def test_layer_norm_linear_realistic(triton_backend, device, d, tokens, dtype):
    """The qkv projection (N = 3D) at real widths."""
    x = torch.randn(1, tokens, d, device=device).requires_grad_()
    lw, lb = _ln_params(d)
    w = (torch.randn(3 * d, d, device=device) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(3 * d, device=device)).requires_grad_()
    check_numerics(ops.layer_norm_linear, reference.layer_norm_linear, [x, lw, lb, w, b, 1e-6], dtype=dtype)


# ------------------------------------------------------ LN+Linear over row blocks (separate q/k/v)

BLOCKS = (16, 8, 24)


def _blocks_fn(adjacent: bool):
    """layer_norm_linear over the row blocks of w and b: as views of one storage (adjacent, the
    layout `vit_fast.patch` gives separate q/k/v projections) or as separate copies."""

    def fn(x, lw, lb, w, b, eps):
        ws, bs = list(w.split(BLOCKS)), list(b.split(BLOCKS))
        if not adjacent:
            ws, bs = [t.clone() for t in ws], [t.clone() for t in bs]
        return ops.layer_norm_linear(x, lw, lb, ws, bs, eps)

    return fn


@pytest.fixture(params=["triton", "cpu", "reference"])
def any_backend(request):
    if request.param == "cpu":
        from vit_fast.ops.backend import has_cpu_kernel

        if not has_cpu_kernel("layer_norm"):
            pytest.skip("C++ extension not built")
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_linear_row_blocks(any_backend, device, dtype, adjacent):
    """Row blocks give the stacked weight's output and each block its gradient, every backend."""
    if any_backend == "cpu" and device.type != "cpu":
        pytest.skip("cpu backend")
    x = torch.randn(2, 5, 32, device=device).requires_grad_()
    lw, lb = _ln_params(32)
    w = (torch.randn(sum(BLOCKS), 32) / 32**0.5).requires_grad_()
    b = (0.1 * torch.randn(sum(BLOCKS))).requires_grad_()
    check_numerics(_blocks_fn(adjacent), reference.layer_norm_linear, [x, lw, lb, w, b, 1e-6], dtype=dtype)


@pytest.mark.parametrize("adjacent", [True, False])
def test_row_blocks_stack_without_a_copy_when_adjacent(any_backend, device, adjacent, monkeypatch):
    """Adjacent blocks are read in place, forward and backward (the stacked weight the backend
    gets shares the blocks' storage: no copy, none saved for backward); separate ones are stacked
    by one copy. Each block gets its own gradient."""
    if any_backend == "cpu" and device.type != "cpu":
        pytest.skip("cpu backend")
    ln_ops = importlib.import_module("vit_fast.ops.layer_norm")  # (vit_fast.ops.layer_norm is also the op)

    buf = torch.randn(sum(BLOCKS), 32, device=device)
    params = [torch.nn.Parameter(t if adjacent else t.clone()) for t in buf.split(BLOCKS)]
    in_place = []

    def spy(blocks, dtype):
        out = ln_ops.join_rows.__wrapped__(blocks, dtype)
        in_place.append(out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())
        return out

    spy.__wrapped__ = ln_ops.join_rows
    monkeypatch.setattr(ln_ops, "join_rows", spy)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    ops.layer_norm_linear(x, None, None, params, None, 1e-6).sum().backward()
    assert in_place == [adjacent, adjacent]  # forward, backward
    w = buf.clone().requires_grad_()
    gx, gw = torch.autograd.grad(reference.layer_norm_linear(x, None, None, w, None, 1e-6).sum(), (x, w))
    torch.testing.assert_close(x.grad, gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p.grad for p in params]), gw, atol=1e-4, rtol=1e-4)


def test_row_blocks_under_autocast_keep_their_dtype(triton_backend, device):
    """fp32 blocks under bf16 autocast: output in bf16, each block's gradient in fp32, equal to the
    stacked weight's run under the same autocast."""
    x = torch.randn(2, 5, 32, device=device)
    w = torch.randn(sum(BLOCKS), 32, device=device) / 32**0.5
    blocks = [t.clone().requires_grad_() for t in w.split(BLOCKS)]
    stacked = w.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = ops.layer_norm_linear(x, None, None, blocks, None, 1e-6)
        ref = ops.layer_norm_linear(x, None, None, stacked, None, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    ref.float().sum().backward()
    assert all(b.grad.dtype == torch.float32 for b in blocks)
    torch.testing.assert_close(torch.cat([b.grad for b in blocks]), stacked.grad)


def test_row_blocks_compile_fullgraph(triton_backend, device):
    torch._dynamo.reset()
    blocks = [torch.randn(n, 32, device=device, requires_grad=True) for n in BLOCKS]
    x = torch.randn(2, 5, 32, device=device)
    fn = lambda x: ops.layer_norm_linear(x, None, None, blocks, None, 1e-6).square().sum()
    eager = torch.autograd.grad(fn(x), blocks)
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), blocks)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_row_blocks_bad_input(device):
    x = torch.randn(2, 3, 8, device=device)
    w = [torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)]
    with pytest.raises(ValueError, match="at least one"):
        ops.layer_norm_linear(x, None, None, [], None, 1e-6)
    with pytest.raises(ValueError, match="one per weight block"):
        ops.layer_norm_linear(x, None, None, w, [torch.zeros(4, device=device)], 1e-6)
    with pytest.raises(ValueError, match=r"weight\[1\] must have shape"):
        ops.layer_norm_linear(x, None, None, [w[0], torch.randn(4, 9, device=device)], None, 1e-6)
    with pytest.raises(ValueError, match=r"bias\[0\] must have shape"):
        ops.layer_norm_linear(
            x, None, None, w, [torch.zeros(5, device=device), torch.zeros(4, device=device)], 1e-6
        )
    with pytest.raises(ValueError, match=r"weight\[0\] has overlapping memory"):
        ops.layer_norm_linear(
            x, None, None, [torch.randn(1, 8, device=device).expand(4, 8), w[1]], None, 1e-6
        )
