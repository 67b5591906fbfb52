"""Triton kernels for the fused patch embedding (image -> tokens) and its backward.

Notation: B images [B, C, H, W] with arbitrary strides (NCHW or channels-last), patch size p,
grid (gh, gw) = (H/p, W/p), Np = gh*gw patch tokens per image, P = number of prefix tokens
(class + register), T = P + Np tokens per image, D = embedding width, K = C*p*p the reduction of
the patch GEMM. The patch "matrix" A[r, k] (r = b*Np + n over all patches of the batch) is never
materialised: every kernel gathers its elements from the image through the strides, so the
address of A[r, k] splits into a row part (image b, patch n) plus a column part (channel c, row i
and column j inside the patch). Because the reduction order is free, the column index k is
decomposed as (c, i, j) for NCHW images (consecutive k walk along W) and as (i, j, c) for
channels-last images (consecutive k walk along C): either way neighbouring lanes read neighbouring
bytes. The weight [D, C, p, p] is read with the same decomposition, so both sides agree.

Kernels:
  * `_fwd_kernel`: one launch writes all B*T tokens. Row tiles run over the flattened [B*T]
    token rows; prefix rows take the class/register token, patch rows the GEMM + bias; both add
    their position embedding row.
  * `_dweight_kernel`: dW = dY^T A over all patch rows (and dbias = column sums of dY), split over
    row ranges into an fp32 workspace so that enough programs run; `_split_sum_kernel` then sums the
    partials in a fixed order and casts (deterministic, no atomics).
  * `_dimage_kernel`: dA = dY W scattered straight back to pixels; stride == kernel size, so each
    pixel belongs to exactly one patch and each output element is written once.
  * `_batch_sum_kernel`: sum over the batch of dY rows in fp32 -> dpos_embed, dcls, dreg.

The launchers at the bottom (`patch_embed_forward`, `patch_embed_backward`) are the Triton backend
functions of docs/backend_contract.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vit_fast.kernels._common import (
    GROUP_M,
    KernelSpec,
    grouped_tile,
    index,
    needs_int64,
    tile_meta,
    triton_interpreting,
)


@triton.jit
def _col_offsets(k, K, C, P: tl.constexpr, sC, sH, sW, CL_ORDER: tl.constexpr, IDX64: tl.constexpr):
    """Image offset (inside one patch) and weight offset of reduction indices k."""
    PP: tl.constexpr = P * P
    if CL_ORDER:
        # k = (i*p + j)*C + c: channels innermost, matching channels-last memory.
        c = k % C
        ij = k // C
    else:
        # k = c*p*p + i*p + j: the Conv2d weight order, W innermost for NCHW memory.
        c = k // PP
        ij = k % PP
    i = ij // P
    j = ij % P
    # k, c, i, j are small (k < K); only their products with the image strides can pass 2**31
    # (one image larger than 2**31 elements, e.g. a wide feature map at patch size 1), so those
    # are formed in the launch's offset width. The divisions stay int32 (cheaper).
    img = index(c, IDX64) * sC + index(i, IDX64) * sH + index(j, IDX64) * sW
    if CL_ORDER:
        wgt = c * PP + ij
    else:
        wgt = k  # same order as the weight: plain (and provably contiguous) offsets
    return img, wgt, k < K


@triton.jit
def _patch_row_offsets(n, b, gw, P: tl.constexpr, sB, sH, sW, IDX64: tl.constexpr):
    """Image offset of the top-left pixel of patch n (row-major over the grid) of image b: indices
    in int32, their products with the strides in the launch's offset width."""
    gy = n // gw
    gx = n % gw
    return index(b, IDX64) * sB + index(gy * P, IDX64) * sH + index(gx * P, IDX64) * sW


@triton.jit
def _fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    cls_ptr,
    reg_ptr,
    out_ptr,
    M,
    T,
    D,
    K,
    C,
    gw,
    sB,
    sC,
    sH,
    sW,
    P: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    NUM_CLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NO_EMBED_CLASS: tl.constexpr,
    CL_ORDER: tl.constexpr,
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: neighbouring programs share row tiles, so the gathered image rows and the
    # weight columns stay in L2 across a group.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)

    # Indices are int32 (every size is); with IDX64 (see kernels._common) each product of an
    # index with a stride or width below is int64: image gathers, rows * D, pos_row * D, r * D.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened token rows b*T + t
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # embedding dims
    row_ok = rows < M
    col_ok = cols < D
    b = rows // T
    t = rows % T
    n = t - NUM_PREFIX  # patch index, negative on prefix rows
    is_patch = row_ok & (n >= 0)
    row_img = _patch_row_offsets(tl.maximum(n, 0), b, gw, P, sB, sH, sW, IDX64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        col_img, col_w, k_ok = _col_offsets(ks, K, C, P, sC, sH, sW, CL_ORDER, IDX64)
        a = tl.load(
            x_ptr + row_img[:, None] + col_img[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + index(cols, IDX64)[None, :] * K + col_w[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            # The CPU interpreter mis-evaluates low-precision dots; fp32 operands hold fp16/bf16 exactly.
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.where(is_patch[:, None], acc + bias[None, :], acc)
    if NUM_PREFIX > 0:
        is_prefix = row_ok & (t < NUM_PREFIX)
        if NUM_CLS > 0:
            # One row shared by every image: a 1-D load broadcast over the tile.
            cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = tl.where((t == 0)[:, None], cls[None, :], acc)
        if NUM_PREFIX > NUM_CLS:
            r = tl.maximum(t - NUM_CLS, 0)
            is_reg = is_prefix & (t >= NUM_CLS)
            reg = tl.load(
                reg_ptr + index(r, IDX64)[:, None] * D + cols[None, :],
                mask=is_reg[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.where(is_reg[:, None], reg.to(tl.float32), acc)
    if HAS_POS:
        if NO_EMBED_CLASS:
            pos_row = tl.maximum(n, 0)
            pos_ok = is_patch
        else:
            pos_row = t
            pos_ok = row_ok
        pos = tl.load(
            pos_ptr + index(pos_row, IDX64)[:, None] * D + cols[None, :],
            mask=pos_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += pos.to(tl.float32)

    out_offs = index(rows, IDX64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dweight_kernel(
    g_ptr,
    x_ptr,
    ws_ptr,
    wsb_ptr,
    R,
    Np,
    T,
    D,
    K,
    C,
    gw,
    sB,
    sC,
    sH,
    sW,
    rows_per_split,
    P: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CL_ORDER: tl.constexpr,
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Partial dW[split, d, k] = sum over rows r of this split of dY[r, d] * A[r, k], in fp32."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = ds < D
    col_img, col_w, k_ok = _col_offsets(ks, K, C, P, sC, sH, sW, CL_ORDER, IDX64)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    r_begin = split * rows_per_split
    r_end = min(r_begin + rows_per_split, R)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < r_end
        b = rs // Np
        n = rs % Np
        g_row = index(b * T + NUM_PREFIX + n, IDX64) * D  # token row (< B*T) times D
        # dY^T tile [BLOCK_D, BLOCK_R], read transposed through the pointers.
        g = tl.load(g_ptr + g_row[None, :] + ds[:, None], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        row_img = _patch_row_offsets(n, b, gw, P, sB, sH, sW, IDX64)
        a = tl.load(
            x_ptr + row_img[:, None] + col_img[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0
        )
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(g, a, acc, input_precision="ieee")
        if HAS_BIAS:
            bacc += tl.sum(g.to(tl.float32), axis=1)

    ws_offs = (split.to(tl.int64) * D + ds[:, None]) * K + col_w[None, :]
    tl.store(ws_ptr + ws_offs, acc, mask=d_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        # Every k-tile computed the same column sums; only the first one writes them.
        tl.store(wsb_ptr + split * D + ds, bacc, mask=d_ok & (pid_k == 0))


@triton.jit
def _dimage_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    R,
    Np,
    T,
    D,
    K,
    C,
    gw,
    sB,
    sC,
    sH,
    sW,
    P: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    CL_ORDER: tl.constexpr,
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dA[r, k] = sum_d dY[r, d] W[d, k], written to the pixel that A[r, k] was read from."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rs < R
    b = rs // Np
    n = rs % Np
    g_row = index(b * T + NUM_PREFIX + n, IDX64) * D  # token row (< B*T) times D
    col_img, col_w, k_ok = _col_offsets(ks, K, C, P, sC, sH, sW, CL_ORDER, IDX64)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        g = tl.load(g_ptr + g_row[:, None] + ds[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + index(ds, IDX64)[:, None] * K + col_w[None, :],
            mask=d_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision="ieee")

    row_img = _patch_row_offsets(n, b, gw, P, sB, sH, sW, IDX64)
    tl.store(
        dx_ptr + row_img[:, None] + col_img[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=r_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _split_sum_kernel(ws_ptr, out_ptr, wsb_ptr, outb_ptr, S, N, NB, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] for i < N and outb[i - N] = sum_s wsb[s, i - N] for the next NB
    elements: the dweight and dbias split partials reduced in a fixed order (deterministic) and cast
    to the weight dtype, in one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_w = offs < N
    in_b = (offs >= N) & (offs < N + NB)
    ob = tl.maximum(offs - N, 0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, S):
        acc += tl.load(ws_ptr + offs, mask=in_w, other=0.0)
        acc += tl.load(wsb_ptr + ob, mask=in_b, other=0.0)
        ws_ptr += N  # 64-bit pointer steps: S*N may exceed 32-bit offsets
        wsb_ptr += NB
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=in_w)
    tl.store(outb_ptr + ob, acc.to(outb_ptr.dtype.element_ty), mask=in_b)


@triton.jit
def _batch_sum_kernel(
    g_ptr,
    dpos_ptr,
    dcls_ptr,
    dreg_ptr,
    B,
    T,
    D,
    NUM_PREFIX: tl.constexpr,
    NUM_CLS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NO_EMBED_CLASS: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """S[t, d] = sum_b dY[b, t, d] in fp32, routed to dpos_embed / dcls / dreg rows."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < T
    d_ok = ds < D
    mask = t_ok[:, None] & d_ok[None, :]
    # ts * D (and pos_row * D below) pass 2**31 for one image of more than 2**31 / D tokens.
    offs = index(ts, IDX64)[:, None] * D + ds[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    # Advance the 64-bit pointer per image instead of forming b*T*D; the step T*D itself is
    # int64 in IDX64 launches.
    step = index(T, IDX64) * D
    for _ in range(0, B):
        acc += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_ptr += step

    if HAS_POS:
        if NO_EMBED_CLASS:
            pos_row = tl.maximum(ts - NUM_PREFIX, 0)
            pos_ok = ts >= NUM_PREFIX
        else:
            pos_row = ts
            pos_ok = t_ok
        tl.store(
            dpos_ptr + index(pos_row, IDX64)[:, None] * D + ds[None, :],
            acc.to(dpos_ptr.dtype.element_ty),
            mask=pos_ok[:, None] & mask,
        )
    if NUM_CLS > 0:
        tl.store(
            dcls_ptr + ts[:, None] * 0 + ds[None, :],
            acc.to(dcls_ptr.dtype.element_ty),
            mask=(ts == 0)[:, None] & mask,
        )
    if NUM_PREFIX > NUM_CLS:
        r = tl.maximum(ts - NUM_CLS, 0)
        is_reg = (ts >= NUM_CLS) & (ts < NUM_PREFIX)
        tl.store(
            dreg_ptr + index(r, IDX64)[:, None] * D + ds[None, :],
            acc.to(dreg_ptr.dtype.element_ty),
            mask=is_reg[:, None] & mask,
        )


# ---------------------------------------------------------------------------------------------
# Configs. On a GPU a fixed small table is used (every entry is compiled ahead of time by
# `aot_specs`); the interpreter gets large tiles because its cost is per program and per op, but
# still small enough that the tests with tiny shapes cross tile edges.

#: forward (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for 16-bit and for fp32 inputs.
# (128x128 tiles spill: the gathered A tile cannot use vector loads and the epilogue loads
# position/prefix tiles, so 128x64 with 8 warps is the largest 0-spill tile.)
FWD_CONFIGS = {"16bit": (128, 64, 32, 8, 3), "16bit_small": (64, 64, 32, 4, 3), "fp32": (64, 64, 16, 4, 3)}
#: dweight (BLOCK_D, BLOCK_K, BLOCK_R, num_warps, num_stages). Both backward GEMMs gather one
#: operand element by element; 8 warps for 16-bit keep them well under 255 registers (4 warps sat at
#: 254-255 and the dimage kernel spilled on sm_80; fp32 dimage sat at 255 on sm_90).
DW_CONFIGS = {"16bit": (64, 64, 64, 8, 3), "fp32": (64, 64, 32, 4, 3)}
#: dimage (BLOCK_M, BLOCK_K, BLOCK_D, num_warps, num_stages).
DX_CONFIGS = {"16bit": (128, 64, 32, 8, 3), "fp32": (64, 64, 16, 8, 3)}
#: batch sum (BLOCK_T, BLOCK_D, num_warps).
BSUM_CONFIG = (16, 128, 4)
#: split sum (BLOCK, num_warps).
SPLIT_SUM_CONFIG = (1024, 4)


def _interp_block(n: int) -> int:
    """Interpreter tile edge: 64 for large dims (4x fewer interpreted programs/iterations), 32 for
    small ones so that the small test shapes still span several tiles and hit the edge masks."""
    return 64 if n >= 256 else 32


def _dtype_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _fwd_config(dtype: torch.dtype, rows: int, D: int, K: int) -> tuple[int, int, int, int, int]:
    if triton_interpreting():
        return (_interp_block(rows), _interp_block(D), _interp_block(K), 4, 1)
    key = _dtype_key(dtype)
    if key == "16bit" and (D < 64 or rows < 4096):
        # Small problems: more, smaller programs fill the SMs better than 128x128 tiles.
        key = "16bit_small"
    return FWD_CONFIGS[key]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: pretend to be a tiny GPU, so small test shapes still exercise the split path.
    return 2


def _image_strides(images: Tensor) -> tuple[bool, tuple[int, int, int, int]]:
    sB, sC, sH, sW = images.stride()
    # Walk the reduction channels-innermost when channels are the fastest-moving image dim.
    cl_order = images.shape[1] > 1 and sC < sW
    return cl_order, (sB, sC, sH, sW)


def _geometry(images: Tensor, patch_size: int) -> tuple[int, int, int, int, int, int]:
    B, C, H, W = images.shape
    gh, gw = H // patch_size, W // patch_size
    return B, C, gh, gw, gh * gw, C * patch_size * patch_size


def patch_embed_forward(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos_embed: Tensor | None,
    cls_token: Tensor | None,
    reg_tokens: Tensor | None,
    patch_size: int,
    no_embed_class: bool,
) -> Tensor:
    """Triton backend: tokens [B, T, D] in the images' dtype, T = (1 if cls) + R + Np.

    images [B, C, H, W] any strides; weight [D, C, p, p]; bias [D]; pos_embed [1, L, D];
    cls_token [1, 1, D]; reg_tokens [1, R, D]. Arguments are assumed validated (vit_fast.ops).
    """
    B, C, _gh, gw, Np, K = _geometry(images, patch_size)
    D = weight.shape[0]
    has_cls = cls_token is not None
    num_reg = 0 if reg_tokens is None else reg_tokens.shape[1]
    prefix = int(has_cls) + num_reg
    T = prefix + Np
    out = torch.empty((B, T, D), device=images.device, dtype=images.dtype)
    weight = weight.contiguous()
    cl_order, strides = _image_strides(images)
    idx64 = needs_int64(images, weight, pos_embed, reg_tokens, out)
    M = B * T
    config = _fwd_config(images.dtype, M, D, K)
    grid = (triton.cdiv(M, config[0]) * triton.cdiv(D, config[1]),)
    _fwd_kernel[grid](
        images,
        weight,
        bias.contiguous() if bias is not None else weight,
        pos_embed.contiguous() if pos_embed is not None else weight,
        cls_token.contiguous() if has_cls else weight,
        reg_tokens.contiguous() if num_reg else weight,
        out,
        M,
        T,
        D,
        K,
        C,
        gw,
        *strides,
        P=patch_size,
        NUM_PREFIX=prefix,
        NUM_CLS=int(has_cls),
        HAS_BIAS=bias is not None,
        HAS_POS=pos_embed is not None,
        NO_EMBED_CLASS=no_embed_class,
        CL_ORDER=cl_order,
        IDX64=idx64,
        UPCAST=triton_interpreting(),
        **tile_meta(config),
    )
    return out


def patch_embed_backward(
    grad: Tensor,
    images: Tensor,
    weight: Tensor,
    has_bias: bool,
    has_pos: bool,
    has_cls: bool,
    num_reg: int,
    patch_size: int,
    no_embed_class: bool,
    needs_image_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Triton backend: (dimages|None, dweight, dbias|None, dpos_embed|None, dcls|None, dreg|None).

    grad [B, T, D]. dimages has the images' dtype and memory format; parameter grads have the
    weight's dtype, reduced in fp32 (dweight over a fixed split order: deterministic).
    """
    B, C, _gh, gw, Np, K = _geometry(images, patch_size)
    D = weight.shape[0]
    prefix = int(has_cls) + num_reg
    T = prefix + Np
    R = B * Np
    grad = grad.contiguous()
    weight = weight.contiguous()
    dtype = weight.dtype
    cl_order, strides = _image_strides(images)
    upcast = triton_interpreting()
    key = _dtype_key(images.dtype)

    # dweight (+ dbias): split the B*Np reduction so that enough programs run, then sum the fp32
    # partials in a fixed order.
    if upcast:
        bd, bk, br, warps, stages = _interp_block(D), _interp_block(K), _interp_block(R), 4, 1
    else:
        bd, bk, br, warps, stages = DW_CONFIGS[key]
    tiles = triton.cdiv(D, bd) * triton.cdiv(K, bk)
    split = max(1, min(triton.cdiv(2 * _num_sms(images.device), tiles), triton.cdiv(R, 4 * br)))
    rows_per_split = triton.cdiv(triton.cdiv(R, split), br) * br
    split = triton.cdiv(R, rows_per_split)
    ws = torch.empty((split, D, K), device=images.device, dtype=torch.float32)
    wsb = torch.empty((split, D), device=images.device, dtype=torch.float32) if has_bias else ws
    # (the fp32 workspace ws is addressed in int64 at every shape: its offsets are per tile)
    _dweight_kernel[(triton.cdiv(D, bd), triton.cdiv(K, bk), split)](
        grad,
        images,
        ws,
        wsb,
        R,
        Np,
        T,
        D,
        K,
        C,
        gw,
        *strides,
        rows_per_split,
        P=patch_size,
        NUM_PREFIX=prefix,
        HAS_BIAS=has_bias,
        CL_ORDER=cl_order,
        IDX64=needs_int64(grad, images),
        UPCAST=upcast,
        BLOCK_D=bd,
        BLOCK_K=bk,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    dweight = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    dbias = torch.empty((D,), device=weight.device, dtype=dtype) if has_bias else None
    n_b = D if has_bias else 0
    blk, w3 = SPLIT_SUM_CONFIG
    _split_sum_kernel[(triton.cdiv(D * K + n_b, blk),)](
        ws, dweight, wsb, dbias if has_bias else dweight, split, D * K, n_b, BLOCK=blk, num_warps=w3
    )

    dpos = dcls = dreg = None
    if has_pos or prefix:
        L = (Np if no_embed_class else T) if has_pos else 0
        dpos = torch.empty((1, L, D), device=grad.device, dtype=dtype) if has_pos else None
        dcls = torch.empty((1, 1, D), device=grad.device, dtype=dtype) if has_cls else None
        dreg = torch.empty((1, num_reg, D), device=grad.device, dtype=dtype) if num_reg else None
        bt, bdd, w2 = BSUM_CONFIG
        _batch_sum_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bdd))](
            grad,
            dpos if dpos is not None else grad,
            dcls if dcls is not None else grad,
            dreg if dreg is not None else grad,
            B,
            T,
            D,
            NUM_PREFIX=prefix,
            NUM_CLS=int(has_cls),
            HAS_POS=has_pos,
            NO_EMBED_CLASS=no_embed_class,
            IDX64=needs_int64(grad),
            BLOCK_T=bt,
            BLOCK_D=bdd,
            num_warps=w2,
        )

    dimages = None
    if needs_image_grad:
        # empty_like keeps the images' memory format (channels-last stays channels-last) for dense
        # images; for any other layout it returns a contiguous tensor, whose strides are passed.
        dimages = torch.empty_like(images)
        dcl, dstrides = _image_strides(dimages)
        if upcast:
            bm, bk2, bdd2, warps, stages = _interp_block(R), _interp_block(K), _interp_block(D), 4, 1
        else:
            bm, bk2, bdd2, warps, stages = DX_CONFIGS[key]
        _dimage_kernel[(triton.cdiv(R, bm), triton.cdiv(K, bk2))](
            grad,
            weight,
            dimages,
            R,
            Np,
            T,
            D,
            K,
            C,
            gw,
            *dstrides,
            P=patch_size,
            NUM_PREFIX=prefix,
            CL_ORDER=dcl,
            IDX64=needs_int64(grad, weight, dimages),
            UPCAST=upcast,
            BLOCK_M=bm,
            BLOCK_K=bk2,
            BLOCK_D=bdd2,
            num_warps=warps,
            num_stages=stages,
        )
    return dimages, dweight, dbias, dpos, dcls, dreg


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (vit_fast.perf.aot).

#: Patch sizes compiled ahead of time: P is a constexpr (the index math divides by it).
AOT_PATCH_SIZES = (1, 4, 8, 14, 16, 32)
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> list[KernelSpec]:
    """One spec per shipped (kernel, dtype, config), at a representative constexpr set (class
    token + 4 registers + pos embed + bias, NCHW and channels-last reduction order, p=16), plus
    the forward at every supported patch size; the 64-bit offset variants of every kernel that has
    one, the forward at p=16 and at p=1 (where a single large image reaches 2**31 elements).
    Signatures come from the kernels' parameter lists: pointers in the dtype, the fp32 workspaces,
    scalars i32."""
    specs = []
    f32 = "*fp32"
    prefix = dict(NUM_PREFIX=5, HAS_BIAS=True, UPCAST=False)
    for dt, ty in _TY.items():
        key = _dtype_key(dt)
        fwd_keys = ("16bit", "16bit_small") if key == "16bit" else ("fp32",)
        for idx64 in (False, True):
            i64 = "_i64" if idx64 else ""
            for fk in fwd_keys:
                bm, bn, bk, warps, stages = FWD_CONFIGS[fk]
                sizes = (16,) if fk == "fp32" else (1, 16) if idx64 else AOT_PATCH_SIZES
                for p in sizes:
                    for cl in (False, True):
                        const = dict(
                            P=p, NUM_CLS=1, HAS_POS=True, NO_EMBED_CLASS=False, CL_ORDER=cl, IDX64=idx64
                        )
                        const |= dict(prefix, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
                        specs.append(
                            KernelSpec.for_kernel(
                                f"patch_embed_fwd{i64}_{ty}_{fk}_p{p}{'_cl' if cl else ''}",
                                _fwd_kernel,
                                const,
                                ptr=ty,
                                num_warps=warps,
                                num_stages=stages,
                                divisible_by_16=("x_ptr", "w_ptr", "bias_ptr", "pos_ptr", "out_ptr"),
                            )
                        )
            for cl in (False, True):
                bd, bk, br, warps, stages = DW_CONFIGS[key]
                const = dict(prefix, P=16, CL_ORDER=cl, IDX64=idx64, BLOCK_D=bd, BLOCK_K=bk, BLOCK_R=br)
                specs.append(
                    KernelSpec.for_kernel(
                        f"patch_embed_dweight{i64}_{ty}{'_cl' if cl else ''}",
                        _dweight_kernel,
                        const,
                        ptr=ty,
                        types={"ws_ptr": f32, "wsb_ptr": f32},
                        num_warps=warps,
                        num_stages=stages,
                        divisible_by_16=("g_ptr", "x_ptr", "ws_ptr", "wsb_ptr"),
                    )
                )
                bm, bk, bdd, warps, stages = DX_CONFIGS[key]
                const = dict(P=16, NUM_PREFIX=5, CL_ORDER=cl, IDX64=idx64, UPCAST=False)
                const |= dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bdd)
                specs.append(
                    KernelSpec.for_kernel(
                        f"patch_embed_dimage{i64}_{ty}{'_cl' if cl else ''}",
                        _dimage_kernel,
                        const,
                        ptr=ty,
                        num_warps=warps,
                        num_stages=stages,
                        divisible_by_16=("g_ptr", "w_ptr", "dx_ptr"),
                    )
                )
            bt, bdd, warps = BSUM_CONFIG
            const = dict(NUM_PREFIX=5, NUM_CLS=1, HAS_POS=True, NO_EMBED_CLASS=False, IDX64=idx64)
            const |= dict(BLOCK_T=bt, BLOCK_D=bdd)
            specs.append(
                KernelSpec.for_kernel(
                    f"patch_embed_batch_sum{i64}_{ty}",
                    _batch_sum_kernel,
                    const,
                    ptr=ty,
                    num_warps=warps,
                    num_stages=1,
                )
            )
        blk, warps = SPLIT_SUM_CONFIG
        specs.append(
            KernelSpec.for_kernel(
                f"patch_embed_split_sum_{ty}",
                _split_sum_kernel,
                {"BLOCK": blk},
                ptr=ty,
                types={"ws_ptr": f32, "wsb_ptr": f32},
                num_warps=warps,
                num_stages=1,
            )
        )
    return specs
