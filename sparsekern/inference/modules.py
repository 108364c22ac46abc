"""Eval-only inference modules holding a sparse weight (CSR over output rows, fp32).

``CSRLinear`` replaces ``nn.Linear``, ``CSRConv1x1`` a 1×1 ``nn.Conv2d`` (padding 0, groups
1, any stride) and ``CSRConv2d`` any other ``nn.Conv2d`` with groups 1 and zero padding (direct
sparse convolution). Buffers ``rowptr``/``col``/``val`` (and ``bias``) are plain tensors: the module
pickles, and its ``state_dict`` loads into any module of the same layer shape (the buffers are
resized to the stored number of nonzeros).
"""
import threading

import torch
from torch import nn

from .. import reference
from ..ops.spmm import conv_offsets, csr_conv1x1, csr_conv2d, csr_from_dense, csr_linear


class _CSRBase(nn.Module):
    """CSR weight ``[out, in]`` as buffers; shared checks, density, state_dict resizing."""

    def __init__(self, weight, bias):
        super().__init__()
        rowptr, col, val = csr_from_dense(weight)
        self.register_buffer("rowptr", rowptr)
        self.register_buffer("col", col)
        self.register_buffer("val", val)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous().clone())

    @property
    def density(self):
        """Fraction of nonzero weights."""
        return self.val.numel() / max(1, self.out_features * self.in_features)

    def weight_dense(self):
        """The dense weight ``[out, in]`` (zeros restored)."""
        return reference.csr_to_dense(self.rowptr, self.col, self.val, (self.out_features, self.in_features))

    def _check(self, x, channel_dim, ndim=None):
        name = type(self).__name__
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(f"{name} is inference-only: call model.eval() or run under "
                               "torch.no_grad() / torch.inference_mode()")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise ValueError(f"{name}: input must be float32 (the sparse weight is float32), got {x.dtype}")
        if x.device != self.val.device:
            raise ValueError(f"{name}: input is on {x.device} but the sparse weight is on {self.val.device}")
        if ndim is not None and x.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D input, got shape {tuple(x.shape)}")
        if x.dim() == 0 or x.shape[channel_dim] != self.in_features:
            raise ValueError(f"{name}: expected {self.in_features} input features at dim {channel_dim}, "
                             f"got input of shape {tuple(x.shape)}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("col", "val"):  # nnz differs between weights of one layer shape
            t = state_dict.get(prefix + key)
            if isinstance(t, torch.Tensor):
                self._buffers[key] = torch.empty_like(t, device=self._buffers[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CSRLinear(_CSRBase):
    """``y = x·Wᵀ + b`` with W in CSR. x: ``[..., in]`` fp32 → ``[..., out]``."""

    def __init__(self, weight, bias=None):
        """weight: fp32 ``[out, in]`` (zeros are dropped); bias: ``[out]`` or None."""
        super().__init__(weight, bias)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_dense(cls, linear):
        return cls(linear.weight, linear.bias)

    def forward(self, x):
        self._check(x, -1)
        return csr_linear(x, self.rowptr, self.col, self.val, self.bias, self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.3f}")


class CSRConv1x1(_CSRBase):
    """1×1 convolution with W ``[out, in]`` in CSR. x: ``[N, in, H, W]`` fp32 → ``[N, out, H', W']``."""

    def __init__(self, weight, bias=None, stride=1):
        """weight: fp32 ``[out, in, 1, 1]`` or ``[out, in]``; bias ``[out]`` or None; int stride."""
        super().__init__(weight.reshape(weight.shape[0], -1), bias)
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        self.stride = int(stride)

    @classmethod
    def from_dense(cls, conv):
        if not supports_conv1x1(conv):
            raise ValueError(f"CSRConv1x1 needs a 1×1 Conv2d with padding 0, groups 1 and equal "
                             f"strides; got {conv}")
        return cls(conv.weight, conv.bias, conv.stride[0])

    def forward(self, x):
        self._check(x, 1, ndim=4)
        return csr_conv1x1(x, self.rowptr, self.col, self.val, self.bias, self.out_features, self.stride)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, kernel_size=(1, 1), stride={self.stride}, "
                f"bias={self.bias is not None}, density={self.density:.3f}")


class CSRConv2d(_CSRBase):
    """KxK convolution (groups 1, zero padding) with W ``[out, C·R·S]`` in CSR.
    x: ``[N, C, H, W]`` fp32 → ``[N, out, H', W']`` as ``F.conv2d``."""

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1):
        """weight: fp32 ``[out, C, R, S]``; bias ``[out]`` or None; stride/padding/dilation:
        int or pair of ints."""
        super().__init__(weight.reshape(weight.shape[0], -1), bias)
        pair = (lambda v: (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v))
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self._offsets = {}  # (Hp, Wp) -> int32 offsets of the nonzeros in a padded image
        self._scratch = {}  # (thread, C, H, W) -> zero-padded input buffer, reused

    @classmethod
    def from_dense(cls, conv):
        if not supports_conv(conv):
            raise ValueError(f"CSRConv2d needs a Conv2d with groups 1 and numeric zero padding; got {conv}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)

    def forward(self, x):
        self._check(x, 1, ndim=4)
        key = (x.shape[2] + 2 * self.padding[0], x.shape[3] + 2 * self.padding[1])
        if key not in self._offsets:
            self._offsets[key] = conv_offsets(self.col, self.kernel_size, self.dilation, *key)
        skey = (threading.get_ident(),) + tuple(x.shape[1:])
        y, self._scratch[skey] = csr_conv2d(
            x, self.rowptr, self.col, self.val, self.bias, self.out_features, self.kernel_size,
            self.stride, self.padding, self.dilation, self._offsets[key], self._scratch.get(skey))
        return y

    def _apply(self, fn, *args, **kwargs):  # .to()/.float()...: caches follow the buffers
        self._offsets, self._scratch = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._offsets, self._scratch = {}, {}

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_offsets": {}, "_scratch": {}}

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, density={self.density:.3f}")


def supports_conv(conv):
    """Whether a ``nn.Conv2d`` can become a :class:`CSRConv2d` (groups 1, numeric zero padding)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def supports_conv1x1(conv):
    """Whether a ``nn.Conv2d`` can become a :class:`CSRConv1x1`."""
    return (supports_conv(conv) and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.padding) == (0, 0) and conv.stride[0] == conv.stride[1])
