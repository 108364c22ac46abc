// spmm family, 16-bit weights: a bitmap-compressed bf16 / fp16 weight times a few activation rows
// (transformer decode), fp32 accumulation.
//
// Contract (see sparsekern/ops/spmm.py, sparsekern/inference/formats.py bitmap_from_dense):
//   bitmap_mm(rowptr, mask, val, bias, x, out_features) -> y [B, out_features], x's dtype
//     mask: uint8 [out, G] with G a multiple of 8 (in padded to 64 columns): bit j of byte g of
//       row r is set iff W[r, 8g + j] != 0;
//     val: bf16 or fp16 [nnz + 8]: the nonzeros row by row, columns ascending, then 8 zeros of
//       slack (the kernel loads 8 values at a time);
//     rowptr: int64 [out + 1]: row r's values are val[rowptr[r] : rowptr[r + 1]];
//     bias: empty or [out] (val's dtype); x: [B, in] contiguous, val's dtype, in <= 8G.
//   y[b, r] = bias[r] + Σ_c W[r, c]·x[b, c], accumulated in fp32, rounded once to x's dtype.
//
// Bytes per weight: 1/8 (mask) + 2·density (values), vs 2 for dense bf16: 0.56× at 50 %,
// 0.36× at 70 %. The AVX2 path expands each group of 8 columns from its packed values with
// one byte shuffle (a 256-entry table per mask byte: placement, zeros and, for bf16, the
// conversion to fp32 at once; fp16: then vcvtph2ps), and multiplies the dense x
// segment (converted to fp32 once per call): the work is per column group, independent of the
// density, and shared by up to 4 rows of x. The offsets of the 8 groups of a 64-bit mask word
// are popcounts of its prefixes, so consecutive groups do not wait on each other. With AVX-512
// (BW, VBMI2) the step is 32 columns, expanded by vpexpandw (no table), bf16 multiplied by
// vdpbf16ps where the CPU has AVX512-BF16 (x stays bf16): row_avx512. Without AVX2 (or F16C,
// FMA): a scalar loop over the set bits. SPARSEKERN_BITMAP_ISA caps the level (isa_level).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"

namespace sparsekern {
namespace cpu {
namespace {

// Per mask byte, byte shuffles (vpshufb) that expand a group's packed 16-bit values (16 bytes,
// value k at bytes 2k, 2k+1) in one instruction, zeros where the mask bit is clear:
//   bf16[m]: 32 bytes for a 256-bit register holding the 16 bytes in both halves; fp32 lane j
//     (half j / 4) = bytes (zero, zero, 2·rank(j), 2·rank(j) + 1): the bf16 → fp32 conversion is
//     the placement in the high half of the lane;
//   f16[m]: 16 bytes; 16-bit lane j = value rank(j) (then vcvtph2ps).
// 12 KB: stays in L1 beside x and the value stream.
struct ExpandTable {
  alignas(32) uint8_t bf16[256][32];
  alignas(16) uint8_t f16[256][16];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) {
        const bool on = (m >> j) & 1;
        uint8_t* b = bf16[m] + 4 * j;  // half j / 4, byte 4·(j % 4) of that half
        b[0] = b[1] = 0x80;
        b[2] = on ? uint8_t(2 * k) : 0x80;
        b[3] = on ? uint8_t(2 * k + 1) : 0x80;
        f16[m][2 * j] = on ? uint8_t(2 * k) : 0x80;
        f16[m][2 * j + 1] = on ? uint8_t(2 * k + 1) : 0x80;
        k += on;
      }
    }
  }
};
const ExpandTable kExpand;

constexpr int64_t kMaxB = 4;  // rows of x sharing one expanded weight group

SK_INLINE float load16(uint16_t v, bool bf) { return bf ? BF16::load(v) : F16::load(v); }

// Scalar rows b0..b1 (any CPU); returns false if a row's mask and rowptr disagree.
bool rows_scalar(const int64_t* rp, const uint8_t* mask, int64_t G, const uint16_t* val,
                 int64_t val_len, bool bf, const float* xf, int64_t ldx, int64_t B, float* acc,
                 int64_t b0, int64_t b1) {
  for (int64_t r = b0; r < b1; ++r) {
    int64_t off = rp[r];
    float s[kMaxB] = {};
    const uint8_t* mk = mask + r * G;
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < 8; ++j)
        if ((mk[g] >> j) & 1) {
          if (off >= val_len) return false;
          const float w = load16(val[off++], bf);
          for (int64_t b = 0; b < B; ++b) s[b] += w * xf[b * ldx + 8 * g + j];
        }
    if (off != rp[r + 1]) return false;
    for (int64_t b = 0; b < B; ++b) acc[(r - b0) * kMaxB + b] = s[b];
  }
  return true;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define SK_HAS_AVX2_PATH 1
// Software prefetch of both streams, once per 64-bit mask word (64 columns: at most 128 bytes of
// values, 2 lines): the hardware prefetchers alone left the kernel at half of dense bf16's DRAM
// bandwidth (Intel Xeon, weights out of cache). 2 KB of values and 512 B of mask ahead (1 KB –
// 8 KB measured alike); past the row they reach the next row's, contiguous in both streams.
SK_INLINE void prefetch_ahead(const uint8_t* mk, const uint16_t* val) {
  const char* v = reinterpret_cast<const char*>(val) + 2048;
  _mm_prefetch(v, _MM_HINT_T0);
  _mm_prefetch(v + 64, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(mk) + 512, _MM_HINT_T0);
}
// One row: B (1..4, compile-time NB) dot products; false if the mask reads past the values.
template <bool BF, int NB>
__attribute__((target("avx2,fma,f16c,bmi2,popcnt"))) bool row_avx2(
    const uint8_t* mk, int64_t G, const uint16_t* val, int64_t off, int64_t end, int64_t limit,
    const float* xf, int64_t ldx, float* out) {
  // NA independent accumulators per row of x: the FMA latency (4 cycles) is hidden.
  constexpr int NA = NB == 1 ? 8 : NB == 2 ? 4 : 2;
  __m256 a[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < NA; ++q) a[b][q] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    prefetch_ahead(mk + g0, val + off);
    uint64_t word;
    std::memcpy(&word, mk + g0, 8);
    if (off + int64_t(_mm_popcnt_u64(word)) > limit) return false;
    for (int k = 0; k < 8; ++k) {
      const unsigned m = unsigned(word >> (8 * k)) & 0xFFu;
      const int64_t o = off + int64_t(_mm_popcnt_u64(_bzhi_u64(word, 8 * k)));
      __m256 w;
      if (BF) {
        const __m256i raw = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(val + o)));
        w = _mm256_castsi256_ps(_mm256_shuffle_epi8(
            raw, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.bf16[m]))));
      } else {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(val + o));
        w = _mm256_cvtph_ps(_mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.f16[m]))));
      }
      const float* xp = xf + 8 * (g0 + k);
      for (int b = 0; b < NB; ++b)
        a[b][k % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + b * ldx), a[b][k % NA]);
    }
    off += int64_t(_mm_popcnt_u64(word));
  }
  for (int b = 0; b < NB; ++b) {
    __m256 s = a[b][0];
    for (int q = 1; q < NA; ++q) s = _mm256_add_ps(s, a[b][q]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[b] = _mm_cvtss_f32(h);
  }
  return off == end;
}

// Rows b0..b1 of a vector path: row(nb, mask row, value offset, end, limit, acc row) with nb an
// std::integral_constant of B (1..kMaxB rows of x, a compile-time count for the row kernel);
// false at the first row whose mask reads past the values or disagrees with rowptr.
template <typename Row>
bool rows_vec(const int64_t* rp, const uint8_t* mask, int64_t G, int64_t val_len, int64_t B,
              float* acc, int64_t b0, int64_t b1, const Row& row) {
  const auto each = [&](auto nb) {
    for (int64_t r = b0; r < b1; ++r)
      if (!row(nb, mask + r * G, rp[r], rp[r + 1], val_len - 8, acc + (r - b0) * kMaxB)) return false;
    return true;
  };
  switch (B) {
    case 1: return each(std::integral_constant<int, 1>{});
    case 2: return each(std::integral_constant<int, 2>{});
    case 3: return each(std::integral_constant<int, 3>{});
    default: return each(std::integral_constant<int, 4>{});
  }
}

template <bool BF>
bool rows_avx2(const int64_t* rp, const uint8_t* mask, int64_t G, const uint16_t* val,
               int64_t val_len, const float* xf, int64_t ldx, int64_t B, float* acc, int64_t b0,
               int64_t b1) {
  return rows_vec(rp, mask, G, val_len, B, acc, b0, b1,
                  [&](auto nb, const uint8_t* mk, int64_t off, int64_t end, int64_t limit, float* out) {
                    return row_avx2<BF, decltype(nb)::value>(mk, G, val, off, end, limit, xf, ldx, out);
                  });
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
                          __builtin_cpu_supports("popcnt");
  return yes;
}

// AVX-512 (BW + VBMI2: Ice Lake, Zen 4 and later): 32 columns per step. The step's packed values
// are one masked 64-byte load (only its popcount of values is read: no slack needed) and one
// vpexpandw by the 32 mask bits, which puts each value in its column's 16-bit lane and zeros
// elsewhere: no table. Then, by Mode:
//   kDot (bf16 on a CPU with AVX512-BF16: Zen 4, Cooper / Sapphire Rapids): one vdpbf16ps per row
//     of x, which keeps x in bf16 (products of two bf16 are exact in fp32; it treats bf16
//     subnormals, |v| < 2^-126, as zero);
//   kSplit (bf16 otherwise): fp32 = the value shifted up 16 bits: a shift gives the even
//     columns, a mask the odd ones, so x (fp32) is stored per 32-column step as its 16 even
//     columns then its 16 odd ones; 2 FMAs per row of x;
//   kHalf (fp16): vcvtph2ps of each half, x (fp32) in column order; 2 FMAs per row of x.
enum Mode { kHalf, kSplit, kDot };

// x as each mode reads it: Mode kDot bf16 [B, 8G]; else fp32 [B, 8G], for kSplit permuted.
template <Mode M>
using XT = std::conditional_t<M == kDot, uint16_t, float>;

// The target includes AVX512-BF16 for kDot; the other modes' instantiations hold no BF16
// instruction (no float → bf16 conversion, no dot) and run on CPUs without it.
template <Mode M, int NB>
__attribute__((target("avx512f,avx512bw,avx512vbmi2,avx512bf16,bmi2,popcnt"))) bool row_avx512(
    const uint8_t* mk, int64_t G, const uint16_t* val, int64_t off, int64_t end, int64_t limit,
    const XT<M>* x, int64_t ldx, float* out) {
  // Accumulators per row of x: one per half of a 64-bit mask word (kDot), or one per FMA of
  // the word (4 for one row of x, else 2, reused): latency hidden.
  constexpr int NA = M == kDot ? 2 : NB == 1 ? 4 : 2;
  __m512 a[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < NA; ++q) a[b][q] = _mm512_setzero_ps();
  const __m512i hi16 = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    prefetch_ahead(mk + g0, val + off);
    uint64_t word;
    std::memcpy(&word, mk + g0, 8);
    if (off + int64_t(_mm_popcnt_u64(word)) > limit) return false;
    for (int h = 0; h < 2; ++h) {
      const uint32_t m = uint32_t(word >> (32 * h));
      const int n = _mm_popcnt_u32(m);
      const __m512i w = _mm512_maskz_expand_epi16(
          m, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, n), val + off));
      off += n;
      const XT<M>* xp = x + 8 * g0 + 32 * h;
      if constexpr (M == kDot) {
        for (int b = 0; b < NB; ++b)
          a[b][h] = _mm512_dpbf16_ps(a[b][h], (__m512bh)w, (__m512bh)_mm512_loadu_si512(xp + b * ldx));
      } else {
        const __m512 lo = M == kSplit ? _mm512_castsi512_ps(_mm512_slli_epi32(w, 16))
                                      : _mm512_cvtph_ps(_mm512_castsi512_si256(w));
        const __m512 hi = M == kSplit ? _mm512_castsi512_ps(_mm512_and_si512(w, hi16))
                                      : _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
        const int q = NA == 4 ? 2 * h : 0;  // this step's pair of accumulators
        for (int b = 0; b < NB; ++b) {
          a[b][q] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + b * ldx), a[b][q]);
          a[b][q + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + b * ldx + 16), a[b][q + 1]);
        }
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512 s = a[b][0];
    for (int q = 1; q < NA; ++q) s = _mm512_add_ps(s, a[b][q]);
    out[b] = _mm512_reduce_add_ps(s);
  }
  return off == end;
}

template <Mode M>
bool rows_avx512(const int64_t* rp, const uint8_t* mask, int64_t G, const uint16_t* val,
                 int64_t val_len, const void* x, int64_t ldx, int64_t B, float* acc,
                 int64_t b0, int64_t b1) {
  const XT<M>* xm = static_cast<const XT<M>*>(x);
  return rows_vec(rp, mask, G, val_len, B, acc, b0, b1,
                  [&](auto nb, const uint8_t* mk, int64_t off, int64_t end, int64_t limit, float* out) {
                    return row_avx512<M, decltype(nb)::value>(mk, G, val, off, end, limit, xm, ldx, out);
                  });
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2") &&
                          __builtin_cpu_supports("popcnt");
  return yes;
}
#endif

// The vector level bitmap_mm runs: 3 AVX-512 with BF16 (kDot for bf16), 2 AVX-512, 1 AVX2,
// 0 scalar; SPARSEKERN_BITMAP_ISA=2, 1 or 0 caps it (tests of the lower paths on a CPU that has
// the higher ones).
int isa_level() {
  static const int level = [] {
    int cpu = 0;
#ifdef SK_HAS_AVX2_PATH
    cpu = !has_avx2() ? 0 : !has_avx512() ? 1 : __builtin_cpu_supports("avx512bf16") ? 3 : 2;
#endif
    const char* cap = std::getenv("SPARSEKERN_BITMAP_ISA");
    return cap ? std::min(cpu, std::atoi(cap)) : cpu;
  }();
  return level;
}

}  // namespace

at::Tensor bitmap_mm(const at::Tensor& rowptr, const at::Tensor& mask, const at::Tensor& val,
                     const at::Tensor& bias, const at::Tensor& x_any, int64_t out_features) {
  // the TypeErrors of ops/spmm.py check_bitmap (the op's CPU kernel is called without Python)
  const auto dt = val.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf, "bitmap_mm: val must be bfloat16 or float16, got ",
                   torch_dtype(dt));
  TORCH_CHECK_TYPE(x_any.scalar_type() == dt, "bitmap_mm: x is ", torch_dtype(x_any.scalar_type()),
                   " but val is ", torch_dtype(dt), "; they must have the same dtype");
  TORCH_CHECK_TYPE(bias.numel() == 0 || bias.scalar_type() == dt, "bitmap_mm: bias is ",
                   torch_dtype(bias.scalar_type()), " but val is ", torch_dtype(dt),
                   "; they must have the same dtype (or bias empty)");
  TORCH_CHECK(val.dim() == 1 && val.is_contiguous(), "bitmap_mm: val must be contiguous 1-D");
  TORCH_CHECK(x_any.device().is_cpu() && x_any.dim() == 2, "bitmap_mm: x must be a 2-D CPU tensor [B, in], got ",
              x_any.sizes());
  const at::Tensor x = x_any.contiguous();
  TORCH_CHECK(out_features >= 0, "bitmap_mm: out_features must be >= 0, got ", out_features);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous() &&
                  mask.size(0) == out_features && mask.size(1) % 8 == 0,
              "bitmap_mm: mask must be contiguous uint8 [out_features, G] with G a multiple of 8, got ",
              mask.scalar_type(), " ", mask.sizes());
  const int64_t G = mask.size(1), in = x.size(1), B = x.size(0);
  TORCH_CHECK(in <= 8 * G && in > 8 * (G - 8), "bitmap_mm: x has ", in, " columns but mask holds ",
              8 * G, " (in padded to a multiple of 64)");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == out_features + 1,
              "bitmap_mm: rowptr must be contiguous int64 [out_features + 1]");
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[out_features] + 8 <= val.numel(),
              "bitmap_mm: rowptr must start at 0 and end 8 values before the end of val (slack)");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == dt && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              "bitmap_mm: bias must be empty or contiguous [out_features] of val's dtype");
  at::Tensor y = at::empty({B, out_features}, x.options());
  if (y.numel() == 0) return y;
  // x padded with zeros to 8G columns, in the layout of the path that runs (row_avx512's modes):
  // bf16 for kDot, else fp32, for kSplit each 32 columns as their 16 even then 16 odd ones.
  const int isa = isa_level();
  const bool is_bf = dt == at::kBFloat16, dot = is_bf && isa == 3, split = is_bf && isa == 2;
  at::Tensor xf = at::zeros({B, 8 * G}, x.options().dtype(dot ? dt : at::kFloat));
  if (split)
    xf.view({B, G / 4, 2, 16}).copy_(at::constant_pad_nd(x, {0, 8 * G - in}).view({B, G / 4, 16, 2}).transpose(2, 3));
  else
    xf.narrow(1, 0, in).copy_(x);
  at::Tensor bf = bias.numel() ? bias.to(at::kFloat) : bias;
  const char* xp = static_cast<const char*>(xf.const_data_ptr());
  const float* bp = bias.numel() ? bf.const_data_ptr<float>() : nullptr;
  const uint8_t* mp = mask.const_data_ptr<uint8_t>();
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(val.const_data_ptr());
  const int64_t val_len = val.numel();
  at::Tensor yf = at::empty({B, out_features}, x.options().dtype(at::kFloat));
  float* yp = yf.mutable_data_ptr<float>();
  std::atomic<bool> bad{false};
  // ~64K columns of weight per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 8 * G));
  at::parallel_for(0, out_features, grain, [&](int64_t r0, int64_t r1) {
    constexpr int64_t kRows = 64;
    float acc[kRows * kMaxB];
    for (int64_t a = r0; a < r1; a += kRows) {
      const int64_t e = std::min(r1, a + kRows);
      for (int64_t b0 = 0; b0 < B; b0 += kMaxB) {
        const int64_t nb = std::min(kMaxB, B - b0);
        const void* xv = xp + b0 * 8 * G * xf.element_size();
        const float* xb = static_cast<const float*>(xv);
        bool ok;
#ifdef SK_HAS_AVX2_PATH
        if (isa >= 2)
          ok = dot     ? rows_avx512<kDot>(rp, mp, G, vp, val_len, xv, 8 * G, nb, acc, a, e)
               : split ? rows_avx512<kSplit>(rp, mp, G, vp, val_len, xv, 8 * G, nb, acc, a, e)
                       : rows_avx512<kHalf>(rp, mp, G, vp, val_len, xv, 8 * G, nb, acc, a, e);
        else if (isa == 1)
          ok = is_bf ? rows_avx2<true>(rp, mp, G, vp, val_len, xb, 8 * G, nb, acc, a, e)
                     : rows_avx2<false>(rp, mp, G, vp, val_len, xb, 8 * G, nb, acc, a, e);
        else
#endif
          ok = rows_scalar(rp, mp, G, vp, val_len, is_bf, xb, 8 * G, nb, acc, a, e);
        if (!ok) { bad = true; return; }
        for (int64_t r = a; r < e; ++r)
          for (int64_t b = 0; b < nb; ++b)
            yp[(b0 + b) * out_features + r] = acc[(r - a) * kMaxB + b] + (bp ? bp[r] : 0.f);
      }
    }
  });
  TORCH_CHECK(!bad, "bitmap_mm: the mask's set bits do not match rowptr (a row's bit count must "
              "equal rowptr[r + 1] - rowptr[r])");
  y.copy_(yf);
  return y;
}

}  // namespace cpu
}  // namespace sparsekern

// The op's schema is defined once, in sparsekern/ops/spmm.py.
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bitmap_mm", &sparsekern::cpu::bitmap_mm);
}

// No gradient: backward raises in C++ (see spmm.cpp).
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  m.impl("bitmap_mm", torch::autograd::autogradNotImplementedFallback());
}
