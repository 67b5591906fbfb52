// GEMM entry points of the fused CPU ops: oneDNN's inner product for float32, at::mm otherwise
// (see gemm.h for why).
#include "gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <cstdlib>

namespace vit_fast::gemm {
namespace {

enum class Backend { kOneDnn, kAten };

// The dispatcher handle of oneDNN's linear, or null when this torch build does not register it.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
  return op.has_value() ? &*op : nullptr;
}

Backend parse(const std::string& name) {
  if (name == "aten") return Backend::kAten;
  if (name == "onednn") {
    TORCH_CHECK(onednn_linear_op() != nullptr, "GEMM backend 'onednn' requested but this torch build has no ",
                "mkldnn::_linear_pointwise op");
    return Backend::kOneDnn;
  }
  TORCH_CHECK(name == "auto", "GEMM backend must be 'auto', 'onednn' or 'aten', got '", name, "'");
  return onednn_linear_op() != nullptr ? Backend::kOneDnn : Backend::kAten;
}

std::atomic<Backend>& current() {
  static std::atomic<Backend> value{[] {
    const char* env = std::getenv("VIT_FAST_CPU_GEMM");
    return parse(env != nullptr && *env != '\0' ? std::string(env) : std::string("auto"));
  }()};
  return value;
}

bool use_onednn(const Tensor& a) { return a.scalar_type() == at::kFloat && current().load() == Backend::kOneDnn; }

Tensor onednn_linear(const Tensor& a, const Tensor& w, const OptTensor& bias) {
  // Boxed call: robust to how this torch version spells the C++ types of `str`, `Scalar?[]`, `str?`.
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(std::string(""));
  onednn_linear_op()->callBoxed(&stack);
  return std::move(stack.back()).toTensor();
}

}  // namespace

Tensor linear(const Tensor& a, const Tensor& w, const OptTensor& bias) {
  if (use_onednn(a)) {
    // oneDNN takes the weight in either plain layout ([N, K] rows or a transposed view); anything
    // else (a strided slice, say) is copied first. The source is made contiguous by the op itself.
    const bool plain = w.stride(1) == 1 || w.stride(0) == 1;
    return onednn_linear(a, plain ? w : w.contiguous(), bias);
  }
  return bias.has_value() ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

Tensor mm_tn(const Tensor& a, const Tensor& b) {
  if (!use_onednn(a)) return at::mm(a.t(), b);
  // The inner product reduces over the contiguous dim of its source, so one operand is copied
  // transposed: a^T (K x M) directly, or b^T (K x N) for the transposed product plus a transpose of
  // the M x N result. Copy whichever moves fewer elements.
  const int64_t k = a.size(0), m = a.size(1), n = b.size(1);
  if (n * (k + m) < k * m) return onednn_linear(b.t(), a.t(), std::nullopt).t().contiguous();
  return onednn_linear(a.t(), b.t(), std::nullopt);
}

std::string backend() { return current().load() == Backend::kOneDnn ? "onednn" : "aten"; }

void set_backend(const std::string& name) { current().store(parse(name)); }

}  // namespace vit_fast::gemm
