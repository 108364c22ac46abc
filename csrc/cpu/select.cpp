// Select family, CPU kernels (SPEC.md §9): exact order statistics of |w|·c over many tensors.
//
// Kernels (the contract of the launchers of sparsekern/triton/select.py; the ops at the end of
// this file, schemas in sparsekern/ops/select.py, compute the ranks and call them):
//   select_global(tensors, scales, k0, k1, gamma, lerp) -> (value fp32 [], nan_index int64 [])
//     Keys x = fp32(|w|·c) of every element of every tensor (c = scales[i], finite, >= 0); a, b =
//     the k0-th and k1-th smallest keys (0-based, k1 in {k0, k0 + 1}, k1 < total). value =
//     numpy's lerp(a, b, gamma) if lerp else a. nan_index = the first tensor holding a NaN key
//     (value is then NaN), else -1.
//   select_each(tensors, k0s, k1s, gammas, lerp) -> (values fp32 [L], nan_index int64 [])
//     The same per tensor with scale 1 (every tensor non-empty).
//   Tensors: CPU, fp32/fp16/bf16, any shape; read in place when non-overlapping and dense.
//
// Algorithm (no concatenation, no sort, O(histogram) memory, 64-bit counts): keys are the bit
// patterns of non-negative floats, so their unsigned order is the numeric order (+0 < subnormals
// < normals < inf < NaN). Pass 1: histogram of the high 16 bits (per-thread uint32 histograms,
// flushed into one uint64 histogram every 2^31 elements); its prefix sums give the buckets hb0 /
// hb1 of ranks k0 / k1 and flag inf-or-NaN (buckets >= 0x7F80), which triggers an exact NaN scan.
// Pass 2 reads every key again but touches memory only for keys in hb0/hb1: a histogram of the
// low 16 bits when hb0 == hb1, else max over hb0 and min over hb1 (k1 is then the first key of
// the next non-empty bucket). When every key is exact in its high 16 bits (bf16, c = 1) pass 2 is
// skipped. Below kSmall keys, a copy of the keys and std::nth_element is cheaper.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.h"

namespace sparsekern {
namespace cpu {
namespace select {

constexpr uint32_t kAbs = 0x7FFFFFFFu;
constexpr uint32_t kInf = 0x7F800000u;    // keys above it are NaN
constexpr int64_t kBins = int64_t(1) << 16;
constexpr int64_t kGrain = int64_t(1) << 18;  // elements per task, at least
constexpr int64_t kFlush = int64_t(1) << 31;  // uint32 local counts are flushed this often
constexpr int64_t kSmall = int64_t(1) << 14;  // at most this many keys: nth_element on a copy
constexpr int64_t kBlock = 64;                // pass-2 filter block

// fp32 bit pattern of |h| for every fp16 magnitude (exact, subnormals included).
const uint32_t* half_table() {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(1 << 15);
    for (uint32_t h = 0; h < t.size(); ++h) {
      t[h] = f32_bits(static_cast<float>(c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits())));
    }
    return t;
  }();
  return table.data();
}

// Key functors: key(i) = bit pattern of fp32(|x_i|·c). Unit scale never multiplies, so keys stay
// exact even with flush-to-zero enabled.
struct F32Unit {
  const uint32_t* p;
  SK_INLINE uint32_t operator()(int64_t i) const { return p[i] & kAbs; }
};
struct F32Scaled {
  const float* p;
  float c;
  SK_INLINE uint32_t operator()(int64_t i) const { return f32_bits(p[i] * c) & kAbs; }
};
struct F16Unit {
  const uint16_t* p;
  const uint32_t* lut;
  SK_INLINE uint32_t operator()(int64_t i) const { return lut[p[i] & 0x7FFFu]; }
};
struct F16Scaled {
  const uint16_t* p;
  const uint32_t* lut;
  float c;
  SK_INLINE uint32_t operator()(int64_t i) const { return f32_bits(f32_from_bits(lut[p[i] & 0x7FFFu]) * c); }
};
struct BF16Unit {
  const uint16_t* p;
  SK_INLINE uint32_t operator()(int64_t i) const { return (uint32_t(p[i]) << 16) & kAbs; }
};
struct BF16Scaled {
  const uint16_t* p;
  float c;
  SK_INLINE uint32_t operator()(int64_t i) const {
    return f32_bits(f32_from_bits(uint32_t(p[i]) << 16) * c) & kAbs;
  }
};

struct Source {
  const void* data;
  int64_t n;
  at::ScalarType dtype;
  float c;
};

// Calls op(key_functor) with the functor of source s.
template <class Op>
SK_INLINE void with_key(const Source& s, Op&& op) {
  const bool unit = s.c == 1.0f;
  switch (s.dtype) {
    case at::kFloat:
      if (unit) op(F32Unit{static_cast<const uint32_t*>(s.data)});
      else op(F32Scaled{static_cast<const float*>(s.data), s.c});
      break;
    case at::kHalf:
      if (unit) op(F16Unit{static_cast<const uint16_t*>(s.data), half_table()});
      else op(F16Scaled{static_cast<const uint16_t*>(s.data), half_table(), s.c});
      break;
    default:  // kBFloat16
      if (unit) op(BF16Unit{static_cast<const uint16_t*>(s.data)});
      else op(BF16Scaled{static_cast<const uint16_t*>(s.data), s.c});
  }
}

// The concatenation of the sources as one index range [0, total), never materialised.
struct Keys {
  std::vector<Source> src;
  std::vector<int64_t> off;  // off[i] = first global index of src[i]; off.back() = total
  bool exact_high = true;    // every key has zero low 16 bits (bf16 with c = 1)

  int64_t total() const { return off.back(); }

  void add(const at::Tensor& t, float c) {
    if (off.empty()) off.push_back(0);
    src.push_back({t.data_ptr(), t.numel(), t.scalar_type(), c});
    off.push_back(off.back() + t.numel());
    exact_high = exact_high && t.scalar_type() == at::kBFloat16 && c == 1.0f;
  }

  // Calls leaf(key, lo, hi) for every source segment of the global range [b, e).
  template <class Leaf>
  void for_range(int64_t b, int64_t e, Leaf&& leaf) const {
    size_t i = std::upper_bound(off.begin(), off.end(), b) - off.begin() - 1;
    for (; b < e; ++i) {
      const int64_t hi = std::min(e, off[i + 1]) - off[i];
      if (hi > b - off[i]) {
        with_key(src[i], [&](auto key) { leaf(key, b - off[i], hi); });
      }
      b = off[i] + hi;
    }
  }
};

// --- leaves (one per pass; templated on the key functor so each loop is specialised) -----------

template <class K>
void hist_high(K key, int64_t lo, int64_t hi, uint32_t* h) {
  for (int64_t i = lo; i < hi; ++i) ++h[key(i) >> 16];
}

// Low-16-bit histogram of the keys in bucket hb. Blocks with no such key (nearly all of them)
// cost one vectorised compare-and-or.
template <class K>
void hist_low(K key, int64_t lo, int64_t hi, uint32_t hb, uint32_t* h) {
  int64_t i = lo;
  for (; i + kBlock <= hi; i += kBlock) {
    uint32_t any = 0;
    for (int64_t j = 0; j < kBlock; ++j) any |= uint32_t((key(i + j) >> 16) == hb);
    if (any) {
      for (int64_t j = 0; j < kBlock; ++j) {
        const uint32_t k = key(i + j);
        if ((k >> 16) == hb) ++h[k & 0xFFFFu];
      }
    }
  }
  for (; i < hi; ++i) {
    const uint32_t k = key(i);
    if ((k >> 16) == hb) ++h[k & 0xFFFFu];
  }
}

// Largest key of bucket hb0 and smallest key of bucket hb1.
template <class K>
void max_min(K key, int64_t lo, int64_t hi, uint32_t hb0, uint32_t hb1, uint32_t& mx, uint32_t& mn) {
  uint32_t a = mx, b = mn;
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t k = key(i);
    const uint32_t h = k >> 16;
    a = std::max(a, h == hb0 ? k : 0u);
    b = std::min(b, h == hb1 ? k : 0xFFFFFFFFu);
  }
  mx = a;
  mn = b;
}

template <class K>
bool has_nan(K key, int64_t lo, int64_t hi) {
  uint32_t any = 0;
  for (int64_t i = lo; i < hi; ++i) any |= uint32_t(key(i) > kInf);
  return any != 0;
}

// --- passes ----------------------------------------------------------------------------------

// hist[j] = number of keys for which visit(key, ...) counts bin j; visit runs on per-thread
// uint32 histograms that are added into hist.
template <class Visit>
std::vector<uint64_t> histogram(const Keys& keys, Visit&& visit) {
  std::vector<uint64_t> hist(kBins, 0);
  std::mutex mu;
  at::parallel_for(0, keys.total(), kGrain, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> local(kBins, 0);
    for (int64_t cb = b; cb < e; cb += kFlush) {
      keys.for_range(cb, std::min(e, cb + kFlush),
                     [&](auto key, int64_t lo, int64_t hi) { visit(key, lo, hi, local.data()); });
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t j = 0; j < kBins; ++j) {
        hist[j] += local[j];
        local[j] = 0;
      }
    }
  });
  return hist;
}

// Bin holding rank k (0-based) of hist and the number of keys in lower bins.
std::pair<uint32_t, uint64_t> locate(const std::vector<uint64_t>& hist, uint64_t k) {
  uint64_t below = 0;
  for (int64_t j = 0; j < kBins; ++j) {
    if (k < below + hist[j]) return {uint32_t(j), below};
    below += hist[j];
  }
  TORCH_CHECK(false, "select: rank ", k, " out of range");
}

// Index of the first source holding a NaN key, or -1.
int64_t first_nan(const Keys& keys) {
  for (size_t i = 0; i < keys.src.size(); ++i) {
    std::atomic<bool> found{false};
    at::parallel_for(0, keys.src[i].n, kGrain, [&](int64_t b, int64_t e) {
      with_key(keys.src[i], [&](auto key) {
        if (has_nan(key, b, e)) found = true;
      });
    });
    if (found) return int64_t(i);
  }
  return -1;
}

struct Picked {
  uint32_t a, b;  // keys of rank k0 and k1
  int64_t nan_index;
};

Picked pick_small(const Keys& keys, int64_t k0, int64_t k1) {
  std::vector<uint32_t> v;
  v.reserve(keys.total());
  keys.for_range(0, keys.total(), [&](auto key, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) v.push_back(key(i));
  });
  if (*std::max_element(v.begin(), v.end()) > kInf) {
    const int64_t nan = first_nan(keys);
    if (nan >= 0) return {0, 0, nan};
  }
  std::nth_element(v.begin(), v.begin() + k0, v.end());
  const uint32_t a = v[k0];
  const uint32_t b = k1 == k0 ? a : *std::min_element(v.begin() + k0 + 1, v.end());
  return {a, b, -1};
}

Picked pick(const Keys& keys, int64_t k0, int64_t k1) {
  if (keys.total() <= kSmall) return pick_small(keys, k0, k1);
  const auto h1 = histogram(keys, [](auto key, int64_t lo, int64_t hi, uint32_t* h) {
    hist_high(key, lo, hi, h);
  });
  uint64_t inf_or_nan = 0;
  for (int64_t j = kInf >> 16; j < kBins; ++j) inf_or_nan += h1[j];
  if (inf_or_nan) {
    const int64_t nan = first_nan(keys);
    if (nan >= 0) return {0, 0, nan};
  }
  const auto [hb0, below0] = locate(h1, k0);
  const auto [hb1, below1] = locate(h1, k1);
  if (keys.exact_high) return {hb0 << 16, hb1 << 16, -1};
  if (hb0 == hb1) {
    const uint32_t hb = hb0;
    const auto h2 = histogram(keys, [hb](auto key, int64_t lo, int64_t hi, uint32_t* h) {
      hist_low(key, lo, hi, hb, h);
    });
    const uint32_t a = (hb << 16) | locate(h2, k0 - below0).first;
    const uint32_t b = (hb << 16) | locate(h2, k1 - below0).first;
    return {a, b, -1};
  }
  // k0 is the last key of bucket hb0, k1 the first of the next non-empty bucket hb1.
  uint32_t mx = 0, mn = 0xFFFFFFFFu;
  std::mutex mu;
  at::parallel_for(0, keys.total(), kGrain, [&](int64_t b, int64_t e) {
    uint32_t a = 0, c = 0xFFFFFFFFu;
    keys.for_range(b, e, [&](auto key, int64_t lo, int64_t hi) {
      max_min(key, lo, hi, hb0, hb1, a, c);
    });
    std::lock_guard<std::mutex> lock(mu);
    mx = std::max(mx, a);
    mn = std::min(mn, c);
  });
  return {mx, mn, -1};
}

// numpy's _lerp in float32 (a + (b-a)·t, or b - (b-a)·(1-t) for t >= 0.5, with t rounded to
// fp32). The fp32 product is computed exactly in double and rounded once, so no compiler can
// contract it into an FMA; inf - inf and inf·0 give NaN exactly as in numpy.
float numpy_lerp(float a, float b, double gamma) {
  const float d = b - a;
  if (gamma >= 0.5) {
    return b - float(double(d) * double(float(1.0 - gamma)));
  }
  return a + float(double(d) * double(float(gamma)));
}

float value_of(const Picked& p, double gamma, bool lerp) {
  if (p.nan_index >= 0) return std::numeric_limits<float>::quiet_NaN();
  return lerp ? numpy_lerp(f32_from_bits(p.a), f32_from_bits(p.b), gamma) : f32_from_bits(p.a);
}

void check_tensor(const at::Tensor& t, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "tensors[", i, "] is not a CPU tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "tensors[", i,
              "] must be float32, float16 or bfloat16, got ", dt);
}

// Dense tensors are read in place (element order is irrelevant); others are copied.
at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

void check_ranks(int64_t k0, int64_t k1, int64_t n) {
  TORCH_CHECK(0 <= k0 && k0 < n && (k1 == k0 || k1 == k0 + 1) && k1 < n, "select: ranks (", k0,
              ", ", k1, ") invalid for ", n, " keys");
}

std::tuple<at::Tensor, at::Tensor> select_global(at::TensorList tensors, at::ArrayRef<double> scales,
                                                 int64_t k0, int64_t k1, double gamma, bool lerp) {
  TORCH_CHECK(scales.size() == tensors.size(), "select_global: ", scales.size(), " scales for ",
              tensors.size(), " tensors");
  std::vector<at::Tensor> hold;
  Keys keys;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], i);
    hold.push_back(dense(tensors[i]));
    keys.add(hold.back(), float(scales[i]));
  }
  TORCH_CHECK(!tensors.empty(), "select_global: no tensors");
  check_ranks(k0, k1, keys.total());
  const Picked p = pick(keys, k0, k1);
  return {at::scalar_tensor(value_of(p, gamma, lerp), at::kFloat),
          at::scalar_tensor(p.nan_index, at::kLong)};
}

std::tuple<at::Tensor, at::Tensor> select_each(at::TensorList tensors, at::IntArrayRef k0,
                                               at::IntArrayRef k1, at::ArrayRef<double> gamma,
                                               bool lerp) {
  const int64_t L = int64_t(tensors.size());
  TORCH_CHECK(int64_t(k0.size()) == L && int64_t(k1.size()) == L && int64_t(gamma.size()) == L,
              "select_each: k0, k1 and gamma need one entry per tensor");
  std::vector<at::Tensor> hold;
  std::vector<Keys> keys(L);
  for (int64_t i = 0; i < L; ++i) {
    check_tensor(tensors[i], i);
    hold.push_back(dense(tensors[i]));
    keys[i].add(hold.back(), 1.0f);
    check_ranks(k0[i], k1[i], keys[i].total());
  }
  at::Tensor values = at::empty({L}, at::kFloat);
  float* out = values.data_ptr<float>();
  std::vector<int64_t> nan(L, -1);
  // Small tensors: one thread each, in parallel; large ones: one after another, each in parallel.
  at::parallel_for(0, L, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (keys[i].total() > kSmall) continue;
      const Picked p = pick_small(keys[i], k0[i], k1[i]);
      out[i] = value_of(p, gamma[i], lerp);
      nan[i] = p.nan_index;
    }
  });
  for (int64_t i = 0; i < L; ++i) {
    if (keys[i].total() <= kSmall) continue;
    const Picked p = pick(keys[i], k0[i], k1[i]);
    out[i] = value_of(p, gamma[i], lerp);
    nan[i] = p.nan_index;
  }
  int64_t first = -1;
  for (int64_t i = L - 1; i >= 0; --i) {
    if (nan[i] >= 0) first = i;
  }
  return {values, at::scalar_tensor(first, at::kLong)};
}

// ---------------------------------------------------------------------------------------------
// The ops' CPU implementations (schemas in sparsekern/ops/select.py): numpy's ranks of the
// quantile (common.h quantile_ranks), then the selection.

std::tuple<at::Tensor, at::Tensor> global_magnitude_threshold(at::TensorList tensors, double sparsity,
                                                              at::ArrayRef<double> scales,
                                                              c10::string_view interpolation) {
  int64_t n = 0;
  for (const at::Tensor& t : tensors) n += t.numel();
  const std::string method(interpolation);
  const Ranks r = quantile_ranks(n, sparsity, method);
  return select_global(tensors, scales, r.k0, r.k1, r.gamma, method == "linear");
}

std::tuple<at::Tensor, at::Tensor> magnitude_thresholds(at::TensorList tensors, at::ArrayRef<double> sparsities,
                                                        c10::string_view interpolation) {
  TORCH_CHECK(sparsities.size() == tensors.size(), "magnitude_thresholds: ", sparsities.size(),
              " sparsities for ", tensors.size(), " tensors");
  const std::string method(interpolation);
  std::vector<int64_t> k0(tensors.size()), k1(tensors.size());
  std::vector<double> gamma(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Ranks r = quantile_ranks(tensors[i].numel(), sparsities[i], method);
    k0[i] = r.k0, k1[i] = r.k1, gamma[i] = r.gamma;
  }
  return select_each(tensors, k0, k1, gamma, method == "linear");
}

}  // namespace select
}  // namespace cpu
}  // namespace sparsekern

// CPU kernels of the select ops, whose schemas are defined once, in sparsekern/ops/select.py.
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("global_magnitude_threshold", &sparsekern::cpu::select::global_magnitude_threshold);
  m.impl("magnitude_thresholds", &sparsekern::cpu::select::magnitude_thresholds);
}
