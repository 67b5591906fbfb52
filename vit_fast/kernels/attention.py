"""Flash attention for ViT shapes: Triton kernels reading q, k, v straight from the packed qkv.

Layout. qkv is `[B, T, 3*D]` (timm's qkv Linear output, last dim contiguous, other strides free);
head h reads q at columns `h*hd`, k at `D + h*hd`, v at `2*D + h*hd`. The forward writes the output
with heads merged, `[B, T, D]`, and the fp32 natural log-sum-exp `lse [B, H, T]` of the scaled
scores. The backward writes `dqkv [B, T, 3*D]` in the same packed layout: the dk/dv kernel and the
dq kernel own disjoint columns, so nothing is zeroed first and no atomics are needed (bit-identical
gradients run to run).

Every kernel runs on a 2-D grid: axis 0 is `b * H + h` (axis 0 has no 65535 limit, so large
batches are fine), axis 1 tiles the tokens. The head dim runs as a power-of-two main part BLOCK_D
plus an optional 16/32-wide tail TAIL_D (80 = 64 + 16, 88 and 96 = 64 + 32; see `head_split`), each
with its own dots, and masked loads cover what is left (72 in 64 + 16); token tails are masked to
`-inf` scores (forward) or zero probabilities (backward).

Variable length (VARLEN): qkv is rows [R, 3*D] and two int32 tables give each sequence's first row
and length; axis 0 is then `n * H + h` over sequences, axis 1 covers the longest sequence and tiles
past a sequence's end return at once, so the work is sum(len^2). lse/delta are [H, R] there.

64-bit offsets (IDX64): `row * stride` products are int32 unless the launcher sees an element
offset that can reach 2**31 (then rows are widened to int64 first); batch and sequence bases are
always int64.

Dropout. The keep-mask element for (b, h, query i, key j) is `rand(seed + (b*H + h) * 2**32,
i*T + j) >= p`: the Philox key carries the head and the counter the position, so masks are
regenerated identically in the forward, both backward kernels and the debug mask kernel
(`_keep_mask` is the one place that formula lives). In varlen mode b is the sequence index and T its
length. Counters are 32-bit, so T*T must fit in int32.

Backward passes. The delta pre-pass, then one kernel in two passes (DKDV constexpr: dk/dv over key
blocks, dq over query blocks) that share arguments, setup and tile math.

This module is the Triton backend of the attention family: kernels, launch-config tables, the
launchers under the contract's names (`attention_forward`, `attention_backward`,
`attention_varlen_forward`, `attention_varlen_backward`; see vit_fast.ops.contract and
docs/backend_contract.md), the debug `dropout_keep_mask`, the head-dim FLOP report and
`aot_specs()`. Validation, backend choice and autograd live in `vit_fast.ops.attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from vit_fast.kernels._common import (
    ARCHS,
    KernelSpec,
    arch_key,
    kernel_parameters,
    needs_int64,
    triton_interpreting,
)

# Module globals read inside @triton.jit must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter only): the interpreter's dot mishandles
    bf16 operands, so low-precision operands are widened first (exact: the values are already
    rounded to the input dtype). IEEE: fp32 inputs must not silently drop to tf32 on the GPU."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p):
    """Boolean [BLOCK_M, BLOCK_N] keep-mask of attention dropout for rows offs_m, cols offs_n of
    head `bh` (= b*H + h) of a sequence of T tokens. The head goes into the high 32 bits of the
    Philox key (the wrapper draws seed < 2**31), the in-head position into the counter."""
    head_seed = seed + bh.to(tl.int64) * 4294967296
    counter = offs_m[:, None] * T + offs_n[None, :]
    return tl.rand(head_seed, counter) >= dropout_p


@triton.jit
def _seq(SeqStart, SeqLen, s, T, VARLEN: tl.constexpr):
    """(start, length) of sequence s. VARLEN: its first row (int64) and length from the tables.
    Fixed length: start is the batch index s itself (offsets then go through the batch strides)."""
    if VARLEN:
        start = tl.load(SeqStart + s).to(tl.int64)
        length = tl.load(SeqLen + s)
    else:
        start = s.to(tl.int64)
        length = T
    return start, length


@triton.jit
def _program(SeqStart, SeqLen, T, H, VARLEN: tl.constexpr):
    """(bh, h, start, L, tile) of this program: grid axis 0 is (sequence or batch) * H + head, axis 1
    the tile index; start and L as `_seq` gives them."""
    bh = tl.program_id(0)
    h = bh % H
    start, L = _seq(SeqStart, SeqLen, bh // H, T, VARLEN)
    return bh, h, start, L, tl.program_id(1)


@triton.jit
def _block(first, BLOCK: tl.constexpr, L, IDX64: tl.constexpr):
    """Positions first.. of one BLOCK-row tile of a sequence of L rows: (offsets, valid, row indices
    for `rows * stride`)."""
    offs = first + tl.arange(0, BLOCK)
    return offs, offs < L, _rows(offs, IDX64)


@triton.jit
def _off(start, stride_b, stride_t, VARLEN: tl.constexpr):
    """Element offset (int64) of the first row of a sequence in one tensor."""
    if VARLEN:
        off = start * stride_t
    else:
        off = start * stride_b
    return off


@triton.jit
def _lse_off(start, h, H, T, stride_lh, VARLEN: tl.constexpr):
    """Offset of (sequence, head) row 0 in lse / delta: [H, rows] for varlen, [B, H, T] otherwise."""
    if VARLEN:
        off = h.to(tl.int64) * stride_lh + start
    else:
        off = (start * H + h) * T
    return off


@triton.jit
def _rows(offs, IDX64: tl.constexpr):
    """Row indices as used in `rows * stride`: widened to int64 when an offset can pass 2**31."""
    if IDX64:
        r = offs.to(tl.int64)
    else:
        r = offs
    return r


@triton.jit
def _ld(base, rows, stride, row_valid, COL0: tl.constexpr, WIDTH: tl.constexpr, head_dim):
    """[rows, WIDTH] head-dim columns COL0.. of a row-major operand; rows and columns past the end
    (row_valid false, column >= head_dim) read as zero, which adds nothing to any dot product."""
    cols = COL0 + tl.arange(0, WIDTH)
    mask = row_valid[:, None] & (cols < head_dim)[None, :]
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _st(base, rows, stride, row_valid, COL0: tl.constexpr, WIDTH: tl.constexpr, head_dim, value):
    cols = COL0 + tl.arange(0, WIDTH)
    mask = row_valid[:, None] & (cols < head_dim)[None, :]
    tl.store(base + rows[:, None] * stride + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# forward
#
# `seed` is excluded from value specialisation: a fresh seed every step must not pick a different
# compiled variant (seed == 1, seed % 16 == 0) and trigger a recompile.
#
# Head dim split: columns [0, BLOCK_D) are the power-of-two main part, [BLOCK_D, BLOCK_D + TAIL_D)
# an optional 16- or 32-wide tail (TAIL_D = 0: none), each with its own dots and accumulators, so
# head dim 80 runs 64 + 16 columns instead of 128.


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    QKV,
    Out,
    Lse,
    SeqStart,
    SeqLen,
    stride_qb,
    stride_qt,
    stride_ob,
    stride_ot,
    stride_lh,
    T,
    H,
    D,
    head_dim,
    scale_log2,
    dropout_p,
    seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    bh, h, start, L, pid_m = _program(SeqStart, SeqLen, T, H, VARLEN)
    # Varlen grids cover the longest sequence; tiles past this one's end have nothing to do.
    if pid_m * BLOCK_M >= L:
        return

    offs_m, m_valid, rows_m = _block(pid_m * BLOCK_M, BLOCK_M, L, IDX64)

    base = QKV + _off(start, stride_qb, stride_qt, VARLEN) + h * head_dim
    q = _ld(base, rows_m, stride_qt, m_valid, 0, BLOCK_D, head_dim)
    # Running max (log2 units), running denominator, unnormalised output: all fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TAIL_D > 0:
        q_t = _ld(base, rows_m, stride_qt, m_valid, BLOCK_D, TAIL_D, head_dim)
        acc_t = tl.zeros([BLOCK_M, TAIL_D], tl.float32)
    inv_keep = 1.0 / (1.0 - dropout_p)

    for start_n in range(0, L, BLOCK_N):
        offs_n, n_valid, rows_n = _block(start_n, BLOCK_N, L, IDX64)
        k = _ld(base + D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
        v = _ld(base + 2 * D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
        s = _mm(q, tl.trans(k), UPCAST, IEEE)
        if TAIL_D > 0:
            k_t = _ld(base + D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
            s += _mm(q_t, tl.trans(k_t), UPCAST, IEEE)
        s = s * scale_log2
        # Every key block holds at least one valid column (start_n < L), so m_new stays finite.
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        # The softmax denominator uses the probabilities before dropout (lse is pre-dropout).
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, bh, offs_m, offs_n, L, dropout_p)
            p = tl.where(keep, p * inv_keep, 0.0)
        p = p.to(v.dtype)
        acc = acc * alpha[:, None] + _mm(p, v, UPCAST, IEEE)
        if TAIL_D > 0:
            v_t = _ld(base + 2 * D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
            acc_t = acc_t * alpha[:, None] + _mm(p, v_t, UPCAST, IEEE)
        m_i = m_new

    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(Lse + _lse_off(start, h, H, T, stride_lh, VARLEN) + offs_m, lse, mask=m_valid)
    o_base = Out + _off(start, stride_ob, stride_ot, VARLEN) + h * head_dim
    _st(o_base, rows_m, stride_ot, m_valid, 0, BLOCK_D, head_dim, acc / l_i[:, None])
    if TAIL_D > 0:
        _st(o_base, rows_m, stride_ot, m_valid, BLOCK_D, TAIL_D, head_dim, acc_t / l_i[:, None])


# --------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    dOut,
    Delta,
    SeqStart,
    SeqLen,
    stride_ob,
    stride_ot,
    stride_gb,
    stride_gt,
    stride_lh,
    T,
    H,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_D: tl.constexpr,
    VARLEN: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Delta[b, h, t] = sum_d dO * O (fp32): the softmax-backward row term, computed once so the
    dk/dv kernel (which walks over query rows) does not need whole rows of P."""
    _, h, start, L, pid_m = _program(SeqStart, SeqLen, T, H, VARLEN)
    if pid_m * BLOCK_M >= L:
        return
    offs_m, m_valid, rows_m = _block(pid_m * BLOCK_M, BLOCK_M, L, IDX64)
    o_base = Out + _off(start, stride_ob, stride_ot, VARLEN) + h * head_dim
    g_base = dOut + _off(start, stride_gb, stride_gt, VARLEN) + h * head_dim
    o = _ld(o_base, rows_m, stride_ot, m_valid, 0, BLOCK_D, head_dim)
    do = _ld(g_base, rows_m, stride_gt, m_valid, 0, BLOCK_D, head_dim)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if TAIL_D > 0:
        o_t = _ld(o_base, rows_m, stride_ot, m_valid, BLOCK_D, TAIL_D, head_dim)
        do_t = _ld(g_base, rows_m, stride_gt, m_valid, BLOCK_D, TAIL_D, head_dim)
        delta += tl.sum(o_t.to(tl.float32) * do_t.to(tl.float32), 1)
    tl.store(Delta + _lse_off(start, h, H, T, stride_lh, VARLEN) + offs_m, delta, mask=m_valid)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_kernel(
    QKV,
    dOut,
    Lse,
    Delta,
    dQKV,
    SeqStart,
    SeqLen,
    stride_qb,
    stride_qt,
    stride_gb,
    stride_gt,
    stride_db,
    stride_dt,
    stride_lh,
    T,
    H,
    D,
    head_dim,
    scale,
    scale_log2,
    dropout_p,
    seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DKDV: tl.constexpr,
):
    """The two gradient passes over one (sequence, head), which share their arguments, setup and
    tile math; each writes its own columns of dqkv, so neither zero fill nor atomics are needed.

    DKDV: one program per key block keeps k, v and the dk, dv accumulators on chip and walks over
    all query blocks, recomputing P from the saved lse. Otherwise (dq): one program per query block
    walks over all key blocks accumulating dq on chip."""
    bh, h, start, L, pid = _program(SeqStart, SeqLen, T, H, VARLEN)
    if pid * (BLOCK_N if DKDV else BLOCK_M) >= L:
        return
    base = QKV + _off(start, stride_qb, stride_qt, VARLEN) + h * head_dim
    g_base = dOut + _off(start, stride_gb, stride_gt, VARLEN) + h * head_dim
    d_base = dQKV + _off(start, stride_db, stride_dt, VARLEN) + h * head_dim
    row_base = _lse_off(start, h, H, T, stride_lh, VARLEN)
    inv_keep = 1.0 / (1.0 - dropout_p)

    if DKDV:
        offs_n, n_valid, rows_n = _block(pid * BLOCK_N, BLOCK_N, L, IDX64)

        k = _ld(base + D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
        v = _ld(base + 2 * D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if TAIL_D > 0:
            k_t = _ld(base + D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
            v_t = _ld(base + 2 * D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
            dk_t = tl.zeros([BLOCK_N, TAIL_D], tl.float32)
            dv_t = tl.zeros([BLOCK_N, TAIL_D], tl.float32)

        for start_m in range(0, L, BLOCK_M):
            offs_m, m_valid, rows_m = _block(start_m, BLOCK_M, L, IDX64)
            q = _ld(base, rows_m, stride_qt, m_valid, 0, BLOCK_D, head_dim)
            do = _ld(g_base, rows_m, stride_gt, m_valid, 0, BLOCK_D, head_dim)
            lse = tl.load(Lse + row_base + offs_m, mask=m_valid, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)

            s = _mm(q, tl.trans(k), UPCAST, IEEE)
            dp = _mm(do, tl.trans(v), UPCAST, IEEE)
            if TAIL_D > 0:
                q_t = _ld(base, rows_m, stride_qt, m_valid, BLOCK_D, TAIL_D, head_dim)
                do_t = _ld(g_base, rows_m, stride_gt, m_valid, BLOCK_D, TAIL_D, head_dim)
                s += _mm(q_t, tl.trans(k_t), UPCAST, IEEE)
                dp += _mm(do_t, tl.trans(v_t), UPCAST, IEEE)
            p = tl.exp2(s * scale_log2 - (lse * LOG2E)[:, None])
            # Padded rows/cols must contribute exactly nothing.
            p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, bh, offs_m, offs_n, L, dropout_p)
                pd = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                pd = p
            pd_t = tl.trans(pd).to(do.dtype)
            ds_t = tl.trans(p * (dp - delta[:, None])).to(q.dtype)
            dv += _mm(pd_t, do, UPCAST, IEEE)
            dk += _mm(ds_t, q, UPCAST, IEEE)
            if TAIL_D > 0:
                dv_t += _mm(pd_t, do_t, UPCAST, IEEE)
                dk_t += _mm(ds_t, q_t, UPCAST, IEEE)

        _st(d_base + D, rows_n, stride_dt, n_valid, 0, BLOCK_D, head_dim, dk * scale)
        _st(d_base + 2 * D, rows_n, stride_dt, n_valid, 0, BLOCK_D, head_dim, dv)
        if TAIL_D > 0:
            _st(d_base + D, rows_n, stride_dt, n_valid, BLOCK_D, TAIL_D, head_dim, dk_t * scale)
            _st(d_base + 2 * D, rows_n, stride_dt, n_valid, BLOCK_D, TAIL_D, head_dim, dv_t)
    else:
        offs_m, m_valid, rows_m = _block(pid * BLOCK_M, BLOCK_M, L, IDX64)

        q = _ld(base, rows_m, stride_qt, m_valid, 0, BLOCK_D, head_dim)
        do = _ld(g_base, rows_m, stride_gt, m_valid, 0, BLOCK_D, head_dim)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if TAIL_D > 0:
            q_t = _ld(base, rows_m, stride_qt, m_valid, BLOCK_D, TAIL_D, head_dim)
            do_t = _ld(g_base, rows_m, stride_gt, m_valid, BLOCK_D, TAIL_D, head_dim)
            dq_t = tl.zeros([BLOCK_M, TAIL_D], tl.float32)
        lse2 = tl.load(Lse + row_base + offs_m, mask=m_valid, other=0.0) * LOG2E
        delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)

        for start_n in range(0, L, BLOCK_N):
            offs_n, n_valid, rows_n = _block(start_n, BLOCK_N, L, IDX64)
            k = _ld(base + D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
            v = _ld(base + 2 * D, rows_n, stride_qt, n_valid, 0, BLOCK_D, head_dim)
            s = _mm(q, tl.trans(k), UPCAST, IEEE)
            dp = _mm(do, tl.trans(v), UPCAST, IEEE)
            if TAIL_D > 0:
                k_t = _ld(base + D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
                v_t = _ld(base + 2 * D, rows_n, stride_qt, n_valid, BLOCK_D, TAIL_D, head_dim)
                s += _mm(q_t, tl.trans(k_t), UPCAST, IEEE)
                dp += _mm(do_t, tl.trans(v_t), UPCAST, IEEE)
            p = tl.exp2(s * scale_log2 - lse2[:, None])
            p = tl.where(n_valid[None, :], p, 0.0)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, bh, offs_m, offs_n, L, dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += _mm(ds, k, UPCAST, IEEE)
            if TAIL_D > 0:
                dq_t += _mm(ds, k_t, UPCAST, IEEE)

        _st(d_base, rows_m, stride_dt, m_valid, 0, BLOCK_D, head_dim, dq * scale)
        if TAIL_D > 0:
            _st(d_base, rows_m, stride_dt, m_valid, BLOCK_D, TAIL_D, head_dim, dq_t * scale)


# --------------------------------------------------------------------------------------------------
# debug: materialise the dropout keep-mask (tests only, small shapes)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Mask, T, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mask[bh, i, j] = 1 where the attention kernels keep probability (i, j) of head bh."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p)
    ptrs = Mask + bh.to(tl.int64) * T * T + offs_m[:, None] * T + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m < T)[:, None] & (offs_n < T)[None, :])


# --------------------------------------------------------------------------------------------------
# launch configurations
#
# Each shipped GPU config is (BLOCK_M, BLOCK_N, num_warps, num_stages) for a given BLOCK_D and
# architecture; autotune picks among those that apply to the launch (see `configs_for`). Every entry
# here is compiled by `aot_specs()` for its archs, so what autotune can choose is what was checked
# for spills and shared memory. Under the interpreter a single small tile keeps tests fast.

_Tile = tuple[int, int, int, int]

# Chosen from `aot` sweeps (bf16 and fp16, with dropout, which costs the most registers): for each
# (kernel, BLOCK_D, arch) the tiles that compile with 0 spills, larger tiles first. Head dims up to
# 32 reuse the BLOCK_D = 64 tiles (smaller tiles of the same shape need fewer registers).
_FWD_64 = [(128, 64, 8, 2), (64, 64, 4, 2)]
# sm_80 (64, 64, 4 warps) spills 32 bytes with dropout since the kernels grew the varlen/tail
# arguments; (32, 64, 8 warps) compiles clean.
_DKDV_64 = {80: [(32, 64, 8, 2)], 90: [(32, 64, 8, 2), (64, 64, 8, 1)]}
_DQ_64 = {80: [(64, 64, 4, 2), (128, 32, 8, 2)], 90: [(64, 64, 8, 2), (128, 32, 8, 2)]}
# ptxas caps (128, 32, 8 warps) at 128 registers for BLOCK_D = 32 on sm_80 and spills 8 bytes.
_DQ_32 = {80: [(64, 64, 4, 2), (64, 32, 4, 2)], 90: _DQ_64[90]}

# Split head dims (64 + 16, 64 + 32) start from the BLOCK_D = 128 tiles (fewer columns, same shape);
# the AOT sweep moved two of them: the forward's (64, 64, 4 warps) spills 8-16 bytes with dropout
# and 64-bit offsets, and dq's (64, 32, 4 warps) spills 8-32 bytes at 64 + 32 with dropout.
_FWD_TAIL = {80: [(64, 32, 4, 2)], 90: [(128, 64, 8, 2)]}
_DQ_TAIL32 = {80: [(64, 64, 8, 2), (64, 32, 8, 2)], 90: [(64, 64, 8, 2), (64, 32, 8, 2)]}

#: kernel -> table key (BLOCK_D; 80 for 64 + 16, 96 for 64 + 32) -> arch -> tiles
#: (BLOCK_M, BLOCK_N, num_warps, num_stages)
GPU_CONFIGS: dict[str, dict[int, dict[int, list[_Tile]]]] = {
    "fwd": {
        **{bd: {80: _FWD_64, 90: _FWD_64} for bd in (32, 64)},
        # sm_80 (64, 64) tiles spill 8 bytes here since the varlen/tail arguments (AOT sweep).
        128: {80: [(64, 32, 4, 2)], 90: [(128, 64, 8, 2), (64, 64, 4, 2)]},
        256: {80: [(64, 32, 8, 1)], 90: [(32, 32, 4, 1)]},
    },
    "dkdv": {
        **{bd: _DKDV_64 for bd in (32, 64)},
        128: {80: [(32, 64, 8, 2), (32, 32, 4, 2)], 90: [(32, 64, 8, 2), (32, 32, 4, 2)]},
        256: {80: [(32, 32, 8, 1)], 90: [(32, 32, 8, 1)]},
    },
    "dq": {
        32: _DQ_32,
        64: _DQ_64,
        128: {80: [(64, 32, 4, 2), (64, 64, 8, 2)], 90: [(64, 32, 4, 2)]},
        256: {80: [(32, 32, 8, 1), (16, 32, 4, 1)], 90: [(32, 32, 8, 1), (32, 64, 8, 1)]},
    },
}
for _key in (80, 96):
    GPU_CONFIGS["fwd"][_key] = _FWD_TAIL
    GPU_CONFIGS["dkdv"][_key] = GPU_CONFIGS["dkdv"][128]
GPU_CONFIGS["dq"][80] = GPU_CONFIGS["dq"][128]
GPU_CONFIGS["dq"][96] = _DQ_TAIL32
# Variant overrides from the AOT sweep (kernel, table key, arch) -> tiles. The IDX64 variants hold
# int64 row offsets (more registers): tiles that spill there are replaced; three tiles spill
# 8-16 bytes in the VARLEN variant (sequence-table loads) on sm_80 and are dropped there.
_IDX64_TILES: dict[tuple[str, int, int], list[_Tile]] = {
    ("fwd", 128, 80): [(64, 64, 8, 2)],
    ("fwd", 128, 90): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("fwd", 256, 80): [(32, 32, 4, 1)],
    ("fwd", 32, 80): [(64, 64, 4, 2)],
    ("dkdv", 64, 80): [(64, 64, 4, 2)],
    ("dq", 128, 80): [(64, 64, 8, 2)],
    ("dq", 256, 80): [(16, 32, 4, 1)],
    ("dq", 256, 90): [(32, 32, 8, 1)],
    **{("dkdv", key, arch): [(32, 64, 8, 2)] for key in (80, 96) for arch in (80, 90)},
}
_VARLEN_TILES: dict[tuple[str, int, int], list[_Tile]] = {
    ("fwd", 128, 80): [(64, 32, 4, 2)],
    ("fwd", 256, 80): [(64, 32, 8, 1)],
    ("dkdv", 64, 80): [(32, 64, 8, 2)],
}


def tiles_for(kernel: str, key: int, arch: int, varlen: bool = False, idx64: bool = False) -> list[_Tile]:
    """The shipped tiles of one (kernel, table key, arch) in one (VARLEN, IDX64) variant."""
    if idx64 and (kernel, key, arch) in _IDX64_TILES:
        return _IDX64_TILES[(kernel, key, arch)]
    if varlen and not idx64 and (kernel, key, arch) in _VARLEN_TILES:
        return _VARLEN_TILES[(kernel, key, arch)]
    return GPU_CONFIGS[kernel][key][arch]


#: Tile used when interpreting: small enough that T = 197 runs in seconds on a CPU core.
INTERPRET_TILE: _Tile = (64, 64, 1, 1)


def head_split(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, TAIL_D): the head dim as a power-of-two main part plus a 0/16/32-wide tail.

    At least 32 (tl.dot needs K >= 16, and one shipped table for head dims <= 32 keeps the AOT matrix
    small). 65..80 -> 64 + 16 and 81..96 -> 64 + 32 instead of 128: the padded columns cost at most
    15% of the attention FLOPs for 64, 72, 80, 88, 96, 112 and 128 (112 pads to 128: 12.5%)."""
    if 64 < head_dim <= 96:
        return 64, 16 if head_dim <= 80 else 32
    return max(32, triton.next_power_of_2(head_dim)), 0


def block_d_for(head_dim: int) -> int:
    """Head-dim columns the kernels execute (main part + tail), >= head_dim."""
    return sum(head_split(head_dim))


def _table_key(block_d: int, tail_d: int) -> int:
    # Split head dims have their own entries, keyed by the executed width (80 or 96).
    return block_d + tail_d


def configs_for(
    kernel: str,
    block_d: int,
    capability: tuple[int, int] | None,
    tail_d: int = 0,
    varlen: bool = False,
    idx64: bool = False,
) -> list[triton.Config]:
    """The autotune candidates for one launch: the single interpreter tile, or the shipped tiles for
    (kernel, BLOCK_D + tail, arch)."""
    if capability is None or triton_interpreting():
        tiles = [INTERPRET_TILE]
    else:
        tiles = tiles_for(kernel, _table_key(block_d, tail_d), arch_key(capability), varlen, idx64)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles
    ]


_tuned: dict[tuple[str, int, int, int, bool, bool], object] = {}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_kernel, "dq": _attn_bwd_kernel}


def tuned_kernel(
    kernel: str,
    block_d: int,
    capability: tuple[int, int] | None,
    tail_d: int = 0,
    varlen: bool = False,
    idx64: bool = False,
):
    """The autotuned launcher of `kernel` for one (BLOCK_D, TAIL_D) and arch (built once, cached).

    One autotuner per (kernel, BLOCK_D, TAIL_D, arch, VARLEN, IDX64) because the candidate tiles
    depend on them; the tuning key adds T (the longest sequence) and dropout (and the dtypes)."""
    arch = 0 if capability is None or triton_interpreting() else arch_key(capability)
    key = (kernel, block_d, tail_d, arch, varlen, idx64)
    if key not in _tuned:
        _tuned[key] = triton.autotune(
            configs=configs_for(kernel, block_d, capability, tail_d, varlen, idx64), key=["T", "HAS_DROPOUT"]
        )(_KERNELS[kernel])
    return _tuned[key]


def _gpu_delta_tile(block_d: int) -> tuple[int, int]:
    # Small row tiles: an AOT sweep found ptxas capping this kernel at 80 registers and spilling
    # for 64 x 64 and larger tiles; 16 (32 for BLOCK_D = 32) rows x 4 warps compile clean, except
    # BLOCK_D = 256 in the varlen variant on sm_80 (16 bytes): 8 warps there.
    return (32 if block_d <= 32 else 16), (8 if block_d >= 256 else 4)


def delta_tile(block_d: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the tiny delta pre-pass (no autotune: it is a row reduction)."""
    if triton_interpreting():
        return 32, 1
    return _gpu_delta_tile(block_d)


# --------------------------------------------------------------------------------------------------
# launchers: the Triton backend's contract functions (vit_fast.ops.contract)
#
# Arguments arrive validated by vit_fast.ops.attention (shapes, head dim, scale, dropout_p, seed,
# the sequence tables). What is checked here guards memory only: unit feature stride, the token
# stride limit of the IDX64 variant, and that the backward's tensors are the shapes the forward
# produced (the launches index them with qkv's geometry).

_force_int64: list[bool] = []


@contextlib.contextmanager
def force_int64_indexing() -> Iterator[None]:
    """Run the 64-bit offset variant (IDX64) even at small shapes (tests, debugging);
    `VIT_FAST_FORCE_INT64=1` does the same for every family (`kernels._common.needs_int64`)."""
    _force_int64.append(True)
    try:
        yield
    finally:
        _force_int64.pop()


def _idx64(*tensors: Tensor) -> bool:
    if not (_force_int64 or needs_int64(*tensors)):
        return False
    # The IDX64 kernels keep in-tile offsets (row < 256) * token stride in int32.
    for t in tensors:
        if t.dim() >= 2 and abs(t.stride(-2)) >= 2**23:
            raise ValueError(
                f"attention supports token strides below 2**23 elements, got strides {t.stride()}"
            )
    return True


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _unit_feature_stride(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def _check_like(name: str, t: Tensor, like: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input dtype {dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


@dataclass(frozen=True)
class _Grid:
    """What a fixed-length and a varlen launch differ in. Fixed: B sequences of T rows addressed
    through the batch strides (the table is a stand-in, never read). Varlen: sequences of rows [R]
    addressed through the table's first rows (batch strides 0)."""

    table: Tensor  # int32 [2, N] (first row, length) on qkv's device
    rows: int  # the kernels' T argument: lse's head stride (T, or R for varlen)
    max_len: int  # the longest sequence: grid axis 1 covers it
    programs: int  # grid axis 0: sequences (or batch) x heads
    varlen: bool
    covers_rows: bool  # every row lies in a sequence (else the backward zeroes dqkv first)

    def batch_stride(self, t: Tensor) -> int:
        return 0 if self.varlen else t.stride(0)


def _fixed_grid(qkv: Tensor, num_heads: int) -> _Grid:
    batch, tokens = qkv.shape[0], qkv.shape[1]
    table = torch.empty((2, 1), dtype=torch.int32, device=qkv.device)
    return _Grid(table, tokens, tokens, batch * num_heads, False, True)


def _varlen_grid(qkv: Tensor, table: Tensor, max_len: int, num_heads: int) -> _Grid:
    # table is the host int64 table of ops.attention: the coverage test costs no device sync.
    covers = int(table[1].sum()) == qkv.shape[0]
    dev_table = table.to(device=qkv.device, dtype=torch.int32)
    return _Grid(dev_table, qkv.shape[0], max_len, table.shape[1] * num_heads, True, covers)


def _flags(qkv: Tensor, head_dim: int, dropout_p: float, grid: _Grid, idx64: bool) -> dict[str, object]:
    """The constexprs every launch of one call shares (the tile sizes come from the configs)."""
    block_d, tail_d = head_split(head_dim)
    return {
        "BLOCK_D": block_d,
        "TAIL_D": tail_d,
        "HAS_DROPOUT": dropout_p > 0.0,
        "VARLEN": grid.varlen,
        "IDX64": idx64,
        "UPCAST": triton_interpreting() and qkv.dtype != torch.float32,
        "IEEE": qkv.dtype == torch.float32,
    }


def _autotuned(kernel: str, qkv: Tensor, flags: dict[str, object]):  # type: ignore[no-untyped-def]
    return tuned_kernel(
        kernel, flags["BLOCK_D"], _capability(qkv.device), flags["TAIL_D"], flags["VARLEN"], flags["IDX64"]
    )


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_forward(
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    grid: _Grid,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> None:
    """The forward launch of the fixed-length and the varlen forward: one program per (sequence,
    head, query tile), writing out and lse."""
    _unit_feature_stride(qkv=qkv)
    width = qkv.shape[-1] // 3
    head_dim = width // num_heads
    flags = _flags(qkv, head_dim, dropout_p, grid, _idx64(qkv, out))
    with _on_device(qkv):
        _autotuned("fwd", qkv, flags)[
            lambda meta: (grid.programs, triton.cdiv(grid.max_len, meta["BLOCK_M"]))
        ](
            qkv,
            out,
            lse,
            grid.table[0],
            grid.table[1],
            grid.batch_stride(qkv),
            qkv.stride(-2),
            grid.batch_stride(out),
            out.stride(-2),
            grid.rows,
            grid.max_len,
            num_heads,
            width,
            head_dim,
            float(scale) * LOG2E.value,
            float(dropout_p),
            int(seed),
            **flags,
        )


def _launch_backward(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    grid: _Grid,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """The three backward launches of the fixed-length and the varlen backward: the delta pre-pass
    (fp32 scratch of lse's shape), then dK/dV and dQ. Returns dqkv (qkv's shape, contiguous; rows
    outside every sequence zero)."""
    _unit_feature_stride(qkv=qkv, out=out)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    # Each pass writes only rows inside a sequence: zero the rest when the sequences leave any.
    dqkv = (torch.empty if grid.covers_rows else torch.zeros)(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if grid.max_len == 0:
        return dqkv
    delta = torch.empty_like(lse)
    width = qkv.shape[-1] // 3
    head_dim = width // num_heads
    flags = _flags(qkv, head_dim, dropout_p, grid, _idx64(qkv, out, grad_out, dqkv))
    with _on_device(qkv):
        bm, warps = delta_tile(flags["BLOCK_D"] + flags["TAIL_D"])
        _attn_bwd_delta_kernel[(grid.programs, triton.cdiv(grid.max_len, bm))](
            out,
            grad_out,
            delta,
            grid.table[0],
            grid.table[1],
            grid.batch_stride(out),
            out.stride(-2),
            grid.batch_stride(grad_out),
            grad_out.stride(-2),
            grid.rows,
            grid.max_len,
            num_heads,
            head_dim,
            BLOCK_M=bm,
            BLOCK_D=flags["BLOCK_D"],
            TAIL_D=flags["TAIL_D"],
            VARLEN=grid.varlen,
            IDX64=flags["IDX64"],
            num_warps=warps,
        )
        for kernel, block in (("dkdv", "BLOCK_N"), ("dq", "BLOCK_M")):
            _autotuned(kernel, qkv, flags)[
                lambda meta, block=block: (grid.programs, triton.cdiv(grid.max_len, meta[block]))
            ](
                qkv,
                grad_out,
                lse,
                delta,
                dqkv,
                grid.table[0],
                grid.table[1],
                grid.batch_stride(qkv),
                qkv.stride(-2),
                grid.batch_stride(grad_out),
                grad_out.stride(-2),
                grid.batch_stride(dqkv),
                dqkv.stride(-2),
                grid.rows,
                grid.max_len,
                num_heads,
                width,
                head_dim,
                float(scale),
                float(scale) * LOG2E.value,
                float(dropout_p),
                int(seed),
                DKDV=kernel == "dkdv",
                **flags,
            )
    return dqkv


def attention_forward(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Triton forward. qkv [B, T, 3*D] (fp32/fp16/bf16, last dim contiguous, other strides free).

    Returns out [B, T, D] contiguous in qkv's dtype (heads merged) and lse [B, H, T] fp32, the
    natural log-sum-exp of the scaled scores before dropout. Dropout keeps entry (b, h, i, j) where
    the Philox draw of (seed, head, i*T + j) is >= dropout_p, scaling kept entries by 1/(1-p).
    """
    batch, tokens, width3 = qkv.shape
    out = torch.empty((batch, tokens, width3 // 3), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    _launch_forward(qkv, out, lse, _fixed_grid(qkv, num_heads), num_heads, scale, dropout_p, seed)
    return out, lse


def attention_backward(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """Triton backward (FA2 style, deterministic). grad_out, out [B, T, D]; lse [B, H, T] fp32.

    Returns dqkv [B, T, 3*D] contiguous in qkv's dtype, packed like qkv. Runs three launches: the
    delta = rowsum(dO * O) pre-pass (fp32 [B, H, T] scratch), dk/dv over key blocks, dq over query
    blocks; each writes its own columns of dqkv, so no zero fill and no atomics.
    """
    batch, tokens, width3 = qkv.shape
    _check_like("grad_out", grad_out, qkv, (batch, tokens, width3 // 3), qkv.dtype)
    _check_like("out", out, qkv, (batch, tokens, width3 // 3), qkv.dtype)
    _check_like("lse", lse, qkv, (batch, num_heads, tokens), torch.float32)
    grid = _fixed_grid(qkv, num_heads)
    return _launch_backward(grad_out, qkv, out, lse, grid, num_heads, scale, dropout_p, seed)


def attention_varlen_forward(
    qkv: Tensor,
    table: Tensor,
    max_len: int,
    zero_fill: bool,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Triton varlen forward. qkv [R, 3*D] rows (last dim contiguous); table int64 CPU [2, N] =
    (first row, length) per sequence (validated by ops.attention), max_len its longest length.

    Returns out [R, D] in qkv's dtype and lse [H, R] fp32. Rows outside every sequence are zero in
    out and lse when zero_fill (padded batches) and left unwritten otherwise. Sequence n's dropout
    mask is the fixed-length mask of batch index n at T = its length. One program per (sequence,
    head, query tile); tiles past a sequence's end exit at once, so the work is sum(len^2)."""
    rows, width3 = qkv.shape
    alloc = torch.zeros if zero_fill else torch.empty
    out = alloc((rows, width3 // 3), dtype=qkv.dtype, device=qkv.device)
    lse = alloc((num_heads, rows), dtype=torch.float32, device=qkv.device)
    if max_len > 0:
        grid = _varlen_grid(qkv, table, max_len, num_heads)
        _launch_forward(qkv, out, lse, grid, num_heads, scale, dropout_p, seed)
    return out, lse


def attention_varlen_backward(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Tensor,
    max_len: int,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """Triton varlen backward: grad_out, out [R, D]; lse [H, R] fp32; returns dqkv [R, 3*D] (rows
    outside every sequence zero). Same three launches as the fixed-length backward, on the
    (sequence, head, tile) grid."""
    rows, width3 = qkv.shape
    _check_like("grad_out", grad_out, qkv, (rows, width3 // 3), qkv.dtype)
    _check_like("out", out, qkv, (rows, width3 // 3), qkv.dtype)
    _check_like("lse", lse, qkv, (num_heads, rows), torch.float32)
    grid = _varlen_grid(qkv, table, max_len, num_heads)
    return _launch_backward(grad_out, qkv, out, lse, grid, num_heads, scale, dropout_p, seed)


def dropout_keep_mask(
    batch: int, num_heads: int, tokens: int, dropout_p: float, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Debug helper: the kernels' dropout keep-mask as bool [B, H, T, T] (small shapes only).

    Uses the kernels' own `_keep_mask` formula in a tiny kernel, so tests can rebuild the kernels'
    dropout with plain PyTorch math."""
    if not 0.0 <= dropout_p < 1.0 or not 0 <= seed < 2**31:
        raise ValueError(f"dropout_p must lie in [0, 1) and seed in [0, 2**31), got {dropout_p!r}, {seed!r}")
    mask = torch.empty((batch, num_heads, tokens, tokens), dtype=torch.int8, device=device)
    # Large tiles: the interpreter's cost is per program, and Philox is many small numpy ops.
    grid = (triton.cdiv(tokens, 128), triton.cdiv(tokens, 128), batch * num_heads)
    _dropout_mask_kernel[grid](mask, tokens, float(dropout_p), int(seed), BLOCK_M=128, BLOCK_N=128)
    return mask.bool()


# --------------------------------------------------------------------------------------------------
# head-dim padding report (for `vit-fast check`)

#: Head dims of common ViTs: B/L (64), SO400M (72), H (80), g (88), 96, 112, 128.
REPORT_HEAD_DIMS = (16, 32, 64, 72, 80, 88, 96, 112, 128)


def head_dim_flops_report(head_dims: tuple[int, ...] = REPORT_HEAD_DIMS) -> list[dict[str, object]]:
    """Executed vs useful attention FLOPs per head dim on the Triton kernels.

    Each row: head_dim, the executed columns as "main+tail" (e.g. "64+16"), executed/useful (the
    FLOP ratio of every attention GEMM: they all scale with the executed head-dim columns) and the
    wasted fraction of executed FLOPs."""
    rows: list[dict[str, object]] = []
    for hd in head_dims:
        block_d, tail_d = head_split(hd)
        executed = block_d + tail_d
        rows.append(
            {
                "head_dim": hd,
                "executed": f"{block_d}+{tail_d}" if tail_d else str(block_d),
                "executed_over_useful": executed / hd,
                "wasted": 1.0 - hd / executed,
            }
        )
    return rows


def format_head_dim_flops(rows: list[dict[str, object]] | None = None) -> str:
    """`head_dim_flops_report` as a small text table."""
    rows = head_dim_flops_report() if rows is None else rows
    lines = ["attention head-dim padding (Triton): head_dim  executed  executed/useful  wasted"]
    for r in rows:
        lines.append(
            f"  {r['head_dim']:>8}  {r['executed']:>8}  {r['executed_over_useful']:>15.3f}  {r['wasted']:>6.1%}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# ahead-of-time specs


#: (VARLEN, IDX64) variants every config ships in: fixed / variable length, 32- / 64-bit offsets.
_MODES = ((False, False), (True, False), (False, True), (True, True))


def _mode_suffix(varlen: bool, idx64: bool) -> str:
    return ("_varlen" if varlen else "") + ("_i64" if idx64 else "")


#: Argument types other than the default i32; "DT" stands for the launch's dtype.
_ARG_TYPES = {
    **dict.fromkeys(("QKV", "Out", "dOut", "dQKV"), "*DT"),
    **dict.fromkeys(("Lse", "Delta"), "*fp32"),
    **dict.fromkeys(("SeqStart", "SeqLen"), "*i32"),
    **dict.fromkeys(("scale", "scale_log2", "dropout_p"), "fp32"),
}
_BATCH_STRIDES = ("stride_qb", "stride_ob", "stride_gb", "stride_db")
_TOKEN_STRIDES = ("stride_qt", "stride_ot", "stride_gt", "stride_dt")


def _spec(name: str, fn, constexprs: dict, dt: str, idx64: bool, **launch) -> KernelSpec:  # type: ignore[no-untyped-def]
    """One spec, its signature generated from `fn`'s own parameters (`KernelSpec.for_kernel`): IDX64
    launches come with batch strides past 2**31 (i64); the launchers keep pointers, the 32-bit
    strides and D divisible by 16 for ViT widths (as the JIT would specialise them)."""
    params = kernel_parameters(fn)
    types = {p: t.replace("DT", dt) for p, t in _ARG_TYPES.items() if p in params}
    if idx64:
        types |= {p: "i64" for p in _BATCH_STRIDES if p in params}
    div16 = [p for p in params if types.get(p, "").startswith("*") or p in (*_TOKEN_STRIDES, "D")]
    div16 += [] if idx64 else [p for p in _BATCH_STRIDES if p in params]
    return KernelSpec.for_kernel(
        name, fn, constexprs, ptr=dt, types=types, divisible_by_16=tuple(div16), **launch
    )


def aot_specs() -> list[KernelSpec]:
    """Every shipped (kernel, dtype, BLOCK_D, tile, arch, mode) config, for `python -m vit_fast.perf.aot`.

    fp16 and bf16 at BLOCK_D 64 (head dims 33..64), 64 + 16 (65..80), 64 + 32 (81..96) and 128
    (97..128), fp16 also at BLOCK_D 32 and 256; every tile of GPU_CONFIGS for those, with and without dropout, for the
    forward, dk/dv and dq kernels, each in the four (VARLEN, IDX64) modes; plus the delta pre-pass.
    (fp32 runs the same tiles with IEEE dots and is not part of the shipped report.)"""
    specs: list[KernelSpec] = []
    shipped = [("fp16", bd, 0) for bd in (32, 64, 128, 256)] + [("bf16", bd, 0) for bd in (64, 128)]
    shipped += [(dt, 64, tail) for dt in ("fp16", "bf16") for tail in (16, 32)]
    for dt, block_d, tail_d in shipped:
        table = _table_key(block_d, tail_d)
        dname = f"d{block_d}" + (f"t{tail_d}" if tail_d else "")
        for varlen, idx64 in _MODES:
            mode = _mode_suffix(varlen, idx64)
            for arch in ARCHS:
                for kernel in ("fwd", "dkdv", "dq"):
                    for bm, bn, w, st in tiles_for(kernel, table, arch, varlen, idx64):
                        for dropout in (False, True):
                            cx = {
                                "BLOCK_M": bm,
                                "BLOCK_N": bn,
                                "BLOCK_D": block_d,
                                "TAIL_D": tail_d,
                                "HAS_DROPOUT": dropout,
                                "VARLEN": varlen,
                                "IDX64": idx64,
                                "UPCAST": False,
                                "IEEE": False,
                            }
                            if kernel != "fwd":  # dkdv and dq are the two passes of one kernel
                                cx["DKDV"] = kernel == "dkdv"
                            name = f"attention_{kernel}_{dt}_{dname}_m{bm}n{bn}{'_drop' if dropout else ''}{mode}"
                            specs.append(
                                _spec(
                                    name,
                                    _KERNELS[kernel],
                                    cx,
                                    dt,
                                    idx64,
                                    num_warps=w,
                                    num_stages=st,
                                    archs=(arch,),
                                )
                            )
            bm, w = _gpu_delta_tile(block_d + tail_d)
            cx = {"BLOCK_M": bm, "BLOCK_D": block_d, "TAIL_D": tail_d, "VARLEN": varlen, "IDX64": idx64}
            specs.append(
                _spec(
                    f"attention_delta_{dt}_{dname}{mode}", _attn_bwd_delta_kernel, cx, dt, idx64, num_warps=w
                )
            )
    return specs
