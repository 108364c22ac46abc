"""Sparse weights inside any module: the mechanism ``sparsify`` uses (docs/sparsify.md).

A pruned Parameter stays registered where it is (plain state_dict key, same object for the
optimizer, ties kept). Every module holding it gets a class swap to a cached subclass of its
own class in which the attribute ``<pname>`` is a property returning the *effective* weight —
``method.sparse_weight`` on the raw one — in the module's layout. So the module's own forward,
``F.linear(x, parent.qkv.weight)`` in a parent and ``nn.MultiheadAttention``'s functional use of
``in_proj_weight`` all see the sparse weight, and gradients follow the method's op.
``module._parameters[pname]`` (and ``named_parameters()``) is the raw, trained weight.

Methods see each weight through a ``SparseWeight`` in the canonical layout ``[out, in, *kernel]``
(transformers' ``Conv1D`` stores ``[in, out]``: its canonical view is ``weight.t()``), so per
output-channel rules (ST-3's rescale, channel thresholds, N:M along ``in``) use the right dim.
"""
import contextlib

from torch import Tensor, nn

from ..methods import Method, make_method
from ..ops.distributed import is_dtensor

class _State:
    raw = 0  # > 0 inside raw_weights()
    reads: set | None = None  # ids of the SparseWeights read, while a first forward is probed


@contextlib.contextmanager
def raw_weights():
    """Inside: sparse weights read as the raw Parameter (shape-only passes, e.g. a meta forward)."""
    _State.raw += 1
    try:
        yield
    finally:
        _State.raw -= 1


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a Linear with weight ``[in, out]``."""
    return _base_class(module).__name__ == "Conv1D" and hasattr(module, "nf") and "weight" in module._parameters


def default_weights(module: nn.Module) -> list[tuple[str, bool]] | None:
    """``[(param name, transposed)]`` that ``sparsify`` prunes by default in ``module`` (its own
    Parameters only), or None when ``module`` is not a prunable kind. ``transposed``: stored ``[in, out]``."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", False)]
        return [("q_proj_weight", False), ("k_proj_weight", False), ("v_proj_weight", False)]
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return [("weight", False)]
    if _is_hf_conv1d(module):
        return [("weight", True)]
    return None


def weight_name(module_name: str, pname: str) -> str:
    """A pruned weight's name: the module's name for ``weight``, else ``module.pname``."""
    if pname == "weight":
        return module_name
    return f"{module_name}.{pname}" if module_name else pname


def prunable_weights(model: nn.Module, include=None) -> list[tuple[str, nn.Module, str, bool]]:
    """``[(name, module, pname, transposed)]``: each prunable Parameter of ``model`` once (a tied or
    shared one under the first module that prunes it), in ``named_modules`` order.

    include: None (the default kinds: Linear and subclasses, Conv1d/2d/3d, MultiheadAttention,
    transformers' Conv1D) or a predicate ``(name, module) → bool`` deciding for every module; a
    module it picks that is not a default kind contributes its ``weight`` (≥ 2-D, ``[out, in, ...]``).
    """
    seen, out = set(), []
    for mname, mod in model.named_modules(remove_duplicate=False):
        kinds = default_weights(mod)
        if include is not None:
            if not include(mname, mod):
                continue
            if kinds is None:
                w = mod._parameters.get("weight")
                if w is None or w.dim() < 2:
                    raise ValueError(f"include picks {mname!r} ({type(mod).__name__}), which has no ≥ 2-D "
                                     "'weight' Parameter to prune")
                kinds = [("weight", False)]
        for pname, transposed in kinds or ():
            p = mod._parameters.get(pname)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((weight_name(mname, pname), mod, pname, transposed))
    return out


def holders(model: nn.Module, param: Tensor) -> list[tuple[str, nn.Module, str]]:
    """Every ``(module name, module, attribute)`` of ``model`` where ``param`` is registered."""
    return [(mname, mod, pname) for mname, mod in model.named_modules(remove_duplicate=False)
            for pname, p in mod._parameters.items() if p is param]


class SparseWeight:
    """One pruned Parameter and its method: what methods and the Sparsifier work on.

    ``weight``: the raw Parameter in canonical layout ``[out, in, *kernel]`` (a view for a
    transposed kind). Method state (``threshold``, ``s``, ``r``, ``mask``, canonical layout) is
    registered on ``module`` as ``prefix + name``: ``prefix`` is ``""`` for ``weight`` (keys
    ``fc.threshold``) and ``"<pname minus 'weight'>"`` otherwise (``attn.in_proj_threshold``);
    reading or assigning ``sw.threshold`` goes to the module.
    """

    _own = ("module", "pname", "name", "transposed", "method", "prefix", "state")

    def __init__(self, module: nn.Module, pname: str, name: str, transposed: bool, method: Method):
        s = object.__setattr__
        s(self, "module", module)
        s(self, "pname", pname)
        s(self, "name", name)
        s(self, "transposed", transposed)
        s(self, "method", method)
        s(self, "prefix", pname[: -len("weight")] if pname.endswith("weight") else pname + "_")
        s(self, "state", [])  # names of the state this method registered

    @property
    def param(self) -> nn.Parameter:
        return self.module._parameters[self.pname]

    @property
    def weight(self) -> Tensor:
        p = self.param
        return p.t() if self.transposed else p

    def _claim(self, name: str) -> None:
        if name not in self.state and hasattr(self.module, self.prefix + name):
            raise ValueError(f"{type(self.module).__name__} {self.name!r} already has an attribute "
                             f"{self.prefix + name!r}, where sparsekern would keep its {name!r} state")

    def register_buffer(self, name: str, value: Tensor) -> None:
        self._claim(name)
        self.module.register_buffer(self.prefix + name, value)
        self.state.append(name)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in self._own:
            raise AttributeError(name)
        return getattr(self.module, self.prefix + name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._own:
            raise AttributeError(f"SparseWeight.{name} is fixed")
        self._claim(name)
        setattr(self.module, self.prefix + name, value)
        if name not in self.state:
            self.state.append(name)

    def effective_weight(self) -> Tensor:
        """The weight the forward uses, canonical layout, differentiable (the method's op)."""
        return self.method.sparse_weight(self)

    def drop_state(self) -> None:
        """Remove the method's state from the module (what ``register_buffer``/assignment added)."""
        for name in self.state:
            delattr(self.module, self.prefix + name)
        self.state.clear()

    def __repr__(self) -> str:
        return f"SparseWeight({self.name!r}, {tuple(self.weight.shape)}, {self.method.extra_repr()})"


class _SparseAttr(property):
    """The property serving a sparse weight (marks the classes this module made)."""


def _sparse_attr(pname: str) -> _SparseAttr:
    def get(module: nn.Module) -> Tensor:
        sw = module.__dict__.get("_sparsekern", {}).get(pname)
        if sw is None or _State.raw:
            if pname not in module._parameters:  # inside the base __init__, before registration
                raise AttributeError(pname)
            return module._parameters[pname]
        if is_dtensor(module._parameters[pname]):  # FSDP2's sharded state (its own reads);
            return module._parameters[pname]                   # its forward sees the unsharded tensor
        if _State.reads is not None:
            _State.reads.add(id(sw))
        w = sw.effective_weight()
        return w.t() if sw.transposed else w
    return _SparseAttr(get, doc=f"the effective (sparse) {pname}; the raw one is _parameters[{pname!r}]")


_CLASSES: dict[tuple[type, frozenset], type] = {}


def _rebuild(base: type, names: frozenset) -> nn.Module:
    cls = _sparse_class(base, names)
    return cls.__new__(cls)


def _sparse_class(base: type, names: frozenset) -> type:
    """``base`` with a sparse property per name (cached; picklable through ``_rebuild``)."""
    if all(isinstance(getattr(base, n, None), _SparseAttr) for n in names):
        return base
    key = (base, names)
    if key not in _CLASSES:
        def __reduce_ex__(self, protocol):
            return _rebuild, (base, names), self.__dict__
        def register_parameter(self, name: str, param) -> None:
            with raw_weights():  # its hasattr(self, name) must not run the method's op
                base.register_parameter(self, name, param)

        def extra_repr(self) -> str:
            sparse = [f"{'' if p == 'weight' else p + ': '}{sw.method.extra_repr()}"
                      for p, sw in sorted(self.__dict__.get("_sparsekern", {}).items())]
            return ", ".join([r for r in [base.extra_repr(self)] if r] + sparse)
        attrs = {n: _sparse_attr(n) for n in sorted(names)}
        _CLASSES[key] = type(f"Sparsified{base.__name__}", (base,), {
            **attrs, "__reduce_ex__": __reduce_ex__, "register_parameter": register_parameter,
            "extra_repr": extra_repr, "_sparsekern_base": base,
            "__module__": base.__module__, "__qualname__": f"Sparsified{base.__qualname__}"})
    return _CLASSES[key]


def _base_class(module: nn.Module) -> type:
    return type(module).__dict__.get("_sparsekern_base", type(module))


def enable(module: nn.Module, pname: str, sw: SparseWeight) -> None:
    """Make ``module.<pname>`` read ``sw``'s effective weight (``module`` holds ``sw.param``)."""
    table = module.__dict__.setdefault("_sparsekern", {})
    table[pname] = sw
    module.__class__ = _sparse_class(_base_class(module), frozenset(table))


def disable(module: nn.Module, pname: str) -> None:
    """Undo ``enable``: ``module.<pname>`` is its raw Parameter again."""
    table = module.__dict__.get("_sparsekern", {})
    table.pop(pname, None)
    base = _base_class(module)
    module.__class__ = _sparse_class(base, frozenset(table)) if table else base
    if not table:
        module.__dict__.pop("_sparsekern", None)


def sparse_weights(module: nn.Module) -> dict[str, SparseWeight]:
    """``{pname: SparseWeight}`` of the sparse weights ``module`` holds (empty if none)."""
    return dict(module.__dict__.get("_sparsekern", {}))


class SparseLayer:
    """Base of SparseConv2d and SparseLinear (`isinstance(m, SparseLayer)` finds them): a plain
    layer built sparse, its ``weight`` served like any weight ``sparsify`` prunes."""

    _dense_cls: type[nn.Module]

    def _init_method(self, method: "str | Method", options: dict) -> None:
        sw = SparseWeight(self, "weight", "", False, make_method(method, **options))
        sw.method.init_state(sw)
        enable(self, "weight", sw)

    @property
    def method(self) -> Method:
        return self.__dict__["_sparsekern"]["weight"].method

    def register_parameter(self, name: str, param) -> None:
        with raw_weights():  # its hasattr(self, name) must not run the method's op
            super().register_parameter(name, param)

    @property
    def raw_weight(self) -> nn.Parameter:
        """The trained dense Parameter (``weight`` reads the effective one)."""
        return self._parameters["weight"]

    def effective_weight(self) -> Tensor:
        """The weight the forward uses (same shape/dtype as ``raw_weight``), differentiable: ``weight``."""
        return self.weight

    @classmethod
    def from_dense(cls, module: nn.Module, method: "str | Method", **options):
        """Sparse layer computing like ``module`` under ``method`` (a name or a Method instance).

        Shares ``module``'s ``weight``/``bias`` Parameters (same values, device and dtype; an
        optimizer built before keeps working) and copies its configuration.
        """
        if type(module) is not cls._dense_cls:
            raise TypeError(f"{cls.__name__}.from_dense expects nn.{cls._dense_cls.__name__}, got {type(module).__name__}")
        layer = cls.__new__(cls)
        cls._dense_cls.__init__(layer, **cls._config(module), device="meta", dtype=module.weight.dtype)
        layer.weight, layer.bias = module.weight, module.bias
        layer._init_method(method, options)
        return layer.train(module.training)

    def to_dense(self) -> nn.Module:
        """A plain ``nn.Conv2d``/``nn.Linear`` holding the effective weight (identical outputs)."""
        dense = self._dense_cls(**self._config(self), device="meta")
        dense.weight = nn.Parameter(self.weight.detach(), requires_grad=self.raw_weight.requires_grad)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return dense.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.method.extra_repr()}"


class SparseConv2d(SparseLayer, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``method``'s sparse weight; weight ``[K_out, C_in/groups, R, S]``.

    Same constructor as ``nn.Conv2d`` plus keyword ``method`` and its options.
    """

    _dense_cls = nn.Conv2d
    weight = _sparse_attr("weight")

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


class SparseLinear(SparseLayer, nn.Linear):
    """``nn.Linear`` whose forward uses ``method``'s sparse weight; weight ``[out, in]``."""

    _dense_cls = nn.Linear
    weight = _sparse_attr("weight")

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, method, **options):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_method(method, options)

    @staticmethod
    def _config(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
