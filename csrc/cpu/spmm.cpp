// spmm family, CPU kernels: sparse weight (CSR over output rows) times a dense matrix, fp32.
//
// Contract (see sparsekern/ops/spmm.py):
//   csr_mm(rowptr, col, val, bias, x, out_features, transpose_out) -> y
//     rowptr: int64 [out_features + 1]; col: int32 [nnz] (column = input feature);
//     val: fp32 [nnz]; bias: fp32 [out_features] or empty [0]; x: fp32 [in, n] contiguous.
//     transpose_out=false: y = W·x + bias[:, None], shape [out_features, n] (1×1 conv layout);
//     transpose_out=true:  y = (W·x + bias[:, None])ᵀ, shape [n, out_features] (Linear layout).
//
// Performance structure (the approach of XNNPACK's sparse inference): the n dimension (batch or
// pixels) is the vector dimension. For each output row and each of its nonzeros (k, v) the
// kernel does a SIMD axpy acc[0:T] += v · x[k, 0:T] over a column tile of T = 64/32/16 floats
// held in registers (two accumulator sets, even/odd nonzeros, to hide the FMA latency). Rows
// are split over threads (at::parallel_for) in blocks of kRowBlock; a block's results go to a
// small buffer that is written out in either layout with contiguous stores. n = 1 (batch 1) is
// a CSR mat-vec with one dot product per row. Each leaf is compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2) and the baseline (target_clones), with FMA contraction enabled here.
//
//   csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv) -> y [out, n / wp, wv]
//     The same kernel with a per-nonzero element offset instead of a column index:
//     z[o, j] = bias[o] + Σ_i val[i]·x[off[i] + j] over row o's nonzeros (j < n, x flat fp32,
//     off int32), stored as rows of wp of which the first wv are kept: y[o, h, c] = z[o, h·wp + c].
//     A stride-1 KxK convolution of one zero-padded image [C, Hp, Wp] is this with
//     off = c·Hp·Wp + r·dil·Wp + s·dil for weight (c, r, s) and n = H_out·Wp: the output
//     in "wide" rows of Wp pixels, whose last Wp − W_out columns are dropped (wv = W_out)
//     (direct sparse convolution, no im2col). off must ascend within a row; slab (elements,
//     e.g. 16 channels' planes) blocks the reduction so the input it touches stays in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

// The common clones, with FMA contraction enabled for the axpy leaves.
#if defined(SK_CLONE_TARGETS)
#define SK_CLONES_FMA __attribute__((SK_CLONE_TARGETS, optimize("fp-contract=fast")))
#else
#define SK_CLONES_FMA
#endif

namespace sparsekern {
namespace cpu {
namespace {

// 16 floats; unaligned loads/stores. Lowered to zmm, 2×ymm or 4×xmm per clone.
typedef float v16 __attribute__((vector_size(64), aligned(4)));

constexpr int64_t kRowBlock = 16;  // rows per output buffer (one 64-byte store per column)
constexpr int64_t kTile = 64;      // widest column tile
constexpr int64_t kConvRows = 64;  // rows sharing one channel slab (csr_conv)

SK_INLINE v16 splat(float a) { return v16{} + a; }

// acc[r][0:16·NV] = bias + Σ_i val[i]·x[col[i], n0 : n0 + 16·NV] for rows r0..r1 into buf[r].
template <int NV>
SK_INLINE void rows_tile(const int64_t* rowptr, const int32_t* col, const float* val,
                         const float* bias, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                         int64_t n0, float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    v16 a[NV], b[NV];
    const float b0 = bias ? bias[r] : 0.f;
    for (int j = 0; j < NV; ++j) { a[j] = splat(b0); b[j] = v16{}; }
    int64_t i = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; i + 1 < e; i += 2) {
      const float* p = x + int64_t(col[i]) * ldx + n0;
      const float* q = x + int64_t(col[i + 1]) * ldx + n0;
      const v16 u = splat(val[i]), w = splat(val[i + 1]);
      for (int j = 0; j < NV; ++j) {
        a[j] += u * *reinterpret_cast<const v16*>(p + 16 * j);
        b[j] += w * *reinterpret_cast<const v16*>(q + 16 * j);
      }
    }
    if (i < e) {
      const float* p = x + int64_t(col[i]) * ldx + n0;
      const v16 u = splat(val[i]);
      for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const v16*>(p + 16 * j);
    }
    for (int j = 0; j < NV; ++j)
      *reinterpret_cast<v16*>(buf + (r - r0) * kTile + 16 * j) = a[j] + b[j];
  }
}

// The last n % 16 columns, one lane at a time across rows.
SK_INLINE void rows_tail(const int64_t* rowptr, const int32_t* col, const float* val,
                         const float* bias, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                         int64_t n0, int64_t w, float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[16];
    const float b0 = bias ? bias[r] : 0.f;
    for (int64_t j = 0; j < w; ++j) acc[j] = b0;
    for (int64_t i = rowptr[r]; i < rowptr[r + 1]; ++i) {
      const float* p = x + int64_t(col[i]) * ldx + n0;
      const float v = val[i];
      for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
    }
    for (int64_t j = 0; j < w; ++j) buf[(r - r0) * kTile + j] = acc[j];
  }
}

// Rows b0..b1 of y = W·X, X[k, j] = x[col·ldx + j] for j < n.
SK_CLONES_FMA void mm_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                       const float* bias, const float* x, int64_t ldx, int64_t n, float* y,
                       int64_t out, bool transpose_out, int64_t b0, int64_t b1) {
  alignas(64) float buf[kRowBlock * kTile];
  for (int64_t r0 = b0; r0 < b1; r0 += kRowBlock) {
    const int64_t r1 = std::min(b1, r0 + kRowBlock), rows = r1 - r0;
    for (int64_t n0 = 0; n0 < n;) {
      const int64_t left = n - n0;
      const int64_t w = left >= 64 ? 64 : left >= 32 ? 32 : left >= 16 ? 16 : left;
      if (w == 64) rows_tile<4>(rowptr, col, val, bias, x, ldx, r0, r1, n0, buf);
      else if (w == 32) rows_tile<2>(rowptr, col, val, bias, x, ldx, r0, r1, n0, buf);
      else if (w == 16) rows_tile<1>(rowptr, col, val, bias, x, ldx, r0, r1, n0, buf);
      else rows_tail(rowptr, col, val, bias, x, ldx, r0, r1, n0, w, buf);
      if (transpose_out) {
        for (int64_t j = 0; j < w; ++j) {
          float* dst = y + (n0 + j) * out + r0;
          for (int64_t r = 0; r < rows; ++r) dst[r] = buf[r * kTile + j];
        }
      } else {
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(y + (r0 + r) * n + n0, buf + r * kTile, w * sizeof(float));
      }
      n0 += w;
    }
  }
}

// One row's nonzeros i.. with off < limit (a channel slab) added into acc[0:16·NV] for
// columns n0..; advances i.
template <int NV>
SK_INLINE void slab_tile(const int32_t* off, const float* val, int64_t& i, int64_t e,
                         int64_t limit, const float* x, float* acc) {
  v16 a[NV], b[NV];
  for (int j = 0; j < NV; ++j) { a[j] = *reinterpret_cast<const v16*>(acc + 16 * j); b[j] = v16{}; }
  for (; i + 1 < e && off[i + 1] < limit; i += 2) {
    const float* p = x + off[i];
    const float* q = x + off[i + 1];
    const v16 u = splat(val[i]), w = splat(val[i + 1]);
    for (int j = 0; j < NV; ++j) {
      a[j] += u * *reinterpret_cast<const v16*>(p + 16 * j);
      b[j] += w * *reinterpret_cast<const v16*>(q + 16 * j);
    }
  }
  if (i < e && off[i] < limit) {
    const float* p = x + off[i];
    const v16 u = splat(val[i]);
    for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const v16*>(p + 16 * j);
    ++i;
  }
  for (int j = 0; j < NV; ++j) *reinterpret_cast<v16*>(acc + 16 * j) = a[j] + b[j];
}

SK_INLINE void slab_tail(const int32_t* off, const float* val, int64_t& i, int64_t e,
                         int64_t limit, const float* x, int64_t w, float* acc) {
  for (; i < e && off[i] < limit; ++i) {
    const float* p = x + off[i];
    const float v = val[i];
    for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
  }
}

// Rows b0..b1 of y[o, j] = bias[o] + Σ val·x[off + j] (csr_conv), channel-slab blocked: for
// each column tile the nonzeros are consumed slab by slab (offsets below k·slab) across a block
// of kConvRows rows, so the input a slab touches stays in L1 while every row of the block uses
// it; the rows' partial sums live in a small buffer.
SK_CLONES_FMA void conv_leaf(const int64_t* rowptr, const int32_t* off, const float* val,
                         const float* bias, const float* x, int64_t n, int64_t slab,
                         int64_t span, int64_t wp, int64_t wv, float* y, int64_t b0, int64_t b1) {
  alignas(64) float acc[kConvRows * kTile];
  int64_t cur[kConvRows];
  for (int64_t r0 = b0; r0 < b1; r0 += kConvRows) {
    const int64_t r1 = std::min(b1, r0 + kConvRows), rows = r1 - r0;
    for (int64_t n0 = 0; n0 < n;) {
      const int64_t left = n - n0;
      const int64_t w = left >= 64 ? 64 : left >= 32 ? 32 : left >= 16 ? 16 : left;
      for (int64_t r = 0; r < rows; ++r) {
        cur[r] = rowptr[r0 + r];
        std::fill(acc + r * kTile, acc + r * kTile + w, bias ? bias[r0 + r] : 0.f);
      }
      for (int64_t limit = slab; limit - slab < span; limit += slab) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = rowptr[r0 + r + 1];
          float* a = acc + r * kTile;
          if (w == 64) slab_tile<4>(off, val, cur[r], e, limit, x + n0, a);
          else if (w == 32) slab_tile<2>(off, val, cur[r], e, limit, x + n0, a);
          else if (w == 16) slab_tile<1>(off, val, cur[r], e, limit, x + n0, a);
          else slab_tail(off, val, cur[r], e, limit, x + n0, w, a);
        }
      }
      // wide column j = h·wp + c goes to y[row, h, c] if c < wv
      const int64_t rows_out = n / wp;
      for (int64_t j = n0; j < n0 + w;) {
        const int64_t h = j / wp, c = j % wp;
        const int64_t len = std::min(n0 + w, h * wp + wp) - j;
        const int64_t keep = std::min(len, std::max<int64_t>(0, wv - c));
        if (keep > 0) {
          for (int64_t r = 0; r < rows; ++r)
            std::memcpy(y + ((r0 + r) * rows_out + h) * wv + c, acc + r * kTile + (j - n0),
                        keep * sizeof(float));
        }
        j += len;
      }
      n0 += w;
    }
  }
}

// n = 1: y[r] = bias[r] + Σ_i val[i]·x[col[i]].
SK_CLONES_FMA void mv_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                       const float* bias, const float* x, float* y, int64_t b0, int64_t b1) {
  for (int64_t r = b0; r < b1; ++r) {
    float s = 0.f;
    const int64_t e = rowptr[r + 1];
#pragma omp simd reduction(+ : s)
    for (int64_t i = rowptr[r]; i < e; ++i) s += val[i] * x[col[i]];
    y[r] = s + (bias ? bias[r] : 0.f);
  }
}

}  // namespace

at::Tensor csr_mm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
                  const at::Tensor& bias, const at::Tensor& x, int64_t out_features,
                  bool transpose_out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "csr_mm: x must be a contiguous 2-D float32 CPU tensor [in, n], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == out_features + 1,
              "csr_mm: rowptr must be contiguous int64 [out_features + 1]");
  TORCH_CHECK(col.scalar_type() == at::kInt && col.is_contiguous() && val.is_contiguous() &&
                  val.scalar_type() == at::kFloat && col.numel() == val.numel(),
              "csr_mm: col must be int32 and val float32, contiguous, of equal length");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              "csr_mm: bias must be empty or contiguous float32 [out_features]");
  const int64_t n = x.size(1), in = x.size(0), nnz_ = val.numel();
  const int64_t* rp0 = rowptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp0[0] == 0 && rp0[out_features] == nnz_, "csr_mm: rowptr must run from 0 to nnz");
  for (int64_t r = 0; r < out_features; ++r)
    TORCH_CHECK(rp0[r] <= rp0[r + 1], "csr_mm: rowptr must be non-decreasing");
  const int32_t* cp0 = col.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < nnz_; ++i)
    TORCH_CHECK(cp0[i] >= 0 && cp0[i] < in, "csr_mm: column index ", cp0[i], " outside [0, ", in, ")");
  at::Tensor y = transpose_out ? at::empty({n, out_features}, x.options())
                               : at::empty({out_features, n}, x.options());
  if (n == 0 || out_features == 0) return y;
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int32_t* cp = col.const_data_ptr<int32_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // grain: enough work per task (~32K multiply-adds) that small layers stay on one thread
  const int64_t nnz = val.numel();
  const int64_t per_row = std::max<int64_t>(1, nnz / out_features * n);
  const int64_t grain = std::max<int64_t>(kRowBlock, (32768 / per_row) / kRowBlock * kRowBlock);
  if (n == 1) {
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      mv_leaf(rp, cp, vp, bp, xp, yp, b, e);
    });
  } else {
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      mm_leaf(rp, cp, vp, bp, xp, n, n, yp, out_features, transpose_out, b, e);
    });
  }
  return y;
}

at::Tensor csr_conv(const at::Tensor& rowptr, const at::Tensor& off, const at::Tensor& val,
                    const at::Tensor& bias, const at::Tensor& x, int64_t n, int64_t out_features,
                    int64_t slab, int64_t wp, int64_t wv) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 &&
                  x.is_contiguous(),
              "csr_conv: x must be a contiguous 1-D float32 CPU tensor, got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == out_features + 1,
              "csr_conv: rowptr must be contiguous int64 [out_features + 1]");
  TORCH_CHECK(off.scalar_type() == at::kInt && off.is_contiguous() && val.is_contiguous() &&
                  val.scalar_type() == at::kFloat && off.numel() == val.numel(),
              "csr_conv: off must be int32 and val float32, contiguous, of equal length");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              "csr_conv: bias must be empty or contiguous float32 [out_features]");
  TORCH_CHECK(n >= 0 && slab > 0 && wp > 0 && n % wp == 0 && wv >= 0 && wv <= wp,
              "csr_conv: need n >= 0, slab > 0, wp > 0 dividing n, 0 <= wv <= wp; got n=", n,
              " slab=", slab, " wp=", wp, " wv=", wv);
  const int32_t* op = off.const_data_ptr<int32_t>();
  const int64_t nnz = val.numel();
  if (n > 0) {
    for (int64_t i = 0; i < nnz; ++i)
      TORCH_CHECK(op[i] >= 0 && op[i] + n <= x.numel(), "csr_conv: offset ", op[i], " + n = ",
                  n, " reads past x (", x.numel(), " elements)");
  }
  at::Tensor y = at::empty({out_features, n / wp, wv}, x.options());
  if (y.numel() == 0) return y;
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t per_row = std::max<int64_t>(1, nnz / out_features * n);
  const int64_t grain = std::max<int64_t>(kRowBlock, (32768 / per_row) / kRowBlock * kRowBlock);
  const int64_t span = x.numel();  // every offset is below it
  at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
    conv_leaf(rp, op, vp, bp, xp, n, slab, span, wp, wv, yp, b, e);
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern_C, m) {
  m.def("csr_mm(Tensor rowptr, Tensor col, Tensor val, Tensor bias, Tensor x, int out_features, "
        "bool transpose_out) -> Tensor");
  m.def("csr_conv(Tensor rowptr, Tensor off, Tensor val, Tensor bias, Tensor x, int n, "
        "int out_features, int slab, int wp, int wv) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern_C, CPU, m) {
  m.impl("csr_mm", &sparsekern::cpu::csr_mm);
  m.impl("csr_conv", &sparsekern::cpu::csr_conv);
}
