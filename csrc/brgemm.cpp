// bf16 tile GEMMs through oneDNN's micro-kernel, or our AVX512-BF16 one where oneDNN's does not run
// (see brgemm.h).
#include "brgemm.h"

#include <ATen/native/CPUBlas.h>

#include <array>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VF_BRG_DPBF16 1
// Only these functions are compiled for AVX512-BF16; they run only after a cpuid check (available()).
#define VF_DPBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace vit_fast::brg {
namespace {
constexpr int64_t kBlock = 64;  // widest VNNI column block oneDNN's pack layout allows

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Sizes `out` for a [k, n] B operand: K padded to even, N to a multiple of 16 (storage reused).
void shape_for(PackedB& out, int64_t k, int64_t n) {
  out.k = k;
  out.k_even = k + (k & 1);
  out.n = n;
  out.n_pad = round_up(n, 16);
  out.data.resize(static_cast<size_t>(out.k_even * out.n_pad));
}

// ------------------------------------------------------------------------------------------------
// Our micro-kernel for CPUs where torch's brgemm does not run (it needs AMX for bf16, e.g. AMD Zen 4 /
// Zen 5 have AVX512-BF16 but no AMX). The VNNI-2 block layout is exactly what vdpbf16ps consumes: one
// row pair of a 16-column slice is one zmm of 32 bf16, and a pair of A's elements is one 32-bit
// broadcast, so C[MR, 16 NV] += A[MR, 2] B[2, 16 NV] is NV * MR instructions per row pair, fp32
// accumulators in registers (MR * NV <= 24 of the 32 zmm).

#ifdef VF_BRG_DPBF16
constexpr int kMR = 6;
constexpr int kNV = kBlock / 16;

template <int MR, int NV>
VF_DPBF16 void dot_micro(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* blk, int64_t w, float* c,
                         int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p2 = 0; p2 < pairs; ++p2) {
    const uint16_t* brow = blk + p2 * w * 2;
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(brow + 32 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p2, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + i * ldc + 16 * v;
      __m512 r = acc[i][v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_loadu_ps(cp));
      _mm512_storeu_ps(cp, r);
    }
  }
}

using DotFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool);

// kDot[rows - 1][vectors - 1]
constexpr auto kDot = micro_kernel_table<kMR, kNV>([]<int MR, int NV>() -> DotFn { return &dot_micro<MR, NV>; });

// One column block (w a multiple of 16, at most 64): C[m, w] (+)= A[m, k] B_blk[k, w], k even.
void dot_block(int64_t m, int64_t w, int64_t k, const at::BFloat16* a, int64_t lda, const at::BFloat16* blk,
               float* c, int64_t ldc, bool accumulate) {
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(blk);
  const int nv = static_cast<int>(w / 16);
  for (int64_t i0 = 0; i0 < m; i0 += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, m - i0));
    kDot[rows - 1][nv - 1](k / 2, a16 + i0 * lda, lda, b16, w, c + i0 * ldc, ldc, accumulate);
  }
}
#endif

enum class Kernel { kNone, kOneDnn, kDpbf16 };

// Which micro-kernel runs the tile products here: oneDNN's when torch's brgemm takes bf16 on this CPU,
// else ours when the CPU has AVX512-BF16, else none (the attention kernels keep their fp32 tiles).
Kernel pick_kernel() {
  try {
    if (at::native::cpublas::could_pack(at::kBFloat16)) return Kernel::kOneDnn;
  } catch (const c10::Error&) {
  }
#ifdef VF_BRG_DPBF16
  if (__builtin_cpu_supports("avx512bf16")) return Kernel::kDpbf16;
#endif
  return Kernel::kNone;
}

Kernel kernel() {
  static const Kernel k = pick_kernel();
  return k;
}
}  // namespace

const char* micro_kernel() {
  switch (kernel()) {
    case Kernel::kOneDnn:
      return "onednn_brgemm";
    case Kernel::kDpbf16:
      return "avx512_bf16";
    default:
      return "none";
  }
}

bool available() {
  static const bool ok = [] {
    try {
      if (kernel() == Kernel::kNone) return false;
      // A 2 x 16 x 2 product of ones: raises where the micro-kernel is missing; check the value too.
      PackedB b;
      std::vector<at::BFloat16> ones(32, at::BFloat16(1.0f)), a(4, at::BFloat16(1.0f));
      pack(ones.data(), 16, 1, 2, 16, b);
      std::vector<float> c(32, 0.0f);
      gemm(2, a.data(), 2, b, c.data(), 16, false);
      release();
      for (float v : c)
        if (v != 2.0f) return false;
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok;
}

namespace {
// One VNNI row pair from two contiguous bf16 rows: out[j] = r0[j] | r1[j] << 16 (r1 null: zero row).
VF_CLONES void interleave_rows(const uint16_t* r0, const uint16_t* r1, uint32_t* out, int64_t n) {
  if (r1) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<uint32_t>(r0[j]) | (static_cast<uint32_t>(r1[j]) << 16);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = r0[j];
  }
}
}  // namespace

void pack(const at::BFloat16* src, int64_t rs, int64_t cs, int64_t k, int64_t n, PackedB& out) {
  shape_for(out, k, n);
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data.data());
  for (int64_t j0 = 0; j0 < out.n_pad; j0 += kBlock) {
    const int64_t w = std::min(kBlock, out.n_pad - j0), wn = std::max<int64_t>(0, std::min(w, n - j0));
    uint16_t* blk = d + j0 * out.k_even;
    if (rs == 1 && k % 2 == 0) {
      // B's rows p, p + 1 are adjacent in memory (B is a transposed view, e.g. K^T): each VNNI pair
      // is one 32-bit word of the source, so the block is a 32-bit transpose.
      uint32_t* b32 = reinterpret_cast<uint32_t*>(blk);
      for (int64_t j = 0; j < wn; ++j) {
        const uint16_t* col = s + (j0 + j) * cs;
        for (int64_t p2 = 0; p2 < k / 2; ++p2) std::memcpy(b32 + p2 * w + j, col + 2 * p2, sizeof(uint32_t));
      }
      for (int64_t p2 = 0; p2 < k / 2 && wn < w; ++p2)
        std::memset(b32 + p2 * w + wn, 0, static_cast<size_t>(w - wn) * sizeof(uint32_t));
      continue;
    }
    for (int64_t p = 0; p < out.k_even; p += 2) {
      uint16_t* row = blk + (p / 2) * w * 2;
      const bool second = p + 1 < k;
      if (cs == 1) {  // rows contiguous (e.g. V): interleave two rows
        interleave_rows(s + p * rs + j0, second ? s + (p + 1) * rs + j0 : nullptr, reinterpret_cast<uint32_t*>(row),
                        wn);
        if (wn < w) std::memset(row + 2 * wn, 0, static_cast<size_t>(2 * (w - wn)) * sizeof(uint16_t));
        continue;
      }
      for (int64_t j = 0; j < wn; ++j) {
        row[2 * j] = s[p * rs + (j0 + j) * cs];
        row[2 * j + 1] = second ? s[(p + 1) * rs + (j0 + j) * cs] : uint16_t{0};
      }
      if (wn < w) std::memset(row + 2 * wn, 0, static_cast<size_t>(2 * (w - wn)) * sizeof(uint16_t));
    }
  }
}

namespace {
// One VNNI row pair of a block: out[j] = bf16(r0[j]) | bf16(r1[j]) << 16 (r1 null: a zero pad row).
VF_CLONES void pair_row(const float* r0, const float* r1, uint32_t* out, int64_t n) {
  if (r1) {
    for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits(r0[j]) | (bf16_bits(r1[j]) << 16);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits(r0[j]);
  }
}
}  // namespace

void pack_f32(const float* src, int64_t ld, int64_t k, int64_t n, PackedB& out) {
  shape_for(out, k, n);
  uint32_t* d = reinterpret_cast<uint32_t*>(out.data.data());  // one uint32 = one (row pair, column)
  for (int64_t j0 = 0; j0 < out.n_pad; j0 += kBlock) {
    const int64_t w = std::min(kBlock, out.n_pad - j0), wn = std::max<int64_t>(0, std::min(w, n - j0));
    uint32_t* blk = d + j0 * out.k_even / 2;
    for (int64_t p = 0; p < out.k_even; p += 2) {
      uint32_t* row = blk + (p / 2) * w;
      pair_row(src + p * ld + j0, p + 1 < k ? src + (p + 1) * ld + j0 : nullptr, row, wn);
      if (wn < w) std::memset(row + wn, 0, static_cast<size_t>(w - wn) * sizeof(uint32_t));
    }
  }
}

void gemm_window(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB& b, int64_t row0, int64_t rows,
                 int64_t col0, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  const int64_t k = rows + (rows & 1);
  TORCH_CHECK(row0 % 2 == 0 && row0 + k <= b.k_even && col0 % kBlock == 0 && col0 + cols <= b.n_pad,
              "brgemm window out of range");
  for (int64_t j0 = col0; j0 < col0 + cols; j0 += kBlock) {
    const int64_t w = std::min(kBlock, b.n_pad - j0);
    const at::BFloat16* blk = b.data.data() + j0 * b.k_even + row0 * w;
#ifdef VF_BRG_DPBF16
    if (kernel() == Kernel::kDpbf16) {
      dot_block(m, w, k, a, lda, blk, c + (j0 - col0), ldc, accumulate);
      continue;
    }
#endif
    at::native::cpublas::brgemm(m, w, k, lda, w, ldc, accumulate, a, blk, c + (j0 - col0), /*is_vnni=*/true);
  }
}

void gemm(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB& b, float* c, int64_t ldc, bool accumulate) {
  gemm_window(m, a, lda, b, 0, b.k, 0, b.n, c, ldc, accumulate);
}

void release() {
  if (kernel() == Kernel::kOneDnn) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

}  // namespace vit_fast::brg
