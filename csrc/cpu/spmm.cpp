// spmm family, CPU kernels: sparse weight (CSR over output rows) times a dense matrix, fp32.
//
// The ops' CPU implementations (schemas in sparsekern/ops/spmm.py; x of any strides, copied to
// contiguous here; val / x / bias dtypes checked as in Python):
//   csr_mm(rowptr, col, val, bias, x, out_features, transpose_out, relu) -> y
//     rowptr: int64 [out_features + 1]; col: int32 [nnz] (column = input feature);
//     val: fp32 [nnz]; bias: fp32 [out_features] or empty [0]; x: fp32 [in, n].
//     transpose_out=false: y = W·x + bias[:, None], shape [out_features, n] (1×1 conv layout);
//     transpose_out=true:  y = (W·x + bias[:, None])ᵀ, shape [n, out_features] (Linear layout).
//     relu=true: max(y, 0), applied to the sums as they are stored (a NaN stays NaN, as torch.relu);
//     csr_conv, ck_conv and csr_group_conv take the same argument. residual (optional, y's shape):
//     added to the sums as they are stored, before the max (csr_conv and ck_conv take it too).
//
// Performance structure (the approach of XNNPACK's sparse inference): the n dimension (batch or
// pixels) is the vector dimension. For each output row and each of its nonzeros (k, v) the
// kernel does a SIMD axpy acc[0:T] += v · x[k, 0:T] over a column tile of T = 64/32/16 floats
// held in registers (two accumulator sets, even/odd nonzeros, to hide the FMA latency, where
// the registers allow); a last partial tile is shifted left to end at n (no scalar tail for
// n >= 16). The reduction runs in chunks of x rows whose tile slice fits L1, each shared by a
// block of up to kChunkRows rows with their partial sums in a buffer, so the gathered x rows
// come from L1. Tasks of rows go to the threads as they come free (dynamic_for); [out, n] results are stored
// from the registers, [n, out] ones through the buffer. n = 1 (batch 1) is a CSR mat-vec with
// one dot product per row. Each leaf is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and
// the baseline (target_clones), with FMA contraction enabled here.
//
//   csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv, relu) -> y [out, n / wp, wv]
//     The same kernel with a per-nonzero element offset instead of a column index:
//     z[o, j] = bias[o] + Σ_i val[i]·x[off[i] + j] over row o's nonzeros (j < n, x flat fp32,
//     off int32), stored as rows of wp of which the first wv are kept: y[o, h, c] = z[o, h·wp + c].
//     A stride-1 KxK convolution of one zero-padded image [C, Hp, Wp] is this with
//     off = c·Hp·Wp + r·dil·Wp + s·dil for weight (c, r, s) and n = H_out·Wp: the output
//     in "wide" rows of Wp pixels, whose last Wp − W_out columns are dropped (wv = W_out)
//     (direct sparse convolution, no im2col). off must ascend within a row; slab (elements,
//     e.g. 16 channels' planes) blocks the reduction so the input it touches stays in cache.
//
//   bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out) -> y   (same x / y as csr_mm)
//     Block CSR: val fp32 [nnzb, bo, bi] (edge blocks zero-padded), col int32 [nnzb] (block
//     column), rowptr int64 [ceil(out/bo) + 1]. Each x row tile loaded serves the up to 4 rows
//     of a block held in registers; n = 1 is a dense dot of each block row with x's segment.
//   nm_mm(val, idx, bias, x, n, m, out_features, transpose_out) -> y   (same x / y as csr_mm)
//     N:M compressed: val fp32 [out, in·n/m], idx uint8 [out, in·n/m] (position 0..m-1 in its
//     group); stored value j of a row is W[row, (j / n)·m + idx]. CSR with 1-byte implicit
//     columns (the groups give the column base).
//   ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv, relu)
//     -> y [out, n / wp, wv]: kernel-skipping (CK) direct convolution. Row o holds its alive
//     kernels: chan int32 [nk] (input channel, ascending), val fp32 [nk, T] (the kernel's T = R·S
//     dense taps); taps int32 [T] = r·dil·Wp + s·dil; the nonzero offsets of csr_conv are
//     chan·plane + taps[t]. slab is in channels.
//   csr_group_conv(rowptr, col, val, bias, x, out_features, groups, kernel_size, stride, padding,
//                  dilation, relu) -> y [N, out, H_out, W_out]: grouped (depthwise: groups = C) KxK
//     convolution as F.conv2d; weight CSR [out, C/groups·R·S] (col = c·R·S + r·S + s, c within
//     the group); x [N, C, H, W]. One task per (image, group, band of output rows): the input
//     rows the band reads (~16 KB) are copied into a per-thread zero-padded buffer of stride
//     phases (so it stays in L1 and a stride is a shift), then each output row of the group
//     accumulates its nonzero taps in register tiles along W (no channel slabs: a group is small).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

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

// Without AVX-512, GCC has no 64-byte vector mode: v16 arithmetic goes through the stack (the
// x86-64-v3 clone ran ~20x slower per multiply-add than dense). The tiles are templates on the
// vector type V: v16 where the CPU has AVX-512F, else v8x2 (two 32-byte halves, ymm on AVX2);
// each leaf picks at run time (wide512()), inside every clone.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
struct v8x2 {
  v8 lo, hi;
  SK_INLINE v8x2 operator+(const v8x2& o) const { return {lo + o.lo, hi + o.hi}; }
  SK_INLINE v8x2 operator*(const v8x2& o) const { return {lo * o.lo, hi * o.hi}; }
  SK_INLINE v8x2& operator+=(const v8x2& o) { lo += o.lo; hi += o.hi; return *this; }
};
static_assert(sizeof(v8x2) == 64, "v8x2 is 16 floats");
// v16 wrapped: a template argument drops the typedef's aligned(4) (loads would assume 64).
struct v16s {
  v16 v;
  SK_INLINE v16s operator+(const v16s& o) const { return {v + o.v}; }
  SK_INLINE v16s operator*(const v16s& o) const { return {v * o.v}; }
  SK_INLINE v16s& operator+=(const v16s& o) { v += o.v; return *this; }
};
static_assert(alignof(v16s) == 4 && alignof(v8x2) == 4, "unaligned vector loads");

// Whether V's 64-column tiles fit the registers: 8 accumulators of 4 × 16 lanes are 8 zmm of
// 32 with AVX-512, but 16 ymm of 16 with v8x2 (spills): 64-column v8x2 tiles use one
// accumulator set instead (kSets).
template <typename V>
constexpr bool kWide = false;
template <>
constexpr bool kWide<v16s> = true;

SK_INLINE bool wide512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

constexpr int64_t kRowBlock = 16;  // rows per output buffer (one 64-byte store per column)
constexpr int64_t kTile = 64;      // widest column tile
constexpr int64_t kConvRows = 64;  // rows sharing one channel slab (csr_conv)
constexpr int64_t kSlabChannels = 64;  // input channels per slab (functional.SLAB_CHANNELS)

template <typename V>
SK_INLINE V splat(float a);
template <>
SK_INLINE v16s splat<v16s>(float a) { return {v16{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}}; }
template <>
SK_INLINE v8x2 splat<v8x2>(float a) { return {v8{a, a, a, a, a, a, a, a}, v8{a, a, a, a, a, a, a, a}}; }

// max(a, 0) per lane; a NaN stays NaN (torch.relu).
SK_INLINE float relu0(float a) { return a < 0.f ? 0.f : a; }
SK_INLINE v16s relu0(const v16s& a) { return {a.v < v16{} ? v16{} : a.v}; }
SK_INLINE v8x2 relu0(const v8x2& a) { return {a.lo < v8{} ? v8{} : a.lo, a.hi < v8{} ? v8{} : a.hi}; }

// Multiply-adds per task (~50-100 us): a layer below two grains (e.g. ResNet-50's fc at batch 1,
// 90 % sparse: 205K) stays on one thread, as MKL keeps small dense layers: a parallel region
// costs more than it saves there, and on a loaded machine waits for a time slice (~8 ms).
constexpr int64_t kGrainMacs = 1 << 18;

// f(t) for t in [0, tasks), the tasks handed out one by one to the threads as they come free
// (an atomic counter), not split in equal runs up front: rows or tiles of unequal cost, or a
// thread slowed by another process, leave no thread waiting for the slowest one's share.
template <typename F>
void dynamic_for(int64_t tasks, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < tasks; ++t) f(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) f(t);
  });
}

// One work grain of rows: ~kGrainMacs multiply-adds per task.
SK_INLINE int64_t grain_rows(int64_t stored, int64_t rows, int64_t n, int64_t align) {
  const int64_t per_row = std::max<int64_t>(1, stored / std::max<int64_t>(1, rows) * n);
  return std::max<int64_t>(align, (kGrainMacs / per_row) / align * align);
}

// The direct convolutions' work grid: blocks of kConvRows rows × chunks of whole column tiles,
// each task at least ~kGrainMacs multiply-adds. A batch folded into the wide columns (a group
// of images stacked into one tall image) makes n large: the chunks spread it over the threads. Calls
// leaf(row0, row1, col0, col1) for every task (dynamic_for), row blocks outer, columns inner.
template <typename Leaf>
void conv_grid(int64_t rows, int64_t n, int64_t stored, const Leaf& leaf) {
  const int64_t rb = std::min(rows, kConvRows), nrb = (rows + rb - 1) / rb;
  const int64_t per_col = std::max<int64_t>(1, stored / std::max<int64_t>(1, rows) * rb);
  const int64_t chunk = std::max<int64_t>(1, kGrainMacs / per_col / kTile) * kTile;
  const int64_t ncc = (n + chunk - 1) / chunk;
  dynamic_for(nrb * ncc, [&](int64_t t) {
    const int64_t r = t / ncc * rb, c = t % ncc * chunk;
    leaf(r, std::min(rows, r + rb), c, std::min(n, c + chunk));
  });
}

// dst[c·ldd + r] = src[r·lds + c] for r, c < 8 (an 8×8 block transposed in registers).
SK_INLINE void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  v8 a[8], t[8];
  for (int i = 0; i < 8; ++i) a[i] = *reinterpret_cast<const v8*>(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // t[i] = a0 b0 a1 b1 | a4 b4 a5 b5, t[i+1] = a2 b2 a3 b3 | ...
    t[i] = __builtin_shufflevector(a[i], a[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(a[i], a[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // a[i + c] = column c | column c + 4 of rows i..i+3
    a[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    a[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    a[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    a[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {
    *reinterpret_cast<v8*>(dst + c * ldd) =
        __builtin_shufflevector(a[c], a[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<v8*>(dst + (c + 4) * ldd) =
        __builtin_shufflevector(a[c], a[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// dst[c·ldd + r] = src[r·lds + c] for r < rows, c < cols: 8×8 blocks, the edges one by one.
SK_INLINE void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                         int64_t ldd) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) transpose8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Writes rows r0..r0+rows of a column tile n0..n0+w from buf (row stride kTile) into y.
SK_INLINE void store_tile(const float* buf, float* y, int64_t out, int64_t n, bool transpose_out,
                          int64_t r0, int64_t rows, int64_t n0, int64_t w) {
  if (transpose_out) {
    transpose(buf, kTile, rows, w, y + n0 * out + r0, out);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(y + (r0 + r) * n + n0, buf + r * kTile, w * sizeof(float));
  }
}

// The residual epilogue on len contiguous outputs at dst (already stored): dst += res (the
// residual element at dst's place), then max(·, 0) if relu.
SK_INLINE void add_residual(float* dst, const float* res, int64_t len, bool relu) {
  if (relu) {
    SK_SIMD for (int64_t k = 0; k < len; ++k) dst[k] = relu0(dst[k] + res[k]);
  } else {
    SK_SIMD for (int64_t k = 0; k < len; ++k) dst[k] += res[k];
  }
}

// The residual epilogue on rows r0..r0+rows, columns n0..n0+w of y (store_tile's block; res:
// the residual, y's layout).
SK_INLINE void residual_tile(float* y, const float* res, int64_t out, int64_t n, bool transpose_out,
                             int64_t r0, int64_t rows, int64_t n0, int64_t w, bool relu) {
  if (transpose_out) {
    for (int64_t c = n0; c < n0 + w; ++c) add_residual(y + c * out + r0, res + c * out + r0, rows, relu);
  } else {
    for (int64_t r = r0; r < r0 + rows; ++r) add_residual(y + r * n + n0, res + r * n + n0, w, relu);
  }
}

// Accumulator sets of a tile of NV vectors: two (even / odd nonzeros, to hide the FMA latency,
// ~8 independent sums: 4 cycles × 2 FMAs per cycle) unless they would not fit the registers: a
// 64-column v8x2 tile (8 ymm; two sets would spill AVX2's 16) walks its nonzeros once with one.
template <typename V, int NV>
constexpr int kSets = NV < 4 || kWide<V> ? 2 : 1;

// Adds a row's nonzeros i.. (up to e; while col < limit if Bounded) into a:
// a[j] += val[i]·x[col[i]·ldx + 16·j : +16] (odd nonzeros in a second set b, merged at the end,
// with two sets); advances i.
template <typename V, int NV, bool Bounded>
SK_INLINE void axpy_run(const int32_t* col, const float* val, const float* x, int64_t ldx,
                        int64_t& i, int64_t e, int64_t limit, V* a) {
  if constexpr (kSets<V, NV> == 2) {
    V b[NV];
    for (V& v : b) v = V{};
    for (; i + 1 < e && (!Bounded || col[i + 1] < limit); i += 2) {
      const float* p = x + int64_t(col[i]) * ldx;
      const float* q = x + int64_t(col[i + 1]) * ldx;
      const V u = splat<V>(val[i]), w = splat<V>(val[i + 1]);
      for (int j = 0; j < NV; ++j) {
        a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
        b[j] += w * *reinterpret_cast<const V*>(q + 16 * j);
      }
    }
    for (; i < e && (!Bounded || col[i] < limit); ++i) {
      const float* p = x + int64_t(col[i]) * ldx;
      const V u = splat<V>(val[i]);
      for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
    }
    for (int j = 0; j < NV; ++j) a[j] += b[j];
    return;
  }
  for (; i < e && (!Bounded || col[i] < limit); ++i) {
    const float* p = x + int64_t(col[i]) * ldx;
    const V u = splat<V>(val[i]);
    for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
  }
}

// Rows r0..r1 over the 16·NV columns at x (x = X + n0): row r's nonzeros from cur[r - r0] on
// with col < limit (all if limit < 0; cur advanced) added to part[r - r0] (row stride kTile;
// bias[r] if part is null), into dst[r - r0] (row stride ldd); then + res[r - r0] (row stride
// ldd; if not null) and max(·, 0) if relu (the last chunk).
template <typename V, int NV>
SK_INLINE void rows_tile(const int64_t* rowptr, const int32_t* col, const float* val,
                         const float* bias, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                         int64_t* cur, int64_t limit, const float* part, float* dst, int64_t ldd,
                         bool relu, const float* res) {
  for (int64_t r = r0; r < r1; ++r) {
    V a[NV];
    const V b0 = splat<V>(bias ? bias[r] : 0.f);
    for (int j = 0; j < NV; ++j)
      a[j] = part ? *reinterpret_cast<const V*>(part + (r - r0) * kTile + 16 * j) : b0;
    int64_t i = cur[r - r0];
    if (limit < 0) axpy_run<V, NV, false>(col, val, x, ldx, i, rowptr[r + 1], limit, a);
    else axpy_run<V, NV, true>(col, val, x, ldx, i, rowptr[r + 1], limit, a);
    cur[r - r0] = i;
    if (res)
      for (int j = 0; j < NV; ++j) a[j] += *reinterpret_cast<const V*>(res + (r - r0) * ldd + 16 * j);
    if (relu)
      for (int j = 0; j < NV; ++j) a[j] = relu0(a[j]);
    for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(dst + (r - r0) * ldd + 16 * j) = a[j];
  }
}

// n < 16 columns, one lane at a time across rows.
SK_INLINE void rows_tail(const int64_t* rowptr, const int32_t* col, const float* val,
                         const float* bias, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                         int64_t w, float* buf, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[16];
    const float b0 = bias ? bias[r] : 0.f;
    for (int64_t j = 0; j < w; ++j) acc[j] = b0;
    for (int64_t i = rowptr[r]; i < rowptr[r + 1]; ++i) {
      const float* p = x + int64_t(col[i]) * ldx;
      const float v = val[i];
      for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
    }
    for (int64_t j = 0; j < w; ++j) buf[(r - r0) * kTile + j] = relu ? relu0(acc[j]) : acc[j];
  }
}

// x is read in chunks of input rows (a column tile's slice of them within L1: kSliceBytes),
// each shared by a block of kChunkRows output rows whose partial sums wait in a buffer (L2): a
// gathered x row is then read from L1, not L2. A chunk spans at least kChunkNz nonzeros of an
// average row (each row's visit of a chunk costs a loop exit and its partial sums' load / store).
// A tile's whole slice within half the core's L2 is not chunked: the visits cost more than the
// L2 → L1 gathers they save (Intel Xeon, 2 MB L2: Linear 4096² b64 at 95 %, x 1 MB, ~10 %
// faster unchunked; a 512 KB - 1 MB L2 (AMD Zen 3 / 4) keeps the chunks there).
constexpr int64_t kSliceBytes = 24 << 10;
constexpr int64_t kChunkNz = 32;
constexpr int64_t kChunkRows = 512;

// Bytes of the L2 cache of one core (sysconf; 512 KB where unknown).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(512) << 10;
  }();
  return bytes;
}

// Rows b0..b1 of y = W·X, X = x [in, n] (n >= 16): column tiles of 64 / 32 / 16 (a last
// partial tile shifted left to end at n: it recomputes a few columns, with identical results),
// each over chunks of x's rows (above). Columns ascending within a row keep each nonzero in its
// chunk; unsorted ones are still each added once (a row's visit stops at the first column past
// the chunk, the last chunk takes the rest).
template <typename V>
SK_INLINE void mm_leaf_t(const int64_t* rowptr, const int32_t* col, const float* val,
                         const float* bias, const float* x, int64_t in, int64_t n, int64_t ldx,
                         float* y, int64_t out, bool transpose_out, bool relu, const float* res,
                         int64_t b0, int64_t b1) {
  std::vector<float> buf_;
  int64_t cur[kChunkRows];
  const int64_t per_row =  // nonzeros of an average row
      std::max<int64_t>(1, (rowptr[b1] - rowptr[b0]) / std::max<int64_t>(1, b1 - b0));
  const int64_t wmax = ldx >= 64 ? 64 : ldx >= 32 ? 32 : 16;
  for (int64_t n0 = 0; n0 < n;) {  // column tiles outer: a tile's slice of x stays in cache
    const int64_t left = n - n0, room = ldx - n0;  // padded x: room >= left rounded up to 16
    int64_t w = std::min<int64_t>(wmax, left > 32 ? 64 : left > 16 ? 32 : 16);
    while (w > room) w /= 2;
    const int64_t t0 = ldx > n ? n0 : std::min(n0, n - w);
    const int64_t wv = std::min(w, n - t0);  // columns kept (a padded x's last tile: fewer)
    const bool whole = !transpose_out && wv == w;  // the last chunk stores straight into y
    const int64_t slice = in * w * int64_t(sizeof(float));
    const int64_t kc = 2 * slice <= l2_bytes()
                           ? in
                           : std::max({int64_t(1), kSliceBytes / (w * int64_t(sizeof(float))),
                                       kChunkNz * in / per_row});
    const int64_t chunks = (in + kc - 1) / kc;
    const int64_t rb = chunks > 1 ? kChunkRows : kRowBlock;
    if ((chunks > 1 || !whole) && int64_t(buf_.size()) < rb * kTile) buf_.resize(rb * kTile);
    float* buf = buf_.data();
    for (int64_t r0 = b0; r0 < b1; r0 += rb) {
      const int64_t r1 = std::min(b1, r0 + rb);
      for (int64_t r = r0; r < r1; ++r) cur[r - r0] = rowptr[r];
      for (int64_t c = 0; c < chunks; ++c) {
        const bool last = c + 1 == chunks, direct = last && whole;
        const int64_t limit = last ? -1 : (c + 1) * kc;
        const float* part = c ? buf : nullptr;
        float* dst = direct ? y + r0 * n + t0 : buf;
        const int64_t ldd = direct ? n : kTile;
        const bool rl = relu && last && (direct || !res);  // else residual_tile: the sum, then the max
        const float* rs = direct && res ? res + r0 * n + t0 : nullptr;
        if (w == 64) rows_tile<V, 4>(rowptr, col, val, bias, x + t0, ldx, r0, r1, cur, limit, part, dst, ldd, rl, rs);
        else if (w == 32) rows_tile<V, 2>(rowptr, col, val, bias, x + t0, ldx, r0, r1, cur, limit, part, dst, ldd, rl, rs);
        else rows_tile<V, 1>(rowptr, col, val, bias, x + t0, ldx, r0, r1, cur, limit, part, dst, ldd, rl, rs);
      }
      if (!whole) {
        store_tile(buf, y, out, n, transpose_out, r0, r1 - r0, t0, wv);
        if (res) residual_tile(y, res, out, n, transpose_out, r0, r1 - r0, t0, wv, relu);
      }
    }
    n0 = t0 + w;
  }
}

SK_CLONES_FMA void mm_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                           const float* bias, const float* x, int64_t in, int64_t n, int64_t ldx,
                           float* y, int64_t out, bool transpose_out, bool relu, const float* res,
                           int64_t b0, int64_t b1) {
  if (n < 16) {
    alignas(64) float buf[kRowBlock * kTile];
    for (int64_t r0 = b0; r0 < b1; r0 += kRowBlock) {
      const int64_t r1 = std::min(b1, r0 + kRowBlock);
      rows_tail(rowptr, col, val, bias, x, ldx, r0, r1, n, buf, relu && !res);
      store_tile(buf, y, out, n, transpose_out, r0, r1 - r0, 0, n);
      if (res) residual_tile(y, res, out, n, transpose_out, r0, r1 - r0, 0, n, relu);
    }
  } else if (wide512()) {
    mm_leaf_t<v16s>(rowptr, col, val, bias, x, in, n, ldx, y, out, transpose_out, relu, res, b0, b1);
  } else {
    mm_leaf_t<v8x2>(rowptr, col, val, bias, x, in, n, ldx, y, out, transpose_out, relu, res, b0, b1);
  }
}

// Wide columns n0..n0+w of rows r0.. (acc, row stride kTile) into y [out, n / wp, wv]: wide
// column j = h·wp + c goes to y[row, h, c] if c < wv and j < n (columns from n on: the
// vector tail's padding, dropped); + res[row, h, c] if res (y's layout); max(·, 0) if relu.
SK_INLINE void store_wide(const float* acc, float* y, int64_t r0, int64_t rows, int64_t n0,
                          int64_t w, int64_t n, int64_t wp, int64_t wv, bool relu, const float* res) {
  const int64_t rows_out = n / wp, end = std::min(n0 + w, n);
  for (int64_t j = n0; j < end;) {
    const int64_t h = j / wp, c = j % wp;
    const int64_t len = std::min(end, h * wp + wp) - j;
    const int64_t keep = std::min(len, std::max<int64_t>(0, wv - c));
    for (int64_t r = 0; r < rows && keep > 0; ++r) {
      float* dst = y + ((r0 + r) * rows_out + h) * wv + c;
      const float* src = acc + r * kTile + (j - n0);
      if (relu && !res) {
        SK_SIMD for (int64_t k = 0; k < keep; ++k) dst[k] = relu0(src[k]);
      } else {
        std::memcpy(dst, src, keep * sizeof(float));
      }
      if (res) add_residual(dst, res + (dst - y), keep, relu);  // the sum, then the max
    }
    j += len;
  }
}

// One row's nonzeros i.. with off < limit (a channel slab) added into acc[0:16·NV] for
// columns n0..; advances i (axpy_run with the offsets as columns of stride 1).
template <typename V, int NV>
SK_INLINE void slab_tile(const int32_t* off, const float* val, int64_t& i, int64_t e,
                         int64_t limit, const float* x, float* acc) {
  V a[NV];
  for (int j = 0; j < NV; ++j) a[j] = *reinterpret_cast<const V*>(acc + 16 * j);
  axpy_run<V, NV, true>(off, val, x, 1, i, e, limit, a);
  for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(acc + 16 * j) = a[j];
}

SK_INLINE void slab_tail(const int32_t* off, const float* val, int64_t& i, int64_t e,
                         int64_t limit, const float* x, int64_t w, float* acc) {
  for (; i < e && off[i] < limit; ++i) {
    const float* p = x + off[i];
    const float v = val[i];
    for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
  }
}

// Rows b0..b1, wide columns c0..c1 of a direct sparse conv, channel-slab blocked: for each column
// tile the row entries are consumed slab by slab (positions below k·slab) across a block of
// kConvRows rows, so the input a slab touches stays in L1 while every row of the block uses it;
// the rows' partial sums live in a small buffer. step(w, i, e, limit, n0, acc) adds row entries
// i.. (up to e, position < limit) to acc[0:w] for output columns n0.. (csr_conv: nonzeros; ck_conv:
// kernels); res (y's layout, or null) added and relu: max(·, 0) as the tile is stored. Shared by conv_leaf and ck_leaf.
template <typename Step>
SK_INLINE void slab_blocked(const int64_t* rowptr, const float* bias, int64_t n, int64_t slab,
                            int64_t span, int64_t wp, int64_t wv, bool relu, const float* res,
                            float* y, int64_t b0, int64_t b1, int64_t c0, int64_t c1,
                            const Step& step) {
  alignas(64) float acc[kConvRows * kTile];
  int64_t cur[kConvRows];
  for (int64_t r0 = b0; r0 < b1; r0 += kConvRows) {
    const int64_t r1 = std::min(b1, r0 + kConvRows), rows = r1 - r0;
    for (int64_t n0 = c0; n0 < c1;) {
      const int64_t left = c1 - n0;
      const int64_t w = left >= 64 ? 64 : left >= 32 ? 32 : left >= 16 ? 16 : left;
      for (int64_t r = 0; r < rows; ++r) {
        cur[r] = rowptr[r0 + r];
        std::fill(acc + r * kTile, acc + r * kTile + w, bias ? bias[r0 + r] : 0.f);
      }
      for (int64_t limit = slab; limit - slab < span; limit += slab) {
        for (int64_t r = 0; r < rows; ++r) step(w, cur[r], rowptr[r0 + r + 1], limit, n0, acc + r * kTile);
      }
      store_wide(acc, y, r0, rows, n0, w, n, wp, wv, relu, res);
      n0 += w;
    }
  }
}

// csr_conv's step: y[o, j] = bias[o] + Σ val·x[off + j] (always inlined into the clones).
template <typename V>
struct SlabStep {
  const int32_t* off;
  const float* val;
  const float* x;
  SK_INLINE void operator()(int64_t w, int64_t& i, int64_t e, int64_t limit, int64_t n0, float* a) const {
    if (w == 64) slab_tile<V, 4>(off, val, i, e, limit, x + n0, a);
    else if (w == 32) slab_tile<V, 2>(off, val, i, e, limit, x + n0, a);
    else if (w == 16) slab_tile<V, 1>(off, val, i, e, limit, x + n0, a);
    else slab_tail(off, val, i, e, limit, x + n0, w, a);
  }
};

SK_CLONES_FMA void conv_leaf(const int64_t* rowptr, const int32_t* off, const float* val,
                         const float* bias, const float* x, int64_t n, int64_t slab,
                         int64_t span, int64_t wp, int64_t wv, bool relu, const float* res,
                         float* y, int64_t b0, int64_t b1, int64_t c0, int64_t c1) {
  if (wide512()) slab_blocked(rowptr, bias, n, slab, span, wp, wv, relu, res, y, b0, b1, c0, c1, SlabStep<v16s>{off, val, x});
  else slab_blocked(rowptr, bias, n, slab, span, wp, wv, relu, res, y, b0, b1, c0, c1, SlabStep<v8x2>{off, val, x});
}

// n = 1: y[r] = bias[r] + Σ_i val[i]·x[col[i]] (+ res[r] if res; max(·, 0) if relu). Checks the column indices
// as it reads them (no separate pass over col: batch 1 is memory bound): an index outside
// [0, in) reads x[0] instead and makes the result true (the caller then raises).
SK_CLONES_FMA bool mv_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                           const float* bias, const float* x, int64_t in, float* y, bool relu,
                           const float* res, int64_t b0, int64_t b1) {
  const uint32_t limit = uint32_t(std::min<int64_t>(in, UINT32_MAX));
  uint32_t bad = 0;
  for (int64_t r = b0; r < b1; ++r) {
    float s[8] = {};  // 8 independent sums: the loop is bound by loads, not by FMA latency
    int64_t i = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; i + 8 <= e; i += 8)
      for (int k = 0; k < 8; ++k) {
        const uint32_t c = uint32_t(col[i + k]);  // negative -> huge
        const bool ok = c < limit;
        bad |= !ok;
        s[k] += val[i + k] * x[ok ? c : 0];
      }
    for (; i < e; ++i) {
      const uint32_t c = uint32_t(col[i]);
      const bool ok = c < limit;
      bad |= !ok;
      s[0] += val[i] * x[ok ? c : 0];
    }
    float sum =
        ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + (bias ? bias[r] : 0.f);
    if (res) sum += res[r];
    y[r] = relu ? relu0(sum) : sum;
  }
  return bad != 0;
}


// ---- bsr_mm -----------------------------------------------------------------------------------

// RB rows (rr..rr+RB of each block, row stride bi in val) of block row [beg, end) over columns
// n0..n0 + 16·NV: acc += Σ_blocks Σ_k val[b, r, k]·x[c·bi + k, n0:]; results into buf rows.
template <typename V, int NV, int RB>
SK_INLINE void bsr_tile(const int32_t* col, const float* val, int64_t beg, int64_t end,
                        int64_t bo, int64_t bi, int64_t in, int64_t rr, const float* x,
                        int64_t ldx, int64_t n0, float* buf) {
  V a[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = V{};
  for (int64_t b = beg; b < end; ++b) {
    const int64_t c0 = int64_t(col[b]) * bi;
    const int64_t kb = std::min(bi, in - c0);
    const float* v = val + (b * bo + rr) * bi;
    const float* p = x + c0 * ldx + n0;
    for (int64_t k = 0; k < kb; ++k, p += ldx) {
      V xv[NV];
      for (int j = 0; j < NV; ++j) xv[j] = *reinterpret_cast<const V*>(p + 16 * j);
      for (int r = 0; r < RB; ++r) {
        const V u = splat<V>(v[r * bi + k]);
        for (int j = 0; j < NV; ++j) a[r][j] += u * xv[j];
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) {
      float* dst = buf + (rr + r) * kTile + 16 * j;
      *reinterpret_cast<V*>(dst) = *reinterpret_cast<V*>(dst) + a[r][j];
    }
}

template <typename V, int NV>
SK_INLINE void bsr_rows(const int32_t* col, const float* val, int64_t beg, int64_t end,
                        int64_t bo, int64_t bi, int64_t in, int64_t rows, const float* x,
                        int64_t ldx, int64_t n0, float* buf) {
  int64_t rr = 0;
  for (; rr + 4 <= rows; rr += 4) bsr_tile<V, NV, 4>(col, val, beg, end, bo, bi, in, rr, x, ldx, n0, buf);
  switch (rows - rr) {
    case 3: bsr_tile<V, NV, 3>(col, val, beg, end, bo, bi, in, rr, x, ldx, n0, buf); break;
    case 2: bsr_tile<V, NV, 2>(col, val, beg, end, bo, bi, in, rr, x, ldx, n0, buf); break;
    case 1: bsr_tile<V, NV, 1>(col, val, beg, end, bo, bi, in, rr, x, ldx, n0, buf); break;
    default: break;
  }
}

// Block rows b0..b1 (n > 1); buf holds bo rows × kTile columns.
template <typename V>
SK_INLINE void bsr_leaf_t(const int64_t* rowptr, const int32_t* col, const float* val,
                          const float* bias, const float* x, int64_t in, int64_t n, int64_t bo,
                          int64_t bi, float* y, int64_t out, bool transpose_out, int64_t b0,
                          int64_t b1, float* buf) {
  for (int64_t br = b0; br < b1; ++br) {
    const int64_t r0 = br * bo, rows = std::min(bo, out - r0);
    const int64_t beg = rowptr[br], end = rowptr[br + 1];
    for (int64_t n0 = 0; n0 < n;) {
      const int64_t left = n - n0;
      const int64_t w = left >= 32 ? 32 : left >= 16 ? 16 : left;
      for (int64_t r = 0; r < rows; ++r)
        std::fill(buf + r * kTile, buf + r * kTile + kTile, bias ? bias[r0 + r] : 0.f);
      if (w == 32) bsr_rows<V, 2>(col, val, beg, end, bo, bi, in, rows, x, n, n0, buf);
      else if (w == 16) bsr_rows<V, 1>(col, val, beg, end, bo, bi, in, rows, x, n, n0, buf);
      else {
        for (int64_t b = beg; b < end; ++b) {
          const int64_t c0 = int64_t(col[b]) * bi, kb = std::min(bi, in - c0);
          for (int64_t r = 0; r < rows; ++r) {
            const float* v = val + (b * bo + r) * bi;
            float* acc = buf + r * kTile;
            for (int64_t k = 0; k < kb; ++k) {
              const float* p = x + (c0 + k) * n + n0;
              for (int64_t j = 0; j < w; ++j) acc[j] += v[k] * p[j];
            }
          }
        }
      }
      store_tile(buf, y, out, n, transpose_out, r0, rows, n0, w);
      n0 += w;
    }
  }
}

SK_CLONES_FMA void bsr_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                            const float* bias, const float* x, int64_t in, int64_t n, int64_t bo,
                            int64_t bi, float* y, int64_t out, bool transpose_out, int64_t b0,
                            int64_t b1, float* buf) {
  if (wide512()) bsr_leaf_t<v16s>(rowptr, col, val, bias, x, in, n, bo, bi, y, out, transpose_out, b0, b1, buf);
  else bsr_leaf_t<v8x2>(rowptr, col, val, bias, x, in, n, bo, bi, y, out, transpose_out, b0, b1, buf);
}

// n = 1: y[r] = bias[r] + Σ_blocks val[b, r, :]·x[c·bi : c·bi + bi]; BI = bi (0: runtime),
// BI lanes of partial sums per row, reduced once per row.
template <int BI>
SK_INLINE void bsr_mv_t(const int64_t* rowptr, const int32_t* col, const float* val,
                        const float* bias, const float* x, int64_t in, int64_t bo, int64_t bi_,
                        int64_t out, float* y, int64_t b0, int64_t b1) {
  const int64_t bi = BI ? BI : bi_;
  for (int64_t br = b0; br < b1; ++br) {
    const int64_t r0 = br * bo, rows = std::min(bo, out - r0);
    for (int64_t r = 0; r < rows; ++r) {
      float acc[BI ? BI : 1] = {};
      float s = 0.f;
      for (int64_t b = rowptr[br]; b < rowptr[br + 1]; ++b) {
        const int64_t c0 = int64_t(col[b]) * bi;
        const float* v = val + (b * bo + r) * bi;
        const float* p = x + c0;
        if (BI && c0 + bi <= in) {
          for (int k = 0; k < BI; ++k) acc[k] += v[k] * p[k];
        } else {
          const int64_t kb = std::min(bi, in - c0);
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < kb; ++k) s += v[k] * p[k];
        }
      }
      for (int k = 0; k < (BI ? BI : 1); ++k) s += acc[k];
      y[r0 + r] = s + (bias ? bias[r0 + r] : 0.f);
    }
  }
}

SK_CLONES_FMA void bsr_mv_leaf(const int64_t* rowptr, const int32_t* col, const float* val,
                               const float* bias, const float* x, int64_t in, int64_t bo,
                               int64_t bi, int64_t out, float* y, int64_t b0, int64_t b1) {
  switch (bi) {
    case 1: return bsr_mv_t<1>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
    case 2: return bsr_mv_t<2>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
    case 4: return bsr_mv_t<4>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
    case 8: return bsr_mv_t<8>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
    case 16: return bsr_mv_t<16>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
    default: return bsr_mv_t<0>(rowptr, col, val, bias, x, in, bo, bi, out, y, b0, b1);
  }
}

// ---- nm_mm ------------------------------------------------------------------------------------

// Column of stored value j of a row: (j / nn)·m + idx[j]; NN = nn known at compile time
// (0: runtime nn).
template <int NN>
SK_INLINE int64_t nm_col(int64_t j, int64_t nn, int64_t m, const uint8_t* ix) {
  return (j / (NN ? NN : nn)) * m + ix[j];
}

// Rows r0..r1 over columns n0..n0 + 16·NV; two accumulator sets (even/odd stored values).
template <typename V, int NV, int NN>
SK_INLINE void nm_tile(const float* val, const uint8_t* idx, int64_t len, int64_t nn, int64_t m,
                       const float* bias, const float* x, int64_t ldx, int64_t r0, int64_t r1,
                       int64_t n0, float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    V a[NV], b[NV];
    const float b0 = bias ? bias[r] : 0.f;
    for (int j = 0; j < NV; ++j) { a[j] = splat<V>(b0); b[j] = V{}; }
    const float* v = val + r * len;
    const uint8_t* ix = idx + r * len;
    int64_t i = 0;
    for (; i + 1 < len; i += 2) {
      const float* p = x + nm_col<NN>(i, nn, m, ix) * ldx + n0;
      const float* q = x + nm_col<NN>(i + 1, nn, m, ix) * ldx + n0;
      const V u = splat<V>(v[i]), w = splat<V>(v[i + 1]);
      for (int j = 0; j < NV; ++j) {
        a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
        b[j] += w * *reinterpret_cast<const V*>(q + 16 * j);
      }
    }
    if (i < len) {
      const float* p = x + nm_col<NN>(i, nn, m, ix) * ldx + n0;
      const V u = splat<V>(v[i]);
      for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
    }
    for (int j = 0; j < NV; ++j)
      *reinterpret_cast<V*>(buf + (r - r0) * kTile + 16 * j) = a[j] + b[j];
  }
}

template <typename V, int NN>
SK_INLINE void nm_leaf_t(const float* val, const uint8_t* idx, int64_t len, int64_t nn,
                         int64_t m, const float* bias, const float* x, int64_t n, float* y,
                         int64_t out, bool transpose_out, int64_t b0, int64_t b1) {
  alignas(64) float buf[kRowBlock * kTile];
  for (int64_t r0 = b0; r0 < b1; r0 += kRowBlock) {
    const int64_t r1 = std::min(b1, r0 + kRowBlock), rows = r1 - r0;
    for (int64_t n0 = 0; n0 < n;) {
      const int64_t left = n - n0;
      const int64_t w = left >= 64 && kWide<V> ? 64 : left >= 32 ? 32 : left >= 16 ? 16 : left;
      if (w == 64) nm_tile<V, 4, NN>(val, idx, len, nn, m, bias, x, n, r0, r1, n0, buf);
      else if (w == 32) nm_tile<V, 2, NN>(val, idx, len, nn, m, bias, x, n, r0, r1, n0, buf);
      else if (w == 16) nm_tile<V, 1, NN>(val, idx, len, nn, m, bias, x, n, r0, r1, n0, buf);
      else {
        for (int64_t r = r0; r < r1; ++r) {
          float* acc = buf + (r - r0) * kTile;
          std::fill(acc, acc + w, bias ? bias[r] : 0.f);
          for (int64_t i = 0; i < len; ++i) {
            const float* p = x + nm_col<NN>(i, nn, m, idx + r * len) * n + n0;
            const float v = val[r * len + i];
            for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
          }
        }
      }
      store_tile(buf, y, out, n, transpose_out, r0, rows, n0, w);
      n0 += w;
    }
  }
}

template <int NN>
SK_INLINE void nm_leaf_w(const float* val, const uint8_t* idx, int64_t len, int64_t nn, int64_t m,
                         const float* bias, const float* x, int64_t n, float* y, int64_t out,
                         bool transpose_out, int64_t b0, int64_t b1) {
  if (wide512()) nm_leaf_t<v16s, NN>(val, idx, len, nn, m, bias, x, n, y, out, transpose_out, b0, b1);
  else nm_leaf_t<v8x2, NN>(val, idx, len, nn, m, bias, x, n, y, out, transpose_out, b0, b1);
}

// n = 1: y[r] = bias[r] + Σ_j val[r, j]·x[col(j)] (a gather dot product).
template <int NN>
SK_INLINE void nm_mv_t(const float* val, const uint8_t* idx, int64_t len, int64_t nn, int64_t m,
                       const float* bias, const float* x, float* y, int64_t b0, int64_t b1) {
  for (int64_t r = b0; r < b1; ++r) {
    const float* v = val + r * len;
    const uint8_t* ix = idx + r * len;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i)  // 32-bit indices: dword gathers (in < 2^31)
      s += v[i] * x[int32_t(i / (NN ? NN : nn)) * int32_t(m) + int32_t(ix[i])];
    y[r] = s + (bias ? bias[r] : 0.f);
  }
}

// Calls F<NN>(args...) with NN = nn for the common group counts, else NN = 0 (runtime nn).
#define SK_NM_DISPATCH(fn, nn, ...)                  \
  switch (nn) {                                      \
    case 1: fn<1>(__VA_ARGS__); break;               \
    case 2: fn<2>(__VA_ARGS__); break;               \
    case 4: fn<4>(__VA_ARGS__); break;               \
    case 8: fn<8>(__VA_ARGS__); break;               \
    default: fn<0>(__VA_ARGS__); break;              \
  }

SK_CLONES_FMA void nm_leaf(const float* val, const uint8_t* idx, int64_t len, int64_t nn,
                           int64_t m, const float* bias, const float* x, int64_t n, float* y,
                           int64_t out, bool transpose_out, int64_t b0, int64_t b1) {
  SK_NM_DISPATCH(nm_leaf_w, nn, val, idx, len, nn, m, bias, x, n, y, out, transpose_out, b0, b1)
}

SK_CLONES_FMA void nm_mv_leaf(const float* val, const uint8_t* idx, int64_t len, int64_t nn,
                              int64_t m, const float* bias, const float* x, float* y, int64_t b0,
                              int64_t b1) {
  SK_NM_DISPATCH(nm_mv_t, nn, val, idx, len, nn, m, bias, x, y, b0, b1)
}

// ---- ck_conv ----------------------------------------------------------------------------------

// One row's kernels i.. with chan < limit added into acc[0:16·NV]; advances i. NT = the
// number of taps when known at compile time (0: runtime nt); the tap offsets stay in registers.
template <typename V, int NV, int NT>
SK_INLINE void ck_tile(const int32_t* chan, const float* val, const int32_t* taps, int64_t nt_,
                       int64_t plane, int64_t& i, int64_t e, int64_t limit, const float* x,
                       float* acc) {
  const int64_t nt = NT ? NT : nt_;
  V a[NV], b[NV];
  for (int j = 0; j < NV; ++j) { a[j] = *reinterpret_cast<const V*>(acc + 16 * j); b[j] = V{}; }
  for (; i < e && chan[i] < limit; ++i) {
    const float* base = x + int64_t(chan[i]) * plane;
    const float* v = val + i * nt;
    int64_t t = 0;
    for (; t + 1 < nt; t += 2) {
      const float* p = base + taps[t];
      const float* q = base + taps[t + 1];
      const V u = splat<V>(v[t]), w = splat<V>(v[t + 1]);
      for (int j = 0; j < NV; ++j) {
        a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
        if constexpr (kSets<V, NV> == 2) b[j] += w * *reinterpret_cast<const V*>(q + 16 * j);
        else a[j] += w * *reinterpret_cast<const V*>(q + 16 * j);
      }
    }
    if (t < nt) {
      const float* p = base + taps[t];
      const V u = splat<V>(v[t]);
      for (int j = 0; j < NV; ++j) a[j] += u * *reinterpret_cast<const V*>(p + 16 * j);
    }
  }
  for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(acc + 16 * j) = a[j] + b[j];
}

SK_INLINE void ck_tail(const int32_t* chan, const float* val, const int32_t* taps, int64_t nt,
                       int64_t plane, int64_t& i, int64_t e, int64_t limit, const float* x,
                       int64_t w, float* acc) {
  for (; i < e && chan[i] < limit; ++i)
    for (int64_t t = 0; t < nt; ++t) {
      const float* p = x + int64_t(chan[i]) * plane + taps[t];
      const float v = val[i * nt + t];
      for (int64_t j = 0; j < w; ++j) acc[j] += v * p[j];
    }
}

// ck_conv's step: conv_leaf with kernels instead of nonzeros; slab and channels in input-channel
// units (always inlined into the clones).
template <typename V, int NT>
struct CKStep {
  const int32_t* chan;
  const float* val;
  const int32_t* taps;
  int64_t nt, plane;
  const float* x;
  SK_INLINE void operator()(int64_t w, int64_t& i, int64_t e, int64_t limit, int64_t n0, float* a) const {
    if (w == 64) ck_tile<V, 4, NT>(chan, val, taps, nt, plane, i, e, limit, x + n0, a);
    else if (w == 32) ck_tile<V, 2, NT>(chan, val, taps, nt, plane, i, e, limit, x + n0, a);
    else if (w == 16) ck_tile<V, 1, NT>(chan, val, taps, nt, plane, i, e, limit, x + n0, a);
    else ck_tail(chan, val, taps, nt, plane, i, e, limit, x + n0, w, a);
  }
};

SK_CLONES_FMA void ck_leaf(const int64_t* rowptr, const int32_t* chan, const float* val,
                           const int32_t* taps, int64_t nt, int64_t plane, const float* bias,
                           const float* x, int64_t n, int64_t slab, int64_t channels, int64_t wp,
                           int64_t wv, bool relu, const float* res, float* y, int64_t b0,
                           int64_t b1, int64_t c0, int64_t c1) {
  const bool w512 = wide512();
  if (nt == 9 && w512)  // 3×3
    slab_blocked(rowptr, bias, n, slab, channels, wp, wv, relu, res, y, b0, b1, c0, c1,
                 CKStep<v16s, 9>{chan, val, taps, nt, plane, x});
  else if (nt == 9)
    slab_blocked(rowptr, bias, n, slab, channels, wp, wv, relu, res, y, b0, b1, c0, c1,
                 CKStep<v8x2, 9>{chan, val, taps, nt, plane, x});
  else if (w512)
    slab_blocked(rowptr, bias, n, slab, channels, wp, wv, relu, res, y, b0, b1, c0, c1,
                 CKStep<v16s, 0>{chan, val, taps, nt, plane, x});
  else
    slab_blocked(rowptr, bias, n, slab, channels, wp, wv, relu, res, y, b0, b1, c0, c1,
                 CKStep<v8x2, 0>{chan, val, taps, nt, plane, x});
}

// ---- csr_group_conv -------------------------------------------------------------------------------

// This thread's grow-only scratch array of T (one per type): no allocation and zero-fill per call
// or task (the largest size asked for stays allocated). Contents undefined.
template <typename T>
T* scratch(int64_t count) {
  static thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < count) buf.resize(count);
  return buf.data();
}

// Geometry of a grouped direct conv (functional.conv_geometry): image [C, H, W], cg = C / groups
// channels and rows_g = out / groups output rows per group; outputs in bands of `band` rows
// (nb bands); a band's input is the group's zero-padded stride phases [cg, sh, sw, hb, wq] from
// phase row h0 (hb = band + the kernel's extent in phase rows; plane = sh·sw·hb·wq per channel).
struct GroupGeom {
  int64_t c, h, w, cg, rows_g, sh, sw, ph, pw, wq, h_out, w_out, band, nb, hb, plane;
};

// Python floor division (a negative numerator rounds down).
SK_INLINE int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Copies the rows of the cg channels at x [cg, H, W] that the band of output rows from h0 reads
// into the phases of buf (functional._phase_copies): padded pixel (pr, pc) = (r + ph, c + pw)
// goes to phase (pr % sh, pc % sw), row pr / sh - h0, column pc / sw. Stride 2 along W splits
// each row into its even and odd pixels. Every phase row is written whole (padding rows and
// columns zeroed here: buf may hold an earlier call's data).
SK_INLINE void group_phase_copy(const GroupGeom& g, const float* x, int64_t h0, float* buf) {
  const int64_t phase = g.hb * g.wq;
  for (int64_t a = 0; a < g.sh; ++a) {  // phase row i holds padded row a + sh·(h0 + i)
    const int64_t i0 = std::min(g.hb, std::max<int64_t>(0, floor_div(g.ph - a + g.sh - 1, g.sh) - h0));
    const int64_t i1 = std::max(i0, std::min<int64_t>(g.hb, floor_div(g.ph + g.h - 1 - a, g.sh) - h0 + 1));
    for (int64_t c = 0; c < g.cg; ++c) {
      float* rows = buf + c * g.plane + a * g.sw * phase;
      for (int64_t b = 0; b < g.sw; ++b) {
        std::fill(rows + b * phase, rows + b * phase + i0 * g.wq, 0.f);
        std::fill(rows + b * phase + i1 * g.wq, rows + (b + 1) * phase, 0.f);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const float* src = x + (c * g.h + a + g.sh * (h0 + i) - g.ph) * g.w;
        float* row = buf + c * g.plane + a * g.sw * phase + i * g.wq;
        for (int64_t b = 0; b < g.sw; ++b) std::fill(row + b * phase, row + b * phase + g.wq, 0.f);
        if (g.sw == 1) {
          float* dst = row + g.pw;
          SK_SIMD for (int64_t j = 0; j < g.w; ++j) dst[j] = src[j];  // short rows: no memcpy call
        } else if (g.sw == 2) {
          float* even = row + (g.pw % 2) * phase + g.pw / 2;  // source pixels 0, 2, 4, ...
          float* odd = row + ((g.pw + 1) % 2) * phase + (g.pw + 1) / 2;
          int64_t k = 0;
          for (; 2 * k + 16 <= g.w; k += 8) {
            const v8 lo = *reinterpret_cast<const v8*>(src + 2 * k);
            const v8 hi = *reinterpret_cast<const v8*>(src + 2 * k + 8);
            typedef int i8 __attribute__((vector_size(32)));
            *reinterpret_cast<v8*>(even + k) = __builtin_shuffle(lo, hi, i8{0, 2, 4, 6, 8, 10, 12, 14});
            *reinterpret_cast<v8*>(odd + k) = __builtin_shuffle(lo, hi, i8{1, 3, 5, 7, 9, 11, 13, 15});
          }
          for (; 2 * k < g.w; ++k) {
            even[k] = src[2 * k];
            if (2 * k + 1 < g.w) odd[k] = src[2 * k + 1];
          }
        } else {
          for (int64_t cc = 0; cc < g.w; ++cc) {
            const int64_t pc = cc + g.pw;
            row[(pc % g.sw) * phase + pc / g.sw] = src[cc];
          }
        }
      }
    }
  }
}

// dst[0:keep] = (bias + Σ_i val[i]·x[off[i] + 0 : 16·NV])[0:keep] over nonzeros i in [i, e):
// one register tile (axpy_run), keep <= 16·NV; spill: the whole
// tile may be stored (what lies past keep is rewritten later); max(·, 0) if relu.
template <typename V, int NV>
SK_INLINE void group_tile(const int32_t* off, const float* val, int64_t i, int64_t e, float bias,
                          const float* x, float* dst, int64_t keep, bool spill, bool relu) {
  V a[NV];
  for (int j = 0; j < NV; ++j) a[j] = splat<V>(bias);
  axpy_run<V, NV, false>(off, val, x, 1, i, e, -1, a);  // the offsets as columns of stride 1
  if (relu)
    for (int j = 0; j < NV; ++j) a[j] = relu0(a[j]);
  if (spill || keep == 16 * NV) {
    for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(dst + 16 * j) = a[j];
  } else {
    alignas(64) float t[16 * NV];
    for (int j = 0; j < NV; ++j) *reinterpret_cast<V*>(t + 16 * j) = a[j];
    for (int64_t j = 0; j < keep; ++j) dst[j] = t[j];
  }
}

// Tasks t0..t1 of csr_group_conv, task t = (image, group, band of output rows h0..h1): the
// band's input copied into buf, then each of the group's rows o, output row h, in register tiles
// of 64 (AVX-512) / 32 / 16 columns: y[img, o, h, c] = bias[o] + Σ val·buf[off + (h - h0)·wq + c].
// A row's last partial tile reads past the row (buf has slack) and stores whole into the band's
// next rows, which are computed after it; in the band's last row it stores just its part.
template <typename V>
SK_INLINE void group_tasks(const GroupGeom& g, int64_t groups, const int64_t* rowptr,
                           const int32_t* off, const float* val, const float* bias, const float* x,
                           bool relu, float* y, int64_t t0, int64_t t1, float* buf) {
  const int64_t out = groups * g.rows_g;
  int64_t img = t0 / (groups * g.nb), grp = t0 / g.nb % groups, band = t0 % g.nb;
  for (int64_t t = t0; t < t1; ++t, ++band) {  // (img, grp, band) advanced without divisions
    if (band == g.nb) band = 0, ++grp;
    if (grp == groups) grp = 0, ++img;
    const int64_t h0 = band * g.band, h1 = std::min(g.h_out, h0 + g.band);
    group_phase_copy(g, x + (img * g.c + grp * g.cg) * g.h * g.w, h0, buf);
    for (int64_t o = grp * g.rows_g; o < (grp + 1) * g.rows_g; ++o) {
      const int64_t b = rowptr[o], e = rowptr[o + 1];
      const float bo = bias ? bias[o] : 0.f;
      for (int64_t h = h0; h < h1; ++h) {
        float* dst = y + ((img * out + o) * g.h_out + h) * g.w_out;
        const float* src = buf + (h - h0) * g.wq;
        const int64_t room = (h1 - h) * g.w_out;  // outputs from dst to the band's end
        for (int64_t c = 0; c < g.w_out;) {
          const int64_t left = g.w_out - c;
          if (kWide<V> && left >= 64) {
            group_tile<V, 4>(off, val, b, e, bo, src + c, dst + c, 64, true, relu);
            c += 64;
          } else if (left > 16) {
            group_tile<V, 2>(off, val, b, e, bo, src + c, dst + c, std::min<int64_t>(left, 32), c + 32 <= room,
                             relu);
            c += 32;
          } else {
            group_tile<V, 1>(off, val, b, e, bo, src + c, dst + c, left, c + 16 <= room, relu);
            c += 16;
          }
        }
      }
    }
  }
}

// group_phase_copy in this CPU's clone (the body of a parallel_for lambda is compiled for the
// baseline ISA: its 32-byte shuffles would run as SSE2 pairs).
SK_CLONES void phase_copy_leaf(const GroupGeom& g, const float* x, int64_t h0, float* buf) {
  group_phase_copy(g, x, h0, buf);
}

SK_CLONES_FMA void group_leaf(const GroupGeom& g, int64_t groups, const int64_t* rowptr,
                              const int32_t* off, const float* val, const float* bias,
                              const float* x, bool relu, float* y, int64_t t0, int64_t t1, float* buf) {
  if (wide512()) group_tasks<v16s>(g, groups, rowptr, off, val, bias, x, relu, y, t0, t1, buf);
  else group_tasks<v8x2>(g, groups, rowptr, off, val, bias, x, relu, y, t0, t1, buf);
}

}  // namespace

namespace {

// Index validation (the kernels read x at these indices) by a vectorized min/max scan.
SK_CLONES void minmax_leaf(const int32_t* p, int64_t count, int32_t& lo, int32_t& hi) {
  int32_t mn = INT32_MAX, mx = INT32_MIN;
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < count; ++i) {
    mn = std::min(mn, p[i]);
    mx = std::max(mx, p[i]);
  }
  lo = mn;
  hi = mx;
}

// The smallest and largest of p[0:count] (INT32_MAX, INT32_MIN when empty), over the threads:
// the checks read every index of a weight on each call (~20 us for 200K of them, 1 thread).
void minmax_i32(const int32_t* p, int64_t count, int32_t& lo, int32_t& hi) {
  constexpr int64_t grain = 1 << 15;
  const int64_t chunks = (count + grain - 1) / grain;
  std::vector<int32_t> mn(chunks, INT32_MAX), mx(chunks, INT32_MIN);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      minmax_leaf(p + c * grain, std::min(grain, count - c * grain), mn[c], mx[c]);
  });
  lo = INT32_MAX;
  hi = INT32_MIN;
  for (int64_t c = 0; c < chunks; ++c) {
    lo = std::min(lo, mn[c]);
    hi = std::max(hi, mx[c]);
  }
}

// The position of the first value outside [lo, hi), or -1 when all are inside.
int64_t first_outside_i32(const int32_t* p, int64_t count, int64_t lo, int64_t hi) {
  int32_t mn, mx;
  minmax_i32(p, count, mn, mx);
  if (count == 0 || (mn >= lo && mx < hi)) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (p[i] < lo || p[i] >= hi) return i;
  return -1;
}

// The wide columns a direct conv's tiles compute: n rounded up to whole 16-column vectors where
// x (numel elements) holds them after the furthest read start (store_wide drops the extra
// columns), so the last tile runs in vectors, not lane by lane; else n.
int64_t run_columns(int64_t n, int64_t furthest, int64_t numel) {
  const int64_t up = (n + 15) / 16 * 16;
  return furthest + up <= numel ? up : n;
}

SK_CLONES int64_t first_outside_u8(const uint8_t* p, int64_t count, int64_t hi) {
  uint8_t mx = 0;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < count; ++i) mx = std::max(mx, p[i]);
  if (count == 0 || mx < hi) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (p[i] >= hi) return i;
  return -1;
}

// TypeError unless val, x and a non-empty bias have one float dtype (ops/spmm.py check_dtypes:
// the same messages on every device; these kernels then take fp32 only).
void check_dtypes(const char* op, const at::Tensor& val, const at::Tensor& bias, const at::Tensor& x) {
  const at::ScalarType v = val.scalar_type();
  TORCH_CHECK_TYPE(v == at::kFloat || v == at::kHalf || v == at::kBFloat16, op,
                   ": val must be float32, float16 or bfloat16, got ", torch_dtype(v));
  TORCH_CHECK_TYPE(x.scalar_type() == v, op, ": x is ", torch_dtype(x.scalar_type()), " but val is ",
                   torch_dtype(v), "; they must have the same dtype");
  TORCH_CHECK_TYPE(bias.numel() == 0 || bias.scalar_type() == v, op, ": bias is ",
                   torch_dtype(bias.scalar_type()), " but val is ", torch_dtype(v),
                   "; they must have the same dtype (or bias empty)");
}

// The residual's data for an output y: null without one, else residual (y's shape, float32 on
// the CPU; kept contiguous in keep).
const float* residual_data(const char* op, const std::optional<at::Tensor>& residual,
                           const at::Tensor& y, at::Tensor& keep) {
  if (!residual.has_value()) return nullptr;
  const at::Tensor& r = *residual;
  TORCH_CHECK_VALUE(r.device().is_cpu() && r.scalar_type() == at::kFloat && r.sizes() == y.sizes(), op,
              ": residual must be a float32 CPU tensor of the output's shape ", y.sizes(), ", got ",
              r.scalar_type(), " ", r.sizes(), " on ", r.device());
  keep = r.contiguous();
  return keep.const_data_ptr<float>();
}

// The x / bias / output checks shared by csr_mm, bsr_mm and nm_mm; returns the empty output.
at::Tensor mm_output(const char* op, const at::Tensor& bias, const at::Tensor& x,
                     int64_t out_features, bool transpose_out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              op, ": x must be a contiguous 2-D float32 CPU tensor [in, n], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              op, ": bias must be empty or contiguous float32 [out_features]");
  const int64_t n = x.size(1);
  return transpose_out ? empty_output({n, out_features}, x.options())
                       : empty_output({out_features, n}, x.options());
}

SK_CLONES void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t c0, int64_t c1,
                              float* dst, int64_t ldd) {
  transpose(src + c0, lds, rows, c1 - c0, dst + c0 * ldd, ldd);
}

// x made contiguous; the transpose of a contiguous fp32 matrix (a Linear's input [B, in] as
// [in, B]) by 8×8 register transposes over the threads (64×4096: ~60 µs vs the generic
// copy's ~185 µs, 1 thread, AMD EPYC).
at::Tensor contiguous_x(const at::Tensor& x) {
  if (x.is_contiguous() || x.dim() != 2 || !x.device().is_cpu() ||
      x.scalar_type() != at::kFloat || x.stride(0) != 1 || x.stride(1) != x.size(0))
    return x.contiguous();
  const int64_t in = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({in, n}, x.options());
  const float* src = x.const_data_ptr<float>();  // [n, in] row-major
  float* dst = y.mutable_data_ptr<float>();
  at::parallel_for(0, (in + 63) / 64, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, 64 * n)),
                   [&](int64_t b, int64_t e) {
    transpose_rows(src, in, n, b * 64, std::min(in, e * 64), dst, n);
  });
  return y;
}

// x [in, n] with rows of ldx = n rounded up to 16 floats (zero-padded), for csr_mm's column
// tiles: 64-byte aligned vector loads that never split a cache line, whole tiles to the end (x
// [512, 49]: one 64-column tile instead of two overlapping 32-column ones); n already a multiple
// of 16, or below 16, is kept. csr_mm 512->2048 n=49 at 20 %: 0.91 -> 0.71 ms, 1024->256 n=196:
// 0.36 -> 0.32 ms (1 thread, AMD EPYC Zen3).
at::Tensor padded_x(const at::Tensor& x) {
  const int64_t in = x.size(0), n = x.size(1), ldx = (n + 15) / 16 * 16;
  if (n < 16 || ldx == n) return x;
  at::Tensor xp = at::empty({in, ldx}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = xp.mutable_data_ptr<float>();
  at::parallel_for(0, in, std::max<int64_t>(1, (1 << 16) / ldx), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      std::memcpy(dst + k * ldx, src + k * n, n * sizeof(float));
      std::fill(dst + k * ldx + n, dst + (k + 1) * ldx, 0.f);
    }
  });
  return xp;
}

// rowptr: contiguous int64 [rows + 1] from 0 to nnz, non-decreasing.
void check_rowptr(const char* op, const at::Tensor& rowptr, int64_t rows, int64_t nnz) {
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == rows + 1,
              op, ": rowptr must be contiguous int64 [", rows + 1, "], got ", rowptr.scalar_type(),
              " ", rowptr.sizes());
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == nnz, op, ": rowptr must run from 0 to ", nnz);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(rp[r] <= rp[r + 1], op, ": rowptr must be non-decreasing");
}

}  // namespace

at::Tensor csr_mm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
                  const at::Tensor& bias, const at::Tensor& x_any, int64_t out_features,
                  bool transpose_out, bool relu, const std::optional<at::Tensor>& residual) {
  check_dtypes("csr_mm", val, bias, x_any);
  const at::Tensor x = contiguous_x(x_any);
  at::Tensor y = mm_output("csr_mm", bias, x, out_features, transpose_out);
  at::Tensor res_keep;
  const float* res = residual_data("csr_mm", residual, y, res_keep);
  TORCH_CHECK(col.scalar_type() == at::kInt && col.is_contiguous() && val.is_contiguous() &&
                  val.scalar_type() == at::kFloat && col.numel() == val.numel(),
              "csr_mm: col must be int32 and val float32, contiguous, of equal length");
  const int64_t n = x.size(1), in = x.size(0), nnz_ = val.numel();
  check_rowptr("csr_mm", rowptr, out_features, nnz_);
  const int32_t* cp0 = col.const_data_ptr<int32_t>();
  auto check_columns = [&] {
    const int64_t bad = first_outside_i32(cp0, nnz_, 0, in);
    TORCH_CHECK(bad < 0, "csr_mm: column index ", bad < 0 ? 0 : cp0[bad], " outside [0, ", in, ")");
  };
  // the leaves check the indices they are about to read (no separate pass over the weight)
  const bool fused_check = n >= 1 && in > 0 && out_features > 0;
  if (!fused_check) check_columns();
  if (n == 0 || out_features == 0) return y;
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const int32_t* cp = col.const_data_ptr<int32_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const at::Tensor xs = padded_x(x);
  const float* xp = xs.const_data_ptr<float>();
  const int64_t ldx = xs.size(1);
  float* yp = y.mutable_data_ptr<float>();
  const int64_t grain = grain_rows(val.numel(), out_features, n, kRowBlock);
  std::atomic<bool> bad{false};
  if (n == 1) {
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      if (mv_leaf(rp, cp, vp, bp, xp, in, yp, relu, res, b, e)) bad = true;
    });
  } else {  // tasks of >= grain rows, ~4 per thread (dynamic_for), each checking its rows' indices
    const int64_t quarter = (out_features + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
    const int64_t rows = std::max(grain, (quarter + kRowBlock - 1) / kRowBlock * kRowBlock);
    dynamic_for((out_features + rows - 1) / rows, [&](int64_t t) {
      const int64_t b = t * rows, e = std::min(out_features, b + rows);
      int32_t lo, hi;
      minmax_leaf(cp + rp[b], rp[e] - rp[b], lo, hi);
      if (rp[e] > rp[b] && (lo < 0 || hi >= in)) bad = true;
      else mm_leaf(rp, cp, vp, bp, xp, in, n, ldx, yp, out_features, transpose_out, relu, res, b, e);
    });
  }
  if (bad) check_columns();  // raises
  return y;
}

at::Tensor csr_conv(const at::Tensor& rowptr, const at::Tensor& off, const at::Tensor& val,
                    const at::Tensor& bias, const at::Tensor& x_any, int64_t n, int64_t out_features,
                    int64_t slab, int64_t wp, int64_t wv, bool relu,
                    const std::optional<at::Tensor>& residual) {
  check_dtypes("csr_conv", val, bias, x_any);
  const at::Tensor x = x_any.contiguous();
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
  int32_t lo = 0, hi = 0;
  minmax_i32(op, nnz, lo, hi);
  if (n > 0 && nnz > 0 && (lo < 0 || hi + n > x.numel())) {
    const int64_t bad = first_outside_i32(op, nnz, 0, x.numel() - n + 1);
    TORCH_CHECK(bad < 0, "csr_conv: offset ", bad < 0 ? 0 : op[bad], " + n = ", n,
                " reads past x (", x.numel(), " elements)");
  }
  at::Tensor y = empty_output({out_features, n / wp, wv}, x.options());
  at::Tensor res_keep;
  const float* res = residual_data("csr_conv", residual, y, res_keep);
  if (y.numel() == 0) return y;
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t span = x.numel();  // every offset is below it
  const int64_t run = run_columns(n, nnz ? hi : 0, x.numel());
  conv_grid(out_features, run, nnz, [&](int64_t b, int64_t e, int64_t c0, int64_t c1) {
    conv_leaf(rp, op, vp, bp, xp, n, slab, span, wp, wv, relu, res, yp, b, e, c0, c1);
  });
  return y;
}

at::Tensor bsr_mm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
                  const at::Tensor& bias, const at::Tensor& x_any, int64_t out_features,
                  bool transpose_out) {
  check_dtypes("bsr_mm", val, bias, x_any);
  const at::Tensor x = x_any.contiguous();
  at::Tensor y = mm_output("bsr_mm", bias, x, out_features, transpose_out);
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.dim() == 3 && val.is_contiguous() &&
                  val.size(1) > 0 && val.size(2) > 0,
              "bsr_mm: val must be contiguous float32 [nnzb, bo, bi] with bo, bi > 0, got ",
              val.scalar_type(), " ", val.sizes());
  const int64_t nnzb = val.size(0), bo = val.size(1), bi = val.size(2);
  const int64_t in = x.size(0), n = x.size(1), brows = (out_features + bo - 1) / bo;
  TORCH_CHECK(col.scalar_type() == at::kInt && col.is_contiguous() && col.numel() == nnzb,
              "bsr_mm: col must be contiguous int32 [nnzb] (nnzb = val.size(0) = ", nnzb, ")");
  check_rowptr("bsr_mm", rowptr, brows, nnzb);
  const int32_t* cp = col.const_data_ptr<int32_t>();
  const int64_t bcols = (in + bi - 1) / bi;
  const int64_t bad = first_outside_i32(cp, nnzb, 0, bcols);
  TORCH_CHECK(bad < 0, "bsr_mm: block column ", bad < 0 ? 0 : cp[bad], " outside [0, ", bcols, ")");
  if (n == 0 || out_features == 0) return y;
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, grain_rows(nnzb * bo * bi, out_features, n, bo) / bo);
  if (n == 1) {
    at::parallel_for(0, brows, grain, [&](int64_t b, int64_t e) {
      bsr_mv_leaf(rp, cp, vp, bp, xp, in, bo, bi, out_features, yp, b, e);
    });
  } else {
    at::parallel_for(0, brows, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf(bo * kTile);
      bsr_leaf(rp, cp, vp, bp, xp, in, n, bo, bi, yp, out_features, transpose_out, b, e,
               buf.data());
    });
  }
  return y;
}

at::Tensor nm_mm(const at::Tensor& val, const at::Tensor& idx, const at::Tensor& bias,
                 const at::Tensor& x_any, int64_t n, int64_t m, int64_t out_features,
                 bool transpose_out) {
  check_dtypes("nm_mm", val, bias, x_any);
  const at::Tensor x = x_any.contiguous();
  at::Tensor y = mm_output("nm_mm", bias, x, out_features, transpose_out);
  const int64_t in = x.size(0), cols = x.size(1);
  TORCH_CHECK(m >= 1 && m <= 256 && n >= 1 && n <= m, "nm_mm: need 1 <= n <= m <= 256, got n=",
              n, " m=", m);
  TORCH_CHECK(in % m == 0, "nm_mm: in_features (", in, ") must be a multiple of m = ", m);
  const int64_t len = in / m * n;
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() && val.dim() == 2 &&
                  val.size(0) == out_features && val.size(1) == len,
              "nm_mm: val must be contiguous float32 [out_features, in·n/m] = [", out_features,
              ", ", len, "], got ", val.scalar_type(), " ", val.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.is_contiguous() && idx.sizes() == val.sizes(),
              "nm_mm: idx must be contiguous uint8 of val's shape, got ", idx.scalar_type(), " ",
              idx.sizes());
  const uint8_t* ip = idx.const_data_ptr<uint8_t>();
  const int64_t bad = first_outside_u8(ip, idx.numel(), m);
  TORCH_CHECK(bad < 0, "nm_mm: idx value ", bad < 0 ? 0 : int(ip[bad]), " is not a position in [0, ",
              m, ")");
  if (cols == 0 || out_features == 0) return y;
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t grain = grain_rows(val.numel(), out_features, cols, kRowBlock);
  if (cols == 1) {
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      nm_mv_leaf(vp, ip, len, n, m, bp, xp, yp, b, e);
    });
  } else {
    at::parallel_for(0, out_features, grain, [&](int64_t b, int64_t e) {
      nm_leaf(vp, ip, len, n, m, bp, xp, cols, yp, out_features, transpose_out, b, e);
    });
  }
  return y;
}

at::Tensor ck_conv(const at::Tensor& rowptr, const at::Tensor& chan, const at::Tensor& val,
                   const at::Tensor& taps, const at::Tensor& bias, const at::Tensor& x_any, int64_t n,
                   int64_t out_features, int64_t plane, int64_t slab, int64_t wp, int64_t wv,
                   bool relu, const std::optional<at::Tensor>& residual) {
  check_dtypes("ck_conv", val, bias, x_any);
  const at::Tensor x = x_any.contiguous();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 &&
                  x.is_contiguous(),
              "ck_conv: x must be a contiguous 1-D float32 CPU tensor, got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(taps.scalar_type() == at::kInt && taps.is_contiguous() && taps.dim() == 1 &&
                  taps.numel() > 0,
              "ck_conv: taps must be a non-empty contiguous int32 [T]");
  const int64_t nt = taps.numel();
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() && val.dim() == 2 &&
                  val.size(1) == nt,
              "ck_conv: val must be contiguous float32 [nk, T] with T = taps.numel() = ", nt,
              ", got ", val.scalar_type(), " ", val.sizes());
  const int64_t nk = val.size(0);
  TORCH_CHECK(chan.scalar_type() == at::kInt && chan.is_contiguous() && chan.numel() == nk,
              "ck_conv: chan must be contiguous int32 [nk] (nk = val.size(0) = ", nk, ")");
  check_rowptr("ck_conv", rowptr, out_features, nk);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              "ck_conv: bias must be empty or contiguous float32 [out_features]");
  TORCH_CHECK(n >= 0 && plane > 0 && slab > 0 && wp > 0 && n % wp == 0 && wv >= 0 && wv <= wp,
              "ck_conv: need n >= 0, plane > 0, slab > 0, wp > 0 dividing n, 0 <= wv <= wp; got n=",
              n, " plane=", plane, " slab=", slab, " wp=", wp, " wv=", wv);
  const int32_t* tp = taps.const_data_ptr<int32_t>();
  const int32_t* cp = chan.const_data_ptr<int32_t>();
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  int64_t max_tap = 0, max_chan = 0;
  for (int64_t t = 0; t < nt; ++t) {
    TORCH_CHECK(tp[t] >= 0, "ck_conv: taps must be >= 0, got ", tp[t]);
    max_tap = std::max<int64_t>(max_tap, tp[t]);
  }
  for (int64_t r = 0; r < out_features; ++r)
    for (int64_t i = rp[r]; i < rp[r + 1]; ++i) {
      TORCH_CHECK(cp[i] >= 0 && (i == rp[r] || cp[i] > cp[i - 1]),
                  "ck_conv: chan must be >= 0 and ascending within a row");
      TORCH_CHECK(n == 0 || int64_t(cp[i]) * plane + max_tap + n <= x.numel(), "ck_conv: channel ",
                  cp[i], " with tap ", max_tap, " + n = ", n, " reads past x (", x.numel(),
                  " elements)");
      max_chan = std::max<int64_t>(max_chan, cp[i]);
    }
  at::Tensor y = empty_output({out_features, n / wp, wv}, x.options());
  at::Tensor res_keep;
  const float* res = residual_data("ck_conv", residual, y, res_keep);
  if (y.numel() == 0) return y;
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t channels = x.numel() / plane + 1;  // every channel index is below it
  const int64_t run = run_columns(n, max_chan * plane + max_tap, x.numel());
  conv_grid(out_features, run, val.numel(), [&](int64_t b, int64_t e, int64_t c0, int64_t c1) {
    ck_leaf(rp, cp, vp, tp, nt, plane, bp, xp, n, slab, channels, wp, wv, relu, res, yp, b, e, c0, c1);
  });
  return y;
}

at::Tensor csr_group_conv(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& val,
                          const at::Tensor& bias, const at::Tensor& x_any, int64_t out_features,
                          int64_t groups, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_dtypes("csr_group_conv", val, bias, x_any);
  const at::Tensor x = x_any.contiguous();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "csr_group_conv: x must be a float32 CPU tensor [N, C, H, W], got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "csr_group_conv: kernel_size, stride, padding and dilation must have 2 values each");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0,
              "csr_group_conv: need kernel_size, stride, dilation > 0 and padding >= 0, got ",
              kernel_size, " ", stride, " ", padding, " ", dilation);
  const int64_t n_img = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0 && out_features >= 0 && out_features % groups == 0,
              "csr_group_conv: groups (", groups, ") must divide the input channels (", c,
              ") and out_features (", out_features, ")");
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  TORCH_CHECK(hp > dh * (kh - 1) && wp > dw * (kw - 1), "csr_group_conv: input ", h, "×", w,
              " (padded ", hp, "×", wp, ") is smaller than the dilated kernel");
  const int64_t cg = c / groups, wq = (wp + sw - 1) / sw, h_out = (hp - dh * (kh - 1) - 1) / sh + 1;
  const int64_t extent = dh * (kh - 1) / sh, row_bytes = std::max<int64_t>(1, cg * sh * sw * wq * 4);
  // Bands of output rows whose input (kh's extent in phase rows more) is ~16 KB (stays in L1
  // while every row of the group reads it; a stem's 3 channels of 224² make 28 bands to share
  // out), at least 4 extents (the overlap read twice). One image of groups 1 with outputs of at
  // most 8 columns (a row's 16-column tile at most half used): one band, the whole image's
  // phases, convolved in wide rows of wq by csr_conv's leaf (below) (ResNet-50's 512→512 s2 14×14
  // at 96 %, 2 threads, AMD EPYC Zen 3: 0.80 → 0.55 ms; at 14×14 / 28×28 outputs the bands are
  // faster: 0.43 vs 0.57 ms, 0.5 vs 0.9 ms).
  const int64_t w_out = (wp - dw * (kw - 1) - 1) / sw + 1;
  const bool wide = groups == 1 && n_img == 1 && w_out <= 8;
  int64_t band = wide ? h_out : std::min(h_out, std::max<int64_t>({1, 4 * extent, (16 << 10) / row_bytes - extent}));
  const int64_t nb = (h_out + band - 1) / band;
  band = (h_out + nb - 1) / nb;  // equal bands
  GroupGeom g{c, h, w, cg, out_features / groups, sh, sw, ph, pw, wq, h_out, w_out, band, nb,
              band + extent, 0};
  g.plane = sh * sw * g.hb * wq;
  TORCH_CHECK(col.scalar_type() == at::kInt && col.is_contiguous() && val.is_contiguous() &&
                  val.scalar_type() == at::kFloat && col.numel() == val.numel(),
              "csr_group_conv: col must be int32 and val float32, contiguous, of equal length");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                                    bias.numel() == out_features),
              "csr_group_conv: bias must be empty or contiguous float32 [out_features]");
  const int64_t nnz = val.numel(), rs = kh * kw;
  check_rowptr("csr_group_conv", rowptr, out_features, nnz);
  const int32_t* cp = col.const_data_ptr<int32_t>();
  const int64_t bad = first_outside_i32(cp, nnz, 0, g.cg * rs);
  TORCH_CHECK(bad < 0, "csr_group_conv: column index ", bad < 0 ? 0 : cp[bad], " outside [0, ",
              g.cg * rs, ") (C / groups · R · S)");
  // Buffer: a band's phases, then slack (zero) for the last row's taps and a whole last tile.
  const int64_t len = g.cg * g.plane + (dw * (kw - 1)) / sw + kTile;
  TORCH_CHECK(len < INT32_MAX, "csr_group_conv: a group of ", g.cg, " channels of ", g.hb, "×",
              g.wq, " pixels per phase is too large for int32 offsets");
  at::Tensor y = empty_output({n_img, out_features, g.h_out, g.w_out}, x.options());
  if (y.numel() == 0) return y;
  // col = c·R·S + r·S + s -> c·plane + tap (r, s) in the phases (functional.conv_taps), by a
  // table over the cg·R·S columns (no division per nonzero: a depthwise layer's ~5K took ~50 us)
  std::vector<int32_t> table(g.cg * rs);
  for (int64_t c = 0; c < g.cg; ++c)
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t s = 0; s < kw; ++s)
        table[(c * kh + r) * kw + s] = int32_t(c * g.plane + (((r * dh) % sh) * sw + (s * dw) % sw) * g.hb * g.wq +
                                               (r * dh / sh) * g.wq + (s * dw) / sw);
  int32_t* off = scratch<int32_t>(nnz);
  at::parallel_for(0, nnz, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) off[i] = table[cp[i]];
  });
  const int64_t* rp = rowptr.const_data_ptr<int64_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* bp = bias.numel() ? bias.const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // The slack past the phases (read only by the tiles' dropped columns) zeroed: no stale
  // denormals or NaNs in the arithmetic.
  const auto phases = [&](float* buf) { std::fill(buf + g.cg * g.plane, buf + len, 0.f); return buf; };
  if (wide) {  // the phases copied over the threads, a channel range each; then csr_conv's grid
    float* buf = phases(scratch<float>(len));
    at::parallel_for(0, c, std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, g.plane)),
                     [&](int64_t c0, int64_t c1) {
      GroupGeom part = g;
      part.cg = c1 - c0;
      phase_copy_leaf(part, xp + c0 * h * w, 0, buf + c0 * g.plane);
    });
    int32_t lo = 0, furthest = 0;
    if (nnz) minmax_i32(off, nnz, lo, furthest);
    const int64_t n = h_out * wq, run = run_columns(n, furthest, len);
    conv_grid(out_features, run, nnz, [&](int64_t b, int64_t e, int64_t c0, int64_t c1) {
      conv_leaf(rp, off, vp, bp, buf, n, kSlabChannels * g.plane, len, wq, g.w_out, relu, nullptr, yp, b, e,
                c0, c1);
    });
    return y;
  }
  const int64_t tasks = n_img * groups * g.nb;
  // Work per task in multiply-adds plus ~4 per pixel for the copy and the tiles' fixed costs;
  // tasks of ~kGrainMacs / 8 (a depthwise 7×7 channel is ~0.2 us).
  const int64_t per_task = std::max<int64_t>(1, (nnz / groups + 4 * g.cg) * g.band * g.wq);
  at::parallel_for(0, tasks, std::max<int64_t>(1, kGrainMacs / 8 / per_task), [&](int64_t t0, int64_t t1) {
    group_leaf(g, groups, rp, off, vp, bp, xp, relu, yp, t0, t1, phases(scratch<float>(len)));
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekern

// CPU kernels of the spmm ops, whose schemas are defined once, in sparsekern/ops/spmm.py.
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("csr_mm", &sparsekern::cpu::csr_mm);
  m.impl("csr_conv", &sparsekern::cpu::csr_conv);
  m.impl("bsr_mm", &sparsekern::cpu::bsr_mm);
  m.impl("nm_mm", &sparsekern::cpu::nm_mm);
  m.impl("ck_conv", &sparsekern::cpu::ck_conv);
  m.impl("csr_group_conv", &sparsekern::cpu::csr_group_conv);
}

// No gradient: backpropagating through an spmm op raises ("not implemented"), in C++ (a Python
// autograd kernel would cost ~7 us a call; sparsekern/ops/_common.define skips it when this exists).
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  for (const char* op : {"csr_mm", "csr_conv", "bsr_mm", "nm_mm", "ck_conv", "csr_group_conv"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
