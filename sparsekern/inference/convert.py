"""``convert``: swap each Linear / Conv2d for its sparse inference module where that is faster.

The choice is measured, not modelled: for every candidate layer the dense module and the
sparse module run on a random input of the layer's real input shape (captured by running
``example_input`` through the model with forward pre-hooks), interleaved, ``reps`` samples of
each; the minimum times give the speedup. A layer is converted only if that speedup is at least
``min_speedup``; otherwise (and for layers the sparse formats do not cover) it stays dense.
"""
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..ops._common import check_number
from .modules import CSRConv1x1, CSRConv2d, CSRLinear, supports_conv, supports_conv1x1

#: Input shapes used when ``example_input`` is None: Linear ``[1, in]`` (batch 1),
#: Conv2d ``[1, C, 14, 14]``.
DEFAULT_CONV_HW = 14


@dataclass
class LayerReport:
    """One row of the conversion report (times in ms for one call on ``input_shape``)."""
    name: str
    kind: str
    input_shape: tuple
    density: float
    format: str
    dense_ms: float = None
    sparse_ms: float = None
    speedup: float = None
    note: str = ""


class ConversionReport(list):
    """The :class:`LayerReport` rows of a :func:`convert` call; ``str()`` is a table."""

    def __str__(self):
        head = f"{'layer':<28} {'kind':<10} {'input':<20} {'density':>7} {'format':<6} " \
               f"{'dense ms':>9} {'sparse ms':>9} {'speedup':>7}  note"
        rows = [head]
        for r in self:
            f = (lambda v, spec: format(v, spec) if v is not None else "-")
            rows.append(f"{r.name or '<model>':<28} {r.kind:<10} {str(list(r.input_shape)):<20} "
                        f"{r.density:>7.3f} {r.format:<6} {f(r.dense_ms, '9.3f'):>9} "
                        f"{f(r.sparse_ms, '9.3f'):>9} {f(r.speedup, '7.2f'):>7}  {r.note}")
        return "\n".join(rows)


def _time_pair(a, b, x, reps):
    """Minimum seconds per call of ``a(x)`` and ``b(x)``, sampled alternately."""
    a(x), b(x)
    t0 = time.perf_counter()
    a(x)
    inner = max(1, min(100, int(2e-3 / max(time.perf_counter() - t0, 1e-7))))
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, f in enumerate((a, b)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f(x)
            best[i] = min(best[i], (time.perf_counter() - t0) / inner)
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


def convert(model, min_speedup=1.0, example_input=None, reps=5):
    """Replace each ``nn.Linear`` and ``nn.Conv2d`` (groups 1) of ``model`` (in place) by a
    :class:`CSRLinear` / :class:`CSRConv1x1` (1×1, padding 0) / :class:`CSRConv2d` where that measures at least ``min_speedup``×
    faster than the dense layer on this device.

    example_input: a tensor (or tuple of positional arguments) run once through ``model`` to
    capture each layer's input shape; the measurement uses random inputs of those shapes.
    Without it, Linear layers are measured at ``[1, in]`` and convs at ``[1, C, 14, 14]``.
    Only fp32 layers are candidates; layers not run by ``example_input`` stay dense.
    Returns ``(model, report)``: ``report`` is a :class:`ConversionReport` (format, density,
    measured times and speedup per layer). Converted modules are eval-only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    min_speedup = check_number(min_speedup, "min_speedup", lo=0.0)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"convert: reps must be a positive int, got {reps!r}")
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    shapes = _input_shapes(model, candidates, example_input) if example_input is not None else None
    report = ConversionReport()
    for name, m in candidates:
        kind = "Linear" if isinstance(m, nn.Linear) else "Conv2d"
        w = m.weight.detach()
        density = float((w != 0).sum()) / max(1, w.numel())
        row = LayerReport(name, kind, (), density, "dense")
        report.append(row)
        if kind == "Conv2d" and not supports_conv(m):
            row.note = "conv with groups > 1 or non-zero/string padding"
            continue
        if w.dtype != torch.float32:
            row.note = f"dtype {w.dtype} (sparse formats are fp32)"
            continue
        if shapes is not None:
            if name not in shapes:
                row.note = "not run by example_input"
                continue
            row.input_shape = shapes[name]
        else:
            row.input_shape = (1, m.in_features) if kind == "Linear" else \
                (1, m.in_channels, DEFAULT_CONV_HW, DEFAULT_CONV_HW)
        cls = CSRLinear if kind == "Linear" else CSRConv1x1 if supports_conv1x1(m) else CSRConv2d
        sparse = cls.from_dense(m).eval()
        x = torch.randn(row.input_shape, device=w.device)
        with torch.no_grad():
            td, ts = _time_pair(m, sparse, x, reps)
        row.dense_ms, row.sparse_ms, row.speedup = td * 1e3, ts * 1e3, td / ts
        if row.speedup >= min_speedup:
            row.format = "csr"
            if name:
                _set_module(model, name, sparse)
            else:
                model = sparse
        else:
            row.note = f"sparse below min_speedup {min_speedup:g}"
    return model, report
