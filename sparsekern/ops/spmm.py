"""spmm family: sparse weight × dense activations for inference (fp32).

The weight format is CSR over output rows, built once (:func:`csr_from_dense`):
``rowptr`` int64 ``[out + 1]``, ``col`` int32 ``[nnz]`` (input feature), ``val`` fp32 ``[nnz]``.
One raw op, ``torch.ops.sparsekern.csr_mm(rowptr, col, val, bias, x, out_features,
transpose_out)``, computes ``W·x + bias`` for ``x [in, n]``: the ``n`` columns (batch or
pixels) are the kernel's vector dimension. ``transpose_out`` returns ``[n, out]`` (Linear
layout) instead of ``[out, n]`` (1×1 conv layout). ``torch.ops.sparsekern.csr_conv(rowptr, off,
val, bias, x, n, out_features, slab, wp, wv)`` reads each nonzero's run ``x[off : off + n]`` of a
flat input instead and keeps the first ``wv`` of every ``wp`` outputs: ``[out, n / wp, wv]``
(direct KxK convolution, :func:`csr_conv2d`). Kernels: C++ on CPU
(``csrc/cpu/spmm.cpp``), else the reference (``sparsekern.reference.csr_mm``).
No autograd: these are inference ops.
"""
from types import SimpleNamespace

import torch

from .. import reference
from ._common import KernelFamily, define_op

#: The kernel contract implemented by ``sparsekern.reference`` (no C++ library, or not CPU).
REFERENCE_KERNELS = SimpleNamespace(csr_mm=reference.csr_mm, csr_conv=reference.csr_conv)


def _fake_csr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    n = x.shape[1]
    return x.new_empty((n, out_features) if transpose_out else (out_features, n))


KERNELS = KernelFamily("spmm", REFERENCE_KERNELS, {
    "csr_mm": _fake_csr_mm,
    "csr_conv": lambda rowptr, off, val, bias, x, n, out_features, slab, wp, wv: x.new_empty((out_features, n // wp, wv)),
}, has_triton=False)


def _k(x):
    return KERNELS(x.device)


@define_op("csr_mm")
def _csr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
            x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    return _k(x).csr_mm(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


@define_op("csr_conv")
def _csr_conv(rowptr: torch.Tensor, off: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
              x: torch.Tensor, n: int, out_features: int, slab: int, wp: int, wv: int) -> torch.Tensor:
    return _k(x).csr_conv(rowptr, off, val, bias, x.contiguous(), n, out_features, slab, wp, wv)


def csr_from_dense(w):
    """CSR of a 2-D fp32 weight ``[out, in]``: ``(rowptr int64 [out+1], col int32 [nnz],
    val fp32 [nnz])``, exact zeros dropped, columns ascending within a row."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"csr_from_dense: expected a 2-D weight tensor, got {getattr(w, 'shape', w)}")
    if w.dtype != torch.float32:
        raise ValueError(f"csr_from_dense: weight must be float32, got {w.dtype}")
    w = w.detach()
    nz = w.nonzero()  # row-major: columns ascend within a row
    counts = torch.bincount(nz[:, 0], minlength=w.shape[0])
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return rowptr.to(torch.int64), nz[:, 1].to(torch.int32).contiguous(), w[nz[:, 0], nz[:, 1]].contiguous()


def csr_linear(x, rowptr, col, val, bias, out_features):
    """``x·Wᵀ + bias`` (``F.linear``) for a CSR weight: ``x [..., in]`` → ``[..., out]``.

    bias: ``[out]`` fp32 or None. Batch > 1 transposes ``x`` once to ``[in, B]``.
    """
    in_features = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    xt = x2.reshape(in_features, 1) if x2.shape[0] == 1 else x2.t().contiguous()
    b = bias if bias is not None else val.new_empty(0)
    return _csr_mm(rowptr, col, val, b, xt, out_features, True).reshape(*lead, out_features)


def csr_conv1x1(x, rowptr, col, val, bias, out_features, stride=1):
    """1×1 convolution (padding 0, groups 1) with a CSR weight ``[out, in]``:
    ``x [N, in, H, W]`` → ``[N, out, H', W']``; each image is ``W·x[n]`` over ``H'·W'`` pixels."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    n, c, h, w = x.shape
    xs = x.contiguous().reshape(n, c, h * w)
    b = bias if bias is not None else val.new_empty(0)
    ys = [_csr_mm(rowptr, col, val, b, xs[i], out_features, False) for i in range(n)]
    if not ys:
        return x.new_empty((0, out_features, h, w))
    return torch.stack(ys).reshape(n, out_features, h, w)


#: Input channels per reduction slab of ``csr_conv`` (their rows of a column tile stay in L1).
SLAB_CHANNELS = 32


def conv_offsets(col, kernel_size, dilation, hp, wp):
    """Flat input offsets (int32 ``[nnz]``) of the nonzeros of a CSR conv weight ``[out, C·R·S]``
    in a zero-padded image ``[C, hp, wp]``: ``c·hp·wp + r·dil_h·wp + s·dil_w``."""
    r_, s_ = kernel_size
    col = col.long()
    c, r, s = col // (r_ * s_), (col // s_) % r_, col % s_
    off = c * (hp * wp) + r * (dilation[0] * wp) + s * dilation[1]
    if off.numel() and int(off.max()) + hp * wp >= 2 ** 31:
        raise ValueError(f"csr_conv2d: input of {hp}×{wp} pixels per channel is too large for int32 offsets")
    return off.to(torch.int32)


def csr_conv2d(x, rowptr, col, val, bias, out_features, kernel_size, stride, padding, dilation,
               offsets=None, scratch=None):
    """KxK convolution (groups 1, zero padding) with a CSR weight ``[out, C·R·S]``:
    ``x [N, C, H, W]`` → ``[N, out, H', W']`` (``F.conv2d`` shapes). Each image is copied into a
    zero-padded flat buffer and convolved directly at stride 1 in wide rows (see ``csr_conv``);
    stride > 1 subsamples that result. ``offsets``: :func:`conv_offsets` for this input size
    (computed when None); ``scratch``: a reusable buffer from an earlier call with this input
    size (its padding is still zero), else a new one is made. Returns ``(y, scratch)``."""
    (r_, s_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n_img, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    h1, w1 = hp - dh * (r_ - 1), wp - dw * (s_ - 1)  # stride-1 output size
    if h1 <= 0 or w1 <= 0:
        raise ValueError(f"csr_conv2d: input {tuple(x.shape)} is smaller than the dilated kernel")
    if offsets is None:
        offsets = conv_offsets(col, kernel_size, dilation, hp, wp)
    plane = c * hp * wp
    if scratch is None:  # slack: the last wide row reads past the image
        scratch = x.new_zeros(plane + dw * (s_ - 1))
    inner = scratch[:plane].view(c, hp, wp)[:, ph:ph + h, pw:pw + w]
    b = bias if bias is not None else val.new_empty(0)
    ys = []
    for i in range(n_img):
        inner.copy_(x[i])
        y = _csr_conv(rowptr, offsets, val, b, scratch, h1 * wp, out_features, SLAB_CHANNELS * hp * wp, wp, w1)
        ys.append(y if (sh, sw) == (1, 1) else y[:, ::sh, ::sw])
    out = torch.stack(ys) if ys else x.new_empty(0, out_features, (h1 - 1) // sh + 1, (w1 - 1) // sw + 1)
    return out, scratch
