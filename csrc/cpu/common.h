// Shared pieces of the CPU kernel families (threshold, bound, masks, select, spmm): function
// multiversioning and inlining macros, fp32/fp64 bit casts, the storage types (load to fp32,
// store from fp32) with their dtype dispatch, the 8-lane fp32 vector used by the lane sums, and
// the counts / ranks the ops derive from their arguments (SPEC round, quantile ranks).
// Everything here is inline or a template: each family's translation unit includes it.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    (__GNUC__ >= 11)
// AVX-512 (v4), AVX2/FMA/F16C (v3) and baseline clones of every leaf, picked at load time
// (target_clones): the distributed build needs no -march. Measured on AMD EPYC (Zen 5): v4 over
// v3 is ~2x for power_fwd (double-precision exp/log) and 5-25% for the memory-bound leaves.
#define SK_CLONE_TARGETS target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")
#define SK_CLONES __attribute__((SK_CLONE_TARGETS))
#else
#define SK_CLONES
#endif

#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#define SK_SIMD _Pragma("omp simd")
#else
#define SK_INLINE inline
#define SK_SIMD
#endif

namespace sparsekern {
namespace cpu {

// at::empty for a kernel's output. One of at least 8 MB (CPU, Linux) asks for transparent huge
// pages on its 2 MB-aligned interior (madvise MADV_HUGEPAGE) before anything writes it: fresh
// memory costs a page fault per 4 KB page at first touch, and a batch-32 ResNet-50 layer's
// 100 MB output took ~25K of them, about as long as the sparse layer (AMD EPYC). The same policy
// as sparsekern/inference/functional.py new_output (keep in step); SPARSEKERN_HUGE_PAGES=0 turns
// both off. Memory the allocator reuses is already mapped: the advice changes nothing there.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = [] {
    const char* env = std::getenv("SPARSEKERN_HUGE_PAGES");
    return !(env && std::string(env) == "0");
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = uintptr_t(t.nbytes()), p = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (on && t.device().is_cpu() && bytes >= 4 * kHuge) {
    const uintptr_t a = (p + kHuge - 1) / kHuge * kHuge, e = (p + bytes) / kHuge * kHuge;
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return t;
}

// ---------------------------------------------------------------------------------------------
// Storage types: load to fp32, store from fp32 (round to nearest even, like c10::Half/BFloat16).

SK_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
SK_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
SK_INLINE double f64_from_bits(uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
SK_INLINE uint64_t f64_bits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

struct F32 {
  using raw = float;
  static SK_INLINE float load(float x) { return x; }
  static SK_INLINE float store(float x) { return x; }
};

struct BF16 {
  using raw = uint16_t;
  static SK_INLINE float load(uint16_t x) { return f32_from_bits(uint32_t(x) << 16); }
  static SK_INLINE uint16_t store(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
};

// IEEE half <-> float without F16C (branch-free, vectorizes; same results as c10::Half).
struct F16 {
  using raw = uint16_t;
  static SK_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized);
    return f32_from_bits(sign | bits);
  }
  static SK_INLINE uint16_t store(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// Calls f(S{}) with the storage type S of dtype st (fp32, fp16 or bf16).
template <class F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: return f(F32{});
    case at::kHalf: return f(F16{});
    case at::kBFloat16: return f(BF16{});
    default: TORCH_CHECK(false, "sparsekern: unsupported dtype ", st);
  }
}

template <class S>
const typename S::raw* cptr(const at::Tensor& x) {
  return static_cast<const typename S::raw*>(x.const_data_ptr());
}

// ---------------------------------------------------------------------------------------------
// 8 fp32 lanes: one AVX register, two SSE registers (lane sums: two of them make 16 lanes).

#if defined(__GNUC__)
typedef float Lanes8 __attribute__((vector_size(32)));
#else
struct Lanes8 {
  float v[8];
  Lanes8& operator+=(const Lanes8& o) {
    for (int l = 0; l < 8; ++l) v[l] += o.v[l];
    return *this;
  }
};
#endif

// ---------------------------------------------------------------------------------------------
// Counts and ranks the ops derive from their float arguments, in double exactly as the Python
// reference does (sparsekern/reference.py; -ffp-contract=off: no fused multiply-add), so every
// device keeps the same elements. tests/test_masks.py / test_select.py compare them over grids.

// SPEC §5 round: floor(x + 0.5), halves round up (reference.spec_round).
inline int64_t spec_round(double x) { return static_cast<int64_t>(std::floor(x + 0.5)); }

// Elements kept of n at sparsity s: n − round(n·s) (window, CK and block keeps).
inline int64_t keep_count(int64_t n, double s) { return n - spec_round(static_cast<double>(n) * s); }

// reference.window_keep: keep_count(rs, s), at most max_nonzero (< 0: no cap).
inline int64_t window_keep(int64_t rs, double s, int64_t max_nonzero = -1) {
  const int64_t keep = keep_count(rs, s);
  return max_nonzero < 0 ? keep : std::min(keep, max_nonzero);
}

// reference.intra_ck_sparsity: 1 − (1 − s)/d_w clamped to [0, 1], d_w = window_keep(rs, f·s)/rs
// (0 when rs = 0 or d_w = 0).
inline double intra_ck_sparsity(int64_t rs, double s, double f) {
  if (rs == 0) return 0.0;
  const double d_w = static_cast<double>(window_keep(rs, f * s)) / static_cast<double>(rs);
  return d_w > 0 ? std::min(std::max(1.0 - (1.0 - s) / d_w, 0.0), 1.0) : 0.0;
}

// reference.quantile_ranks: numpy's order statistics (k0, k1, gamma) of np.quantile(x, q,
// method) over n values. Virtual index v = (n−1)·q in double; linear: k = floor(v), k + 1, v − k
// (v ≥ n−1: n−1, n−1, v + 1); lower / higher / nearest: floor / ceil / round half to even.
struct Ranks {
  int64_t k0, k1;
  double gamma;
};

inline Ranks quantile_ranks(int64_t n, double q, const std::string& method) {
  const double v = static_cast<double>(n - 1) * q;
  if (method == "linear") {
    if (v >= static_cast<double>(n - 1)) return {n - 1, n - 1, v + 1.0};
    const double k = std::floor(v);
    return {static_cast<int64_t>(k), static_cast<int64_t>(k) + 1, v - k};
  }
  double k;
  if (method == "lower") {
    k = std::floor(v);
  } else if (method == "higher") {
    k = std::ceil(v);
  } else {
    TORCH_CHECK(method == "nearest", "sparsekern: interpolation must be linear, lower, higher or nearest, got '",
                method, "'");
    k = std::nearbyint(v);  // the default rounding mode: half to even (Python's round)
  }
  return {static_cast<int64_t>(k), static_cast<int64_t>(k), 0.0};
}

// The dtype as Python prints it (torch.float32): C++ type errors word it as ops/*.py's checks do.
inline std::string torch_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    default: return c10::toString(t);
  }
}

}  // namespace cpu
}  // namespace sparsekern
