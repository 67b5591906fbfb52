"""Flash attention (issue #3): Triton kernels in the interpreter against the fp64 reference.

Shapes are kept small for the interpreter; every T in {1, 2, 50, 197} and every head dim in
{16, 32, 64, 72, 80, 96, 128} appears at least once in the fast tier (fp32 and fp16), T = 257 and
577 run in the slow tier.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vit_fast import reference
from vit_fast.kernels.attention import attention_backward, attention_forward, dropout_keep_mask
from vit_fast.ops import use_backend
from vit_fast.ops.attention import attention
from vit_fast.plain import attention as plain
from vit_fast.testing import check_numerics

# `vit_fast.ops.attention` the attribute is the function; the module holds the custom ops.
attn_mod = importlib.import_module("vit_fast.ops.attention")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _qkv(batch: int, tokens: int, heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, tokens, 3 * heads * head_dim, device=device).requires_grad_(True)


# --------------------------------------------------------------------------------------------------
# numerics: output and dqkv against the fp64 reference


# (batch, T, heads, head_dim, dtype, scale): each T and head dim at least once, fp32 and fp16.
FAST_CASES = [
    (2, 1, 2, 16, F32, None),
    (1, 2, 2, 32, F16, None),
    (2, 50, 2, 72, F32, None),
    (1, 50, 2, 80, F16, 0.3),
    (1, 50, 1, 96, F16, None),
    (1, 50, 2, 16, F16, None),
    (1, 33, 1, 128, F32, 0.05),
    (2, 197, 1, 64, F16, None),
    (1, 197, 1, 80, F32, None),
    (2, 20, 1, 88, F16, None),
    (1, 21, 2, 112, F32, None),
]


@pytest.mark.parametrize(("batch", "tokens", "heads", "head_dim", "dtype", "scale"), FAST_CASES)
def test_numerics(device, triton_backend, batch, tokens, heads, head_dim, dtype, scale):
    qkv = _qkv(batch, tokens, heads, head_dim, device)
    check_numerics(attention, reference.attention, [qkv, heads], {"scale": scale}, dtype=dtype)


def test_numerics_bf16(device, triton_backend):
    # bf16 dots run upcast to fp32 in the interpreter (its bf16 dot is broken); same rule, k = 2.
    qkv = _qkv(2, 50, 2, 64, device)
    check_numerics(attention, reference.attention, [qkv, 2], dtype=BF16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "tokens", "heads", "head_dim", "dtype"),
    [(1, 257, 2, 64, F16), (1, 257, 1, 80, F32), (1, 577, 1, 64, F16), (1, 577, 1, 72, BF16)],
)
def test_numerics_long(device, triton_backend, batch, tokens, heads, head_dim, dtype):
    qkv = _qkv(batch, tokens, heads, head_dim, device)
    check_numerics(attention, reference.attention, [qkv, heads], dtype=dtype)


def test_noncontiguous_qkv(device, triton_backend):
    # Token-strided view of a wider buffer: read in place through strides, no copy.
    base = torch.randn(2, 2 * 37, 3 * 2 * 40 + 8, device=device)
    qkv = base[:, ::2, : 3 * 2 * 40].requires_grad_(False)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    leaf = qkv.detach().clone().requires_grad_(True)

    def strided(x, heads, **kw):
        # Rebuild the same strided layout around the cast leaf, so gradients still reach it.
        buf = x.new_zeros(x.shape[0], 2 * x.shape[1], x.shape[2] + 8)
        buf[:, ::2, : x.shape[2]] = x
        view = buf[:, ::2, : x.shape[2]]
        assert not view.is_contiguous() and view.stride(-1) == 1
        return attention(view, heads, **kw)

    check_numerics(strided, reference.attention, [leaf, 2], {"scale": 0.2}, dtype=F16)

    # Feature-transposed input (last-dim stride != 1) is made contiguous by the wrapper.
    t = torch.randn(1, 3 * 2 * 16, 9, device=device).transpose(1, 2)
    torch.testing.assert_close(attention(t, 2), reference.attention(t, 2), rtol=1e-5, atol=1e-5)


def test_lse_matches_logsumexp(device, triton_backend):
    batch, tokens, heads, head_dim = 2, 45, 3, 24
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, device=device)
    out, lse = attention_forward(qkv, heads, 0.25, 0.0, 0)
    q, k, _ = qkv.double().reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    want = torch.logsumexp(q @ k.transpose(-2, -1) * 0.25, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, tokens)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)
    assert out.is_contiguous() and out.shape == (batch, tokens, heads * head_dim)


def test_reference_backend_matches(device):
    # The custom op's "reference" backend (explicit fwd/bwd formulas, lse from logsumexp).
    qkv = _qkv(2, 19, 2, 24, device)
    with use_backend("reference"):
        check_numerics(attention, reference.attention, [qkv, 2], dtype=F32)
        _, lse = plain.attention_forward(qkv.detach(), 2, 0.3, 0.0, 0)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 19)


def test_backward_deterministic(device, triton_backend):
    qkv = _qkv(1, 70, 2, 40, device).detach().half()
    out, lse = attention_forward(qkv, 2, 40**-0.5, 0.1, 1234)
    grad = torch.randn_like(out)
    d1 = attention_backward(grad, qkv, out, lse, 2, 40**-0.5, 0.1, 1234)
    d2 = attention_backward(grad, qkv, out, lse, 2, 40**-0.5, 0.1, 1234)
    assert torch.equal(d1, d2)
    assert d1.shape == qkv.shape and d1.is_contiguous()


# --------------------------------------------------------------------------------------------------
# dropout


def test_dropout_kept_fraction(device, triton_backend):
    p = 0.3
    mask = dropout_keep_mask(2, 2, 197, p, 987, device)
    kept = mask.float().mean().item()
    # 77,618 draws: the binomial std of the kept fraction is 0.0016, so 0.01 is a 6-sigma bound.
    assert abs(kept - (1 - p)) < 0.01, kept
    # Heads and batches draw different masks; the same seed redraws the same mask.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    small = dropout_keep_mask(1, 2, 40, p, 987, device)
    assert torch.equal(small, dropout_keep_mask(1, 2, 40, p, 987, device))
    assert not torch.equal(small, dropout_keep_mask(1, 2, 40, p, 988, device))


def test_dropout_same_seed_same_result(device, triton_backend):
    qkv = torch.randn(1, 30, 3 * 2 * 16, device=device)
    torch.manual_seed(7)
    a = attention(qkv, 2, dropout_p=0.2)
    torch.manual_seed(7)
    b = attention(qkv, 2, dropout_p=0.2)
    c = attention(qkv, 2, dropout_p=0.2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, attention(qkv, 2))


@pytest.mark.parametrize(("tokens", "head_dim", "dtype"), [(37, 24, F32), (50, 64, F16)])
def test_dropout_numerics_same_mask(device, triton_backend, tokens, head_dim, dtype):
    """Forward and backward with dropout against plain torch math using the kernel's own mask."""
    batch, heads, p, seed = 2, 2, 0.25, 4242
    mask = dropout_keep_mask(batch, heads, tokens, p, seed, device)

    def masked_reference(qkv, num_heads, scale=None):
        head_dim_ = qkv.shape[-1] // (3 * num_heads)
        q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim_).permute(2, 0, 3, 1, 4).unbind(0)
        probs = ((q * head_dim_**-0.5) @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)
        probs = probs * mask.to(q.dtype) / (1 - p)
        return (probs @ v).transpose(1, 2).reshape(batch, tokens, -1)

    def fused(qkv, num_heads, scale=None):
        # The custom op with a fixed seed tensor: the same mask as dropout_keep_mask(seed).
        out, _ = attn_mod._attention_fwd_op(
            qkv, num_heads, head_dim**-0.5, p, torch.tensor([seed], dtype=torch.int64)
        )
        return out

    qkv = _qkv(batch, tokens, heads, head_dim, device)
    check_numerics(fused, masked_reference, [qkv, heads], dtype=dtype)


def test_dropout_reference_backend_consistent(device):
    # The reference backend regenerates its mask from the seed in backward: autograd through an
    # explicit computation with that mask must agree.
    qkv = torch.randn(1, 12, 3 * 2 * 8, device=device, requires_grad=True)
    seed = torch.tensor([99])
    with use_backend("reference"):
        out, _ = attn_mod._attention_fwd_op(qkv, 2, 0.5, 0.4, seed)
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    keep = plain.keep_mask((1, 2, 12, 12), 0.4, 99, qkv.device)
    q, k, v = qkv.reshape(1, 12, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) * keep / 0.6
    want = (probs @ v).transpose(1, 2).reshape(1, 12, 16)
    (want_d,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dqkv, want_d)


# --------------------------------------------------------------------------------------------------
# memory: what is saved for backward


def _saved_bytes(fn) -> tuple[int, list[tuple[int, ...]]]:
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), shapes


def test_saved_bytes_linear_in_tokens(device, triton_backend):
    batch, tokens, heads, head_dim = 2, 40, 2, 16
    width = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * width, device=device, requires_grad=True)
    ours, shapes = _saved_bytes(lambda: attention(qkv, heads, dropout_p=0.1))
    # qkv (the input, not copied) + out + fp32 lse + the int64 seed.
    expected = 4 * batch * tokens * 3 * width + 4 * batch * tokens * width + 4 * batch * heads * tokens + 8
    assert ours == expected, (ours, expected, shapes)
    assert all(s.count(tokens) < 2 for s in shapes), shapes  # nothing T x T
    eager, _ = _saved_bytes(lambda: reference.attention(qkv, heads, dropout_p=0.1))
    assert eager > ours + 4 * batch * heads * tokens * tokens  # eager keeps [B, H, T, T] tensors


# --------------------------------------------------------------------------------------------------
# torch.library registration, compile, autocast


def test_opcheck(device, triton_backend):
    qkv = torch.randn(1, 5, 3 * 2 * 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_fast.attention_fwd.default, (qkv, 2, 0.35, 0.0, None))
    torch.library.opcheck(torch.ops.vit_fast.attention_fwd.default, (qkv, 2, 0.35, 0.2, torch.tensor([5])))


class _Tiny(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, p: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads, self.p = heads, p

    def forward(self, x):
        return attention(self.qkv(x), self.heads, dropout_p=self.p if self.training else 0.0).sum(-1)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_compile_fullgraph(device, triton_backend, p):
    torch._dynamo.reset()
    model = _Tiny(p=p).to(device)
    x = torch.randn(2, 11, 32, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(x)
    got.sum().backward()
    g_compiled = model.qkv.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(3)
    want = model(x)
    want.sum().backward()
    if p == 0.0:
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_compiled, model.qkv.weight.grad)
    else:
        assert got.shape == want.shape and torch.isfinite(got).all()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_compile_inductor(device, triton_backend):
    torch._dynamo.reset()
    model = _Tiny().to(device).eval()
    x = torch.randn(1, 9, 32, device=device)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_compile_module_dynamic_autocast(device, triton_backend):
    # The module (qk_norm repack, in-kernel dropout) under autocast, dynamic shapes, no graph break.
    from vit_fast.nn.attention import Attention

    torch._dynamo.reset()
    m = Attention(32, num_heads=2, qk_norm=True, attn_drop=0.1).to(device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.autocast(device.type, dtype=BF16):
        y = compiled(torch.randn(2, 11, 32, device=device))
    assert y.dtype == BF16
    y.float().sum().backward()
    assert torch.isfinite(m.qkv.weight.grad).all() and m.qkv.weight.grad.abs().sum() > 0
    assert compiled(torch.randn(3, 17, 32, device=device)).shape == (3, 17, 32)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_autocast(device, triton_backend, dtype):
    qkv = torch.randn(1, 20, 3 * 2 * 16, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype):
        out = attention(qkv, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out, attention(qkv.detach().to(dtype), 2))
    out.float().sum().backward()
    assert qkv.grad is not None and qkv.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# bad input raises before any launch


@pytest.mark.parametrize(
    ("make", "kwargs", "err", "match"),
    [
        (lambda: torch.randn(10, 96), {}, ValueError, "qkv must be 3-D"),
        (lambda: torch.randn(1, 4, 100), {}, ValueError, "divisible by 3 \\* num_heads"),
        (lambda: torch.randn(1, 4, 3 * 2 * 264), {}, ValueError, "head dim 264"),
        (lambda: torch.randn(1, 4, 96), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        (lambda: torch.randn(1, 4, 96), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        (lambda: torch.randn(0, 4, 96), {}, ValueError, "qkv is empty"),
        (lambda: torch.randn(1, 0, 96), {}, ValueError, "qkv is empty"),
        (lambda: torch.ones(1, 4, 96, dtype=torch.int32), {}, TypeError, "qkv has dtype"),
        (lambda: [[1.0]], {}, TypeError, "qkv must be a torch.Tensor"),
        (lambda: torch.randn(1, 4, 96), {"scale": float("nan")}, ValueError, "scale"),
    ],
)
def test_bad_input(triton_backend, make, kwargs, err, match):
    with pytest.raises(err, match=match):
        attention(make(), 2, **kwargs)


def test_bad_num_heads():
    with pytest.raises(ValueError, match="num_heads"):
        attention(torch.randn(1, 4, 96), 0)


def test_backend_checks_grad_args(device, triton_backend):
    qkv = torch.randn(1, 4, 96, device=device)
    out, lse = attention_forward(qkv, 2, 0.25, 0.0, 0)
    with pytest.raises(TypeError, match="grad_out has dtype"):
        attention_backward(out.half(), qkv, out, lse, 2, 0.25, 0.0, 0)
    with pytest.raises(ValueError, match="grad_out is on meta"):
        attention_backward(out.to("meta"), qkv, out, lse, 2, 0.25, 0.0, 0)
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_backward(out, qkv, out, lse[:, :1], 2, 0.25, 0.0, 0)
    # The seed enters the backends through the custom op's seed tensor, checked there once.
    with pytest.raises(ValueError, match="seed"):
        attn_mod._attention_fwd_op(qkv, 2, 0.25, 0.1, torch.tensor([-1]))


# --------------------------------------------------------------------------------------------------
# the module


def test_module_matches_timm_layout(device, triton_backend):
    timm = pytest.importorskip("timm")
    from vit_fast.nn.attention import Attention

    torch.manual_seed(0)
    ours = Attention(48, num_heads=3, qkv_bias=True, qk_norm=True).to(device)
    theirs = timm.models.vision_transformer.Attention(
        48, num_heads=3, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm
    ).to(device)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 48, device=device, requires_grad=True)
    y = ours(x)
    y_ref = theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_module_qk_norm_and_dropout(device, triton_backend):
    from vit_fast.nn.attention import Attention

    m = Attention(32, num_heads=2, qk_norm=True, attn_drop=0.5).to(device)
    assert isinstance(m.q_norm, nn.LayerNorm) and m.q_norm.normalized_shape == (16,)
    x = torch.randn(1, 10, 32, device=device)
    m.eval()
    # Eval: no attention dropout; equals the explicit math with per-head LayerNorm on q and k.
    qkv = m.qkv(x).reshape(1, 10, 3, 2, 16)
    q = F.layer_norm(qkv[:, :, 0], (16,), m.q_norm.weight, m.q_norm.bias, m.q_norm.eps)
    k = F.layer_norm(qkv[:, :, 1], (16,), m.k_norm.weight, m.k_norm.bias, m.k_norm.eps)
    repacked = torch.stack((q, k, qkv[:, :, 2]), dim=2).reshape(1, 10, 96)
    want = m.proj(reference.attention(repacked, 2))
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    assert torch.equal(a, m(x))
    assert not torch.allclose(a, want)
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation of every shipped config


@pytest.mark.slow
def test_aot_all_configs_compile():
    from vit_fast.perf.aot import format_table, report

    results = report("attention")
    assert results, "no attention specs"
    assert {r.arch for r in results} == {80, 90}
    bad = [r for r in results if not r.ok]
    assert not bad, format_table(bad)


# --------------------------------------------------------------------------------------------------
# the C++ backend through the same custom op (present once vit_fast._C exports attention_forward)


def test_cpu_backend_through_custom_op():
    from vit_fast.ops.backend import has_cpu_kernel

    if not has_cpu_kernel("attention"):
        pytest.skip("vit_fast._C has no attention kernels in this build")
    qkv = _qkv(2, 50, 2, 40, torch.device("cpu"))
    with use_backend("cpu"):
        check_numerics(attention, reference.attention, [qkv, 2], dtype=F32)
        check_numerics(attention, reference.attention, [qkv, 2], {"scale": 0.2}, dtype=BF16)
        torch.manual_seed(5)
        a = attention(qkv, 2, dropout_p=0.3)
        torch.manual_seed(5)
        b = attention(qkv, 2, dropout_p=0.3)
        assert torch.equal(a, b) and not torch.equal(a, attention(qkv, 2))
        (g,) = torch.autograd.grad(a.sum(), qkv)
        assert torch.isfinite(g).all()
    # Automatic choice: fp16 on CPU is not a C++ dtype, so the op falls back to the reference.
    half = qkv.detach().half()
    torch.testing.assert_close(attention(half, 2), reference.attention(half, 2), rtol=2e-3, atol=2e-3)
