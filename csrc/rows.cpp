// Row kernels shared by several op families (declared in common.h): bfloat16 <-> float32 runs and one
// row of a weighted column sum. Multi-target clones, so they vectorise at AVX-512 / AVX2 width.
#include "common.h"

namespace vit_fast {

VF_CLONES void widen_bf16(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(s[i]) << 16);
}

VF_CLONES void narrow_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  uint16_t* o = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<uint16_t>(bf16_bits(src[i]));
}

VF_CLONES void accumulate_row_f32(float* p, const float* a, const float* other, float s, int64_t n) {
  if (other) {
    for (int64_t i = 0; i < n; ++i) p[i] += s * a[i] * other[i];
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] += s * a[i];
  }
}

}  // namespace vit_fast
