// Small fp32 GEMMs on attention tiles (a few hundred rows x head_dim), called thousands of times per
// step from inside a parallel region, so they must not go through the ATen dispatcher.
//
// Two implementations behind one call:
//  - "avx512": a register-blocked AVX-512 micro-kernel (6 rows x 64 columns of accumulators, masked
//    column tails, operand A read through arbitrary row/column strides so transposed operands need
//    no copy). Used when the CPU has AVX-512F.
//  - "avx2": the same at 8 lanes (6 rows x 16 columns, AVX2 + FMA) where the CPU has no AVX-512.
//  - "blas": the Fortran sgemm_ of the BLAS inside libtorch_cpu (MKL), or at::mm on views when that
//    symbol is absent. MKL runs AVX2 kernels on AMD CPUs, and its per-call setup
//    is a few microseconds on every tile, which is why the native kernels exist.
#pragma once

#include "common.h"

namespace vit_fast::tile {

// C[m, n] = alpha * A B (+ C when accumulate), with A(i, p) = a[i * a_rs + p * a_cs] (so a row-major A
// has (a_rs, a_cs) = (lda, 1) and a transposed one (1, lda)) and B(p, j) = b[p * ldb + j]. k = 0 with
// accumulate leaves C as it is. Only the n columns of each C row are read or written.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
          int64_t ldb, bool accumulate, float* c, int64_t ldc);

// "avx512", "avx2" or "blas": what gemm() runs now.
std::string backend();
// Choose "auto" (avx512 where the CPU has it, else avx2 where it has that), "avx512", "avx2" or
// "blas"; raises for an unknown name or for a micro-kernel the CPU lacks.
void set_backend(const std::string& name);

}  // namespace vit_fast::tile
