// MLP family: the attention output projection with its residual epilogue (linear_residual) and the
// whole pre-LN MLP sub-block (LN + fc1 + bias + GELU, fc2 + bias + layer-scale + drop-path + residual).
//
// GEMMs go through gemm.h (the library measured fastest per shape). Everything between them is one parallel,
// vectorisable pass:
//   forward  fc1: h_pre = xn W1^T + b1 (bias in the GEMM; saved), then a = GELU(h_pre) (GEMM input of fc2)
//            fc2 epilogue: out = x + (acc + b2) * gamma * dps[row / T], in place on the GEMM output
//   backward GELU pass:    a = GELU(h_pre), dh = da * GELU'(h_pre) and fc1's bias gradient (the column
//                          sums of dh) in one sweep (shared erf/exp)
//            LN pass:      dx = LN-backward(dxn) + dout (the residual path), with dln_w/dln_b partials
// The float32 element passes are VF_CLONES (multi-target, see common.h).
#include "common.h"
#include "gemm.h"

namespace vit_fast {
namespace {

// ----- element passes: float32 row kernels (multi-target), bf16 rows through common.h's scratch ----

template <int kMode>
inline __attribute__((always_inline)) void gelu_body(const float* h, float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = gelu_value<kMode>(h[i]);
}

template <int kMode>
inline __attribute__((always_inline)) void gelu_backward_body(const float* h, float* a, float* da, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float value, grad;
    gelu_and_grad<kMode>(h[i], value, grad);
    a[i] = value;
    da[i] *= grad;
  }
}

VF_CLONES void gelu_generic(const float* h, float* a, int64_t n, int mode) {
  if (mode == kGeluTanh)
    gelu_body<kGeluTanh>(h, a, n);
  else if (mode == kGeluQuick)
    gelu_body<kGeluQuick>(h, a, n);
  else
    gelu_body<kGeluErf>(h, a, n);
}

// a = GELU(h) and da *= GELU'(h) in one sweep (shared erf/exp).
VF_CLONES void gelu_backward_generic(const float* h, float* a, float* da, int64_t n, int mode) {
  if (mode == kGeluTanh)
    gelu_backward_body<kGeluTanh>(h, a, da, n);
  else if (mode == kGeluQuick)
    gelu_backward_body<kGeluQuick>(h, a, da, n);
  else
    gelu_backward_body<kGeluErf>(h, a, da, n);
}

#ifdef VF_AVX512_EXP
// The exact (erf) GELU and its derivative on 16 lanes: the same Abramowitz & Stegun erf as
// fast_erf, its reciprocal from rcp14 plus one Newton step (error ~2^-28) instead of a division, and
// one exp16 shared by erf (exp(-x^2), x = h / sqrt 2) and the derivative's density term (the same
// exp(-h^2 / 2)). GCC's vectorisation of gelu_and_grad divides and computes that exp twice.
VF_TARGET_AVX512 inline __m512 gelu_erf16(__m512 h, __m512* grad) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 x = _mm512_mul_ps(h, _mm512_set1_ps(kSqrtHalf));
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 d = _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), one);
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp16(_mm512_fnmadd_ps(ax, ax, _mm512_setzero_ps()));
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, one);  // erf(|x|)
  const __m512 erf = _mm512_mask_sub_ps(y, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                                        _mm512_setzero_ps(), y);
  const __m512 cdf = _mm512_fmadd_ps(erf, _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
  if (grad != nullptr) *grad = _mm512_fmadd_ps(_mm512_mul_ps(h, _mm512_set1_ps(kInvSqrt2Pi)), e, cdf);
  return _mm512_mul_ps(h, cdf);
}

VF_TARGET_AVX512 void gelu_erf_avx512(const float* h, float* a, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(a + i, k, gelu_erf16(_mm512_maskz_loadu_ps(k, h + i), nullptr));
  }
}

VF_TARGET_AVX512 void gelu_erf_backward_avx512(const float* h, float* a, float* da, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    __m512 grad;
    _mm512_mask_storeu_ps(a + i, k, gelu_erf16(_mm512_maskz_loadu_ps(k, h + i), &grad));
    _mm512_mask_storeu_ps(da + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, da + i), grad));
  }
}
#endif

#ifdef VF_AVX2_EXP
// gelu_erf16 on 8 lanes (AVX2 + FMA): rcp_ps is good to 12 bits, its Newton step to ~2^-23. 2x the
// speed of GCC's vectorisation of gelu_and_grad on a Zen 3 ([197, 1536] backward sweep: 0.55 ms
// against 1.15 ms, one core).
VF_TARGET_AVX2 inline __m256 gelu_erf8(__m256 h, __m256* grad) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  const __m256 x = _mm256_mul_ps(h, _mm256_set1_ps(kSqrtHalf));
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 d = _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), one);
  __m256 t = _mm256_rcp_ps(d);
  t = _mm256_mul_ps(t, _mm256_fnmadd_ps(d, t, _mm256_set1_ps(2.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_mul_ps(_mm256_xor_ps(ax, sign), ax));  // exp(-x^2)
  const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, one);      // erf(|x|) >= 0
  const __m256 erf = _mm256_or_ps(y, _mm256_and_ps(x, sign));          // with x's sign
  const __m256 cdf = _mm256_fmadd_ps(erf, _mm256_set1_ps(0.5f), _mm256_set1_ps(0.5f));
  if (grad != nullptr) *grad = _mm256_fmadd_ps(_mm256_mul_ps(h, _mm256_set1_ps(kInvSqrt2Pi)), e, cdf);
  return _mm256_mul_ps(h, cdf);
}

VF_TARGET_AVX2 void gelu_erf_avx2(const float* h, float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, gelu_erf8(_mm256_loadu_ps(h + i), nullptr));
  if (i == n) return;
  Tail8 t(h + i, n - i);
  _mm256_store_ps(t.v, gelu_erf8(_mm256_load_ps(t.v), nullptr));
  t.store(a + i);
}

VF_TARGET_AVX2 void gelu_erf_backward_avx2(const float* h, float* a, float* da, int64_t n) {
  int64_t i = 0;
  __m256 grad;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(a + i, gelu_erf8(_mm256_loadu_ps(h + i), &grad));
    _mm256_storeu_ps(da + i, _mm256_mul_ps(_mm256_loadu_ps(da + i), grad));
  }
  if (i == n) return;
  Tail8 th(h + i, n - i), td(da + i, n - i);
  _mm256_store_ps(th.v, gelu_erf8(_mm256_load_ps(th.v), &grad));
  _mm256_store_ps(td.v, _mm256_mul_ps(_mm256_load_ps(td.v), grad));
  th.store(a + i);
  td.store(da + i);
}
#endif

void gelu_f32(const float* h, float* a, int64_t n, int mode) {
#ifdef VF_AVX512_EXP
  if (mode == kGeluErf && use_avx512_exp()) return gelu_erf_avx512(h, a, n);
#endif
#ifdef VF_AVX2_EXP
  if (mode == kGeluErf && use_avx2_exp()) return gelu_erf_avx2(h, a, n);
#endif
  gelu_generic(h, a, n, mode);
}

// a = GELU(h) and da *= GELU'(h) in one sweep.
void gelu_backward_f32(const float* h, float* a, float* da, int64_t n, int mode) {
#ifdef VF_AVX512_EXP
  if (mode == kGeluErf && use_avx512_exp()) return gelu_erf_backward_avx512(h, a, da, n);
#endif
#ifdef VF_AVX2_EXP
  if (mode == kGeluErf && use_avx2_exp()) return gelu_erf_backward_avx2(h, a, da, n);
#endif
  gelu_backward_generic(h, a, da, n, mode);
}

// y = res + (y + bias) * gamma * s, in place on y (bias, gamma may be null).
VF_CLONES void residual_row_f32(float* y, const float* res, const float* bias, const float* gamma, float s,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) {  // -O3 unswitches the loop-invariant null checks
    float v = y[i];
    if (bias) v += bias[i];
    if (gamma) v *= gamma[i];
    y[i] = res[i] + v * s;
  }
}

// o = d * gamma * s (gamma may be null).
VF_CLONES void scale_row_f32(const float* d, const float* gamma, float s, float* o, int64_t n) {
  if (gamma) {
    for (int64_t i = 0; i < n; ++i) o[i] = d[i] * gamma[i] * s;
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = d[i] * s;
  }
}

template <typename T>
void gelu_row(const T* h, T* a, int64_t n, int mode) {
  float* af = out_f32(a, n, 1);
  gelu_f32(row_f32(h, n, 0), af, n, mode);
  store_row(af, a, n);
}

// a = GELU(h), da *= GELU'(h) for one row; with colsum, also colsum += the new da (in fp32, while
// the row is in cache: fc1's bias gradient without another pass over [M, F]).
template <typename T>
void gelu_backward_row(const T* h, T* a, T* da, int64_t n, int mode, float* colsum) {
  float* af = out_f32(a, n, 2);
  float* daf = inout_f32(da, n, 1);
  gelu_backward_f32(row_f32(h, n, 0), af, daf, n, mode);
  if (colsum != nullptr) accumulate_row_f32(colsum, daf, nullptr, 1.0f, n);
  store_row(af, a, n);
  store_row(daf, da, n);
}

// out = res + (y + bias) * gamma * dps[row / tps], written over y (the fresh GEMM output).
template <typename T>
void residual_epilogue(T* y, const T* res, const float* bias, const float* gamma, const float* dps, int64_t tps,
                       int64_t m, int64_t n) {
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = dps ? dps[r / tps] : 1.0f;
      float* yf = inout_f32(y + r * n, n, 0);
      residual_row_f32(yf, row_f32(res + r * n, n, 1), bias, gamma, s, n);
      store_row(yf, y + r * n, n);
    }
  });
}

// dy = dout * gamma * dps[row / tps]: the gradient reaching the GEMM output through the epilogue.
template <typename T>
Tensor scale_grad(const Tensor& dout, const float* gamma, const float* dps, int64_t tps) {
  if (!gamma && !dps) return dout;
  Tensor dy = at::empty_like(dout);
  const int64_t m = dout.size(0), n = dout.size(1);
  const T* d = dout.data_ptr<T>();
  T* o = dy.data_ptr<T>();
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* of = out_f32(o + r * n, n, 1);
      scale_row_f32(row_f32(d + r * n, n, 0), gamma, dps ? dps[r / tps] : 1.0f, of, n);
      store_row(of, o + r * n, n);
    }
  });
  return dy;
}

// ----- checks -----------------------------------------------------------------------------------

void check_matrix(const Tensor& t, const char* name, const Tensor& like) {
  check_float_tensor(t, name);
  check_dim(t, name, 2);
  check_same_dtype(t, like, name);
}

void check_epilogue_args(const OptTensor& gamma, const OptTensor& dps, int64_t tps, int64_t m, int64_t n) {
  check_vec(gamma, "gamma", n);
  TORCH_CHECK(tps > 0, "tokens_per_sample must be positive, got ", tps);
  if (dps.has_value()) {
    TORCH_CHECK(m % tps == 0, "rows (", m, ") must be a multiple of tokens_per_sample (", tps, ")");
    check_vec(dps, "dps", m / tps);
  }
}

OptTensor grad_as(const Tensor& g32, const OptTensor& like) {
  if (!like.has_value()) return std::nullopt;
  return g32.to(like->scalar_type()).reshape(like->sizes());
}

}  // namespace

// ================================ linear_residual =================================================

Tensor linear_residual_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& residual,
                               const OptTensor& gamma, const OptTensor& dps, int64_t tokens_per_sample) {
  check_float_tensor(x, "x");
  check_dim(x, "x", 2);
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "x must be non-empty, got shape ", x.sizes());
  check_matrix(weight, "weight", x);
  TORCH_CHECK(weight.size(1) == x.size(1) && weight.size(0) > 0, "weight must have shape [N, ", x.size(1), "], got ",
              weight.sizes());
  const int64_t m = x.size(0), n = weight.size(0);
  check_vec(bias, "bias", n);
  check_matrix(residual, "residual", x);
  TORCH_CHECK(residual.sizes() == at::IntArrayRef({m, n}), "residual must have shape [", m, ", ", n, "], got ",
              residual.sizes());
  check_epilogue_args(gamma, dps, tokens_per_sample, m, n);
  const Tensor b32 = f32_or_empty(bias), g32 = f32_or_empty(gamma), s32 = f32_or_empty(dps);
  const Tensor res = residual.contiguous();
  Tensor out = gemm::linear(x, weight);
  VF_DISPATCH(x.scalar_type(), "linear_residual_forward", [&] {
    residual_epilogue(out.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(), ptr_or_null(b32), ptr_or_null(g32),
                      ptr_or_null(s32), tokens_per_sample, m, n);
  });
  return out;
}

std::tuple<Tensor, Tensor, OptTensor, Tensor, OptTensor> linear_residual_backward(
    const Tensor& dout, const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& gamma,
    const OptTensor& dps, int64_t tokens_per_sample, bool needs_gamma_grad) {
  check_float_tensor(x, "x");
  check_dim(x, "x", 2);
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "x must be non-empty, got shape ", x.sizes());
  check_matrix(weight, "weight", x);
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have shape [N, ", x.size(1), "], got ", weight.sizes());
  const int64_t m = x.size(0), n = weight.size(0);
  check_vec(bias, "bias", n);
  check_matrix(dout, "dout", x);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({m, n}), "dout must have shape [", m, ", ", n, "], got ", dout.sizes());
  check_epilogue_args(gamma, dps, tokens_per_sample, m, n);
  const Tensor g32 = f32_or_empty(gamma), s32 = f32_or_empty(dps), b32 = f32_or_empty(bias);
  const Tensor dc = dout.contiguous();
  Tensor dresidual = dc.clone();  // a custom op may not return an alias of its input
  OptTensor dbias, dgamma;
  if (x.scalar_type() == at::kFloat && gamma.has_value()) {
    // fp32 with layer-scale: with ds = dout * dps and G = ds^T x, dW = gamma * G, dx = ds (gamma * W),
    // dbias = gamma * colsum(ds) and dgamma_c = sum_k W_ck G_ck + b_c colsum(ds)_c, so the
    // pre-scale output y = x W^T + b never has to be recomputed (one GEMM saved). bf16 keeps the
    // path below, which rounds exactly where the reference does.
    const Tensor ds = scale_grad<float>(dc, nullptr, ptr_or_null(s32), tokens_per_sample);
    const Tensor gcol = g32.unsqueeze(1);
    const Tensor G = gemm::mm_tn(ds, x);
    Tensor dx = gemm::mm(ds, weight * gcol);
    Tensor dweight = G * gcol;
    const Tensor cs = at::sum(ds, {0});
    if (bias.has_value()) dbias = grad_as(cs * g32, bias);
    if (needs_gamma_grad) {
      Tensor g = (weight * G).sum(1);
      if (bias.has_value()) g += b32 * cs;
      dgamma = grad_as(g, gamma);
    }
    return {dx, dweight, dbias, dresidual, dgamma};
  }
  Tensor dy = VF_DISPATCH(x.scalar_type(), "linear_residual_backward", [&] {
    return scale_grad<scalar_t>(dc, ptr_or_null(g32), ptr_or_null(s32), tokens_per_sample);
  });
  Tensor dx = gemm::mm(dy, weight);
  Tensor dweight = gemm::mm_tn(dy, x);
  if (bias.has_value()) dbias = grad_as(column_sum_f32(dy), bias);
  if (needs_gamma_grad && gamma.has_value()) {
    // d gamma_c = sum_r dout_rc * dps_r * y_rc needs the pre-scale GEMM output y: recompute it.
    Tensor y = gemm::linear(x, weight, bias);
    Tensor g = VF_DISPATCH(x.scalar_type(), "linear_residual_backward", [&] {
      return column_sum<scalar_t>(dc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null(s32),
                                  tokens_per_sample, m, n);
    });
    dgamma = grad_as(g, gamma);
  }
  return {dx, dweight, dbias, dresidual, dgamma};
}

// ===================================== LN + MLP ===================================================

namespace {

struct MlpDims {
  int64_t m, d, f;
};

MlpDims check_mlp(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& fc1_weight,
                  const Tensor& fc2_weight, const OptTensor& fc2_bias, const OptTensor& gamma, const OptTensor& dps,
                  int64_t tps) {
  check_float_tensor(x, "x");
  check_dim(x, "x", 2);
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "x must be non-empty, got shape ", x.sizes());
  const int64_t m = x.size(0), d = x.size(1);
  check_vec(ln_weight, "ln_weight", d);
  check_vec(ln_bias, "ln_bias", d);
  check_matrix(fc1_weight, "fc1_weight", x);
  TORCH_CHECK(fc1_weight.size(1) == d && fc1_weight.size(0) > 0, "fc1_weight must have shape [F, ", d, "], got ",
              fc1_weight.sizes());
  const int64_t f = fc1_weight.size(0);
  check_matrix(fc2_weight, "fc2_weight", x);
  TORCH_CHECK(fc2_weight.sizes() == at::IntArrayRef({d, f}), "fc2_weight must have shape [", d, ", ", f, "], got ",
              fc2_weight.sizes());
  check_vec(fc2_bias, "fc2_bias", d);
  check_epilogue_args(gamma, dps, tps, m, d);
  return {m, d, f};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> mlp_forward(const Tensor& x, const OptTensor& ln_weight,
                                                       const OptTensor& ln_bias, const Tensor& fc1_weight,
                                                       const OptTensor& fc1_bias, const Tensor& fc2_weight,
                                                       const OptTensor& fc2_bias, double eps, const OptTensor& gamma,
                                                       const OptTensor& dps, int64_t tokens_per_sample,
                                                       const std::string& approximate) {
  const MlpDims s = check_mlp(x, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias, gamma, dps, tokens_per_sample);
  check_vec(fc1_bias, "fc1_bias", s.f);
  const int gelu_mode = parse_approximate(approximate);
  const Tensor xc = x.contiguous();
  const Tensor lw = f32_or_empty(ln_weight), lb = f32_or_empty(ln_bias);
  const OptTensor b1 = fc1_bias.has_value() ? OptTensor(fc1_bias->to(x.scalar_type()).reshape({-1})) : std::nullopt;
  const Tensor b2 = f32_or_empty(fc2_bias), g32 = f32_or_empty(gamma), s32 = f32_or_empty(dps);

  Tensor xn = temporary(0, xc.sizes(), xc.scalar_type());
  Tensor mean = at::empty({s.m}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({s.m}, x.options().dtype(at::kFloat));
  ln_forward_into(xc, lw, lb, eps, xn, mean, rstd);
  Tensor h_pre = gemm::linear(xn, fc1_weight, b1);  // bias added by the GEMM
  Tensor act = temporary(1, h_pre.sizes(), h_pre.scalar_type());
  VF_DISPATCH(x.scalar_type(), "mlp_forward", [&] {
    const scalar_t* hp = h_pre.data_ptr<scalar_t>();
    scalar_t* ap = act.data_ptr<scalar_t>();
    at::parallel_for(0, s.m, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) gelu_row(hp + r * s.f, ap + r * s.f, s.f, gelu_mode);
    });
  });
  Tensor out = gemm::linear(act, fc2_weight);
  VF_DISPATCH(x.scalar_type(), "mlp_forward", [&] {
    residual_epilogue(out.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), ptr_or_null(b2), ptr_or_null(g32),
                      ptr_or_null(s32), tokens_per_sample, s.m, s.d);
  });
  return {out, mean, rstd, h_pre};
}

std::tuple<Tensor, OptTensor, OptTensor, Tensor, OptTensor, Tensor, OptTensor, OptTensor> mlp_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
    const Tensor& fc1_weight, const Tensor& fc2_weight, const OptTensor& fc2_bias, const OptTensor& gamma,
    const OptTensor& dps, int64_t tokens_per_sample, const Tensor& mean, const Tensor& rstd, const Tensor& h_pre,
    const std::string& approximate, bool has_fc1_bias, bool needs_gamma_grad) {
  const MlpDims s = check_mlp(x, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias, gamma, dps, tokens_per_sample);
  const int gelu_mode = parse_approximate(approximate);
  check_matrix(dout, "dout", x);
  TORCH_CHECK(dout.sizes() == x.sizes(), "dout must have shape ", x.sizes(), ", got ", dout.sizes());
  check_matrix(h_pre, "h_pre", x);
  TORCH_CHECK(h_pre.sizes() == at::IntArrayRef({s.m, s.f}), "h_pre must have shape [", s.m, ", ", s.f, "], got ",
              h_pre.sizes());
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == s.m, name,
                " must be a float32 CPU tensor with ", s.m, " elements");
  }
  const Tensor xc = x.contiguous(), dc = dout.contiguous(), hc = h_pre.contiguous();
  const Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const Tensor lw = f32_or_empty(ln_weight), lb = f32_or_empty(ln_bias);
  const Tensor g32 = f32_or_empty(gamma), s32 = f32_or_empty(dps);

  // fp32 with layer-scale: differentiate through gamma analytically (as in linear_residual_backward)
  // instead of recomputing fc2's output: ds = dout * dps, da = ds (gamma * W2), G2 = ds^T a,
  // dW2 = gamma * G2, dgamma = rowsum(W2 * G2) + b2 * colsum(ds).
  const bool analytic_gamma = x.scalar_type() == at::kFloat && gamma.has_value();
  Tensor dy2 = VF_DISPATCH(x.scalar_type(), "mlp_backward", [&] {
    return scale_grad<scalar_t>(dc, analytic_gamma ? nullptr : ptr_or_null(g32), ptr_or_null(s32),
                                tokens_per_sample);
  });
  const Tensor gcol = analytic_gamma ? g32.unsqueeze(1) : Tensor();
  // da = dy2 W2, then one pass turns it into dh = da * GELU'(h_pre) and recomputes a = GELU(h_pre).
  Tensor dh = gemm::mm(dy2, analytic_gamma ? fc2_weight * gcol : fc2_weight);
  Tensor act = temporary(1, hc.sizes(), hc.scalar_type());
  ColumnPartials db1(has_fc1_bias ? s.f : 0);
  VF_DISPATCH(x.scalar_type(), "mlp_backward", [&] {
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    scalar_t* ap = act.data_ptr<scalar_t>();
    scalar_t* dp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, s.m, 8, [&](int64_t r0, int64_t r1) {
      float* colsum = has_fc1_bias ? db1.mine() : nullptr;
      for (int64_t r = r0; r < r1; ++r)
        gelu_backward_row(hp + r * s.f, ap + r * s.f, dp + r * s.f, s.f, gelu_mode, colsum);
    });
  });
  Tensor dfc2_w = gemm::mm_tn(dy2, act);
  OptTensor dfc2_b, dgamma;
  if (analytic_gamma) {
    const Tensor cs = at::sum(dy2, {0});
    if (fc2_bias.has_value()) dfc2_b = grad_as(cs * g32, fc2_bias);
    if (needs_gamma_grad) {
      Tensor g = (fc2_weight * dfc2_w).sum(1);
      if (fc2_bias.has_value()) g += f32_or_empty(fc2_bias) * cs;
      dgamma = grad_as(g, gamma);
    }
    dfc2_w = dfc2_w * gcol;
  } else {
    if (fc2_bias.has_value()) dfc2_b = grad_as(column_sum_f32(dy2), fc2_bias);
    if (needs_gamma_grad && gamma.has_value()) {
      Tensor y2 = gemm::linear(act, fc2_weight, fc2_bias);
      Tensor g = VF_DISPATCH(x.scalar_type(), "mlp_backward", [&] {
        return column_sum<scalar_t>(dc.data_ptr<scalar_t>(), y2.data_ptr<scalar_t>(), ptr_or_null(s32),
                                    tokens_per_sample, s.m, s.d);
      });
      dgamma = grad_as(g, gamma);
    }
  }
  act = Tensor();  // free [M, F] before the next allocations
  OptTensor dfc1_b;
  if (has_fc1_bias) dfc1_b = db1.reduce().to(fc1_weight.scalar_type());
  Tensor xn = temporary(0, xc.sizes(), xc.scalar_type());
  VF_DISPATCH(x.scalar_type(), "mlp_backward", [&] {
    ln_apply_rows(xc.data_ptr<scalar_t>(), ptr_or_null(lw), ptr_or_null(lb), mc.data_ptr<float>(),
                  rc.data_ptr<float>(), xn.data_ptr<scalar_t>(), s.m, s.d);
  });
  Tensor dfc1_w = gemm::mm_tn(dh, xn);
  Tensor dxn = gemm::mm(dh, fc1_weight);
  Tensor dx = at::empty_like(xc);
  Tensor dlw = ln_weight.has_value() ? at::zeros({s.d}, at::kFloat) : Tensor();
  Tensor dlb = ln_bias.has_value() ? at::zeros({s.d}, at::kFloat) : Tensor();
  VF_DISPATCH(x.scalar_type(), "mlp_backward", [&] {
    ln_backward_rows<scalar_t>(dxn.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), ptr_or_null(lw),
                               mc.data_ptr<float>(), rc.data_ptr<float>(), dc.data_ptr<scalar_t>(),
                               dx.data_ptr<scalar_t>(), dlw.defined() ? dlw.data_ptr<float>() : nullptr,
                               dlb.defined() ? dlb.data_ptr<float>() : nullptr, s.m, s.d);
  });
  OptTensor dlw_out = ln_weight.has_value() ? grad_as(dlw, ln_weight) : std::nullopt;
  OptTensor dlb_out = ln_bias.has_value() ? grad_as(dlb, ln_bias) : std::nullopt;
  return {dx, dlw_out, dlb_out, dfc1_w, dfc1_b, dfc2_w, dfc2_b, dgamma};
}

}  // namespace vit_fast
