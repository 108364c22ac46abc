// Bound family, CPU kernels (SPEC.md §4): Gaussian bounds and the trainable ASL bound.
//
// Kernels (the contract of the launchers of sparsekern/triton/bound.py); the ops at the end of
// this file (schemas in sparsekern/ops/bound.py) compute the multipliers and call them:
//   bounds_of(tensors, multipliers) -> (bounds fp32 [L], nan_index int64 [])
//     tensors: non-empty CPU fp32/fp16/bf16, any shape (read in place when dense).
//     bounds[i] = fp32(double(σ_i)·c_i), σ_i = the unbiased std of tensors[i] rounded to fp32,
//     c_i = multipliers[i] >= 0 (√2·erfinv(s_i)); c_i = inf gives inf even for σ_i = 0.
//     nan_index: the first tensor whose σ is NaN (a NaN or inf weight, or one element), else -1.
//   asl_fwd(w, r) -> w·1[|w| > b] (w's shape and dtype)
//   asl_bwd(grad, w, r) -> grad_r (fp32, r's shape)
//     w (and grad): contiguous fp32/fp16/bf16 viewed as [G, n/G] with G = numel(r): 1 (per
//     layer) or w.size(0) (per output channel); r: contiguous 1-D fp32. Group g has
//     σ_g = fp32 unbiased std of its elements and b_g = fp32(clamp(r_g, 0, 5)·σ_g) + 1e-6f;
//     grad_r[g] = -(Σ_{|w| <= b_g} grad·w) / r_g if 0 < r_g < 5, else 0 (ASL paper Eq. 18).
//
// Standard deviation in one pass over memory: blocks of 1024 elements get Σ(x - k) and
// Σ(x - k)² in 16 fp32 lanes, added up in double, with k the mean of the blocks before (the
// first block of a range is read twice, for its own mean); a block whose fp32 Σ(x - k)² would
// overflow or underflow is redone in double lanes. Blocks, then fixed tiles of 65536, are
// merged with Chan's formula in double in a fixed order: σ depends neither on the thread count
// nor on the ISA, a tensor gets the same σ alone or in a batch, and it is torch.std's fp32
// value up to the fp32 lane sums (64 terms each: ~1e-7 relative typically, 4e-6 at worst).
// Groups that fit in cache (per-channel rows) are done whole by one thread: σ, then the mask
// pass or the gradient sum while the row is still cached. Otherwise tiles are spread over
// threads by element count.
//
// Storage types, their dtype dispatch and the 8-lane vector come from csrc/cpu/common.h.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace sparsekern {
namespace cpu {
namespace bound {

// ---------------------------------------------------------------------------------------------
// Deterministic sums: 16 fp32 lanes (two 8-lane vectors: register resident), added up in double
// in a fixed order.

constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;      // elements per fp32 lane sum
constexpr int64_t kTile = 65536;      // elements per parallel reduction tile (fixed: determinism)
constexpr int64_t kGrain = 32768;     // elements per parallel task, at least
constexpr int64_t kCachedRow = 32768; // groups up to this size are done whole by one thread

struct Lanes {
  Lanes8 lo{}, hi{};
  SK_INLINE void add(const float* p) {
    Lanes8 a, b;
    std::memcpy(&a, p, sizeof a);
    std::memcpy(&b, p + 8, sizeof b);
    lo += a;
    hi += b;
  }
  SK_INLINE double sum() const {
    float f[kLanes];
    std::memcpy(f, &lo, sizeof lo);
    std::memcpy(f + 8, &hi, sizeof hi);
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += f[l];
    return s;
  }
};

// ---------------------------------------------------------------------------------------------
// Moments: count, mean, sum of squared deviations; merged with Chan et al.'s formula.

struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
};

SK_INLINE Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  const double n = a.n + b.n;
  const double d = b.mean - a.mean;
  return {n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * b.n / n)};
}

// Unbiased std rounded to fp32 (NaN for n < 2, as torch.std).
SK_INLINE float sigma_of(const Moments& m) { return float(std::sqrt(m.m2 / (m.n - 1.0))); }

// 8 double lanes (two 4-lane vectors), added up in a fixed order.
#if defined(__GNUC__)
typedef double Lanes4d __attribute__((vector_size(32)));
#else
struct Lanes4d {
  double v[4];
  Lanes4d& operator+=(const Lanes4d& o) {
    for (int l = 0; l < 4; ++l) v[l] += o.v[l];
    return *this;
  }
};
#endif
constexpr int kLanes64 = 8;

struct Lanes64 {
  Lanes4d lo{}, hi{};
  SK_INLINE void add(const double* p) {
    Lanes4d a, b;
    std::memcpy(&a, p, sizeof a);
    std::memcpy(&b, p + 4, sizeof b);
    lo += a;
    hi += b;
  }
  SK_INLINE double sum() const {
    double f[kLanes64];
    std::memcpy(f, &lo, sizeof lo);
    std::memcpy(f + 4, &hi, sizeof hi);
    double s = 0.0;
    for (int l = 0; l < kLanes64; ++l) s += f[l];
    return s;
  }
};

// Mean of len <= kBlock elements (fp32 lanes added up in double), rounded to fp32. Lanes that
// overflow (64 terms of |x| ≳ 5e36) are summed again in double: the mean of fp32 values fits.
template <class S>
SK_INLINE float block_mean(const typename S::raw* x, int64_t len) {
  Lanes ls;
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    alignas(64) float v[kLanes];
    SK_SIMD for (int l = 0; l < kLanes; ++l) v[l] = S::load(x[j + l]);
    ls.add(v);
  }
  double sum = ls.sum();
  for (; j < len; ++j) sum += S::load(x[j]);
  if (!(std::fabs(sum) <= std::numeric_limits<double>::max())) {  // inf or NaN: redo (an inf/NaN stays)
    sum = 0.0;
    for (j = 0; j < len; ++j) sum += S::load(x[j]);
  }
  return float(sum / double(len));
}

SK_INLINE Moments moments_of(int64_t len, double k, double sd, double sq) {
  const double m2 = sq - sd * sd / double(len);
  return {double(len), k + sd / double(len), m2 < 0.0 ? 0.0 : m2};
}

// Moments of len <= kBlock elements from double lane sums of d = x - k and d² (the fallback).
template <class S>
Moments block_moments_f64(const typename S::raw* x, int64_t len, double k) {
  Lanes64 ld, lq;
  int64_t j = 0;
  for (; j + kLanes64 <= len; j += kLanes64) {
    alignas(64) double d[kLanes64];
    alignas(64) double q[kLanes64];
    SK_SIMD for (int l = 0; l < kLanes64; ++l) {
      d[l] = double(S::load(x[j + l])) - k;
      q[l] = d[l] * d[l];
    }
    ld.add(d);
    lq.add(q);
  }
  double sd = ld.sum(), sq = lq.sum();
  for (; j < len; ++j) {
    const double d = double(S::load(x[j])) - k;
    sd += d;
    sq += d * d;
  }
  return moments_of(len, k, sd, sq);
}

// Moments of len <= kBlock elements from fp32 lane sums of d = x - k and d², k an estimate of the
// mean (so that nothing is lost to cancellation). A block whose fp32 Σd² overflows (|w| ≳ 1e19),
// comes near the fp32 underflow (|w - k| ≲ 1e-17) or meets a NaN/inf is redone in double.
template <class S>
SK_INLINE Moments block_moments(const typename S::raw* x, int64_t len, float k) {
  Lanes ld, lq;
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    alignas(64) float d[kLanes];
    alignas(64) float q[kLanes];
    SK_SIMD for (int l = 0; l < kLanes; ++l) {
      d[l] = S::load(x[j + l]) - k;
      q[l] = d[l] * d[l];
    }
    ld.add(d);
    lq.add(q);
  }
  double sd = ld.sum(), sq = lq.sum();
  for (; j < len; ++j) {
    const float d = S::load(x[j]) - k;
    sd += d;
    sq += d * d;
  }
  if (!(sq >= 1e-30 && sq <= 1e37)) return block_moments_f64<S>(x, len, k);  // also NaN
  return moments_of(len, k, sd, sq);
}

// Blocks in order, each shifted by the mean so far (the first by its own mean): one sweep over
// memory and one over L1 per block (two for the first).
template <class S>
SK_CLONES Moments range_moments(const typename S::raw* x, int64_t len) {
  Moments acc;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t n = std::min(kBlock, len - b);
    acc = merge(acc, block_moments<S>(x + b, n, b == 0 ? block_mean<S>(x, n) : float(acc.mean)));
  }
  return acc;
}

// Σ over [0, len) of grad·w where |w| <= b (pruned), fp32 lanes per block, blocks in double.
template <class S>
SK_CLONES double pruned_dot(const typename S::raw* g, const typename S::raw* w, int64_t len, float b) {
  double acc = 0.0;
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, len - b0);
    const typename S::raw* gp = g + b0;
    const typename S::raw* wp = w + b0;
    Lanes ls;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      alignas(64) float v[kLanes];
      SK_SIMD for (int l = 0; l < kLanes; ++l) {  // both loads unconditional: a vector select
        const float x = S::load(wp[j + l]);
        const float p = S::load(gp[j + l]) * x;
        v[l] = std::fabs(x) > b ? 0.f : p;
      }
      ls.add(v);
    }
    double s = ls.sum();
    for (; j < n; ++j) {
      const float x = S::load(wp[j]);
      const float p = S::load(gp[j]) * x;
      s += std::fabs(x) > b ? 0.f : p;
    }
    acc += s;
  }
  return acc;
}

template <class S>
SK_CLONES void mask_leaf(const typename S::raw* w, typename S::raw* out, int64_t len, float b) {
  SK_SIMD for (int64_t j = 0; j < len; ++j) {
    const float x = S::load(w[j]);
    out[j] = S::store(x * float(std::fabs(x) > b));
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers.
bool is_float_storage(const at::Tensor& x) {
  const auto st = x.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// A reduction tile: elements [off, off + len) of source `src` (tensor or group).
struct Tile {
  int64_t src, off, len;
};

// Tiles of at most kTile elements over sources of the given sizes, in source order.
std::vector<Tile> make_tiles(const std::vector<int64_t>& sizes) {
  std::vector<Tile> tiles;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t off = 0; off < sizes[i]; off += kTile) {
      tiles.push_back({int64_t(i), off, std::min(kTile, sizes[i] - off)});
    }
  }
  return tiles;
}

// f(tile_index) for every tile, the tiles split among threads into contiguous runs of about
// equal element counts (tiles differ in size when sources do).
template <class F>
void for_tiles(const std::vector<Tile>& tiles, F&& f) {
  std::vector<int64_t> start(tiles.size() + 1, 0);
  for (size_t i = 0; i < tiles.size(); ++i) start[i + 1] = start[i] + tiles[i].len;
  const int64_t total = start.back();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kGrain));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // tiles whose first element lies in [total·p/parts, total·(p+1)/parts)
      const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
      auto first = std::lower_bound(start.begin(), start.end() - 1, lo) - start.begin();
      auto last = std::lower_bound(start.begin(), start.end() - 1, hi) - start.begin();
      for (auto t = first; t < last; ++t) f(t);
    }
  });
}

// Per-source moments from per-tile moments, merged in tile order.
std::vector<Moments> merge_tiles(const std::vector<Tile>& tiles, const std::vector<Moments>& part,
                                 size_t sources) {
  std::vector<Moments> out(sources);
  for (size_t t = 0; t < tiles.size(); ++t) out[tiles[t].src] = merge(out[tiles[t].src], part[t]);
  return out;
}

at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> bounds_of(at::TensorList tensors, at::ArrayRef<double> multipliers) {
  const size_t L = tensors.size();
  TORCH_CHECK(multipliers.size() == L, "gaussian_bounds: ", multipliers.size(), " multipliers for ", L,
              " tensors");
  std::vector<at::Tensor> hold;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < L; ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu() && is_float_storage(tensors[i]), "gaussian_bounds: tensors[", i,
                "] must be a CPU float32, float16 or bfloat16 tensor");
    TORCH_CHECK(tensors[i].numel() > 0, "gaussian_bounds: tensors[", i, "] is empty");
    TORCH_CHECK(multipliers[i] >= 0.0, "gaussian_bounds: multipliers[", i, "] must be >= 0");
    hold.push_back(dense(tensors[i]));
    sizes.push_back(tensors[i].numel());
  }
  const std::vector<Tile> tiles = make_tiles(sizes);
  std::vector<Moments> part(tiles.size());
  for_tiles(tiles, [&](int64_t t) {
    const Tile& tl = tiles[t];
    dispatch_storage(hold[tl.src].scalar_type(), [&](auto s) {
      using S = decltype(s);
      part[t] = range_moments<S>(cptr<S>(hold[tl.src]) + tl.off, tl.len);
    });
  });
  const std::vector<Moments> mom = merge_tiles(tiles, part, L);
  at::Tensor bounds = at::empty({int64_t(L)}, at::kFloat);
  float* out = bounds.data_ptr<float>();
  int64_t nan_index = -1;
  for (size_t i = 0; i < L; ++i) {
    const float sigma = sigma_of(mom[i]);
    if (std::isnan(sigma) && nan_index < 0) nan_index = int64_t(i);
    const double c = multipliers[i];
    out[i] = std::isinf(c) && !std::isnan(sigma) ? std::numeric_limits<float>::infinity()
                                                   : float(double(sigma) * c);
  }
  return {bounds, at::scalar_tensor(nan_index, at::kLong)};
}

struct Groups {
  int64_t n, count, len;  // elements, groups, elements per group
};

Groups check_asl(const at::Tensor& w, const at::Tensor& r, const char* fn) {
  TORCH_CHECK(w.device().is_cpu() && r.device().is_cpu(), fn, ": expected CPU tensors");
  TORCH_CHECK(is_float_storage(w), fn, ": w must be float32, float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), fn, ": w must be contiguous");
  TORCH_CHECK(r.scalar_type() == at::kFloat && r.dim() == 1 && r.is_contiguous(), fn,
              ": r must be a contiguous 1-D float32 tensor, got ", r.scalar_type(), " of shape ", r.sizes());
  const int64_t k = w.dim() > 0 ? w.size(0) : 1;
  TORCH_CHECK(r.numel() == 1 || r.numel() == k, fn, ": r has ", r.numel(), " elements; expected 1 or ", k);
  const int64_t n = w.numel();
  const int64_t count = r.numel();
  return {n, count, count > 0 ? n / count : 0};
}

// b_g = fp32(clamp(r, 0, 5)·σ) + 1e-6f, as the reference computes it.
SK_INLINE float bound_of(float r, float sigma) {
  const float rc = r < 0.f ? 0.f : (r > 5.f ? 5.f : r);
  return rc * sigma + 1e-6f;
}

// Whole groups per task when they fit in cache and there are enough of them.
bool whole_groups(const Groups& g) {
  return g.count > 1 && g.len <= kCachedRow && g.count >= 4 * at::get_num_threads();
}

// Bounds of every group via parallel tiles (used when groups are not done whole).
template <class S>
std::vector<float> group_bounds(const at::Tensor& w, const float* r, const Groups& g,
                                std::vector<Tile>& tiles) {
  tiles = make_tiles(std::vector<int64_t>(g.count, g.len));
  std::vector<Moments> part(tiles.size());
  const auto* wp = cptr<S>(w);
  for_tiles(tiles, [&](int64_t t) {
    part[t] = range_moments<S>(wp + tiles[t].src * g.len + tiles[t].off, tiles[t].len);
  });
  const std::vector<Moments> mom = merge_tiles(tiles, part, g.count);
  std::vector<float> b(g.count);
  for (int64_t i = 0; i < g.count; ++i) b[i] = bound_of(r[i], sigma_of(mom[i]));
  return b;
}

at::Tensor asl_fwd(const at::Tensor& w, const at::Tensor& r) {
  const Groups g = check_asl(w, r, "asl_fwd");
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (g.n == 0) return out;
  const float* rp = r.const_data_ptr<float>();
  dispatch_storage(w.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const auto* wp = cptr<S>(w);
    auto* op = static_cast<typename S::raw*>(out.mutable_data_ptr());
    if (whole_groups(g)) {
      at::parallel_for(0, g.count, std::max<int64_t>(1, kGrain / g.len), [&](int64_t g0, int64_t g1) {
        for (int64_t i = g0; i < g1; ++i) {
          const float b = bound_of(rp[i], sigma_of(range_moments<S>(wp + i * g.len, g.len)));
          mask_leaf<S>(wp + i * g.len, op + i * g.len, g.len, b);
        }
      });
      return;
    }
    std::vector<Tile> tiles;
    const std::vector<float> b = group_bounds<S>(w, rp, g, tiles);
    at::parallel_for(0, g.n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end;) {  // runs of one group
        const int64_t grp = j / g.len;
        const int64_t stop = std::min(end, (grp + 1) * g.len);
        mask_leaf<S>(wp + j, op + j, stop - j, b[grp]);
        j = stop;
      }
    });
  });
  return out;
}

at::Tensor asl_bwd(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& r) {
  const Groups g = check_asl(w, r, "asl_bwd");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == w.scalar_type() && grad.sizes() == w.sizes() &&
                  grad.is_contiguous(),
              "asl_bwd: grad must be a contiguous CPU tensor with w's shape and dtype");
  at::Tensor grad_r = at::zeros({g.count}, at::kFloat);
  if (g.n == 0) return grad_r;
  const float* rp = r.const_data_ptr<float>();
  float* gr = grad_r.data_ptr<float>();
  // -(Σ_pruned grad·w) / r inside the clamp's open interval, else 0
  auto finish = [&](int64_t i, double dot) {
    const float ri = rp[i];
    gr[i] = ri > 0.f && ri < 5.f ? float(-dot / double(ri)) : 0.f;
  };
  dispatch_storage(w.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const auto* wp = cptr<S>(w);
    const auto* gp = cptr<S>(grad);
    if (whole_groups(g)) {
      at::parallel_for(0, g.count, std::max<int64_t>(1, kGrain / g.len), [&](int64_t g0, int64_t g1) {
        for (int64_t i = g0; i < g1; ++i) {
          const float b = bound_of(rp[i], sigma_of(range_moments<S>(wp + i * g.len, g.len)));
          finish(i, pruned_dot<S>(gp + i * g.len, wp + i * g.len, g.len, b));
        }
      });
      return;
    }
    std::vector<Tile> tiles;
    const std::vector<float> b = group_bounds<S>(w, rp, g, tiles);
    std::vector<double> part(tiles.size());
    for_tiles(tiles, [&](int64_t t) {
      const int64_t off = tiles[t].src * g.len + tiles[t].off;
      part[t] = pruned_dot<S>(gp + off, wp + off, tiles[t].len, b[tiles[t].src]);
    });
    std::vector<double> dot(g.count, 0.0);
    for (size_t t = 0; t < tiles.size(); ++t) dot[tiles[t].src] += part[t];
    for (int64_t i = 0; i < g.count; ++i) finish(i, dot[i]);
  });
  return grad_r;
}

// ---------------------------------------------------------------------------------------------
// The ops' CPU implementations (schemas in sparsekern/ops/bound.py).

// Python's statistics.NormalDist().inv_cdf(p), p in (0, 1): Wichura's AS241 (PPND16), operation
// for operation as CPython evaluates it.
double normal_inv_cdf(double p) {
  const double q = p - 0.5;
  double num, den;
  if (std::fabs(q) <= 0.425) {
    const double r = 0.180625 - q * q;
    num = (((((((2.5090809287301226727e+3 * r + 3.3430575583588128105e+4) * r + 6.7265770927008700853e+4) * r +
                4.5921953931549871457e+4) * r + 1.3731693765509461125e+4) * r + 1.9715909503065514427e+3) * r +
            1.3314166789178437745e+2) * r + 3.3871328727963666080e+0) * q;
    den = ((((((5.2264952788528545610e+3 * r + 2.8729085735721942674e+4) * r + 3.9307895800092710610e+4) * r +
                2.1213794301586595867e+4) * r + 5.3941960214247511077e+3) * r + 6.8718700749205790830e+2) * r +
            4.2313330701600911252e+1) * r + 1.0;
    return num / den;
  }
  double r = q <= 0.0 ? p : 1.0 - p;
  r = std::sqrt(-std::log(r));
  if (r <= 5.0) {
    r = r - 1.6;
    num = (((((((7.7454501427834140764e-4 * r + 2.2723844989269184583e-2) * r + 2.4178072517745061177e-1) * r +
                1.2704582524523683826e+0) * r + 3.6478483247632046050e+0) * r + 5.7694972214606914055e+0) * r +
            4.6303378461565452959e+0) * r + 1.4234371107496835773e+0);
    den = (((((((1.05075007164441684324e-9 * r + 5.4759380849953449460e-4) * r + 1.5198666563616457197e-2) * r +
                1.4810397642748007459e-1) * r + 6.8976733498510000455e-1) * r + 1.6763848301838038494e+0) * r +
            2.0531916266377588219e+0) * r + 1.0);
  } else {
    r = r - 5.0;
    num = (((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r + 1.2426609473880784386e-3) * r +
                2.6532189526576123093e-2) * r + 2.9656057182850489123e-1) * r + 1.7848265399172913358e+0) * r +
            5.4637849111641143699e+0) * r + 6.6579046435011037772e+0);
    den = (((((((2.04426310338993978564e-15 * r + 1.4215117583164458887e-7) * r + 1.8463183175100546818e-5) * r +
                7.8686913114561329059e-4) * r + 1.4875361290850614852e-2) * r + 1.3692988092273580531e-1) * r +
            5.9983220655588793769e-1) * r + 1.0);
  }
  const double x = num / den;
  return q < 0.0 ? -x : x;
}

// √2·erfinv(s) for s in [0, 1] (the Gaussian bound multiplier; inf at s = 1): ops/bound.py's
// sqrt2_erfinv in the same double operations (normal quantile, two Newton steps on erf for
// small s or erfc near 1). tests/test_bound.py compares the two over a grid.
double sqrt2_erfinv(double s) {
  if (s >= 1.0) return std::numeric_limits<double>::infinity();
  if (s <= 0.0) return 0.0;
  const bool tail = s > 0.5;
  const double sqrt2 = std::sqrt(2.0), pi = 3.141592653589793;
  double x = tail ? -normal_inv_cdf((1.0 - s) / 2) : normal_inv_cdf((1.0 + s) / 2);
  for (int i = 0; i < 2; ++i) {
    const double f = tail ? (1.0 - s) - std::erfc(x / sqrt2) : std::erf(x / sqrt2) - s;
    x -= f / (std::sqrt(2 / pi) * std::exp(-x * x / 2));
  }
  return x;
}

std::tuple<at::Tensor, at::Tensor> gaussian_bounds(at::TensorList tensors, at::ArrayRef<double> sparsities) {
  std::vector<double> multipliers(sparsities.size());
  for (size_t i = 0; i < sparsities.size(); ++i) multipliers[i] = sqrt2_erfinv(sparsities[i]);
  return bounds_of(tensors, multipliers);
}

at::Tensor asl_threshold(const at::Tensor& w, const at::Tensor& r) { return asl_fwd(w.contiguous(), r.contiguous()); }

at::Tensor asl_threshold_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& r) {
  return asl_bwd(grad.contiguous(), w.contiguous(), r.contiguous());
}

}  // namespace bound
}  // namespace cpu
}  // namespace sparsekern

// CPU kernels of the bound ops, whose schemas are defined once, in sparsekern/ops/bound.py.
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("gaussian_bounds", &sparsekern::cpu::bound::gaussian_bounds);
  m.impl("asl_threshold", &sparsekern::cpu::bound::asl_threshold);
  m.impl("asl_threshold_backward", &sparsekern::cpu::bound::asl_threshold_backward);
}
