// Attention family: flash-style multi-head self-attention on packed qkv [B, T, 3*D].
//
// Forward: one task per (batch, head, query block) in a parallel loop. Each task walks the keys in
// blocks with an online softmax (running max m and sum l per query row), so the only score storage
// is one BLOCK_Q x BLOCK_K fp32 tile per thread; q and v are read from qkv by strides (no permute
// copy), k is packed transposed per (batch, head) into a [head_dim, T] buffer so the score GEMM's
// B operand has contiguous rows, the output is written with heads merged, and lse = m + log(l) is
// saved for backward. Tile GEMMs: tile_gemm.h (AVX-512 micro-kernel, BLAS fallback).
// Backward (FlashAttention-2 style): one task per (batch, head); for each key block, loop over query
// blocks, recompute P = exp(scale * q k^T - lse) per tile, and accumulate dV, dK for that key block
// and dQ for all rows in fp32 scratch of size [T, head_dim] (never T x T); K^T and V^T are packed per
// (batch, head) for the two score GEMMs, the other operands are read in place.
// Dropout on the probabilities uses a counter-based hash of (seed, b, h, i, j), regenerated in the
// backward. bf16 inputs are widened to fp32 per (b, h) slice so every tile GEMM runs in fp32.
// Variable length (attention_varlen_*): the same loops over a list of sequences (SeqDesc: where each
// sequence's row 0 sits in every tensor, and its length), so the work is sum(len^2); fixed-length
// batches are the special case of B sequences of T rows (fixed_layout). The longest length (max_len)
// sizes every per-thread scratch buffer once (tiles shrink to it for short sequences; the packed K^T,
// V and dQ buffers never grow inside the loop). zero_fill = false skips zeroing out and lse (packed
// input: the sequences cover every row); the backward zeroes dqkv only where rows are left uncovered.
#include "common.h"
#include "brgemm.h"
#include "gemm.h"
#include "tile_gemm.h"

#include <algorithm>
#include <functional>
#include <cstdio>
#include <cstdlib>

namespace vit_fast {
namespace {

// Tile sizes (query rows x key rows). Defaults: forward 128 x 256, so ViT sequence lengths (<= 257)
// need one key block; backward 64 x 256. Measured for ViT-S (B=8, T=197, head dim 64) with the
// AVX-512 tile kernel on the CI machine (AMD EPYC Zen 5, 2 threads), fwd / fwd+bwd ms:
// 128x256,32x256: 1.58 / 5.02; 128x256,64x256: 1.58 / 4.74; 128x256,96x256: 1.58 / 4.76;
// 64x256,32x256: 1.62 / 5.09; 128x128,32x128: 1.67 / 5.03. VIT_FAST_ATTN_TILES="fq,fk,bq,bk"
// overrides them (read once; for tuning on other CPUs).
struct Tiles {
  int64_t fwd_q = 128, fwd_k = 256, bwd_q = 64, bwd_k = 256;
};

const Tiles& tiles() {
  static const Tiles t = [] {
    Tiles v;
    if (const char* env = std::getenv("VIT_FAST_ATTN_TILES")) {
      long a, b, c, d;
      if (std::sscanf(env, "%ld,%ld,%ld,%ld", &a, &b, &c, &d) == 4 && a > 0 && b > 0 && c > 0 && d > 0)
        v = Tiles{a, b, c, d};
    }
    return v;
  }();
  return t;
}

struct AttnShape {
  int64_t batch, tokens, dim, heads, head_dim, stride_b, stride_t;
};

AttnShape check_qkv(const Tensor& qkv, int64_t num_heads) {
  check_float_tensor(qkv, "qkv");
  check_dim(qkv, "qkv", 3);
  TORCH_CHECK(num_heads > 0, "num_heads must be positive, got ", num_heads);
  const int64_t width3 = qkv.size(2);
  TORCH_CHECK(width3 % (3 * num_heads) == 0, "qkv last dim (", width3, ") must be divisible by 3 * num_heads (",
              3 * num_heads, ")");
  TORCH_CHECK(qkv.size(0) > 0 && qkv.size(1) > 0, "qkv must be non-empty, got shape ", qkv.sizes());
  TORCH_CHECK(qkv.stride(2) == 1, "qkv must have a contiguous last dim, got strides ", qkv.strides());
  const int64_t dim = width3 / 3;
  return {qkv.size(0), qkv.size(1), dim, num_heads, dim / num_heads, qkv.stride(0), qkv.stride(1)};
}

// A [rows, head_dim] operand as fp32 pointer + leading dim: the tensor itself for fp32, a widened
// copy for bf16.
template <typename T>
const float* as_f32(const T* src, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& buf,
                    int64_t& ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    ld_out = ld;
    return src;
  } else {
    buf.resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r) widen_bf16(src + r * ld, buf.data() + r * cols, cols);
    ld_out = cols;
    return buf.data();
  }
}

// K^T (or V^T) of one head as a dense fp32 [cols, rows] buffer: the B operand of the score GEMMs
// S = Q K^T and dP = dO V^T must have contiguous rows (tile_gemm.h).
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  if constexpr (std::is_same_v<T, float>) {
    brg::transpose32(src, ld, rows, cols, dst.data(), rows);  // 16 x 16 register blocks where AVX-512 runs
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) dst[static_cast<size_t>(c * rows + r)] = to_f(s[c]);
  }
}

// Row kernels of the score tiles (fp32, multi-target). Forward: running max of a row, then the
// exponentials exp(s - m_new) in place, returning their sum. Backward (no dropout):
// P = exp(s - lse) in place and dS = P * (dP - delta) into dp.
VF_CLONES float row_max_f32(const float* row, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  return mx;
}

VF_CLONES float exp_row_generic(float* row, int64_t n, float scale, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(row[j] * scale - m);
    row[j] = e;
    sum += e;
  }
  return sum;
}

VF_CLONES void probs_and_dscores_generic(float* p, float* dp, int64_t n, float lse, float delta, float s_scale,
                                         float ds_scale) {
  for (int64_t j = 0; j < n; ++j) {
    const float pv = fast_exp(p[j] * s_scale - lse);
    p[j] = pv;
    dp[j] = pv * (dp[j] - delta) * ds_scale;
  }
}

#ifdef VF_AVX512_EXP
// The same two sweeps with AVX-512 intrinsics (exp16: common.h).
VF_TARGET_AVX512 float exp_row_avx512(float* row, int64_t n, float scale, float m) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, row + j), vs, vm));
    _mm512_mask_storeu_ps(row + j, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// exp_row_avx512 writing bf16 (rounded to nearest even) into pb instead of fp32 in place, zero-padded
// to n_even: the bf16 path's P needs no fp32 copy. exp16's results are finite and >= 0, so the
// rounding needs no NaN case.
VF_TARGET_AVX512 float exp_row_bf16_avx512(const float* row, int64_t n, float scale, float m, at::BFloat16* pb,
                                           int64_t n_even) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  __m512 acc = _mm512_setzero_ps();
  auto* out = reinterpret_cast<uint16_t*>(pb);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, row + j), vs, vm));
    acc = _mm512_mask_add_ps(acc, k, acc, e);
    const __m512i u = _mm512_castps_si512(e);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
    _mm512_mask_cvtepi32_storeu_epi16(out + j, k, rounded);
  }
  for (int64_t j = n; j < n_even; ++j) out[j] = 0;
  return _mm512_reduce_add_ps(acc);
}

VF_TARGET_AVX512 void probs_and_dscores_avx512(float* p, float* dp, int64_t n, float lse, float delta, float s_scale,
                                               float ds_scale) {
  const __m512 vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta), vs = _mm512_set1_ps(s_scale),
               vds = _mm512_set1_ps(ds_scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 pv = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, p + j), vs, vl));
    _mm512_mask_storeu_ps(p + j, k, pv);
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(pv, vds), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), vd));
    _mm512_mask_storeu_ps(dp + j, k, ds);
  }
}
#endif

#ifdef VF_AVX2_EXP
// The two fp32 sweeps on 8 lanes (exp8: common.h) for CPUs without AVX-512; the tail through Tail8.
VF_TARGET_AVX2 float exp_row_avx2(float* row, int64_t n, float scale, float m) {
  const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), vs, vm));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  if (j == n) return sum;
  Tail8 t(row + j, n - j);
  _mm256_store_ps(t.v, exp8(_mm256_fmsub_ps(_mm256_load_ps(t.v), vs, vm)));
  for (int64_t i = 0; i < t.n; ++i) sum += t.v[i];  // the padding lanes hold exp(-m): not summed
  t.store(row + j);
  return sum;
}

VF_TARGET_AVX2 inline __m256 dscores8(__m256 pv, __m256 dp, __m256 vd, __m256 vds) {
  return _mm256_mul_ps(_mm256_mul_ps(pv, vds), _mm256_sub_ps(dp, vd));
}

VF_TARGET_AVX2 void probs_and_dscores_avx2(float* p, float* dp, int64_t n, float lse, float delta, float s_scale,
                                           float ds_scale) {
  const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(delta), vs = _mm256_set1_ps(s_scale),
               vds = _mm256_set1_ps(ds_scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 pv = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(p + j), vs, vl));
    _mm256_storeu_ps(p + j, pv);
    _mm256_storeu_ps(dp + j, dscores8(pv, _mm256_loadu_ps(dp + j), vd, vds));
  }
  if (j == n) return;
  Tail8 tp(p + j, n - j), td(dp + j, n - j);
  const __m256 pv = exp8(_mm256_fmsub_ps(_mm256_load_ps(tp.v), vs, vl));
  _mm256_store_ps(tp.v, pv);
  _mm256_store_ps(td.v, dscores8(pv, _mm256_load_ps(td.v), vd, vds));
  tp.store(p + j);
  td.store(dp + j);
}
#endif

// exp(row * scale - m) in place, returning the sum (the forward's softmax sweep).
float exp_row_f32(float* row, int64_t n, float scale, float m) {
#ifdef VF_AVX512_EXP
  if (use_avx512_exp()) return exp_row_avx512(row, n, scale, m);
#endif
#ifdef VF_AVX2_EXP
  if (use_avx2_exp()) return exp_row_avx2(row, n, scale, m);
#endif
  return exp_row_generic(row, n, scale, m);
}

// P = exp(s_scale * p - lse) in place and dS = ds_scale * P * (dP - delta) into dp (the backward's sweep, no
// dropout; the scales fold the softmax scale in where the score GEMM did not apply it).
void probs_and_dscores_f32(float* p, float* dp, int64_t n, float lse, float delta, float s_scale, float ds_scale) {
#ifdef VF_AVX512_EXP
  if (use_avx512_exp()) return probs_and_dscores_avx512(p, dp, n, lse, delta, s_scale, ds_scale);
#endif
#ifdef VF_AVX2_EXP
  if (use_avx2_exp()) return probs_and_dscores_avx2(p, dp, n, lse, delta, s_scale, ds_scale);
#endif
  probs_and_dscores_generic(p, dp, n, lse, delta, s_scale, ds_scale);
}

VF_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// A bf16 A-operand row: narrow n floats, then zero the pad columns up to n_even.
void narrow_padded(const float* src, at::BFloat16* dst, int64_t n, int64_t n_even) {
  narrow_bf16(src, dst, n);
  for (int64_t j = n; j < n_even; ++j) dst[j] = at::BFloat16(0.0f);
}

// exp(row * scale - m) rounded to bf16 into pb (zero-padded to n_even), returning the fp32 sum; the
// row itself is left as it was where the AVX-512 sweep runs (one pass, no fp32 copy of P).
float exp_row_to_bf16(float* row, int64_t n, float scale, float m, at::BFloat16* pb, int64_t n_even) {
#ifdef VF_AVX512_EXP
  if (use_avx512_exp()) return exp_row_bf16_avx512(row, n, scale, m, pb, n_even);
#endif
  const float sum = exp_row_f32(row, n, scale, m);
  narrow_padded(row, pb, n, n_even);
  return sum;
}

// One row of a forward score tile in the online softmax: the row holds raw scores r over bk keys,
// the logits are scale * r (scale > 0). Updates the row's running max m and normaliser l (of the
// logits), turns the row into exp(scale * r - m) (times the dropout mask Z / (1 - p) when dropout is
// on; the normaliser counts every key, dropout comes after softmax), writes its bf16 copy into pb
// when given (padded with zeros to bk_even; without dropout P may go there only, the row left as is)
// and rescales the row's output accumulator (hd floats) to the new max.
void forward_row(float* row, int64_t bk, float scale, float& m, float& l, float* acc, int64_t hd, float dropout_p,
                 float inv_keep, uint64_t key, uint64_t ctr, at::BFloat16* pb = nullptr, int64_t bk_even = 0) {
  // scale > 0, so max(scale * r) = scale * max(r); the exp sweep applies the scale.
  const float m_new = std::max(m, scale * row_max_f32(row, bk));
  // Rescale what was accumulated under the old running max (first block: nothing yet).
  const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m - m_new);
  if (pb != nullptr && dropout_p <= 0.0f) {  // the bf16 path without dropout: P straight to bf16
    l = l * alpha + exp_row_to_bf16(row, bk, scale, m_new, pb, bk_even);
  } else {
    l = l * alpha + exp_row_f32(row, bk, scale, m_new);
    if (dropout_p > 0.0f) {
      for (int64_t j = 0; j < bk; ++j) row[j] = uniform01(key, ctr + j) >= dropout_p ? row[j] * inv_keep : 0.0f;
    }
    if (pb != nullptr) narrow_padded(row, pb, bk, bk_even);  // the bf16 A operand of P V
  }
  m = m_new;
  if (alpha != 1.0f) {
    for (int64_t d = 0; d < hd; ++d) acc[d] *= alpha;
  }
}

// One row of a backward score tile: p holds the scores r (s = s_scale * r the logits), dp holds
// dP = dO V^T. Afterwards p holds P = exp(s - lse), dp holds dS = ds_scale * P * (dP - delta), and
// with dropout pd holds P * Z (Z the kept mask scaled by inv_keep, regenerated from the counters)
// and dS uses dP * Z.
void backward_row(float* p, float* dp, float* pd, int64_t n, float lse, float delta, float dropout_p, float inv_keep,
                  uint64_t key, uint64_t ctr, float s_scale = 1.0f, float ds_scale = 1.0f) {
  if (pd == nullptr) {
    probs_and_dscores_f32(p, dp, n, lse, delta, s_scale, ds_scale);
    return;
  }
  for (int64_t j = 0; j < n; ++j) p[j] = fast_exp(p[j] * s_scale - lse);
  for (int64_t j = 0; j < n; ++j) {
    const float z = uniform01(key, ctr + j) >= dropout_p ? inv_keep : 0.0f;
    pd[j] = p[j] * z;
    dp[j] *= z;
  }
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * ds_scale;
}

// One attention sequence: where its row 0 lives in each tensor and its length. Fixed-length batches
// are B sequences of T rows; variable-length ones come from the (first row, length) table.
struct SeqDesc {
  int64_t q_off;    // element offset of row 0 in qkv (row stride: stride_t)
  int64_t o_off;    // ... in out / grad_out (contiguous rows of D)
  int64_t d_off;    // ... in dqkv (contiguous rows of 3D)
  int64_t lse_off;  // ... in lse (head h adds h * lse_sh)
  int64_t len;
  uint64_t ctr;     // dropout counter of (head 0, row 0, key 0); head h adds h * ctr_sh
};

struct SeqLayout {
  int64_t heads, head_dim, dim, stride_t, lse_sh;
  uint64_t ctr_sh;
  int64_t max_len;     // longest sequence: sizes the per-thread scratch
  bool covers_all;     // the sequences tile every row (nothing outside them to zero)
  std::vector<SeqDesc> seqs;
};

// A tile edge no longer than the longest sequence: the same blocking (a sequence shorter than the
// default edge is one block either way), smaller scratch.
int64_t tile_edge(int64_t edge, int64_t max_len) { return std::max<int64_t>(1, std::min(edge, max_len)); }

SeqLayout fixed_layout(const AttnShape& s) {
  SeqLayout l{s.heads, s.head_dim, s.dim, s.stride_t, s.tokens, static_cast<uint64_t>(s.tokens * s.tokens),
              s.tokens, true, {}};
  for (int64_t b = 0; b < s.batch; ++b)
    l.seqs.push_back({b * s.stride_b, b * s.tokens * s.dim, b * s.tokens * 3 * s.dim, b * s.heads * s.tokens, s.tokens,
                      static_cast<uint64_t>(b * s.heads * s.tokens * s.tokens)});
  return l;
}

// The forward's parallel tasks: (sequence, head, first query row) per block of block_q rows,
// consecutive tasks sharing (sequence, head) so each thread packs K and V once per run of them.
struct FwdTask {
  int64_t seq, h, i0;
};

std::vector<FwdTask> forward_tasks(const SeqLayout& s, int64_t block_q) {
  std::vector<FwdTask> tasks;
  for (int64_t n = 0; n < static_cast<int64_t>(s.seqs.size()); ++n)
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t i0 = 0; i0 < s.seqs[n].len; i0 += block_q) tasks.push_back({n, h, i0});
  return tasks;
}

template <typename T>
void attention_forward_impl(const Tensor& qkv, const SeqLayout& s, float scale, float dropout_p, int64_t seed,
                            Tensor& out, Tensor& lse) {
  const T* base = qkv.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t hd = s.head_dim, D = s.dim;
  const int64_t kFwdBlockQ = tile_edge(tiles().fwd_q, s.max_len);
  const int64_t kFwdBlockK = tile_edge(tiles().fwd_k, s.max_len);
  const size_t seq_scratch = static_cast<size_t>(s.max_len * hd);
  const std::vector<FwdTask> tasks = forward_tasks(s, kFwdBlockQ);
  const uint64_t key = seed_key(seed);
  const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(static_cast<size_t>(kFwdBlockQ * kFwdBlockK));
    std::vector<float> acc(static_cast<size_t>(kFwdBlockQ * hd));
    std::vector<float> row_max(kFwdBlockQ), row_sum(kFwdBlockQ);
    std::vector<float> qbuf, ktbuf, vbuf;
    qbuf.reserve(static_cast<size_t>(kFwdBlockQ * hd));
    ktbuf.reserve(seq_scratch);
    vbuf.reserve(seq_scratch);
    int64_t packed_seq = -1, packed_h = -1;
    const float* vf = nullptr;
    int64_t ldv = 0;
    for (int64_t task = t0; task < t1; ++task) {
      const FwdTask& tk = tasks[static_cast<size_t>(task)];
      const SeqDesc& sq = s.seqs[static_cast<size_t>(tk.seq)];
      const int64_t h = tk.h, L = sq.len, i0 = tk.i0;
      const T* q = base + sq.q_off + h * hd;
      const int64_t bq = std::min(kFwdBlockQ, L - i0);
      int64_t ldq = 0;
      const float* qf = as_f32(q + i0 * s.stride_t, s.stride_t, bq, hd, qbuf, ldq);
      if (tk.seq != packed_seq || h != packed_h) {  // pack K^T and widen V once per (sequence, head)
        pack_transposed(q + D, s.stride_t, L, hd, ktbuf);
        vf = as_f32(q + 2 * D, s.stride_t, L, hd, vbuf, ldv);
        packed_seq = tk.seq;
        packed_h = h;
      }
      const uint64_t ctr0 = sq.ctr + static_cast<uint64_t>(h) * s.ctr_sh;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += kFwdBlockK) {
        const int64_t bk = std::min(kFwdBlockK, L - j0);
        tile::gemm(bq, bk, hd, scale, qf, ldq, 1, ktbuf.data() + j0, L, false, tile.data(), kFwdBlockK);
        for (int64_t i = 0; i < bq; ++i)
          forward_row(tile.data() + i * kFwdBlockK, bk, 1.0f, row_max[i], row_sum[i], acc.data() + i * hd, hd, dropout_p,
                      inv_keep, key, ctr0 + static_cast<uint64_t>((i0 + i) * L + j0));
        tile::gemm(bq, hd, bk, 1.0f, tile.data(), kFwdBlockK, 1, vf + j0 * ldv, ldv, true, acc.data(), hd);
      }
      for (int64_t i = 0; i < bq; ++i) {
        const float inv = 1.0f / row_sum[i];
        T* o = out_p + sq.o_off + (i0 + i) * D + h * hd;
        const float* a = acc.data() + i * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = from_f<T>(a[d] * inv);
        lse_p[sq.lse_off + h * s.lse_sh + i0 + i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

template <typename T>
void attention_backward_impl(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                             const SeqLayout& s, float scale, float dropout_p, int64_t seed, Tensor& dqkv) {
  const T* base = qkv.data_ptr<T>();
  const T* go_p = grad_out.data_ptr<T>();
  const T* out_p = out.data_ptr<T>();
  const float* lse_p = lse.data_ptr<float>();
  T* dqkv_p = dqkv.data_ptr<T>();
  const int64_t hd = s.head_dim, D = s.dim;
  const uint64_t key = seed_key(seed);
  const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
  const int64_t BQ = tile_edge(tiles().bwd_q, s.max_len), BK = tile_edge(tiles().bwd_k, s.max_len);
  const int64_t n_tasks = static_cast<int64_t>(s.seqs.size()) * s.heads;
  const size_t seq_scratch = static_cast<size_t>(s.max_len * hd);

  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p_tile(static_cast<size_t>(BQ * BK)), dp_tile(static_cast<size_t>(BQ * BK));
    std::vector<float> pd_tile(dropout_p > 0.0f ? static_cast<size_t>(BQ * BK) : 0);
    std::vector<float> dq, dk(static_cast<size_t>(BK * hd)), dv(static_cast<size_t>(BK * hd)), delta;
    std::vector<float> qbuf, kbuf, gobuf, ktbuf, vtbuf;
    for (auto* buf : {&dq, &qbuf, &kbuf, &gobuf, &ktbuf, &vtbuf}) buf->reserve(seq_scratch);
    delta.reserve(static_cast<size_t>(s.max_len));
    for (int64_t task = t0; task < t1; ++task) {
      const SeqDesc& sq = s.seqs[static_cast<size_t>(task / s.heads)];
      const int64_t h = task % s.heads, L = sq.len;
      if (L == 0) continue;
      const T* q = base + sq.q_off + h * hd;
      const T* go = go_p + sq.o_off + h * hd;
      const T* o = out_p + sq.o_off + h * hd;
      const float* lse_row = lse_p + sq.lse_off + h * s.lse_sh;
      const uint64_t ctr0 = sq.ctr + static_cast<uint64_t>(h) * s.ctr_sh;
      dq.assign(static_cast<size_t>(L * hd), 0.0f);
      delta.resize(static_cast<size_t>(L));
      int64_t ldq, ldk, ldgo;
      const float* qf = as_f32(q, s.stride_t, L, hd, qbuf, ldq);
      const float* kf = as_f32(q + D, s.stride_t, L, hd, kbuf, ldk);
      const float* gof = as_f32(go, D, L, hd, gobuf, ldgo);
      pack_transposed(q + D, s.stride_t, L, hd, ktbuf);      // K^T [hd, L]
      pack_transposed(q + 2 * D, s.stride_t, L, hd, vtbuf);  // V^T [hd, L]
      // delta_i = sum_j P_ij dP_ij = dO_i . O_i (holds with dropout too, since O = (P * Z) V).
      for (int64_t i = 0; i < L; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          delta[i] = dot_f32(go + i * D, o + i * D, hd);
        } else {
          float acc = 0.0f;
          for (int64_t d = 0; d < hd; ++d) acc += to_f(go[i * D + d]) * to_f(o[i * D + d]);
          delta[i] = acc;
        }
      }
      for (int64_t j0 = 0; j0 < L; j0 += BK) {
        const int64_t bk = std::min(BK, L - j0);
        std::fill(dk.begin(), dk.end(), 0.0f);
        std::fill(dv.begin(), dv.end(), 0.0f);
        const float* kj = kf + j0 * ldk;
        for (int64_t i0 = 0; i0 < L; i0 += BQ) {
          const int64_t bq = std::min(BQ, L - i0);
          const float* qi = qf + i0 * ldq;
          const float* goi = gof + i0 * ldgo;
          tile::gemm(bq, bk, hd, scale, qi, ldq, 1, ktbuf.data() + j0, L, false, p_tile.data(), BK);   // S
          tile::gemm(bq, bk, hd, 1.0f, goi, ldgo, 1, vtbuf.data() + j0, L, false, dp_tile.data(), BK);  // dP
          for (int64_t i = 0; i < bq; ++i) {
            backward_row(p_tile.data() + i * BK, dp_tile.data() + i * BK,
                         dropout_p > 0.0f ? pd_tile.data() + i * BK : nullptr, bk, lse_row[i0 + i], delta[i0 + i],
                         dropout_p, inv_keep, key, ctr0 + static_cast<uint64_t>((i0 + i) * L + j0));
          }
          const float* pd = dropout_p > 0.0f ? pd_tile.data() : p_tile.data();
          // dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q (the transposes are strides, not copies).
          tile::gemm(bk, hd, bq, 1.0f, pd, 1, BK, goi, ldgo, true, dv.data(), hd);
          tile::gemm(bq, hd, bk, scale, dp_tile.data(), BK, 1, kj, ldk, true, dq.data() + i0 * hd, hd);
          tile::gemm(bk, hd, bq, scale, dp_tile.data(), 1, BK, qi, ldq, true, dk.data(), hd);
        }
        for (int64_t j = 0; j < bk; ++j) {
          T* row = dqkv_p + sq.d_off + (j0 + j) * 3 * D + h * hd;
          for (int64_t d = 0; d < hd; ++d) {
            row[D + d] = from_f<T>(dk[j * hd + d]);
            row[2 * D + d] = from_f<T>(dv[j * hd + d]);
          }
        }
      }
      for (int64_t i = 0; i < L; ++i) {
        T* row = dqkv_p + sq.d_off + i * 3 * D + h * hd;
        for (int64_t d = 0; d < hd; ++d) row[d] = from_f<T>(dq[i * hd + d]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The bf16 path on a bf16 micro-kernel (brgemm.h: oneDNN's on AMX, ours on AVX512-BF16): the same blocking, online
// softmax and FlashAttention-2 backward as above, with every tile product a bf16 x bf16 -> fp32 micro-kernel call
// instead of widening the operands to fp32. Q, dO (and K for S's A operand) are read in place from qkv / grad_out; K^T,
// V (forward) and K^T, V^T, K (backward) are packed into VNNI layout once per (sequence, head), and the probability /
// dS tiles are rounded to bf16 as they are packed: the roundings FlashAttention-2 makes on GPUs. The backward forms
// dK^T and dV^T (A = Q^T, dO^T, packed once per (sequence, head); B = the VNNI-packed P and dS tiles), so no tile is
// ever transposed. Statistics (max, sum, lse, delta) and accumulators stay fp32. Requires an even head_dim.

constexpr int64_t kBrgBlockQ = 64;   // query rows per tile (even: only the last block has a pad row)
constexpr int64_t kBrgBlockK = 512;  // key columns per tile (a multiple of 64): one block for ViT lengths

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

VF_CLONES void scale_row_inplace_f32(float* row, int64_t n, float s) {
  for (int64_t j = 0; j < n; ++j) row[j] *= s;
}

void attention_forward_brgemm(const Tensor& qkv, const SeqLayout& s, float scale, float dropout_p, int64_t seed,
                              Tensor& out, Tensor& lse) {
  using bf16 = at::BFloat16;
  const bf16* base = qkv.data_ptr<bf16>();
  bf16* out_p = out.data_ptr<bf16>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t hd = s.head_dim, D = s.dim, hdp = round16(hd);
  const int64_t BQ = std::min(kBrgBlockQ, std::max<int64_t>(s.max_len, 1));
  const int64_t BK = std::min(kBrgBlockK, std::max<int64_t>(s.max_len, 1));
  const int64_t ldS = round16(BK), ldP = BK + (BK & 1);
  const std::vector<FwdTask> tasks = forward_tasks(s, BQ);
  const uint64_t key = seed_key(seed);
  const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(static_cast<size_t>(BQ * ldS)), acc(static_cast<size_t>(BQ * hdp));
    std::vector<bf16> pb(static_cast<size_t>(BQ * ldP));
    std::vector<float> row_max(BQ), row_sum(BQ);
    brg::PackedB kt, v;
    int64_t packed_seq = -1, packed_h = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const FwdTask& tk = tasks[static_cast<size_t>(task)];
      const SeqDesc& sq = s.seqs[static_cast<size_t>(tk.seq)];
      const int64_t h = tk.h, L = sq.len, i0 = tk.i0, bq = std::min(BQ, L - i0);
      const bf16* q = base + sq.q_off + h * hd;
      if (tk.seq != packed_seq || h != packed_h) {  // K^T [hd, L] and V [L, hd], once per (sequence, head)
        brg::pack(q + D, 1, s.stride_t, hd, L, kt);
        brg::pack(q + 2 * D, s.stride_t, 1, L, hd, v);
        packed_seq = tk.seq;
        packed_h = h;
      }
      const uint64_t ctr0 = sq.ctr + static_cast<uint64_t>(h) * s.ctr_sh;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += BK) {
        const int64_t bk = std::min(BK, L - j0), bke = bk + (bk & 1);
        brg::gemm_window(bq, q + i0 * s.stride_t, s.stride_t, kt, 0, hd, j0, bk, tile.data(), ldS, false);
        for (int64_t i = 0; i < bq; ++i) {
          float* row = tile.data() + i * ldS;
          if (scale <= 0.0f) scale_row_inplace_f32(row, bk, scale);
          forward_row(row, bk, scale > 0.0f ? scale : 1.0f, row_max[i], row_sum[i], acc.data() + i * hdp, hd,
                      dropout_p, inv_keep, key, ctr0 + static_cast<uint64_t>((i0 + i) * L + j0),
                      pb.data() + i * ldP, bke);
        }
        brg::gemm_window(bq, pb.data(), ldP, v, j0, bk, 0, hd, acc.data(), hdp, /*accumulate=*/j0 > 0);
      }
      for (int64_t i = 0; i < bq; ++i) {
        float* a = acc.data() + i * hdp;
        scale_row_inplace_f32(a, hd, 1.0f / row_sum[i]);
        narrow_bf16(a, out_p + sq.o_off + (i0 + i) * D + h * hd, hd);
        lse_p[sq.lse_off + h * s.lse_sh + i0 + i] = row_max[i] + std::log(row_sum[i]);
      }
    }
    brg::release();
  });
}

void attention_backward_brgemm(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                               const SeqLayout& s, float scale, float dropout_p, int64_t seed, Tensor& dqkv) {
  using bf16 = at::BFloat16;
  const bf16* base = qkv.data_ptr<bf16>();
  const bf16* go_p = grad_out.data_ptr<bf16>();
  const bf16* out_p = out.data_ptr<bf16>();
  const float* lse_p = lse.data_ptr<float>();
  bf16* dqkv_p = dqkv.data_ptr<bf16>();
  const int64_t hd = s.head_dim, D = s.dim, hdp = round16(hd);
  const uint64_t key = seed_key(seed);
  const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
  const int64_t BQ = std::min(kBrgBlockQ, std::max<int64_t>(s.max_len, 1));
  const int64_t BK = std::min(kBrgBlockK, std::max<int64_t>(s.max_len, 1));
  const int64_t ldS = round16(BK), ldA = BK + (BK & 1);
  const int64_t Le_max = s.max_len + (s.max_len & 1);
  const int64_t n_tasks = static_cast<int64_t>(s.seqs.size()) * s.heads;

  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p_tile(static_cast<size_t>(BQ * ldS)), dp_tile(static_cast<size_t>(BQ * ldS));
    std::vector<float> pd_tile(dropout_p > 0.0f ? static_cast<size_t>(BQ * ldS) : 0);
    std::vector<float> dq(static_cast<size_t>(s.max_len * hdp)), dkt(static_cast<size_t>(hd * ldS)),
        dvt(static_cast<size_t>(hd * ldS)), delta(static_cast<size_t>(s.max_len)), wide(static_cast<size_t>(2 * hd));
    std::vector<bf16> qt(static_cast<size_t>(hd * Le_max)), got(static_cast<size_t>(hd * Le_max)),
        dsb(static_cast<size_t>(BQ * ldA));
    std::vector<float> dk_rows(static_cast<size_t>(BK * hd)), dv_rows(static_cast<size_t>(BK * hd));
    std::vector<uint32_t> pairs;
    brg::PackedB kt, vt, kr, pp, ps;
    for (int64_t task = t0; task < t1; ++task) {
      const SeqDesc& sq = s.seqs[static_cast<size_t>(task / s.heads)];
      const int64_t h = task % s.heads, L = sq.len, Le = L + (L & 1);
      if (L == 0) continue;
      const bf16* q = base + sq.q_off + h * hd;
      const bf16* go = go_p + sq.o_off + h * hd;
      const bf16* o = out_p + sq.o_off + h * hd;
      const float* lse_row = lse_p + sq.lse_off + h * s.lse_sh;
      const uint64_t ctr0 = sq.ctr + static_cast<uint64_t>(h) * s.ctr_sh;
      brg::pack(q + D, 1, s.stride_t, hd, L, kt);      // K^T [hd, L]: B of S = Q K^T
      brg::pack(q + 2 * D, 1, s.stride_t, hd, L, vt);  // V^T [hd, L]: B of dP = dO V^T
      brg::pack(q + D, s.stride_t, 1, L, hd, kr);      // K [L, hd]:   B of dQ = dS K
      brg::transpose_bf16(q, s.stride_t, L, hd, qt.data(), Le, pairs);  // Q^T [hd, Le]:  A of dK^T = Q^T dS
      brg::transpose_bf16(go, D, L, hd, got.data(), Le, pairs);         // dO^T [hd, Le]: A of dV^T = dO^T P
      for (int64_t i = 0; i < L; ++i) {
        widen_bf16(go + i * D, wide.data(), hd);
        widen_bf16(o + i * D, wide.data() + hd, hd);
        delta[i] = dot_f32(wide.data(), wide.data() + hd, hd);
      }
      std::fill(dq.begin(), dq.begin() + L * hdp, 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += BK) {
        const int64_t bk = std::min(BK, L - j0), bke = bk + (bk & 1);
        std::fill(dkt.begin(), dkt.end(), 0.0f);
        std::fill(dvt.begin(), dvt.end(), 0.0f);
        for (int64_t i0 = 0; i0 < L; i0 += BQ) {
          const int64_t bq = std::min(BQ, L - i0);
          brg::gemm_window(bq, q + i0 * s.stride_t, s.stride_t, kt, 0, hd, j0, bk, p_tile.data(), ldS, false);
          brg::gemm_window(bq, go + i0 * D, D, vt, 0, hd, j0, bk, dp_tile.data(), ldS, false);
          for (int64_t i = 0; i < bq; ++i) {
            float* pr = p_tile.data() + i * ldS;
            float* dpr = dp_tile.data() + i * ldS;
            // The softmax scale goes into the logits and into dS (dQ and dK carry it) in the same sweep.
            backward_row(pr, dpr, dropout_p > 0.0f ? pd_tile.data() + i * ldS : nullptr, bk, lse_row[i0 + i],
                         delta[i0 + i], dropout_p, inv_keep, key, ctr0 + static_cast<uint64_t>((i0 + i) * L + j0),
                         scale, scale);
            narrow_padded(dpr, dsb.data() + i * ldA, bk, bke);
          }
          // dV^T += dO^T (P Z), dK^T += Q^T dS: the tiles packed as B (rounded to bf16 on the way).
          brg::pack_f32(dropout_p > 0.0f ? pd_tile.data() : p_tile.data(), ldS, bq, bk, pp);
          brg::gemm(hd, got.data() + i0, Le, pp, dvt.data(), ldS, true);
          brg::pack_f32(dp_tile.data(), ldS, bq, bk, ps);
          brg::gemm(hd, qt.data() + i0, Le, ps, dkt.data(), ldS, true);
          // dQ += dS K.
          brg::gemm_window(bq, dsb.data(), ldA, kr, j0, bk, 0, hd, dq.data() + i0 * hdp, hdp, true);
        }
        // dK, dV rows out of the transposed accumulators.
        brg::transpose32(dkt.data(), ldS, hd, bk, dk_rows.data(), hd);
        brg::transpose32(dvt.data(), ldS, hd, bk, dv_rows.data(), hd);
        for (int64_t j = 0; j < bk; ++j) {
          bf16* row = dqkv_p + sq.d_off + (j0 + j) * 3 * D + h * hd;
          narrow_bf16(dk_rows.data() + j * hd, row + D, hd);
          narrow_bf16(dv_rows.data() + j * hd, row + 2 * D, hd);
        }
      }
      for (int64_t i = 0; i < L; ++i) narrow_bf16(dq.data() + i * hdp, dqkv_p + sq.d_off + i * 3 * D + h * hd, hd);
    }
    brg::release();
  });
}

// Variable-length layout of rows qkv [R, 3D] from table int64 [2, N] = (first row, length) per
// sequence, no longer than max_len. Sequence n's dropout counters start at (n*H + h) << 32
// (lengths^2 < 2^31 is checked by the Python layer), lse is [H, R].
SeqLayout varlen_layout(const Tensor& qkv, const Tensor& table, int64_t max_len, int64_t num_heads) {
  check_float_tensor(qkv, "qkv");
  check_dim(qkv, "qkv", 2);
  TORCH_CHECK(num_heads > 0, "num_heads must be positive, got ", num_heads);
  const int64_t rows = qkv.size(0), width3 = qkv.size(1);
  TORCH_CHECK(width3 % (3 * num_heads) == 0, "qkv last dim (", width3, ") must be divisible by 3 * num_heads (",
              3 * num_heads, ")");
  TORCH_CHECK(qkv.stride(1) == 1, "qkv must have a contiguous last dim, got strides ", qkv.strides());
  TORCH_CHECK(table.defined() && table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(0) == 2,
              "table must be an int64 CPU tensor [2, N] of (first row, length)");
  const Tensor t = table.contiguous();
  const int64_t n_seq = t.size(1);
  const int64_t* st = t.data_ptr<int64_t>();
  const int64_t* ln = st + n_seq;
  const int64_t dim = width3 / 3;
  TORCH_CHECK(max_len >= 0, "max_len must be >= 0, got ", max_len);
  SeqLayout l{num_heads, dim / num_heads, dim, qkv.stride(0), rows, uint64_t{1} << 32, max_len, true, {}};
  int64_t next_row = 0;  // sequences in row order, back to back, from row 0: they cover every row
  for (int64_t n = 0; n < n_seq; ++n) {
    TORCH_CHECK(ln[n] >= 0 && st[n] >= 0 && st[n] + ln[n] <= rows, "table: sequence ", n, " (first row ", st[n],
                ", length ", ln[n], ") is outside qkv's ", rows, " rows");
    TORCH_CHECK(ln[n] <= max_len, "table: sequence ", n, " has length ", ln[n], " > max_len = ", max_len);
    l.covers_all = l.covers_all && st[n] == next_row;
    next_row = st[n] + ln[n];
    l.seqs.push_back({st[n] * qkv.stride(0), st[n] * dim, st[n] * width3, st[n], ln[n],
                      static_cast<uint64_t>(n * num_heads) << 32});
  }
  l.covers_all = l.covers_all && next_row == rows;
  return l;
}

// ---------------------------------------------------------------------------------------------
// Which kernel runs a call: bf16 calls whose head_dim is even, on a CPU where the micro-kernel runs,
// have two candidates, "attn_tiles" (the fp32 tile path above) and "attn_brgemm", timed against each
// other at the first call of a shape and the faster kept (gemm::choose: the GEMMs' table, cache and
// VIT_FAST_CPU_GEMM / VIT_FAST_TUNE modes; untuned, brgemm). The key buckets the longest length to a
// power of two so that variable-length batches do not measure at every new length.

// The kernel forced by set_attention_kernel (or VIT_FAST_CPU_ATTN at load): "" = choose as above.
std::string& forced_kernel() {
  static std::string value = [] {
    const char* env = std::getenv("VIT_FAST_CPU_ATTN");
    const std::string name = env != nullptr ? std::string(env) : std::string();
    TORCH_CHECK(name.empty() || name == "auto" || name == "attn_tiles" || name == "attn_brgemm",
                "VIT_FAST_CPU_ATTN must be 'auto', 'attn_tiles' or 'attn_brgemm', got '", name, "'");
    return name == "auto" ? std::string() : name;
  }();
  return value;
}

bool brgemm_applies(const Tensor& qkv, const SeqLayout& l) {
  return qkv.scalar_type() == at::kBFloat16 && l.head_dim % 2 == 0 && brg::available();
}

std::string choice_key(const char* pass, const SeqLayout& l, float dropout_p) {
  int64_t len = 1;
  while (len < l.max_len) len *= 2;
  return std::string(pass) + "/bf16/H=" + std::to_string(l.heads) + ",hd=" + std::to_string(l.head_dim) +
         ",len<=" + std::to_string(len) + "/dropout=" + (dropout_p > 0.0f ? "1" : "0");
}

// Runs one pass (`run(kernel name)`) on the kernel this call gets: the fp32 tiles where brgemm does
// not apply, else the forced kernel, else the measured choice (the measuring call times both
// candidates on the real operands, then runs the pick once more so the result is the pick's).
void run_chosen(const char* pass, const Tensor& qkv, const SeqLayout& l, float dropout_p,
                const std::function<Tensor(const std::string&)>& run) {
  const std::string forced = forced_kernel();  // checked at the first call, whatever the dtype
  if (!brgemm_applies(qkv, l)) {
    run("attn_tiles");
  } else if (!forced.empty()) {
    run(forced);
  } else {
    Tensor measured;
    run(gemm::choose(choice_key(pass, l, dropout_p), {"attn_tiles", "attn_brgemm"}, run, measured, "attn_brgemm"));
  }
}

void run_forward(const Tensor& qkv, const SeqLayout& l, float scale, float dropout_p, int64_t seed, Tensor& out,
                 Tensor& lse) {
  run_chosen("attention_fwd", qkv, l, dropout_p, [&](const std::string& name) {
    if (name == "attn_brgemm") {
      attention_forward_brgemm(qkv, l, scale, dropout_p, seed, out, lse);
    } else {
      VF_DISPATCH(qkv.scalar_type(), "attention_forward",
                  [&] { attention_forward_impl<scalar_t>(qkv, l, scale, dropout_p, seed, out, lse); });
    }
    return out;
  });
}

void run_backward(const Tensor& go, const Tensor& qkv, const Tensor& o, const Tensor& lse, const SeqLayout& l,
                  float scale, float dropout_p, int64_t seed, Tensor& dqkv) {
  run_chosen("attention_bwd", qkv, l, dropout_p, [&](const std::string& name) {
    if (name == "attn_brgemm") {
      attention_backward_brgemm(go, qkv, o, lse, l, scale, dropout_p, seed, dqkv);
    } else {
      VF_DISPATCH(qkv.scalar_type(), "attention_backward",
                  [&] { attention_backward_impl<scalar_t>(go, qkv, o, lse, l, scale, dropout_p, seed, dqkv); });
    }
    return dqkv;
  });
}

void check_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace

std::vector<std::string> attention_kernels() {
  std::vector<std::string> names = {"attn_tiles"};
  if (brg::available()) names.push_back("attn_brgemm");
  return names;
}

std::string attention_kernel() { return forced_kernel().empty() ? "auto" : forced_kernel(); }

void set_attention_kernel(const std::string& name) {
  const auto names = attention_kernels();
  TORCH_CHECK(name == "auto" || std::find(names.begin(), names.end(), name) != names.end(),
              "attention kernel must be 'auto' or one of this CPU's kernels (", c10::Join(", ", names), "), got '",
              name, "'");
  forced_kernel() = name == "auto" ? std::string() : name;
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, int64_t num_heads, double scale, double dropout_p,
                                             int64_t seed) {
  const AttnShape s = check_qkv(qkv, num_heads);
  check_dropout(dropout_p);
  Tensor out = at::empty({s.batch, s.tokens, s.dim}, qkv.options());
  Tensor lse = at::empty({s.batch, s.heads, s.tokens}, qkv.options().dtype(at::kFloat));
  run_forward(qkv, fixed_layout(s), static_cast<float>(scale), static_cast<float>(dropout_p), seed, out, lse);
  return {out, lse};
}

Tensor attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                          int64_t num_heads, double scale, double dropout_p, int64_t seed) {
  const AttnShape s = check_qkv(qkv, num_heads);
  check_dropout(dropout_p);
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(out, "out");
  check_same_dtype(grad_out, qkv, "grad_out");
  check_same_dtype(out, qkv, "out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({s.batch, s.tokens, s.dim}), "grad_out must have shape [",
              s.batch, ", ", s.tokens, ", ", s.dim, "], got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have shape ", grad_out.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == at::kFloat, "lse must be a float32 CPU tensor");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.batch, s.heads, s.tokens}), "lse must have shape [", s.batch, ", ",
              s.heads, ", ", s.tokens, "], got ", lse.sizes());
  const Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  Tensor dqkv = at::empty({s.batch, s.tokens, 3 * s.dim}, qkv.options());
  run_backward(go, qkv, o, l, fixed_layout(s), static_cast<float>(scale), static_cast<float>(dropout_p), seed, dqkv);
  return dqkv;
}

std::tuple<Tensor, Tensor> attention_varlen_forward(const Tensor& qkv, const Tensor& table, int64_t max_len,
                                                    bool zero_fill, int64_t num_heads, double scale, double dropout_p,
                                                    int64_t seed) {
  const SeqLayout l = varlen_layout(qkv, table, max_len, num_heads);
  check_dropout(dropout_p);
  // zero_fill: rows outside every sequence (padding) read as zero in out and lse; without it they are
  // left unwritten (the caller's promise: packed input, where the sequences cover every row).
  const auto opts = qkv.options();
  Tensor out = zero_fill ? at::zeros({qkv.size(0), l.dim}, opts) : at::empty({qkv.size(0), l.dim}, opts);
  Tensor lse = zero_fill ? at::zeros({num_heads, qkv.size(0)}, opts.dtype(at::kFloat))
                         : at::empty({num_heads, qkv.size(0)}, opts.dtype(at::kFloat));
  run_forward(qkv, l, static_cast<float>(scale), static_cast<float>(dropout_p), seed, out, lse);
  return {out, lse};
}

Tensor attention_varlen_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out, const Tensor& lse,
                                 const Tensor& table, int64_t max_len, int64_t num_heads, double scale,
                                 double dropout_p, int64_t seed) {
  const SeqLayout l = varlen_layout(qkv, table, max_len, num_heads);
  check_dropout(dropout_p);
  const int64_t rows = qkv.size(0);
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(out, "out");
  check_same_dtype(grad_out, qkv, "grad_out");
  check_same_dtype(out, qkv, "out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({rows, l.dim}), "grad_out must have shape [", rows, ", ", l.dim,
              "], got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have shape ", grad_out.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == at::kFloat, "lse must be a float32 CPU tensor");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({num_heads, rows}), "lse must have shape [", num_heads, ", ", rows,
              "], got ", lse.sizes());
  const Tensor go = grad_out.contiguous(), o = out.contiguous(), ls = lse.contiguous();
  // Rows outside every sequence get zero gradient; when the sequences cover every row nothing is zeroed.
  Tensor dqkv = l.covers_all ? at::empty({rows, 3 * l.dim}, qkv.options())
                             : at::zeros({rows, 3 * l.dim}, qkv.options());
  run_backward(go, qkv, o, ls, l, static_cast<float>(scale), static_cast<float>(dropout_p), seed, dqkv);
  return dqkv;
}

}  // namespace vit_fast
