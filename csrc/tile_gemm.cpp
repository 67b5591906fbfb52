// Attention-tile GEMMs: AVX-512 micro-kernel with a BLAS fallback (see tile_gemm.h).
#include "tile_gemm.h"

#include <array>
#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VF_TILE_X86 1
// Only these functions are compiled for AVX-512 / AVX2+FMA; they run only after a cpuid check
// (set_backend).
#define VF_AVX512 __attribute__((target("avx512f")))
#define VF_AVX2 __attribute__((target("avx2,fma")))
#endif

// The BLAS that libtorch_cpu carries (MKL's Fortran sgemm_, LP64). Declared weak: on a torch build
// without it the pointer is null and the fallback uses at::mm on views.
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                                             const int* k, const float* alpha, const float* a, const int* lda,
                                             const float* b, const int* ldb, const float* beta, float* c,
                                             const int* ldc);

namespace vit_fast::tile {
namespace {

// ------------------------------------------------------------------------------------------------
// BLAS fallback. A must be row-major (a_cs == 1) or transposed (a_rs == 1), as every caller's is.

void gemm_blas(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
               const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  TORCH_CHECK(a_cs == 1 || a_rs == 1, "tile gemm: operand A needs a unit row or column stride");
  const bool trans_a = a_cs != 1;
  const int64_t lda = trans_a ? a_cs : a_rs;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (&sgemm_ != nullptr) {
    // Row-major C = op(A) B is column-major C^T = B^T op(A)^T: swap the operands, keep the flags.
    const char ta = 'N', tb = trans_a ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(std::max<int64_t>(lda, 1)),
              ildc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  Tensor ta = trans_a ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                      : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  Tensor tb = at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(tc, tc, ta, tb, beta, alpha);
}

// ------------------------------------------------------------------------------------------------
// AVX-512 micro-kernel: an MR x (16 NV) block of C in registers (MR * NV <= 24 of the 32 zmm), one
// row of B (NV vectors, the last one masked to the column tail) and MR broadcasts of A per step p.

#ifdef VF_TILE_X86
constexpr int kMR = 6;
constexpr int kNV = 4;

template <int MR, int NV>
VF_AVX512 void micro(int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                     bool accumulate, float* c, int64_t ldc, __mmask16 tail) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* brow = b + p * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? tail : 0xFFFF, brow + 16 * v);
    const float* acol = a + p * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(acol[i * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + i * ldc + 16 * v;
      const __mmask16 mask = v == NV - 1 ? tail : 0xFFFF;
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, cp));
      _mm512_mask_storeu_ps(cp, mask, r);
    }
  }
}

using MicroFn = void (*)(int64_t, float, const float*, int64_t, int64_t, const float*, int64_t, bool, float*, int64_t,
                         __mmask16);

// kKernels[rows - 1][vectors - 1]
constexpr auto kKernels = micro_kernel_table<kMR, kNV>([]<int MR, int NV>() -> MicroFn { return &micro<MR, NV>; });

VF_AVX512 void gemm_avx512(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                           const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // Column panels outermost: a panel of B (k x 64 floats) stays in L1 while every row block uses it.
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kNV) {
    const int64_t cols = std::min<int64_t>(16 * kNV, n - j0);
    const int nv = static_cast<int>((cols + 15) / 16);
    const int rem = static_cast<int>(cols % 16);
    const __mmask16 tail = rem == 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, m - i0));
      kKernels[rows - 1][nv - 1](k, alpha, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, accumulate, c + i0 * ldc + j0,
                                 ldc, tail);
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA micro-kernel, the same scheme at 8 lanes for CPUs without AVX-512 (AMD Zen 1-3, Intel
// client cores): MR x (8 NV) accumulators, MR * NV = 12 of the 16 ymm, plus NV rows of B and one
// broadcast of A. Column tails go through maskload / maskstore (masked lanes are never touched, so
// reading past the tile's last column cannot fault). MKL's sgemm_ (the BLAS fallback) costs a few
// microseconds of setup per call, which these tiles (a few hundred x 64) do not amortise.

#ifdef VF_TILE_X86
constexpr int kMR2 = 6;
constexpr int kNV2 = 2;

// Lanes [0, rem) set: the mask of an 8-wide step with rem (1..8) columns left.
VF_AVX2 inline __m256i lane_mask8(int rem) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lanes);
}

template <int MR, int NV>
VF_AVX2 void micro2(int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                    bool accumulate, float* c, int64_t ldc, int tail) {
  const __m256i mask = lane_mask8(tail);
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* brow = b + p * ldb;
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 && tail < 8 ? _mm256_maskload_ps(brow + 8 * v, mask) : _mm256_loadu_ps(brow + 8 * v);
    const float* acol = a + p * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(acol + i * a_rs);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + i * ldc + 8 * v;
      const bool part = v == NV - 1 && tail < 8;
      __m256 r = _mm256_mul_ps(acc[i][v], va);
      if (accumulate) r = _mm256_add_ps(r, part ? _mm256_maskload_ps(cp, mask) : _mm256_loadu_ps(cp));
      if (part) {
        _mm256_maskstore_ps(cp, mask, r);
      } else {
        _mm256_storeu_ps(cp, r);
      }
    }
  }
}

using MicroFn2 = void (*)(int64_t, float, const float*, int64_t, int64_t, const float*, int64_t, bool, float*, int64_t,
                          int);

// kKernels2[rows - 1][vectors - 1]
constexpr auto kKernels2 =
    micro_kernel_table<kMR2, kNV2>([]<int MR, int NV>() -> MicroFn2 { return &micro2<MR, NV>; });

VF_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                       const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // Column panels outermost, as gemm_avx512: a k x 16 panel of B stays in L1 across the row blocks.
  for (int64_t j0 = 0; j0 < n; j0 += 8 * kNV2) {
    const int64_t cols = std::min<int64_t>(8 * kNV2, n - j0);
    const int nv = static_cast<int>((cols + 7) / 8);
    const int tail = static_cast<int>(cols - 8 * (nv - 1));  // 1..8 columns in the last vector
    for (int64_t i0 = 0; i0 < m; i0 += kMR2) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR2, m - i0));
      kKernels2[rows - 1][nv - 1](k, alpha, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, accumulate, c + i0 * ldc + j0,
                                  ldc, tail);
    }
  }
}
#endif

bool cpu_has_avx2() {
#ifdef VF_TILE_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef VF_TILE_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

enum class Backend { kAvx512, kAvx2, kBlas };

Backend parse(const std::string& name) {
  if (name == "blas") return Backend::kBlas;
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "tile GEMM backend 'avx512' requested but this CPU (or build) has no AVX-512F");
    return Backend::kAvx512;
  }
  if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "tile GEMM backend 'avx2' requested but this CPU (or build) has no AVX2 + FMA");
    return Backend::kAvx2;
  }
  TORCH_CHECK(name == "auto", "tile GEMM backend must be 'auto', 'avx512', 'avx2' or 'blas', got '", name, "'");
  return cpu_has_avx512() ? Backend::kAvx512 : (cpu_has_avx2() ? Backend::kAvx2 : Backend::kBlas);
}

std::atomic<Backend>& current() {
  static std::atomic<Backend> value{parse("auto")};
  return value;
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
          int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
#ifdef VF_TILE_X86
  const Backend be = current().load(std::memory_order_relaxed);
  if (be == Backend::kAvx512) {
    gemm_avx512(m, n, k, alpha, a, a_rs, a_cs, b, ldb, accumulate, c, ldc);
    return;
  }
  if (be == Backend::kAvx2) {
    gemm_avx2(m, n, k, alpha, a, a_rs, a_cs, b, ldb, accumulate, c, ldc);
    return;
  }
#endif
  gemm_blas(m, n, k, alpha, a, a_rs, a_cs, b, ldb, accumulate, c, ldc);
}

std::string backend() {
  switch (current().load()) {
    case Backend::kAvx512:
      return "avx512";
    case Backend::kAvx2:
      return "avx2";
    default:
      return "blas";
  }
}

void set_backend(const std::string& name) { current().store(parse(name)); }

}  // namespace vit_fast::tile
