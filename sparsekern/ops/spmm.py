"""spmm family: sparse weight × dense activations for inference (no autograd).

Five raw ops, each ``y = W·x + bias`` for a sparse weight in one format (the formats and their
builders: ``sparsekern.inference.formats``; the layers built on these ops:
``sparsekern.inference.functional``):

* ``torch.ops.sparsekern.csr_mm(rowptr, col, val, bias, x, out_features, transpose_out)``: CSR
  over output rows (``rowptr`` int64 ``[out + 1]``, ``col`` int32 ``[nnz]``, ``val [nnz]``) times
  ``x [in, n]``: the ``n`` columns (batch or pixels) are the kernel's vector dimension.
  ``transpose_out`` returns ``[n, out]`` (Linear layout) instead of ``[out, n]`` (1×1 conv layout);
* ``bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out)``: block CSR, ``val [nnzb, bo,
  bi]``, ``col`` block columns, ``rowptr`` ``[⌈out/bo⌉+1]``;
* ``nm_mm(val, idx, bias, x, n, m, out_features, transpose_out)``: N:M compressed along ``in``,
  ``val [out, in·n/m]``, ``idx`` uint8 (position in group ``j // n``);
* ``csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv)``: each nonzero reads its
  run ``x[off : off + n]`` of a flat input; the first ``wv`` of every ``wp`` outputs are kept:
  ``[out, n / wp, wv]`` (direct KxK convolution);
* ``ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv)``: the alive
  ``R×S`` kernels of each output channel with their dense taps, as ``csr_conv``.

Kernels: C++ on CPU (``csrc/cpu/spmm.cpp``), Triton on CUDA (``sparsekern/triton/spmm.py``),
else the reference (``sparsekern.reference``).
``val``, ``x`` and a non-empty ``bias`` have one dtype (:func:`check_dtypes`: a TypeError naming
them otherwise, on every backend).
:func:`csr_mm`, :func:`csr_conv`, :func:`bsr_mm`, :func:`nm_mm` and :func:`ck_conv` call them:
in eager mode on CPU straight into the C++ op (``torch.ops.sparsekern_C``, skipping the
registered op's Python dispatch: ~10-30 us a call); under torch.compile, on CUDA or meta, or for
an ``x`` that requires grad, the registered ``torch.ops.sparsekern.*`` op.
"""
from types import SimpleNamespace

import torch

from .. import reference
from ._common import FLOAT_DTYPES, KernelFamily, define_op

#: The kernel contract implemented by ``sparsekern.reference`` (no C++ library, or not CPU).
REFERENCE_KERNELS = SimpleNamespace(csr_mm=reference.csr_mm, csr_conv=reference.csr_conv,
                                    bsr_mm=reference.bsr_mm, nm_mm=reference.nm_mm,
                                    ck_conv=reference.ck_conv, bitmap_mm=reference.bitmap_mm)


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
    "bitmap_mm": lambda rowptr, mask, val, bias, x, out_features: x.new_empty((x.shape[0], out_features)),
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


def _mm_op(name):
    """The raw op ``name`` of the CSR / block-CSR signature (``csr_mm``, ``bsr_mm``)."""
    @define_op(name)
    def mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
           x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
        check_dtypes(name, val, bias, x)
        return getattr(_k(x), name)(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)

    return mm


_csr_mm = _mm_op("csr_mm")
_bsr_mm = _mm_op("bsr_mm")


@define_op("csr_conv")
def _csr_conv(rowptr: torch.Tensor, off: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
              x: torch.Tensor, n: int, out_features: int, slab: int, wp: int, wv: int) -> torch.Tensor:
    check_dtypes("csr_conv", val, bias, x)
    return _k(x).csr_conv(rowptr, off, val, bias, x.contiguous(), n, out_features, slab, wp, wv)


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


def bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    """``torch.ops.sparsekern.bsr_mm`` (C++ directly in eager CPU mode)."""
    op = _op("bsr_mm", _bsr_mm, val, bias, x)
    return op(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


def csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv):
    """``torch.ops.sparsekern.csr_conv`` (C++ directly in eager CPU mode)."""
    op = _op("csr_conv", _csr_conv, val, bias, x)
    return op(rowptr, off, val, bias, x.contiguous(), n, out_features, slab, wp, wv)


def nm_mm(val, idx, bias, x, n, m, out_features, transpose_out):
    """``torch.ops.sparsekern.nm_mm`` (C++ directly in eager CPU mode)."""
    op = _op("nm_mm", _nm_mm, val, bias, x)
    return op(val, idx, bias, x.contiguous(), n, m, out_features, transpose_out)


def ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv):
    """``torch.ops.sparsekern.ck_conv`` (C++ directly in eager CPU mode)."""
    op = _op("ck_conv", _ck_conv, val, bias, x)
    return op(rowptr, chan, val, taps, bias, x.contiguous(), n, out_features, plane, slab, wp, wv)


# --- bitmap_mm: bf16 / fp16 weights (csrc/cpu/spmm_bf16.cpp) ---------------------------------------

def _bitmap_kernels(x):
    """The C++ library on CPU / meta, else the reference (no Triton kernel yet)."""
    k = _k(x)
    return k if hasattr(k, "bitmap_mm") else REFERENCE_KERNELS


def _check_bitmap(val, bias, x):
    if val.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"bitmap_mm: val must be bfloat16 or float16, got {val.dtype}")
    check_dtypes("bitmap_mm", val, bias, x)


@define_op("bitmap_mm")
def _bitmap_mm(rowptr: torch.Tensor, mask: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
               x: torch.Tensor, out_features: int) -> torch.Tensor:
    _check_bitmap(val, bias, x)
    return _bitmap_kernels(x).bitmap_mm(rowptr, mask, val, bias, x.contiguous(), out_features)


def bitmap_mm(rowptr, mask, val, bias, x, out_features):
    """``torch.ops.sparsekern.bitmap_mm``: ``x [B, in] · Wᵀ + bias`` → ``[B, out]`` for a bitmap
    bf16/fp16 weight (``inference.formats.bitmap_from_dense``), fp32 accumulation (C++ directly
    in eager CPU mode)."""
    if x.is_cpu and not x.requires_grad and not torch.compiler.is_compiling():
        _check_bitmap(val, bias, x)
        return _bitmap_kernels(x).bitmap_mm(rowptr, mask, val, bias, x.contiguous(), out_features)
    return _bitmap_mm(rowptr, mask, val, bias, x.contiguous(), out_features)
