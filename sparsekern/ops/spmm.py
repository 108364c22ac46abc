"""spmm family: sparse weight × dense activations for inference (fp32).

The weight format is CSR over output rows, built once (:func:`csr_from_dense`):
``rowptr`` int64 ``[out + 1]``, ``col`` int32 ``[nnz]`` (input feature), ``val`` fp32 ``[nnz]``.
One raw op, ``torch.ops.sparsekern.csr_mm(rowptr, col, val, bias, x, out_features,
transpose_out)``, computes ``W·x + bias`` for ``x [in, n]``: the ``n`` columns (batch or
pixels) are the kernel's vector dimension. ``transpose_out`` returns ``[n, out]`` (Linear
layout) instead of ``[out, n]`` (1×1 conv layout). ``torch.ops.sparsekern.csr_conv(rowptr, off,
val, bias, x, n, out_features, slab, wp, wv)`` reads each nonzero's run ``x[off : off + n]`` of a
flat input instead and keeps the first ``wv`` of every ``wp`` outputs: ``[out, n / wp, wv]``
(direct KxK convolution, :func:`csr_conv2d`).

More formats, same ``x`` / ``y`` layouts:

* block CSR (:func:`bsr_from_dense`): ``bsr_mm(rowptr, col, val, bias, x, out_features,
  transpose_out)`` with ``val [nnzb, bo, bi]`` (edge blocks zero-padded), ``col`` int32 block
  columns, ``rowptr`` int64 ``[⌈out/bo⌉+1]``;
* N:M compressed along ``in`` (:func:`nm_from_dense`): ``nm_mm(val, idx, bias, x, n, m,
  out_features, transpose_out)`` with ``val [out, in·n/m]``, ``idx`` uint8 (position in group
  ``j // n``);
* CK kernel skipping (:func:`ck_from_dense`): ``ck_conv(rowptr, chan, val, taps, bias, x, n,
  out_features, plane, slab, wp, wv)``, the alive ``R×S`` kernels of each output channel with
  their dense taps (:func:`ck_conv2d`).

Kernels: C++ on CPU (``csrc/cpu/spmm.cpp``), Triton on CUDA (``sparsekern/triton/spmm.py``),
else the reference (``sparsekern.reference``).
No autograd: these are inference ops. ``val``, ``x`` and a non-empty ``bias`` have one dtype
(:func:`check_dtypes`: a TypeError naming them otherwise, on every backend).
:func:`csr_mm`, :func:`csr_conv`, :func:`bsr_mm`, :func:`nm_mm` and :func:`ck_conv` call them:
in eager mode on CPU straight into the C++ op (``torch.ops.sparsekern_C``, skipping the
registered op's Python dispatch: ~10-30 us a call); under torch.compile, on CUDA or meta, or for
an ``x`` that requires grad, the registered ``torch.ops.sparsekern.*`` op.
"""
import threading
from types import SimpleNamespace
from typing import List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from ._common import FLOAT_DTYPES, KernelFamily, define_op

#: The kernel contract implemented by ``sparsekern.reference`` (no C++ library, or not CPU).
REFERENCE_KERNELS = SimpleNamespace(csr_mm=reference.csr_mm, csr_conv=reference.csr_conv,
                                    bsr_mm=reference.bsr_mm, nm_mm=reference.nm_mm,
                                    ck_conv=reference.ck_conv)


def _fake_csr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    n = x.shape[1]
    return x.new_empty((n, out_features) if transpose_out else (out_features, n))


def _fake_nm_mm(val, idx, bias, x, n, m, out_features, transpose_out):
    return _fake_csr_mm(None, None, val, bias, x, out_features, transpose_out)


KERNELS = KernelFamily("spmm", REFERENCE_KERNELS, {
    "csr_mm": _fake_csr_mm,
    "csr_conv": lambda rowptr, off, val, bias, x, n, out_features, slab, wp, wv: x.new_empty((out_features, n // wp, wv)),
    "bsr_mm": _fake_csr_mm,
    "nm_mm": _fake_nm_mm,
    "ck_conv": lambda rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv:
        x.new_empty((out_features, n // wp, wv)),
})


def _k(x):
    return KERNELS(x.device)


def check_dtypes(op, val, bias, x):
    """TypeError unless ``val``, ``x`` and a non-empty ``bias`` have one float dtype (the kernels
    take one: fp32 everywhere, fp16/bf16 too on CUDA; a mix fails obscurely in Triton or C++)."""
    if val.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: val must be float32, float16 or bfloat16, got {val.dtype}")
    if x.dtype != val.dtype:
        raise TypeError(f"{op}: x is {x.dtype} but val is {val.dtype}; they must have the same dtype")
    if bias.numel() and bias.dtype != val.dtype:
        raise TypeError(f"{op}: bias is {bias.dtype} but val is {val.dtype}; they must have the same "
                        "dtype (or bias empty)")


@define_op("csr_mm")
def _csr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
            x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    check_dtypes("csr_mm", val, bias, x)
    return _k(x).csr_mm(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


@define_op("csr_conv")
def _csr_conv(rowptr: torch.Tensor, off: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
              x: torch.Tensor, n: int, out_features: int, slab: int, wp: int, wv: int) -> torch.Tensor:
    check_dtypes("csr_conv", val, bias, x)
    return _k(x).csr_conv(rowptr, off, val, bias, x.contiguous(), n, out_features, slab, wp, wv)


@define_op("bsr_mm")
def _bsr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
            x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    check_dtypes("bsr_mm", val, bias, x)
    return _k(x).bsr_mm(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


@define_op("nm_mm")
def _nm_mm(val: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, n: int, m: int,
           out_features: int, transpose_out: bool) -> torch.Tensor:
    check_dtypes("nm_mm", val, bias, x)
    return _k(x).nm_mm(val, idx, bias, x.contiguous(), n, m, out_features, transpose_out)


@define_op("ck_conv")
def _ck_conv(rowptr: torch.Tensor, chan: torch.Tensor, val: torch.Tensor, taps: torch.Tensor,
             bias: torch.Tensor, x: torch.Tensor, n: int, out_features: int, plane: int, slab: int,
             wp: int, wv: int) -> torch.Tensor:
    check_dtypes("ck_conv", val, bias, x)
    return _k(x).ck_conv(rowptr, chan, val, taps, bias, x.contiguous(), n, out_features, plane, slab, wp, wv)


def _op(name, registered, val, bias, x):
    """The kernel ``name`` of ``_k(x)`` itself in eager mode on CPU (the C++ op, or the reference
    without it), after the registered op's :func:`check_dtypes`; else the registered op
    (torch.compile, meta tensors, CUDA, and an ``x`` that requires grad: the registered op's
    backward raises "no autograd formula" instead of the C++ op's silent no-gradient)."""
    if x.is_cpu and not x.requires_grad and not torch.compiler.is_compiling():
        check_dtypes(name, val, bias, x)
        return getattr(_k(x), name)
    return registered


def csr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    """``torch.ops.sparsekern.csr_mm`` (C++ directly in eager CPU mode)."""
    op = _op("csr_mm", _csr_mm, val, bias, x)
    return op(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


def csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv):
    """``torch.ops.sparsekern.csr_conv`` (C++ directly in eager CPU mode)."""
    op = _op("csr_conv", _csr_conv, val, bias, x)
    return op(rowptr, off, val, bias, x.contiguous(), n, out_features, slab, wp, wv)


def bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    """``torch.ops.sparsekern.bsr_mm`` (C++ directly in eager CPU mode)."""
    op = _op("bsr_mm", _bsr_mm, val, bias, x)
    return op(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


def nm_mm(val, idx, bias, x, n, m, out_features, transpose_out):
    """``torch.ops.sparsekern.nm_mm`` (C++ directly in eager CPU mode)."""
    op = _op("nm_mm", _nm_mm, val, bias, x)
    return op(val, idx, bias, x.contiguous(), n, m, out_features, transpose_out)


def ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv):
    """``torch.ops.sparsekern.ck_conv`` (C++ directly in eager CPU mode)."""
    op = _op("ck_conv", _ck_conv, val, bias, x)
    return op(rowptr, chan, val, taps, bias, x.contiguous(), n, out_features, plane, slab, wp, wv)


def _check_2d(w, fn):
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D weight tensor, got {getattr(w, 'shape', w)}")
    if w.dtype != torch.float32:
        raise ValueError(f"{fn}: weight must be float32, got {w.dtype}")
    return w.detach()


def _rowptr(counts):
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


def csr_from_dense(w):
    """CSR of a 2-D fp32 weight ``[out, in]``: ``(rowptr int64 [out+1], col int32 [nnz],
    val fp32 [nnz])``, exact zeros dropped, columns ascending within a row."""
    w = _check_2d(w, "csr_from_dense")
    nz = w.nonzero()  # row-major: columns ascend within a row
    rowptr = _rowptr(torch.bincount(nz[:, 0], minlength=w.shape[0]))
    return rowptr, nz[:, 1].to(torch.int32).contiguous(), w[nz[:, 0], nz[:, 1]].contiguous()


def _blocks(w, block):
    """``w [out, in]`` zero-padded to whole blocks: ``[⌈out/bo⌉, ⌈in/bi⌉, bo, bi]``."""
    (bo, bi), (o, i) = block, w.shape
    w = torch.nn.functional.pad(w, (0, -i % bi, 0, -o % bo))
    return w.reshape(w.shape[0] // bo, bo, w.shape[1] // bi, bi).transpose(1, 2)


def bsr_from_dense(w, block):
    """Block CSR of a 2-D fp32 weight ``[out, in]`` with ``block = (bo, bi)``: ``(rowptr int64
    [⌈out/bo⌉+1], col int32 [nnzb], val fp32 [nnzb, bo, bi])``; blocks with any nonzero are
    stored whole (edge blocks zero-padded), block columns ascending within a block row."""
    w = _check_2d(w, "bsr_from_dense")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"bsr_from_dense: block must be two positive ints, got {block}")
    b = _blocks(w, tuple(int(v) for v in block))
    nz = (b != 0).any(-1).any(-1).nonzero()
    rowptr = _rowptr(torch.bincount(nz[:, 0], minlength=b.shape[0]))
    return rowptr, nz[:, 1].to(torch.int32).contiguous(), b[nz[:, 0], nz[:, 1]].contiguous()


def block_fill(w, block):
    """Fraction of the stored values of :func:`bsr_from_dense` that are nonzero (1 when empty)."""
    b = _blocks(w.detach(), block)
    nnzb = int((b != 0).any(-1).any(-1).sum())
    return int((w != 0).sum()) / (nnzb * block[0] * block[1]) if nnzb else 1.0


#: N:M ratios tried by :func:`nm_pattern` (m values; n is the weight's largest group count).
NM_GROUPS = (4, 8, 16)


def nm_pattern(w):
    """The ``(n, m)`` with the fewest stored values ``n/m`` (``m`` in :data:`NM_GROUPS`,
    ``n <= m/2``) such that every group of ``m`` consecutive inputs of ``w [out, in]`` holds at
    most ``n`` nonzeros; None if there is none (not N:M)."""
    best = None
    for m in NM_GROUPS:
        if w.dim() != 2 or w.shape[1] % m or w.numel() == 0:
            continue
        n = max(1, int((w.detach() != 0).reshape(w.shape[0], -1, m).sum(-1).max()))
        if 2 * n <= m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def nm_from_dense(w, n, m):
    """N:M compression of a 2-D fp32 weight ``[out, in]`` (``in % m == 0``, at most ``n``
    nonzeros in every group of ``m`` consecutive inputs): ``(val fp32 [out, in·n/m], idx uint8
    [out, in·n/m])``, positions ascending within a group; groups with fewer than ``n`` nonzeros
    are filled with zeros at unused positions. ValueError if ``w`` is not N:M."""
    w = _check_2d(w, "nm_from_dense")
    if not (1 <= n <= m <= 256) or w.shape[1] % m:
        raise ValueError(f"nm_from_dense: need 1 <= n <= m <= 256 and in_features ({w.shape[1]}) "
                         f"a multiple of m; got n={n}, m={m}")
    g = w.reshape(w.shape[0], -1, m)
    zero = (g == 0).to(torch.int8)
    if g.numel() and int((1 - zero).sum(-1).max()) > n:
        raise ValueError(f"nm_from_dense: the weight is not {n}:{m} (a group of {m} inputs has more "
                         f"than {n} nonzeros)")
    pos = zero.argsort(dim=-1, stable=True)[..., :n].sort(-1).values  # nonzeros first, then zeros
    val = g.gather(-1, pos).reshape(w.shape[0], -1).contiguous()
    return val, pos.reshape(w.shape[0], -1).to(torch.uint8).contiguous()


def ck_from_dense(w):
    """Kernel-skipping (CK) form of a conv weight ``[out, C, R, S]`` (fp32): ``(rowptr int64
    [out+1], chan int32 [nk], val fp32 [nk, R·S])``: per output channel its alive kernels (any
    nonzero tap), input channels ascending, with their dense taps."""
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.dtype != torch.float32:
        raise ValueError(f"ck_from_dense: expected a float32 [out, C, R, S] weight, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    k = w.detach().reshape(w.shape[0], w.shape[1], -1)
    nz = (k != 0).any(-1).nonzero()
    rowptr = _rowptr(torch.bincount(nz[:, 0], minlength=w.shape[0]))
    return rowptr, nz[:, 1].to(torch.int32).contiguous(), k[nz[:, 0], nz[:, 1]].contiguous()


def sparse_linear(x, mm, out_features):
    """``x·Wᵀ + b`` (``F.linear``) given ``mm(xt [in, n], transpose_out) -> W·xt + b`` (one of
    the raw ops with its weight bound): ``x [..., in]`` → ``[..., out]``. Batch > 1 transposes
    ``x`` once to ``[in, B]``."""
    in_features = x.shape[-1]
    if x.numel() == in_features and in_features:  # batch 1: a column already
        return mm(x.reshape(in_features, 1), True).view(*x.shape[:-1], out_features)
    return mm(x.reshape(-1, in_features).t().contiguous(), True).view(*x.shape[:-1], out_features)


#: Input bytes one batched conv call reads (direct KxK and 1×1): a group's input is still in L2
#: (from its copy) when the kernel reads it. Whole batches of 256 16×16×64 images in one call
#: (21 MB) ran 1.5× slower than groups of 16 (AMD EPYC, bench/results/spmm-formats-amd-epyc.md).
CONV_GROUP_BYTES = 1 << 20


def conv_group(n_img, image_bytes):
    """Images per kernel call of :func:`sparse_conv1x1`, :func:`csr_conv2d` and :func:`ck_conv2d`
    for a batch of ``n_img`` images of ``image_bytes`` input bytes each (zero-padded phases for a
    KxK conv): as many as fit :data:`CONV_GROUP_BYTES` (at least one), as equal groups."""
    calls = -(-n_img // max(1, CONV_GROUP_BYTES // max(1, image_bytes)))
    return -(-n_img // calls) if n_img else 1


def sparse_conv1x1(x, mm, out_features, stride=1):
    """1×1 convolution (padding 0, groups 1) given ``mm`` as in :func:`sparse_linear`:
    ``x [N, in, H, W]`` → ``[N, out, H', W']``: one call ``W·[x[i] … x[i+g-1]]`` per group of
    ``g`` images (:func:`conv_group`: as many as fit :data:`CONV_GROUP_BYTES`, so the input a
    call reads stays in cache), their ``g·H'·W'`` pixels side by side."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    n, c, h, w = x.shape
    if n <= 1:
        return mm(x.reshape(c, n * h * w), False).view(n, out_features, h, w)
    g = conv_group(n, c * h * w * x.element_size())
    out = x.new_empty(n, out_features, h, w)
    for i in range(0, n, g):
        xi = x[i:i + g]
        y = mm(xi.transpose(0, 1).reshape(c, xi.shape[0] * h * w), False)
        out[i:i + g] = y.view(out_features, xi.shape[0], h, w).transpose(0, 1)
    return out


def _bias(bias, val):
    return bias if bias is not None else val.new_empty(0)


def csr_linear(x, rowptr, col, val, bias, out_features):
    """:func:`sparse_linear` with a CSR weight; bias ``[out]`` fp32 or None."""
    b = _bias(bias, val)
    return sparse_linear(x, lambda xt, tr: csr_mm(rowptr, col, val, b, xt, out_features, tr), out_features)


def csr_conv1x1(x, rowptr, col, val, bias, out_features, stride=1):
    """:func:`sparse_conv1x1` with a CSR weight ``[out, in]``."""
    b = _bias(bias, val)
    return sparse_conv1x1(x, lambda xs, tr: csr_mm(rowptr, col, val, b, xs, out_features, tr),
                          out_features, stride)


#: Input channels per reduction slab of ``csr_conv`` (their rows of a column tile stay in L1).
SLAB_CHANNELS = 32


def conv_geometry(h, w, kernel_size, stride, padding, dilation):
    """The direct convolution's layout for an ``h×w`` input: ``(hq, wq, h_out, w_out)``. The
    zero-padded image ``[C, Hp, Wp]`` is stored as stride phases ``[C, sh, sw, hq, wq]``
    (phase ``(a, b)`` holds padded pixels ``(a + sh·i, b + sw·j)``; ``hq = ⌈Hp/sh⌉``), so a
    strided convolution is a stride-1 one over the phases; outputs are wide rows of ``wq``."""
    (r_, s_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    h_out, w_out = (hp - dh * (r_ - 1) - 1) // sh + 1, (wp - dw * (s_ - 1) - 1) // sw + 1
    if hp - dh * (r_ - 1) <= 0 or wp - dw * (s_ - 1) <= 0:
        raise ValueError(f"conv2d: input {h}×{w} (padded {hp}×{wp}) is smaller than the dilated kernel")
    return -(-hp // sh), -(-wp // sw), h_out, w_out


def conv_taps(kernel_size, stride, dilation, hq, wq):
    """Offsets (int32 ``[R·S]``) of a kernel's taps within one channel's phases
    ``[sh, sw, hq, wq]`` (:func:`conv_geometry`): tap ``(r, s)`` reads phase
    ``(r·dil_h mod sh, s·dil_w mod sw)`` shifted by ``(r·dil_h div sh, s·dil_w div sw)`` (the CK
    format's ``taps``; stride 1: ``r·dil_h·wq + s·dil_w``)."""
    (sh, sw), (dh, dw) = stride, dilation
    r = torch.arange(kernel_size[0])[:, None] * dh
    s = torch.arange(kernel_size[1])[None, :] * dw
    off = ((r % sh) * sw + s % sw) * (hq * wq) + (r // sh) * wq + s // sw
    return off.reshape(-1).to(torch.int32)


def conv_offsets(col, kernel_size, stride, dilation, channels, hq, wq):
    """Flat input offsets (int32 ``[nnz]``) of the nonzeros of a CSR conv weight ``[out, C·R·S]``
    in the phase layout ``[C, sh, sw, hq, wq]`` of :func:`conv_geometry`: ``c·plane + taps[r·S + s]``."""
    plane = stride[0] * stride[1] * hq * wq
    if channels * plane >= 2 ** 31:
        raise ValueError(f"conv2d: an input of {channels} channels of {hq}×{wq} pixels per phase is "
                         "too large for int32 offsets")
    col = col.long()
    rs = kernel_size[0] * kernel_size[1]
    taps = conv_taps(kernel_size, stride, dilation, hq, wq).long()
    return ((col // rs) * plane + taps[col % rs]).to(torch.int32)


def _phase_copies(x, scratch, geometry, stride, padding):
    """``(destination, source)`` view pairs that copy a batch ``x [N, C, H, W]`` into the
    phases of ``scratch`` ``[C, sh, sw, N·hq, wq]`` (:func:`conv_geometry`, images stacked in
    each phase); the rest of ``scratch`` stays zero."""
    hq, wq = geometry[:2]
    (sh, sw), (ph, pw) = stride, padding
    n_img, c, h, w = x.shape
    ph6 = scratch[:c * sh * sw * n_img * hq * wq].view(c, sh, sw, n_img, hq, wq)

    def span(a, step, pad, size):  # first phase index, count, first source index
        i0 = max(0, -(-(pad - a) // step))
        i1 = (pad + size - 1 - a) // step
        return i0, i1 - i0 + 1, a + step * i0 - pad

    pairs = []
    for a in range(sh):
        i0, ni, r0 = span(a, sh, ph, h)
        for b in range(sw):
            j0, nj, c0 = span(b, sw, pw, w)
            if ni > 0 and nj > 0:
                pairs.append((ph6[:, a, b, :, i0:i0 + ni, j0:j0 + nj],
                              x[:, :, r0:r0 + sh * (ni - 1) + 1:sh, c0:c0 + sw * (nj - 1) + 1:sw].transpose(0, 1)))
    return pairs


def _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation, cache):
    """The batch loop of :func:`csr_conv2d` / :func:`ck_conv2d`: groups of ``g`` images
    (:func:`conv_group`) stacked in one zero-padded tall image of stride phases ``[C, sh, sw,
    g·hq, wq]`` (image ``i`` holds phase rows ``i·hq ..``), each group one kernel call
    ``run(buf, idx, g·hq, n, wq, w_out) -> [out, n / wq, w_out]`` over ``n = ((g-1)·hq + h_out)·wq``
    wide pixels (the ``hq - h_out`` rows between two images' outputs are computed and dropped).
    ``cache`` maps ``g`` to ``(idx, buf)``: ``idx = index(g·hq, wq)`` (offsets or taps) and the
    buffer, whose padding stays zero."""
    n_img, c, h, w = x.shape
    (sh, sw), size_of = stride, x.element_size()
    hq, wq, h_out, w_out = conv_geometry(h, w, kernel_size, stride, padding, dilation)
    if n_img == 0:
        return x.new_empty(0, out_features, h_out, w_out)
    g = conv_group(n_img, c * sh * sw * hq * wq * size_of)
    out = None if g >= n_img else x.new_empty(n_img, out_features, h_out, w_out)  # None: one call
    for i in range(0, n_img, g):
        xi = x[i:i + g]
        gi = xi.shape[0]
        if gi not in cache:  # slack: the last wide row reads past the image
            buf = x.new_zeros(c * sh * sw * gi * hq * wq + (dilation[1] * (kernel_size[1] - 1)) // sw)
            cache[gi] = (index(gi * hq, wq), buf)
        idx, buf = cache[gi]
        for dst, src in _phase_copies(xi, buf, (hq, wq), stride, padding):
            dst.copy_(src)
        y = run(buf, idx, gi * hq, ((gi - 1) * hq + h_out) * wq, wq, w_out)  # [out, rows, w_out]
        y = y.unfold(1, h_out, hq).permute(1, 0, 3, 2)  # [gi, out, h_out, w_out]: image j at rows j·hq..
        if out is None:
            return y.contiguous()
        out[i:i + gi] = y
    return out


def csr_conv2d(x, rowptr, col, val, bias, out_features, kernel_size, stride, padding, dilation, cache=None):
    """KxK convolution (groups 1, zero padding) with a CSR weight ``[out, C·R·S]``:
    ``x [N, C, H, W]`` → ``[N, out, H', W']`` (``F.conv2d`` shapes). Groups of images are
    copied into a zero-padded buffer of stride phases (:func:`conv_geometry`, images stacked as in
    :func:`_direct_conv2d`) and convolved directly, one ``csr_conv`` call per group, at stride 1
    over the phases, in wide rows: only the strided outputs are computed. ``cache``: a dict kept
    by the caller for this input's ``(C, H, W)`` (and thread): the :func:`conv_offsets` and
    buffers per group size, reused by later calls."""
    b = _bias(bias, val)

    def index(hq, wq):
        return conv_offsets(col, kernel_size, stride, dilation, x.shape[1], hq, wq)

    def run(buf, offsets, hq, n, wq, w_out):
        slab = SLAB_CHANNELS * stride[0] * stride[1] * hq * wq
        return csr_conv(rowptr, offsets, val, b, buf, n, out_features, slab, wq, w_out)

    return _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation,
                          {} if cache is None else cache)


def ck_conv2d(x, rowptr, chan, val, bias, out_features, kernel_size, stride, padding, dilation, cache=None):
    """:func:`csr_conv2d` with a CK weight (:func:`ck_from_dense`): ``x [N, C, H, W]`` →
    ``[N, out, H', W']``; ``cache`` holds :func:`conv_taps` and buffers per group size."""
    b = _bias(bias, val)

    def index(hq, wq):
        if x.shape[1] * stride[0] * stride[1] * hq * wq >= 2 ** 31:
            raise ValueError(f"ck_conv2d: input {tuple(x.shape)} is too large for int32 offsets")
        return conv_taps(kernel_size, stride, dilation, hq, wq)

    def run(buf, taps, hq, n, wq, w_out):
        plane = stride[0] * stride[1] * hq * wq
        return ck_conv(rowptr, chan, val, taps, b, buf, n, out_features, plane, SLAB_CHANNELS, wq, w_out)

    return _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation,
                          {} if cache is None else cache)


# --- the inference modules' KxK convolution --------------------------------------------------------

_DIRECT_CACHES = WeakIdKeyDictionary()  # a weight's val -> {(thread, dtype, device, C, H, W): cache}


def direct_conv_cache(val, x):
    """The :func:`csr_conv2d` / :func:`ck_conv2d` cache of the weight whose values are ``val``
    for inputs shaped like ``x``, per thread (each call writes its buffers). It lives as long as
    ``val``: a new weight tensor (``.to()``, ``load_state_dict``) starts empty."""
    per = _DIRECT_CACHES.get(val)
    if per is None:
        per = _DIRECT_CACHES[val] = {}
    return per.setdefault((threading.get_ident(), x.dtype, x.device) + tuple(x.shape[1:]), {})


_CONV2D = {"csr": csr_conv2d, "ck": ck_conv2d}


def _fake_conv2d(x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation):
    h_out, w_out = conv_geometry(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)[2:]
    return x.new_empty(x.shape[0], out_features, h_out, w_out)


def _conv2d_op(fmt):
    def impl(x: torch.Tensor, rowptr: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
             bias: Optional[torch.Tensor], out_features: int, kernel_size: List[int], stride: List[int],
             padding: List[int], dilation: List[int]) -> torch.Tensor:
        geometry = tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
        return _CONV2D[fmt](x, rowptr, idx, val, bias, out_features, *geometry, direct_conv_cache(val, x))

    op = torch.library.custom_op(f"sparsekern::{fmt}_conv2d", impl, mutates_args=())
    op.register_fake(_fake_conv2d)
    return op


_CONV2D_OPS = {fmt: _conv2d_op(fmt) for fmt in _CONV2D}


def conv2d(fmt, x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation):
    """The KxK convolution of the inference modules, weight in format ``fmt``: ``"csr"``
    (:func:`csr_conv2d`, ``idx = col``) or ``"ck"`` (:func:`ck_conv2d`, ``idx = chan``), with the
    weight's :func:`direct_conv_cache`. Under torch.compile / export: the op
    ``sparsekern::<fmt>_conv2d``, opaque to the compiler (the caches stay in its implementation;
    its fake kernel gives the output shape)."""
    if torch.compiler.is_compiling():
        return _CONV2D_OPS[fmt](x, rowptr, idx, val, bias, out_features, list(kernel_size), list(stride),
                                list(padding), list(dilation))
    return _CONV2D[fmt](x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation,
                        direct_conv_cache(val, x))
