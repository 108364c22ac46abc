"""Eval-mode BatchNorm folding, ReLU and residual-add fusion for :func:`sparsekern.inference.convert`.

A ``Conv2d`` whose output goes only to an eval ``BatchNorm2d`` is replaced by one conv with
``W' = W·s`` and ``b' = (b - mean)·s + beta`` (``s = gamma / sqrt(var + eps)``, per output channel,
computed in float64); the BatchNorm becomes ``nn.Identity``. Zeros of ``W`` stay zero, so the
folded conv has the sparsity of the original and converts to the same formats; the model then
runs one op fewer per conv (the BatchNorm pass over the activations).

The passes work on ``torch.fx`` graphs (:func:`traced_units`): the model's if it traces, else
(data-dependent control flow, most transformers) those of its largest sub-modules that do (a
child that traces is one unit, one that does not is looked into); what no unit covers is left as
it is. A module called more than once in the units' graphs is never changed, and one is assumed
to run only there (an untraced forward that called it too would see the change). A pair is
folded only if the conv and the BatchNorm are each called once, the conv's output has the
BatchNorm as its only user, the BatchNorm is in eval mode with running statistics and the conv
is a plain ``nn.Conv2d`` (no overridden ``forward``).

After conversion, :func:`fuse_relu` moves the ReLU that follows a converted CSR / CK / block / N:M layer into its
kernel (the module's ``relu``): on the same graphs (sparsekern's modules traced as leaves), an
``nn.ReLU`` module called only there, whose input is the layer's output, possibly through the
``nn.Identity`` of a folded BatchNorm, with no other user on the way, becomes ``nn.Identity``; the
layer must be called once. No class or forward changes.

Then :func:`fuse_residual_blocks` fuses what needs a forward rewritten (ResNet blocks call one
``self.relu`` three times and end with ``out += identity; out = self.relu(out)``). A CSR / CK / block / N:M layer
``L`` without a fused ReLU, called once, whose output goes through ``nn.Identity`` calls (folded
BatchNorms; each the only user of the one before) to exactly one user ``u``:

(a) ``u`` a ReLU (an ``nn.ReLU`` module however often it runs elsewhere, ``torch.relu`` /
    ``torch.relu_`` / ``F.relu`` / ``Tensor.relu`` / ``relu_``): ``u`` is removed, ``L.relu = True``;
(b) ``u`` the add of that output ``e`` and another node ``r`` (``operator.add`` / ``torch.add`` /
    ``Tensor.add``, ``e`` on either side; ``operator.iadd`` / ``Tensor.add_`` in place on ``e``;
    no ``alpha`` / ``out``), ``L`` taking a residual (not :class:`CSRGroupConv2d`), ``r`` a tensor
    whatever the input (:func:`_tensor_nodes`) and nothing between ``L``'s call and ``u`` writing in
    place (``L`` moves to ``u``): ``u`` becomes ``L(x, r)`` (the residual epilogue, ``modules``); a
    ReLU that is its only user then goes as in (a).

The model keeps its class: a pattern is rewritten in its owner, the innermost module whose forward
holds all its nodes (``nn_module_stack``), traced alone and replaced in every parent by a
``torch.fx.GraphModule`` of the rewritten graph, named as its class, with its children, parameters
and buffers (the same ``state_dict``), training flag and public plain attributes. That block then
runs its graph as ``torch.fx`` recorded it (Python branches as taken when traced, in eval mode;
``a += b`` in place, :class:`_Proxy`). ``e += r`` fused gives ``e + r``: equal unless ``r`` would
promote ``e``'s dtype (float64) or broadcast it to a larger shape (where ``+=`` raises). Left as
they are, and said in the result: patterns in the model's own forward, and blocks that do not
trace alone, have hooks (or a module in them has), public methods besides ``forward``,
non-persistent buffers of their own or tensors that are not parameters / buffers.
"""
import inspect
import operator
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ..ops._common import FLOAT_DTYPES, has_cpp
from ..ops.pool import max_pool2d
from .modules import CKConv2d, _BSR, _CSR, _NM


#: In-place operators (``a += b``, ``a[i] = b``).
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem}


class _Proxy(torch.fx.Proxy):
    """``torch.fx.Proxy`` recording ``a += b`` (and the other augmented assignments) as the in-place
    operator that Python runs on tensors, where ``torch.fx`` records ``a + b``: a graph module runs
    it in place as the original forward did."""


def _augmented(op):
    """``_Proxy``'s method for in-place operator ``op`` (``__iadd__`` for ``operator.iadd``)."""
    def impl(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    impl.__name__ = f"__{op.__name__}__"
    return impl


for _op in _INPLACE_OPERATORS - {operator.setitem}:
    setattr(_Proxy, f"__{_op.__name__}__", _augmented(_op))


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps sparsekern's modules (sparse layers, ``SeparableMaxPool2d``)
    as single calls, as torch's own, and in-place operators in place (:class:`_Proxy`)."""

    def is_leaf_module(self, m, qualname):
        return type(m).__module__.startswith("sparsekern.") or super().is_leaf_module(m, qualname)

    def proxy(self, node):
        return _Proxy(node, self)


def trace(model):
    """``(graph, note)``: ``model``'s ``torch.fx`` graph (:class:`_Tracer`), or ``None`` and why not."""
    try:
        return _Tracer().trace(model), ""
    except Exception as e:  # noqa: BLE001 (any tracing failure: the model is left as it is)
        return None, f"torch.fx cannot trace the model ({type(e).__name__})"


class Unit(NamedTuple):
    """A module traced as a whole: its name in the model followed by ``"."`` (``""`` for the model),
    its graph and its ``named_modules()`` (the graph's call targets)."""
    prefix: str
    graph: torch.fx.Graph
    modules: dict


def traced_units(model, wanted):
    """``(units, note)``: ``[Unit]`` covering ``model`` (module docstring): the model if it traces,
    else each child that traces, recursively; only modules holding a sub-module that ``wanted``
    accepts are traced (each once, however many parents hold it). ``note``: why the model itself
    was not traced (``""`` if it was or did not need to be)."""
    units, seen, notes = [], set(), []

    def visit(module, prefix):
        if id(module) in seen or not any(wanted(m) for m in module.modules() if m is not module):
            return
        seen.add(id(module))
        graph, note = trace(module)
        if graph is not None:
            units.append(Unit(prefix, graph, dict(module.named_modules())))
            return
        notes.append(note)
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return units, notes[0] if notes else ""  # the model's own: it is visited first


def _call_counts(units):
    """How many times the units' graphs call each module (by ``id``)."""
    return Counter(id(u.modules[n.target]) for u in units for n in u.graph.nodes if n.op == "call_module")


def batchnorm_pairs(model):
    """``(pairs, note)``: the ``[(conv name, bn name)]`` of ``model`` that :func:`fold_batchnorm`
    folds (module docstring), and why the model itself could not be traced (``""`` if it was; its
    sub-modules that trace were looked at)."""
    units, note = traced_units(model, lambda m: type(m) is nn.BatchNorm2d)
    calls = _call_counts(units)
    pairs = []
    for u in units:
        for node in u.graph.nodes:
            conv = u.modules.get(node.target) if node.op == "call_module" else None
            if type(conv) is not nn.Conv2d or calls[id(conv)] != 1 or len(node.users) != 1:
                continue
            (user,) = node.users
            bn = u.modules.get(user.target) if user.op == "call_module" else None
            if (type(bn) is not nn.BatchNorm2d or calls[id(bn)] != 1 or user.args != (node,) or user.kwargs
                    or bn.training or bn.running_mean is None or bn.num_features != conv.out_channels):
                continue
            pairs.append((u.prefix + node.target, u.prefix + user.target))
    return pairs, note and f"{note}: looked in its sub-modules that trace"


@torch.no_grad()
def fold_conv_bn(conv, bn):
    """``(weight, bias)`` of the conv equal to ``bn(conv(x))`` (eval ``bn``): ``W·s``,
    ``(b - mean)·s + beta`` with ``s = gamma / sqrt(var + eps)`` in float64, cast to the conv's dtype."""
    w = conv.weight.detach()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    b = (b - mean) * scale
    if bn.bias is not None:
        b = b + bn.bias.detach().double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (w.double() * scale.reshape(shape)).to(w.dtype), b.to(w.dtype)


def fold_batchnorm(model, pairs):
    """Fold each ``(conv name, bn name)`` of ``pairs`` (:func:`batchnorm_pairs`) in place: the
    conv's weight and bias become :func:`fold_conv_bn`'s, the BatchNorm ``nn.Identity``. Returns
    ``{conv name: bn name}``."""
    folded = {}
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = fold_conv_bn(conv, bn)
        conv.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        swap_module(model, bn, nn.Identity())
        folded[conv_name] = bn_name
    return folded


def swap_module(model, old, new):
    """Put module ``new`` in place of ``old`` wherever ``old`` is a child in ``model`` (a module
    may be shared by two parents)."""
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)


def _unfused(m):
    """Whether ``m`` is a CSR / CK / block / N:M layer without a fused ReLU."""
    return isinstance(m, (_CSR, _BSR, _NM, CKConv2d)) and not m.relu


def _is_identity(node, arg, modules):
    """Whether graph ``node`` is an ``nn.Identity`` call on ``arg``."""
    return node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and node.args == (arg,)


def _identity_chain(node, modules):
    """The ``nn.Identity`` calls (folded BatchNorms) that ``node``'s output goes through, each the
    only user of the one before."""
    chain, end = [], node
    while len(end.users) == 1 and _is_identity(next(iter(end.users)), end, modules):
        end = next(iter(end.users))
        chain.append(end)
    return chain


def _is_relu(node, arg, modules):
    """Whether graph ``node`` is ``max(arg, 0)`` and nothing else: an ``nn.ReLU`` module,
    ``torch.relu`` / ``torch.relu_`` / ``F.relu`` (``inplace`` or not) or ``Tensor.relu`` / ``relu_``
    called on ``arg`` alone."""
    if node.op == "call_function" and node.target is F.relu:
        inplace = node.args[1:] + tuple(node.kwargs.values())
        return (node.args[:1] == (arg,) and len(inplace) <= 1 and set(node.kwargs) <= {"inplace"}
                and all(isinstance(v, bool) for v in inplace))
    relu = {"call_module": type(modules.get(node.target)) is nn.ReLU,
            "call_method": node.target in ("relu", "relu_"),
            "call_function": node.target in (torch.relu, torch.relu_)}.get(node.op, False)
    return relu and node.args == (arg,) and not node.kwargs


def fuse_relu(model):
    """Fuse into each converted CSR / CK / block / N:M layer of ``model`` the ReLU module after it (module
    docstring), in place: the layer's ``relu`` becomes True, the ReLU an ``nn.Identity``.
    Returns the names of the layers fused."""
    units, _ = traced_units(model, _unfused)
    calls = _call_counts(units)
    fused = []
    for u in units:
        for node in u.graph.nodes:
            layer = u.modules.get(node.target) if node.op == "call_module" else None
            if not _unfused(layer) or calls[id(layer)] != 1:
                continue
            end = (_identity_chain(node, u.modules) or [node])[-1]
            if len(end.users) != 1:
                continue
            (relu,) = end.users
            if relu.op != "call_module" or not _is_relu(relu, end, u.modules) or calls[id(u.modules[relu.target])] != 1:
                continue
            swap_module(model, u.modules[relu.target], nn.Identity())
            layer.relu = True
            fused.append(u.prefix + node.target)
    return fused


# --- residual blocks -------------------------------------------------------------------------------

#: Operators / functions whose result is a tensor when any operand is one.
_TENSOR_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                      operator.imul, torch.add, torch.sub, torch.mul}
#: Functions and Tensor methods (by name) whose result is a tensor when their first argument is one.
_TENSOR_OF_TENSOR = {operator.getitem, operator.neg, torch.relu, torch.relu_, F.relu, torch.flatten, "add", "add_",
                     "sub", "mul", "relu", "relu_", "clone", "contiguous", "detach", "to", "float", "reshape", "view",
                     "flatten", "permute", "transpose", "squeeze", "unsqueeze", "mean", "sum"}
#: Module hooks a GraphModule in a module's place would not run.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _tensor_nodes(graph):
    """The nodes of ``graph`` whose value is a tensor whatever the inputs: the forward's arguments
    unless annotated as something else than a tensor or with a default other than None,
    parameters / buffers, module calls, and :data:`_TENSOR_ARITHMETIC` / :data:`_TENSOR_OF_TENSOR`
    of those."""
    tensors = set()
    for n in graph.nodes:
        nodes = [a for a in n.args if isinstance(a, torch.fx.Node)]
        first = n.args[0] if n.args else None
        if n.op == "placeholder":
            tensor = (n.type is None or isinstance(n.type, type) and issubclass(n.type, torch.Tensor)) and first is None
        elif n.op in ("call_function", "call_method"):
            tensor = (n.target in _TENSOR_ARITHMETIC and any(a in tensors for a in nodes)) or \
                (n.target in _TENSOR_OF_TENSOR and isinstance(first, torch.fx.Node) and first in tensors)
        else:
            tensor = n.op in ("get_attr", "call_module")
        if tensor:
            tensors.add(n)
    return tensors


def _mutates(node, modules):
    """Whether graph ``node`` may write into a tensor: an ``inplace`` module, a ``*_`` method or
    function, an in-place operator, ``out=`` / ``inplace=True`` or a ``True`` argument (``F.relu(x, True)``)."""
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.startswith("_") or node.target in _INPLACE_OPERATORS
            or "out" in node.kwargs or node.kwargs.get("inplace") is True or any(a is True for a in node.args))


def _residual_of(node, e):
    """``r`` if graph ``node`` is ``e + r`` (``operator.add`` / ``torch.add`` / ``Tensor.add``, ``e``
    on either side; ``operator.iadd`` / ``Tensor.add_`` in place on ``e``, not on ``r``; no
    ``alpha`` / ``out``) with ``r`` another node, else None."""
    sides = {("call_function", operator.add): 2, ("call_function", torch.add): 2, ("call_method", "add"): 2,
             ("call_function", operator.iadd): 1, ("call_method", "add_"): 1}.get((node.op, node.target))
    if sides is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    r = b if a is e else a if b is e and sides == 2 else None
    return r if isinstance(r, torch.fx.Node) and r is not e else None


@dataclass
class _Match:
    """A pattern of :func:`fuse_residual_blocks` (module docstring): the layer's call, the identities
    after it, the add and its residual (or None), the ReLU fused (or None)."""
    layer: torch.fx.Node
    chain: list
    add: torch.fx.Node = None
    residual: torch.fx.Node = None
    relu: torch.fx.Node = None

    @property
    def what(self):
        return " + ".join(w for w, n in (("residual add", self.add), ("ReLU", self.relu)) if n is not None)


def _matches(graph, modules, calls):
    """The patterns of ``graph`` (module docstring; ``calls``: :func:`_call_counts`), in graph order;
    an add that two layers' outputs meet at goes to the first."""
    tensors, taken, found = _tensor_nodes(graph), set(), []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not _unfused(layer) or calls[id(layer)] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        chain = _identity_chain(node, modules)
        end = (chain or [node])[-1]
        if len(end.users) != 1:
            continue
        (user,) = end.users
        if _is_relu(user, end, modules):
            found.append(_Match(node, chain, relu=user))
            continue
        r = _residual_of(user, end)
        if (r is None or r not in tensors or user in taken
                or "residual" not in inspect.signature(layer.forward).parameters
                or _mutation_between(node, user, chain, modules)):
            continue
        taken.add(user)
        relu = next(iter(user.users)) if len(user.users) == 1 else None
        found.append(_Match(node, chain, user, r, relu if relu is not None and _is_relu(relu, user, modules) else None))
    return found


def _mutation_between(first, last, skip, modules):
    """Whether a node strictly between graph nodes ``first`` and ``last``, not in ``skip``, may write
    into a tensor (:func:`_mutates`): moving ``first`` to ``last`` could change its input."""
    node = first.next
    while node is not last:
        if node not in skip and _mutates(node, modules):
            return True
        node = node.next
    return False


def _scope(node):
    """The module paths (outermost first) whose forward holds graph ``node`` (a module call: not its
    own)."""
    paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    return paths[:-1] if node.op == "call_module" else paths


def _owner(match):
    """The path of the innermost module whose forward holds all the nodes of ``match`` (``""``: the
    traced module itself)."""
    owner = ""
    for level in zip(*(_scope(n) for n in (match.layer, *match.chain, match.add, match.relu) if n is not None)):
        if len(set(level)) > 1:
            break
        owner = level[0]
    return owner


def _rewrite(graph, match):
    """Apply ``match`` to ``graph`` in place: the add becomes ``layer(x, r)``, the ReLU and the
    identities go (the layer's ``relu`` is the caller's to set)."""
    out = match.layer
    if match.add is not None:
        with graph.inserting_before(match.add):
            out = graph.call_module(match.layer.target, (match.layer.args[0], match.residual))
        out.meta = dict(match.layer.meta)
    for node in (match.relu, match.add, *reversed(match.chain)):
        if node is not None:
            node.replace_all_uses_with(out)
            graph.erase_node(node)
    if out is not match.layer:
        graph.erase_node(match.layer)


def _why_kept(owner):
    """Why ``owner`` cannot be replaced by a GraphModule of its traced forward (``""`` if it can)."""
    if any(getattr(m, h, None) for m in owner.modules() for h in _HOOKS):
        return "has hooks (or a module in it has)"
    methods = sorted({k for klass in type(owner).__mro__ if klass.__module__.split(".")[0] != "torch"
                      for k, v in vars(klass).items()
                      if not k.startswith("_") and k not in ("forward", "extra_repr") and hasattr(type(v), "__get__")})
    if methods:
        return f"has other methods ({', '.join(methods)})"
    if owner._non_persistent_buffers_set:
        return "has non-persistent buffers"
    return ""


def _plain_attributes(owner):
    """``owner``'s public attributes that are neither modules, parameters, buffers nor methods (its
    class's and its own), e.g. torchvision's ``Bottleneck.stride``."""
    attrs = {}
    for klass in reversed(type(owner).__mro__):
        if klass.__module__.split(".")[0] not in ("torch", "builtins"):
            attrs.update({k: v for k, v in vars(klass).items()
                          if not k.startswith("_") and not hasattr(type(v), "__get__")})
    attrs.update({k: v for k, v in vars(owner).items() if not k.startswith("_") and k != "training"})
    return attrs


def _graph_module(owner, graph):
    """``owner`` as a ``torch.fx.GraphModule`` running ``graph``, named as its class, with its
    children, parameters and buffers (the same ``state_dict``), training flag and the
    :func:`_plain_attributes` the GraphModule lacks (kept by ``copy.deepcopy`` too)."""
    gm = torch.fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    for d in ("_modules", "_parameters", "_buffers"):  # the graph's targets only, nested in plain Modules
        getattr(gm, d).clear()
        getattr(gm, d).update(getattr(owner, d))
    gm.training = owner.training
    attrs = {k: v for k, v in _plain_attributes(owner).items() if not hasattr(gm, k)}
    for k, v in attrs.items():
        setattr(gm, k, v)
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = attrs  # GraphModule.__deepcopy__ sets them again
    return gm


def _rewritten(owner, wanted):
    """``(graph, applied, why)``: ``owner`` traced alone with the patterns of the layers in ``wanted``
    (``{id(layer): what}``) rewritten, the ids of those applied; ``graph`` None and why not if none
    can be."""
    why = _why_kept(owner)
    graph, note = (None, why) if why else trace(owner)
    if graph is None:
        return None, set(), note or why
    modules = dict(owner.named_modules())
    state = dict(owner.named_parameters()) | dict(owner.named_buffers())
    if any(n.op == "get_attr" and n.target not in state for n in graph.nodes):
        return None, set(), "reads a tensor that is not a parameter or buffer"
    calls, applied = _call_counts([Unit("", graph, modules)]), set()
    while True:
        match = next((m for m in _matches(graph, modules, calls)
                      if id(modules[m.layer.target]) not in applied
                      and wanted.get(id(modules[m.layer.target])) == m.what), None)
        if match is None:
            break
        _rewrite(graph, match)
        applied.add(id(modules[match.layer.target]))
    if not applied:
        return None, set(), "traced alone, does not show the pattern"
    graph.lint()
    return graph, applied, ""


def fuse_residual_blocks(model):
    """Fuse the residual adds and the shared or functional ReLUs after ``model``'s CSR / CK / block / N:M layers
    into their kernels (module docstring), in place; the model keeps its class, each block holding a
    pattern becomes a ``torch.fx.GraphModule`` in its parents. Returns ``(fused, skipped)``:
    ``{layer name: "residual add + ReLU" / "residual add" / "ReLU"}`` fused, ``{layer name: what was
    not fused and why}`` for patterns found but left (in the model's own forward, a block that
    cannot be replaced)."""
    units, _ = traced_units(model, _unfused)
    calls = _call_counts(units)
    owners, skipped = {}, {}  # id(owner): (path, owner, {id(layer): (layer, name, what)})
    for u in units:
        for m in _matches(u.graph, u.modules, calls):
            name, path = u.prefix + m.layer.target, (u.prefix + _owner(m)).rstrip(".")
            if not path:
                skipped[name] = f"{m.what} not fused: in the model's own forward (the model keeps its class)"
                continue
            owner = model.get_submodule(path)
            layers = owners.setdefault(id(owner), (path, owner, {}))[2]
            layers[id(u.modules[m.layer.target])] = (u.modules[m.layer.target], name, m.what)
    fused = {}
    for path, owner, layers in sorted(owners.values(), key=lambda o: -o[0].count(".")):  # inner blocks first
        graph, applied, why = _rewritten(owner, {i: what for i, (_, _, what) in layers.items()})
        if graph is not None:
            swap_module(model, owner, _graph_module(owner, graph))
        for i, (layer, name, what) in layers.items():
            if i not in applied:
                skipped[name] = f"{what} not fused: {path} {why or 'traced alone, does not show the pattern'}"
                continue
            if what.endswith("ReLU"):
                layer.relu = True
            fused[name] = what
    return fused, skipped


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


#: Whether the C++ library has the CPU max pool (else the separable max runs on CPU too).
_CPP_POOL = has_cpp("max_pool2d")


def _max_taps(x, dim, k, stride, pad, n_out):
    """``y[.., i, ..] = max over r < k of x[.., stride·i + r - pad, ..]`` along ``dim`` for
    ``i < n_out``, positions outside ``x`` being ``-inf`` (one pooling direction): the taps whose
    slice covers every output make ``y`` (one ``torch.maximum``), the border taps update their part
    of it in place (no padded copy of ``x``)."""
    size, whole, part = x.shape[dim], [], []
    for r in range(k):
        i0, i1 = max(0, -(-(pad - r) // stride)), min(n_out, (size - 1 - r + pad) // stride + 1)
        if i0 < i1:
            index = [slice(None)] * x.dim()
            index[dim] = slice(stride * i0 + r - pad, stride * (i1 - 1) + r - pad + 1, stride)
            (whole if (i0, i1) == (0, n_out) else part).append((i0, i1, x[tuple(index)]))
    if len(whole) >= 2:
        y = torch.maximum(whole[0][2], whole[1][2])
        part += whole[2:]
    else:
        shape = list(x.shape)
        shape[dim] = n_out
        y = x.new_full(shape, float("-inf"))
        part += whole
    for i0, i1, src in part:
        y.narrow(dim, i0, i1 - i0).clamp_min_(src)  # in-place maximum (NaN propagates from both)
    return y


class SeparableMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no dilation, ceil_mode or indices), equal to ``F.max_pool2d`` (NaN propagates):
    ``x [N, C, H, W]`` → ``[N, C, H', W']``. On CPU with the C++ library ``sparsekern::max_pool2d``
    (``ops.pool``: one pass per output row); elsewhere a max over the ``kh`` strided row slices of the
    input, then over ``kw`` column slices (:func:`_max_taps`; the padding is ``-inf``: a tap's slice
    covers only the outputs whose window it reaches). A ResNet stem's pool (``[1, 64, 112, 112]``,
    3×3/2, AMD EPYC Zen 3, 1 / 2 threads): torch's CPU kernel 7.2 / 4.1 ms, the separable max 0.62 /
    0.41 ms, the C++ op 0.36 / 0.18 ms (batch 32, 2 threads: 131, 51, 10 ms)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)

    @classmethod
    def supports(cls, m):
        """Whether ``m`` is an ``nn.MaxPool2d`` this module reproduces (dilation 1, no ceil_mode,
        no indices, padding at most half the kernel, as torch requires)."""
        return (type(m) is nn.MaxPool2d and _pair(m.dilation) == (1, 1) and not m.ceil_mode
                and not m.return_indices)

    @classmethod
    def from_dense(cls, m):
        return cls(m.kernel_size, m.stride, m.padding)

    def forward(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if x.dim() != 4:
            raise ValueError(f"SeparableMaxPool2d: expected [N, C, H, W], got {tuple(x.shape)}")
        h_out, w_out = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
        if h_out < 1 or w_out < 1:  # torch's pool raises too
            raise ValueError(f"SeparableMaxPool2d: input {tuple(x.shape)} is smaller than the {kh}×{kw} window "
                             f"with padding ({ph}, {pw}): output would be {h_out}×{w_out}")
        if x.device.type == "cpu" and _CPP_POOL and x.dtype in FLOAT_DTYPES:  # float64 / integers: separable
            return max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return _max_taps(_max_taps(x, 2, kh, sh, ph, h_out), 3, kw, sw, pw, w_out).contiguous()

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def replace_maxpools(model):
    """Swap each supported ``nn.MaxPool2d`` of ``model`` (not the root) for a
    :class:`SeparableMaxPool2d` in place; returns the names swapped."""
    swapped = []
    for name, m in list(model.named_modules()):
        if name and SeparableMaxPool2d.supports(m):
            swap_module(model, m, SeparableMaxPool2d.from_dense(m))
            swapped.append(name)
    return swapped
