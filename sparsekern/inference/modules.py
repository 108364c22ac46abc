"""Eval-only inference modules holding a sparse weight (fp32), one class per (format, layer kind).

Formats (``formats.py``; the ops: ``sparsekern.ops.spmm``, through ``functional.py``): ``csr`` (CSR
over output rows), ``block`` (block CSR, ``block=(bo, bi)``), ``nm`` (N:M compressed along
``in``), ``ck`` (kernel skipping, KxK convs).
Layer kinds: ``Linear`` (replaces ``nn.Linear``), ``Conv1x1`` (a 1×1 ``nn.Conv2d``, padding 0,
groups 1, any stride), ``Conv2d`` (any ``nn.Conv2d`` with groups 1 and zero padding: direct
sparse convolution) and ``GroupConv2d`` (grouped / depthwise, zero padding)::

    CSRLinear  BSRLinear  NMLinear      CSRConv1x1  BSRConv1x1  NMConv1x1      CSRConv2d  CKConv2d
    CSRGroupConv2d

CSR, CK, block and N:M modules have a ``relu`` attribute (default False; set by ``fuse.fuse_relu`` /
``fuse.fuse_residual_blocks``): ``True`` applies ``max(y, 0)`` to the layer's output, the ReLU after
the layer fused: in the kernel's store (CSR, CK), or in place on the kernel's fresh output (block,
N:M: their ops have no epilogue; no second tensor, no module call). Like ``stride``, it is a plain
attribute (pickled, in ``extra_repr``), not in the ``state_dict``. They also take ``forward(x,
residual=None)``: ``layer(x) + residual`` before that max (a residual block's add, in the kernel's
store or in place as the ReLU when the residual has the output's shape and, for convs, the batch is
one image; else added after the kernel, broadcast as ``+``).

The weight lives in plain buffers: a module pickles, and its ``state_dict`` loads into any module
of the same class and layer shape (buffers are resized to the stored number of nonzeros/blocks;
the block shape and ``n:m`` come with them).
On CUDA, :class:`SemiStructuredLinear` holds a 2:4 fp16/bf16 weight in torch's semi-structured
format.
"""
import torch
from torch import nn

from ..ops import spmm
from . import formats, functional


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


class _Sparse(nn.Module):
    """A sparse weight ``[out, in]`` (or ``[out, C, R, S]``) as buffers; shared checks, density,
    state_dict resizing. Format mixins give ``_encode`` / ``_mm`` / ``weight_dense``; layer kinds
    give ``forward``."""

    format = None
    taps_per_kernel = 1  # R·S of a KxK conv

    def __init__(self, weight, bias, out_features, in_features, **attrs):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        for k, v in attrs.items():
            setattr(self, k, v)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
            raise ValueError(f"{type(self).__name__}: weight must be a float32 tensor, got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)}")
        for name, t in self._encode(weight.detach()).items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous().clone())
        self.register_buffer("_no_bias", torch.empty(0), persistent=False)  # the kernels' "no bias"

    @property
    def density(self):
        """Fraction of nonzero weights."""
        numel = self.out_features * self.in_features * self.taps_per_kernel
        return int(torch.count_nonzero(self.val)) / max(1, numel)

    def _b(self):
        """The bias, or an empty tensor for none (``_buffers`` read directly: forward is hot)."""
        b = self._buffers
        return b["bias"] if b["bias"] is not None else b["_no_bias"]

    def _check(self, x, channel_dim, ndim=None):
        name = type(self).__name__
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(f"{name} is inference-only: call model.eval() or run under "
                               "torch.no_grad() / torch.inference_mode()")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise ValueError(f"{name}: input must be float32 (the sparse weight is float32), got {x.dtype}")
        val = self._buffers["val"]
        if x.device != val.device:
            raise ValueError(f"{name}: input is on {x.device} but the sparse weight is on {val.device}")
        if ndim is not None and x.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D input, got shape {tuple(x.shape)}")
        if x.dim() == 0 or x.shape[channel_dim] != self.in_features:
            raise ValueError(f"{name}: expected {self.in_features} input features at dim {channel_dim}, "
                             f"got input of shape {tuple(x.shape)}")

    def _residual(self, residual):
        """``residual`` after checking it is a tensor (or None) that supports the epilogue: only the
        modules with a fused ``relu`` (CSR, CK, block, N:M) take one."""
        if residual is None:
            return None
        if not hasattr(self, "relu"):
            raise TypeError(f"{type(self).__name__} takes no residual (only the CSR, CK, block and N:M modules do)")
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}")
        return residual

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self._buffers:  # nnz differs between weights of one layer shape
            t = state_dict.get(prefix + key)
            if key != "bias" and isinstance(t, torch.Tensor):
                self._buffers[key] = torch.empty_like(t, device=self._buffers[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- formats ---------------------------------------------------------------------------------------

class _CSR:
    format = "csr"
    relu = False  # ReLU fused into the kernel's store (module docstring)

    def _encode(self, w):
        rowptr, col, val = formats.csr_from_dense(w.reshape(w.shape[0], -1))
        return {"rowptr": rowptr, "col": col, "val": val}

    def _mm(self, x, transpose_out, relu=False, residual=None):
        b = self._buffers
        return spmm.csr_mm(b["rowptr"], b["col"], b["val"], self._b(), x, self.out_features, transpose_out,
                           relu=relu, residual=residual)

    def weight_dense(self):
        """The dense weight ``[out, in]`` (``[out, C·R·S]`` for a KxK conv), zeros restored."""
        shape = (self.out_features, self.in_features * self.taps_per_kernel)
        return formats.csr_to_dense(self.rowptr, self.col, self.val, shape)


class _BSR:
    format = "block"
    relu = False  # ReLU fused, in place after the kernel (module docstring)

    def _encode(self, w):
        rowptr, col, val = formats.bsr_from_dense(w, self.block)
        return {"rowptr": rowptr, "col": col, "val": val}

    def _mm(self, x, transpose_out, relu=False, residual=None):
        b = self._buffers
        return functional.epilogue_(spmm.bsr_mm(b["rowptr"], b["col"], b["val"], self._b(), x,
                                                self.out_features, transpose_out), relu, residual)

    def weight_dense(self):
        """The dense weight ``[out, in]``, zeros restored."""
        return formats.bsr_to_dense(self.rowptr, self.col, self.val, (self.out_features, self.in_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.block = tuple(self.val.shape[1:])


class _NM:
    format = "nm"
    relu = False  # ReLU fused, in place after the kernel (module docstring)

    def _encode(self, w):
        val, idx = formats.nm_from_dense(w, self.n, self.m)
        return {"val": val, "idx": idx, "nm": torch.tensor([self.n, self.m])}

    def _mm(self, x, transpose_out, relu=False, residual=None):
        b = self._buffers
        return functional.epilogue_(spmm.nm_mm(b["val"], b["idx"], self._b(), x, self.n, self.m,
                                               self.out_features, transpose_out), relu, residual)

    def weight_dense(self):
        """The dense weight ``[out, in]``, zeros restored."""
        return formats.nm_to_dense(self.val, self.idx, self.n, self.m, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.n, self.m = (int(v) for v in self.nm)


# --- layer kinds -----------------------------------------------------------------------------------

class _Linear(_Sparse):
    """``y = x·Wᵀ + b``: x ``[..., in]`` fp32 → ``[..., out]``."""

    def __init__(self, weight, bias=None, **fmt):
        """weight: fp32 ``[out, in]``; bias: ``[out]`` or None; format options (block, n, m)."""
        super().__init__(weight, bias, weight.shape[0], weight.shape[1], **fmt)

    @classmethod
    def from_dense(cls, linear, **fmt):
        return cls(linear.weight, linear.bias, **fmt)

    def forward(self, x, residual=None):
        """``residual`` (CSR modules): ``max(x·Wᵀ + b + residual, 0)`` if ``relu`` else without the
        max (:func:`functional.sparse_linear`; fused into the kernel's store when ``residual`` has the
        output's shape, dtype and device)."""
        self._check(x, -1)
        return functional.sparse_linear(x, self._mm, self.out_features, getattr(self, "relu", False),
                                         self._residual(residual))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.3f}{self._fmt_repr()}")

    def _fmt_repr(self):
        return "".join(f", {k}={getattr(self, k)}" for k in ("block", "n", "m", "relu") if hasattr(self, k))


class _Conv1x1(_Linear):
    """1×1 convolution: x ``[N, in, H, W]`` fp32 → ``[N, out, H', W']``."""

    def __init__(self, weight, bias=None, stride=1, **fmt):
        """weight: fp32 ``[out, in, 1, 1]`` or ``[out, in]``; bias ``[out]`` or None; int stride."""
        _Sparse.__init__(self, weight.reshape(weight.shape[0], -1), bias, weight.shape[0],
                         weight.shape[1], stride=int(stride), **fmt)

    @classmethod
    def from_dense(cls, conv, **fmt):
        if not supports_conv1x1(conv):
            raise ValueError(f"{cls.__name__} needs a 1×1 Conv2d with padding 0, groups 1 and equal "
                             f"strides; got {conv}")
        return cls(conv.weight, conv.bias, conv.stride[0], **fmt)

    def forward(self, x, residual=None):
        """``residual`` (CSR modules): added before the ReLU, as :meth:`_Linear.forward`'s."""
        self._check(x, 1, ndim=4)
        return functional.sparse_conv1x1(x, self._mm, self.out_features, self.stride, getattr(self, "relu", False),
                                         self._residual(residual))

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, kernel_size=(1, 1), stride={self.stride}, "
                f"bias={self.bias is not None}, density={self.density:.3f}{self._fmt_repr()}")


class _ConvKxK(_Sparse):
    """KxK convolution (groups 1, zero padding): x ``[N, C, H, W]`` fp32 → ``[N, out, H', W']``
    as ``F.conv2d`` (``functional.conv2d``: offsets/taps and zero-padded input buffers cached per
    weight, input size and thread; one opaque op under torch.compile)."""

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1):
        """weight: fp32 ``[out, C, R, S]``; bias ``[out]`` or None; stride/padding/dilation: int
        or pair of ints."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ValueError(f"{type(self).__name__}: weight must be [out, C, R, S], got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        super().__init__(weight, bias, weight.shape[0], weight.shape[1],
                         kernel_size=tuple(weight.shape[2:]), stride=_pair(stride),
                         padding=_pair(padding), dilation=_pair(dilation),
                         taps_per_kernel=weight.shape[2] * weight.shape[3])

    @classmethod
    def from_dense(cls, conv):
        if not supports_conv(conv):
            raise ValueError(f"{cls.__name__} needs a Conv2d with groups 1 and numeric zero padding; got {conv}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)

    def forward(self, x, residual=None):
        """``residual``: ``max(conv(x) + residual, 0)`` if ``relu`` else without the max (fused
        into the kernel's store for one image with ``residual`` of the output's shape, dtype, device)."""
        self._check(x, 1, ndim=4)
        b = self._buffers
        return functional.conv2d(self.format, x, b["rowptr"], b[self._index], b["val"], b["bias"],
                                 self.out_features, self.kernel_size, self.stride, self.padding, self.dilation,
                                 relu=self.relu, residual=self._residual(residual))

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, density={self.density:.3f}, relu={self.relu}")


# --- the modules -----------------------------------------------------------------------------------

class CSRLinear(_CSR, _Linear):
    """Linear with W ``[out, in]`` in CSR. x ``[..., in]`` fp32 → ``[..., out]``."""


class CSRConv1x1(_CSR, _Conv1x1):
    """1×1 convolution with W ``[out, in]`` in CSR. x ``[N, in, H, W]`` fp32 → ``[N, out, H', W']``."""


class BSRLinear(_BSR, _Linear):
    """Linear with W ``[out, in]`` in block CSR (``block=(bo, bi)``, default ``(4, 4)``)."""

    def __init__(self, weight, bias=None, block=(4, 4)):
        super().__init__(weight, bias, block=_pair(block))


class BSRConv1x1(_BSR, _Conv1x1):
    """1×1 convolution with W ``[out, in]`` in block CSR (``block=(bo, bi)``)."""

    def __init__(self, weight, bias=None, stride=1, block=(4, 4)):
        super().__init__(weight, bias, stride, block=_pair(block))


class NMLinear(_NM, _Linear):
    """Linear with an N:M weight (at most ``n`` nonzeros in every ``m`` consecutive inputs),
    compressed; ValueError if the weight is not ``n``:``m``."""

    def __init__(self, weight, bias=None, n=2, m=4):
        super().__init__(weight, bias, n=int(n), m=int(m))


class NMConv1x1(_NM, _Conv1x1):
    """1×1 convolution with an N:M weight along the input channels (``sk.nm_mask``), compressed."""

    def __init__(self, weight, bias=None, stride=1, n=2, m=4):
        super().__init__(weight, bias, stride, n=int(n), m=int(m))


class CSRConv2d(_CSR, _ConvKxK):
    """KxK convolution (groups 1, zero padding) with W ``[out, C·R·S]`` in CSR: direct sparse
    convolution over a zero-padded image (``csr_conv``)."""

    _index = "col"


class CKConv2d(_ConvKxK):
    """KxK convolution (groups 1, zero padding) that skips zero kernels (CK sparsity,
    ``sk.ck_mask``): per output channel its alive input channels with their dense ``R×S`` taps
    (``ck_conv``). Partly zero kernels are stored whole."""

    format = "ck"
    _index = "chan"
    relu = False  # ReLU fused into the kernel's store (module docstring)

    def _encode(self, w):
        rowptr, chan, val = formats.ck_from_dense(w)
        return {"rowptr": rowptr, "chan": chan, "val": val}

    def weight_dense(self):
        """The dense weight ``[out, C, R, S]``, zeros restored."""
        return formats.ck_to_dense(self.rowptr, self.chan, self.val,
                                   (self.out_features, self.in_features, *self.kernel_size))


class CSRGroupConv2d(_CSR, _Sparse):
    """Grouped KxK convolution (e.g. depthwise, ``groups = C``; zero padding) with W
    ``[out, C/groups·R·S]`` in CSR: x ``[N, C, H, W]`` fp32 → ``[N, out, H', W']`` as ``F.conv2d``.
    One ``csr_group_conv`` call: per image and group, the group's channels in a zero-padded buffer
    and each output row's nonzero taps only (``in_features`` = C)."""

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """weight: fp32 ``[out, C/groups, R, S]``; bias ``[out]`` or None; stride/padding/dilation:
        int or pair of ints; groups: a positive divisor of out."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ValueError(f"CSRGroupConv2d: weight must be [out, C/groups, R, S], got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"CSRGroupConv2d: groups must be a positive int dividing out = {weight.shape[0]}, "
                             f"got {groups!r}")
        super().__init__(weight, bias, weight.shape[0], weight.shape[1] * groups,
                         kernel_size=tuple(weight.shape[2:]), stride=_pair(stride), padding=_pair(padding),
                         dilation=_pair(dilation), groups=groups)

    @classmethod
    def from_dense(cls, conv):
        if not supports_group_conv(conv):
            raise ValueError(f"CSRGroupConv2d needs a Conv2d with numeric zero padding; got {conv}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @property
    def density(self):
        """Fraction of nonzero weights."""
        numel = self.out_features * self.in_features // self.groups * self.kernel_size[0] * self.kernel_size[1]
        return int(torch.count_nonzero(self.val)) / max(1, numel)

    def weight_dense(self):
        """The dense weight ``[out, C/groups·R·S]``, zeros restored."""
        shape = (self.out_features, self.in_features // self.groups * self.kernel_size[0] * self.kernel_size[1])
        return formats.csr_to_dense(self.rowptr, self.col, self.val, shape)

    def forward(self, x):
        self._check(x, 1, ndim=4)
        b = self._buffers
        return spmm.csr_group_conv(b["rowptr"], b["col"], b["val"], self._b(), x, self.out_features, self.groups,
                                   list(self.kernel_size), list(self.stride), list(self.padding),
                                   list(self.dilation), relu=self.relu)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, density={self.density:.3f}, relu={self.relu}")


def semi_structured_backend():
    """torch's semi-structured tensor class that :class:`SemiStructuredLinear` builds: cuSPARSELt
    (``to_sparse_semi_structured``'s default), CUTLASS when ``SparseSemiStructuredTensor._FORCE_CUTLASS``
    is set or cuSPARSELt is not available."""
    sst = torch.sparse.SparseSemiStructuredTensor
    if sst._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def supports_semi_structured(w):
    """Whether a weight ``[out, in]`` can become a :class:`SemiStructuredLinear` (device aside):
    fp16/bf16, at most 2 nonzeros in every 4 consecutive inputs, and both sides positive multiples
    of the backend's minimum sparse shape (``_DTYPE_SHAPE_CONSTRAINTS``: 16×16 for cuSPARSELt,
    32×64 for CUTLASS)."""
    if w.dim() != 2 or w.dtype not in (torch.float16, torch.bfloat16):
        return False
    c = semi_structured_backend()._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    (rows, cols), (r, k) = w.shape, (c.sparse_min_rows, c.sparse_min_cols)
    if rows < r or rows % r or cols < k or cols % k:
        return False
    return int((w.detach() != 0).reshape(rows, -1, 4).sum(-1).max()) <= 2


class SemiStructuredLinear(nn.Module):
    """CUDA only, UNVERIFIED (no GPU where it was written): Linear with an exactly 2:4 fp16/bf16
    weight in torch's semi-structured format (:func:`semi_structured_backend`, compute capability
    >= 8.0). ValueError unless :func:`supports_semi_structured`."""

    format = "2:4"

    def __init__(self, weight, bias=None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or not supports_semi_structured(weight):
            cls = semi_structured_backend()
            c = cls._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
            raise ValueError(
                f"SemiStructuredLinear: weight must be a 2:4 fp16/bf16 [out, in] tensor with out and in "
                f"multiples of {c.sparse_min_rows} and {c.sparse_min_cols} ({cls.BACKEND}), got "
                f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(semi_structured_backend().from_dense(weight.detach().contiguous()),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, linear):
        return cls(linear.weight, linear.bias)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def supports_conv(conv):
    """Whether a ``nn.Conv2d`` can become a :class:`CSRConv2d` (groups 1, numeric zero padding)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def supports_group_conv(conv):
    """Whether a ``nn.Conv2d`` can become a :class:`CSRGroupConv2d` (numeric zero padding, any groups)."""
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def supports_conv1x1(conv):
    """Whether a ``nn.Conv2d`` can become a :class:`CSRConv1x1`."""
    return (supports_conv(conv) and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.padding) == (0, 0) and conv.stride[0] == conv.stride[1])


class BitmapLinear(nn.Module):
    """Linear with a bf16 / fp16 weight ``[out, in]`` in the bitmap format
    (``formats.bitmap_from_dense``: a bit per weight and the packed nonzeros; fewer bytes than the
    dense weight below ~94 % density): ``x [..., in]`` (the weight's dtype) → ``[..., out]``,
    fp32 accumulation (``spmm.bitmap_mm``). Eval-only. For decode (a few rows of ``x``)."""

    format = "bitmap"

    def __init__(self, weight, bias=None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
                weight.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"BitmapLinear: weight must be a bfloat16 / float16 [out, in] tensor, got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)} "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
            raise ValueError(f"BitmapLinear: bias must be None or a [{weight.shape[0]}] tensor, got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        self.out_features, self.in_features = (int(v) for v in weight.shape)
        rowptr, mask, val = formats.bitmap_from_dense(weight)
        self.register_buffer("rowptr", rowptr)
        self.register_buffer("mask", mask)
        self.register_buffer("val", val)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype).contiguous().clone())
        self.register_buffer("_no_bias", torch.empty(0, dtype=weight.dtype), persistent=False)

    @classmethod
    def from_dense(cls, linear):
        return cls(linear.weight, linear.bias)

    @property
    def density(self):
        """Fraction of nonzero weights."""
        return int(self.rowptr[-1]) / max(1, self.out_features * self.in_features)

    def weight_dense(self):
        """The dense weight ``[out, in]``, zeros restored."""
        return formats.bitmap_to_dense(self.rowptr, self.mask, self.val, (self.out_features, self.in_features))

    def forward(self, x):
        name = type(self).__name__
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(f"{name} is inference-only: call model.eval() or run under "
                               "torch.no_grad() / torch.inference_mode()")
        b = self._buffers
        if not isinstance(x, torch.Tensor) or x.dtype != b["val"].dtype:
            raise ValueError(f"{name}: input must be a {b['val'].dtype} tensor (the weight's dtype), got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: expected {self.in_features} input features at dim -1, got input of "
                             f"shape {tuple(x.shape)}")
        bias = b["bias"] if b["bias"] is not None else b["_no_bias"]
        y = spmm.bitmap_mm(b["rowptr"], b["mask"], b["val"], bias, x.reshape(-1, self.in_features),
                           self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        t = state_dict.get(prefix + "val")
        if isinstance(t, torch.Tensor):  # nnz differs between weights of one layer shape
            self._buffers["val"] = torch.empty_like(t, device=self._buffers["val"].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.val.dtype}, density={self.density:.3f}")


class BitmapConv1x1(BitmapLinear):
    """1×1 conv (groups 1, no padding, equal strides) with a bf16 / fp16 weight ``[out, in, 1, 1]``
    in the bitmap format: ``x [N, C, H, W]`` (the weight's dtype) → ``[N, out, H', W']`` as
    ``F.conv2d``, each pixel's channels one row of ``spmm.bitmap_mm`` (fp32 accumulation). The output
    has channels-last strides, so a following ``BitmapConv1x1`` reads its rows without a copy.
    Pays where dense 16-bit matmuls are slow (no AVX-512-BF16 / AMX: ~2.3× dense bf16 at 70 %,
    49–196 pixels, AMD EPYC, 2 threads); ``convert`` measures it against dense."""

    def __init__(self, weight, bias=None, stride=1):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"BitmapConv1x1: weight must be a [out, in, 1, 1] tensor, got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"BitmapConv1x1: stride must be a positive int, got {stride!r}")
        super().__init__(weight.reshape(weight.shape[0], -1), bias)
        self.stride = stride

    @classmethod
    def from_dense(cls, conv):
        if not supports_conv1x1(conv):
            raise ValueError(f"BitmapConv1x1 needs a 1×1 Conv2d (groups 1, no padding, equal strides); got {conv}")
        return cls(conv.weight, conv.bias, conv.stride[0])

    def weight_dense(self):
        """The dense weight ``[out, in, 1, 1]``, zeros restored."""
        return super().weight_dense()[:, :, None, None]

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"BitmapConv1x1: expected [N, {self.in_features}, H, W], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        n, _, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1))  # [N, H, W, out]
        return y.permute(0, 3, 1, 2)

    def extra_repr(self):
        return f"stride={self.stride}, " + super().extra_repr()
