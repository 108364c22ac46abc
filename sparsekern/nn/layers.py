"""Drop-in sparse Conv2d / Linear: the dense weight + the method's state, one threshold op in forward."""
from torch import Tensor, nn
from torch.nn import functional as F

from ..methods import Method, make_method


class SparseLayer:
    """Base of SparseConv2d and SparseLinear (`isinstance(m, SparseLayer)` finds them).

    State: ``weight`` (dense, trained), ``bias``, plus the method's own state (STR: ``s``;
    st3/st3_sigma/feather/gmp: ``threshold``, set by the Sparsifier; ASL: ``r``; starfire/nm:
    a bool ``mask``, the only methods whose structure is not a function of the weights). The
    effective weight is recomputed by one op each forward (no ``weight_orig``/``weight_mask``),
    and the module traces under ``torch.compile(fullgraph=True)``.
    """

    _dense_cls: type[nn.Module]
    method: Method

    def _init_method(self, method: "str | Method", options: dict) -> None:
        self.method = make_method(method, **options)
        self.method.init_state(self)

    def effective_weight(self) -> Tensor:
        """The weight the forward uses (same shape/dtype as ``weight``), differentiable."""
        return self.method.sparse_weight(self)

    @classmethod
    def from_dense(cls, module: nn.Module, method: "str | Method", **options):
        """Sparse layer computing like ``module`` under ``method`` (a name or a Method instance).

        Shares ``module``'s ``weight``/``bias`` Parameters (same values, device and dtype; an
        optimizer built before the swap keeps working) and copies its configuration.
        """
        if type(module) is not cls._dense_cls:
            raise TypeError(f"{cls.__name__}.from_dense expects nn.{cls._dense_cls.__name__}, got {type(module).__name__}")
        w = module.weight
        layer = cls(**cls._config(module), device=w.device, dtype=w.dtype, method=method, **options)
        layer.weight = module.weight
        layer.bias = module.bias
        return layer.train(module.training)

    def to_dense(self) -> nn.Module:
        """A plain ``nn.Conv2d``/``nn.Linear`` holding the effective weight (identical outputs)."""
        dense = self._dense_cls(**self._config(self), device="meta")
        w = self.effective_weight().detach()
        dense.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return dense.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.method.extra_repr()}"


class SparseConv2d(SparseLayer, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``method``'s sparse weight; weight ``[K_out, C_in/groups, R, S]``.

    Same constructor as ``nn.Conv2d`` plus keyword ``method`` and its options; usually built by
    ``SparseConv2d.from_dense(conv, method)`` or ``sk.sparsify``.
    """

    _dense_cls = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, method, **options):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_method(method, options)

    @staticmethod
    def _config(m: nn.Conv2d) -> dict:
        return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class SparseLinear(SparseLayer, nn.Linear):
    """``nn.Linear`` whose forward uses ``method``'s sparse weight; weight ``[out, in]``."""

    _dense_cls = nn.Linear

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, method, **options):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_method(method, options)

    @staticmethod
    def _config(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


#: Dense type → sparse type; `sparsify` swaps exactly these types (subclasses are left alone).
SPARSE_LAYERS: dict[type[nn.Module], type[SparseLayer]] = {nn.Conv2d: SparseConv2d, nn.Linear: SparseLinear}
