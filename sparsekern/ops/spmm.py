"""spmm family: sparse weight × dense activations for inference (no autograd).

Five raw ops, each ``y = W·x + bias`` for a sparse weight in one format (the formats and their
builders: ``sparsekern.inference.formats``; the layers built on these ops:
``sparsekern.inference.functional``):

* ``torch.ops.sparsekern.csr_mm(rowptr, col, val, bias, x, out_features, transpose_out)``: CSR
  over output rows (``rowptr`` int64 ``[out + 1]``, ``col`` int32 ``[nnz]``, ``val [nnz]``) times
  ``x [in, n]``: the ``n`` columns (batch or pixels) are the kernel's vector dimension.
  ``transpose_out`` returns ``[n, out]`` (Linear layout) instead of ``[out, n]`` (1×1 conv layout);
  ``relu``: ``max(y, 0)`` in the kernel's final store (the ReLU after a conv / Linear, fused);
  ``residual`` (None or a tensor of the output's shape): ``max(y + residual, 0)`` (a residual
  block's add, then its ReLU, fused);
* ``bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out)``: block CSR, ``val [nnzb, bo,
  bi]``, ``col`` block columns, ``rowptr`` ``[⌈out/bo⌉+1]``;
* ``nm_mm(val, idx, bias, x, n, m, out_features, transpose_out)``: N:M compressed along ``in``,
  ``val [out, in·n/m]``, ``idx`` uint8 (position in group ``j // n``);
* ``csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv)``: each nonzero reads its
  run ``x[off : off + n]`` of a flat input; the first ``wv`` of every ``wp`` outputs are kept:
  ``[out, n / wp, wv]`` (direct KxK convolution); ``relu`` and ``residual`` as ``csr_mm``'s;
* ``ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv)``: the alive
  ``R×S`` kernels of each output channel with their dense taps, as ``csr_conv`` (``relu`` and
  ``residual`` too);
* ``csr_group_conv(rowptr, col, val, bias, x, out_features, groups, kernel_size, stride, padding,
  dilation)``: a grouped (e.g. depthwise) KxK convolution of ``x [N, C, H, W]`` with a CSR weight
  ``[out, (C / groups)·R·S]`` → ``[N, out, H', W']`` (``F.conv2d`` shapes; C++ on CPU, the
  reference elsewhere); ``relu`` as ``csr_mm``'s;
* ``bitmap_mm(rowptr, mask, val, bias, x, out_features)``: a bf16 / fp16 weight as a bit per
  weight plus its packed nonzeros, times ``x [B, in]`` (Linear layout) → ``[B, out]``, fp32
  accumulation (decode; ``csrc/cpu/spmm_bf16.cpp`` on CPU, the reference elsewhere).

Implementations: C++ on CPU (``csrc/cpu/spmm.cpp``), Triton on CUDA (``sparsekern/triton/spmm.py``; not
``csr_group_conv``),
else the reference (``sparsekern.reference``); ``x`` may have any strides.
``val``, ``x`` and a non-empty ``bias`` have one dtype (:func:`check_dtypes`, and its C++ twin: a
TypeError naming them otherwise, on every device). :func:`csr_mm`, :func:`csr_conv`,
:func:`bsr_mm`, :func:`nm_mm`, :func:`ck_conv` and :func:`csr_group_conv` check the dtypes and call the op.
"""
import torch

from .. import reference
from ._common import FLOAT_DTYPES, check_bool, check_cpp, define, triton_module


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


#: Positions of (val, bias, x) in each op's arguments.
ARG_POS = {"csr_mm": (2, 3, 4), "bsr_mm": (2, 3, 4), "nm_mm": (0, 2, 3), "csr_conv": (2, 3, 4),
           "ck_conv": (2, 4, 5), "csr_group_conv": (2, 3, 4)}

_SCHEMAS = {
    "csr_mm": "csr_mm(Tensor rowptr, Tensor col, Tensor val, Tensor bias, Tensor x, SymInt out_features, "
              "bool transpose_out, bool relu=False, Tensor? residual=None) -> Tensor",
    "bsr_mm": "bsr_mm(Tensor rowptr, Tensor col, Tensor val, Tensor bias, Tensor x, SymInt out_features, "
              "bool transpose_out) -> Tensor",
    "nm_mm": "nm_mm(Tensor val, Tensor idx, Tensor bias, Tensor x, SymInt n, SymInt m, SymInt out_features, "
             "bool transpose_out) -> Tensor",
    "csr_conv": "csr_conv(Tensor rowptr, Tensor off, Tensor val, Tensor bias, Tensor x, SymInt n, "
                "SymInt out_features, SymInt slab, SymInt wp, SymInt wv, bool relu=False, Tensor? residual=None) "
                "-> Tensor",
    "ck_conv": "ck_conv(Tensor rowptr, Tensor chan, Tensor val, Tensor taps, Tensor bias, Tensor x, SymInt n, "
               "SymInt out_features, SymInt plane, SymInt slab, SymInt wp, SymInt wv, bool relu=False, "
               "Tensor? residual=None) -> Tensor",
    "csr_group_conv": "csr_group_conv(Tensor rowptr, Tensor col, Tensor val, Tensor bias, Tensor x, "
                      "SymInt out_features, SymInt groups, int[] kernel_size, int[] stride, int[] padding, "
                      "int[] dilation, bool relu=False) -> Tensor",
}

#: The ops with a fused ReLU (an argument ``relu`` after the weight, bias and input's arguments).
RELU_OPS = ("csr_mm", "csr_conv", "ck_conv", "csr_group_conv")
#: The ops with a fused residual add (an argument ``residual`` after ``relu``).
RESIDUAL_OPS = ("csr_mm", "csr_conv", "ck_conv")


def _mm_shape(x, out_features, transpose_out):
    return (x.shape[1], out_features) if transpose_out else (out_features, x.shape[1])


def _group_conv_shape(x, out_features, kernel_size, stride, padding, dilation):
    hw = [(x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1
          for d in range(2)]
    return (x.shape[0], out_features, *hw)


#: Each op's output shape from its arguments.
_SHAPES = {
    "csr_mm": lambda rowptr, col, val, bias, x, out, tr, relu=False, residual=None: _mm_shape(x, out, tr),
    "bsr_mm": lambda rowptr, col, val, bias, x, out, tr: _mm_shape(x, out, tr),
    "nm_mm": lambda val, idx, bias, x, n, m, out, tr: _mm_shape(x, out, tr),
    "csr_conv": lambda rowptr, off, val, bias, x, n, out, slab, wp, wv, relu=False, residual=None:
        (out, n // wp, wv),
    "ck_conv": lambda rowptr, chan, val, taps, bias, x, n, out, plane, slab, wp, wv, relu=False, residual=None:
        (out, n // wp, wv),
    "csr_group_conv": lambda rowptr, col, val, bias, x, out, groups, ks, st, pad, dil, relu=False:
        _group_conv_shape(x, out, ks, st, pad, dil),
}


def check_residual(op, residual, shape, val):
    """ValueError unless ``residual`` is None or a tensor of the output's ``shape``, on ``val``'s
    device, of ``val``'s dtype (the kernel adds it in its store; no broadcasting)."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise ValueError(f"{op}: residual must be a tensor or None, got {type(residual).__name__}")
    if tuple(residual.shape) != tuple(shape) or residual.dtype != val.dtype or residual.device != val.device:
        raise ValueError(f"{op}: residual must be {val.dtype} {list(shape)} on {val.device} (the output's shape), "
                         f"got {residual.dtype} {list(residual.shape)} on {residual.device}")


def _checked(name, kernel):
    """``kernel(*args)`` of op ``name`` after :func:`check_dtypes` (and :func:`check_residual`),
    with a contiguous ``x`` (and residual)."""
    iv, ib, ix = ARG_POS[name]
    ir = _SCHEMAS[name].split("(", 1)[1].count(",")  # residual's position: the last argument

    def impl(*args, **kwargs):  # kwargs: relu, residual, when called as a Python function
        check_dtypes(name, args[iv], args[ib], args[ix])
        args = list(args)
        args[ix] = args[ix].contiguous()
        if name in RESIDUAL_OPS:
            r = args[ir] if len(args) > ir else kwargs.get("residual")
            check_residual(name, r, _SHAPES[name](*args, **kwargs), args[iv])
            if r is not None and len(args) > ir:
                args[ir] = r.contiguous()
            elif r is not None:
                kwargs["residual"] = r.contiguous()
        return kernel(*args, **kwargs)

    return impl


def _triton(name):
    """The CUDA implementation of op ``name``: its Triton launcher (the schema's arguments before
    ``relu``), then the residual added and an in-place ReLU (the Triton kernels have no epilogue)."""
    schema = _SCHEMAS[name].split("(", 1)[1]
    n = schema[:schema.index("bool relu")].count(",") if name in RELU_OPS else None  # arguments before relu

    def launch(*args, relu=False, residual=None):
        if n is not None and len(args) > n:
            args, rest = args[:n], args[n:]
            relu, residual = (tuple(rest) + (residual,))[:2]
        y = getattr(triton_module("spmm"), name)(*args)
        if residual is not None:
            y += residual
        return y.relu_() if relu else y

    return launch


def _define(name, triton=True):
    x_pos = ARG_POS[name][2]
    fake = _checked(name, lambda *args, **kwargs: args[x_pos].new_empty(_SHAPES[name](*args, **kwargs)))
    cuda = _checked(name, _triton(name)) if triton else None
    return define(_SCHEMAS[name], "spmm", cpp=True, fake=fake, reference=_checked(name, getattr(reference, name)),
                  cuda=cuda)


_csr_mm, _bsr_mm, _nm_mm, _csr_conv, _ck_conv = (_define(n) for n in ("csr_mm", "bsr_mm", "nm_mm", "csr_conv",
                                                                     "ck_conv"))
_csr_group_conv = _define("csr_group_conv", triton=False)


# --- bitmap_mm: bf16 / fp16 weights (csrc/cpu/spmm_bf16.cpp; the reference on other devices) -------

def check_bitmap(val, bias, x):
    """TypeError unless ``val`` is bf16 / fp16 and ``x`` and a non-empty ``bias`` have its dtype."""
    if val.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"bitmap_mm: val must be bfloat16 or float16, got {val.dtype}")
    check_dtypes("bitmap_mm", val, bias, x)


def _bitmap_reference(rowptr, mask, val, bias, x, out_features):
    check_bitmap(val, bias, x)
    return reference.bitmap_mm(rowptr, mask, val, bias, x.contiguous(), out_features)


def _bitmap_fake(rowptr, mask, val, bias, x, out_features):
    check_bitmap(val, bias, x)
    return x.new_empty((x.shape[0], out_features))


_bitmap_mm = define("bitmap_mm(Tensor rowptr, Tensor mask, Tensor val, Tensor bias, Tensor x, SymInt out_features) "
                    "-> Tensor", "spmm", cpp=True, fake=_bitmap_fake, reference=_bitmap_reference)
check_cpp("spmm")


def csr_mm(rowptr, col, val, bias, x, out_features, transpose_out, *, relu=False, residual=None):
    """``torch.ops.sparsekern.csr_mm`` after :func:`check_dtypes`; ``max(y + residual, 0)`` fused
    (``relu``; ``residual`` None or the output's shape, :func:`check_residual`)."""
    check_dtypes("csr_mm", val, bias, x)
    return _csr_mm(rowptr, col, val, bias, x, out_features, transpose_out, check_bool(relu, "relu"), residual)


def bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    """``torch.ops.sparsekern.bsr_mm`` after :func:`check_dtypes`."""
    check_dtypes("bsr_mm", val, bias, x)
    return _bsr_mm(rowptr, col, val, bias, x, out_features, transpose_out)


def csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv, *, relu=False, residual=None):
    """``torch.ops.sparsekern.csr_conv`` after :func:`check_dtypes`; ``relu`` / ``residual`` as :func:`csr_mm`'s."""
    check_dtypes("csr_conv", val, bias, x)
    return _csr_conv(rowptr, off, val, bias, x, n, out_features, slab, wp, wv, check_bool(relu, "relu"), residual)


def nm_mm(val, idx, bias, x, n, m, out_features, transpose_out):
    """``torch.ops.sparsekern.nm_mm`` after :func:`check_dtypes`."""
    check_dtypes("nm_mm", val, bias, x)
    return _nm_mm(val, idx, bias, x, n, m, out_features, transpose_out)


def ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv, *, relu=False,
            residual=None):
    """``torch.ops.sparsekern.ck_conv`` after :func:`check_dtypes`; ``relu`` / ``residual`` as :func:`csr_mm`'s."""
    check_dtypes("ck_conv", val, bias, x)
    return _ck_conv(rowptr, chan, val, taps, bias, x, n, out_features, plane, slab, wp, wv,
                    check_bool(relu, "relu"), residual)


def csr_group_conv(rowptr, col, val, bias, x, out_features, groups, kernel_size, stride, padding, dilation, *,
                   relu=False):
    """``torch.ops.sparsekern.csr_group_conv`` after :func:`check_dtypes`; ``relu``: ``max(·, 0)`` fused."""
    check_dtypes("csr_group_conv", val, bias, x)
    return _csr_group_conv(rowptr, col, val, bias, x, out_features, groups, kernel_size, stride, padding, dilation,
                           check_bool(relu, "relu"))


def bitmap_mm(rowptr, mask, val, bias, x, out_features):
    """``torch.ops.sparsekern.bitmap_mm`` after :func:`check_bitmap`: ``x [B, in] · Wᵀ + bias`` →
    ``[B, out]`` for a bitmap bf16/fp16 weight (``inference.formats.bitmap_from_dense``: ``mask``
    uint8 ``[out, G]``, ``val`` the nonzeros + 8 slack, ``rowptr`` int64 ``[out + 1]``), fp32
    accumulation, rounded once to ``x``'s dtype."""
    check_bitmap(val, bias, x)
    return _bitmap_mm(rowptr, mask, val, bias, x, out_features)
