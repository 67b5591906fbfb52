"""vit_fast.ops.attention: flash attention from the packed qkv, as a `torch.library` custom op.

Public entry point: `attention(qkv, num_heads, *, scale=None, dropout_p=0.0)` with the signature of
`vit_fast.reference.attention`. It validates, applies autocast, draws the dropout seed, then calls
the custom op `vit_fast::attention_fwd` (backward: `vit_fast::attention_bwd`). The op bodies pick a
backend with `select_backend(device, "attention")`:

- "triton":    `attention_forward` / `attention_backward` below (kernels in vit_fast.kernels.attention)
- "cpu":       `vit_fast._C.attention_forward` / `attention_backward` (docs/backend_contract.md)
- "reference": `reference_attention_forward` / `reference_attention_backward` (plain PyTorch)

Saved for backward: qkv (the input itself, no copy), out [B, T, D], lse [B, H, T] fp32 and the
one-element seed tensor; never a T x T tensor (the triton and cpu backends recompute P from lse).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from vit_fast.ops._checks import check_nonempty, check_tensor
from vit_fast.ops.backend import cpu_extension, select_backend, triton_interpreting

__all__ = [
    "MAX_HEAD_DIM",
    "attention",
    "attention_backward",
    "attention_forward",
    "dropout_keep_mask",
    "reference_attention_backward",
    "reference_attention_forward",
]

#: Largest supported head dim (the kernels pad it to BLOCK_D <= 256).
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
#: Seeds are drawn below 2**31 so the kernels can put the head index in the Philox key's high word.
_SEED_BOUND = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# validation (every check runs before any launch)


def _check_params(num_heads: object, scale: object, dropout_p: object) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _check_qkv(qkv: object, num_heads: int) -> int:
    """Validate qkv [B, T, 3*D] against num_heads; return the head dim."""
    check_tensor(qkv, "qkv", ndim=3)
    assert isinstance(qkv, Tensor)
    check_nonempty(qkv, "qkv")
    width3 = qkv.shape[-1]
    if width3 % (3 * num_heads):
        raise ValueError(
            f"qkv last dim ({width3}) must be divisible by 3 * num_heads = {3 * num_heads} "
            "(qkv is the packed [B, T, 3 * H * head_dim] projection)"
        )
    head_dim = width3 // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} (qkv last dim / (3 * num_heads)) exceeds {MAX_HEAD_DIM}")
    return head_dim


def _check_seed(seed: object, dropout_p: float) -> None:
    if dropout_p > 0.0 and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be an int in [0, 2**31) when dropout_p > 0, got {seed!r}")


def _check_dropout_size(tokens: int, dropout_p: float) -> None:
    # The kernels' Philox counter is the in-head position i*T + j in int32.
    if dropout_p > 0.0 and tokens * tokens >= 2**31:
        raise ValueError(f"attention dropout supports T*T < 2**31 tokens squared, got T={tokens}")


# --------------------------------------------------------------------------------------------------
# triton backend (contract names and signatures)


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def attention_forward(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Triton forward. qkv [B, T, 3*D] (fp32/fp16/bf16, last dim contiguous, other strides free).

    Returns out [B, T, D] contiguous in qkv's dtype (heads merged) and lse [B, H, T] fp32, the
    natural log-sum-exp of the scaled scores before dropout. Dropout keeps entry (b, h, i, j) where
    the Philox draw of (seed, head, i*T + j) is >= dropout_p, scaling kept entries by 1/(1-p).
    """
    import triton

    from vit_fast.kernels import attention as K

    _check_params(num_heads, scale, dropout_p)
    head_dim = _check_qkv(qkv, num_heads)
    _check_seed(seed, dropout_p)
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have a contiguous last dim (stride 1), got strides {qkv.stride()}")
    batch, tokens, width3 = qkv.shape
    _check_dropout_size(tokens, dropout_p)
    width = width3 // 3
    block_d = K.block_d_for(head_dim)
    out = torch.empty((batch, tokens, width), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    kernel = K.tuned_kernel("fwd", block_d, _capability(qkv.device))
    grid = lambda meta: (batch * num_heads, triton.cdiv(tokens, meta["BLOCK_M"]))
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        kernel[grid](
            qkv,
            out,
            lse,
            qkv.stride(0),
            qkv.stride(1),
            out.stride(0),
            out.stride(1),
            tokens,
            num_heads,
            width,
            head_dim,
            float(scale) * _LOG2E,
            float(dropout_p),
            int(seed),
            BLOCK_D=block_d,
            HAS_DROPOUT=dropout_p > 0.0,
            UPCAST=triton_interpreting() and qkv.dtype != torch.float32,
            IEEE=qkv.dtype == torch.float32,
        )
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
    import triton

    from vit_fast.kernels import attention as K

    _check_params(num_heads, scale, dropout_p)
    head_dim = _check_qkv(qkv, num_heads)
    _check_seed(seed, dropout_p)
    batch, tokens, width3 = qkv.shape
    width = width3 // 3
    check_tensor(grad_out, "grad_out", ndim=3, device=qkv.device, dtype=qkv.dtype)
    check_tensor(out, "out", ndim=3, device=qkv.device, dtype=qkv.dtype)
    check_tensor(lse, "lse", ndim=3, device=qkv.device, dtype=torch.float32)
    for name, t, shape in (
        ("grad_out", grad_out, (batch, tokens, width)),
        ("out", out, (batch, tokens, width)),
        ("lse", lse, (batch, num_heads, tokens)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if qkv.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("qkv and out must have a contiguous last dim")
    _check_dropout_size(tokens, dropout_p)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    lse = lse.contiguous()

    block_d = K.block_d_for(head_dim)
    cap = _capability(qkv.device)
    delta = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    dqkv = torch.empty((batch, tokens, width3), dtype=qkv.dtype, device=qkv.device)
    bh = batch * num_heads
    common = (
        qkv.stride(0),
        qkv.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        dqkv.stride(0),
        dqkv.stride(1),
        tokens,
        num_heads,
        width,
        head_dim,
        float(scale),
        float(scale) * _LOG2E,
        float(dropout_p),
        int(seed),
    )
    flags = {
        "BLOCK_D": block_d,
        "HAS_DROPOUT": dropout_p > 0.0,
        "UPCAST": triton_interpreting() and qkv.dtype != torch.float32,
        "IEEE": qkv.dtype == torch.float32,
    }
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        bm, warps = K.delta_tile(block_d)
        K._attn_bwd_delta_kernel[(bh, triton.cdiv(tokens, bm))](
            out,
            grad_out,
            delta,
            out.stride(0),
            out.stride(1),
            grad_out.stride(0),
            grad_out.stride(1),
            tokens,
            num_heads,
            head_dim,
            BLOCK_M=bm,
            BLOCK_D=block_d,
            num_warps=warps,
        )
        K.tuned_kernel("dkdv", block_d, cap)[lambda meta: (bh, triton.cdiv(tokens, meta["BLOCK_N"]))](
            qkv, grad_out, lse, delta, dqkv, *common, **flags
        )
        K.tuned_kernel("dq", block_d, cap)[lambda meta: (bh, triton.cdiv(tokens, meta["BLOCK_M"]))](
            qkv, grad_out, lse, delta, dqkv, *common, **flags
        )
    return dqkv


def dropout_keep_mask(
    batch: int, num_heads: int, tokens: int, dropout_p: float, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Debug helper: the Triton kernels' dropout keep-mask as bool [B, H, T, T] (small shapes only).

    Uses the kernels' own `_keep_mask` formula in a tiny kernel, so tests can rebuild the kernel's
    dropout with plain PyTorch math."""
    import triton

    from vit_fast.kernels import attention as K

    _check_params(num_heads, None, dropout_p)
    _check_seed(seed, dropout_p)
    mask = torch.empty((batch, num_heads, tokens, tokens), dtype=torch.int8, device=device)
    # Large tiles: the interpreter's cost is per program, and Philox is many small numpy ops.
    grid = (triton.cdiv(tokens, 128), triton.cdiv(tokens, 128), batch * num_heads)
    K._dropout_mask_kernel[grid](mask, tokens, float(dropout_p), int(seed), BLOCK_M=128, BLOCK_N=128)
    return mask.bool()


# --------------------------------------------------------------------------------------------------
# reference backend (plain PyTorch; materialises T x T, used where neither kernel backend applies)


def _split_heads(qkv: Tensor, num_heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * num_heads)
    q, k, v = qkv.to(dtype).reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _reference_mask(shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    # Counter-based in spirit: a fresh generator seeded with `seed` gives the same mask in fwd and bwd.
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention_forward(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Same contract as `attention_forward`, in plain PyTorch with fp32 (fp64 for fp64) math."""
    batch, tokens, width3 = qkv.shape
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = _split_heads(qkv, num_heads, _compute_dtype(qkv.dtype))
        scores = (q @ k.transpose(-2, -1)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        if dropout_p > 0.0:
            keep = _reference_mask(tuple(probs.shape), dropout_p, seed, qkv.device)
            probs = probs * keep / (1.0 - dropout_p)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width3 // 3)
    return out.to(qkv.dtype).contiguous(), lse.float()


def reference_attention_backward(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> Tensor:
    """Same contract as `attention_backward`, in plain PyTorch (recomputes P from lse)."""
    batch, tokens, width3 = qkv.shape
    cd = _compute_dtype(qkv.dtype)
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = _split_heads(qkv, num_heads, cd)
        head_dim = q.shape[-1]
        do = grad_out.to(cd).reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
        o = out.to(cd).reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
        probs = torch.exp((q @ k.transpose(-2, -1)) * scale - lse.to(cd)[..., None])
        dp = do @ v.transpose(-2, -1)
        if dropout_p > 0.0:
            keep = _reference_mask(tuple(probs.shape), dropout_p, seed, qkv.device) / (1.0 - dropout_p)
            dv = (probs * keep).transpose(-2, -1) @ do
            dp = dp * keep
        else:
            dv = probs.transpose(-2, -1) @ do
        delta = (do * o).sum(-1, keepdim=True)
        ds = probs * (dp - delta)
        dq = (ds @ k) * scale
        dk = (ds.transpose(-2, -1) @ q) * scale
        dqkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4).reshape(batch, tokens, width3)
    return dqkv.to(qkv.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# custom ops


def _seed_int(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("vit_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: Tensor | None
) -> tuple[Tensor, Tensor]:
    backend = select_backend(qkv.device, "attention")
    s = _seed_int(seed)
    if backend == "triton":
        return attention_forward(qkv, num_heads, scale, dropout_p, s)
    if backend == "cpu":
        return cpu_extension().attention_forward(qkv, num_heads, scale, dropout_p, s)
    return reference_attention_forward(qkv, num_heads, scale, dropout_p, s)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(
    qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, tokens, width3 = qkv.shape
    out = qkv.new_empty((batch, tokens, width3 // 3))
    lse = qkv.new_empty((batch, num_heads, tokens), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vit_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> Tensor:
    # `backend` is the one the forward ran on (chosen again here it could differ, e.g. when the
    # forward ran inside `use_backend(...)`, and dropout masks only match within one backend).
    s = _seed_int(seed)
    # Autograd may hand a gradient in another dtype (e.g. fp32 under some autocast graphs).
    grad_out = grad_out.to(qkv.dtype)
    if backend == "triton":
        return attention_backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, s)
    if backend == "cpu":
        return cpu_extension().attention_backward(
            grad_out.contiguous(), qkv, out, lse, num_heads, scale, dropout_p, s
        )
    return reference_attention_backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, s)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(
    grad_out: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    num_heads: int,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> Tensor:
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    qkv, num_heads, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.num_heads, ctx.scale, ctx.dropout_p = num_heads, scale, dropout_p
    ctx.backend = select_backend(qkv.device, "attention")
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):  # type: ignore[no-untyped-def]
    qkv, out, lse, seed = ctx.saved_tensors
    dqkv = _attention_bwd_op(
        grad_out, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.dropout_p, seed, ctx.backend
    )
    return dqkv, None, None, None, None


torch.library.register_autograd("vit_fast::attention_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public op


def attention(qkv: Tensor, num_heads: int, *, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head self-attention from the packed qkv projection (timm layout), flash style.

    qkv [B, T, 3*D] (fp32, fp16 or bf16; any strides) read as [B, T, 3, H, D/H]; returns
    softmax(q k^T * scale) v with heads merged, [B, T, D], in qkv's dtype (the autocast dtype under
    autocast). scale defaults to head_dim**-0.5. dropout_p drops attention probabilities with a seed
    drawn from torch's default CPU generator here, outside the custom op, so `torch.manual_seed`
    makes it reproducible and torch.compile sees no graph break. Backward gives dqkv in the same
    packed layout; saved for backward: qkv, out, lse [B, H, T] fp32 and the seed.
    """
    _check_params(num_heads, scale, dropout_p)
    head_dim = _check_qkv(qkv, num_heads)
    _check_dropout_size(qkv.shape[1], dropout_p)
    device_type = qkv.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast would not reach inside the custom op: cast here, like a matmul-class op.
        qkv = qkv.to(torch.get_autocast_dtype(device_type))
    if qkv.stride(-1) != 1:
        # The kernels need unit stride along the feature dim; other strides are read as they are.
        qkv = qkv.contiguous()
    scale = head_dim**-0.5 if scale is None else float(scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)
    out, _ = _attention_fwd_op(qkv, num_heads, scale, float(dropout_p), seed)
    return out
