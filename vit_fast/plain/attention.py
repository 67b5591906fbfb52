"""Attention in plain PyTorch: the "reference" backend of `vit_fast.ops.attention`, under the
contract's names (vit_fast.ops.contract), with the backward written out.

It materialises the T x T probabilities, so it is the fallback where neither kernel backend applies
(and the alternative `vit_fast.tuning.ops` measures against them), not a fast path. Math runs in
fp32 (fp64 for fp64 inputs) with autocast off. One fixed-length core serves both call forms: the
varlen functions run it once per sequence of the (first row, length) table, sequence n with seed
`seed + n`. Dropout masks come from a torch.Generator seeded with the call's seed, so the backward
regenerates the forward's mask; they differ from the Triton and C++ masks (each backend has its own
RNG, which is why ops.attention runs a dropout backward where its forward ran).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "attention_backward",
    "attention_forward",
    "attention_varlen_backward",
    "attention_varlen_forward",
    "keep_mask",
]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    # Device types without autocast (meta) have nothing to turn off.
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_heads(qkv: Tensor, num_heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, T, hd] in `dtype` from the packed qkv [B, T, 3*D]."""
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * num_heads)
    q, k, v = qkv.to(dtype).reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _heads(t: Tensor, num_heads: int, dtype: torch.dtype) -> Tensor:
    """[B, T, D] as [B, H, T, hd] in `dtype`."""
    batch, tokens, width = t.shape
    return t.to(dtype).reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def keep_mask(shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    """This backend's keep-mask (bool, `shape` = [B, H, T, T]): a fresh generator seeded with `seed`
    redraws the same mask in the forward and the backward."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def attention_forward(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """qkv [B, T, 3*D] -> (out [B, T, D] contiguous in qkv's dtype, lse [B, H, T] fp32).

    lse is the natural log-sum-exp of the scaled scores before dropout; with dropout_p > 0 the
    probabilities are masked by `keep_mask(..., seed)` and scaled by 1/(1 - p)."""
    batch, tokens, width3 = qkv.shape
    with _no_autocast(qkv.device.type):
        q, k, v = _split_heads(qkv, num_heads, _compute_dtype(qkv.dtype))
        scores = (q @ k.transpose(-2, -1)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        if dropout_p > 0.0:
            keep = keep_mask(tuple(probs.shape), dropout_p, seed, qkv.device)
            probs = probs * keep / (1.0 - dropout_p)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width3 // 3)
    return out.to(qkv.dtype).contiguous(), lse.float()


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
    """dqkv [B, T, 3*D] contiguous in qkv's dtype (packed like qkv) from grad_out, out [B, T, D] and
    lse [B, H, T]: P is recomputed from lse, then with Z the scaled keep-mask (1 without dropout)
    dV = (P Z)^T dO, dS = P (Z dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q."""
    batch, tokens, width3 = qkv.shape
    cd = _compute_dtype(qkv.dtype)
    with _no_autocast(qkv.device.type):
        q, k, v = _split_heads(qkv, num_heads, cd)
        do, o = _heads(grad_out, num_heads, cd), _heads(out, num_heads, cd)
        probs = torch.exp((q @ k.transpose(-2, -1)) * scale - lse.to(cd)[..., None])
        dp = do @ v.transpose(-2, -1)
        if dropout_p > 0.0:
            keep = keep_mask(tuple(probs.shape), dropout_p, seed, qkv.device) / (1.0 - dropout_p)
            dv = (probs * keep).transpose(-2, -1) @ do
            dp = dp * keep
        else:
            dv = probs.transpose(-2, -1) @ do
        # rowsum(P Z dP) = rowsum(dO O): O = (P Z) V.
        ds = probs * (dp - (do * o).sum(-1, keepdim=True))
        dq = (ds @ k) * scale
        dk = (ds.transpose(-2, -1) @ q) * scale
        dqkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4).reshape(batch, tokens, width3)
    return dqkv.to(qkv.dtype).contiguous()


def _sequences(table: Tensor) -> Iterator[tuple[int, slice]]:
    """(n, rows of sequence n) for every non-empty sequence of table [2, N] = (first row, length)."""
    for n, (start, length) in enumerate(table.t().tolist()):
        if length:
            yield n, slice(start, start + length)


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
    """qkv rows [R, 3*D] -> (out [R, D], lse [H, R] fp32), `attention_forward` once per sequence of
    table int64 [2, N] (first row, length; seed + n for sequence n). Rows outside every sequence are
    zero when zero_fill, unwritten otherwise. (max_len: the loop needs no grid size.)"""
    rows, width3 = qkv.shape
    alloc = qkv.new_zeros if zero_fill else qkv.new_empty
    out = alloc((rows, width3 // 3))
    lse = alloc((num_heads, rows), dtype=torch.float32)
    for n, sl in _sequences(table):
        o, l_ = attention_forward(qkv[sl][None], num_heads, scale, dropout_p, seed + n)
        out[sl], lse[:, sl] = o[0], l_[0]
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
    """dqkv [R, 3*D] (zero outside every sequence), `attention_backward` once per sequence."""
    dqkv = torch.zeros_like(qkv, memory_format=torch.contiguous_format)
    for n, sl in _sequences(table):
        dqkv[sl] = attention_backward(
            grad_out[sl][None],
            qkv[sl][None],
            out[sl][None],
            lse[:, sl][None],
            num_heads,
            scale,
            dropout_p,
            seed + n,
        )[0]
    return dqkv
