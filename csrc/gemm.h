// The large GEMMs of the fused CPU ops (token rows x weight matrices), behind one small interface.
//
// Two libraries ship inside libtorch_cpu: ATen's at::mm (for float32 the BLAS torch was built with,
// usually MKL) and oneDNN's inner product, reachable through the dispatcher as
// `mkldnn::_linear_pointwise` (the op Inductor emits for frozen linears). Which one is faster
// depends on the CPU, the shape, the operand layout and the dtype: MKL's sgemm picks its code path
// by CPU vendor (AVX2 kernels on AMD cores that have AVX-512), oneDNN picks its ISA from cpuid, and
// on Intel cores MKL's fp32 GEMM often beats oneDNN's inner product. So the choice is measured, not
// guessed: in "tuned" mode every GEMM key (kind, dtype, M, N, K, weight layout, bias) is timed once
// on its real operands, each candidate a few repetitions, and the median winner is kept in a table
// for the rest of the process. vit_fast.tuning loads that table from the on-disk cache (one file per
// CPU model) and saves what was measured, so a key is timed once per machine.
//
// Candidates, by call kind (names are what the table and the cache store):
//   linear  out = a w^T (+ bias): "aten" (at::addmm / at::mm), "onednn" (the weight as given when it
//           is row- or column-contiguous), "onednn_packed" (the weight copied row-contiguous first:
//           only offered when it is not already, i.e. for the dgrad products mm(dy, W)),
//           "onednn_prepacked" (the weight reordered once into oneDNN's blocked layout and kept while
//           it stays unchanged: offered only for a weight seen unchanged on three calls, i.e. in
//           inference loops; see gemm.cpp for how a change is detected).
//   tn      out = a^T b (weight gradients): "aten" (at::mm on the transposed view), "onednn_ta"
//           (a^T copied as the source), "onednn_tb" (b^T copied as the source, the product formed
//           transposed and transposed back).
//   both, bf16 only: "aten_f32" (the operands widened to fp32, at::mm, the result rounded to bf16
//           once): where the CPU has neither AVX512-BF16 nor AMX, torch's bf16 GEMM has no fast
//           kernel (an AMD EPYC Zen 3: 18 GFLOP/s against 170 for this path at M=1576, N=1536,
//           K=384) and oneDNN has no bf16 inner product at all.
// Both libraries accumulate in float32. oneDNN candidates are offered only when torch has the op,
// and a candidate that throws while being measured (say, bf16 oneDNN on a CPU without AVX-512 BF16)
// is dropped for that key.
#pragma once

#include "common.h"

#include <functional>
#include <map>

namespace vit_fast::gemm {

// out[M, N] = a[M, K] w[N, K]^T (+ bias[N]). a and w may be strided views (w typically a .t() view).
Tensor linear(const Tensor& a, const Tensor& w, const OptTensor& bias = std::nullopt);

// out[M, N] = a[M, K] b[K, N] (at::mm semantics).
inline Tensor mm(const Tensor& a, const Tensor& b) { return gemm::linear(a, b.t()); }

// out[M, N] = a[K, M]^T b[K, N]: a weight gradient (dW = dY^T X), reduced over the token rows K.
Tensor mm_tn(const Tensor& a, const Tensor& b);

// A measured choice between implementations of one call that are not GEMM-library calls (the
// attention kernels' fp32 tiles vs bf16 brgemm), through the same table, cache and modes: `cands` are
// candidate names of candidate_names(), `run(name)` runs one and returns its output (kept in `result`
// when measuring produced it). In tuned mode the table's pick for `key` when it is among `cands`, else
// each candidate timed on this call and the fastest stored; in the forced modes `fallback`.
std::string choose(const std::string& key, const std::vector<std::string>& cands,
                   const std::function<Tensor(const std::string&)>& run, Tensor& result, const std::string& fallback);

// The mode: "tuned" (per-key measured choice), "onednn" or "aten" (every float32 GEMM on that
// library; bfloat16 always at::mm, as before tuning existed).
std::string backend();
// Choose "tuned", "onednn", "aten" or "auto" (oneDNN for float32 when torch has it, else at::mm).
// Raises for an unknown name, or for "onednn" when torch was built without it. The initial mode
// comes from VIT_FAST_CPU_GEMM when set, else "auto" when VIT_FAST_TUNE=off, else "tuned".
void set_backend(const std::string& name);

// One entry of the tuned table: the pick and, when measured in this process, each candidate's
// median milliseconds (empty for an entry loaded with set_choices).
struct Choice {
  std::string pick;
  std::map<std::string, double> ms;
  bool measured = false;
};

// The table, key -> (pick, {candidate: median ms}, measured in this process).
std::map<std::string, std::tuple<std::string, std::map<std::string, double>, bool>> choices();
// Load picks (key -> candidate name) into the table, e.g. from the disk cache. Returns the keys
// refused because the name is not a known candidate; a known name that does not apply to a call
// (oneDNN missing, a different layout) makes that call measure again.
std::vector<std::string> set_choices(const std::map<std::string, std::string>& picks);
void clear_choices();
// The candidate names of each kind ("linear", "tn").
std::map<std::string, std::vector<std::string>> candidate_names();
// Prepacked weights (the "onednn_prepacked" candidate): on unless VIT_FAST_PREPACK=0; turning it off
// drops every pack. packed_info() = (weights packed, bytes of their source weights).
void set_prepacking(bool enabled);
bool prepacking();
void clear_packed();
std::tuple<int64_t, int64_t> packed_info();

// How many GEMMs each candidate ran since the last reset (measurement runs excluded).
std::map<std::string, int64_t> call_counts();
void reset_call_counts();
// Test hook: run one candidate directly. kind "linear": out = a b^T (+ bias), b is the weight
// [N, K]; kind "tn": out = a^T b.
Tensor run_candidate(const std::string& kind, const std::string& name, const Tensor& a, const Tensor& b,
                     const OptTensor& bias);

}  // namespace vit_fast::gemm
