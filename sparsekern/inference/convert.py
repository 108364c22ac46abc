"""``convert``: swap each Linear / Conv2d for the fastest of its sparse inference modules, or keep it.

Per layer (input shape captured by running ``example_input`` through the model):

1. **Cost model** (:func:`rank_formats`): the time of each format is predicted from the weight's
   structure, ``overhead + stored values × output columns × cost per multiply-add``, where the
   stored values are ``numel`` (dense), ``nnz`` (csr), ``nnz blocks × bo·bi`` (block, per block
   shape: the block fill decides), ``out·in·n/m`` (nm, only for a weight that is N:M along
   ``in``) or ``alive kernels × R·S`` (ck), and the columns are the batch (Linear), the pixels
   (1×1 conv), the output pixels in wide rows (direct KxK conv) or the output pixels (grouped conv). The costs per multiply-add
   (:data:`COST_NS`) are rough single-thread measurements on AMD EPYC; they only rank.
2. **Measurement**: the best :data:`TOP_K` sparse candidates run against the dense layer on a
   random input of the layer's shape (interleaved, ``reps`` samples each, minimum times); the
   fastest one is measured again against dense, and it replaces the layer only if both
   measurements give at least ``min_speedup``; the report gives the lower of the two speedups
   (times: the minimum over both rounds). So no converted layer measured slower than dense
   ×``min_speedup``.

What each layer kind can become (CPU, fp32): Linear (transformers' ``Conv1D``, stored ``[in, out]``,
as a Linear) and 1×1 conv: csr, block, nm; KxK conv (groups 1, zero padding): csr (direct sparse
conv; strided ones also as :class:`CSRGroupConv2d`, ``kernel=grouped``) and ck (kernel skipping); grouped / depthwise KxK conv (zero padding): csr
(:class:`CSRGroupConv2d`). CPU, bf16 / fp16: Linear and 1×1 conv can become bitmap (:class:`BitmapLinear`,
:class:`BitmapConv1x1`). Other bf16 / fp16 convs, convs with string or non-zero padding modes and layers not run by
``example_input`` stay dense. Before the layers, eval BatchNorms are folded into their convs
and max pools swapped for a faster one (``fold_bn``, ``fast_pool``: ``sparsekern.inference.fuse``); after
them, the ReLU after a converted CSR / CK / block / N:M layer runs in it (``fuse_relu``), and so do the
residual add and shared / functional ReLU of a residual block (``fuse_blocks``).

**The batch matters**: each format is measured at the layer's input shape, and the best format
at batch 1 (a mat-vec) is not the best at batch 64. Pass ``example_input`` with the batch the
model will run, or ``batch_size=``; without either, convert warns and measures batch 1.

**Layers read from outside.** A converted module has no dense ``weight`` (and a 1×1 conv's has an
int ``stride``, no ``kernel_size``), so a layer that something else reads stays dense, the reason
in the report:

* its ``weight`` is read functionally on some path, seen without running the model: torch's
  ``nn.MultiheadAttention.out_proj`` (its weight goes to ``F.multi_head_attention_forward``; its
  own forward never runs) and a batch-first ``nn.TransformerEncoderLayer``'s ``linear1`` /
  ``linear2`` (its eval fast path passes their weights to one fused op); for other classes, an
  ancestor whose ``forward`` source reads ``self.<path>.weight`` (``F.linear(x, self.qkv.weight)``,
  T5's ``self.wo.weight.dtype``), whichever branch the example takes;
* with ``example_input``, the model runs once (eval, no grad) with each candidate's class swapped
  for a recording subclass (not hooks: torch's encoder layer leaves its fast path when a module
  has hooks, so a hook would see another path than inference takes). A candidate is converted
  only if its own forward ran and every attribute read from outside its forward exists on the
  sparse module with the same value: ``weight`` never does (the point of converting is not to
  keep a dense copy, and a reader may compute with it), so such a layer stays dense, the reader
  named; other attributes are compared per candidate format (MobileNetV2's TF padding reads
  ``conv.stride`` / ``kernel_size`` / ``dilation``: its KxK convs convert, its 1×1 convs, whose
  sparse modules hold an int ``stride``, stay dense);
* a Linear / Conv2d subclass that overrides ``forward`` (or ``_conv_forward``) stays dense: the
  sparse module would run ``nn.Linear``'s computation, not its own.

Without ``example_input`` only the static checks apply: readers reached through function
arguments or other names cannot be seen, so pass ``example_input`` for third-party models.

On CUDA (unverified, no GPU here) a Linear with an exactly 2:4 fp16/bf16 weight of a shape torch's semi-structured
kernels take (``supports_semi_structured``) may become a :class:`SemiStructuredLinear` (compute
capability >= 8.0), and block / nm once the Triton kernels are wired in
(``sparsekern.ops._common.HAS_TRITON``).
"""
import inspect
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops._common import HAS_TRITON, check_number
from .formats import block_fill, nm_pattern
from .functional import conv_geometry
from .fuse import (batchnorm_pairs, fold_batchnorm, fuse_relu as fuse_relus, fuse_residual_blocks, replace_maxpools,
                   swap_module)
from .modules import (BitmapConv1x1, BitmapLinear, BSRConv1x1, BSRLinear, CKConv2d, CSRConv1x1, CSRConv2d, CSRGroupConv2d,
                      CSRLinear, NMConv1x1, NMLinear, SemiStructuredLinear, supports_conv, supports_conv1x1,
                      supports_group_conv, supports_semi_structured)

#: Formats ``convert`` can choose from (``formats=`` restricts the sparse ones).
FORMATS = ("dense", "csr", "block", "nm", "ck", "2:4", "bitmap")

#: Block shapes ``(bo, bi)`` the cost model considers for the block format.
BLOCK_SHAPES = ((4, 4), (8, 8), (16, 16), (4, 1), (1, 8))

#: Nanoseconds per stored multiply-add per output column, by regime: ``mv`` (Linear, batch 1),
#: ``mm`` (Linear batch > 1, 1×1 conv), ``conv`` (KxK conv, direct), ``group`` (grouped / depthwise
#: conv: torch's dense one, csr_group_conv). Block: by block rows ``bo`` (4+ rows share each input
#: row load) for mm, by ``bi`` (contiguous input) for mv. Measured on AMD EPYC, 1 thread, 4096²
#: Linear, ResNet-50 conv shapes at 90 % and MobileNetV1's depthwise convs at STR's 89 % budget
#: (rough: they only rank).
COST_NS = {
    "mv": {"dense": 0.17, "csr": 0.45, "nm": 0.45, "block": lambda bo, bi: 0.30 if bi >= 4 else 0.6},
    "mm": {"dense": 0.02, "csr": 0.04, "nm": 0.035,
           "block": lambda bo, bi: 0.021 if bo >= 4 else 0.033 if bo == 2 else 0.06},
    "conv": {"dense": 0.013, "csr": 0.04, "ck": 0.038},
    "group": {"dense": 0.2, "csr": 0.3},  # csr: fixed costs per pixel (copy, tiles) in its rate
}
#: bf16 / fp16 Linear and 1×1 conv (CPU): nanoseconds per weight (stored or not: the bitmap kernel's work is
#: per column group) per row of x, by regime; AMD EPYC (AVX2), 1 thread, 11008×4096 at batch 1.
COST_NS_16 = {"mv": {"dense": 0.22, "bitmap": 0.15}, "mm": {"dense": 0.02, "bitmap": 0.1}}
#: Fixed microseconds per call (module, dispatch: the sparse modules call the C++ kernels
#: directly) and per image (a direct conv's copy into its padded buffer; one kernel call per
#: group of images).
OVERHEAD_US = {"dense": 4.0, "sparse": 7.0, "image": 1.0}
#: Sparse candidates measured against dense per layer.
TOP_K = 3
#: Input shapes used when ``example_input`` is None: Linear ``[1, in]`` (batch 1),
#: Conv2d ``[1, C, 14, 14]``.
DEFAULT_CONV_HW = 14


@dataclass
class Candidate:
    """One format for one layer: ``build()`` makes the module; ``predicted_ms`` from the cost model."""
    format: str
    params: dict = field(default_factory=dict)
    predicted_ms: float = 0.0
    build: object = None

    def describe(self):
        return self.format + "".join(f" {k}={v}" for k, v in self.params.items())


@dataclass
class LayerReport:
    """One row of the conversion report (times in ms for one call on ``input_shape``)."""
    name: str
    kind: str
    input_shape: tuple
    density: float
    format: str
    params: str = ""
    dense_ms: float = None
    sparse_ms: float = None
    speedup: float = None
    predicted: float = None
    note: str = ""


class ConversionReport(list):
    """The :class:`LayerReport` rows of a :func:`convert` call; ``str()`` is a table."""

    def __str__(self):
        f = (lambda v, spec: format(v, spec) if v is not None else "-")
        rows = [f"{'layer':<28} {'kind':<8} {'input':<20} {'density':>7} {'format':<16} "
                f"{'dense ms':>9} {'sparse ms':>9} {'speedup':>7} {'predicted':>9}  note"]
        for r in self:
            fmt = (r.format + " " + r.params).strip()
            rows.append(f"{r.name or '<model>':<28} {r.kind:<8} {str(list(r.input_shape)):<20} "
                        f"{r.density:>7.3f} {fmt:<16} {f(r.dense_ms, '9.3f'):>9} "
                        f"{f(r.sparse_ms, '9.3f'):>9} {f(r.speedup, '7.2f'):>7} "
                        f"{f(r.predicted, '9.2f'):>9}  {r.note}")
        return "\n".join(rows)


def _hf_conv1d_class(m):
    """transformers' ``Conv1D`` class if ``m`` is one (``x @ weight + bias``, weight ``[in, out]``),
    else None; found by name so that transformers need not be imported."""
    for cls in type(m).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return cls
    return None


def _linear_view(m):
    """``m`` as an ``nn.Linear`` for the cost model and the builders: itself, or for a
    transformers ``Conv1D`` a Linear holding its weight transposed (``[out, in]``) and its bias."""
    if isinstance(m, nn.Linear) or _hf_conv1d_class(m) is None:
        return m
    w = m.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
    return lin.eval()


def layer_kind(m):
    """``"Linear"`` (``nn.Linear`` or transformers' ``Conv1D``), ``"Conv1x1"``, ``"Conv2d"`` (KxK,
    direct), ``"GroupConv2d"`` (groups > 1) or None (stays dense)."""
    if isinstance(m, nn.Linear) or (_hf_conv1d_class(m) is not None and m.weight.dim() == 2):
        return "Linear"
    if supports_conv1x1(m):
        return "Conv1x1"
    if supports_conv(m):
        return "Conv2d"
    if supports_group_conv(m):
        return "GroupConv2d"
    return None


def _device_formats(w):
    """The sparse formats with fast kernels for ``w``'s device and dtype."""
    if w.device.type == "cpu":
        if w.dtype == torch.float32:
            return {"csr", "block", "nm", "ck"}
        return {"bitmap"} if w.dtype in (torch.bfloat16, torch.float16) else set()
    if w.device.type == "cuda":  # UNVERIFIED: written without a GPU
        fmts = {"block", "nm"} if HAS_TRITON and w.dtype == torch.float32 else set()
        if w.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(w.device) >= (8, 0):
            fmts.add("2:4")
        return fmts
    return set()


def rank_formats(module, input_shape, formats=None):
    """The cost model: the :class:`Candidate` formats of ``module`` (an ``nn.Linear`` /
    ``nn.Conv2d``) for an input of ``input_shape``, fastest predicted first; always includes
    ``dense``. ``formats``: the sparse formats allowed (default: all of :data:`FORMATS`)."""
    kind = layer_kind(module)
    module = _linear_view(module)
    w = module.weight.detach()
    allowed = _device_formats(w) & set(FORMATS if formats is None else formats)
    if kind is None:
        return [Candidate("dense", {}, 0.0, lambda: module)]
    shape = tuple(input_shape)
    if kind == "Linear":
        images, cols = 0, math.prod(shape[:-1])
        dense_cols, regime = cols, "mv" if cols == 1 else "mm"
    else:
        images = shape[0]
        hq, wq, h_out, w_out = conv_geometry(shape[2], shape[3], module.kernel_size, module.stride,
                                             module.padding, module.dilation)
        dense_cols = images * h_out * w_out
        cols = images * h_out * wq if kind == "Conv2d" else dense_cols  # direct conv: wide rows
        regime = {"Conv1x1": "mm", "Conv2d": "conv", "GroupConv2d": "group"}[kind]
    costs = COST_NS[regime]
    if w.dtype != torch.float32 and kind in ("Linear", "Conv1x1"):
        costs = COST_NS_16[regime]

    def predict(stored, c, c_cols, sparse=True):  # ms
        over = OVERHEAD_US["sparse" if sparse else "dense"] + (OVERHEAD_US["image"] * images if sparse else 0)
        return (over * 1e3 + stored * c_cols * c) * 1e-6

    cands = [Candidate("dense", {}, predict(w.numel(), costs["dense"], dense_cols, False), lambda: module)]
    if not allowed:
        return cands
    w2 = w.reshape(w.shape[0], -1)
    nnz = int((w2 != 0).sum())
    builders = {"Linear": (CSRLinear, BSRLinear, NMLinear), "Conv1x1": (CSRConv1x1, BSRConv1x1, NMConv1x1),
                "Conv2d": (CSRConv2d, None, None), "GroupConv2d": (CSRGroupConv2d, None, None)}[kind]
    if "csr" in allowed:
        cands.append(Candidate("csr", {}, predict(nnz, costs["csr"], cols), lambda: builders[0].from_dense(module)))
    if "block" in allowed and builders[1] is not None:
        for bo, bi in BLOCK_SHAPES:
            stored = nnz / block_fill(w2, (bo, bi))
            cands.append(Candidate("block", {"block": (bo, bi)}, predict(stored, costs["block"](bo, bi), cols),
                                   lambda b=(bo, bi): builders[1].from_dense(module, block=b)))
    if "nm" in allowed and builders[2] is not None:
        pattern = nm_pattern(w2)
        if pattern is not None:
            n, m = pattern
            cands.append(Candidate("nm", {"n": n, "m": m}, predict(w2.numel() * n / m, costs["nm"], cols),
                                   lambda: builders[2].from_dense(module, n=n, m=m)))
    if "csr" in allowed and kind == "Conv2d" and tuple(module.stride) != (1, 1):
        # strided: csr_group_conv (groups 1) splits the stride phases in its C++ copy, where the direct
        # conv's strided torch copy costs as much as the conv at 56×56 (measured, with the others)
        cands.append(Candidate("csr", {"kernel": "grouped"}, predict(nnz, costs["csr"], dense_cols),
                               lambda: CSRGroupConv2d.from_dense(module)))
    if "ck" in allowed and kind == "Conv2d":
        kernels = int((w.reshape(w.shape[0], w.shape[1], -1) != 0).any(-1).sum())
        stored = kernels * module.kernel_size[0] * module.kernel_size[1]
        cands.append(Candidate("ck", {}, predict(stored, costs["ck"], cols), lambda: CKConv2d.from_dense(module)))
    if "bitmap" in allowed and kind in ("Linear", "Conv1x1"):
        bitmap = BitmapLinear if kind == "Linear" else BitmapConv1x1
        cands.append(Candidate("bitmap", {}, predict(w.numel(), costs["bitmap"], cols),
                               lambda: bitmap.from_dense(module)))
    if "2:4" in allowed and kind == "Linear" and supports_semi_structured(w):  # UNVERIFIED (CUDA)
        cands.append(Candidate("2:4", {}, cands[0].predicted_ms * 0.7,
                               lambda: SemiStructuredLinear.from_dense(module)))
    return sorted(cands, key=lambda c: c.predicted_ms)


def _time_pair(a, b, x, reps):
    """Minimum seconds per call of ``a(x)`` and ``b(x)``, sampled alternately. On CUDA each
    sample starts and ends with ``torch.cuda.synchronize``: it times the kernels, not their launch."""
    cuda = x.device.type == "cuda"

    def sample(f, n):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        for _ in range(n):
            f(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        return (time.perf_counter() - t0) / n

    a(x), b(x)
    inner = max(1, min(100, int(2e-3 / max(sample(a, 1), 1e-7))))
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, f in enumerate((a, b)):
            best[i] = min(best[i], sample(f, inner))
    return best


def _overridden(m):
    """Why ``m``'s computation is not the one a sparse module would run (a subclass overriding
    ``forward``), or None."""
    conv1d = _hf_conv1d_class(m)
    base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d if isinstance(m, nn.Conv2d) else conv1d
    methods = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
    changed = [f for f in methods if getattr(type(m), f) is not getattr(base, f)]
    if changed:
        return f"{type(m).__name__} overrides {base.__name__}.{changed[0]}: a sparse module would not run it"
    return None


def _functional_readers(model):
    """``{id(module): note}``: layers whose weight is read without their forward on some path:
    torch's known cases (``nn.MultiheadAttention.out_proj``, a batch-first
    ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``), and for other classes an
    ancestor whose ``forward`` source reads ``self.<path>.weight`` (a path not taken by
    ``example_input``, or no ``example_input`` at all)."""
    out = {}
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, nn.MultiheadAttention) and isinstance(getattr(mod, "out_proj", None), nn.Module):
            out[id(mod.out_proj)] = ("kept dense: nn.MultiheadAttention reads out_proj.weight functionally "
                                     "(F.multi_head_attention_forward; out_proj's forward never runs)")
        if isinstance(mod, nn.TransformerEncoderLayer) and mod.self_attn.batch_first:
            for attr in ("linear1", "linear2"):
                child = getattr(mod, attr, None)
                if isinstance(child, nn.Module):
                    out[id(child)] = (f"kept dense: nn.TransformerEncoderLayer's fast path (eval, batch_first) "
                                      f"reads {attr}.weight functionally")
    for name, mod in modules.items():
        if not name or id(mod) in out or not (isinstance(mod, (nn.Linear, nn.Conv2d)) or _hf_conv1d_class(mod)):
            continue
        parts = name.split(".")
        for i in range(len(parts)):
            ancestor, path = modules.get(".".join(parts[:i])), ".".join(parts[i:])
            reader = _source_reader(type(ancestor), path) if ancestor is not None else None
            if reader:
                out[id(mod)] = f"kept dense: {reader} reads self.{path}.weight"
                break
    return out


_SOURCES = {}


def _source_reader(cls, path):
    """The ``forward`` (``Class.forward``) in ``cls``'s MRO, outside torch, whose source reads
    ``self.<path>.weight``, or None."""
    pattern = re.compile(rf"\bself\.{re.escape(path)}\.weight\b")
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "torch" or "forward" not in klass.__dict__:
            continue
        if klass not in _SOURCES:
            try:
                _SOURCES[klass] = inspect.getsource(klass.__dict__["forward"])
            except (OSError, TypeError):  # no source (built in, generated, a REPL)
                _SOURCES[klass] = ""
        if pattern.search(_SOURCES[klass]):
            return f"{klass.__qualname__}.forward"
    return None


@dataclass
class _Seen:
    """What the probe forward saw of one candidate."""
    ran: bool = False
    input_shape: tuple = None
    depth: int = 0
    reads: dict = field(default_factory=dict)  # attribute read from outside its forward -> reader


def _reader(frame):
    code = frame.f_code
    return f"{getattr(code, 'co_qualname', code.co_name)} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"


def _is_state(module, name):
    """Whether ``module.name`` is data (instance attribute, parameter, buffer or property), not a method."""
    d = object.__getattribute__(module, "__dict__")
    if name in d or name in d.get("_parameters", ()) or name in d.get("_buffers", ()):
        return True
    for klass in type(module).__mro__:
        if name in klass.__dict__:
            return isinstance(klass.__dict__[name], property)
    return False


_PROBES = {}


def _probe_class(cls):
    """``cls`` with a forward that records its runs and input shape, and a ``__getattribute__`` that
    records data attributes read while its forward is not running (by whom); cached per class."""
    if cls not in _PROBES:
        def forward(self, *args, **kwargs):
            seen = _Probe.seen[id(self)]
            seen.ran = True
            if seen.input_shape is None and args and isinstance(args[0], torch.Tensor):
                seen.input_shape = tuple(args[0].shape)
            seen.depth += 1
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                seen.depth -= 1

        def __getattribute__(self, name):
            if not name.startswith("_") and name != "training":  # the mode: converted modules are eval-only
                seen = _Probe.seen.get(id(self))
                if seen is not None and seen.depth == 0 and name not in seen.reads and _is_state(self, name):
                    seen.reads[name] = _reader(sys._getframe(1))
            return cls.__getattribute__(self, name)

        _PROBES[cls] = type(f"_Probe{cls.__name__}", (cls,), {"forward": forward, "__getattribute__": __getattribute__,
                                                              "__module__": cls.__module__})
    return _PROBES[cls]


class _Probe:
    seen = {}  # id(module) -> _Seen, during a probe


def _probe(model, candidates, example_input):
    """``{name: _Seen}`` of each candidate when ``model(example_input)`` runs (eval, no grad), each
    candidate's class swapped for its :func:`_probe_class` meanwhile (not hooks: module docstring)."""
    seen = {id(m): _Seen() for _, m in candidates}
    was_training = model.training
    model.eval()
    swapped = []
    try:
        for _, m in candidates:
            if id(m) in _Probe.seen:
                continue  # a module listed twice
            cls = type(m)
            try:
                m.__class__ = _probe_class(cls)
            except TypeError:  # a class that cannot be subclassed or reassigned: not observed (stays dense)
                seen[id(m)].reads["__class__"] = f"{cls.__qualname__} (its class cannot be swapped to observe it)"
                continue
            _Probe.seen[id(m)] = seen[id(m)]
            swapped.append((m, cls))
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            _Probe.seen.pop(id(m), None)
        model.train(was_training)
    return {name: seen[id(m)] for name, m in candidates}


_MISSING = object()


def _differs(a, b):
    """Whether a reader of ``a`` could see something else in ``b`` (tensors: values, dtype, device)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (type(a) in (torch.Tensor, nn.Parameter) and type(b) in (torch.Tensor, nn.Parameter)):
            return True
        return a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b)
    try:
        return not bool(a == b)
    except Exception:  # noqa: BLE001 (any comparison failure: not the same)
        return True


def _incompatible(dense, sparse, reads):
    """The attributes read from outside ``dense``'s forward that ``sparse`` lacks or holds differently."""
    return [n for n in reads if _differs(getattr(dense, n), getattr(sparse, n, _MISSING))]


def _choose(m, row, cands, x, min_speedup, reps, reads=None):
    """Measure the top sparse candidates vs dense, confirm the fastest; returns the module or None.
    ``reads``: attributes of ``m`` read from outside its forward (reader); a candidate that lacks
    one or holds it differently is not used."""
    dense_pred = next(c.predicted_ms for c in cands if c.format == "dense")
    trials, refused = [], {}
    with torch.no_grad():
        for c in [c for c in cands if c.format != "dense"]:
            if len(trials) == TOP_K:
                break
            sparse = c.build().eval()
            bad = _incompatible(m, sparse, reads or {})
            if bad:
                what = ", ".join(f".{n} (read by {reads[n]})" for n in bad)
                refused.setdefault(what, []).append(type(sparse).__name__)
                continue
            td, ts = _time_pair(m, sparse, x, reps)
            trials.append((td / ts, td, ts, c, sparse))
        if not trials:
            row.note = "no sparse format for this layer on this device"
            if refused:
                row.note = "kept dense: " + "; ".join(f"{what}: {', '.join(sorted(set(cls)))} would differ"
                                                      for what, cls in refused.items())
            return None
        speedup, td, ts, c, sparse = max(trials, key=lambda t: t[0])
        if speedup >= min_speedup:  # confirm against noise: a second measurement must agree
            td2, ts2 = _time_pair(m, sparse, x, reps)
            speedup = min(speedup, td2 / ts2)
            td, ts = min(td, td2), min(ts, ts2)
    row.dense_ms, row.sparse_ms, row.speedup = td * 1e3, ts * 1e3, speedup
    tried = ", ".join(f"{t[3].describe()} {t[0]:.2f}x" for t in trials)
    if speedup >= min_speedup:
        row.format, row.predicted = c.format, dense_pred / c.predicted_ms
        row.params = " ".join(f"{k}={v}" for k, v in c.params.items())
        row.note = f"measured {tried}"
        return sparse
    row.note = f"below min_speedup {min_speedup:g} (measured {tried})"
    return None


def convert(model, min_speedup=1.0, example_input=None, reps=5, formats=None, return_report=False,
            fold_bn=True, batch_size=None, fast_pool=True, fuse_relu=True, fuse_blocks=True):
    """Replace each ``nn.Linear`` / ``nn.Conv2d`` (and transformers' ``Conv1D``) of ``model`` (in
    place) by the sparse inference module that the cost model ranks best and a measurement
    confirms at least ``min_speedup``× faster than the dense layer on this device (module
    docstring); others stay dense, never an error for a layer it cannot take.

    example_input: a tensor (or tuple of positional arguments) run once through ``model`` to
    capture each layer's input shape and what reads the layers from outside their forward;
    measurements use random inputs of those shapes. Layers not run by ``example_input``, or whose
    ``weight`` (or another attribute a sparse module lacks) is read from outside their forward, stay
    dense. Without it, Linear layers are measured at ``[1, in]`` and convs at ``[1, C, 14, 14]``,
    and only the static checks keep layers dense (torch's known functional readers:
    ``nn.MultiheadAttention.out_proj``, a batch-first ``nn.TransformerEncoderLayer``'s
    linear1/linear2; an ancestor's ``forward`` source reading ``self.<path>.weight``; a subclass
    overriding ``forward``), so pass it for third-party models. formats: the sparse formats
    allowed (subset of ``("csr", "block", "nm", "ck", "2:4")``; default all). Returns the model, or
    ``(model, report)`` with ``return_report``: a :class:`ConversionReport` (format, density,
    measured times and speedup, predicted speedup per layer; a dense layer's note says why).
    Converted modules are eval-only.

    fold_bn: first fold each eval ``BatchNorm2d`` that only follows a ``Conv2d`` into that conv
    (``sparsekern.inference.fuse``: in the model, or its largest sub-modules, that ``torch.fx`` can
    trace; the BatchNorm becomes ``nn.Identity``, the conv gets a bias; zeros stay zero). The folded
    model's outputs equal the original's within fp32 rounding.

    fuse_relu: then fuse each ``nn.ReLU`` module whose only input is a converted CSR / CK / block / N:M layer's
    output (through a folded BatchNorm's identity) and that runs nowhere else into that layer's
    kernel (``fuse.fuse_relu``: the layer's ``relu`` set, the ReLU an ``nn.Identity``; the model
    keeps its class). Functional ReLUs and ReLU modules reused elsewhere (ResNet's ``self.relu``)
    are ``fuse_blocks``' job.

    fuse_blocks: then fuse into each CSR / CK / block / N:M layer (relu not fused yet) the residual add its output
    goes to (``out += identity``: the layer's residual epilogue) and the ReLU after the add or after
    the layer, whatever ReLU it is (``fuse.fuse_residual_blocks``): each block holding such a
    pattern becomes a ``torch.fx.GraphModule`` of its rewritten forward in its parents (same
    children, ``state_dict``, attributes); the model keeps its class, and patterns in its own
    forward stay. Report notes: ``residual add + ReLU fused`` etc., or why not.

    fast_pool: swap each ``nn.MaxPool2d`` (dilation 1, no ceil_mode / indices) for
    ``fuse.SeparableMaxPool2d`` (same outputs; on CPU ``sparsekern::max_pool2d``; torch's CPU max
    pool took ~10 % of a converted ResNet-50 at batch 1).

    batch_size: without ``example_input``, the batch (Linear: rows; Conv2d: images of 14×14) the
    layers are measured at, i.e. the batch the model will run; default 1 with a warning, since a
    format chosen at batch 1 (mat-vec) can be slower than dense at batch 64 and the other way round.
    With ``example_input`` its shapes are used and ``batch_size`` must be None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    min_speedup = check_number(min_speedup, "min_speedup", lo=0.0)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"convert: reps must be a positive int, got {reps!r}")
    if formats is not None:
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        unknown = set(formats) - set(FORMATS[1:])
        if unknown:
            raise ValueError(f"convert: unknown formats {sorted(unknown)}; choose from {FORMATS[1:]}")
    if batch_size is not None:
        if example_input is not None:
            raise ValueError("convert: pass either example_input or batch_size, not both")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"convert: batch_size must be a positive int, got {batch_size!r}")
    elif example_input is None:
        warnings.warn("convert: no example_input and no batch_size: each layer is measured at batch 1 "
                      "(Linear [1, in], Conv2d [1, C, 14, 14]) and its format chosen for that batch; pass "
                      "example_input (a batch as the model will run) or batch_size=", stacklevel=2)
    batch = batch_size or 1
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) or _hf_conv1d_class(m) is not None]
    seen = _probe(model, candidates, example_input) if example_input is not None else None
    functional = _functional_readers(model)
    # the model changes only from here on (the probe forward above may raise)
    pairs = batchnorm_pairs(model)[0] if fold_bn else []
    folded = fold_batchnorm(model, pairs)
    if fast_pool:
        replace_maxpools(model)
    report = ConversionReport()
    for name, m in candidates:
        kind = layer_kind(m)
        w = m.weight.detach()
        density = float((w != 0).sum()) / max(1, w.numel())
        row = LayerReport(name, kind or "Conv2d", (), density, "dense")
        report.append(row)
        if kind is None:
            row.note = "conv with string padding or a non-zero padding mode" if isinstance(m, nn.Conv2d) else \
                f"{type(m).__name__} weight of shape {tuple(w.shape)}"
            continue
        if _hf_conv1d_class(m) is not None:
            row.kind = "Conv1D"
        note = _overridden(m) or functional.get(id(m))
        if note:
            row.note = note
            continue
        if not _device_formats(w):
            row.note = f"dtype {w.dtype}: no sparse kernels on {w.device.type}"
            continue
        reads = {}
        if seen is not None:
            s = seen[name]
            if "weight" in s.reads:
                row.note = f"kept dense: .weight read outside its forward by {s.reads['weight']}"
                continue
            if "__class__" in s.reads:
                row.note = f"kept dense: not observed, {s.reads['__class__']}"
                continue
            if not s.ran:
                row.note = "not run by example_input"
                continue
            reads = s.reads
            if kind != "Linear" and len(s.input_shape or ()) != 4:
                row.note = f"input {s.input_shape}: the sparse convs take [N, C, H, W]"
                continue
            row.input_shape = s.input_shape
        else:
            row.input_shape = (batch, w.shape[1]) if kind == "Linear" and isinstance(m, nn.Linear) else \
                (batch, w.shape[0]) if kind == "Linear" else (batch, m.in_channels, DEFAULT_CONV_HW, DEFAULT_CONV_HW)
        x = torch.randn(row.input_shape, device=w.device, dtype=w.dtype)
        sparse = _choose(m, row, rank_formats(m, row.input_shape, formats), x, min_speedup, reps, reads)
        if name in folded:
            row.note = f"{folded[name]} folded; {row.note}"
        if sparse is not None:
            if name:
                swap_module(model, m, sparse)  # everywhere: a module shared by two parents
            else:
                model = sparse
    if fuse_relu:
        fused = fuse_relus(model)
        for row in report:
            if row.name in fused:
                row.note = f"{row.note}; ReLU fused"
    if fuse_blocks:
        fused, skipped = fuse_residual_blocks(model)
        for row in report:
            if row.name in fused:
                row.note = f"{row.note}; {fused[row.name]} fused"
            elif row.name in skipped:
                row.note = f"{row.note}; {skipped[row.name]}"
    return (model, report) if return_report else model
