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
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(src[i]);
    // Round to nearest, ties to even (as c10::BFloat16); any NaN becomes the canonical quiet NaN.
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    o[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

VF_CLONES void accumulate_row_f32(float* p, const float* a, const float* other, float s, int64_t n) {
  if (other) {
    for (int64_t i = 0; i < n; ++i) p[i] += s * a[i] * other[i];
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] += s * a[i];
  }
}

}  // namespace vit_fast
