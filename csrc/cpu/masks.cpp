// Masks family, CPU kernels (SPEC.md §5): N:M, window / CK / intra, FC block masks, masked weight.
//
// Contract (shared with sparsekern/triton/masks.py, see sparsekern/ops/masks.py); counts are
// computed by the op layer (SPEC round), the kernels only select:
//   nm_mask(w, n, m) -> bool: w contiguous [K, C, *] (viewed [K, C, inner]), C % m == 0,
//     0 <= n <= m: in every group of m consecutive c at fixed (k, inner) keep the n largest |w|.
//   kernel_mask(w, window_keep, ck_keep, by_out) -> bool: w contiguous [K, C, R, S].
//     Window: in every R×S kernel keep the window_keep largest |w|. CK: score each kernel by the
//     max |w| of its window-kept entries (0 if none), keep the ck_keep best kernels of every group
//     (input channel c: its K kernels; by_out: output filter k: its C kernels). Result: AND.
//   block_mask(w, block, keep) -> bool: w contiguous [O, I]; blocks block×block (edge blocks
//     partial) scored by Σ|w| summed in fp32 in row-major order of the block; keep the `keep`
//     best blocks, then re-add the best block of every block row left empty.
//   masked_fwd(w, mask) -> w where mask else 0 (w's dtype; mask bool, same shape).
// Order everywhere: key = fp32 |w| (scores: fp32) with every NaN equal and above +inf; larger
// key first, equal keys by lower index first (= lower flat index) — deterministic, and equal to
// sparsekern.reference. A key is the bit pattern of the non-negative float, so unsigned integer
// order is numeric order; (key << 32 | ~index) is one totally ordered 64-bit key.
//
// Performance: rank counting for small groups (R×S windows, N:M groups) runs across 16 groups
// at once (lanes: vectorizes); CK groups and blocks use a 16-bit radix select (two histogram
// passes) or nth_element on 64-bit order keys; tasks get at least kGrain elements, so small
// layers run on one thread without waking the pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace sparsekern {
namespace cpu {
namespace masks {

constexpr uint32_t kInf = 0x7F800000u;
constexpr uint32_t kNaN = 0x7FC00000u;  // every NaN key
constexpr int kRankMax = 16;            // groups up to this size: rank counting, else selection
constexpr int64_t kGrain = int64_t(1) << 17;  // elements per parallel task, at least

SK_INLINE uint32_t key_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u &= 0x7FFFFFFFu;
  return u > kInf ? kNaN : u;
}

template <typename T>
SK_INLINE uint32_t key_at(const T* p) {
  return key_of(static_cast<float>(*p));
}

SK_INLINE uint64_t order_key(uint32_t key, uint32_t index) {
  return (uint64_t(key) << 32) | uint64_t(0xFFFFFFFFu - index);
}

// keep[i] = 1 iff keys[i] ranks < keep (larger key first, ties: lower i first); N fixed.
template <int N>
SK_INLINE void rank_fixed(const uint32_t* keys, int64_t keep, uint8_t* out) {
  for (int i = 0; i < N; ++i) {
    int rank = 0;
    for (int j = 0; j < N; ++j) rank += (keys[j] > keys[i]) | ((keys[j] == keys[i]) & (j < i));
    out[i] = rank < keep;
  }
}

// The keep-th largest of keys[0..n) (0 < keep <= n) and how many keys equal to it are kept
// (the first `need` in index order): 16-bit radix select, two histogram passes.
struct Cut {
  uint32_t t;
  int64_t need;
};
Cut cut_of(const uint32_t* keys, int64_t n, int64_t keep) {
  std::vector<int64_t> h(65536, 0);
  for (int64_t i = 0; i < n; ++i) ++h[keys[i] >> 16];
  int64_t above = 0;
  uint32_t hi = 65535;
  for (;; --hi) {
    if (above + h[hi] >= keep) break;
    above += h[hi];
  }
  std::fill(h.begin(), h.end(), 0);
  for (int64_t i = 0; i < n; ++i) h[keys[i] & 0xFFFFu] += (keys[i] >> 16) == hi;
  uint32_t lo = 65535;
  for (;; --lo) {
    if (above + h[lo] >= keep) break;
    above += h[lo];
  }
  return {(hi << 16) | lo, keep - above};
}

// out[i] = 1 for the `keep` best of keys[0..n) given their cut.
SK_INLINE void apply_cut(const uint32_t* keys, int64_t n, Cut c, uint8_t* out) {
  int64_t ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool tie = keys[i] == c.t;
    out[i] = (keys[i] > c.t) | (tie & (ties < c.need));
    ties += tie;
  }
}

// keep[i] = 1 for the `keep` best of keys[0..n) (larger key first, ties: lower i first).
// `scratch` holds n uint64 (used for mid-sized n).
SK_INLINE void top_of(const uint32_t* keys, int64_t n, int64_t keep, uint8_t* out,
                      std::vector<uint64_t>& scratch) {
  if (keep >= n) {
    std::fill(out, out + n, uint8_t(1));
    return;
  }
  if (keep <= 0) {
    std::fill(out, out + n, uint8_t(0));
    return;
  }
  switch (n) {
    case 4: return rank_fixed<4>(keys, keep, out);
    case 8: return rank_fixed<8>(keys, keep, out);
    case 9: return rank_fixed<9>(keys, keep, out);
    case 16: return rank_fixed<16>(keys, keep, out);
    default: break;
  }
  if (n <= kRankMax) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t ki = keys[i];
      int64_t rank = 0;
      for (int64_t j = 0; j < n; ++j) {
        rank += (keys[j] > ki) | ((keys[j] == ki) & (j < i));
      }
      out[i] = rank < keep;
    }
    return;
  }
  if (n > 4096) return apply_cut(keys, n, cut_of(keys, n, keep), out);
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = order_key(keys[i], uint32_t(i));
  std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.end(), std::greater<uint64_t>());
  const uint64_t cut = scratch[keep - 1];
  for (int64_t i = 0; i < n; ++i) out[i] = order_key(keys[i], uint32_t(i)) >= cut;
}

// Rank counting across kLanes independent groups at once (vectorizes over the lanes): element j
// of lane l is x[l*ls + j*es]; its mask goes to o at the same offset. Lanes >= nl are padding.
// With score, score[l] = the largest kept key of lane l (0 if none).
constexpr int kLanes = 16;
template <int N, typename T>
SK_INLINE void lanes_top(const T* x, int64_t ls, int64_t es, int nl, int64_t keep, uint8_t* o,
                         uint32_t* score) {
  int32_t k[N][kLanes];  // keys < 2^31: signed compares are the unsigned order
  for (int j = 0; j < N; ++j) {
    for (int l = 0; l < kLanes; ++l) k[j][l] = l < nl ? int32_t(key_at(x + l * ls + j * es)) : 0;
  }
  int32_t kept[N][kLanes];
  for (int i = 0; i < N; ++i) {
    int32_t r[kLanes] = {0};
    for (int j = 0; j < N; ++j) {
      if (j < i) {
        for (int l = 0; l < kLanes; ++l) r[l] += k[j][l] >= k[i][l];
      } else if (j > i) {
        for (int l = 0; l < kLanes; ++l) r[l] += k[j][l] > k[i][l];
      }
    }
    for (int l = 0; l < kLanes; ++l) kept[i][l] = r[l] < keep;
  }
  for (int j = 0; j < N; ++j) {
    for (int l = 0; l < nl; ++l) o[l * ls + j * es] = uint8_t(kept[j][l]);
  }
  if (score) {
    for (int l = 0; l < nl; ++l) {
      int32_t b = 0;
      for (int j = 0; j < N; ++j) b = std::max(b, kept[j][l] ? k[j][l] : 0);
      score[l] = uint32_t(b);
    }
  }
}

// lanes_top for the group sizes with a fixed-size instantiation; false if n has none.
template <typename T>
SK_INLINE bool lanes_top_n(int64_t n, const T* x, int64_t ls, int64_t es, int nl, int64_t keep,
                           uint8_t* o, uint32_t* score) {
  switch (n) {
    case 4: lanes_top<4>(x, ls, es, nl, keep, o, score); return true;
    case 8: lanes_top<8>(x, ls, es, nl, keep, o, score); return true;
    case 9: lanes_top<9>(x, ls, es, nl, keep, o, score); return true;
    case 16: lanes_top<16>(x, ls, es, nl, keep, o, score); return true;
    default: return false;
  }
}

template <typename Fn>
void dispatch(const at::Tensor& w, Fn&& fn) {
  switch (w.scalar_type()) {
    case at::kFloat: fn(w.data_ptr<float>()); break;
    case at::kHalf: fn(reinterpret_cast<const c10::Half*>(w.data_ptr())); break;
    case at::kBFloat16: fn(reinterpret_cast<const c10::BFloat16*>(w.data_ptr())); break;
    default: TORCH_CHECK(false, "sparsekern masks: w must be float32, float16 or bfloat16");
  }
}

void check_w(const at::Tensor& w, int64_t dim_min, int64_t dim_max) {
  TORCH_CHECK(w.device().is_cpu(), "sparsekern masks: w must be a CPU tensor");
  TORCH_CHECK(w.is_contiguous(), "sparsekern masks: w must be contiguous");
  TORCH_CHECK(w.dim() >= dim_min && w.dim() <= dim_max, "sparsekern masks: bad rank ", w.dim());
}

// ---------------------------------------------------------------------------------------------

// nm_mask over blocks [b0, b1) (block b: the m×inner values of groups (k, c-group)).
template <typename T>
SK_INLINE void nm_range_impl(const T* x, int64_t b0, int64_t b1, int64_t m, int64_t n, int64_t inner,
                             uint8_t* o) {
  const int64_t bsize = m * inner;
  std::vector<uint32_t> keys(m);
  std::vector<uint8_t> keep(m);
  std::vector<uint64_t> scratch;
  if (inner == 1 && m == 4) {  // 2:4 and friends, Linear: unrolled rank counting
    for (int64_t b = b0; b < b1; ++b) {
      uint32_t k[4];
      for (int j = 0; j < 4; ++j) k[j] = key_at(x + b * 4 + j);
      for (int i = 0; i < 4; ++i) {
        int rank = 0;
        for (int j = 0; j < 4; ++j) rank += (k[j] > k[i]) | ((k[j] == k[i]) & (j < i));
        o[b * 4 + i] = rank < n;
      }
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const auto* xb = x + b * bsize;
    uint8_t* ob = o + b * bsize;
    int64_t p = 0;
    for (; p < inner; p += kLanes) {  // lanes = inner positions (R·S = 9: 9 of 16 lanes)
      const int nl = int(std::min<int64_t>(kLanes, inner - p));
      if (!lanes_top_n(m, xb + p, 1, inner, nl, n, ob + p, nullptr)) break;
    }
    for (; p < inner; ++p) {
      for (int64_t j = 0; j < m; ++j) keys[j] = key_at(xb + j * inner + p);
      top_of(keys.data(), m, n, keep.data(), scratch);
      for (int64_t j = 0; j < m; ++j) ob[j * inner + p] = keep[j];
    }
  }
}
SK_CLONES void nm_range_f32(const float* x, int64_t b0, int64_t b1, int64_t m, int64_t n,
                          int64_t inner, uint8_t* o) {
  nm_range_impl(x, b0, b1, m, n, inner, o);
}
inline void nm_range(const float* x, int64_t b0, int64_t b1, int64_t m, int64_t n, int64_t inner,
                     uint8_t* o) {
  nm_range_f32(x, b0, b1, m, n, inner, o);
}
SK_CLONES void nm_range_f16(const c10::Half* x, int64_t b0, int64_t b1, int64_t m, int64_t n,
                          int64_t inner, uint8_t* o) {
  nm_range_impl(x, b0, b1, m, n, inner, o);
}
inline void nm_range(const c10::Half* x, int64_t b0, int64_t b1, int64_t m, int64_t n, int64_t inner,
                     uint8_t* o) {
  nm_range_f16(x, b0, b1, m, n, inner, o);
}
SK_CLONES void nm_range_bf16(const c10::BFloat16* x, int64_t b0, int64_t b1, int64_t m, int64_t n,
                          int64_t inner, uint8_t* o) {
  nm_range_impl(x, b0, b1, m, n, inner, o);
}
inline void nm_range(const c10::BFloat16* x, int64_t b0, int64_t b1, int64_t m, int64_t n, int64_t inner,
                     uint8_t* o) {
  nm_range_bf16(x, b0, b1, m, n, inner, o);
}

at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m) {
  check_w(w, 2, 64);
  const int64_t K = w.size(0), C = w.size(1), inner = K * C ? w.numel() / (K * C) : 0;
  TORCH_CHECK(m >= 1 && C % m == 0 && n >= 0 && n <= m, "sparsekern nm_mask: bad n, m");
  TORCH_CHECK(m < (int64_t(1) << 31), "sparsekern nm_mask: m too large");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  const int64_t blocks = K * (C / m), bsize = m * inner;  // one block: m×inner contiguous values
  dispatch(w, [&](auto* x) {
    const int64_t grain = std::max<int64_t>(1, kGrain / bsize);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      nm_range(x, b0, b1, m, n, inner, o);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------

// Window pass of kernel_mask over kernels [q0, q1): window mask, and with score the max key of
// each kernel's kept entries. Compiled per ISA (SK_CLONES wrappers below).
template <typename T>
SK_INLINE void window_range_impl(const T* x, int64_t k0, int64_t k1, int64_t RS, int64_t window_keep,
                                 uint8_t* o, uint32_t* score) {
  std::vector<uint32_t> keys(RS);
  std::vector<uint64_t> scratch;
  int64_t q = k0;
  if (window_keep >= RS) {  // CK alone: score = max key
    std::memset(o + k0 * RS, 1, (k1 - k0) * RS);
    for (; score && q + kLanes <= k1; q += kLanes) {  // lanes = kernels
      int32_t b[kLanes] = {0};
      for (int64_t j = 0; j < RS; ++j) {
        for (int l = 0; l < kLanes; ++l) b[l] = std::max(b[l], int32_t(key_at(x + (q + l) * RS + j)));
      }
      for (int l = 0; l < kLanes; ++l) score[q + l] = uint32_t(b[l]);
    }
    for (; score && q < k1; ++q) {
      uint32_t best = 0;
      for (int64_t j = 0; j < RS; ++j) best = std::max(best, key_at(x + q * RS + j));
      score[q] = best;
    }
    q = k1;
  }
  for (; q + kLanes <= k1; q += kLanes) {  // lanes = kernels
    if (!lanes_top_n(RS, x + q * RS, RS, 1, kLanes, window_keep, o + q * RS,
                     score ? score + q : nullptr)) break;
  }
  for (; q < k1; ++q) {
    for (int64_t j = 0; j < RS; ++j) keys[j] = key_at(x + q * RS + j);
    uint8_t* oq = o + q * RS;
    top_of(keys.data(), RS, window_keep, oq, scratch);
    if (score) {
      uint32_t best = 0;
      for (int64_t j = 0; j < RS; ++j) best = std::max(best, oq[j] ? keys[j] : 0u);
      score[q] = best;
    }
  }
}
SK_CLONES void window_range_f32(const float* x, int64_t k0, int64_t k1, int64_t RS, int64_t keep,
                                uint8_t* o, uint32_t* score) {
  window_range_impl(x, k0, k1, RS, keep, o, score);
}
SK_CLONES void window_range_f16(const c10::Half* x, int64_t k0, int64_t k1, int64_t RS, int64_t keep,
                                uint8_t* o, uint32_t* score) {
  window_range_impl(x, k0, k1, RS, keep, o, score);
}
SK_CLONES void window_range_bf16(const c10::BFloat16* x, int64_t k0, int64_t k1, int64_t RS,
                                 int64_t keep, uint8_t* o, uint32_t* score) {
  window_range_impl(x, k0, k1, RS, keep, o, score);
}
inline void window_range(const float* x, int64_t k0, int64_t k1, int64_t RS, int64_t keep, uint8_t* o,
                         uint32_t* score) {
  window_range_f32(x, k0, k1, RS, keep, o, score);
}
inline void window_range(const c10::Half* x, int64_t k0, int64_t k1, int64_t RS, int64_t keep,
                         uint8_t* o, uint32_t* score) {
  window_range_f16(x, k0, k1, RS, keep, o, score);
}
inline void window_range(const c10::BFloat16* x, int64_t k0, int64_t k1, int64_t RS, int64_t keep,
                         uint8_t* o, uint32_t* score) {
  window_range_bf16(x, k0, k1, RS, keep, o, score);
}

at::Tensor kernel_mask(const at::Tensor& w, int64_t window_keep, int64_t ck_keep, bool by_out) {
  check_w(w, 4, 4);
  const int64_t K = w.size(0), C = w.size(1), RS = w.size(2) * w.size(3), nk = K * C;
  const int64_t G = by_out ? C : K;  // kernels per CK group
  TORCH_CHECK(G < (int64_t(1) << 32) && RS < (int64_t(1) << 32), "sparsekern kernel_mask: too large");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  const bool ck = ck_keep < G;
  std::vector<uint32_t> score(ck ? nk : 0);
  // pass 1: window mask of every kernel (and its score: max key of the kept entries)
  dispatch(w, [&](auto* x) {
    at::parallel_for(0, nk, std::max<int64_t>(1, kGrain / RS), [&](int64_t k0, int64_t k1) {
      window_range(x, k0, k1, RS, window_keep, o, ck ? score.data() : nullptr);
    });
  });
  if (!ck) return out;
  // pass 2: CK selection per group; pass 3: clear the pruned kernels
  std::vector<uint8_t> alive(nk);
  const int64_t groups = by_out ? K : C, stride = by_out ? 1 : C, step = by_out ? C : 1;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / (G * RS)), [&](int64_t g0, int64_t g1) {
    std::vector<uint32_t> keys(G);
    std::vector<uint8_t> keep(G);
    std::vector<uint64_t> scratch;
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t i = 0; i < G; ++i) keys[i] = score[g * step + i * stride];
      top_of(keys.data(), G, ck_keep, keep.data(), scratch);
      for (int64_t i = 0; i < G; ++i) alive[g * step + i * stride] = keep[i];
    }
  });
  at::parallel_for(0, nk, std::max<int64_t>(1, kGrain / RS), [&](int64_t k0, int64_t k1) {
    for (int64_t q = k0; q < k1; ++q) {
      if (!alive[q]) std::memset(o + q * RS, 0, RS);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------

at::Tensor block_mask(const at::Tensor& w, int64_t block, int64_t keep) {
  check_w(w, 2, 2);
  const int64_t O = w.size(0), I = w.size(1);
  TORCH_CHECK(block >= 1, "sparsekern block_mask: block must be >= 1");
  const int64_t BR = (O + block - 1) / block, BC = (I + block - 1) / block, nb = BR * BC;
  TORCH_CHECK(nb < (int64_t(1) << 32), "sparsekern block_mask: more than 2^32 blocks");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  // block scores: rows in order, each row's |w| added to its blocks' sums (row-major per block)
  std::vector<float> sums(nb);
  dispatch(w, [&](auto* x) {
    at::parallel_for(0, BR, std::max<int64_t>(1, kGrain / (block * I)), [&](int64_t r0, int64_t r1) {
      for (int64_t br = r0; br < r1; ++br) {
        float* s = sums.data() + br * BC;
        std::fill(s, s + BC, 0.f);
        for (int64_t r = br * block; r < std::min(O, (br + 1) * block); ++r) {
          const auto* xr = x + r * I;
          for (int64_t bc = 0; bc < BC; ++bc) {
            float acc = s[bc];
            for (int64_t j = bc * block; j < std::min(I, (bc + 1) * block); ++j) {
              acc += std::fabs(static_cast<float>(xr[j]));
            }
            s[bc] = acc;
          }
        }
      }
    });
  });
  // selection: radix cut of the score keys; ties at the cut kept in block index order
  std::vector<uint32_t> keys(nb);
  for (int64_t i = 0; i < nb; ++i) keys[i] = key_of(sums[i]);
  std::vector<uint8_t> kept(nb);
  if (keep >= nb || keep <= 0) {
    std::fill(kept.begin(), kept.end(), uint8_t(keep > 0));
  } else {
    apply_cut(keys.data(), nb, cut_of(keys.data(), nb, keep), kept.data());
  }
  // every output row keeps at least one block: the best block of an empty block row
  at::parallel_for(0, BR, std::max<int64_t>(1, kGrain / BC), [&](int64_t r0, int64_t r1) {
    for (int64_t br = r0; br < r1; ++br) {
      const uint32_t* k = keys.data() + br * BC;
      uint8_t* kb = kept.data() + br * BC;
      bool any = false;
      int64_t best = 0;
      for (int64_t bc = 0; bc < BC; ++bc) {
        any |= kb[bc];
        if (k[bc] > k[best]) best = bc;  // the first maximal score
      }
      if (!any) kb[best] = 1;
    }
  });
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  at::parallel_for(0, O, std::max<int64_t>(1, kGrain / I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* kb = kept.data() + (r / block) * BC;
      uint8_t* orow = o + r * I;
      for (int64_t bc = 0; bc < BC; ++bc) {
        std::memset(orow + bc * block, kb[bc], std::min(block, I - bc * block));
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------

template <typename U>
void select_bits(const U* x, const uint8_t* m, U* y, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) y[i] = m[i] ? x[i] : U(0);  // +0 in every float format
  });
}

at::Tensor masked_fwd(const at::Tensor& w, const at::Tensor& mask) {
  check_w(w, 0, 64);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == w.sizes(),
              "sparsekern masked_fwd: mask must be a contiguous bool tensor shaped like w");
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  if (w.element_size() == 4) {
    select_bits(reinterpret_cast<const uint32_t*>(w.data_ptr()), m,
                reinterpret_cast<uint32_t*>(out.data_ptr()), w.numel());
  } else {
    TORCH_CHECK(w.element_size() == 2, "sparsekern masked_fwd: unsupported dtype");
    select_bits(reinterpret_cast<const uint16_t*>(w.data_ptr()), m,
                reinterpret_cast<uint16_t*>(out.data_ptr()), w.numel());
  }
  return out;
}

}  // namespace masks
}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern_C, m) {
  m.def("nm_mask(Tensor w, int n, int m) -> Tensor");
  m.def("kernel_mask(Tensor w, int window_keep, int ck_keep, bool by_out) -> Tensor");
  m.def("block_mask(Tensor w, int block, int keep) -> Tensor");
  m.def("masked_fwd(Tensor w, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern_C, CPU, m) {
  m.impl("nm_mask", &sparsekern::cpu::masks::nm_mask);
  m.impl("kernel_mask", &sparsekern::cpu::masks::kernel_mask);
  m.impl("block_mask", &sparsekern::cpu::masks::block_mask);
  m.impl("masked_fwd", &sparsekern::cpu::masks::masked_fwd);
}
