// Patch-embed family: image -> tokens [cls, reg..., patches...] with bias and position embedding.
//
// The projection is ATen's stride-p convolution without bias (oneDNN's implicit GEMM: on a CPU it beat
// an explicit patch gather + at::mm, measured in vit-fast bench --ops patch_embed); a single parallel epilogue
// pass then reads its output by strides, adds bias + pos_embed and writes every token at its final
// offset, prefix tokens (+ their pos embed) included.
// Backward: one pass gathers the patch-token gradients into [B, gh, gw, D] (also the bias / pos /
// prefix reductions over the batch, in fp32); viewed as a channels-last [B, D, gh, gw] tensor it
// feeds ATen's convolution backward for dW and (when asked) dimages.
#include "common.h"

namespace vit_fast {
namespace {

struct PatchShape {
  int64_t batch, channels, height, width, p, gh, gw, n, k, d, prefix, tokens;
  bool has_cls;
  int64_t num_reg;
};

PatchShape make_shape(const Tensor& images, const Tensor& weight, int64_t patch_size, bool has_cls, int64_t num_reg) {
  check_float_tensor(images, "images");
  check_dim(images, "images", 4);
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 4);
  check_same_dtype(weight, images, "weight");
  TORCH_CHECK(patch_size > 0, "patch_size must be positive, got ", patch_size);
  TORCH_CHECK(images.size(0) > 0, "images must have a non-empty batch, got shape ", images.sizes());
  TORCH_CHECK(weight.size(1) == images.size(1) && weight.size(2) == patch_size && weight.size(3) == patch_size,
              "weight must have shape [D, ", images.size(1), ", ", patch_size, ", ", patch_size, "], got ",
              weight.sizes());
  PatchShape s{};
  s.batch = images.size(0);
  s.channels = images.size(1);
  s.height = images.size(2);
  s.width = images.size(3);
  s.p = patch_size;
  s.gh = s.height / patch_size;
  s.gw = s.width / patch_size;
  TORCH_CHECK(s.gh > 0 && s.gw > 0, "images (", s.height, " x ", s.width, ") smaller than patch_size ", patch_size);
  s.n = s.gh * s.gw;
  s.k = s.channels * patch_size * patch_size;
  s.d = weight.size(0);
  s.has_cls = has_cls;
  s.num_reg = num_reg;
  s.prefix = (has_cls ? 1 : 0) + num_reg;
  s.tokens = s.prefix + s.n;
  return s;
}

}  // namespace

Tensor patch_embed_forward(const Tensor& images, const Tensor& weight, const OptTensor& bias,
                           const OptTensor& pos_embed, const OptTensor& cls_token, const OptTensor& reg_tokens,
                           int64_t patch_size, bool no_embed_class) {
  const int64_t num_reg = reg_tokens.has_value() ? reg_tokens->size(-2) : 0;
  const PatchShape s = make_shape(images, weight, patch_size, cls_token.has_value(), num_reg);
  check_vec(bias, "bias", s.d);
  check_vec(cls_token, "cls_token", s.d);
  if (reg_tokens.has_value()) {
    check_float_tensor(*reg_tokens, "reg_tokens");
    TORCH_CHECK(reg_tokens->dim() == 3 && reg_tokens->size(0) == 1 && reg_tokens->size(2) == s.d,
                "reg_tokens must have shape [1, R, ", s.d, "], got ", reg_tokens->sizes());
  }
  const int64_t pos_len = no_embed_class ? s.n : s.tokens;
  if (pos_embed.has_value()) {
    check_float_tensor(*pos_embed, "pos_embed");
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(1) == pos_len &&
                    pos_embed->size(2) == s.d,
                "pos_embed must have shape [1, ", pos_len, ", ", s.d, "], got ", pos_embed->sizes());
  }
  const Tensor b32 = f32_or_empty(bias), pos32 = f32_or_empty(pos_embed), cls32 = f32_or_empty(cls_token),
               reg32 = f32_or_empty(reg_tokens);
  Tensor tokens = at::empty({s.batch, s.tokens, s.d}, images.options());
  VF_DISPATCH(images.scalar_type(), "patch_embed_forward", [&] {
    const Tensor proj = at::conv2d(images, weight, {}, {s.p, s.p});  // [B, D, gh, gw], any layout
    const scalar_t* pp = proj.data_ptr<scalar_t>();
    const int64_t ps0 = proj.stride(0), ps1 = proj.stride(1), ps2 = proj.stride(2), ps3 = proj.stride(3);
    scalar_t* out = tokens.data_ptr<scalar_t>();
    const float* bp = ptr_or_null(b32);
    const float* pos = ptr_or_null(pos32);
    const float* cls = ptr_or_null(cls32);
    const float* reg = ptr_or_null(reg32);
    // pos row for token t: patches only (offset -prefix) with no_embed_class, every token otherwise.
    at::parallel_for(0, s.batch * s.tokens, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / s.tokens, t = r % s.tokens;
        scalar_t* o = out + r * s.d;
        const float* prow = nullptr;
        if (pos) {
          if (!no_embed_class)
            prow = pos + t * s.d;
          else if (t >= s.prefix)
            prow = pos + (t - s.prefix) * s.d;
        }
        const float* src32 = nullptr;
        if (t < s.prefix) src32 = (s.has_cls && t == 0) ? cls : reg + (t - (s.has_cls ? 1 : 0)) * s.d;
        if (src32) {
          for (int64_t i = 0; i < s.d; ++i) o[i] = from_f<scalar_t>(src32[i] + (prow ? prow[i] : 0.0f));
        } else {
          const int64_t n = t - s.prefix;
          const scalar_t* g = pp + b * ps0 + (n / s.gw) * ps2 + (n % s.gw) * ps3;
          for (int64_t i = 0; i < s.d; ++i) {
            float v = to_f(g[i * ps1]);
            if (bp) v += bp[i];
            if (prow) v += prow[i];
            o[i] = from_f<scalar_t>(v);
          }
        }
      }
    });
  });
  return tokens;
}

std::tuple<OptTensor, Tensor, OptTensor, OptTensor, OptTensor, OptTensor> patch_embed_backward(
    const Tensor& grad, const Tensor& images, const Tensor& weight, bool has_bias, bool has_pos, bool has_cls,
    int64_t num_reg, int64_t patch_size, bool no_embed_class, bool needs_image_grad) {
  TORCH_CHECK(num_reg >= 0, "num_reg must be >= 0, got ", num_reg);
  const PatchShape s = make_shape(images, weight, patch_size, has_cls, num_reg);
  check_float_tensor(grad, "grad");
  check_same_dtype(grad, images, "grad");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({s.batch, s.tokens, s.d}), "grad must have shape [", s.batch, ", ",
              s.tokens, ", ", s.d, "], got ", grad.sizes());
  const Tensor gc = grad.contiguous();
  const auto dt = images.scalar_type();
  OptTensor dimages, dbias, dpos, dcls, dreg;
  Tensor dweight;
  VF_DISPATCH(dt, "patch_embed_backward", [&] {
    const scalar_t* g = gc.data_ptr<scalar_t>();
    // Patch-token gradients as a dense [B * N, D] GEMM operand.
    Tensor gp = at::empty({s.batch * s.n, s.d}, images.options());
    scalar_t* gpp = gp.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.n, 32, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / s.n, n = r % s.n;
        std::copy_n(g + (b * s.tokens + s.prefix + n) * s.d, s.d, gpp + r * s.d);
      }
    });
    // Sums over the batch, per token, in fp32: pos_embed gradient and the prefix tokens' gradients.
    Tensor tok_sum = at::zeros({s.tokens, s.d}, at::kFloat);
    float* ts = tok_sum.data_ptr<float>();
    at::parallel_for(0, s.tokens, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t b = 0; b < s.batch; ++b) {
          const scalar_t* row = g + (b * s.tokens + t) * s.d;
          for (int64_t i = 0; i < s.d; ++i) ts[t * s.d + i] += to_f(row[i]);
        }
    });
    if (has_bias) dbias = tok_sum.narrow(0, s.prefix, s.n).sum(0).to(weight.scalar_type());
    if (has_pos) {
      Tensor p = no_embed_class ? tok_sum.narrow(0, s.prefix, s.n) : tok_sum;
      dpos = p.unsqueeze(0).to(dt, /*non_blocking=*/false, /*copy=*/true);  // own storage: never alias
    }
    if (has_cls) dcls = tok_sum.narrow(0, 0, 1).reshape({1, 1, s.d}).to(dt, false, true);
    if (num_reg > 0) dreg = tok_sum.narrow(0, has_cls ? 1 : 0, num_reg).unsqueeze(0).to(dt, false, true);

    // [B, gh, gw, D] seen as channels-last [B, D, gh, gw]: the conv's output gradient, no copy.
    const Tensor go = gp.view({s.batch, s.gh, s.gw, s.d}).permute({0, 3, 1, 2});
    auto [di, dw, unused] = at::convolution_backward(go, images, weight, std::nullopt, {s.p, s.p}, {0, 0}, {1, 1},
                                                     false, {0, 0}, 1, {needs_image_grad, true, false});
    dweight = dw;
    if (needs_image_grad) dimages = di;
  });
  return {dimages, dweight, dbias, dpos, dcls, dreg};
}

}  // namespace vit_fast
