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
  } catch (const std::exception&) {
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
    } catch (const std::exception&) {
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

#ifdef VF_BRG_DPBF16
#define VF_AVX512F __attribute__((target("avx512f")))
// One 16 x 16 block of transpose32 (rows, cols <= 16: masked loads and stores). Rows are interleaved
// at 32 and 64 bits, which leaves each 128-bit lane holding 4 rows of one column; two rounds of
// 128-bit lane shuffles then gather a column's four lanes into one register.
VF_AVX512F void transpose_block16(const uint32_t* s, int64_t ls, int rows, int cols, uint32_t* d, int64_t ld) {
  const __mmask16 col_mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  const __mmask16 row_mask = static_cast<__mmask16>(rows >= 16 ? 0xFFFFu : (1u << rows) - 1u);
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_epi32(col_mask, s + i * ls) : _mm512_setzero_si512();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4g + c], lane L: column 4L + c of rows 4g .. 4g + 3.
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88),
                  y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    const __m512i out[4] = {_mm512_shuffle_i32x4(x0, y0, 0x88), _mm512_shuffle_i32x4(x1, y1, 0x88),
                            _mm512_shuffle_i32x4(x0, y0, 0xDD), _mm512_shuffle_i32x4(x1, y1, 0xDD)};
    for (int l = 0; l < 4; ++l)  // out[l] is column 4l + c
      if (4 * l + c < cols) _mm512_mask_storeu_epi32(d + (4 * l + c) * ld, row_mask, out[l]);
  }
}

VF_AVX512F void transpose32_avx512(const uint32_t* s, int64_t ls, int64_t rows, int64_t cols, uint32_t* d,
                                   int64_t ld) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t j0 = 0; j0 < cols; j0 += 16)
      transpose_block16(s + i0 * ls + j0, ls, static_cast<int>(std::min<int64_t>(16, rows - i0)),
                        static_cast<int>(std::min<int64_t>(16, cols - j0)), d + j0 * ld + i0, ld);
}
#endif
}  // namespace

void transpose32(const void* src, int64_t ld_src, int64_t rows, int64_t cols, void* dst, int64_t ld_dst,
                 bool vectorised) {
#ifdef VF_BRG_DPBF16
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && vectorised) {
    transpose32_avx512(static_cast<const uint32_t*>(src), ld_src, rows, cols, static_cast<uint32_t*>(dst), ld_dst);
    return;
  }
#endif
  // memcpy: the words may sit at any 2-byte boundary (bf16 pairs of a strided view).
  const auto* sb = static_cast<const char*>(src);
  auto* db = static_cast<char*>(dst);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(db + 4 * (c * ld_dst + r), sb + 4 * (r * ld_src + c), sizeof(uint32_t));
}

void transpose_bf16(const at::BFloat16* src, int64_t rs, int64_t rows, int64_t cols, at::BFloat16* dst, int64_t ld,
                    std::vector<uint32_t>& scratch) {
  // Pair p of the interleaved rows holds (src[2p, c], src[2p + 1, c]) at column c: exactly the two
  // adjacent bf16 of dst row c at columns 2p, 2p + 1.
  const int64_t pairs = ld / 2;
  scratch.resize(static_cast<size_t>(pairs * cols));
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* row = scratch.data() + p * cols;
    if (2 * p >= rows)
      std::memset(row, 0, static_cast<size_t>(cols) * sizeof(uint32_t));
    else
      interleave_rows(s + 2 * p * rs, 2 * p + 1 < rows ? s + (2 * p + 1) * rs : nullptr, row, cols);
  }
  transpose32(scratch.data(), cols, pairs, cols, dst, pairs);
}

void pack(const at::BFloat16* src, int64_t rs, int64_t cs, int64_t k, int64_t n, PackedB& out) {
  shape_for(out, k, n);
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data.data());
  for (int64_t j0 = 0; j0 < out.n_pad; j0 += kBlock) {
    const int64_t w = std::min(kBlock, out.n_pad - j0), wn = std::max<int64_t>(0, std::min(w, n - j0));
    uint16_t* blk = d + j0 * out.k_even;
    if (rs == 1 && k % 2 == 0 && cs % 2 == 0) {
      // B's rows p, p + 1 are adjacent in memory (B is a transposed view, e.g. K^T): each VNNI pair
      // is one 32-bit word of the source, so the block is a 32-bit transpose.
      uint32_t* b32 = reinterpret_cast<uint32_t*>(blk);
      transpose32(s + j0 * cs, cs / 2, wn, k / 2, b32, w);
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
