"""spmm family: sparse weight × dense activations for inference (fp32).

The weight format is CSR over output rows, built once (:func:`csr_from_dense`):
``rowptr`` int64 ``[out + 1]``, ``col`` int32 ``[nnz]`` (input feature), ``val`` fp32 ``[nnz]``.
One raw op, ``torch.ops.sparsekern.csr_mm(rowptr, col, val, bias, x, out_features,
transpose_out)``, computes ``W·x + bias`` for ``x [in, n]``: the ``n`` columns (batch or
pixels) are the kernel's vector dimension. ``transpose_out`` returns ``[n, out]`` (Linear
layout) instead of ``[out, n]`` (1×1 conv layout). Kernels: C++ on CPU
(``csrc/cpu/spmm.cpp``), else the reference (``sparsekern.reference.csr_mm``).
No autograd: these are inference ops.
"""
from types import SimpleNamespace

import torch

from .. import _ext, reference
from ._common import define_op, register_c_fakes

#: The kernel contract implemented by ``sparsekern.reference`` (no C++ library, or not CPU).
REFERENCE_KERNELS = SimpleNamespace(csr_mm=reference.csr_mm)


def _k(x):
    return torch.ops.sparsekern_C if x.device.type == "cpu" and _ext.LOADED else REFERENCE_KERNELS


def _fake_csr_mm(rowptr, col, val, bias, x, out_features, transpose_out):
    n = x.shape[1]
    return x.new_empty((n, out_features) if transpose_out else (out_features, n))


register_c_fakes({"csr_mm": _fake_csr_mm})


@define_op("csr_mm")
def _csr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
            x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    return _k(x).csr_mm(rowptr, col, val, bias, x.contiguous(), out_features, transpose_out)


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
