// pool family: max pooling for the converted models (sparsekern/inference/fuse.py SeparableMaxPool2d).
//
// Contract (schema defined once, in sparsekern/ops/pool.py):
//   max_pool2d(x, kernel_size, stride, padding) -> y [N, C, H', W'], x's dtype (fp32, bf16, fp16)
//     x: [N, C, H, W], any strides (made contiguous); kernel_size, stride > 0 and
//     0 <= padding <= kernel_size / 2 per dimension (torch's rule: every window holds an input);
//     H' = (H + 2·ph − kh) / sh + 1 >= 1 (floor), likewise W';
//   y[n, c, i, j] = max over r < kh, s < kw of x[n, c, i·sh + r − ph, j·sw + s − pw], positions
//     outside x skipped (−inf padding); a NaN in the window gives NaN (as F.max_pool2d).
//
// One output row per step: the elementwise max of its (up to) kh input rows into a row buffer
// padded with −inf (contiguous, vectorized), then, tap by tap, the max over the kw columns of each
// output's window in that buffer (no bounds to check). On CPU it replaces the module's max over
// strided slices in Python (ResNet stem [1, 64, 112, 112], 3×3/2: four elementwise ops, two
// intermediates and a copy), which stays for other devices and float64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace sparsekern {
namespace cpu {
namespace {

// max(a, b) with NaN winning: b replaces a if larger or NaN; a NaN a stays (b > NaN is false).
SK_INLINE float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

struct PoolGeom {
  int64_t h, w, h_out, w_out, kh, kw, sh, sw, ph, pw;
};

// Output rows t0..t1 (t = plane · H' + i) of planes of x [·, H, W] into y [·, H', W']. buf: W + 2·pw
// floats, the row max between −inf paddings (written once per task, never overwritten), then W'
// floats for the outputs. Column stride SW: 1 or 2 at compile time (the column taps vectorize as
// contiguous / interleaved loads), 0 for any other (g.sw at run time).
template <class S, int SW>
SK_CLONES void pool_rows(const typename S::raw* x, typename S::raw* y, float* buf, const PoolGeom& g,
                         int64_t t0, int64_t t1) {
  const int64_t sw = SW ? SW : g.sw, wpad = g.w + 2 * g.pw;
  float* row = buf + g.pw;  // row[c] = max of the window's input rows at column c
  float* out = buf + wpad;
  for (int64_t c = 0; c < g.pw; ++c) buf[c] = buf[g.pw + g.w + c] = -std::numeric_limits<float>::infinity();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t plane = t / g.h_out, i = t % g.h_out;
    const typename S::raw* xp = x + plane * g.h * g.w;
    const int64_t r0 = std::max<int64_t>(0, i * g.sh - g.ph), r1 = std::min(g.h, i * g.sh - g.ph + g.kh);
    const typename S::raw* first = xp + r0 * g.w;
    SK_SIMD for (int64_t c = 0; c < g.w; ++c) row[c] = S::load(first[c]);
    for (int64_t r = r0 + 1; r < r1; ++r) {
      const typename S::raw* xr = xp + r * g.w;
      SK_SIMD for (int64_t c = 0; c < g.w; ++c) row[c] = max_nan(row[c], S::load(xr[c]));
    }
    SK_SIMD for (int64_t j = 0; j < g.w_out; ++j) out[j] = buf[j * sw];
    for (int64_t s = 1; s < g.kw; ++s) {
      const float* tap = buf + s;
      SK_SIMD for (int64_t j = 0; j < g.w_out; ++j) out[j] = max_nan(out[j], tap[j * sw]);
    }
    typename S::raw* yr = y + t * g.w_out;
    SK_SIMD for (int64_t j = 0; j < g.w_out; ++j) yr[j] = S::store(out[j]);
  }
}

}  // namespace

at::Tensor max_pool2d(const at::Tensor& x_any, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding) {
  TORCH_CHECK(x_any.device().is_cpu() && x_any.dim() == 4, "max_pool2d: x must be a CPU tensor [N, C, H, W], got ",
              x_any.device(), " ", x_any.sizes());
  const at::ScalarType st = x_any.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "max_pool2d: x must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "max_pool2d: kernel_size, stride and padding must have 2 values each");
  PoolGeom g{x_any.size(2), x_any.size(3), 0, 0, kernel_size[0], kernel_size[1], stride[0], stride[1],
             padding[0], padding[1]};
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0, "max_pool2d: kernel_size and stride must be > 0, got ",
              kernel_size, " ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && 2 * g.ph <= g.kh && 2 * g.pw <= g.kw,
              "max_pool2d: padding must be >= 0 and at most half the kernel_size, got ", padding, " for ",
              kernel_size);
  TORCH_CHECK(g.h + 2 * g.ph >= g.kh && g.w + 2 * g.pw >= g.kw, "max_pool2d: input ", g.h, "×", g.w,
              " with padding ", padding, " is smaller than the ", kernel_size, " window");
  g.h_out = (g.h + 2 * g.ph - g.kh) / g.sh + 1;
  g.w_out = (g.w + 2 * g.pw - g.kw) / g.sw + 1;
  const at::Tensor x = x_any.contiguous();
  at::Tensor y = empty_output({x.size(0), x.size(1), g.h_out, g.w_out}, x.options());
  const int64_t rows = x.size(0) * x.size(1) * g.h_out;
  dispatch_storage(x.scalar_type(), [&](auto s) {
    using S = decltype(s);
    if (rows == 0) return;
    const auto* xp = cptr<S>(x);
    auto* yp = static_cast<typename S::raw*>(y.data_ptr());
    // tasks of ~16K input elements read
    const int64_t grain = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, g.kh * g.w));
    at::parallel_for(0, rows, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(g.w + 2 * g.pw + g.w_out);
      const auto run = g.sw == 1 ? pool_rows<S, 1> : g.sw == 2 ? pool_rows<S, 2> : pool_rows<S, 0>;
      run(xp, yp, buf.data(), g, t0, t1);
    });
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("max_pool2d", &sparsekern::cpu::max_pool2d); }

// No gradient (inference): backward raises, in C++ (no Python autograd kernel: ~7 us less a call).
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  m.impl("max_pool2d", torch::autograd::autogradNotImplementedFallback());
}
