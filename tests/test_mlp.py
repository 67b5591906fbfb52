"""MLP family: `vit_fast.ops.linear_residual` (attention projection + residual epilogue) and
`vit_fast.ops.layer_norm_mlp` (the whole pre-LN MLP sub-block), forward and every gradient,
against the fp64 reference (docs/design.md section 3); modules in `vit_fast.nn.mlp`; saved-for-backward
bytes; the AOT compile report of the GEMM and LN kernels."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from vit_fast import ops, reference
from vit_fast.nn.mlp import LayerNormMLP, Mlp, layer_norm_mlp_functional
from vit_fast.ops import use_backend
from vit_fast.testing import check_numerics

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["triton", "reference"])
def backend(request):
    with use_backend(request.param):
        yield request.param


def _mlp_args(b: int, t: int, d: int, f: int, *, biases: bool = True, affine: bool = True, device="cpu"):
    x = torch.randn(b, t, d, device=device).requires_grad_()
    lw = (1.0 + 0.1 * torch.randn(d, device=device)).requires_grad_() if affine else None
    lb = (0.1 * torch.randn(d, device=device)).requires_grad_() if affine else None
    w1 = (torch.randn(f, d, device=device) / d**0.5).requires_grad_()
    b1 = (0.1 * torch.randn(f, device=device)).requires_grad_() if biases else None
    w2 = (torch.randn(d, f, device=device) / f**0.5).requires_grad_()
    b2 = (0.1 * torch.randn(d, device=device)).requires_grad_() if biases else None
    return [x, lw, lb, w1, b1, w2, b2, 1e-6]


def _epilogue_kwargs(b: int, d: int, gamma: bool, drop_path: bool, device="cpu"):
    kw = {}
    if gamma:
        kw["gamma"] = (0.5 + torch.rand(d, device=device)).requires_grad_()
    if drop_path:
        # Sample 0 dropped, the others kept with keep_prob 0.8.
        kw["drop_path_scale"] = torch.tensor([0.0] + [1.25] * (b - 1), device=device)
    return kw


# ------------------------------------------------------------------------------ linear_residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gamma", "drop_path"), [(False, False), (True, True)])
def test_linear_residual_numerics(backend, device, dtype, gamma, drop_path):
    b, t, k, n = 3, 7, 48, 32
    x = torch.randn(b, t, k, device=device).requires_grad_()
    w = (torch.randn(n, k, device=device) / k**0.5).requires_grad_()
    bias = (0.1 * torch.randn(n, device=device)).requires_grad_()
    res = torch.randn(b, t, n, device=device).requires_grad_()
    kw = _epilogue_kwargs(b, n, gamma, drop_path, device)
    check_numerics(ops.linear_residual, reference.linear_residual, [x, w, bias, res], kw, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_residual_gamma_no_bias(triton_backend, device, dtype):
    """dgamma is derived from the wgrad product (no saved GEMM output): check it without a bias
    and with a layer-scale of 1e-5, timm's usual init."""
    b, t, k, n = 2, 5, 32, 48
    x = torch.randn(b, t, k, device=device).requires_grad_()
    w = (torch.randn(n, k, device=device) / k**0.5).requires_grad_()
    res = torch.randn(b, t, n, device=device).requires_grad_()
    gamma = torch.full((n,), 1e-5, device=device).requires_grad_()
    check_numerics(
        ops.linear_residual, reference.linear_residual, [x, w, None, res], {"gamma": gamma}, dtype=dtype
    )


# ------------------------------------------------------------------------------- layer_norm_mlp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "gamma", "drop_path"),
    [((1, 1, 32), False, False), ((2, 6, 48), True, True), ((2, 9, 64), True, False)],
)
def test_layer_norm_mlp_numerics(backend, device, dtype, shape, gamma, drop_path):
    b, t, d = shape
    args = _mlp_args(b, t, d, 4 * d, device=device)
    kw = _epilogue_kwargs(b, d, gamma, drop_path, device)
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, kw, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_mlp_tanh_no_bias_no_affine(triton_backend, device, dtype):
    args = _mlp_args(2, 5, 48, 4 * 48, biases=False, affine=False, device=device)
    kw = {"approximate": "tanh", **_epilogue_kwargs(2, 48, True, True, device)}
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, kw, dtype=dtype)


def test_layer_norm_mlp_adversarial_rows(triton_backend, device):
    """Large-mean/tiny-std and constant rows through the whole sub-block (fp16, where PyTorch's
    own result is finite)."""
    args = _mlp_args(1, 4, 32, 128, device=device)
    x = args[0].detach().double()
    x[0, 0] = 1e4 + 1e-3 * x[0, 0]
    x[0, 1] = 7.0
    args[0] = x.float().requires_grad_()
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, dtype=torch.float16)


def test_layer_norm_mlp_uses_triton_kernels(triton_backend, device):
    """Guard against a silent fallback: 2 GEMMs forward, 4 backward, all Triton."""
    from vit_fast.kernels import gemm, layer_norm, mlp

    args = _mlp_args(1, 3, 32, 64, device=device)
    with (
        mock.patch.object(mlp, "gemm", wraps=gemm.gemm) as spy,
        mock.patch.object(layer_norm, "gemm", wraps=gemm.gemm) as spy_ln,
    ):
        ops.layer_norm_mlp(*args).sum().backward()
    assert spy.call_count + spy_ln.call_count == 6


# ------------------------------------------------------------------------------------ bad input


def test_mlp_bad_input(device):
    args = _mlp_args(2, 3, 8, 32, device=device)
    x, lw, lb, w1, b1, w2, b2, eps = args
    with pytest.raises(ValueError, match="fc2_weight must have shape"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1, w2[:, :31], b2, eps)
    with pytest.raises(ValueError, match="fc1_weight must have shape"):
        ops.layer_norm_mlp(x, lw, lb, w1[:, :7], b1, w2, b2, eps)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1, w2, b2, 0.0)
    with pytest.raises(TypeError, match="x has dtype"):
        ops.layer_norm_mlp(x.detach().int(), lw, lb, w1, b1, w2, b2, eps)
    with pytest.raises(TypeError, match="fc1_bias has dtype"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1.detach().half(), w2, b2, eps)
    with pytest.raises(ValueError, match="approximate"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1, w2, b2, eps, approximate="sigmoid")
    with pytest.raises(ValueError, match="drop_path_scale must have shape"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1, w2, b2, eps, drop_path_scale=torch.ones(3))
    with pytest.raises(ValueError, match="gamma must have shape"):
        ops.layer_norm_mlp(x, lw, lb, w1, b1, w2, b2, eps, gamma=torch.ones(9))
    with pytest.raises(ValueError, match="x is empty"):
        ops.layer_norm_mlp(x[:0], lw, lb, w1, b1, w2, b2, eps)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.linear_residual(x, w, None, torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.linear_residual(x, torch.randn(8, 9), None, torch.randn(2, 3, 8))


# ----------------------------------------------------------------- registration and compilation


def test_custom_ops_opcheck(triton_backend, device):
    """torch.library.opcheck: schema, fake kernels vs real outputs, autograd registration."""
    x, lw, lb, w1, b1, w2, b2, eps = _mlp_args(2, 3, 16, 32, device=device)
    x2 = x.detach().reshape(6, 16).requires_grad_()
    gamma = torch.rand(16, requires_grad=True)
    dps = torch.tensor([0.0, 2.0])
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.vit_fast.layer_norm_mlp_fwd.default,
        (x2, lw, lb, w1, b1, w2, b2, eps, gamma, dps, 3, "none"),
        test_utils=tests,
    )
    res = torch.randn(6, 16, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vit_fast.linear_residual_fwd.default,
        (x2, w2[:, :16].detach().clone().requires_grad_(), b2, res, gamma, dps, 3),
        test_utils=tests,
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_compile_fullgraph(triton_backend, device, compile_backend):
    """fullgraph=True fails on any graph break; forward and all gradients match eager."""
    torch._dynamo.reset()
    mod = LayerNormMLP(32, 64, init_values=0.5).to(device)
    proj = torch.nn.Linear(32, 32).to(device)

    def step(x):
        y = ops.linear_residual(x, proj.weight, proj.bias, x, gamma=mod.ls.gamma)
        return mod(y).square().sum()

    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    params = [x, *mod.parameters(), *proj.parameters()]
    eager = step(x)
    g_eager = torch.autograd.grad(eager, params)
    got = torch.compile(step, fullgraph=True, backend=compile_backend)(x)
    g = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, eager)
    for a, e in zip(g, g_eager):
        torch.testing.assert_close(a, e)


@pytest.mark.slow
def test_compile_inductor(device):
    """The default inductor backend around our custom ops (reference backend inside, so the
    compiled graph's own kernels are the only inductor work)."""
    torch._dynamo.reset()
    mod = LayerNormMLP(16, 32).to(device)
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    with use_backend("reference"):
        eager = mod(x).sum()
        got = torch.compile(mod, fullgraph=True)(x).sum()
    torch.testing.assert_close(got, eager)


def test_autocast(triton_backend, device):
    """Under autocast, fp32 parameters and inputs run in the autocast dtype (bf16 here)."""
    mod = LayerNormMLP(32, 64).to(device)
    x = torch.randn(2, 3, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = mod(x)
    assert out.dtype == torch.bfloat16
    bf = torch.bfloat16
    ref = reference.layer_norm_mlp(
        x.to(bf), *(p.detach().to(bf) for p in (mod.norm.weight, mod.norm.bias)),
        mod.mlp.fc1.weight.detach().to(bf), mod.mlp.fc1.bias.detach().to(bf),
        mod.mlp.fc2.weight.detach().to(bf), mod.mlp.fc2.bias.detach().to(bf), 1e-6,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------- modules


def test_modules_timm_names_and_parity():
    """Parameter names as timm (norm2 -> norm, mlp.fc1/fc2, ls2.gamma -> ls.gamma), Mlp's
    forward is fc2(gelu(fc1(x))), and LayerNormMLP equals the unfused composition."""
    mod = LayerNormMLP(16, 40, init_values=0.1)
    assert set(mod.state_dict()) == {
        "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls.gamma",
    }  # fmt: skip
    x = torch.randn(2, 3, 16)
    m = mod.mlp
    torch.testing.assert_close(m(x), m.fc2(torch.nn.functional.gelu(m.fc1(x))))
    with use_backend("reference"):
        got = mod(x)
    want = x + mod.ls.gamma * m(mod.norm(x))
    torch.testing.assert_close(got, want)
    ref = layer_norm_mlp_functional(x, mod.norm, m.fc1, m.fc2, gamma=mod.ls.gamma, impl="reference")
    torch.testing.assert_close(got, ref)
    assert isinstance(Mlp(4, 8).act, torch.nn.GELU)


def test_module_drop_path_training(triton_backend):
    """Stochastic depth in training: each sample is either untouched (dropped) or scaled."""
    torch.manual_seed(3)
    mod = LayerNormMLP(16, 32, drop_path=0.5).train()
    x = torch.randn(8, 2, 16)
    out = mod(x)
    dropped = (out == x).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 8  # with p=0.5 over 8 samples, seed 3 drops some, not all
    mod.eval()
    with use_backend("reference"):
        full = x + mod.mlp(mod.norm(x))
    kept = ~dropped
    torch.testing.assert_close(out[kept], (x + 2.0 * (full - x))[kept], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- saved activations


def _saved_bytes(fn, params) -> int:
    """Bytes of distinct storages saved for backward while running fn. Storages of parameters are
    excluded (they live anyway; the reference saves transposed views of them, so the check is by
    storage, not by tensor identity)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def saved_bytes_per_token(d: int, tokens: int, dtype: torch.dtype, impl: str) -> float:
    """Saved-for-backward bytes per token of one MLP sub-block (x + ls(mlp(norm(x)))) with gamma."""
    mod = LayerNormMLP(d, init_values=1e-5).to(dtype)
    x = torch.randn(1, tokens, d, dtype=dtype, requires_grad=True)
    gamma = mod.ls.gamma

    def run():
        return layer_norm_mlp_functional(x, mod.norm, mod.mlp.fc1, mod.mlp.fc2, gamma=gamma, impl=impl)

    # Saved tensors do not depend on the backend (ops save in setup_context): the reference
    # backend keeps the ViT-B-sized measurement fast without the interpreter.
    with use_backend("reference"):
        return _saved_bytes(run, list(mod.parameters())) / tokens


def test_saved_bytes_vit_b_bf16():
    """ViT-B MLP sub-block (D=768, F=3072) in bf16: the fused op saves x (2D bytes), h_pre (2F)
    and fp32 mean/rstd (8) per token; the reference saves the fp32 LN input copy, LN output, h_pre,
    GELU output and the fc2 output (for dgamma) besides."""
    d, f, t = 768, 3072, 197
    fused = saved_bytes_per_token(d, t, torch.bfloat16, "fused")
    ref = saved_bytes_per_token(d, t, torch.bfloat16, "reference")
    assert fused == 2 * d + 2 * f + 8
    ratio = fused / ref
    print(
        f"saved bytes/token ViT-B MLP sub-block bf16: fused {fused:.0f}, reference {ref:.0f}, ratio {ratio:.3f}"
    )
    assert ratio <= 0.6


# ------------------------------------------------------------------------------- realistic sizes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "tokens", "dtype", "gamma", "drop_path"),
    [
        (192, 3 * 197, torch.float16, True, True),
        (384, 197, torch.float32, False, False),
        (768, 197, torch.bfloat16, True, False),
        (1000, 1, torch.float16, False, True),
        (1280, 1, torch.float32, True, True),
    ],
)
def test_layer_norm_mlp_realistic(triton_backend, device, d, tokens, dtype, gamma, drop_path):
    b = 2 if drop_path else 1
    args = _mlp_args(b, tokens, d, 4 * d, device=device)
    kw = _epilogue_kwargs(b, d, gamma, drop_path, device)
    check_numerics(ops.layer_norm_mlp, reference.layer_norm_mlp, args, kw, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "tokens", "dtype"), [(768, 197, torch.float16), (1000, 3 * 197, torch.bfloat16)]
)
def test_linear_residual_realistic(triton_backend, device, d, tokens, dtype):
    x = torch.randn(1, tokens, d, device=device).requires_grad_()
    w = (torch.randn(d, d, device=device) / d**0.5).requires_grad_()
    bias = (0.1 * torch.randn(d, device=device)).requires_grad_()
    res = torch.randn(1, tokens, d, device=device).requires_grad_()
    kw = _epilogue_kwargs(1, d, True, True, device)
    check_numerics(ops.linear_residual, reference.linear_residual, [x, w, bias, res], kw, dtype=dtype)


# ----------------------------------------------------------------------------------------- AOT


@pytest.mark.slow
def test_aot_compile_report():
    """Every shipped GEMM/LN config compiles for sm_80 and sm_90 with 0 spills and shared memory
    within the arch limit (needs no GPU: Triton compiles to cubin, cuobjdump reads the usage)."""
    from vit_fast.perf import aot

    results = aot.report("gemm_") + aot.report("ln_")
    assert len(results) >= 2 * 12 * 2 + 2 * 3 * 3 * 2
    assert {r.arch for r in results} == {80, 90}
    bad = [r for r in results if not r.ok]
    assert not bad, aot.format_table(bad)
