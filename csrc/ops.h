// Declarations of the backend functions of docs/backend_contract.md (one .cpp per op family),
// bound to Python in vit_fast.cpp under exactly the contract's names.
#pragma once

#include "common.h"

namespace vit_fast {

// attention.cpp
std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, int64_t num_heads, double scale, double dropout_p,
                                             int64_t seed);
Tensor attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                          int64_t num_heads, double scale, double dropout_p, int64_t seed);
// Variable length: qkv rows [R, 3D], table int64 CPU [2, N] = (first row, length) per sequence,
// max_len >= every length; out [R, D] and lse [H, R] zero outside every sequence when zero_fill
// (unwritten otherwise), dqkv [R, 3D] zero there.
std::tuple<Tensor, Tensor> attention_varlen_forward(const Tensor& qkv, const Tensor& table, int64_t max_len,
                                                    bool zero_fill, int64_t num_heads, double scale, double dropout_p,
                                                    int64_t seed);
Tensor attention_varlen_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                                 const Tensor& table, int64_t max_len, int64_t num_heads, double scale,
                                 double dropout_p, int64_t seed);

// The bf16 attention kernels this CPU runs ("attn_tiles"; "attn_brgemm" where oneDNN's bf16
// micro-kernel runs), and the forced choice: "auto" (measured per shape, the default) or one of them.
std::vector<std::string> attention_kernels();
std::string attention_kernel();
void set_attention_kernel(const std::string& name);

// layer_norm.cpp
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps);
std::tuple<Tensor, OptTensor, OptTensor> layer_norm_backward(const Tensor& dy, const Tensor& x,
                                                             const OptTensor& weight, const Tensor& mean,
                                                             const Tensor& rstd);
std::tuple<Tensor, Tensor, Tensor> layer_norm_linear_forward(const Tensor& x, const OptTensor& ln_weight,
                                                             const OptTensor& ln_bias, const Tensor& weight,
                                                             const OptTensor& bias, double eps);
std::tuple<Tensor, OptTensor, OptTensor, Tensor, OptTensor> layer_norm_linear_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& weight,
    const Tensor& mean, const Tensor& rstd, bool has_bias);

// mlp.cpp
Tensor linear_residual_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& residual,
                               const OptTensor& gamma, const OptTensor& dps, int64_t tokens_per_sample);
std::tuple<Tensor, Tensor, OptTensor, Tensor, OptTensor> linear_residual_backward(
    const Tensor& dout, const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& gamma,
    const OptTensor& dps, int64_t tokens_per_sample, bool needs_gamma_grad);
std::tuple<Tensor, Tensor, Tensor, Tensor> mlp_forward(const Tensor& x, const OptTensor& ln_weight,
                                                       const OptTensor& ln_bias, const Tensor& fc1_weight,
                                                       const OptTensor& fc1_bias, const Tensor& fc2_weight,
                                                       const OptTensor& fc2_bias, double eps, const OptTensor& gamma,
                                                       const OptTensor& dps, int64_t tokens_per_sample,
                                                       const std::string& approximate);
std::tuple<Tensor, OptTensor, OptTensor, Tensor, OptTensor, Tensor, OptTensor, OptTensor> mlp_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
    const Tensor& fc1_weight, const Tensor& fc2_weight, const OptTensor& fc2_bias, const OptTensor& gamma,
    const OptTensor& dps, int64_t tokens_per_sample, const Tensor& mean, const Tensor& rstd, const Tensor& h_pre,
    const std::string& approximate, bool has_fc1_bias, bool needs_gamma_grad);

// patch_embed.cpp
Tensor patch_embed_forward(const Tensor& images, const Tensor& weight, const OptTensor& bias,
                           const OptTensor& pos_embed, const OptTensor& cls_token, const OptTensor& reg_tokens,
                           int64_t patch_size, bool no_embed_class);
std::tuple<OptTensor, Tensor, OptTensor, OptTensor, OptTensor, OptTensor> patch_embed_backward(
    const Tensor& grad, const Tensor& images, const Tensor& weight, bool has_bias, bool has_pos, bool has_cls,
    int64_t num_reg, int64_t patch_size, bool no_embed_class, bool needs_image_grad);

}  // namespace vit_fast
