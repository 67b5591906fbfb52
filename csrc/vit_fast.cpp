// vit_fast C++ CPU backend: module entry point.
// The fused CPU kernels live in one file per op family (attention.cpp, layer_norm.cpp, mlp.cpp,
// patch_embed.cpp); this file binds them under the names of docs/backend_contract.md, so the
// torch.library custom ops in vit_fast/ops can call `vit_fast._C.<name>` for CPU tensors.
#include <torch/extension.h>

#include "brgemm.h"
#include "gemm.h"
#include "tile_gemm.h"
#include "ops.h"

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// glibc's malloc serves blocks above its mmap threshold (128 KiB at start) with fresh mmap'd pages, and
// trims its heap back to the OS once the free space at the top passes twice that threshold; each free of
// an mmap'd block raises the threshold to that block's size (at most 32 MiB). A training step or forward
// of our ops allocates and frees multi-MB activations in a pattern that kept hitting the trim, so their
// pages were faulted in again on every call (ViT-S/16 b8 bf16: 26k minor faults and ~48 ms of kernel
// time per training step, 12% of it). Freeing one 31 MiB block at load raises the threshold the way such
// a program's own first large free would: blocks up to 31 MiB come from the heap and it is trimmed only
// past 62 MiB of free top. Other allocators (jemalloc, tcmalloc) just see one malloc/free.
// VIT_FAST_HEAP_WARMUP=0 leaves malloc untouched.
bool warm_heap() {
  const char* env = std::getenv("VIT_FAST_HEAP_WARMUP");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  void* (*volatile allocate)(size_t) = std::malloc;  // volatile: the pair must not be optimised away
  void* block = allocate(size_t{31} << 20);
  if (block == nullptr) return false;
  static_cast<volatile char*>(block)[0] = 0;
  std::free(block);
  return true;
}

const bool heap_warmed = warm_heap();

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Test hook of brg::transpose32: dst[:, :rows] = src.t() for a 2-D int32 src (unit stride along columns) written into
// dst, an int32 [cols, >= rows] tensor whose other columns must stay untouched.
void transpose32_into(const at::Tensor& src, at::Tensor& dst, bool vectorised) {
  TORCH_CHECK(src.dim() == 2 && src.scalar_type() == at::kInt && src.stride(1) == 1,
              "src must be a 2-D int32 tensor with unit column stride, got ", src.sizes(), " ", src.scalar_type());
  TORCH_CHECK(dst.dim() == 2 && dst.scalar_type() == at::kInt && dst.stride(1) == 1 && dst.size(0) == src.size(1) &&
                  dst.size(1) >= src.size(0),
              "dst must be an int32 [cols, >= rows] tensor with unit column stride, got ", dst.sizes());
  vit_fast::brg::transpose32(src.data_ptr(), src.stride(0), src.size(0), src.size(1), dst.data_ptr(), dst.stride(0),
                             vectorised);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vit_fast fused CPU kernels";
  m.def("has_openmp", &has_openmp, "Whether the extension was compiled with OpenMP");
  m.def("heap_warmed", [] { return heap_warmed; },
        "Whether loading the extension raised glibc's mmap threshold (VIT_FAST_HEAP_WARMUP=0: no)");
  m.def("tile_gemm_backend", &vit_fast::tile::backend,
        "What the attention-tile GEMMs run now: 'avx512' or 'avx2' (the native micro-kernels) or 'blas'");
  m.def("set_tile_gemm_backend", &vit_fast::tile::set_backend,
        "Choose the attention-tile GEMMs: 'auto' (avx512, else avx2, where the CPU has it), 'avx512', 'avx2' or 'blas'",
        pybind11::arg("name"));
  m.def("attention_kernels", &vit_fast::attention_kernels,
        "The bf16 attention kernels this CPU runs: 'attn_tiles' (fp32 tiles), 'attn_brgemm' (bf16 micro-kernel)");
  m.def("bf16_micro_kernel", &vit_fast::brg::micro_kernel,
        "Which bf16 micro-kernel 'attn_brgemm' runs on: 'onednn_brgemm' (AMX), 'avx512_bf16' (ours) or 'none'");
  m.def("_transpose32_into", &transpose32_into, "test hook: dst[:, :rows] = src.t() (int32; brg::transpose32)",
        py::arg("src"), py::arg("dst"), py::arg("vectorised"));
  m.def("attention_kernel", &vit_fast::attention_kernel, "The forced bf16 attention kernel, or 'auto' (measured)");
  m.def("set_attention_kernel", &vit_fast::set_attention_kernel,
        "Force a bf16 attention kernel ('attn_tiles', 'attn_brgemm') or measure per shape ('auto')",
        pybind11::arg("name"));
  m.def("gemm_backend", &vit_fast::gemm::backend,
        "How the GEMMs choose their library now: 'tuned' (measured per shape), 'onednn' or 'aten'");
  m.def("set_gemm_backend", &vit_fast::gemm::set_backend,
        "Choose the GEMM mode: 'tuned' (measured per shape), 'auto' (oneDNN for float32 when torch has it), "
        "'onednn' or 'aten' (at::mm)",
        pybind11::arg("name"));
  // The tuned GEMM table (csrc/gemm.h); vit_fast.tuning loads and saves it with the disk cache.
  m.def("gemm_choices", &vit_fast::gemm::choices,
        "The tuned GEMM table: key -> (pick, {candidate: median ms}, measured in this process)");
  m.def("set_gemm_choices", &vit_fast::gemm::set_choices,
        "Load picks {key: candidate} into the tuned GEMM table; returns the keys refused (unknown candidate)",
        pybind11::arg("picks"));
  m.def("clear_gemm_choices", &vit_fast::gemm::clear_choices, "Empty the tuned GEMM table");
  m.def("gemm_candidates", &vit_fast::gemm::candidate_names, "Candidate names per kind ('linear', 'tn', 'attention', 'patch_embed')");
  m.def("set_prepacking", &vit_fast::gemm::set_prepacking, "Turn prepacked oneDNN weights on or off (off drops them)",
        py::arg("enabled"));
  m.def("prepacking", &vit_fast::gemm::prepacking, "Whether weights seen unchanged are prepacked for oneDNN");
  m.def("clear_packed_weights", &vit_fast::gemm::clear_packed, "Drop every prepacked weight");
  m.def("packed_weights", &vit_fast::gemm::packed_info, "(weights prepacked, bytes of their source weights)");
  m.def("gemm_call_counts", &vit_fast::gemm::call_counts, "GEMM calls per candidate since the last reset");
  m.def("reset_gemm_call_counts", &vit_fast::gemm::reset_call_counts, "Zero the GEMM call counters");
  m.def("_gemm_run", &vit_fast::gemm::run_candidate,
        "Test hook: run one GEMM candidate ('linear': a b^T + bias; 'tn': a^T b)", pybind11::arg("kind"),
        pybind11::arg("name"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("bias") = pybind11::none());
  m.def(
      "_round_to_bf16",
      [](const at::Tensor& x) {
        TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
        const at::Tensor xc = x.contiguous();
        at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kBFloat16));
        vit_fast::narrow_bf16(xc.data_ptr<float>(), out.data_ptr<at::BFloat16>(), xc.numel());
        return out;
      },
      "Test hook: the backend's float32 -> bfloat16 rounding (rows.cpp), for comparison with torch's",
      pybind11::arg("x"));
  namespace py = pybind11;
  using namespace vit_fast;
  // Long GEMM-free loops release the GIL so other Python threads can run meanwhile.
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("attention_forward", &attention_forward, "(out [B,T,D], lse [B,H,T] fp32) from packed qkv [B,T,3D]",
        py::arg("qkv"), py::arg("num_heads"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), nogil);
  m.def("attention_backward", &attention_backward, "dqkv [B,T,3D] (packed layout)", py::arg("grad_out"),
        py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("num_heads"), py::arg("scale"), py::arg("dropout_p"),
        py::arg("seed"), nogil);
  m.def("attention_varlen_forward", &attention_varlen_forward,
        "(out [R,D], lse [H,R] fp32) from qkv rows [R,3D] and table int64 [2,N] (first row, length)", py::arg("qkv"),
        py::arg("table"), py::arg("max_len"), py::arg("zero_fill"), py::arg("num_heads"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), nogil);
  m.def("attention_varlen_backward", &attention_varlen_backward, "dqkv [R,3D] (zero outside every sequence)",
        py::arg("grad_out"), py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("table"), py::arg("max_len"),
        py::arg("num_heads"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), nogil);

  m.def("layer_norm_forward", &layer_norm_forward, "(y, mean, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), nogil);
  m.def("layer_norm_backward", &layer_norm_backward, "(dx, dweight|None, dbias|None)", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), nogil);
  m.def("layer_norm_linear_forward", &layer_norm_linear_forward, "(out, mean, rstd)", py::arg("x"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("weight"), py::arg("bias"), py::arg("eps"), nogil);
  m.def("layer_norm_linear_backward", &layer_norm_linear_backward,
        "(dx, dln_weight|None, dln_bias|None, dweight, dbias|None)", py::arg("dout"), py::arg("x"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        py::arg("has_bias"), nogil);

  m.def("linear_residual_forward", &linear_residual_forward, "residual + gamma * dps * (x W^T + b)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("gamma"), py::arg("dps"),
        py::arg("tokens_per_sample"), nogil);
  m.def("linear_residual_backward", &linear_residual_backward, "(dx, dweight, dbias|None, dresidual, dgamma|None)",
        py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("gamma"), py::arg("dps"),
        py::arg("tokens_per_sample"), py::arg("needs_gamma_grad"), nogil);
  m.def("mlp_forward", &mlp_forward, "(out, mean, rstd, h_pre)", py::arg("x"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"),
        py::arg("eps"), py::arg("gamma"), py::arg("dps"), py::arg("tokens_per_sample"), py::arg("approximate"), nogil);
  m.def("mlp_backward", &mlp_backward,
        "(dx, dln_weight|None, dln_bias|None, dfc1_weight, dfc1_bias|None, dfc2_weight, dfc2_bias|None, dgamma|None)",
        py::arg("dout"), py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("fc1_weight"),
        py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("gamma"), py::arg("dps"), py::arg("tokens_per_sample"),
        py::arg("mean"), py::arg("rstd"), py::arg("h_pre"), py::arg("approximate"), py::arg("has_fc1_bias"),
        py::arg("needs_gamma_grad"), nogil);

  m.def("patch_embed_forward", &patch_embed_forward, "tokens [B,T,D]", py::arg("images"), py::arg("weight"),
        py::arg("bias"), py::arg("pos_embed"), py::arg("cls_token"), py::arg("reg_tokens"), py::arg("patch_size"),
        py::arg("no_embed_class"), nogil);
  m.def("patch_embed_backward", &patch_embed_backward,
        "(dimages|None, dweight, dbias|None, dpos_embed|None, dcls|None, dreg|None)", py::arg("grad"),
        py::arg("images"), py::arg("weight"), py::arg("has_bias"), py::arg("has_pos"), py::arg("has_cls"),
        py::arg("num_reg"), py::arg("patch_size"), py::arg("no_embed_class"), py::arg("needs_image_grad"), nogil);
}
