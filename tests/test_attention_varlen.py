"""Variable-length attention (issue #17) and 64-bit offsets (issue #12): packed qkv with
cu_seqlens and padded qkv with seq_lens, on the Triton (interpreted) and cpu backends, against the
per-sequence float64 reference; validation of the length tables; the IDX64 kernel variant.

Interpreter cost is per program, so the fast tier uses few heads and short sequences; a full
T = 197 sequence appears with one head, longer mixes run in the slow tier.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from vit_fast import reference
from vit_fast.kernels._common import needs_int64
from vit_fast.kernels.attention import dropout_keep_mask, force_int64_indexing
from vit_fast.ops import use_backend
from vit_fast.ops.attention import attention
from vit_fast.ops.backend import backend_module, has_cpu_kernel
from vit_fast.testing import check_numerics

attn_mod = importlib.import_module("vit_fast.ops.attention")
kern_mod = importlib.import_module("vit_fast.kernels.attention")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _has_cpu_varlen() -> bool:
    return has_cpu_kernel("attention") and hasattr(attn_mod.cpu_extension(), "attention_varlen_forward")


@pytest.fixture(params=["triton", "cpu", "reference"])
def backend(request):
    """Each test runs on the interpreted Triton kernels, the C++ extension and the plain-PyTorch
    reference backend of the custom op."""
    if request.param == "cpu" and not _has_cpu_varlen():
        pytest.skip("vit_fast._C has no varlen attention kernels in this build")
    with use_backend(request.param):
        yield request.param


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lengths: list[int], heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, requires_grad=True)
    return qkv, _cu(lengths)


# --------------------------------------------------------------------------------------------------
# numerics against the per-sequence fp64 reference (forward and dqkv)

# (lengths, heads, head_dim, dtype): lengths include 1, 0 (an empty sequence), and several per batch.
PACKED_CASES = [
    ([1, 17, 5], 2, 16, F32),
    ([3, 0, 40], 1, 72, F32),
    ([9, 1, 30], 2, 80, F16),
    ([25, 6], 1, 88, F32),
    ([12, 33], 1, 128, F16),
    ([197, 1], 1, 64, F16),
]


@pytest.mark.parametrize(("lengths", "heads", "head_dim", "dtype"), PACKED_CASES)
def test_packed_numerics(backend, lengths, heads, head_dim, dtype):
    if backend == "cpu" and dtype == F16:
        dtype = BF16  # the C++ kernels take fp32/bf16
    qkv, cu = _packed(lengths, heads, head_dim)
    check_numerics(attention, reference.attention, [qkv, heads], {"cu_seqlens": cu}, dtype=dtype)


@pytest.mark.parametrize(
    ("lengths", "tokens", "heads", "head_dim", "dtype"),
    [([1, 30, 12], 30, 2, 32, F32), ([7, 0, 19], 19, 1, 80, F16), ([20, 3], 20, 2, 96, BF16)],
)
def test_padded_numerics(backend, lengths, tokens, heads, head_dim, dtype):
    if backend == "cpu" and dtype == F16:
        dtype = BF16
    qkv = torch.randn(len(lengths), tokens, 3 * heads * head_dim, requires_grad=True)
    lens = torch.tensor(lengths)
    check_numerics(attention, reference.attention, [qkv, heads], {"seq_lens": lens}, dtype=dtype)


def test_padded_rows_zero_and_isolated(backend):
    # Padded query rows output exactly zero, padded qkv rows get exactly zero gradient, and the
    # values in the padding do not change anything else.
    heads, head_dim, tokens = 2, 16, 24
    lens = torch.tensor([5, 24, 1], dtype=torch.int32)
    qkv = torch.randn(3, tokens, 3 * heads * head_dim, requires_grad=True)
    out = attention(qkv, heads, seq_lens=lens)
    (g,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
        assert torch.equal(g[b, n:], torch.zeros_like(g[b, n:]))
    noisy = qkv.detach().clone()
    noisy[0, 5:] = 1e4
    torch.testing.assert_close(attention(noisy, heads, seq_lens=lens), out.detach(), rtol=0, atol=0)


def test_padded_equals_packed(backend):
    # The same sequences, packed or padded, with dropout: identical outputs (same masks per
    # sequence index), so the two layouts are interchangeable.
    heads, head_dim, lengths = 2, 16, [4, 11, 7]
    padded = torch.randn(3, 11, 3 * heads * head_dim)
    packed = torch.cat([padded[b, :n] for b, n in enumerate(lengths)])
    for p in (0.0, 0.3):
        torch.manual_seed(11)
        a = attention(padded, heads, seq_lens=torch.tensor(lengths), dropout_p=p)
        torch.manual_seed(11)
        b = attention(packed, heads, cu_seqlens=_cu(lengths), dropout_p=p)
        torch.testing.assert_close(torch.cat([a[i, :n] for i, n in enumerate(lengths)]), b, rtol=0, atol=0)


def test_backend_zero_fill_and_max_len(backend):
    """The contract's varlen arguments on each backend: with every row in a sequence (packed input),
    zero_fill=False gives the zero-filled answer; rows left out of every sequence are zero in out,
    lse and dqkv; the C++ backend rejects a sequence longer than max_len (it sizes scratch by it)."""
    mod = backend_module("attention", backend)
    qkv = torch.randn(12, 3 * 2 * 16)
    packed = torch.tensor([[0, 5], [5, 7]])
    filled = mod.attention_varlen_forward(qkv, packed, 7, True, 2, 0.25, 0.0, 0)
    unfilled = mod.attention_varlen_forward(qkv, packed, 7, False, 2, 0.25, 0.0, 0)
    for a, b in zip(filled, unfilled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gaps = torch.tensor([[0, 6], [4, 3]])  # rows 4, 5 and 9..11 belong to no sequence
    out, lse = mod.attention_varlen_forward(qkv, gaps, 4, True, 2, 0.25, 0.0, 0)
    dqkv = mod.attention_varlen_backward(torch.randn_like(out), qkv, out, lse, gaps, 4, 2, 0.25, 0.0, 0)
    for t in (out, lse.t(), dqkv):
        assert torch.equal(t[[4, 5, 9, 10, 11]], torch.zeros_like(t[[4, 5, 9, 10, 11]]))
        assert t[[0, 6, 8]].abs().sum() > 0
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="max_len"):
            mod.attention_varlen_forward(qkv, packed, 6, True, 2, 0.25, 0.0, 0)


def test_equal_lengths_match_fixed(backend):
    qkv = torch.randn(3, 13, 3 * 2 * 24)
    got = attention(qkv.reshape(39, -1), 2, cu_seqlens=_cu([13, 13, 13]))
    torch.testing.assert_close(got.reshape(3, 13, -1), attention(qkv, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lengths", "heads", "head_dim", "dtype"),
    [
        ([197, 1, 50, 197], 2, 64, F16),
        ([197, 120, 1], 2, 80, F32),
        ([100, 197], 3, 72, BF16),
        ([197, 64], 2, 88, F16),
    ],
)
def test_packed_numerics_long(backend, lengths, heads, head_dim, dtype):
    if backend == "cpu" and dtype == F16:
        dtype = BF16
    qkv, cu = _packed(lengths, heads, head_dim)
    check_numerics(attention, reference.attention, [qkv, heads], {"cu_seqlens": cu}, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# dropout and determinism


def test_dropout_replayed_triton():
    """Triton: sequence n's mask is the fixed-length mask of batch index n at T = its length;
    forward and backward against plain torch math with those masks."""
    heads, head_dim, p, seed, lengths = 2, 16, 0.25, 777, [9, 1, 20]
    cu = _cu(lengths)
    masks = [dropout_keep_mask(len(lengths), heads, n, p, seed)[i] for i, n in enumerate(lengths)]

    def masked_reference(qkv, num_heads, cu_seqlens):
        parts = []
        for i, n in enumerate(lengths):
            a = int(cu_seqlens[i])
            q, k, v = qkv[a : a + n].reshape(n, 3, num_heads, head_dim).permute(1, 2, 0, 3).unbind(0)
            probs = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(-1) * masks[i].to(q.dtype) / (1 - p)
            parts.append((probs @ v).transpose(0, 1).reshape(n, -1))
        return torch.cat(parts)

    def fused(qkv, num_heads, cu_seqlens):
        seed_t = torch.tensor([seed], dtype=torch.int64)
        out, _ = attn_mod._attention_varlen_fwd_op(
            qkv, cu_seqlens, False, num_heads, head_dim**-0.5, p, seed_t
        )
        return out

    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, requires_grad=True)
    with use_backend("triton"):
        check_numerics(fused, masked_reference, [qkv, heads, cu], dtype=F32)


def test_dropout_and_backward_deterministic(backend):
    heads, lengths = 2, [6, 15]
    qkv, cu = _packed(lengths, heads, 16)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        out = attention(qkv, heads, cu_seqlens=cu, dropout_p=0.2)
        (g,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
        runs.append((out, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], attention(qkv, heads, cu_seqlens=cu))


# --------------------------------------------------------------------------------------------------
# bad inputs: rejected with the argument's name before any launch


def _launch_forbidden(*args, **kwargs):
    raise AssertionError("a kernel was launched for a bad input")


BAD = [
    # (qkv shape, kwargs, error, message)
    (
        (10, 96),
        {"cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.float32)},
        TypeError,
        "cu_seqlens has dtype",
    ),
    (
        (10, 96),
        {"cu_seqlens": torch.tensor([[0, 10]], dtype=torch.int32)},
        ValueError,
        "cu_seqlens must be 1-D",
    ),
    (
        (10, 96),
        {"cu_seqlens": torch.tensor([1, 10], dtype=torch.int32)},
        ValueError,
        "cu_seqlens must start at 0",
    ),
    ((10, 96), {"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, ValueError, "non-decreasing"),
    ((10, 96), {"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)}, ValueError, "end at total_tokens"),
    (
        (10, 96),
        {"cu_seqlens": torch.tensor([0, 4, 11], dtype=torch.int32)},
        ValueError,
        "end at total_tokens",
    ),
    ((10, 96), {"cu_seqlens": torch.tensor([0], dtype=torch.int32)}, ValueError, "cu_seqlens must hold"),
    ((10, 96), {"cu_seqlens": [0, 10]}, TypeError, "cu_seqlens must be a torch.Tensor"),
    ((1, 10, 96), {"cu_seqlens": torch.tensor([0, 10], dtype=torch.int32)}, ValueError, "qkv must be 2-D"),
    ((2, 8, 96), {"seq_lens": torch.tensor([3, 9])}, ValueError, r"seq_lens must lie in \[0, T=8\]"),
    ((2, 8, 96), {"seq_lens": torch.tensor([-1, 2])}, ValueError, "seq_lens must lie in"),
    ((2, 8, 96), {"seq_lens": torch.tensor([3, 4, 5])}, ValueError, r"seq_lens must have shape \[B\]"),
    ((2, 8, 96), {"seq_lens": torch.tensor([3.0, 4.0])}, TypeError, "seq_lens has dtype"),
    ((16, 96), {"seq_lens": torch.tensor([3, 4])}, ValueError, "qkv must be 3-D"),
    (
        (2, 8, 96),
        {"seq_lens": torch.tensor([3, 4]), "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)},
        ValueError,
        "at most one of cu_seqlens",
    ),
    ((10, 100), {"cu_seqlens": torch.tensor([0, 10], dtype=torch.int32)}, ValueError, "divisible by 3"),
    ((0, 96), {"cu_seqlens": torch.tensor([0, 0], dtype=torch.int32)}, ValueError, "qkv is empty"),
    (
        (10, 96),
        {"cu_seqlens": torch.tensor([0, 10], dtype=torch.int32), "dropout_p": 1.5},
        ValueError,
        "dropout_p",
    ),
]


@pytest.mark.parametrize(("shape", "kwargs", "err", "match"), BAD)
@pytest.mark.parametrize("name", ["triton", "cpu", "reference"])
def test_bad_varlen_input(monkeypatch, name, shape, kwargs, err, match):
    if name == "cpu" and not _has_cpu_varlen():
        pytest.skip("no C++ varlen kernels")
    monkeypatch.setattr(backend_module("attention", name), "attention_varlen_forward", _launch_forbidden)
    with use_backend(name), pytest.raises(err, match=match):
        attention(torch.randn(shape), 2, **kwargs)


def test_bad_varlen_dropout_length():
    # A sequence longer than the int32 Philox counter allows is rejected before any launch.
    qkv = torch.empty(50000, 96, device="meta")
    with pytest.raises(ValueError, match="T\\*T < 2\\*\\*31"):
        attn_mod._seq_tables(torch.tensor([0, 50000]), False, tuple(qkv.shape), 0.1)


# --------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def test_opcheck_varlen(backend):
    padded = torch.randn(2, 7, 3 * 2 * 8, requires_grad=True)
    op = torch.ops.vit_fast.attention_varlen_fwd.default
    torch.library.opcheck(op, (padded, torch.tensor([7, 2]), True, 2, 0.35, 0.2, torch.tensor([5])))


@pytest.mark.slow
def test_opcheck_varlen_packed(backend):
    qkv = torch.randn(13, 3 * 2 * 8, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vit_fast.attention_varlen_fwd.default, (qkv, _cu([4, 9]), False, 2, 0.35, 0.0, None)
    )


class _Packed(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x, cu_seqlens):
        return attention(self.qkv(x), self.heads, cu_seqlens=cu_seqlens).sum(-1)


def test_compile_fullgraph_varlen(backend):
    torch._dynamo.reset()
    model = _Packed()
    x, cu = torch.randn(19, 32), _cu([1, 11, 7])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, cu)
    got.sum().backward()
    g_compiled = model.qkv.weight.grad.clone()
    model.zero_grad()
    want = model(x, cu)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, model.qkv.weight.grad)
    assert torch._dynamo.explain(model)(x, cu).graph_break_count == 0


def test_compile_fullgraph_padded_dynamic(backend):
    # seq_lens under dynamic shapes: new batch sizes and lengths reuse the graph without breaks.
    torch._dynamo.reset()
    qkv_proj = nn.Linear(32, 96)

    def fn(x, lens):
        return attention(qkv_proj(x), 2, seq_lens=lens)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, tokens, lens in ((2, 9, [9, 3]), (3, 12, [1, 12, 0])):
        x, lens_t = torch.randn(batch, tokens, 32), torch.tensor(lens)
        torch.testing.assert_close(compiled(x, lens_t), fn(x, lens_t))


# --------------------------------------------------------------------------------------------------
# 64-bit offsets (issue #12): forced at small shapes, selected automatically past 2**31


def _spy_idx64(monkeypatch) -> list[bool]:
    seen: list[bool] = []
    real = kern_mod.tuned_kernel

    def spy(*args):
        launcher = real(*args)

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append(kwargs["IDX64"])
                    return launcher[grid](*args, **kwargs)

                return run

        return _Grid()

    monkeypatch.setattr(kern_mod, "tuned_kernel", spy)
    return seen


@pytest.mark.parametrize("varlen", [False, True])
def test_int64_offsets_forced(monkeypatch, triton_backend, varlen):
    seen = _spy_idx64(monkeypatch)
    heads, head_dim = 2, 24
    with force_int64_indexing():
        if varlen:
            qkv, cu = _packed([7, 1, 30], heads, head_dim)
            check_numerics(attention, reference.attention, [qkv, heads], {"cu_seqlens": cu}, dtype=F16)
        else:
            qkv = torch.randn(2, 37, 3 * heads * head_dim, requires_grad=True)
            check_numerics(attention, reference.attention, [qkv, heads], dtype=F32)
    assert seen == [True, True, True], seen  # fwd, dk/dv and dq all ran the IDX64 variant
    seen.clear()
    attention(torch.randn(1, 5, 3 * heads * head_dim), heads)
    assert seen == [False]


def test_int64_selected_past_2_31():
    # Sizes and strides only: meta and fake tensors, nothing allocated.
    big = torch.empty(1, 2**20, 2304, device="meta")  # 2.4e9 elements: the overflow case
    assert needs_int64(big)
    assert not needs_int64(torch.empty(1, 2**19, 2304, device="meta"))
    assert not needs_int64(torch.empty(1, 2**20, 768, device="meta"))  # its output fits
    # A strided view spanning past 2**31 with few elements still needs it.
    assert needs_int64(torch.empty(2, 4, 96, device="meta").as_strided((2, 4, 96), (2**31, 96, 1)))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        packed = torch.empty(2**21 + 7, 1152)
        assert needs_int64(packed)
        assert not needs_int64(torch.empty(2**20, 1152))


def test_fake_shapes_past_2_31():
    # The custom ops' fake kernels give the right shapes for a huge packed batch without allocating.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2**20, 2304, dtype=BF16, requires_grad=True)
        cu = torch.empty(5, dtype=torch.int32)
        out, lse = attn_mod._attention_varlen_fwd_op(qkv, cu, False, 12, 0.125, 0.0, None)
        assert out.shape == (2**20, 768) and lse.shape == (12, 2**20) and lse.dtype == F32


# --------------------------------------------------------------------------------------------------
# head-dim padding (issue #17): executed vs useful FLOPs


def test_head_dim_padding_at_most_15_percent():
    rows = {r["head_dim"]: r for r in kern_mod.head_dim_flops_report((64, 72, 80, 88, 96, 112, 128))}
    for hd, r in rows.items():
        assert r["wasted"] <= 0.15, (hd, r)
        block_d, tail_d = kern_mod.head_split(hd)
        assert block_d + tail_d >= hd and tail_d in (0, 16, 32) and block_d & (block_d - 1) == 0
    assert rows[80]["executed"] == "64+16" and rows[88]["executed"] == "64+32"
    # Before the split, 80 ran 128 columns (37.5% wasted); the table says what runs now.
    assert "64+16" in kern_mod.format_head_dim_flops()


def test_cost_model_counts_only_real_tokens():
    from vit_fast.perf import cost

    qkv, cu = torch.randn(1 + 20 + 5, 3 * 32), _cu([1, 20, 5])
    args = (qkv, cu, False, 2, 0.25, 0.0, None)
    fwd = cost.count_flops(torch.ops.vit_fast.attention_varlen_fwd.default, args, {}, None)
    assert fwd == 4 * (1 + 400 + 25) * 32
    padded = (torch.randn(2, 10, 96), torch.tensor([3, 10]), True, 2, 0.25, 0.0, None)
    assert cost.count_flops(torch.ops.vit_fast.attention_varlen_fwd.default, padded, {}, None) == 4 * 109 * 32
    bwd_args = (None, qkv, None, None, cu, False, 2, 0.25, 0.0, None, "triton")
    assert (
        cost.count_flops(torch.ops.vit_fast.attention_varlen_bwd.default, bwd_args, {}, None) == fwd * 5 // 2
    )
