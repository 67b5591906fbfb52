// bfloat16 tile GEMMs for the attention kernels, bf16 operands, fp32 accumulation and output: oneDNN's
// batch-reduce GEMM micro-kernel as libtorch_cpu exports it (at::native::cpublas::brgemm, the kernel
// behind torch's own CPU flash attention; it takes bf16 only with AMX), else our own AVX512-BF16
// (vdpbf16ps) micro-kernel on the same packed layout (CPUs with AVX512-BF16 but no AMX: AMD Zen 4/5).
//
// The B operand must be in oneDNN's VNNI-2 layout: pairs of consecutive K rows interleaved, in
// column blocks no wider than 64 (oneDNN's limit for this layout). PackedB builds that layout from
// any strided source in one pass, so transposed operands (K^T, V^T) need no separate transpose.
// Odd K is padded with a zero row; the column count is padded to a multiple of 16 with zeros, so the
// C tile of a call has `padded_cols()` columns (the caller's leading dimension must allow that).
//
// available() says whether this CPU and this torch build run either kernel (probed once with a tiny
// call; micro_kernel() names the one in use: "onednn_brgemm", "avx512_bf16" or "none"); the attention
// kernels then measure it against their fp32 tile path (see attention.cpp), never assume it wins.
#pragma once

#include "common.h"

namespace vit_fast::brg {

bool available();
const char* micro_kernel();

// B [k, n] as VNNI-2 column blocks: block c (columns 64c ..) holds k_even x w elements, element
// (p, j) at [(p / 2) * w * 2 + (j - 64c) * 2 + p % 2].
struct PackedB {
  std::vector<at::BFloat16> data;
  int64_t k = 0, k_even = 0, n = 0, n_pad = 0;
  int64_t padded_cols() const { return n_pad; }
};

// Packs B(p, j) = src[p * rs + j * cs] for p < k, j < n into `out` (reusing its storage).
void pack(const at::BFloat16* src, int64_t rs, int64_t cs, int64_t k, int64_t n, PackedB& out);

// Packs the fp32 matrix src[k, n] (row stride ld) into `out`, each element rounded to bf16 (nearest
// even, as narrow_bf16): the VNNI-2 layout pairs rows, so this is one vectorisable pass per row pair.
void pack_f32(const float* src, int64_t ld, int64_t k, int64_t n, PackedB& out);

// C[m, 0:n_pad] (fp32, row stride ldc) = A B (+ C when accumulate). A is bf16 [m, b.k_even] with row
// stride lda; when b.k is odd, A's column k (the padding) must be finite (B's pad row is zero).
void gemm(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB& b, float* c, int64_t ldc, bool accumulate);

// The same on a window of B: rows [row0, row0 + rows) (row0 even; rows rounded up to even, which
// must stay inside b.k_even) and the column blocks from col0 (a multiple of 64) covering `cols`
// columns; C's column 0 is B's column col0, and whole blocks are written (up to a multiple of 16, or
// to b.n_pad at the right edge).
void gemm_window(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB& b, int64_t row0, int64_t rows,
                 int64_t col0, int64_t cols, float* c, int64_t ldc, bool accumulate);

// dst[c * ld_dst + r] = src[r * ld_src + c] for a [rows, cols] matrix of 32-bit words (a bf16 pair
// or a float each; strides in words, any alignment): 16 x 16 AVX-512 blocks where the CPU has
// AVX-512F (unless `vectorised` is false: the scalar loop every CPU runs, for the tests), else a
// scalar loop. Writes only dst's [cols, rows] window.
void transpose32(const void* src, int64_t ld_src, int64_t rows, int64_t cols, void* dst, int64_t ld_dst,
                 bool vectorised = true);

// dst[c * ld + r] = src[r * rs + c] for a [rows, cols] bf16 block, with zeros in columns
// rows .. ld of dst (ld even, at least rows rounded up to even): rows pairs interleaved into `scratch`,
// then one transpose32 of the pairs.
void transpose_bf16(const at::BFloat16* src, int64_t rs, int64_t rows, int64_t cols, at::BFloat16* dst, int64_t ld,
                    std::vector<uint32_t>& scratch);

// Releases the AMX tile state the micro-kernel configured on this thread (call at the end of a
// parallel task range, as torch's flash attention does).
void release();

}  // namespace vit_fast::brg
