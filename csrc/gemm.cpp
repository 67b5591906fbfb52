// GEMM entry points of the fused CPU ops: a per-key measured choice between at::mm and oneDNN's
// inner product and their layout variants (see gemm.h for why and what the candidates are).
#include "gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace vit_fast::gemm {
namespace {

enum class Mode { kTuned, kOneDnn, kAten };

// Every candidate of both kinds; the index is the call counter's slot.
// attn_tiles / attn_brgemm: the two bf16 attention kernels (attention.cpp), chosen through choose();
// patch_conv / patch_gemm: the patch-embed projection (patch_embed.cpp), likewise.
enum Cand : int {
  kAten = 0,
  kOneDnn,
  kOneDnnPacked,
  kOneDnnPrepacked,
  kOneDnnTa,
  kOneDnnTb,
  kAttnTiles,
  kAttnBrgemm,
  kPatchConv,
  kPatchGemm,
  kAtenF32,
  kNumCands
};
constexpr std::array<const char*, kNumCands> kNames = {
    "aten",       "onednn",      "onednn_packed", "onednn_prepacked", "onednn_ta", "onednn_tb",
    "attn_tiles", "attn_brgemm", "patch_conv",    "patch_gemm",       "aten_f32"};

std::array<std::atomic<int64_t>, kNumCands>& counters() {
  static std::array<std::atomic<int64_t>, kNumCands> c{};
  return c;
}

int cand_index(const std::string& name) {
  for (int i = 0; i < kNumCands; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

// The dispatcher handle of oneDNN's linear, or null when this torch build does not register it.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
  return op.has_value() ? &*op : nullptr;
}

Mode parse(const std::string& name) {
  if (name == "aten") return Mode::kAten;
  if (name == "tuned") return Mode::kTuned;
  if (name == "onednn") {
    TORCH_CHECK(onednn_linear_op() != nullptr, "GEMM backend 'onednn' requested but this torch build has no ",
                "mkldnn::_linear_pointwise op");
    return Mode::kOneDnn;
  }
  TORCH_CHECK(name == "auto", "GEMM backend must be 'tuned', 'auto', 'onednn' or 'aten', got '", name, "'");
  return onednn_linear_op() != nullptr ? Mode::kOneDnn : Mode::kAten;
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : std::string(fallback);
}

std::atomic<Mode>& current() {
  static std::atomic<Mode> value{[] {
    const std::string forced = env_or("VIT_FAST_CPU_GEMM", "");
    if (!forced.empty()) return parse(forced);
    return env_or("VIT_FAST_TUNE", "on") == "off" ? parse("auto") : Mode::kTuned;
  }()};
  return value;
}

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

bool row_contiguous(const Tensor& w) { return w.stride(1) == 1; }
bool col_contiguous(const Tensor& w) { return w.stride(0) == 1; }

Tensor run_linear(int c, const Tensor& a, const Tensor& w, const OptTensor& bias, const Tensor& packed = Tensor()) {
  switch (c) {
    case kOneDnnPrepacked:
      TORCH_CHECK(packed.defined(), "onednn_prepacked needs a packed weight");
      return onednn_linear(a, packed, bias);
    case kOneDnn:
      // oneDNN takes the weight in either plain layout ([N, K] rows or a transposed view); anything
      // else (a strided slice, say) is copied first. The source is made contiguous by the op itself.
      return onednn_linear(a, row_contiguous(w) || col_contiguous(w) ? w : w.contiguous(), bias);
    case kOneDnnPacked:
      return onednn_linear(a, w.contiguous(), bias);
    case kAtenF32: {
      // bf16 operands widened to fp32 (exact), the fp32 GEMM, one rounding back to bf16: the same
      // fp32 accumulation and single rounding as a bf16 GEMM, for CPUs where torch's bf16 GEMM has
      // no fast path (no AVX512-BF16 / AMX: 18 GFLOP/s against sgemm's 170 on a Zen 3).
      const Tensor af = a.to(at::kFloat), wft = w.to(at::kFloat).t();
      const Tensor out = bias.has_value() ? at::addmm(bias->to(at::kFloat), af, wft) : at::mm(af, wft);
      return out.to(a.scalar_type());
    }
    default:
      return bias.has_value() ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  }
}

Tensor run_tn(int c, const Tensor& a, const Tensor& b) {
  // The inner product reduces over the contiguous dim of its source, so one operand is copied
  // transposed: a^T (K x M) directly, or b^T (K x N) for the transposed product plus a transpose of
  // the M x N result.
  switch (c) {
    case kOneDnnTa:
      return onednn_linear(a.t(), b.t(), std::nullopt);
    case kOneDnnTb:
      return onednn_linear(b.t(), a.t(), std::nullopt).t().contiguous();
    case kAtenF32:  // widened, as run_linear's
      return at::mm(a.to(at::kFloat).t(), b.to(at::kFloat)).to(a.scalar_type());
    default:
      return at::mm(a.t(), b);
  }
}

std::vector<int> linear_cands(const Tensor& w, bool prepacked = false) {
  std::vector<int> c = {kAten};
  if (w.scalar_type() == at::kBFloat16) c.push_back(kAtenF32);
  if (onednn_linear_op() == nullptr) return c;
  c.push_back(kOneDnn);
  if (!row_contiguous(w) && col_contiguous(w)) c.push_back(kOneDnnPacked);
  if (prepacked) c.push_back(kOneDnnPrepacked);
  return c;
}

// ----- prepacked weights ------------------------------------------------------------------------
// oneDNN runs a linear faster on a weight already reordered into its blocked layout
// (mkldnn::_reorder_linear_weight, what Inductor's freezing pass does): on an AMD EPYC Zen 5, bf16
// M=197: fc1 278 -> 247 us, qkv 239 -> 197 us; M=1576: 2321 -> 1829 us. The reorder itself costs
// more than one call saves (~140 us for a 1536 x 384 weight), so a weight is packed only when it is
// seen unchanged for the third time: an inference loop packs on its third call and then reuses
// the pack, while a training step (forward, perhaps a backward recompute, then the optimizer's
// in-place update) never packs.
//
// "Unchanged" is checked on every call, so a pack is never used for a weight that changed: the
// entry holds a weak reference to the weight's storage (a freed weight whose memory is reused is
// not mistaken for it), the storage offset, sizes, strides, dtype, the tensor's version counter
// (bumped by every in-place write through the tensor or its views: optimizers, load_state_dict,
// torch.no_grad init) and a fingerprint of 64 sampled elements (catching writes through `.data`,
// which has its own version counter). Inference tensors (no version counter) are never packed.
// At most kMaxPackBytes of packs are held; VIT_FAST_PREPACK=0 or set_prepacking(false) turns it
// off, clear_packed() drops every pack.
constexpr int kSightingsBeforePack = 3;
constexpr int64_t kMaxPackBytes = int64_t{2} << 30;

struct PackEntry {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;  // always set
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  uint32_t version = 0;
  uint64_t fingerprint = 0;
  int sightings = 0;
  Tensor packed;
  int64_t bytes = 0;
};

struct PackCache {
  std::mutex mu;
  std::unordered_map<const void*, PackEntry> entries;  // by data pointer
  int64_t bytes = 0;
  std::atomic<bool> enabled{env_or("VIT_FAST_PREPACK", "1") != "0"};
};
PackCache& pack_cache() {
  static PackCache c;
  return c;
}

uint64_t fingerprint(const Tensor& w) {
  // FNV-1a over the bit patterns of 64 elements spread over the (contiguous) weight.
  const int64_t n = w.numel(), es = static_cast<int64_t>(w.element_size());
  const auto* bytes = static_cast<const unsigned char*>(w.data_ptr());
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < 64; ++i) {
    const int64_t idx = (i * (n - 1)) / 63;
    for (int64_t b = 0; b < es; ++b) h = (h ^ bytes[idx * es + b]) * 1099511628211ull;
  }
  return h;
}

bool same_weight(const PackEntry& e, const Tensor& w, uint32_t version, uint64_t fp) {
  if (e.storage->expired()) return false;
  const c10::StorageImpl* live = e.storage->_unsafe_get_target();
  return live == w.storage().unsafeGetStorageImpl() && e.offset == w.storage_offset() &&
         e.sizes == w.sizes().vec() && e.strides == w.strides().vec() && e.dtype == w.scalar_type() &&
         e.version == version && e.fingerprint == fp;
}

// How many measure() calls are running on this thread. The repetitions of a measurement are not
// sightings of a weight: a candidate that runs GEMMs itself (the patch-embed gather + GEMM) calls
// the same weight a dozen times while being timed, which would otherwise pack it in a training step.
int& measuring_depth() {
  thread_local int depth = 0;
  return depth;
}

// The packed copy of `w` for a linear with M rows, or an undefined tensor when the weight is not
// (yet) packable: see above.
Tensor prepacked_weight(const Tensor& w, int64_t m) {
  PackCache& cache = pack_cache();
  if (!cache.enabled.load(std::memory_order_relaxed) || onednn_linear_op() == nullptr || w.dim() != 2 ||
      !w.is_contiguous() || w.numel() < 64 || w.is_inference() ||
      (w.scalar_type() != at::kFloat && w.scalar_type() != at::kBFloat16))
    return Tensor();
  const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  const uint64_t fp = fingerprint(w);
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.entries.find(w.data_ptr());
  if (it == cache.entries.end() || !same_weight(it->second, w, version, fp)) {
    // A new weight, or this one changed: (re)start counting; sweep entries of freed weights.
    if (it != cache.entries.end()) {
      cache.bytes -= it->second.bytes;
      cache.entries.erase(it);
    }
    for (auto e = cache.entries.begin(); e != cache.entries.end();) {
      if (e->second.storage->expired()) {
        cache.bytes -= e->second.bytes;
        e = cache.entries.erase(e);
      } else {
        ++e;
      }
    }
    PackEntry entry;
    entry.storage.emplace(w.storage().getWeakStorageImpl());
    entry.offset = w.storage_offset();
    entry.sizes = w.sizes().vec();
    entry.strides = w.strides().vec();
    entry.dtype = w.scalar_type();
    entry.version = version;
    entry.fingerprint = fp;
    entry.sightings = measuring_depth() > 0 ? 0 : 1;
    cache.entries.emplace(w.data_ptr(), std::move(entry));
    return Tensor();
  }
  PackEntry& e = it->second;
  if (e.packed.defined()) return e.packed;
  if (measuring_depth() > 0 || ++e.sightings < kSightingsBeforePack) return Tensor();
  const int64_t bytes = w.numel() * static_cast<int64_t>(w.element_size());
  if (cache.bytes + bytes > kMaxPackBytes) return Tensor();
  try {
    static const auto reorder = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                    .typed<Tensor(const Tensor&, std::optional<int64_t>)>();
    e.packed = reorder.call(w, m);
  } catch (const std::exception&) {
    // A torch without the reorder op, or a shape oneDNN refuses: this weight runs unpacked (the
    // sightings never reach the threshold again while it is unchanged).
    e.packed = Tensor();
    e.sightings = std::numeric_limits<int>::min();
    return Tensor();
  }
  e.bytes = bytes;
  cache.bytes += bytes;
  return e.packed;
}

std::vector<int> tn_cands(const Tensor& a) {
  std::vector<int> c = {kAten};
  if (a.scalar_type() == at::kBFloat16) c.push_back(kAtenF32);
  if (onednn_linear_op() == nullptr) return c;
  c.insert(c.end(), {kOneDnnTa, kOneDnnTb});
  return c;
}

const char* layout(const Tensor& t) {
  if (row_contiguous(t) && t.stride(0) == t.size(1)) return "r";
  if (col_contiguous(t) && t.stride(1) == t.size(0)) return "c";
  return "s";
}

std::string dtype_name(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return "f32";
    case at::kBFloat16:
      return "bf16";
    case at::kHalf:
      return "f16";
    default:
      return c10::toString(t.scalar_type());
  }
}

// The table of tuned choices. Guarded by one mutex, held also while a key is measured: measuring
// keys one at a time keeps the timings free of each other's load. Recursive because a candidate of
// choose() may itself run GEMMs (the patch-embed gather + GEMM), whose keys are measured inside the
// outer candidate's untimed warm-up call.
struct Table {
  std::recursive_mutex mu;
  std::unordered_map<std::string, Choice> entries;
};
Table& table() {
  static Table t;
  return t;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Times each candidate on the real operands: one untimed warm-up each (oneDNN JIT-compiles its kernel
// for a new shape on the first call; a candidate that throws there is dropped: a c10::Error, or
// oneDNN's own dnnl::error, which is what an AVX2-only CPU raises for a bf16 inner product), then
// rounds of one call per candidate, enough for ~20 ms of the slowest one (3 to 50 rounds: small GEMMs
// get more samples), and keeps each one's median. Interleaved because a first-use measurement runs on a
// busy, drifting machine: timed one after the other, a shared 2-core EPYC once timed the same
// M=394 N=576 K=192 GEMM at 1.00 ms in one key and 0.52 in the next, and the slow reading picked the
// other library. Returns the winner's output.
Tensor measure(const std::string& key, const std::vector<int>& cands, const std::function<Tensor(int)>& run,
               Choice& out) {
  constexpr double kTargetMs = 20.0;
  struct Depth {
    Depth() { ++measuring_depth(); }
    ~Depth() { --measuring_depth(); }
  } depth;
  out = Choice{};
  out.measured = true;
  std::vector<int> live;
  std::vector<Tensor> results;
  for (int c : cands) {
    try {
      results.push_back(run(c));
    } catch (const std::exception&) {
      continue;
    }
    live.push_back(c);
  }
  TORCH_CHECK(!live.empty(), "vit_fast GEMM ", key, ": every candidate failed");
  // The number of rounds comes from the first timed round (the warm-up includes JIT compiles): the
  // slowest candidate gets ~kTargetMs, the faster ones as many samples.
  std::vector<std::vector<double>> samples(live.size());
  int rounds = 1;
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < live.size(); ++i) {
      const double t0 = now_ms();
      results[i] = run(live[i]);
      samples[i].push_back(now_ms() - t0);
    }
    if (r == 0) {
      double slowest = 1e-3;
      for (const auto& v : samples) slowest = std::max(slowest, v[0]);
      rounds = std::clamp(static_cast<int>(kTargetMs / slowest), 3, 50);
    }
  }
  double best = std::numeric_limits<double>::infinity();
  size_t winner = 0;
  for (size_t i = 0; i < live.size(); ++i) {
    std::nth_element(samples[i].begin(), samples[i].begin() + rounds / 2, samples[i].end());
    const double med = samples[i][rounds / 2];
    out.ms[kNames[live[i]]] = med;
    if (med < best) {
      best = med;
      winner = i;
    }
  }
  out.pick = kNames[live[winner]];
  return results[winner];
}

// The candidate for `key` in tuned mode: the table's pick when it applies to this call, else a fresh
// measurement (stored). `result` is set when the measurement already produced the output.
int tuned_choice(const std::string& key, const std::vector<int>& cands, const std::function<Tensor(int)>& run,
                 Tensor& result) {
  if (cands.size() == 1) return cands[0];
  Table& t = table();
  std::lock_guard<std::recursive_mutex> lock(t.mu);
  auto it = t.entries.find(key);
  if (it != t.entries.end()) {
    const int c = cand_index(it->second.pick);
    if (std::find(cands.begin(), cands.end(), c) != cands.end()) return c;
  }
  Choice choice;
  result = measure(key, cands, run, choice);
  const int c = cand_index(choice.pick);
  t.entries[key] = std::move(choice);
  return c;
}

}  // namespace

Tensor linear(const Tensor& a, const Tensor& w, const OptTensor& bias) {
  const Mode mode = current().load();
  const bool f32 = a.scalar_type() == at::kFloat;
  int c = kAten;
  Tensor result, packed;
  if (mode == Mode::kTuned) {
    packed = prepacked_weight(w, a.size(0));
    // A packable weight is its own key ("/pack=1"): the prepacked candidate competes there only.
    const std::string key = "linear/" + dtype_name(a) + "/M=" + std::to_string(a.size(0)) +
                            ",N=" + std::to_string(w.size(0)) + ",K=" + std::to_string(a.size(1)) + "/a=" +
                            layout(a) + ",w=" + layout(w) + "/bias=" + (bias.has_value() ? "1" : "0") +
                            (packed.defined() ? "/pack=1" : "");
    c = tuned_choice(
        key, linear_cands(w, packed.defined()), [&](int k) { return run_linear(k, a, w, bias, packed); }, result);
  } else if (mode == Mode::kOneDnn && f32) {
    packed = prepacked_weight(w, a.size(0));
    c = packed.defined() ? kOneDnnPrepacked : kOneDnn;
  }
  counters()[c].fetch_add(1, std::memory_order_relaxed);
  return result.defined() ? result : run_linear(c, a, w, bias, packed);
}

Tensor mm_tn(const Tensor& a, const Tensor& b) {
  const Mode mode = current().load();
  const bool f32 = a.scalar_type() == at::kFloat;
  const int64_t k = a.size(0), m = a.size(1), n = b.size(1);
  int c = kAten;
  Tensor result;
  if (mode == Mode::kTuned) {
    const std::string key = "tn/" + dtype_name(a) + "/M=" + std::to_string(m) + ",N=" + std::to_string(n) +
                            ",K=" + std::to_string(k) + "/a=" + layout(a) + ",b=" + layout(b);
    c = tuned_choice(key, tn_cands(a), [&](int x) { return run_tn(x, a, b); }, result);
  } else if (mode == Mode::kOneDnn && f32) {
    // Untuned: copy whichever operand moves fewer elements.
    c = n * (k + m) < k * m ? kOneDnnTb : kOneDnnTa;
  }
  counters()[c].fetch_add(1, std::memory_order_relaxed);
  return result.defined() ? result : run_tn(c, a, b);
}

std::string choose(const std::string& key, const std::vector<std::string>& cands,
                   const std::function<Tensor(const std::string&)>& run, Tensor& result, const std::string& fallback) {
  int c = cand_index(fallback);
  if (current().load() == Mode::kTuned) {
    std::vector<int> idx;
    for (const auto& name : cands) idx.push_back(cand_index(name));
    c = tuned_choice(key, idx, [&](int k) { return run(kNames[k]); }, result);
  }
  counters()[c].fetch_add(1, std::memory_order_relaxed);
  return kNames[c];
}

std::string backend() {
  switch (current().load()) {
    case Mode::kTuned:
      return "tuned";
    case Mode::kOneDnn:
      return "onednn";
    default:
      return "aten";
  }
}

void set_backend(const std::string& name) { current().store(parse(name)); }

std::map<std::string, std::tuple<std::string, std::map<std::string, double>, bool>> choices() {
  Table& t = table();
  std::lock_guard<std::recursive_mutex> lock(t.mu);
  std::map<std::string, std::tuple<std::string, std::map<std::string, double>, bool>> out;
  for (const auto& [key, c] : t.entries) out[key] = {c.pick, c.ms, c.measured};
  return out;
}

std::vector<std::string> set_choices(const std::map<std::string, std::string>& picks) {
  Table& t = table();
  std::lock_guard<std::recursive_mutex> lock(t.mu);
  std::vector<std::string> refused;
  for (const auto& [key, pick] : picks) {
    if (cand_index(pick) < 0) {
      refused.push_back(key);
      continue;
    }
    t.entries[key] = Choice{pick, {}, false};
  }
  return refused;
}

void clear_choices() {
  Table& t = table();
  std::lock_guard<std::recursive_mutex> lock(t.mu);
  t.entries.clear();
}

void set_prepacking(bool enabled) {
  pack_cache().enabled.store(enabled);
  if (!enabled) clear_packed();
}
bool prepacking() { return pack_cache().enabled.load(); }
void clear_packed() {
  PackCache& cache = pack_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.entries.clear();
  cache.bytes = 0;
}
std::tuple<int64_t, int64_t> packed_info() {
  PackCache& cache = pack_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  int64_t n = 0;
  for (const auto& [ptr, e] : cache.entries) n += e.packed.defined() ? 1 : 0;
  return {n, cache.bytes};
}

std::map<std::string, std::vector<std::string>> candidate_names() {
  return {{"linear",
           {kNames[kAten], kNames[kAtenF32], kNames[kOneDnn], kNames[kOneDnnPacked], kNames[kOneDnnPrepacked]}},
          {"tn", {kNames[kAten], kNames[kAtenF32], kNames[kOneDnnTa], kNames[kOneDnnTb]}},
          {"attention", {kNames[kAttnTiles], kNames[kAttnBrgemm]}},
          {"patch_embed", {kNames[kPatchConv], kNames[kPatchGemm]}}};
}

std::map<std::string, int64_t> call_counts() {
  std::map<std::string, int64_t> out;
  for (int i = 0; i < kNumCands; ++i) out[kNames[i]] = counters()[i].load();
  return out;
}

void reset_call_counts() {
  for (auto& c : counters()) c.store(0);
}

namespace {
Tensor run_candidate_checked(const std::string& kind, const std::string& name, const Tensor& a, const Tensor& b,
                             const OptTensor& bias) {
  const int c = cand_index(name);
  TORCH_CHECK(kind == "linear" || kind == "tn", "kind must be 'linear' or 'tn', got '", kind, "'");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "a and b must be 2-D");
  if (kind == "linear" && c == kOneDnnPrepacked) {
    // The pack this weight would get in an inference loop (it is sighted until packed).
    Tensor packed;
    for (int i = 0; i < kSightingsBeforePack && !packed.defined(); ++i) packed = prepacked_weight(b, a.size(0));
    TORCH_CHECK(packed.defined(), "candidate 'onednn_prepacked' does not apply to this linear call");
    return run_linear(c, a, b, bias, packed);
  }
  if (kind == "linear") {
    const auto cands = linear_cands(b);
    TORCH_CHECK(std::find(cands.begin(), cands.end(), c) != cands.end(), "candidate '", name,
                "' does not apply to this linear call");
    return run_linear(c, a, b, bias);
  }
  const auto cands = tn_cands(a);
  TORCH_CHECK(std::find(cands.begin(), cands.end(), c) != cands.end(), "candidate '", name,
              "' does not apply to a tn call");
  TORCH_CHECK(!bias.has_value(), "a tn call takes no bias");
  return run_tn(c, a, b);
}
}  // namespace

Tensor run_candidate(const std::string& kind, const std::string& name, const Tensor& a, const Tensor& b,
                     const OptTensor& bias) {
  try {
    return run_candidate_checked(kind, name, a, b, bias);
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    // oneDNN's own error type (no primitive for this dtype on this CPU: bf16 without AVX-512), made a
    // RuntimeError that says so; measure() drops such a candidate the same way.
    TORCH_CHECK(false, "candidate '", name, "' cannot run this call on this CPU: ", e.what());
  }
}

}  // namespace vit_fast::gemm
