// Shared helpers of the vit_fast CPU kernels: argument checks, dtype dispatch, vectorisable
// exp/erf/GELU, LayerNorm row kernels and the dropout hash.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace vit_fast {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------
// Checks: every public function validates before touching memory, so a bad call raises a Python
// RuntimeError (TORCH_CHECK) that names the argument.

inline void check_float_tensor(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_dim(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_vec(const OptTensor& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  check_float_tensor(*t, name);
  TORCH_CHECK(t->numel() == n, name, " must have ", n, " elements, got shape ", t->sizes());
}

inline void check_same_dtype(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but must match the input dtype ", ref.scalar_type());
}

// A float32 contiguous copy of a small parameter vector (weights, biases, gamma, dps); empty when absent.
inline Tensor f32_or_empty(const OptTensor& t) {
  if (!t.has_value()) return Tensor();
  return t->to(at::kFloat).contiguous().reshape({-1});
}

inline const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Runs `body` with scalar_t = float or at::BFloat16.
#define VF_DISPATCH(dtype, NAME, ...)                                                     \
  [&] {                                                                                   \
    if ((dtype) == at::kFloat) {                                                          \
      using scalar_t = float;                                                             \
      return __VA_ARGS__();                                                               \
    } else if ((dtype) == at::kBFloat16) {                                                \
      using scalar_t = at::BFloat16;                                                      \
      return __VA_ARGS__();                                                               \
    }                                                                                     \
    TORCH_CHECK(false, NAME, ": unsupported dtype ", (dtype), " (float32 or bfloat16)");  \
  }()

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);
}

// Float leaf loops marked VF_CLONES are compiled for AVX-512 / AVX2 / baseline and the best one is
// picked at load time (GCC target_clones): setup.py builds for baseline x86-64, which would leave the
// exp/erf polynomials and the row reductions at 4 SSE lanes. The AVX-512 clone is x86-64-v4 (F, BW,
// DQ, VL: Intel since Skylake-SP, AMD since Zen 4) so that the 16-bit bf16 <-> fp32 conversions
// vectorise at 16 lanes too; the AVX2 clone is x86-64-v3 (AVX2 + FMA + F16C: Haswell, Zen 1-3) so
// that the polynomials contract into FMAs there (plain "avx2" leaves FMA off).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VF_CLONES
#endif

// The instantiation table of a register-blocked micro-kernel template K<rows, vectors>, indexed
// [rows - 1][vectors - 1], so a tile edge picks its kernel with one lookup instead of a switch. `make`
// is a lambda template returning one instantiation's address:
//   micro_kernel_table<6, 4>([]<int R, int V>() { return &K<R, V>; })
template <int Row, typename Make, int... Vs>
constexpr auto micro_kernel_row(Make make, std::integer_sequence<int, Vs...>) {
  return std::array{make.template operator()<Row, Vs + 1>()...};
}
template <int NV, typename Make, int... Rs>
constexpr auto micro_kernel_rows(Make make, std::integer_sequence<int, Rs...>) {
  return std::array{micro_kernel_row<Rs + 1>(make, std::make_integer_sequence<int, NV>{})...};
}
template <int MR, int NV, typename Make>
constexpr auto micro_kernel_table(Make make) {
  return micro_kernel_rows<NV>(make, std::make_integer_sequence<int, MR>{});
}

// ---------------------------------------------------------------------------------------------
// Vectorisable math. std::exp / std::erf are libm calls that stop GCC from vectorising a loop, so
// the element passes use these branch-free versions built from +, *, / and bit casts only.

// exp(x) for float: range reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for
// e^r (truncation error < 6e-9 relative), then scale by 2^n through the exponent bits.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round-to-nearest via the 1.5 * 2^23 trick (exact for |v| < 2^22; we are not built with -ffast-math).
  const float v = x * 1.44269504088896341f;
  const float n = (v + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float result = p * std::bit_cast<float>(bits);
  return x <= -87.0f ? 0.0f : result;
}

// erf(x): Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), odd extension for x < 0.
inline float fast_erf(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float y = 1.0f - poly * t * fast_exp(-ax * ax);
  return x < 0.0f ? -y : y;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
// exp on 16 lanes for the hand-vectorised sweeps (attention softmax, GELU): fast_exp's range
// reduction (n = round(x / ln2), ln2 split hi + lo) and degree-7 polynomial, with vscalefps doing the
// 2^n scaling, clamping and underflow in one instruction: about half the instructions GCC makes of
// fast_exp. (Below -87 it returns denormals where fast_exp returns exactly 0.) Callers check
// use_avx512_exp() first.
#define VF_AVX512_EXP 1
#define VF_TARGET_AVX512 __attribute__((target("avx512f")))

VF_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  // Clamp as fast_exp does (exp(-104) is 0 after scaling; -inf stays finite); the constant first,
  // because max/min return their second operand when either is NaN: a NaN stays NaN.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The lanes of a 16-wide step with `left` elements still to go.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp on 8 lanes for CPUs without AVX-512 (AVX2 + FMA: Haswell, Zen 1-3), the same reduction and
// polynomial as exp16; 2^n goes in through the exponent bits as in fast_exp, so the clamp is
// fast_exp's too (x <= -87 gives exactly 0, NaN stays NaN). About 1.5x the speed of GCC's
// vectorisation of fast_exp in a softmax row sweep on a Zen 3 (its select-heavy clamping and the
// 1.5 * 2^23 rounding trick cost more than vroundps). Callers check use_avx2_exp() first.
#define VF_AVX2_EXP 1
#define VF_TARGET_AVX2 __attribute__((target("avx2,fma")))

VF_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // constant first: NaN passes through max/min
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n >= -126 after the clamp, so (n + 127) << 23 is a normal power of two.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  // Zero where x <= -87 (not-less-or-equal is true for a NaN lane: it keeps its NaN).
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLE_UQ));
}

// A row's last n % 8 elements, zero-padded to one 8-lane vector on the stack: the tails of the 8-lane
// sweeps go through it because AVX2's masked store (vmaskmovps) is microcoded on AMD Zen and cost
// more than the whole sweep saved when every step used it.
struct Tail8 {
  alignas(32) float v[8] = {};
  int64_t n;
  Tail8(const float* src, int64_t left) : n(left) { std::copy(src, src + left, v); }
  void store(float* dst) const { std::copy(v, v + n, dst); }
};
#endif

inline bool use_avx512_exp() {
#ifdef VF_AVX512_EXP
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

inline bool use_avx2_exp() {
#ifdef VF_AVX2_EXP
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoef = 0.044715f;

inline float fast_tanh(float u) {
  // tanh(u) = 1 - 2 / (exp(2u) + 1); fast_exp clamps, so large |u| saturates to +-1 cleanly.
  return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);
}

// The GELU variants of the MLP kernels (the `approximate` argument): exact (erf), PyTorch's tanh
// approximation, and the "quick" GELU of CLIP, h * sigmoid(1.702 h).
enum GeluMode : int { kGeluErf = 0, kGeluTanh = 1, kGeluQuick = 2 };
constexpr float kQuickCoef = 1.702f;

inline float fast_sigmoid(float u) { return 1.0f / (1.0f + fast_exp(-u)); }

// GELU value and derivative at h for one of the GeluMode variants.
template <int kMode>
inline void gelu_and_grad(float h, float& value, float& grad) {
  if constexpr (kMode == kGeluTanh) {
    const float u = kSqrt2OverPi * (h + kTanhCoef * h * h * h);
    const float th = fast_tanh(u);
    value = 0.5f * h * (1.0f + th);
    grad = 0.5f * (1.0f + th) + 0.5f * h * (1.0f - th * th) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * h * h);
  } else if constexpr (kMode == kGeluQuick) {
    // d/dh [h s(ch)] = s + c h s (1 - s)
    const float sg = fast_sigmoid(kQuickCoef * h);
    value = h * sg;
    grad = sg + kQuickCoef * h * sg * (1.0f - sg);
  } else {
    const float cdf = 0.5f * (1.0f + fast_erf(h * kSqrtHalf));
    value = h * cdf;
    grad = cdf + h * kInvSqrt2Pi * fast_exp(-0.5f * h * h);
  }
}

template <int kMode>
inline float gelu_value(float h) {
  if constexpr (kMode == kGeluTanh) {
    const float u = kSqrt2OverPi * (h + kTanhCoef * h * h * h);
    return 0.5f * h * (1.0f + fast_tanh(u));
  } else if constexpr (kMode == kGeluQuick) {
    return h * fast_sigmoid(kQuickCoef * h);
  } else {
    return h * 0.5f * (1.0f + fast_erf(h * kSqrtHalf));
  }
}

inline int parse_approximate(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh" || approximate == "quick",
              "approximate must be 'none', 'tanh' or 'quick', got '", approximate, "'");
  return approximate == "tanh" ? kGeluTanh : approximate == "quick" ? kGeluQuick : kGeluErf;
}

// ---------------------------------------------------------------------------------------------
// Rows in float32. Every element pass is written once, for float32 rows (the VF_CLONES kernels);
// a bfloat16 row is widened into per-thread fp32 scratch, processed there, and narrowed back with one
// round-to-nearest-even per output: the same single rounding the bf16 reference does, and no scalar
// bf16 arithmetic in any loop.

// The bf16 bits of v rounded to nearest, ties to even (as c10::BFloat16); any NaN becomes the canonical
// quiet NaN. Branch-free, so loops over it vectorise (narrow_bf16, the VNNI packing in brgemm.cpp).
inline uint32_t bf16_bits(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
}

// bfloat16 <-> float32 runs (rows.cpp; multi-target). narrow_bf16 rounds with bf16_bits.
void widen_bf16(const at::BFloat16* src, float* dst, int64_t n);
void narrow_bf16(const float* src, at::BFloat16* dst, int64_t n);

// Per-thread fp32 scratch rows (slots 0..5), grown on demand and kept for the thread's lifetime.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[6];
  auto& buf = bufs[slot];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// A per-thread tensor for one call's internal temporary (never returned, never saved for backward),
// `slot` 0..3 per dtype, kept between calls. Why: a fresh multi-MB tensor per call goes back to the OS
// when glibc trims its heap and is faulted in again, page by page, on the next call (a ViT-S/16 b8
// bf16 forward took 15k minor faults, ~20 ms of kernel time, that way). Past 256 MiB nothing is
// kept (a one-off huge batch holds no memory afterwards). The caller must not let it escape.
inline Tensor temporary(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr int64_t kKeepBytes = int64_t{256} << 20;
  thread_local std::array<std::array<Tensor, 4>, 2> kept;  // [fp32 | other][slot]
  const int64_t n = c10::multiply_integers(sizes);
  if (n * static_cast<int64_t>(c10::elementSize(dtype)) > kKeepBytes) return at::empty(sizes, at::dtype(dtype));
  Tensor& buf = kept[dtype == at::kFloat ? 0 : 1][static_cast<size_t>(slot)];
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < n) {
    buf = Tensor();  // free the old one first
    buf = at::empty({n}, at::dtype(dtype));
  }
  return buf.narrow(0, 0, n).view(sizes);
}

// Where an output row of T is computed in fp32: the row itself for float, scratch `slot` for bf16
// (then store_row narrows it into place).
template <typename T>
inline float* out_f32(T* dst, int64_t n, int slot) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch(slot, n);
  }
}

// A row of T updated in place in fp32: the row itself for float, a widened (writable) copy in scratch
// `slot` for bf16 (then store_row narrows it back).
template <typename T>
inline float* inout_f32(T* row, int64_t n, int slot) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    float* d = scratch(slot, n);
    widen_bf16(row, d, n);
    return d;
  }
}

// A row of T read as fp32: inout_f32 without the write-back (the row itself is never written).
template <typename T>
inline const float* row_f32(const T* src, int64_t n, int slot) {
  return inout_f32(const_cast<T*>(src), n, slot);
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) narrow_bf16(src, dst, n);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm rows (statistics in fp32; kernels in layer_norm.cpp). Two passes over a row that sits
// in L1: the centred variance is more accurate than E[x^2] - E[x]^2 and costs nothing measurable at
// ViT widths.

// y = (x - mean) * rstd * w + b, writing the row's mean and rstd (either pointer may be null).
void ln_row_forward_f32(const float* x, const float* w, const float* b, float* y, int64_t d, float eps,
                        float* mean_out, float* rstd_out);
// One row of the LN backward (see ln_backward_rows); xhat and g are d-float scratch, pw/pb the
// per-thread dweight/dbias partials (may be null), extra a gradient added to dx (may be null).
void ln_row_backward_f32(const float* dy, const float* x, const float* w, float mu, float rs, const float* extra,
                         float* dx, float* pw, float* pb, float* xhat, float* g, int64_t d);
// y = (x - mu) * rs * w + b with given statistics (the recompute of backward passes).
void ln_apply_row_f32(const float* x, const float* w, const float* b, float mu, float rs, float* y, int64_t d);

template <typename T>
inline void ln_row_forward(const T* x, const float* w, const float* b, T* y, int64_t d, float eps,
                           float* mean_out, float* rstd_out) {
  float* yf = out_f32(y, d, 1);
  ln_row_forward_f32(row_f32(x, d, 0), w, b, yf, d, eps, mean_out, rstd_out);
  store_row(yf, y, d);
}

// LN of every row of x [M, D] (fp32 or bf16) into y (x's dtype), saving mean and rstd [M] fp32;
// w32/b32 are the fp32 affine parameters or undefined (csrc/layer_norm.cpp).
void ln_forward_into(const at::Tensor& x, const at::Tensor& w32, const at::Tensor& b32, double eps, at::Tensor& y,
                     at::Tensor& mean, at::Tensor& rstd);

// Recompute LN(x) row by row (used by backward passes that need the normalised input for a GEMM).
template <typename T>
inline void ln_apply_rows(const T* x, const float* w, const float* b, const float* mean,
                          const float* rstd, T* y, int64_t m, int64_t d) {
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* yf = out_f32(y + r * d, d, 1);
      ln_apply_row_f32(row_f32(x + r * d, d, 0), w, b, mean[r], rstd[r], yf, d);
      store_row(yf, y + r * d, d);
    }
  });
}

// LN backward over all rows: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, plus
// `extra` (a residual gradient added in the same pass, may be null). Weight/bias gradients are
// reduced in fp32 per thread and summed at the end (no atomics, deterministic for a thread count).
template <typename T>
inline void ln_backward_rows(const T* dy, const T* x, const float* w, const float* mean, const float* rstd,
                             const T* extra, T* dx, float* dw, float* db, int64_t m, int64_t d) {
  const int nthreads = at::get_num_threads();
  const bool need_w = dw != nullptr, need_b = db != nullptr;
  std::vector<float> part_w(need_w ? static_cast<size_t>(nthreads) * d : 0, 0.0f);
  std::vector<float> part_b(need_b ? static_cast<size_t>(nthreads) * d : 0, 0.0f);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    const int tid = at::get_thread_num();
    float* pw = need_w ? part_w.data() + static_cast<size_t>(tid) * d : nullptr;
    float* pb = need_b ? part_b.data() + static_cast<size_t>(tid) * d : nullptr;
    float* xhat = scratch(4, d);
    float* g = scratch(5, d);
    for (int64_t r = r0; r < r1; ++r) {
      const float* er = extra ? row_f32(extra + r * d, d, 2) : nullptr;
      float* dxf = out_f32(dx + r * d, d, 3);
      ln_row_backward_f32(row_f32(dy + r * d, d, 0), row_f32(x + r * d, d, 1), w, mean[r], rstd[r], er, dxf, pw,
                          pb, xhat, g, d);
      store_row(dxf, dx + r * d, d);
    }
  });
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      if (need_w) dw[i] += part_w[static_cast<size_t>(t) * d + i];
      if (need_b) db[i] += part_b[static_cast<size_t>(t) * d + i];
    }
  }
}

// p[i] += s * a[i] (* other[i] when other is given): one row of a weighted column sum (rows.cpp).
void accumulate_row_f32(float* p, const float* a, const float* other, float s, int64_t n);

// Per-thread partial column sums for a parallel row pass: slot at::get_thread_num() of `nthreads`
// rows of n floats; reduce() adds them up into an fp32 [n] tensor.
struct ColumnPartials {
  int nthreads;
  int64_t n;
  std::vector<float> part;
  explicit ColumnPartials(int64_t cols)
      : nthreads(at::get_num_threads()), n(cols), part(static_cast<size_t>(nthreads) * cols, 0.0f) {}
  float* mine() { return part.data() + static_cast<size_t>(at::get_thread_num()) * n; }
  Tensor reduce() const {
    Tensor out = at::zeros({n}, at::kFloat);
    float* o = out.data_ptr<float>();
    for (int t = 0; t < nthreads; ++t)
      for (int64_t i = 0; i < n; ++i) o[i] += part[static_cast<size_t>(t) * n + i];
    return out;
  }
};

// Sum of the rows of a [m, n] matrix in fp32 (bias gradients), optionally weighted per row by
// row_scale[r / rows_per_scale] and multiplied elementwise by `other` (layer-scale gradients).
template <typename T>
inline Tensor column_sum(const T* a, const T* other, const float* row_scale, int64_t rows_per_scale,
                         int64_t m, int64_t n) {
  ColumnPartials sums(n);
  at::parallel_for(0, m, 32, [&](int64_t r0, int64_t r1) {
    float* p = sums.mine();
    for (int64_t r = r0; r < r1; ++r) {
      const float s = row_scale ? row_scale[r / rows_per_scale] : 1.0f;
      if (s == 0.0f) continue;
      accumulate_row_f32(p, row_f32(a + r * n, n, 0), other ? row_f32(other + r * n, n, 1) : nullptr, s, n);
    }
  });
  return sums.reduce();
}

// Column sums of a 2-D [m, n] tensor in fp32 (a bias gradient): at::sum for float32; for bf16 the
// rows are widened one at a time instead of casting the whole tensor to fp32 first.
inline Tensor column_sum_f32(const Tensor& g) {
  if (g.scalar_type() == at::kFloat) return at::sum(g, {0});
  const Tensor gc = g.contiguous();
  return column_sum(gc.data_ptr<at::BFloat16>(), static_cast<const at::BFloat16*>(nullptr), nullptr, 1, gc.size(0),
                    gc.size(1));
}

// ---------------------------------------------------------------------------------------------
// Counter-based dropout RNG: splitmix64's finaliser over (seed, position). Stateless, so the
// backward regenerates exactly the forward's mask from the same (seed, b, h, i, j).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits, for element `counter` of the stream `seed`.
inline float uniform01(uint64_t seed_key, uint64_t counter) {
  const uint64_t z = mix64(seed_key + counter * 0x9E3779B97F4A7C15ULL);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

inline uint64_t seed_key(int64_t seed) { return mix64(static_cast<uint64_t>(seed) ^ 0x5DEECE66DULL); }

}  // namespace vit_fast
