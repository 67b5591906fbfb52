// The large GEMMs of the fused CPU ops (token rows x weight matrices), behind one small interface.
//
// Why not at::mm: for float32 ATen calls the BLAS it was built with (MKL), and MKL's sgemm picks its
// code path by CPU vendor: on AMD CPUs it runs AVX2 kernels even where the core has AVX-512.
// oneDNN, which ships inside libtorch_cpu, picks its ISA from cpuid features instead. Its inner
// product is reachable through the dispatcher as `mkldnn::_linear_pointwise` (the op Inductor emits
// for frozen linears) and takes plain strided CPU tensors. Measured at ViT-S shapes on this
// project's 2-core AMD EPYC (Zen 5): ~420-500 GFLOP/s vs ~210 for at::mm (benchmarks/cpu_ops.py
// --gemm). On CPUs where MKL already uses AVX-512 the two are close; `set_backend("aten")` (or
// VIT_FAST_CPU_GEMM=aten) switches back, and the fallback is automatic when torch has no oneDNN.
// Both backends accumulate in float32; bfloat16 always goes through at::mm (ATen already sends it to
// oneDNN when the CPU has AVX-512 BF16/BW support).
#pragma once

#include "common.h"

namespace vit_fast::gemm {

// out[M, N] = a[M, K] w[N, K]^T (+ bias[N]). a and w may be strided views (w typically a .t() view).
Tensor linear(const Tensor& a, const Tensor& w, const OptTensor& bias = std::nullopt);

// out[M, N] = a[M, K] b[K, N] (at::mm semantics).
inline Tensor mm(const Tensor& a, const Tensor& b) { return gemm::linear(a, b.t()); }

// out[M, N] = a[K, M]^T b[K, N]: a weight gradient (dW = dY^T X), reduced over the token rows K.
Tensor mm_tn(const Tensor& a, const Tensor& b);

// "onednn" or "aten": the backend the float32 GEMMs use now.
std::string backend();
// Choose "onednn", "aten" or "auto" (oneDNN when torch has it). Raises for an unknown name, or for
// "onednn" when torch was built without it.
void set_backend(const std::string& name);

}  // namespace vit_fast::gemm
