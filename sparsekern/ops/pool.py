"""pool family: the max pooling of the converted models (``sparsekern.inference.fuse.MaxPool2d``).

* ``torch.ops.sparsekern.max_pool2d(x, kernel_size, stride, padding)``: ``F.max_pool2d`` with
  dilation 1, floor mode and no indices, ``x [N, C, H, W]`` (fp32, bf16, fp16, any strides) →
  ``[N, C, H', W']`` (:func:`sparsekern.reference.max_pool2d`: the math; NaN propagates). C++ on CPU
  (``csrc/cpu/pool.cpp``: one pass per output row; a ResNet stem's 3×3/2 pool at 2 threads 0.18 ms,
  a max of strided slices in torch 0.41 ms, ``F.max_pool2d`` 4.1 ms, AMD EPYC Zen 3), the
  reference elsewhere; no autograd (backward raises).

:func:`max_pool2d` checks the arguments (ValueError / TypeError naming them) and calls the op.
"""
import torch

from .. import reference
from ._common import FLOAT_DTYPES, check_cpp, define


def _pair(v, name):
    """``(a, b)`` of ints from an int or a pair; ValueError naming ``name`` otherwise."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in pair):
        raise ValueError(f"max_pool2d: {name} must be an int or a pair of ints, got {v!r}")
    return pair


def pool_geometry(x, kernel_size, stride, padding):
    """``(kernel_size, stride, padding, (H', W'))`` as pairs after checking them against ``x [N, C,
    H, W]`` (float): ValueError / TypeError naming the argument (kernel_size, stride > 0, 0 <= padding
    <= kernel_size / 2 as torch requires, a window that fits the padded input)."""
    if x.dim() != 4:
        raise ValueError(f"max_pool2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"max_pool2d: x must be float32, float16 or bfloat16, got {x.dtype}")
    k, s, p = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    if min(k) < 1 or min(s) < 1:
        raise ValueError(f"max_pool2d: kernel_size and stride must be >= 1, got {k} and {s}")
    if min(p) < 0 or 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        raise ValueError(f"max_pool2d: padding must be >= 0 and at most half the kernel_size, got {p} for {k}")
    h, w = x.shape[2:]
    if h + 2 * p[0] < k[0] or w + 2 * p[1] < k[1]:
        raise ValueError(f"max_pool2d: input {h}×{w} with padding {p} is smaller than the {k[0]}×{k[1]} window")
    return k, s, p, ((h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1)


def _reference(x, kernel_size, stride, padding):
    pool_geometry(x, kernel_size, stride, padding)
    return reference.max_pool2d(x, kernel_size, stride, padding)


def _fake(x, kernel_size, stride, padding):
    size = pool_geometry(x, kernel_size, stride, padding)[3]
    return x.new_empty((x.shape[0], x.shape[1], *size))


_max_pool2d = define("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor", "pool",
                     cpp=True, reference=_reference, fake=_fake)
check_cpp("pool")


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor mode, no indices; stride
    defaults to kernel_size) by ``torch.ops.sparsekern.max_pool2d``: ``x [N, C, H, W]`` → ``[N, C, H',
    W']``. Arguments checked first (:func:`pool_geometry`)."""
    k, s, p, _ = pool_geometry(x, kernel_size, kernel_size if stride is None else stride, padding)
    return _max_pool2d(x, list(k), list(s), list(p))
