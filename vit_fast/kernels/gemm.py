"""A Triton GEMM with a fused prologue and epilogue: the building block of the layer_norm and mlp families.

    C[M, N] = epilogue( prologue(A)[M, K] @ B[N, K]^T )

A, B and C are addressed by explicit strides, so transposed operands (weight gradients, dgrad
through a [N, K] weight) are the same kernel with swapped strides, never a transpose copy.

Prologue (applied to each A tile as it is loaded, in fp32, then rounded to the operand dtype so
the tensor-core inputs are what an unfused kernel would have read from memory):
  PRO_LN_ROW  LayerNorm of the rows of A: (a - mean[m]) * rstd[m] * ln_w[k] + ln_b[k]   (forward)
  PRO_LN_COL  the same for A = X^T: statistics indexed by k, LN affine by m   (dW = dY^T LN(X))
  PRO_GELU    exact-erf GELU;  PRO_GELU_TANH  the tanh approximation;         (fc2 reads h_pre)
  PRO_GELU_QUICK  CLIP's quick GELU, x * sigmoid(1.702 x)
Epilogue (on the fp32 accumulator):
  + bias[n]; * dGELU(aux[m, n]) (EPI_DGELU / _TANH / _QUICK: fc1 dgrad); * gamma[n];
  * dps[m // tokens_per_sample]; + residual[m, n]; cast to C's dtype.

fp32 operands use IEEE fp32 dot (not TF32) so fp32 results meet the numerics rule. In the
interpreter, `tl.dot` on bf16 is wrong, so operands are upcast to fp32 there (UPCAST flag) after
being rounded to their storage dtype, which keeps the interpreted numerics those of the GPU.

The contract functions built on this GEMM live with their families: `layer_norm_linear_*` in
kernels/layer_norm.py, `linear_residual_*` and `mlp_*` in kernels/mlp.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vit_fast.kernels._common import (
    ARCHS,
    KernelSpec,
    arch_key,
    choose_config,
    grouped_tile,
    index,
    kernel_parameters,
    needs_int64,
    tile_meta,
    triton_interpreting,
)

__all__ = ["dgelu_epilogue", "gelu_prologue", "gemm"]

PRO_NONE, PRO_LN_ROW, PRO_LN_COL, PRO_GELU, PRO_GELU_TANH, PRO_GELU_QUICK = 0, 1, 2, 3, 4, 5
EPI_NONE, EPI_DGELU, EPI_DGELU_TANH, EPI_DGELU_QUICK = 0, 1, 2, 3
#: GELU variant codes shared by the prologue (PRO_GELU + code) and the epilogue (EPI_DGELU + code).
GELU_ERF, GELU_TANH, GELU_QUICK = 0, 1, 2

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TANH_C = 0.7978845608028654  # sqrt(2 / pi)


@triton.jit
def _tanh(u):
    # tanh through sigmoid: libdevice's tanh is unavailable in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gelu(x, MODE: tl.constexpr):
    """GELU of variant MODE: GELU_ERF (0), GELU_TANH (1) or GELU_QUICK (2, x * sigmoid(1.702 x))."""
    if MODE == 1:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif MODE == 2:
        return x * tl.sigmoid(1.702 * x)
    else:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _dgelu(x, MODE: tl.constexpr):
    if MODE == 1:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif MODE == 2:
        # d/dx [x s(cx)] = s + c x s (1 - s)
        sg = tl.sigmoid(1.702 * x)
        return sg + 1.702 * x * sg * (1.0 - sg)
    else:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    lnb_ptr,
    bias_ptr,
    aux_ptr,
    stride_xm,
    stride_xn,
    gamma_ptr,
    dps_ptr,
    res_ptr,
    stride_rm,
    stride_rn,
    tokens_per_sample,
    PROLOGUE: tl.constexpr,
    HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_DPS: tl.constexpr,
    HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # One program per SM walks the tiles with the grid as its stride: no tail wave of partly
        # filled SMs, and per-program setup paid once per SM instead of once per tile.
        first, last, step = tl.program_id(0), num_m * num_n, tl.num_programs(0)
    else:
        first, last, step = tl.program_id(0), tl.program_id(0) + 1, 1
    for tile in range(first, last, step):
        # Grouped order: GROUP_M row tiles share each column tile of B while it is hot in L2.
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        # Offsets in the launch's index width (see kernels._common): with IDX64 every product below,
        # row * stride and k * stride alike, is int64. The weight-gradient GEMMs reduce over K = the
        # B*T tokens, so k * stride_ak passes 2**31 there as soon as the activations do.
        offs_m = index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), IDX64)
        offs_n = index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), IDX64)
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_row = a_ptr + offs_m[:, None] * stride_am
        b_row = b_ptr + offs_n[:, None] * stride_bn

        if PROLOGUE == 1:
            mu_m = tl.load(mean_ptr + offs_m, mask=m_ok, other=0.0)
            rs_m = tl.load(rstd_ptr + offs_m, mask=m_ok, other=0.0)
        if PROLOGUE == 2:
            if HAS_LNW:
                w_m = tl.load(lnw_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
            if HAS_LNB:
                b_m = tl.load(lnb_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = index(k0 + tl.arange(0, BLOCK_K), IDX64)
            k_ok = offs_k < K
            a_mask = m_ok[:, None] & k_ok[None, :]
            a = tl.load(a_row + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
            b = tl.load(b_row + offs_k[None, :] * stride_bk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if PROLOGUE != 0:
                af = a.to(tl.float32)
                if PROLOGUE == 1:
                    af = (af - mu_m[:, None]) * rs_m[:, None]
                    if HAS_LNW:
                        af = af * tl.load(lnw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                    if HAS_LNB:
                        af = af + tl.load(lnb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                elif PROLOGUE == 2:
                    mu_k = tl.load(mean_ptr + offs_k, mask=k_ok, other=0.0)
                    rs_k = tl.load(rstd_ptr + offs_k, mask=k_ok, other=0.0)
                    af = (af - mu_k[None, :]) * rs_k[None, :]
                    if HAS_LNW:
                        af = af * w_m[:, None]
                    if HAS_LNB:
                        af = af + b_m[:, None]
                else:  # PRO_GELU + variant
                    af = _gelu(af, PROLOGUE - 3)
                # Out-of-range entries must stay 0 (LN of a padded 0 is not 0).
                a = tl.where(a_mask, af, 0.0).to(a_ptr.dtype.element_ty)
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(b))

        c_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE != 0:
            hp = tl.load(
                aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=c_mask, other=0.0
            )
            acc *= _dgelu(hp.to(tl.float32), EPILOGUE - 1)
        if HAS_GAMMA:
            acc *= tl.load(gamma_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_DPS:
            acc *= tl.load(dps_ptr + offs_m // tokens_per_sample, mask=m_ok, other=0.0).to(tl.float32)[
                :, None
            ]
        if HAS_RES:
            r = tl.load(
                res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=c_mask, other=0.0
            )
            acc += r.to(tl.float32)
        tl.store(
            c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=c_mask,
        )


# ------------------------------------------------------------------------------------ configs


class GemmConfig(NamedTuple):
    """One launch config of _gemm_kernel; `persistent`: one program per SM looping over the tiles."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    persistent: bool = False

    @property
    def name(self) -> str:
        tile = f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.warps}_s{self.stages}"
        return tile + ("_persistent" if self.persistent else "")


C = GemmConfig
#: The autotune space per arch (kernels._common.ARCHS) and operand width in bytes: on a GPU each
#: GEMM shape and variant measures these at first use and keeps the fastest (cached per GPU model,
#: vit_fast.tuning.kernels); the first of each list is the default (tuning off, CUDA graph capture,
#: 64-bit offsets). Every entry is AOT-compiled for its arch with 0 spills (aot_specs). 128x128x64
#: with 8 warps and 3 stages fits both A100 (80 KiB smem of 163) and H100; on sm_80 128x128x32 with
#: 4 warps spills in the LN-prologue wgrad, and 8 warps/4 stages in the LN-prologue forward. fp32
#: (IEEE dot, no tensor cores) uses one small tile. 256-wide tiles spill in the LN/GELU-prologue
#: and residual variants (255 registers at 8 warps; 128 at 16 warps), so none ships; on sm_80
#: 128x64x64 with 4 warps spills 8 bytes in the quick-GELU residual GEMM.
GEMM_CANDIDATES: dict[tuple[int, int], list[GemmConfig]] = {
    (80, 2): [C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 3, True), C(64, 128, 64, 4, 4), C(64, 64, 64, 4, 4),
              C(128, 128, 32, 8, 4)],
    (90, 2): [C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 3, True), C(128, 64, 64, 4, 4), C(64, 128, 64, 4, 4),
              C(64, 64, 64, 4, 4), C(128, 128, 64, 8, 5)],
    (80, 4): [C(64, 64, 16, 4, 2)],
    (90, 4): [C(64, 64, 16, 4, 2)],
}  # fmt: skip
#: The dGELU epilogue (erf + exp on the accumulator with the h_pre tile live) spills at 128x128
#: tiles on both archs in every warp/stage combination tried; 128x64 does not.
GEMM_CANDIDATES_DGELU: dict[tuple[int, int], list[GemmConfig]] = {
    (80, 2): [C(128, 64, 64, 8, 3), C(128, 64, 64, 8, 3, True), C(64, 64, 64, 4, 4), C(64, 128, 64, 8, 3)],
    (90, 2): [C(128, 64, 64, 8, 3), C(128, 64, 64, 8, 3, True), C(64, 64, 64, 4, 4), C(64, 128, 64, 8, 3),
              C(128, 64, 64, 8, 5)],
    (80, 4): [C(64, 64, 16, 4, 2)],
    (90, 4): [C(64, 64, 16, 4, 2)],
}  # fmt: skip
#: Interpreter tiles: small for small problems, so masks and several K iterations are exercised on
#: tiny shapes; larger for realistic widths, where the interpreter's per-tile overhead dominates.
#: One candidate each: the interpreter is a test tool, not a speed target (tests widen these to
#: exercise the choice itself).
INTERP_CANDIDATES = [C(32, 32, 32, 1, 1)]
INTERP_CANDIDATES_LARGE = [C(64, 64, 64, 1, 1)]


def candidates(
    device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, epilogue: int
) -> list[GemmConfig]:
    """The configs a GEMM of this shape and epilogue may launch with on `device`, default first."""
    if triton_interpreting() or device.type != "cuda":
        return INTERP_CANDIDATES if max(m, n, k) <= 256 else INTERP_CANDIDATES_LARGE
    table = GEMM_CANDIDATES if epilogue == EPI_NONE else GEMM_CANDIDATES_DGELU
    return table[(arch_key(torch.cuda.get_device_capability(device)), 4 if dtype == torch.float32 else 2)]


def _programs(config: GemmConfig, tiles: int, device: torch.device) -> int:
    """Grid size: one program per tile, or for a persistent config one per SM (2 in the
    interpreter, so its tile loop runs several iterations in tests)."""
    if not config.persistent:
        return tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return min(tiles, sms)


def gemm(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    *,
    prologue: int = PRO_NONE,
    mean: Tensor | None = None,
    rstd: Tensor | None = None,
    ln_weight: Tensor | None = None,
    ln_bias: Tensor | None = None,
    bias: Tensor | None = None,
    epilogue: int = EPI_NONE,
    aux: Tensor | None = None,
    gamma: Tensor | None = None,
    dps: Tensor | None = None,
    tokens_per_sample: int = 1,
    residual: Tensor | None = None,
) -> Tensor:
    """out[M, N] = epilogue(prologue(a)[M, K] @ b[N, K]^T), any strides (a and b may be transposed
    views). a and b must share a dtype; out may be any float dtype (fp32 for partial results).
    Offsets are 64-bit when any of a, b, out, aux, residual spans more than 2**31 - 1 elements."""
    m, k = a.shape
    n, k2 = b.shape
    assert k == k2 and tuple(out.shape) == (m, n) and a.dtype == b.dtype
    # The 1-D operands (statistics, LN affine, bias, gamma, dps) are indexed by a row, column or k
    # index, each below 2**31; only the matrices can need 64-bit offsets.
    idx64 = needs_int64(a, b, out, aux, residual)

    def launch(config: GemmConfig) -> None:
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        _gemm_kernel[(_programs(config, tiles, a.device),)](
            a,
            b,
            out,
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out.stride(0),
            out.stride(1),
            mean,
            rstd,
            ln_weight,
            ln_bias,
            bias,
            aux,
            aux.stride(0) if aux is not None else 0,
            aux.stride(1) if aux is not None else 0,
            gamma,
            dps,
            residual,
            residual.stride(0) if residual is not None else 0,
            residual.stride(1) if residual is not None else 0,
            tokens_per_sample,
            PROLOGUE=prologue,
            HAS_LNW=ln_weight is not None,
            HAS_LNB=ln_bias is not None,
            HAS_BIAS=bias is not None,
            EPILOGUE=epilogue,
            HAS_GAMMA=gamma is not None,
            HAS_DPS=dps is not None,
            HAS_RES=residual is not None,
            UPCAST=triton_interpreting(),
            IEEE=a.dtype == torch.float32,
            IDX64=idx64,
            PERSISTENT=config.persistent,
            **tile_meta(config),
        )

    configs = candidates(a.device, a.dtype, m, n, k, epilogue)
    if idx64:  # > 2**31-element operands: the default config, never measured (see GEMM_CANDIDATES)
        configs = configs[:1]
    flags = (ln_weight, ln_bias, bias, aux, gamma, dps, residual)
    config = choose_config(
        a.device, configs, launch, lambda: _tuning_key(a, b, out, prologue, epilogue, flags)
    )
    launch(config)
    return out


def _tuning_key(
    a: Tensor, b: Tensor, out: Tensor, prologue: int, epilogue: int, optional: tuple[Tensor | None, ...]
) -> str:
    """What a GEMM's speed depends on: shape, dtypes, which strides are 1 (transposed operands),
    prologue/epilogue and which optional operands are present."""
    m, k = a.shape
    unit = "".join("1" if st == 1 else "s" for st in (*a.stride(), *b.stride(), *out.stride()))
    present = "".join("1" if t is not None else "0" for t in optional)
    dtypes = f"{str(a.dtype).removeprefix('torch.')}>{str(out.dtype).removeprefix('torch.')}"
    return f"triton/gemm/{m}x{b.shape[0]}x{k}/{dtypes}/{unit}/p{prologue}e{epilogue}/{present}"


_GELU_CODES = {"none": GELU_ERF, "tanh": GELU_TANH, "quick": GELU_QUICK}


def gelu_prologue(approximate: str) -> int:
    return PRO_GELU + _GELU_CODES[approximate]


def dgelu_epilogue(approximate: str) -> int:
    return EPI_DGELU + _GELU_CODES[approximate]


# ------------------------------------------------------------------------------------------ AOT

#: The boolean constexprs of _gemm_kernel; a variant sets the ones it lists, the others are False.
_GEMM_FLAGS = ("HAS_LNW", "HAS_LNB", "HAS_BIAS", "HAS_GAMMA", "HAS_DPS", "HAS_RES")

#: Each GEMM variant the launchers issue: (name, prologue, epilogue, flags set, C is fp32, unit
#: strides). Unit strides are specialised to constexpr 1, as the JIT does for arguments equal to 1.
_GEMM_VARIANTS = (
    ("ln_row_bias", PRO_LN_ROW, EPI_NONE, ("HAS_LNW", "HAS_LNB", "HAS_BIAS"), False, ("stride_ak", "stride_bk", "stride_cn")),
    ("gelu_res", PRO_GELU, EPI_NONE, ("HAS_BIAS", "HAS_GAMMA", "HAS_DPS", "HAS_RES"), False,
     ("stride_ak", "stride_bk", "stride_cn", "stride_rn")),
    ("gelutanh_res", PRO_GELU_TANH, EPI_NONE, ("HAS_BIAS", "HAS_GAMMA", "HAS_DPS", "HAS_RES"), False,
     ("stride_ak", "stride_bk", "stride_cn", "stride_rn")),
    ("geluquick_res", PRO_GELU_QUICK, EPI_NONE, ("HAS_BIAS", "HAS_GAMMA", "HAS_DPS", "HAS_RES"), False,
     ("stride_ak", "stride_bk", "stride_cn", "stride_rn")),
    ("bias_res", PRO_NONE, EPI_NONE, ("HAS_BIAS", "HAS_GAMMA", "HAS_DPS", "HAS_RES"), False,
     ("stride_ak", "stride_bk", "stride_cn", "stride_rn")),
    ("dgrad_dgelu", PRO_NONE, EPI_DGELU, (), False, ("stride_ak", "stride_bn", "stride_cn", "stride_xn")),
    ("dgrad_dgelutanh", PRO_NONE, EPI_DGELU_TANH, (), False, ("stride_ak", "stride_bn", "stride_cn", "stride_xn")),
    ("dgrad_dgeluquick", PRO_NONE, EPI_DGELU_QUICK, (), False, ("stride_ak", "stride_bn", "stride_cn", "stride_xn")),
    ("dgrad_f32", PRO_NONE, EPI_NONE, (), True, ("stride_ak", "stride_bn", "stride_cn")),
    ("dgrad", PRO_NONE, EPI_NONE, (), False, ("stride_ak", "stride_bn", "stride_cn")),
    ("wgrad_ln", PRO_LN_COL, EPI_NONE, ("HAS_LNW", "HAS_LNB"), False, ("stride_am", "stride_bn", "stride_cm")),
    ("wgrad_gelu_f32", PRO_GELU, EPI_NONE, (), True, ("stride_am", "stride_bn", "stride_cm")),
    ("wgrad_gelutanh_f32", PRO_GELU_TANH, EPI_NONE, (), True, ("stride_am", "stride_bn", "stride_cm")),
    ("wgrad_geluquick_f32", PRO_GELU_QUICK, EPI_NONE, (), True, ("stride_am", "stride_bn", "stride_cm")),
    ("wgrad_f32", PRO_NONE, EPI_NONE, (), True, ("stride_am", "stride_bn", "stride_cn")),
)  # fmt: skip


def aot_specs() -> list[KernelSpec]:
    """Every GEMM variant the launchers issue, at every fp16/bf16 candidate config of each arch
    (the default one with 32-bit and with 64-bit offsets). Signatures come from the kernel's parameter list: pointers in
    the operand dtype but the fp32 statistics/dps (and C of the fp32 partial products), scalars
    i32 (what the JIT passes for values below 2**31: sizes and strides stay there even when a
    tensor's extent does not)."""
    specs = []
    strides = [p for p in kernel_parameters(_gemm_kernel) if p.startswith("stride")]
    for dt in ("fp16", "bf16"):
        for arch in ARCHS:
            for name, pro, epi, flags, c_f32, unit in _GEMM_VARIANTS:
                table = GEMM_CANDIDATES if epi == EPI_NONE else GEMM_CANDIDATES_DGELU
                for i, config in enumerate(table[(arch, 2)]):
                    # The default config also ships with 64-bit offsets (the only one those use).
                    for idx64 in (False, True) if i == 0 else (False,):
                        consts: dict[str, object] = dict.fromkeys(unit, 1)
                        consts |= {f: f in flags for f in _GEMM_FLAGS}
                        consts |= dict(PROLOGUE=pro, EPILOGUE=epi, UPCAST=False, IEEE=False, IDX64=idx64)
                        meta = tile_meta(config)
                        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
                        consts |= meta | dict(PERSISTENT=config.persistent)
                        types = dict.fromkeys(("mean_ptr", "rstd_ptr", "dps_ptr"), "*fp32")
                        if c_f32:
                            types["c_ptr"] = "*fp32"
                        tag = "" if i == 0 else f"_{config.name}"
                        specs.append(
                            KernelSpec.for_kernel(
                                f"gemm_{name}{tag}{'_i64' if idx64 else ''}_{dt}_sm{arch}",
                                _gemm_kernel,
                                consts,
                                ptr=dt,
                                types=types,
                                num_warps=warps,
                                num_stages=stages,
                                divisible_by_16=(
                                    "a_ptr",
                                    "b_ptr",
                                    "c_ptr",
                                    "res_ptr",
                                    "aux_ptr",
                                    "K",
                                    *[st for st in strides if st not in unit],
                                ),
                                archs=(arch,),
                            )
                        )
    return specs
