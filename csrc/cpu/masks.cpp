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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#else
#define SK_INLINE inline
#endif

namespace sparsekern {
namespace cpu {
namespace masks {

constexpr uint32_t kInf = 0x7F800000u;
constexpr uint32_t kNaN = 0x7FC00000u;  // every NaN key
constexpr int kRankMax = 16;            // groups up to this size: rank counting, else nth_element

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

// keep[i] = 1 for the `keep` best of keys[0..n) (larger key first, ties: lower i first).
// `scratch` holds n uint64 (used when n > kRankMax).
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
    const int64_t grain = std::max<int64_t>(1, 16384 / bsize);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t> keys(m);
      std::vector<uint8_t> keep(m);
      std::vector<uint64_t> scratch;
      for (int64_t b = b0; b < b1; ++b) {
        const auto* xb = x + b * bsize;
        uint8_t* ob = o + b * bsize;
        if (inner == 1) {
          if (m == 4) {  // 2:4 and friends, Linear: rank counting unrolled
            uint32_t k[4];
            for (int j = 0; j < 4; ++j) k[j] = key_at(xb + j);
            for (int i = 0; i < 4; ++i) {
              int rank = 0;
              for (int j = 0; j < 4; ++j) rank += (k[j] > k[i]) | ((k[j] == k[i]) & (j < i));
              ob[i] = rank < n;
            }
          } else {
            for (int64_t j = 0; j < m; ++j) keys[j] = key_at(xb + j);
            top_of(keys.data(), m, n, ob, scratch);
          }
          continue;
        }
        for (int64_t p = 0; p < inner; ++p) {
          for (int64_t j = 0; j < m; ++j) keys[j] = key_at(xb + j * inner + p);
          top_of(keys.data(), m, n, keep.data(), scratch);
          for (int64_t j = 0; j < m; ++j) ob[j * inner + p] = keep[j];
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------

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
    at::parallel_for(0, nk, std::max<int64_t>(1, 4096 / RS), [&](int64_t k0, int64_t k1) {
      std::vector<uint32_t> keys(RS);
      std::vector<uint64_t> scratch;
      for (int64_t q = k0; q < k1; ++q) {
        for (int64_t j = 0; j < RS; ++j) keys[j] = key_at(x + q * RS + j);
        uint8_t* oq = o + q * RS;
        top_of(keys.data(), RS, window_keep, oq, scratch);
        if (ck) {
          uint32_t best = 0;
          for (int64_t j = 0; j < RS; ++j) best = std::max(best, oq[j] ? keys[j] : 0u);
          score[q] = best;
        }
      }
    });
  });
  if (!ck) return out;
  // pass 2: CK selection per group; pass 3: clear the pruned kernels
  std::vector<uint8_t> alive(nk);
  const int64_t groups = by_out ? K : C, stride = by_out ? 1 : C, step = by_out ? C : 1;
  at::parallel_for(0, groups, std::max<int64_t>(1, 65536 / G), [&](int64_t g0, int64_t g1) {
    std::vector<uint32_t> keys(G);
    std::vector<uint8_t> keep(G);
    std::vector<uint64_t> scratch;
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t i = 0; i < G; ++i) keys[i] = score[g * step + i * stride];
      top_of(keys.data(), G, ck_keep, keep.data(), scratch);
      for (int64_t i = 0; i < G; ++i) alive[g * step + i * stride] = keep[i];
    }
  });
  at::parallel_for(0, nk, std::max<int64_t>(1, 16384 / RS), [&](int64_t k0, int64_t k1) {
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
    at::parallel_for(0, BR, std::max<int64_t>(1, 65536 / (block * I)), [&](int64_t r0, int64_t r1) {
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
  // selection: the keep-th best 64-bit order key is the cut
  std::vector<uint64_t> ok(nb);
  at::parallel_for(0, nb, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) ok[i] = order_key(key_of(sums[i]), uint32_t(i));
  });
  uint64_t cut = ~uint64_t(0);  // keep == 0: nothing passes (no order key is all ones)
  if (keep >= nb) {
    cut = 0;
  } else if (keep > 0) {
    std::vector<uint64_t> tmp(ok);
    std::nth_element(tmp.begin(), tmp.begin() + (keep - 1), tmp.end(), std::greater<uint64_t>());
    cut = tmp[keep - 1];
  }
  std::vector<uint8_t> kept(nb);
  at::parallel_for(0, BR, std::max<int64_t>(1, 65536 / BC), [&](int64_t r0, int64_t r1) {
    for (int64_t br = r0; br < r1; ++br) {
      const uint64_t* k = ok.data() + br * BC;
      uint8_t* kb = kept.data() + br * BC;
      bool any = false;
      int64_t best = 0;
      for (int64_t bc = 0; bc < BC; ++bc) {
        kb[bc] = k[bc] >= cut;
        any |= kb[bc];
        if (k[bc] > k[best]) best = bc;  // order key: equal scores prefer the lower index
      }
      if (!any) kb[best] = 1;  // every output row keeps at least one block
    }
  });
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  at::parallel_for(0, O, std::max<int64_t>(1, 65536 / I), [&](int64_t r0, int64_t r1) {
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
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
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
