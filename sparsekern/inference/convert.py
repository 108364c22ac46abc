"""``convert``: swap each Linear / Conv2d for the fastest of its sparse inference modules, or keep it.

Per layer (input shape captured by running ``example_input`` through the model):

1. **Cost model** (:func:`rank_formats`): the time of each format is predicted from the weight's
   structure, ``overhead + stored values × output columns × cost per multiply-add``, where the
   stored values are ``numel`` (dense), ``nnz`` (csr), ``nnz blocks × bo·bi`` (block, per block
   shape: the block fill decides), ``out·in·n/m`` (nm, only for a weight that is N:M along
   ``in``) or ``alive kernels × R·S`` (ck), and the columns are the batch (Linear), the pixels
   (1×1 conv) or the output pixels in wide rows (direct KxK conv). The costs per multiply-add
   (:data:`COST_NS`) are rough single-thread measurements on AMD EPYC; they only rank.
2. **Measurement**: the best :data:`TOP_K` sparse candidates run against the dense layer on a
   random input of the layer's shape (interleaved, ``reps`` samples each, minimum times); the
   fastest one is measured again against dense, and it replaces the layer only if both
   measurements give at least ``min_speedup``; the report gives the lower of the two speedups
   (times: the minimum over both rounds). So no converted layer measured slower than dense
   ×``min_speedup``.

What each layer kind can become (CPU, fp32): Linear and 1×1 conv: csr, block, nm; KxK conv
(groups 1, zero padding): csr (direct sparse conv) and ck (kernel skipping). Grouped / depthwise
convs, other dtypes and layers not run by ``example_input`` stay dense. On CUDA (unverified, no
GPU here) a Linear with an exactly 2:4 fp16/bf16 weight of a shape torch's semi-structured
kernels take (``supports_semi_structured``) may become a :class:`SemiStructuredLinear` (compute
capability >= 8.0), and block / nm once the Triton kernels are wired in
(``sparsekern.ops.spmm.KERNELS.triton``).
"""
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import spmm
from ..ops._common import check_number
from .modules import (BSRConv1x1, BSRLinear, CKConv2d, CSRConv1x1, CSRConv2d, CSRLinear, NMConv1x1,
                      NMLinear, SemiStructuredLinear, supports_conv, supports_conv1x1,
                      supports_semi_structured)

#: Formats ``convert`` can choose from (``formats=`` restricts the sparse ones).
FORMATS = ("dense", "csr", "block", "nm", "ck", "2:4")

#: Block shapes ``(bo, bi)`` the cost model considers for the block format.
BLOCK_SHAPES = ((4, 4), (8, 8), (16, 16), (4, 1), (1, 8))

#: Nanoseconds per stored multiply-add per output column, by regime: ``mv`` (Linear, batch 1),
#: ``mm`` (Linear batch > 1, 1×1 conv), ``conv`` (KxK conv, direct). Block: by block rows ``bo``
#: (4+ rows share each input row load) for mm, by ``bi`` (contiguous input) for mv. Measured on
#: AMD EPYC, 1 thread, 4096² Linear and ResNet-50 conv shapes at 90 % (rough: they only rank).
COST_NS = {
    "mv": {"dense": 0.17, "csr": 0.45, "nm": 0.45, "block": lambda bo, bi: 0.30 if bi >= 4 else 0.6},
    "mm": {"dense": 0.02, "csr": 0.04, "nm": 0.035,
           "block": lambda bo, bi: 0.021 if bo >= 4 else 0.033 if bo == 2 else 0.06},
    "conv": {"dense": 0.013, "csr": 0.04, "ck": 0.038},
}
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


def layer_kind(m):
    """``"Linear"``, ``"Conv1x1"``, ``"Conv2d"`` (KxK, direct) or None (stays dense)."""
    if isinstance(m, nn.Linear):
        return "Linear"
    if supports_conv1x1(m):
        return "Conv1x1"
    if supports_conv(m):
        return "Conv2d"
    return None


def _device_formats(w):
    """The sparse formats with fast kernels for ``w``'s device and dtype."""
    if w.device.type == "cpu":
        return {"csr", "block", "nm", "ck"} if w.dtype == torch.float32 else set()
    if w.device.type == "cuda":  # UNVERIFIED: written without a GPU
        fmts = {"block", "nm"} if spmm.KERNELS.triton and w.dtype == torch.float32 else set()
        if w.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(w.device) >= (8, 0):
            fmts.add("2:4")
        return fmts
    return set()


def rank_formats(module, input_shape, formats=None):
    """The cost model: the :class:`Candidate` formats of ``module`` (an ``nn.Linear`` /
    ``nn.Conv2d``) for an input of ``input_shape``, fastest predicted first; always includes
    ``dense``. ``formats``: the sparse formats allowed (default: all of :data:`FORMATS`)."""
    kind = layer_kind(module)
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
        hq, wq, h_out, w_out = spmm.conv_geometry(shape[2], shape[3], module.kernel_size, module.stride,
                                                  module.padding, module.dilation)
        dense_cols = images * h_out * w_out
        cols = dense_cols if kind == "Conv1x1" else images * h_out * wq  # direct conv: wide rows
        regime = "mm" if kind == "Conv1x1" else "conv"
    costs = COST_NS[regime]

    def predict(stored, c, c_cols, sparse=True):  # ms
        over = OVERHEAD_US["sparse" if sparse else "dense"] + (OVERHEAD_US["image"] * images if sparse else 0)
        return (over * 1e3 + stored * c_cols * c) * 1e-6

    cands = [Candidate("dense", {}, predict(w.numel(), costs["dense"], dense_cols, False), lambda: module)]
    if not allowed:
        return cands
    w2 = w.reshape(w.shape[0], -1)
    nnz = int((w2 != 0).sum())
    builders = {"Linear": (CSRLinear, BSRLinear, NMLinear), "Conv1x1": (CSRConv1x1, BSRConv1x1, NMConv1x1),
                "Conv2d": (CSRConv2d, None, None)}[kind]
    if "csr" in allowed:
        cands.append(Candidate("csr", {}, predict(nnz, costs["csr"], cols), lambda: builders[0].from_dense(module)))
    if "block" in allowed and builders[1] is not None:
        for bo, bi in BLOCK_SHAPES:
            stored = nnz / spmm.block_fill(w2, (bo, bi))
            cands.append(Candidate("block", {"block": (bo, bi)}, predict(stored, costs["block"](bo, bi), cols),
                                   lambda b=(bo, bi): builders[1].from_dense(module, block=b)))
    if "nm" in allowed and builders[2] is not None:
        pattern = spmm.nm_pattern(w2)
        if pattern is not None:
            n, m = pattern
            cands.append(Candidate("nm", {"n": n, "m": m}, predict(w2.numel() * n / m, costs["nm"], cols),
                                   lambda: builders[2].from_dense(module, n=n, m=m)))
    if "ck" in allowed and kind == "Conv2d":
        kernels = int((w.reshape(w.shape[0], w.shape[1], -1) != 0).any(-1).sum())
        stored = kernels * module.kernel_size[0] * module.kernel_size[1]
        cands.append(Candidate("ck", {}, predict(stored, costs["ck"], cols), lambda: CKConv2d.from_dense(module)))
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


def _input_shapes(model, candidates, example_input):
    """Each candidate's first input shape when ``model(example_input)`` runs (eval, no grad)."""
    shapes, hooks = {}, []
    for name, m in candidates:
        def hook(mod, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def _set_module(model, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _choose(m, row, cands, x, min_speedup, reps):
    """Measure the top sparse candidates vs dense, confirm the fastest; returns the module or None."""
    dense_pred = next(c.predicted_ms for c in cands if c.format == "dense")
    trials = []
    with torch.no_grad():
        for c in [c for c in cands if c.format != "dense"][:TOP_K]:
            sparse = c.build().eval()
            td, ts = _time_pair(m, sparse, x, reps)
            trials.append((td / ts, td, ts, c, sparse))
        if not trials:
            row.note = "no sparse format for this layer on this device"
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


def convert(model, min_speedup=1.0, example_input=None, reps=5, formats=None, return_report=False):
    """Replace each ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (in place) by the sparse inference
    module that the cost model ranks best and a measurement confirms at least ``min_speedup``×
    faster than the dense layer on this device (module docstring); others stay dense.

    example_input: a tensor (or tuple of positional arguments) run once through ``model`` to
    capture each layer's input shape; measurements use random inputs of those shapes. Without
    it, Linear layers are measured at ``[1, in]`` and convs at ``[1, C, 14, 14]``; layers not run
    by ``example_input`` stay dense. formats: the sparse formats allowed (subset of
    ``("csr", "block", "nm", "ck", "2:4")``; default all). Returns the model, or ``(model,
    report)`` with ``return_report``: a :class:`ConversionReport` (format, density, measured
    times and speedup, predicted speedup per layer). Converted modules are eval-only.
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
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    shapes = _input_shapes(model, candidates, example_input) if example_input is not None else None
    report = ConversionReport()
    for name, m in candidates:
        kind = layer_kind(m)
        w = m.weight.detach()
        density = float((w != 0).sum()) / max(1, w.numel())
        row = LayerReport(name, kind or "Conv2d", (), density, "dense")
        report.append(row)
        if kind is None:
            row.note = "conv with groups > 1 or non-zero/string padding"
            continue
        if not _device_formats(w):
            row.note = f"dtype {w.dtype}: no sparse kernels on {w.device.type}"
            continue
        if shapes is not None:
            if name not in shapes:
                row.note = "not run by example_input"
                continue
            row.input_shape = shapes[name]
        else:
            row.input_shape = (1, m.in_features) if kind == "Linear" else \
                (1, m.in_channels, DEFAULT_CONV_HW, DEFAULT_CONV_HW)
        x = torch.randn(row.input_shape, device=w.device, dtype=w.dtype)
        sparse = _choose(m, row, rank_formats(m, row.input_shape, formats), x, min_speedup, reps)
        if sparse is not None:
            if name:
                _set_module(model, name, sparse)
            else:
                model = sparse
    return (model, report) if return_report else model
