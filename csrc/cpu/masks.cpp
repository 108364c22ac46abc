// Masks family, CPU kernels (SPEC.md §5): N:M, window / CK / intra, FC block masks, masked weight.
//
// Kernels (the same contract as the launchers of sparsekern/triton/masks.py); the ops at the end
// of this file compute the counts from the sparsities (SPEC round, common.h) and call them:
//   nm_select(w, n, m) -> bool: w contiguous [K, C, *] (viewed [K, C, inner]), C % m == 0,
//     0 <= n <= m: in every group of m consecutive c at fixed (k, inner) keep the n largest |w|.
//   kernel_mask(w, window_keep, ck_keep, by_out) -> bool: w contiguous [K, C, R, S].
//     Window: in every R×S kernel keep the window_keep largest |w|. CK: score each kernel by the
//     max |w| of its window-kept entries (0 if none), keep the ck_keep best kernels of every group
//     (input channel c: its K kernels; by_out: output filter k: its C kernels). Result: AND.
//   block_select(w, block, keep) -> bool: w contiguous [O, I]; blocks block×block (edge blocks
//     partial) scored by Σ|w| summed in fp32 in row-major order of the block; keep the `keep`
//     best blocks, then re-add the best block of every block row left empty.
//   masked_fwd(w, mask) -> w where mask else 0 (w's dtype; mask bool, same shape).
// Order everywhere: key = fp32 |w| (scores: fp32) with every NaN equal and above +inf; larger
// key first, equal keys by lower index first (= lower flat index) — deterministic, and equal to
// sparsekern.reference. A key is the bit pattern of the non-negative float, so unsigned integer
// order is numeric order; (key << 32 | ~index) is one totally ordered 64-bit key.
//
// Performance (vector leaves in masks_lanes.inc, one instance per ISA): 3×3 windows are
// transposed in registers (W kernels × 9 keys -> 9 rows of W lanes), sorted by a network and
// cut at the keep-th key, which also gives the kernel score; other small groups (R×S windows,
// N:M groups; up to 16) are ranked on contiguous keys, W elements at a time, against their
// partners at fixed offsets (no gathers), scores as sliding maxima of the kept keys. CK groups
// are columns of the [K, C] score matrix (rows for by_out, after a transpose): W groups at once,
// the cut from a short per-lane sorted list (keep or G − keep + 1 small), two sorted halves
// (33..64 kernels) or by a search between the column's min and max (interpolated and midpoint
// steps); 3×3 fp32 CK alone scores straight from w (max of 9 = max of 3 triples, by shuffles)
// and expands the kept kernels by byte shuffles. The AVX2 instance (SK_LANES_AVX2) replaces the
// two-source permutes and 8-byte shuffles GCC lowers poorly there (two vpermd and a blend each;
// scalar bytes) by intrinsics: 3×3 rows by an 8×8 unpack transpose plus one gather, scores by
// overlapping loads and an unpack tree, mask bytes by packs, expansion by 16-byte pshufb. Blocks: sums
// vectorized per block size, a 16-bit radix select (two histogram passes) and its application in
// parallel chunks. Tasks get at least kGrain elements, so small layers run on one thread.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // AVX2 leaves (gathers, packs, pshufb) of the v3 instance
#endif

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed between inlined leaves only
#endif

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

// The keep-th largest of keys[0..n) (0 < keep <= n) and how many keys equal to it are kept
// (the first `need` in index order): 16-bit radix select, two histogram passes, each split over
// up to `tasks` parallel chunks (own histograms, summed).
struct Cut {
  uint32_t t;
  int64_t need;
};
SK_INLINE int64_t cut_tasks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
}
template <typename Bin>
void histogram(const uint32_t* keys, int64_t n, std::vector<int64_t>& h, Bin bin) {
  const int64_t tasks = cut_tasks(n), chunk = (n + tasks - 1) / tasks;
  std::vector<uint32_t> part(tasks * 65536, 0);  // n < 2^32 per chunk
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* p = part.data() + t * 65536;
      for (int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) bin(keys[i], p);
    }
  });
  std::fill(h.begin(), h.end(), 0);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t b = 0; b < 65536; ++b) h[b] += part[t * 65536 + b];
  }
}
Cut cut_of(const uint32_t* keys, int64_t n, int64_t keep) {
  std::vector<int64_t> h(65536);
  histogram(keys, n, h, [](uint32_t k, uint32_t* p) { ++p[k >> 16]; });
  int64_t above = 0;
  uint32_t hi = 65535;
  for (;; --hi) {
    if (above + h[hi] >= keep) break;
    above += h[hi];
  }
  histogram(keys, n, h, [hi](uint32_t k, uint32_t* p) { p[k & 0xFFFFu] += (k >> 16) == hi; });
  uint32_t lo = 65535;
  for (;; --lo) {
    if (above + h[lo] >= keep) break;
    above += h[lo];
  }
  return {(hi << 16) | lo, keep - above};
}

// out[i] = 1 for the `keep` best of keys[0..n) given their cut; parallel chunks start from the
// number of ties at the cut before them.
void apply_cut(const uint32_t* keys, int64_t n, Cut c, uint8_t* out) {
  const int64_t tasks = cut_tasks(n), chunk = (n + tasks - 1) / tasks;
  std::vector<int64_t> before(tasks + 1, 0);
  if (tasks > 1) {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t ties = 0;
        for (int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) ties += keys[i] == c.t;
        before[t + 1] = ties;
      }
    });
    for (int64_t t = 0; t < tasks; ++t) before[t + 1] += before[t];
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t ties = before[t];
      for (int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) {
        const bool tie = keys[i] == c.t;
        out[i] = (keys[i] > c.t) | (tie & (ties < c.need));
        ties += tie;
      }
    }
  });
}

// keep[i] = 1 for the `keep` best of keys[0..n) (larger key first, ties: lower i first), for
// groups larger than kRankMax. `scratch` holds n uint64 (used for mid-sized n).
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
  if (n > 4096) return apply_cut(keys, n, cut_of(keys, n, keep), out);
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = order_key(keys[i], uint32_t(i));
  std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.end(), std::greater<uint64_t>());
  const uint64_t cut = scratch[keep - 1];
  for (int64_t i = 0; i < n; ++i) out[i] = order_key(keys[i], uint32_t(i)) >= cut;
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

// Rank selection of small groups on contiguous keys. Groups: element i = b·M·es + j·es + p
// (block b, member j < M, position p < es) belongs to group (b, p); keep[i] = 1 iff fewer than
// `keep` members of its group rank above it. Vectorized over 16 consecutive i: member j's
// partners are at i ± d·es (d < M), valid when 0 <= j ± d < M; no gathers, no transposes.
// Chunks of whole blocks are converted to keys in a padded buffer (the partner loads of the
// first and last block stay inside it).

// Vector leaves (masks_lanes.inc, GCC vector extensions) per ISA, picked at run time
// (target_clones would lower these vectors to scalars): AVX-512 (x86-64-v4) 16 lanes, AVX2 (v3)
// 8 lanes, otherwise generic code with 8 lanes.
constexpr int kPad = 16;          // buffer padding, >= lanes
constexpr int64_t kChunk = 4096;  // elements per chunk of the rank selection (>= one block)

// Groups larger than kRankMax: selection per group (scalar).
template <typename T>
void select_range(const T* x, int64_t n, int64_t M, int64_t es, int64_t keep, uint8_t* o,
                  uint32_t* score) {
  std::vector<uint32_t> keys(M);
  std::vector<uint8_t> kept(M);
  std::vector<uint64_t> scratch;
  for (int64_t b = 0; b < n / (M * es); ++b) {
    for (int64_t p = 0; p < es; ++p) {
      const int64_t base = b * M * es + p;
      for (int64_t j = 0; j < M; ++j) keys[j] = key_at(x + base + j * es);
      top_of(keys.data(), M, keep, kept.data(), scratch);
      uint32_t best = 0;
      for (int64_t j = 0; j < M; ++j) {
        if (o) o[base + j * es] = kept[j];
        best = std::max(best, kept[j] ? keys[j] : 0u);
      }
      if (score) score[b] = best;  // es == 1 with score
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 12)
#define SK_MASKS_ISA 1
namespace v4 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
constexpr int W = 16;
#include "masks_lanes.inc"
#pragma GCC pop_options
}  // namespace v4
namespace v3 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
constexpr int W = 8;
#define SK_LANES_AVX2 1  // AVX2 intrinsics where GCC's generic vectors lower poorly
#include "masks_lanes.inc"
#undef SK_LANES_AVX2
#pragma GCC pop_options
}  // namespace v3
#endif
namespace base {
constexpr int W = 8;
#include "masks_lanes.inc"
}  // namespace base

#ifdef SK_MASKS_ISA
// The CPU's level; SPARSEKERN_MASKS_ISA=3 or 0 caps it (tests of the AVX2 and generic leaves).
inline int isa_level() {
  static const int level = [] {
    const int cpu = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
    const char* cap = std::getenv("SPARSEKERN_MASKS_ISA");
    return cap ? std::min(cpu, std::atoi(cap)) : cpu;
  }();
  return level;
}
#define SK_PICK(name, ...) \
  (isa_level() == 4 ? v4::name(__VA_ARGS__) : isa_level() == 3 ? v3::name(__VA_ARGS__) : base::name(__VA_ARGS__))
#else
#define SK_PICK(name, ...) base::name(__VA_ARGS__)
#endif

// groups over x[0..n) split into parallel tasks of whole blocks (M·es elements), >= kGrain each.
template <typename T>
void groups_parallel(const T* x, int64_t n, int64_t M, int64_t es, int64_t keep, uint8_t* o,
                     uint32_t* score) {
  const int64_t bsize = M * es;
  at::parallel_for(0, n / bsize, std::max<int64_t>(1, kGrain / bsize), [&](int64_t b0, int64_t b1) {
    SK_PICK(groups, x + b0 * bsize, (b1 - b0) * bsize, M, es, keep, o ? o + b0 * bsize : nullptr,
            score ? score + b0 * es : nullptr);
  });
}

at::Tensor nm_select(const at::Tensor& w, int64_t n, int64_t m) {
  check_w(w, 2, 64);
  const int64_t K = w.size(0), C = w.size(1), inner = K * C != 0 ? w.numel() / (K * C) : 0;
  TORCH_CHECK(m >= 1 && C % m == 0 && n >= 0 && n <= m, "sparsekern nm_mask: bad n, m");
  TORCH_CHECK(m < (int64_t(1) << 31), "sparsekern nm_mask: m too large");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  dispatch(w, [&](auto* x) { groups_parallel(x, w.numel(), m, inner, n, o, nullptr); });
  return out;
}

// ---------------------------------------------------------------------------------------------

SK_CLONES void and_bytes(uint8_t* o, const uint8_t* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] &= e[i];
}

at::Tensor kernel_mask(const at::Tensor& w, int64_t window_keep, int64_t ck_keep, bool by_out) {
  check_w(w, 4, 4);
  const int64_t K = w.size(0), C = w.size(1), RS = w.size(2) * w.size(3), nk = K * C;
  const int64_t G = by_out ? C : K;  // kernels per CK group
  TORCH_CHECK(G < (int64_t(1) << 31) && RS < (int64_t(1) << 31), "sparsekern kernel_mask: too large");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  const bool ck = ck_keep < G, window = window_keep < RS;
  // scratch arrays are written in full before they are read: left uninitialized
  std::unique_ptr<uint32_t[]> score(ck ? new uint32_t[nk] : nullptr);
  // pass 1: window mask of every kernel (and its score: max key of the kept entries)
  if (window || !ck) {
    dispatch(w, [&](auto* x) { groups_parallel(x, nk * RS, RS, 1, window_keep, o, score.get()); });
  } else if (RS == 9 && w.scalar_type() == at::kFloat) {  // CK alone, 3×3 fp32: scores from w
    const float* x = w.data_ptr<float>();
    at::parallel_for(0, nk, std::max<int64_t>(1, kGrain / 9), [&](int64_t q0, int64_t q1) {
      SK_PICK(scores9, x + q0 * 9, q1 - q0, score.get() + q0);
    });
  } else {  // CK alone: scores only
    dispatch(w, [&](auto* x) { groups_parallel(x, nk * RS, RS, 1, RS, nullptr, score.get()); });
  }
  if (!ck) return out;
  // pass 2: CK selection per group, vectorized over groups: columns of [G, L] keys (the [K, C]
  // scores; by_out: transposed to [C, K])
  const int64_t L = nk / G;
  std::unique_ptr<int32_t[]> keys_t(by_out ? new int32_t[nk] : nullptr);
  std::unique_ptr<uint8_t[]> alive(new uint8_t[nk]), alive_t(by_out ? new uint8_t[nk] : nullptr);
  if (by_out) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) keys_t[c * K + k] = int32_t(score[k * C + c]);
    }
  }
  const int32_t* keys = by_out ? keys_t.get() : reinterpret_cast<const int32_t*>(score.get());
  uint8_t* sel = by_out ? alive_t.get() : alive.get();
  const int64_t chunks = (L + kPad - 1) / kPad;
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / (G * kPad * 4)), [&](int64_t c0, int64_t c1) {
    SK_PICK(select_columns, keys, G, L, c0 * kPad, std::min(L, c1 * kPad), ck_keep, sel);
  });
  if (by_out) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) alive[k * C + c] = alive_t[c * K + k];
    }
  }
  // pass 3: expand alive to the kernels' entries (AND the window mask)
  std::unique_ptr<uint8_t[]> e(window ? new uint8_t[nk * RS] : nullptr);
  uint8_t* dst = window ? e.get() : o;
  at::parallel_for(0, nk, std::max<int64_t>(1, kGrain / RS), [&](int64_t q0, int64_t q1) {
    SK_PICK(expand_kernels, alive.get(), q0, q1, RS, dst);
    if (window) and_bytes(o + q0 * RS, e.get() + q0 * RS, (q1 - q0) * RS);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------

// Score keys of the blocks of block rows [br0, br1): rows in order, each row's |w| added to its
// blocks' fp32 sums (row-major within the block) in `s` (BC floats), then keys[br, :] = their
// keys. B: the block size (0: `block`, known at run time only); a compile-time B vectorizes the
// full blocks of a row (interleaved loads, same order of adds).
template <class S, int B>
SK_CLONES void block_keys_leaf(const typename S::raw* x, int64_t O, int64_t I, int64_t block,
                               int64_t br0, int64_t br1, float* s, uint32_t* keys) {
  const int64_t b = B ? B : block, BC = (I + b - 1) / b, full = I / b;
  for (int64_t br = br0; br < br1; ++br) {
    std::fill(s, s + BC, 0.f);
    for (int64_t r = br * b; r < std::min(O, (br + 1) * b); ++r) {
      const typename S::raw* xr = x + r * I;
      for (int64_t bc = 0; bc < full; ++bc) {
        float acc = s[bc];
        for (int64_t j = 0; j < b; ++j) acc += std::fabs(S::load(xr[bc * b + j]));
        s[bc] = acc;
      }
      for (int64_t j = full * b; j < I; ++j) s[full] += std::fabs(S::load(xr[j]));  // edge block
    }
    for (int64_t bc = 0; bc < BC; ++bc) keys[br * BC + bc] = key_of(s[bc]);
  }
}

// Rows [r0, r1) of the block mask from the kept flags of the blocks (B as in block_keys_leaf).
template <int B>
SK_CLONES void block_rows_leaf(const uint8_t* kept, int64_t I, int64_t block, int64_t r0, int64_t r1,
                               uint8_t* o) {
  const int64_t b = B ? B : block, BC = (I + b - 1) / b, full = I / b;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* kb = kept + (r / b) * BC;
    uint8_t* orow = o + r * I;
    for (int64_t bc = 0; bc < full; ++bc) {
      for (int64_t j = 0; j < b; ++j) orow[bc * b + j] = kb[bc];
    }
    for (int64_t j = full * b; j < I; ++j) orow[j] = kb[full];
  }
}

// f(std::integral_constant<int, B>) with B = block for blocks 1..4, else B = 0 (run time)
template <class F>
void dispatch_block(int64_t block, F&& f) {
  switch (block) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

at::Tensor block_select(const at::Tensor& w, int64_t block, int64_t keep) {
  check_w(w, 2, 2);
  const int64_t O = w.size(0), I = w.size(1);
  TORCH_CHECK(block >= 1, "sparsekern block_mask: block must be >= 1");
  const int64_t BR = (O + block - 1) / block, BC = (I + block - 1) / block, nb = BR * BC;
  TORCH_CHECK(nb < (int64_t(1) << 32), "sparsekern block_mask: more than 2^32 blocks");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return out;
  std::unique_ptr<uint32_t[]> keys(new uint32_t[nb]);  // written in full by the leaves
  dispatch_storage(w.scalar_type(), [&](auto st) {
    using S = decltype(st);
    const typename S::raw* x = cptr<S>(w);
    dispatch_block(block, [&](auto bt) {
      at::parallel_for(0, BR, std::max<int64_t>(1, kGrain / (block * I)), [&](int64_t r0, int64_t r1) {
        std::unique_ptr<float[]> row(new float[BC]);
        block_keys_leaf<S, decltype(bt)::value>(x, O, I, block, r0, r1, row.get(), keys.get());
      });
    });
  });
  // selection: radix cut of the score keys; ties at the cut kept in block index order
  std::unique_ptr<uint8_t[]> kept(new uint8_t[nb]);
  if (keep >= nb || keep <= 0) {
    std::memset(kept.get(), keep > 0, nb);
  } else {
    apply_cut(keys.get(), nb, cut_of(keys.get(), nb, keep), kept.get());
  }
  // every output row keeps at least one block: the best block of an empty block row
  at::parallel_for(0, BR, std::max<int64_t>(1, kGrain / BC), [&](int64_t r0, int64_t r1) {
    for (int64_t br = r0; br < r1; ++br) {
      const uint32_t* k = keys.get() + br * BC;
      uint8_t* kb = kept.get() + br * BC;
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
  dispatch_block(block, [&](auto bt) {
    at::parallel_for(0, O, std::max<int64_t>(1, kGrain / I), [&](int64_t r0, int64_t r1) {
      block_rows_leaf<decltype(bt)::value>(kept.get(), I, block, r0, r1, o);
    });
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

// ---------------------------------------------------------------------------------------------
// The ops' CPU implementations (schemas in sparsekern/ops/masks.py): any strides (copied to
// contiguous here); the counts from the sparsities with common.h's SPEC round.

at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m) { return nm_select(w.contiguous(), n, m); }

void check_conv(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 4, "sparsekern ", op, ": w must be a 4-D conv weight [K, C, R, S], got ", w.sizes());
}

at::Tensor window_mask(const at::Tensor& w, double sparsity, std::optional<int64_t> max_nonzero) {
  check_conv(w, "window_mask");
  const int64_t keep = cpu::window_keep(w.size(2) * w.size(3), sparsity, max_nonzero.value_or(-1));
  return kernel_mask(w.contiguous(), keep, w.size(0), false);
}

bool by_out(c10::string_view group) {
  TORCH_CHECK(group == "in" || group == "out", "sparsekern: group must be 'in' or 'out', got '", group, "'");
  return group == "out";
}

at::Tensor ck_mask(const at::Tensor& w, double sparsity, c10::string_view group) {
  check_conv(w, "ck_mask");
  const bool out = by_out(group);
  return kernel_mask(w.contiguous(), w.size(2) * w.size(3), keep_count(w.size(out ? 1 : 0), sparsity), out);
}

at::Tensor intra_mask(const at::Tensor& w, double sparsity, double window_fraction, c10::string_view group) {
  check_conv(w, "intra_mask");
  const bool out = by_out(group);
  const int64_t rs = w.size(2) * w.size(3);
  const double s_ck = intra_ck_sparsity(rs, sparsity, window_fraction);
  return kernel_mask(w.contiguous(), cpu::window_keep(rs, window_fraction * sparsity),
                     keep_count(w.size(out ? 1 : 0), s_ck), out);
}

at::Tensor block_mask(const at::Tensor& w, int64_t block, double sparsity) {
  TORCH_CHECK(w.dim() == 2 && block >= 1, "sparsekern block_mask: w must be 2-D [out, in] and block >= 1");
  const int64_t nb = ((w.size(0) + block - 1) / block) * ((w.size(1) + block - 1) / block);
  return block_select(w.contiguous(), block, keep_count(nb, sparsity));
}

at::Tensor masked_weight(const at::Tensor& w, const at::Tensor& mask) {
  return masked_fwd(w.contiguous(), mask.contiguous());
}

}  // namespace masks
}  // namespace cpu
}  // namespace sparsekern

// CPU kernels of the masks ops, whose schemas are defined once, in sparsekern/ops/masks.py
// (prune_fc_inputs, pack_mask and unpack_mask run the reference on every device).
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("nm_mask", &sparsekern::cpu::masks::nm_mask);
  m.impl("window_mask", &sparsekern::cpu::masks::window_mask);
  m.impl("ck_mask", &sparsekern::cpu::masks::ck_mask);
  m.impl("intra_mask", &sparsekern::cpu::masks::intra_mask);
  m.impl("block_mask", &sparsekern::cpu::masks::block_mask);
  m.impl("masked_weight", &sparsekern::cpu::masks::masked_weight);
}
