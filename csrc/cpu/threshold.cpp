// Threshold family, CPU kernels (SPEC.md §1-3, §6): soft (STR), ST-3, power (Feather), hard (GMP).
//
// Contract (shared with sparsekern/triton/threshold.py, see sparsekern/ops/threshold.py):
//   w: contiguous fp32/fp16/bf16, any rank, viewed as [K, inner] (K = w.size(0), or 1 for 0-d).
//   t: contiguous fp32, 1-D, numel 1 (per layer), K (per output channel: element i uses
//      t[i / inner]) or numel(w) (per element), checked in that order.
//   grad: contiguous, shape and dtype of w. All math in fp32; results in w's dtype.
//
// Performance structure: everything is memory-bound except power_fwd with a general exponent.
//   * elementwise kernels: one pass, at::parallel_for over the flat index range; each chunk is
//     split into runs of constant threshold (rows) inside one call of a vectorized leaf.
//   * st3_fwd: rows that fit in cache are processed whole by one thread (row sums, then the
//     output while the row is still in L1/L2: one pass over memory); long rows (few channels)
//     use two passes: per-tile partial sums in parallel, then a parallel elementwise pass.
//   * sums (st3 means, soft_bwd's grad_t) use 16 fp32 lanes flushed to double every 1024
//     elements, over fixed tiles combined in a fixed order: the result does not depend on the
//     thread count or on memory alignment (bit-identical on every call). A block whose lanes
//     overflow (huge |w|) is summed again in double, so st3's means of fp32 data never overflow;
//     a kept infinite weight gives its channel scale 1 (the limit of ρ), not NaN.
//   * on x86-64 Linux/GCC every leaf is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and
//     the baseline, picked at load time (target_clones): the distributed build needs no -march.
// Agreeing with the reference where a last-bit difference would flip a mask or be amplified:
// g(t) of STR is computed with at::sigmoid/at::exp (the reference's own kernels). power_fwd is
// evaluated in double without overflow or cancellation (see power_mag): correctly rounded up to
// rare double-rounding ties, as is the reference's float64 evaluation.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

#if defined(__GNUC__)
#define SK_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SK_LAMBDA_INLINE
#endif

namespace sparsekern {
namespace cpu {

// torch.sign semantics: +1, -1, or 0 for +-0 and NaN.
SK_INLINE float sign_of(float x) { return float(x > 0.f) - float(x < 0.f); }
// torch.relu / clamp_min(0): NaN propagates.
SK_INLINE float relu(float x) { return x < 0.f ? 0.f : x; }

// ---------------------------------------------------------------------------------------------
// Threshold modes and runs of constant threshold.

enum Mode : int { kScalar = 0, kChannel = 1, kElem = 2 };

template <int M>
SK_INLINE float thr_at(const float* t, int64_t j, float tc) {
  if constexpr (M == kElem) {
    return t[j];
  } else {
    return tc;
  }
}

// Calls body(j0, j1, row, tc) for consecutive runs of local indices [j0, j1) of the flat range
// [begin, begin + n): runs are whole or partial rows (row = their row index) when kRows or the
// threshold is per channel, else the whole range is one run. tc is the run's threshold t[0] or
// t[row]; in kElem mode t is already offset to `begin` and body reads t[j] itself.
template <int M, bool kRows = false, class Body>
SK_INLINE void for_each_run(const float* t, int64_t begin, int64_t n, int64_t inner, Body&& body) {
  if constexpr (!kRows && M != kChannel) {
    body(int64_t(0), n, begin / inner, M == kScalar ? t[0] : 0.f);
  } else {
    int64_t row = begin / inner;
    int64_t j0 = 0;
    int64_t j1 = std::min(n, inner - begin % inner);
    while (j0 < n) {
      body(j0, j1, row, M == kScalar ? t[0] : (M == kChannel ? t[row] : 0.f));
      j0 = j1;
      j1 = std::min(n, j1 + inner);
      ++row;
    }
  }
}

// Sums of a(j) and b(j) over [j0, j1) into two doubles, deterministically: per block of 1024,
// f(j, a, b) fills two buffers (a plain loop the compiler vectorizes), the buffers are added
// into 16 fp32 lanes by index offset, and the lanes are flushed to double in a fixed order.
// The result depends neither on the ISA nor on the alignment of the data. A block whose fp32
// lanes overflow (64 terms of |w| ≳ 5e36 each; the double sum holds any fp32 data) or meet an
// inf/NaN is summed again directly in double (one test per block, off the vector loop).
SK_INLINE void lanes_add(Lanes8& acc, const float* p) {
  Lanes8 v;
  std::memcpy(&v, p, sizeof v);
  acc += v;
}
SK_INLINE double lanes_sum(const Lanes8& lo, const Lanes8& hi) {  // fixed order
  float f[16];
  std::memcpy(f, &lo, sizeof lo);
  std::memcpy(f + 8, &hi, sizeof hi);
  double s = 0.0;
  for (int l = 0; l < 16; ++l) s += f[l];
  return s;
}

template <class F>
SK_INLINE void lane_sum2(int64_t j0, int64_t j1, F&& f, double& out_a, double& out_b) {
  constexpr int L = 16;
  constexpr int64_t kBlock = 1024;
  double da = 0.0, db = 0.0;
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int64_t len = std::min(j1 - b0, kBlock);
    Lanes8 la0{}, la1{}, lb0{}, lb1{};
    int64_t j = 0;
    for (; j + L <= len; j += L) {
      alignas(64) float va[L];
      alignas(64) float vb[L];
      SK_SIMD for (int l = 0; l < L; ++l) f(b0 + j + l, va[l], vb[l]);
      lanes_add(la0, va);
      lanes_add(la1, va + 8);
      lanes_add(lb0, vb);
      lanes_add(lb1, vb + 8);
    }
    double sa = lanes_sum(la0, la1), sb = lanes_sum(lb0, lb1);
    for (; j < len; ++j) {
      float a, b;
      f(b0 + j, a, b);
      sa += a;
      sb += b;
    }
    if (!(std::fabs(sa) <= std::numeric_limits<double>::max() &&
          std::fabs(sb) <= std::numeric_limits<double>::max())) {  // inf or NaN
      sa = sb = 0.0;
      for (j = 0; j < len; ++j) {
        float a, b;
        f(b0 + j, a, b);
        sa += a;
        sb += b;
      }
    }
    da += sa;
    db += sb;
  }
  out_a = da;
  out_b = db;
}

// ---------------------------------------------------------------------------------------------
// Power threshold (SPEC §3) in double precision (vectorizable, no libm calls). For 0 <= t < a,
// (a^p − t^p)^(1/p) is evaluated without forming a power that overflows or underflows fp32
// (2.5^100, 0.3^100, 1e13^3) and without the cancellation of a^p − t^p just above t: for
// p = 2, 3 as (a − t)·(a + t) or (a − t)·(a² + at + t²) (positive factors; double holds fp32^3),
// else as a·δ^(1/p) with δ = 1 − (t/a)^p = −expm1(p·ln(t/a)) (relative condition number <= 1).
// The fp32 result is the correctly rounded one up to a rare double-rounding tie (<= 1 ulp).

SK_INLINE double log_pos(double x) {  // x > 0, finite, normal
  const uint64_t u = f64_bits(x);
  // exponent as an exact double: (u >> 52) placed in the mantissa of 2^52, minus 2^52 + 1023
  double e = f64_from_bits((u >> 52) | 0x4330000000000000ull) - (4503599627370496.0 + 1023.0);
  double m = f64_from_bits((u & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e = big ? e + 1.0 : e;
  const double s = (m - 1.0) / (m + 1.0);  // |s| <= 0.1716
  const double z = s * s;
  double p = 1.0 / 17;
  p = p * z + 1.0 / 15;
  p = p * z + 1.0 / 13;
  p = p * z + 1.0 / 11;
  p = p * z + 1.0 / 9;
  p = p * z + 1.0 / 7;
  p = p * z + 1.0 / 5;
  p = p * z + 1.0 / 3;
  const double logm = 2.0 * s + 2.0 * s * (z * p);
  return e * 0.6931471803691238 + (e * 1.9082149292705877e-10 + logm);
}

// exp(y) = scale·(1 + q) for y <= 0, clamped at -200 (beyond, every fp32 result is 0 or 1):
// scale = 2^k, k = round(y / ln 2), q = expm1(y − k·ln 2) by its Taylor series.
SK_INLINE void exp_parts(double y, double& q, double& scale) {
  y = y < -200.0 ? -200.0 : y;
  const double shift = 6755399441055744.0;  // 1.5 * 2^52
  const double kd = y * 1.4426950408889634 + shift;
  const double k = kd - shift;
  const double r = (y - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  double p = 1.0 / 479001600;  // 1/12!
  p = p * r + 1.0 / 39916800;
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  q = p * r;
  scale = f64_from_bits((f64_bits(kd) + 1023u) << 52);
}

SK_INLINE double exp_neg(double y) {  // exp(y), y <= 0
  double q, scale;
  exp_parts(y, q, scale);
  return q * scale + scale;
}

SK_INLINE double expm1_neg(double y) {  // expm1(y), y <= 0: q itself near 0, scale − 1 is exact
  double q, scale;
  exp_parts(y, q, scale);
  return q * scale + (scale - 1.0);
}

// Cube root of a positive normal d (well inside fp32's range): bit-trick estimate of the fp32
// value, two Halley steps in double (cubic convergence: 2e-2 -> 1e-6 -> 1e-18).
SK_INLINE double cbrt_pos(double d) {
  double y = f32_from_bits(f32_bits(float(d)) / 3u + 709921077u);
  for (int i = 0; i < 2; ++i) {
    const double y3 = y * y * y;
    y = y * (y3 + 2.0 * d) / (2.0 * y3 + d);
  }
  return y;
}

enum PowKind : int { kPow1 = 0, kPow2 = 1, kPow3 = 2, kPowGen = 3 };

// |out| for a > t >= 0 (a may be inf), rounded once: p = 1: the fp32 difference a − t;
// p = 2: sqrt((a − t)(a + t)); p = 3: cbrt((a − t)(a² + at + t²)) with a, t scaled by 2^-e
// (a = m·2^e, m in [1, 2)) into cbrt_pos's range; else a·δ^(1/p), δ = −expm1(p·ln(t/a)). In double
// the products cannot overflow and the factors hold no cancellation (a − t is exact or within
// 2^-53), so the result is within a few 2^-53 relative before its rounding to fp32.
template <int PK>
SK_INLINE float power_mag(float a, float t, double p, double inv_p) {
  if constexpr (PK == kPow1) {
    return a - t;
  } else {
    const bool finite = a < std::numeric_limits<float>::infinity();
    const double ad = finite ? double(a) : 1.0, td = t;
    double r;
    if constexpr (PK == kPow2) {
      r = std::sqrt((ad - td) * (ad + td));
    } else if constexpr (PK == kPow3) {
      const uint32_t eb = f32_bits(a) >> 23;  // biased exponent: e = eb − 127 (0: subnormal)
      const double down = f64_from_bits(uint64_t(1150u - eb) << 52);  // 2^-e
      const double up = f64_from_bits(uint64_t(896u + eb) << 52);     // 2^e
      const double as = ad * down, ts = td * down;
      r = cbrt_pos((as - ts) * (as * as + as * ts + ts * ts)) * up;
    } else {  // t = 0: δ = 1
      const double y = td / ad;  // [0, 1)
      const double delta = y > 0.0 ? -expm1_neg(p * log_pos(y > 0.0 ? y : 1.0)) : 1.0;
      r = ad * exp_neg(log_pos(delta) * inv_p);
    }
    return finite ? float(r) : a;
  }
}

// ---------------------------------------------------------------------------------------------
// Leaves: one call per parallel chunk; compiled per ISA (SK_CLONES). Pointers are offset to the
// chunk start `begin`; `t` too in kElem mode.

template <class S, int M>
SK_CLONES void soft_fwd_leaf(const typename S::raw* w, const float* t, typename S::raw* out,
                             int64_t begin, int64_t n, int64_t inner) {
  for_each_run<M>(t, begin, n, inner, [&](int64_t j0, int64_t j1, int64_t, float tc) SK_LAMBDA_INLINE {
    SK_SIMD for (int64_t j = j0; j < j1; ++j) {
      const float x = S::load(w[j]);
      out[j] = S::store(sign_of(x) * relu(std::fabs(x) - thr_at<M>(t, j, tc)));
    }
  });
}

template <class S, int M>
SK_CLONES void hard_fwd_leaf(const typename S::raw* w, const float* t, typename S::raw* out,
                             int64_t begin, int64_t n, int64_t inner) {
  for_each_run<M>(t, begin, n, inner, [&](int64_t j0, int64_t j1, int64_t, float tc) SK_LAMBDA_INLINE {
    SK_SIMD for (int64_t j = j0; j < j1; ++j) {
      const float x = S::load(w[j]);
      out[j] = S::store(x * float(std::fabs(x) > thr_at<M>(t, j, tc)));
    }
  });
}

// grad * (|w| > t ? 1 : theta): hard_bwd (theta = 0), power_bwd, and soft_bwd's grad_w.
template <class S, int M>
SK_CLONES void masked_grad_leaf(const typename S::raw* g, const typename S::raw* w, const float* t,
                                typename S::raw* out, float theta, int64_t begin, int64_t n,
                                int64_t inner) {
  for_each_run<M>(t, begin, n, inner, [&](int64_t j0, int64_t j1, int64_t, float tc) SK_LAMBDA_INLINE {
    SK_SIMD for (int64_t j = j0; j < j1; ++j) {
      const bool kept = std::fabs(S::load(w[j])) > thr_at<M>(t, j, tc);
      out[j] = S::store(S::load(g[j]) * (kept ? 1.f : theta));
    }
  });
}

template <class S, int M, int PK>
SK_CLONES void power_fwd_leaf(const typename S::raw* w, const float* t, typename S::raw* out,
                              double p, double inv_p, int64_t begin, int64_t n, int64_t inner) {
  for_each_run<M>(t, begin, n, inner, [&](int64_t j0, int64_t j1, int64_t, float tc) SK_LAMBDA_INLINE {
    SK_SIMD for (int64_t j = j0; j < j1; ++j) {
      const float x = S::load(w[j]);
      const float a = std::fabs(x);
      const float thr = thr_at<M>(t, j, tc);
      const bool kept = a > thr;
      // pruned lanes evaluate (1, 0): every intermediate stays finite
      const float q = sign_of(x) * (kept ? power_mag<PK>(kept ? a : 1.f, kept ? thr : 0.f, p, inv_p) : 0.f);
      out[j] = S::store(x != x ? x : q);  // a NaN weight stays NaN, as in every threshold op
    }
  });
}

// soft_bwd, per-element t: grad_w and grad_t[i] = -g'(t_i) * grad_i * sign(w_i) * kept_i.
template <class S>
SK_CLONES void soft_bwd_elem_leaf(const typename S::raw* g, const typename S::raw* w,
                                  const float* thr, const float* gprime, typename S::raw* gw,
                                  float* gt, int64_t n) {
  SK_SIMD for (int64_t j = 0; j < n; ++j) {
    const float x = S::load(w[j]);
    const float gj = S::load(g[j]);
    const float kept = float(std::fabs(x) > thr[j]);
    gw[j] = S::store(gj * kept);
    gt[j] = -(gprime[j] * (gj * sign_of(x) * kept));
  }
}

// soft_bwd, scalar / per-channel t: grad_w plus partial sums of grad*sign(w) over kept elements
// for tiles [tile0, tile1) of `tile` elements, `tiles_per_group` tiles per group of `glen`
// elements sharing thr[group] (thr has one entry per group).
template <class S>
SK_CLONES void soft_bwd_tiles_leaf(const typename S::raw* g, const typename S::raw* w,
                                   const float* thr, typename S::raw* gw, double* partial,
                                   int64_t tile0, int64_t tile1, int64_t glen, int64_t tile,
                                   int64_t tiles_per_group) {
  for (int64_t ti = tile0; ti < tile1; ++ti) {
    const int64_t grp = ti / tiles_per_group;
    const int64_t off = grp * glen + (ti % tiles_per_group) * tile;
    const int64_t len = std::min(tile, grp * glen + glen - off);
    const typename S::raw* gp = g + off;
    const typename S::raw* wp = w + off;
    typename S::raw* gwp = gw + off;
    const float tc = thr[grp];
    double s, unused;
    lane_sum2(int64_t(0), len, [&](int64_t j, float& a, float& b) SK_LAMBDA_INLINE {
      const float x = S::load(wp[j]);
      const float gj = S::load(gp[j]);
      const float kept = float(std::fabs(x) > tc);
      gwp[j] = S::store(gj * kept);
      a = gj * sign_of(x) * kept;
      b = 0.f;
    }, s, unused);
    partial[ti] = s;
  }
}

// A kept infinite weight makes both means inf: ρ = 1, its limit as that weight grows (both
// means are dominated by it), instead of inf/inf = NaN over the whole channel. NaN stays NaN.
SK_INLINE float st3_scale(double sum_all, double sum_kept, int64_t inner) {
  const float mean_all = float(sum_all / double(inner));
  const float mean_kept = float(sum_kept / double(inner));
  const float rho = std::isinf(mean_kept) && std::isinf(mean_all) ? 1.f
                                                                  : (mean_kept + 1e-6f) / (mean_all + 1e-6f);
  return 1.01f / (rho + 0.01f);
}

// ST-3 on whole rows [row0, row1): row sums, then the output (row still in cache).
template <class S, int M>
SK_CLONES void st3_rows_leaf(const typename S::raw* w, const float* t, typename S::raw* out,
                             int64_t row0, int64_t row1, int64_t inner) {
  for (int64_t row = row0; row < row1; ++row) {
    const typename S::raw* wr = w + row * inner;
    typename S::raw* outr = out + row * inner;
    const float* tr = M == kElem ? t + row * inner : t;
    const float tc = M == kScalar ? t[0] : (M == kChannel ? t[row] : 0.f);
    double sa, sk;
    lane_sum2(int64_t(0), inner, [&](int64_t j, float& a, float& k) SK_LAMBDA_INLINE {
      a = std::fabs(S::load(wr[j]));
      k = a > thr_at<M>(tr, j, tc) ? a : 0.f;  // a select: an inf weight at t = inf is not inf·0
    }, sa, sk);
    const float scale = st3_scale(sa, sk, inner);
    SK_SIMD for (int64_t j = 0; j < inner; ++j) {
      const float x = S::load(wr[j]);
      outr[j] = S::store(scale * (sign_of(x) * relu(std::fabs(x) - thr_at<M>(tr, j, tc))));
    }
  }
}

// ST-3 with one element per row (inner == 1): the row mean is the element itself.
template <class S, int M>
SK_CLONES void st3_single_leaf(const typename S::raw* w, const float* t, typename S::raw* out,
                               int64_t n, bool rescale) {
  SK_SIMD for (int64_t j = 0; j < n; ++j) {
    const float x = S::load(w[j]);
    const float a = std::fabs(x);
    const float thr = M == kScalar ? t[0] : t[j];
    // kept: (a + 1e-6)/(a + 1e-6) = 1, also for a = inf (not inf/inf); NaN: pruned, NaN
    const float rho = a > thr ? 1.f : 1e-6f / (a + 1e-6f);
    const float scale = rescale ? 1.01f / (rho + 0.01f) : 1.f;
    out[j] = S::store(scale * (sign_of(x) * relu(a - thr)));
  }
}

// ST-3 long rows, pass 1: partial sums (|w|, |w|*kept) of tiles [tile0, tile1).
template <class S, int M>
SK_CLONES void st3_stats_leaf(const typename S::raw* w, const float* t, double* part_all,
                              double* part_kept, int64_t tile0, int64_t tile1, int64_t inner,
                              int64_t tile, int64_t tiles_per_row) {
  for (int64_t ti = tile0; ti < tile1; ++ti) {
    const int64_t row = ti / tiles_per_row;
    const int64_t off = row * inner + (ti % tiles_per_row) * tile;
    const int64_t len = std::min(tile, row * inner + inner - off);
    const typename S::raw* wp = w + off;
    const float* tp = M == kElem ? t + off : t;
    const float tc = M == kScalar ? t[0] : (M == kChannel ? t[row] : 0.f);
    lane_sum2(int64_t(0), len, [&](int64_t j, float& a, float& k) SK_LAMBDA_INLINE {
      a = std::fabs(S::load(wp[j]));
      k = a > thr_at<M>(tp, j, tc) ? a : 0.f;
    }, part_all[ti], part_kept[ti]);
  }
}

// ST-3 long rows, pass 2: elementwise with a per-row scale.
template <class S, int M>
SK_CLONES void st3_apply_leaf(const typename S::raw* w, const float* t, const float* scale,
                              typename S::raw* out, int64_t begin, int64_t n, int64_t inner) {
  for_each_run<M, true>(t, begin, n, inner, [&](int64_t j0, int64_t j1, int64_t row, float tc) SK_LAMBDA_INLINE {
    const float sc = scale[row];
    SK_SIMD for (int64_t j = j0; j < j1; ++j) {
      const float x = S::load(w[j]);
      out[j] = S::store(sc * (sign_of(x) * relu(std::fabs(x) - thr_at<M>(t, j, tc))));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Drivers.

constexpr int64_t kGrain = 32768;     // elements per parallel task, at least
constexpr int64_t kTile = 65536;      // elements per reduction tile (fixed: determinism)
constexpr int64_t kCachedRow = 32768; // st3: rows up to this many elements are done in one pass
struct View {
  int64_t n, k, inner;
  Mode mode;
};

View check_and_view(const at::Tensor& w, const at::Tensor& t, const char* fn) {
  TORCH_CHECK(w.device().is_cpu() && t.device().is_cpu(), fn, ": expected CPU tensors");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf ||
                  w.scalar_type() == at::kBFloat16,
              fn, ": w must be float32, float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), fn, ": w must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous(), fn,
              ": t must be a contiguous 1-D float32 tensor, got ", t.scalar_type(), " of shape ",
              t.sizes());
  View v;
  v.n = w.numel();
  v.k = w.dim() > 0 ? w.size(0) : 1;
  v.inner = v.k > 0 ? v.n / v.k : 0;
  const int64_t nt = t.numel();
  if (nt == 1) {
    v.mode = kScalar;
  } else if (nt == v.k) {
    v.mode = kChannel;
  } else if (nt == v.n) {
    v.mode = kElem;
  } else {
    TORCH_CHECK(false, fn, ": t has ", nt, " elements; expected 1, ", v.k, " or ", v.n);
  }
  if (v.mode == kChannel && v.inner == 1) v.mode = kElem;  // same thing, no 1-element runs
  return v;
}

void check_grad(const at::Tensor& grad, const at::Tensor& w, const char* fn) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == w.scalar_type() &&
                  grad.sizes() == w.sizes() && grad.is_contiguous(),
              fn, ": grad must be a contiguous CPU tensor with w's shape and dtype");
}

template <class F>
void dispatch_mode(Mode m, F&& f) {
  switch (m) {
    case kScalar: return f(std::integral_constant<int, kScalar>{});
    case kChannel: return f(std::integral_constant<int, kChannel>{});
    default: return f(std::integral_constant<int, kElem>{});
  }
}

template <class S>
typename S::raw* mptr(at::Tensor& x) {
  return static_cast<typename S::raw*>(x.mutable_data_ptr());
}

// Runs leaf(begin, n, t_at_begin) over [0, v.n) in parallel chunks.
template <class F>
void run_elementwise(const View& v, const float* t, F&& leaf) {
  at::parallel_for(0, v.n, kGrain, [&](int64_t b, int64_t e) {
    leaf(b, e - b, v.mode == kElem ? t + b : t);
  });
}

// leaf(S{}, mode, begin, n, t_at_begin) over [0, v.n) in parallel chunks, for w's storage type S
// and the threshold mode (a std::integral_constant): the driver of every elementwise op.
template <class F>
void for_each_chunk(const at::Tensor& w, const View& v, const float* t, F&& leaf) {
  dispatch_storage(w.scalar_type(), [&](auto s) {
    dispatch_mode(v.mode, [&](auto m) {
      run_elementwise(v, t, [&](int64_t b, int64_t n, const float* tb) { leaf(s, m, b, n, tb); });
    });
  });
}

// g(t) of STR with the same ATen kernels as the reference (bit-identical thresholds).
at::Tensor activate(const at::Tensor& t, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "sparsekern: act must be 0 (identity), 1 (sigmoid) or 2 (exp)");
  if (act == 1) return at::sigmoid(t);
  if (act == 2) return at::exp(t);
  return t;
}

at::Tensor activation_grad(const at::Tensor& t, int64_t act) {
  if (act == 1) {
    const at::Tensor s = at::sigmoid(t);
    return s * (1 - s);
  }
  if (act == 2) return at::exp(t);
  return at::ones_like(t);
}

// ---------------------------------------------------------------------------------------------
// Ops.

at::Tensor soft_fwd(const at::Tensor& w, const at::Tensor& t, int64_t act) {
  const View v = check_and_view(w, t, "soft_fwd");
  const at::Tensor thr = activate(t, act).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (v.n == 0) return out;
  const float* tp = thr.const_data_ptr<float>();
  for_each_chunk(w, v, tp, [&](auto s, auto m, int64_t b, int64_t n, const float* tb) {
    using S = decltype(s);
    soft_fwd_leaf<S, decltype(m)::value>(cptr<S>(w) + b, tb, mptr<S>(out) + b, b, n, v.inner);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_bwd(const at::Tensor& grad, const at::Tensor& w,
                                            const at::Tensor& t, int64_t act, bool t_grad) {
  const View v = check_and_view(w, t, "soft_bwd");
  check_grad(grad, w, "soft_bwd");
  const at::Tensor thr = activate(t, act).contiguous();
  at::Tensor gw = at::empty(w.sizes(), w.options());
  if (!t_grad || v.n == 0) {
    at::Tensor gt = t_grad ? at::zeros(t.sizes(), t.options()) : at::empty({0}, t.options());
    if (v.n == 0) return {gw, gt};
    const float* tp = thr.const_data_ptr<float>();
    for_each_chunk(w, v, tp, [&](auto s, auto m, int64_t b, int64_t n, const float* tb) {
      using S = decltype(s);
      masked_grad_leaf<S, decltype(m)::value>(cptr<S>(grad) + b, cptr<S>(w) + b, tb, mptr<S>(gw) + b, 0.f, b,
                                              n, v.inner);
    });
    return {gw, gt};
  }
  const at::Tensor gprime = activation_grad(t, act).contiguous();
  at::Tensor gt = at::empty(t.sizes(), t.options());
  if (v.mode == kElem) {
    const float* tp = thr.const_data_ptr<float>();
    const float* gpp = gprime.const_data_ptr<float>();
    float* gtp = gt.mutable_data_ptr<float>();
    dispatch_storage(w.scalar_type(), [&](auto s) {
      using S = decltype(s);
      at::parallel_for(0, v.n, kGrain, [&](int64_t b, int64_t e) {
        soft_bwd_elem_leaf<S>(cptr<S>(grad) + b, cptr<S>(w) + b, tp + b, gpp + b, mptr<S>(gw) + b,
                              gtp + b, e - b);
      });
    });
    return {gw, gt};
  }
  // Scalar: one group of n elements; channel: K groups of `inner`. Fixed tiles -> partial sums.
  const int64_t groups = v.mode == kScalar ? 1 : v.k;
  const int64_t glen = v.mode == kScalar ? v.n : v.inner;
  const int64_t tile = std::min(glen, kTile);
  const int64_t tiles_per_group = (glen + tile - 1) / tile;
  const int64_t tiles = groups * tiles_per_group;
  std::vector<double> partial(tiles);
  // thresholds per group (scalar: the single value)
  const float* tp = thr.const_data_ptr<float>();
  dispatch_storage(w.scalar_type(), [&](auto s) {
    using S = decltype(s);
    at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / tile), [&](int64_t b, int64_t e) {
      soft_bwd_tiles_leaf<S>(cptr<S>(grad), cptr<S>(w), tp, mptr<S>(gw), partial.data(), b, e,
                             glen, tile, tiles_per_group);
    });
  });
  const float* gpp = gprime.const_data_ptr<float>();
  float* gtp = gt.mutable_data_ptr<float>();
  for (int64_t grp = 0; grp < groups; ++grp) {
    double acc = 0.0;
    for (int64_t i = 0; i < tiles_per_group; ++i) acc += partial[grp * tiles_per_group + i];
    gtp[grp] = -(gpp[grp] * float(acc));
  }
  return {gw, gt};
}

at::Tensor st3_fwd(const at::Tensor& w, const at::Tensor& t, bool rescale) {
  const View v = check_and_view(w, t, "st3_fwd");
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (v.n == 0) return out;
  const float* tp = t.const_data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  dispatch_storage(w.scalar_type(), [&](auto s) {
    using S = decltype(s);
    if (v.inner == 1) {  // one element per row: purely elementwise
      dispatch_mode(v.mode == kScalar ? kScalar : kElem, [&](auto m) {
        at::parallel_for(0, v.n, kGrain, [&](int64_t b, int64_t e) {
          st3_single_leaf<S, decltype(m)::value>(cptr<S>(w) + b, decltype(m)::value == kScalar ? tp : tp + b,
                                      mptr<S>(out) + b, e - b, rescale);
        });
      });
      return;
    }
    dispatch_mode(v.mode, [&](auto m) {
      constexpr int M = decltype(m)::value;
      if (!rescale) {  // scale 1: the soft threshold, elementwise
        run_elementwise(v, tp, [&](int64_t b, int64_t n, const float* tb) {
          soft_fwd_leaf<S, M>(cptr<S>(w) + b, tb, mptr<S>(out) + b, b, n, v.inner);
        });
        return;
      }
      if (v.inner <= kCachedRow && v.k >= 4 * threads) {
        // whole rows per task: one pass over memory
        const int64_t grain = std::max<int64_t>(1, kGrain / v.inner);
        at::parallel_for(0, v.k, grain, [&](int64_t r0, int64_t r1) {
          st3_rows_leaf<S, M>(cptr<S>(w), tp, mptr<S>(out), r0, r1, v.inner);
        });
        return;
      }
      // long rows or few rows: partial sums over fixed tiles, then an elementwise pass
      const int64_t tile = std::min(v.inner, kTile);
      const int64_t tiles_per_row = (v.inner + tile - 1) / tile;
      const int64_t tiles = v.k * tiles_per_row;
      std::vector<double> part_all(tiles), part_kept(tiles);
      at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / tile), [&](int64_t b, int64_t e) {
        st3_stats_leaf<S, M>(cptr<S>(w), tp, part_all.data(), part_kept.data(), b, e, v.inner, tile,
                             tiles_per_row);
      });
      std::vector<float> scale(v.k);
      for (int64_t row = 0; row < v.k; ++row) {
        double sa = 0.0, sk = 0.0;
        for (int64_t i = 0; i < tiles_per_row; ++i) {
          sa += part_all[row * tiles_per_row + i];
          sk += part_kept[row * tiles_per_row + i];
        }
        scale[row] = st3_scale(sa, sk, v.inner);
      }
      run_elementwise(v, tp, [&](int64_t b, int64_t n, const float* tb) {
        st3_apply_leaf<S, M>(cptr<S>(w) + b, tb, scale.data(), mptr<S>(out) + b, b, n, v.inner);
      });
    });
  });
  return out;
}

at::Tensor power_fwd(const at::Tensor& w, const at::Tensor& t, double p) {
  const View v = check_and_view(w, t, "power_fwd");
  TORCH_CHECK(p > 0 && std::isfinite(p), "power_fwd: p must be positive and finite, got ", p);
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (v.n == 0) return out;
  const float* tp = t.const_data_ptr<float>();
  const double pf = p, inv_pf = 1.0 / p;
  const PowKind kind = p == 1.0 ? kPow1 : p == 2.0 ? kPow2 : p == 3.0 ? kPow3 : kPowGen;
  for_each_chunk(w, v, tp, [&](auto s, auto m, int64_t b, int64_t n, const float* tb) {
    using S = decltype(s);
    constexpr int M = decltype(m)::value;
    const auto* wp = cptr<S>(w) + b;
    auto* op = mptr<S>(out) + b;
    switch (kind) {
      case kPow1: return power_fwd_leaf<S, M, kPow1>(wp, tb, op, pf, inv_pf, b, n, v.inner);
      case kPow2: return power_fwd_leaf<S, M, kPow2>(wp, tb, op, pf, inv_pf, b, n, v.inner);
      case kPow3: return power_fwd_leaf<S, M, kPow3>(wp, tb, op, pf, inv_pf, b, n, v.inner);
      default: return power_fwd_leaf<S, M, kPowGen>(wp, tb, op, pf, inv_pf, b, n, v.inner);
    }
  });
  return out;
}

at::Tensor masked_grad(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& t,
                       float theta, const char* fn) {
  const View v = check_and_view(w, t, fn);
  check_grad(grad, w, fn);
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (v.n == 0) return out;
  const float* tp = t.const_data_ptr<float>();
  for_each_chunk(w, v, tp, [&](auto s, auto m, int64_t b, int64_t n, const float* tb) {
    using S = decltype(s);
    masked_grad_leaf<S, decltype(m)::value>(cptr<S>(grad) + b, cptr<S>(w) + b, tb, mptr<S>(out) + b, theta, b,
                                            n, v.inner);
  });
  return out;
}

at::Tensor power_bwd(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& t,
                     double theta) {
  return masked_grad(grad, w, t, float(theta), "power_bwd");
}

at::Tensor hard_fwd(const at::Tensor& w, const at::Tensor& t) {
  const View v = check_and_view(w, t, "hard_fwd");
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (v.n == 0) return out;
  const float* tp = t.const_data_ptr<float>();
  for_each_chunk(w, v, tp, [&](auto s, auto m, int64_t b, int64_t n, const float* tb) {
    using S = decltype(s);
    hard_fwd_leaf<S, decltype(m)::value>(cptr<S>(w) + b, tb, mptr<S>(out) + b, b, n, v.inner);
  });
  return out;
}

at::Tensor hard_bwd(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& t) {
  return masked_grad(grad, w, t, 0.f, "hard_bwd");
}

}  // namespace cpu
}  // namespace sparsekern

// A fragment: each op family's file (csrc/cpu/<family>.cpp) defines its own schemas in the one
// sparsekern_C namespace of this library.
TORCH_LIBRARY_FRAGMENT(sparsekern_C, m) {
  m.def("soft_fwd(Tensor w, Tensor t, int act) -> Tensor");
  m.def("soft_bwd(Tensor grad, Tensor w, Tensor t, int act, bool t_grad) -> (Tensor, Tensor)");
  m.def("st3_fwd(Tensor w, Tensor t, bool rescale) -> Tensor");
  m.def("power_fwd(Tensor w, Tensor t, float p) -> Tensor");
  m.def("power_bwd(Tensor grad, Tensor w, Tensor t, float theta) -> Tensor");
  m.def("hard_fwd(Tensor w, Tensor t) -> Tensor");
  m.def("hard_bwd(Tensor grad, Tensor w, Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern_C, CPU, m) {
  m.impl("soft_fwd", &sparsekern::cpu::soft_fwd);
  m.impl("soft_bwd", &sparsekern::cpu::soft_bwd);
  m.impl("st3_fwd", &sparsekern::cpu::st3_fwd);
  m.impl("power_fwd", &sparsekern::cpu::power_fwd);
  m.impl("power_bwd", &sparsekern::cpu::power_bwd);
  m.impl("hard_fwd", &sparsekern::cpu::hard_fwd);
  m.impl("hard_bwd", &sparsekern::cpu::hard_bwd);
}
