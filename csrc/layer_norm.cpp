// LayerNorm family: LayerNorm alone and LayerNorm fused into the following Linear.
//
// LN statistics are fp32 and computed per row in a parallel loop; for LN+Linear the normalised rows
// are written straight into the GEMM input buffer, then one GEMM (gemm.h: oneDNN for float32)
// produces the output with its bias. Backward recomputes the LN output from (x, mean, rstd) instead of saving it.
#include "common.h"
#include "gemm.h"

namespace vit_fast {

VF_CLONES void ln_row_forward_f32(const float* x, const float* w, const float* b, float* y, int64_t d, float eps,
                                  float* mean_out, float* rstd_out) {
  // omp simd: lets the compiler reorder these fp32 sums into vector lanes (not allowed by default).
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(d);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < d; ++i) {
    const float c = x[i] - mean;
    sq += c * c;
  }
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
  ln_apply_row_f32(x, w, b, mean, rstd, y, d);
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;
}

VF_CLONES void ln_apply_row_f32(const float* x, const float* w, const float* b, float mu, float rs, float* y,
                                int64_t d) {
  for (int64_t i = 0; i < d; ++i) {  // -O3 unswitches the loop-invariant null checks
    float v = (x[i] - mu) * rs;
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = v;
  }
}

VF_CLONES void ln_row_backward_f32(const float* dy, const float* x, const float* w, float mu, float rs,
                                   const float* extra, float* dx, float* pw, float* pb, float* xhat, float* g,
                                   int64_t d) {
  float s_g = 0.0f, s_gx = 0.0f;
#pragma omp simd reduction(+ : s_g, s_gx)
  for (int64_t i = 0; i < d; ++i) {
    const float xh = (x[i] - mu) * rs;
    const float gv = w ? dy[i] * w[i] : dy[i];
    xhat[i] = xh;
    g[i] = gv;
    s_g += gv;
    s_gx += gv * xh;
  }
  if (pw)
    for (int64_t i = 0; i < d; ++i) pw[i] += dy[i] * xhat[i];
  if (pb)
    for (int64_t i = 0; i < d; ++i) pb[i] += dy[i];
  const float c_g = s_g / static_cast<float>(d), c_gx = s_gx / static_cast<float>(d);
  for (int64_t i = 0; i < d; ++i) {
    float v = rs * (g[i] - c_g - xhat[i] * c_gx);
    if (extra) v += extra[i];
    dx[i] = v;
  }
}

namespace {

void check_ln_input(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  check_float_tensor(x, "x");
  check_dim(x, "x", 2);
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "x must be non-empty, got shape ", x.sizes());
  check_vec(weight, "ln_weight", x.size(1));
  check_vec(bias, "ln_bias", x.size(1));
}

void check_stats(const Tensor& mean, const Tensor& rstd, int64_t m) {
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu() && t->scalar_type() == at::kFloat, name,
                " must be a float32 CPU tensor");
    TORCH_CHECK(t->numel() == m, name, " must have ", m, " elements, got shape ", t->sizes());
  }
}

// Into temporary slot 0: the caller's internal GEMM operand.
Tensor recompute_ln(const Tensor& x, const Tensor& w32, const Tensor& b32, const Tensor& mean, const Tensor& rstd) {
  Tensor y = temporary(0, x.sizes(), x.scalar_type());
  VF_DISPATCH(x.scalar_type(), "layer_norm recompute", [&] {
    ln_apply_rows(x.data_ptr<scalar_t>(), ptr_or_null(w32), ptr_or_null(b32), mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), y.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return y;
}

// dx (+ optional dln_weight, dln_bias in fp32) from the gradient dy of the LN output.
std::tuple<Tensor, Tensor, Tensor> ln_backward_core(const Tensor& dy, const Tensor& x, const Tensor& w32,
                                                    bool need_w, bool need_b, const Tensor& mean,
                                                    const Tensor& rstd) {
  const int64_t m = x.size(0), d = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor dw = need_w ? at::zeros({d}, x.options().dtype(at::kFloat)) : Tensor();
  Tensor db = need_b ? at::zeros({d}, x.options().dtype(at::kFloat)) : Tensor();
  VF_DISPATCH(x.scalar_type(), "layer_norm_backward", [&] {
    ln_backward_rows<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr_or_null(w32),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(), nullptr, dx.data_ptr<scalar_t>(),
                               need_w ? dw.data_ptr<float>() : nullptr, need_b ? db.data_ptr<float>() : nullptr, m,
                               d);
  });
  return {dx, dw, db};
}

std::optional<Tensor> cast_like(const Tensor& g, const OptTensor& like) {
  if (!like.has_value() || !g.defined()) return std::nullopt;
  return g.to(like->scalar_type()).reshape(like->sizes());
}

}  // namespace

void ln_forward_into(const Tensor& x, const Tensor& w32, const Tensor& b32, double eps, Tensor& y, Tensor& mean,
                     Tensor& rstd) {
  const int64_t m = x.size(0), d = x.size(1);
  VF_DISPATCH(x.scalar_type(), "layer_norm_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* mp = mean.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    const float* w = ptr_or_null(w32);
    const float* b = ptr_or_null(b32);
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        ln_row_forward(xp + r * d, w, b, yp + r * d, d, static_cast<float>(eps), mp + r, rp + r);
    });
  });
}


std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps) {
  check_ln_input(x, weight, bias);
  const Tensor xc = x.contiguous();
  const Tensor w32 = f32_or_empty(weight), b32 = f32_or_empty(bias);
  Tensor y = at::empty_like(xc);
  Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  ln_forward_into(xc, w32, b32, eps, y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<Tensor, OptTensor, OptTensor> layer_norm_backward(const Tensor& dy, const Tensor& x,
                                                             const OptTensor& weight, const Tensor& mean,
                                                             const Tensor& rstd) {
  check_ln_input(x, weight, std::nullopt);
  check_float_tensor(dy, "dy");
  check_same_dtype(dy, x, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have shape ", x.sizes(), ", got ", dy.sizes());
  check_stats(mean, rstd, x.size(0));
  const Tensor xc = x.contiguous(), dyc = dy.contiguous();
  const Tensor w32 = f32_or_empty(weight);
  // Without an LN weight there is also no bias gradient to return (the contract returns dbias only
  // when bias was given; the caller passes weight for the affine case, and bias grad = sum(dy)).
  auto [dx, dw, db] = ln_backward_core(dyc, xc, w32, weight.has_value(), weight.has_value(), mean.contiguous(),
                                       rstd.contiguous());
  return {dx, cast_like(dw, weight), cast_like(db, weight)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_linear_forward(const Tensor& x, const OptTensor& ln_weight,
                                                             const OptTensor& ln_bias, const Tensor& weight,
                                                             const OptTensor& bias, double eps) {
  check_ln_input(x, ln_weight, ln_bias);
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 2);
  check_same_dtype(weight, x, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have shape [N, ", x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one output row, got ", weight.sizes());
  check_vec(bias, "bias", weight.size(0));
  if (bias.has_value()) check_same_dtype(*bias, x, "bias");
  const Tensor xc = x.contiguous();
  const Tensor w32 = f32_or_empty(ln_weight), b32 = f32_or_empty(ln_bias);
  Tensor xn = temporary(0, xc.sizes(), xc.scalar_type());  // the GEMM input: LN rows are written here directly
  Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  ln_forward_into(xc, w32, b32, eps, xn, mean, rstd);
  Tensor out = gemm::linear(xn, weight, bias);
  return {out, mean, rstd};
}

std::tuple<Tensor, OptTensor, OptTensor, Tensor, OptTensor> layer_norm_linear_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& weight,
    const Tensor& mean, const Tensor& rstd, bool has_bias) {
  check_ln_input(x, ln_weight, ln_bias);
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 2);
  check_same_dtype(weight, x, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have shape [N, ", x.size(1), "], got ", weight.sizes());
  check_float_tensor(dout, "dout");
  check_same_dtype(dout, x, "dout");
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({x.size(0), weight.size(0)}), "dout must have shape [", x.size(0),
              ", ", weight.size(0), "], got ", dout.sizes());
  check_stats(mean, rstd, x.size(0));
  const Tensor xc = x.contiguous(), dc = dout.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  const Tensor w32 = f32_or_empty(ln_weight), b32 = f32_or_empty(ln_bias);
  const Tensor xn = recompute_ln(xc, w32, b32, mc, rc);
  Tensor dweight = gemm::mm_tn(dc, xn);
  OptTensor dbias;
  if (has_bias) dbias = column_sum_f32(dc).to(weight.scalar_type());
  const Tensor dxn = gemm::mm(dc, weight);
  auto [dx, dw, db] = ln_backward_core(dxn, xc, w32, ln_weight.has_value(), ln_bias.has_value(), mc, rc);
  return {dx, cast_like(dw, ln_weight), cast_like(db, ln_bias), dweight, dbias};
}

}  // namespace vit_fast
