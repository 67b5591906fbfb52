// Patch-embed family: image -> tokens [cls, reg..., patches...] with bias and position embedding.
//
// The projection has two candidates, chosen per shape by measurement (gemm::choose, the GEMM
// table and its disk cache): "patch_conv", ATen's stride-p convolution without bias (oneDNN's
// implicit GEMM), and "patch_gemm", the non-overlapping patches gathered into a dense [B*N, K]
// matrix and multiplied by the weight seen as [D, K] through gemm::linear (itself a measured
// library choice). Which wins depends on the CPU: on an AMD EPYC Zen 5 the gather + GEMM took
// 172 us against the convolution's 464 us (ViT-S/16, batch 1, bf16); an earlier Intel measurement
// favoured the convolution. A single parallel epilogue pass then reads the projection by strides
// (both candidates' outputs are [B, D, gh, gw] views), adds bias + pos_embed in fp32 and writes
// every token at its final offset, prefix tokens (+ their pos embed) included.
// Backward: one pass gathers the patch-token gradients into [B, gh, gw, D] (also the bias / pos /
// prefix reductions over the batch, in fp32). dW and (when asked) dimages come from the same two
// candidates: ATen's convolution backward on that gradient seen as channels-last [B, D, gh, gw], or
// dW = dY^T patches (gemm::mm_tn) and dpatches = dY W (gemm::mm) scattered back onto the image.
#include "common.h"
#include "gemm.h"

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

// The table key of one patch-embed pass: the GEMM it is (M patch rows, K = C p p, N = D).
std::string choice_key(const char* pass, const PatchShape& s, at::ScalarType dt, bool image_grad = false) {
  return std::string(pass) + "/" + (dt == at::kFloat ? "fp32" : "bf16") + "/M=" + std::to_string(s.batch * s.n) +
         ",K=" + std::to_string(s.k) + ",N=" + std::to_string(s.d) + ",p=" + std::to_string(s.p) +
         (image_grad ? "/dimages" : "");
}

// The patches as a dense [B*N, K] matrix, row b*N + gy*gw + gx, column c*p*p + i*p + j: pixel
// (b, c, gy*p + i, gx*p + j). Reads the images by their strides (any layout); pixels past the last
// whole patch (H or W not a multiple of p) are not read, as in the stride-p convolution.
template <typename T>
Tensor gather_patches(const Tensor& images, const PatchShape& s) {
  Tensor patches = at::empty({s.batch * s.n, s.k}, images.options());
  const T* img = images.data_ptr<T>();
  T* out = patches.data_ptr<T>();
  const int64_t st0 = images.stride(0), st1 = images.stride(1), st2 = images.stride(2), st3 = images.stride(3);
  at::parallel_for(0, s.batch * s.n, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / s.n, gy = (r % s.n) / s.gw, gx = r % s.gw;
      T* o = out + r * s.k;
      for (int64_t c = 0; c < s.channels; ++c)
        for (int64_t i = 0; i < s.p; ++i) {
          const T* src = img + b * st0 + c * st1 + (gy * s.p + i) * st2 + gx * s.p * st3;
          if (st3 == 1)
            std::copy_n(src, s.p, o);
          else
            for (int64_t j = 0; j < s.p; ++j) o[j] = src[j * st3];
          o += s.p;
        }
    }
  });
  return patches;
}

// The inverse of gather_patches: dpatches [B*N, K] written back as an image gradient [B, C, H, W]
// (zero for the pixels no patch covers).
template <typename T>
Tensor scatter_patches(const Tensor& dpatches, const PatchShape& s, const at::TensorOptions& opts) {
  const bool covered = s.gh * s.p == s.height && s.gw * s.p == s.width;
  Tensor dimages = covered ? at::empty({s.batch, s.channels, s.height, s.width}, opts)
                           : at::zeros({s.batch, s.channels, s.height, s.width}, opts);
  const T* src = dpatches.data_ptr<T>();
  T* img = dimages.data_ptr<T>();
  at::parallel_for(0, s.batch * s.n, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / s.n, gy = (r % s.n) / s.gw, gx = r % s.gw;
      const T* row = src + r * s.k;
      for (int64_t c = 0; c < s.channels; ++c)
        for (int64_t i = 0; i < s.p; ++i, row += s.p)
          std::copy_n(row, s.p, img + ((b * s.channels + c) * s.height + gy * s.p + i) * s.width + gx * s.p);
    }
  });
  return dimages;
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
    // [B, D, gh, gw] in any layout: the convolution's output, or the GEMM's [B*N, D] seen so.
    auto project = [&](const std::string& name) -> Tensor {
      if (name == "patch_conv") return at::conv2d(images, weight, {}, {s.p, s.p});
      return gemm::linear(gather_patches<scalar_t>(images, s), weight.reshape({s.d, s.k}))
          .view({s.batch, s.gh, s.gw, s.d})
          .permute({0, 3, 1, 2});
    };
    Tensor proj;
    const std::string pick = gemm::choose(choice_key("patch_embed_fwd", s, images.scalar_type()),
                                          {"patch_conv", "patch_gemm"}, project, proj, "patch_gemm");
    if (!proj.defined()) proj = project(pick);
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

    // dW (and dimages) by the measured candidate. The measuring call keeps the winner's dW; the
    // pick runs once more when dimages is asked, so both gradients come from one candidate.
    Tensor di;
    auto grads = [&](const std::string& name) -> Tensor {
      if (name == "patch_conv") {
        // [B, gh, gw, D] seen as channels-last [B, D, gh, gw]: the conv's output gradient, no copy.
        const Tensor go = gp.view({s.batch, s.gh, s.gw, s.d}).permute({0, 3, 1, 2});
        auto [dimg, dw, unused] = at::convolution_backward(go, images, weight, std::nullopt, {s.p, s.p}, {0, 0},
                                                           {1, 1}, false, {0, 0}, 1, {needs_image_grad, true, false});
        di = dimg;
        return dw;
      }
      if (needs_image_grad)
        di = scatter_patches<scalar_t>(gemm::mm(gp, weight.reshape({s.d, s.k})), s, images.options());
      return gemm::mm_tn(gp, gather_patches<scalar_t>(images, s)).view(weight.sizes());
    };
    Tensor dw;
    const std::string pick = gemm::choose(choice_key("patch_embed_bwd", s, dt, needs_image_grad),
                                          {"patch_conv", "patch_gemm"}, grads, dw, "patch_gemm");
    if (!dw.defined() || needs_image_grad) dw = grads(pick);
    dweight = dw.to(weight.scalar_type()).contiguous();
    if (needs_image_grad) dimages = di;
  });
  return {dimages, dweight, dbias, dpos, dcls, dreg};
}

}  // namespace vit_fast
