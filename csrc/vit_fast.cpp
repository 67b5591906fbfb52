// vit_fast C++ CPU backend: module entry point.
// The fused CPU kernels register themselves in their own files (one op family per file);
// this file only defines the Python module so `import vit_fast._C` works and reports what was built.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vit_fast fused CPU kernels";
  m.def("has_openmp", &has_openmp, "Whether the extension was compiled with OpenMP");
}
