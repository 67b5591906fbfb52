"""LayerNorm kernels: forward (optionally with a fused residual add), row statistics only (for the
GEMM LN prologue), and backward (optionally adding an incoming residual gradient).

Statistics are always float32 and computed two-pass from registers (mean first, then the variance
of the centred row) on values shifted by the row's first element, so rows with a large mean and a
tiny spread (mean 1e4, std 1e-3) lose neither their variance (one-pass E[x^2] - E[x]^2 would) nor
their mean's last bits.

The launchers implement the `layer_norm` family of vit_fast/ops/contract.py: `layer_norm_*` on these
kernels, `layer_norm_linear_*` as the GEMM of kernels/gemm.py with the LN applied in its prologue
(the LN output never goes to memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vit_fast.kernels._common import KernelSpec, triton_interpreting
from vit_fast.kernels.gemm import PRO_LN_COL, PRO_LN_ROW, gemm


@triton.jit
def _ln_fwd_kernel(
    x_ptr,
    res_ptr,
    sum_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    D,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_Y: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program normalises ROWS whole rows held in registers ([ROWS, BLOCK_D] tile); the row
    # must fit (BLOCK_D >= D), which holds for every ViT width (<= 8192).
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    # Offsets are always int64 (row * D passes 2**31 from ~2.8M rows of 768 on). Unlike the GEMMs
    # (see kernels._common), these kernels have no int32 variant: they are bound by memory traffic,
    # and with int32 offsets the backward spills on sm_80 at D >= 2048 where int64 does not.
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        # Add in fp32 and round to the storage dtype before normalising, exactly as the unfused
        # `x + residual` followed by LayerNorm sees it (also: bf16 arithmetic is not supported
        # by the interpreter).
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    # Shifted two-pass statistics: subtract each row's first element (exact for nearby values,
    # Sterbenz) before summing, so a row like 1e4 + 1e-3 * noise sums small numbers and its mean
    # comes out correctly rounded instead of off by several ulps of 1e4 (which is ~1 std there).
    x0 = tl.sum(tl.where(cols[None, :] == 0, xf, 0.0), axis=1)
    xs = tl.where(mask, xf - x0[:, None], 0.0)
    mean_s = tl.sum(xs, axis=1) / D
    xc = tl.where(mask, xs - mean_s[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    mean = x0 + mean_s
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if STORE_Y:
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dres_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    M,
    D,
    HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Each program walks row blocks pid, pid + nprog, ... and keeps fp32 partial sums of
    # dweight/dbias in registers; the host reduces the [nprog, D] partials in fp32. This avoids
    # atomics (non-deterministic) and a second pass over dy.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * ROWS, M, nprog * ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        # xhat is recomputed instead of being saved by the forward. The mean is recomputed from
        # the row in registers (shifted, as in the forward) rather than read back: the saved fp32
        # mean of a row like 1e4 + 1e-3 * noise is off by up to half an ulp of 1e4, a sizeable
        # fraction of its std, and that error would go straight into dweight and dx.
        x0 = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)
        xs = tl.where(mask, x - x0[:, None], 0.0)
        mean_s = tl.sum(xs, axis=1) / D
        xhat = tl.where(mask, (xs - mean_s[:, None]) * rstd[:, None], 0.0)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_part_ptr + pid * D + cols, dw_acc, mask=col_ok)
    if NEED_DB:
        tl.store(db_part_ptr + pid * D + cols, db_acc, mask=col_ok)


# --------------------------------------------------------------------------------------- launchers


#: Widest row the kernels hold in registers: ViT widths go up to 1792 (ViT-e); at 8192 the
#: backward spills on sm_90 even with 16 warps, so the AOT-verified limit is 4096.
MAX_D = 4096


def _check_width(d: int) -> None:
    # Raised by the launchers before any launch; wider rows would need a looped kernel.
    if d > MAX_D:
        raise ValueError(f"x: LayerNorm width D={d} exceeds the Triton kernels' limit of {MAX_D}")


def _rows_per_program(block_d: int) -> int:
    # Keep about 4K elements per program: enough work per program for narrow rows, and for wide
    # rows (BLOCK_D = 4096+) one row per program so the tile stays in registers without spills.
    return max(1, min(16, 4096 // block_d))


def _num_warps(block_d: int, rows: int, backward: bool = False) -> int:
    # The backward keeps ~4 row-sized fp32 arrays live (x, dy, xhat, dy*w): give it 8 warps from
    # 4K elements on so each thread holds <= 16 elements per array (no spills on sm_80 at D=4096).
    # _rows_per_program keeps a tile at <= 4K elements for every width up to MAX_D.
    elems = block_d * rows
    if backward:
        return 4 if elems < 4096 else 8
    return 4 if elems <= 4096 else 8


def _row_stats_launch(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None,
    store_y: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    m, d = x.shape
    _check_width(d)
    block_d = triton.next_power_of_2(d)
    rows = _rows_per_program(block_d)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x) if store_y else None
    s = torch.empty_like(x) if residual is not None else None
    _ln_fwd_kernel[(triton.cdiv(m, rows),)](
        x,
        residual,
        s,
        y,
        weight,
        bias,
        mean,
        rstd,
        m,
        d,
        eps,
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        STORE_Y=store_y,
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d, rows),
    )
    return y, s, mean, rstd


def row_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row LayerNorm statistics of x [M, D] (contiguous): (mean [M], rstd [M]), both float32."""
    _, _, mean, rstd = _row_stats_launch(x, None, None, eps, None, store_y=False)
    return mean, rstd


def layer_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Contract `layer_norm_forward`: x [M, D] -> (y [M, D] in x.dtype, mean [M] fp32, rstd [M] fp32)."""
    y, _, mean, rstd = _row_stats_launch(x, weight, bias, eps, None, store_y=True)
    return y, mean, rstd


def add_layer_norm_forward(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s = x + residual and LN(s) in one pass: returns (y, s, mean, rstd); all [M, D] but the stats."""
    y, s, mean, rstd = _row_stats_launch(x, weight, bias, eps, residual, store_y=True)
    return y, s, mean, rstd


def layer_norm_backward_fused(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    *,
    need_dbias: bool,
    dres: Tensor | None = None,
    dx_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """LN backward with an optional incoming gradient `dres` [M, D] added into dx (the residual
    path of a pre-LN block). dy may be fp32 (from a dgrad GEMM) or x.dtype. Returns (dx [M, D] in
    dx_dtype or x.dtype, dweight [D] | None, dbias [D] | None) with weight-shaped grads in the
    weight's dtype (fp32 partials reduced in fp32)."""
    m, d = x.shape
    _check_width(d)
    block_d = triton.next_power_of_2(d)
    rows = _rows_per_program(block_d)
    need_dw = weight is not None
    # Enough programs to fill a GPU; in the interpreter few programs run fastest.
    max_prog = 4 if triton_interpreting() else 1024
    nprog = max(1, min(triton.cdiv(m, rows), max_prog))
    dx = torch.empty(m, d, device=x.device, dtype=dx_dtype or x.dtype)
    dw_part = torch.empty(nprog, d, device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.empty(nprog, d, device=x.device, dtype=torch.float32) if need_dbias else None
    _ln_bwd_kernel[(nprog,)](
        dy,
        x,
        weight,
        mean,
        rstd,
        dres,
        dx,
        dw_part,
        db_part,
        m,
        d,
        HAS_W=weight is not None,
        HAS_DRES=dres is not None,
        NEED_DW=need_dw,
        NEED_DB=need_dbias,
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d, rows, backward=True),
    )
    wdtype = weight.dtype if weight is not None else x.dtype
    dw = dw_part.sum(0).to(wdtype) if dw_part is not None else None
    db = db_part.sum(0).to(wdtype) if db_part is not None else None
    return dx, dw, db


def layer_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Contract `layer_norm_backward`: (dx, dweight | None, dbias | None). The contract does not say
    whether a bias was given; dbias is returned whenever weight is (affine LN always has both), and
    callers that had no bias drop it."""
    return layer_norm_backward_fused(dy, x, weight, mean, rstd, need_dbias=weight is not None)


# ------------------------------------------------- LN fused into the GEMM prologue (LN+Linear)


def layer_norm_linear_forward(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contract `layer_norm_linear_forward`: x [M, D] -> (LN(x) @ weight^T + bias [M, N], mean, rstd).
    Two launches: row statistics, then the GEMM normalising A tiles in its prologue (the LN output
    never goes to memory)."""
    mean, rstd = row_stats(x, eps)
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    gemm(
        x,
        weight,
        out,
        prologue=PRO_LN_ROW,
        mean=mean,
        rstd=rstd,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        bias=bias,
    )
    return out, mean, rstd


def _ln_wgrad(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dw: Tensor,
) -> Tensor:
    """dw [N, D] = dout^T @ LN(x), computed as dw^T = LN(x)^T @ dout with the LN in the prologue
    (statistics along K = tokens), written through transposed strides."""
    return gemm(
        x.t(),
        dout.t(),
        dw.t(),
        prologue=PRO_LN_COL,
        mean=mean,
        rstd=rstd,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
    )


def layer_norm_linear_backward(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    *,
    dres: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
    """Contract `layer_norm_linear_backward`: the backward of out = LN(x) @ weight^T + bias from
    dout [M, N] -> (dx, dln_weight, dln_bias, dweight, dbias). The LN output is recomputed inside
    the wgrad GEMM's prologue; dLN(x) = dout @ weight is kept in fp32 for the LN backward.

    `dres` [M, D] (not part of the contract; mlp_backward passes it): a gradient reaching x past the
    LN (the MLP's residual path), added into dx by the LN backward pass itself."""
    dw = torch.empty_like(weight)
    _ln_wgrad(dout, x, ln_weight, ln_bias, mean, rstd, dw)
    db = dout.float().sum(0).to(weight.dtype) if has_bias else None
    dxn = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    gemm(dout, weight.t(), dxn)
    dx, dlnw, dlnb = layer_norm_backward_fused(
        dxn, x, ln_weight, mean, rstd, need_dbias=ln_bias is not None, dres=dres
    )
    if ln_bias is not None and dlnb is not None:
        dlnb = dlnb.to(ln_bias.dtype)
    return dx, dlnw, dlnb, dw, db


# ------------------------------------------------------------------------------------------ AOT


def aot_specs() -> list[KernelSpec]:
    """The LN kernels at the configs the launchers pick for ViT widths 192..1280 (and 4096 for the
    widest rows), fp16 and bf16; signatures from the kernels' parameter lists (statistics and partial sums fp32, eps fp32, sizes i32)."""
    f32 = "*fp32"
    specs = []
    for dt in ("fp16", "bf16"):
        for d in (768, 1280, 4096):
            block_d = triton.next_power_of_2(d)
            rows = _rows_per_program(block_d)
            specs.append(
                KernelSpec.for_kernel(
                    f"ln_fwd_res_{dt}_D{block_d}",
                    _ln_fwd_kernel,
                    dict(
                        HAS_RES=True,
                        HAS_W=True,
                        HAS_B=True,
                        STORE_Y=True,
                        ROWS=rows,
                        BLOCK_D=block_d,
                    ),
                    ptr=dt,
                    types={"mean_ptr": f32, "rstd_ptr": f32, "eps": "fp32"},
                    num_warps=_num_warps(block_d, rows),
                    divisible_by_16=("x_ptr", "res_ptr", "sum_ptr", "y_ptr", "mean_ptr", "rstd_ptr"),
                )
            )
            for dy_dt in (dt, "fp32"):
                specs.append(
                    KernelSpec.for_kernel(
                        f"ln_bwd_{dt}_dy{dy_dt}_D{block_d}",
                        _ln_bwd_kernel,
                        dict(
                            HAS_W=True,
                            HAS_DRES=True,
                            NEED_DW=True,
                            NEED_DB=True,
                            ROWS=rows,
                            BLOCK_D=block_d,
                        ),
                        ptr=dt,
                        types={
                            "dy_ptr": f"*{dy_dt}",
                            "mean_ptr": f32,
                            "rstd_ptr": f32,
                            "dw_part_ptr": f32,
                            "db_part_ptr": f32,
                        },
                        num_warps=_num_warps(block_d, rows, backward=True),
                        divisible_by_16=("dy_ptr", "x_ptr", "dx_ptr", "dres_ptr"),
                    )
                )
    return specs
