"""Bound family (SPEC §4, ASL): Gaussian bounds and the trainable ASL bound.

Raw ops (``torch.ops.sparsekern.*``):

    gaussian_bounds(tensors, sparsities) -> (bounds fp32 [L], nan_index int64 [])
    asl_threshold(w, r) -> w·1[|w| > clamp(r, 0, 5)·σ + 1e-6]      (autograd: see below)
    asl_threshold_backward(grad, w, r) -> grad_r fp32 [G]

``r`` of the raw ASL ops is flat fp32 with G = 1 (per layer) or K = w.shape[0] (per output
channel) elements; σ is the unbiased std over the elements sharing an r (the whole layer, or
one output channel: our extension of SPEC §4, which defines it per layer); ``w`` / ``grad`` of
any strides. ``gaussian_bounds``' bound is ``σ·c`` with ``c = √2·erfinv(s)`` (:func:`sqrt2_erfinv`;
C++: its twin in ``csrc/cpu/bound.cpp``). Implementations: C++ on CPU, Triton on CUDA (adapters
below, onto the launchers of ``sparsekern/triton/bound.py``), ``sparsekern.reference`` elsewhere.

Backward recomputes σ and the mask from ``(w, r)``: no full-size tensor is saved.

The *exact* bound of SPEC §4 (the smallest b with ``#{|w| ≤ b}/#W ≥ s``) is a magnitude order
statistic: :func:`sparsekern.magnitude_thresholds` computes per-layer magnitude quantiles
exactly by selection (numpy's ``linear`` quantile by default; the same rank as the exact bound
up to one element); ``reference.bisection_bound`` is the paper's bisection baseline.
"""
import functools
import math
import statistics
import torch

from .. import reference
from ._common import (as_threshold, check_bool, check_cpp, check_number, check_per_tensor, check_tensors,
                      check_weight, define, raise_on_nan, triton_module)


@functools.lru_cache(maxsize=1024)
def sqrt2_erfinv(s):
    """``√2·erfinv(s)`` in double precision for ``s ∈ [0, 1]`` (the Gaussian bound multiplier).

    The normal quantile of ``statistics`` (AS241), then two Newton steps on erf (small s) or erfc
    (s near 1), each accurate there. ``s = 1`` gives inf. ``csrc/cpu/bound.cpp``'s
    ``sqrt2_erfinv`` does the same double operations.
    """
    if s >= 1.0:
        return math.inf
    if s <= 0.0:
        return 0.0
    tail = s > 0.5
    normal = statistics.NormalDist()
    x = -normal.inv_cdf((1.0 - s) / 2) if tail else normal.inv_cdf((1.0 + s) / 2)
    for _ in range(2):
        f = (1.0 - s) - math.erfc(x / math.sqrt(2)) if tail else math.erf(x / math.sqrt(2)) - s
        x -= f / (math.sqrt(2 / math.pi) * math.exp(-x * x / 2))
    return x


def _first_nan(values):
    """Index of the first NaN in a 1-D tensor, or -1 (int64 [], tensor ops only)."""
    n = values.numel()
    first = torch.where(values.isnan(), torch.arange(n, device=values.device), n).min()
    return torch.where(first < n, first, -1)


def _ref_gaussian_bounds(tensors, sparsities):
    sigma = torch.stack([reference.std(t.float()) for t in tensors])
    c = torch.tensor([sqrt2_erfinv(s) for s in sparsities], dtype=torch.float64, device=sigma.device)
    bounds = torch.where(c.isinf() & ~sigma.isnan(), math.inf, (sigma.double() * c).float())
    return bounds, _first_nan(sigma)


def _tb():
    return triton_module("bound")


def _asl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _asl_backward(ctx, grad):
    w, r = ctx.saved_tensors
    grad_r = _asl_bwd(grad, w, r) if ctx.needs_input_grad[1] else None
    return (grad if ctx.needs_input_grad[0] else None), grad_r


_gaussian_bounds = define(
    "gaussian_bounds(Tensor[] tensors, float[] sparsities) -> (Tensor, Tensor)", "bound", cpp=True,
    fake=lambda tensors, sparsities: (tensors[0].new_empty((len(tensors),), dtype=torch.float32),
                                      tensors[0].new_empty((), dtype=torch.int64)),
    reference=_ref_gaussian_bounds,
    cuda=lambda tensors, sparsities: _tb().gaussian_bounds(tensors, [sqrt2_erfinv(s) for s in sparsities]))
_asl = define(
    "asl_threshold(Tensor w, Tensor r) -> Tensor", "bound", cpp=True, fake=lambda w, r: w.new_empty(w.shape),
    reference=lambda w, r: reference.asl_threshold_forward(w.contiguous(), r.contiguous()),
    cuda=lambda w, r: _tb().asl_fwd(w.contiguous(), r.contiguous()),
    backward=_asl_backward, setup_context=_asl_setup)
_asl_bwd = define(
    "asl_threshold_backward(Tensor grad, Tensor w, Tensor r) -> Tensor", "bound", cpp=True,
    fake=lambda grad, w, r: r.new_empty(r.shape),
    reference=lambda grad, w, r: reference.asl_threshold_backward(grad.contiguous(), w.contiguous(), r.contiguous()),
    cuda=lambda grad, w, r: _tb().asl_bwd(grad.contiguous(), w.contiguous(), r.contiguous()))
check_cpp("bound")


# --- public API ---------------------------------------------------------------------------------

def _check_std_size(t, name):
    if t.numel() < 2:
        raise ValueError(f"{name} has {t.numel()} element(s): the unbiased std needs at least 2")


def gaussian_bound(w, sparsity, check_nan=True):
    """Gaussian bound ``σ·√2·erfinv(s)`` of one layer (SPEC §4, ASL paper Eq. 3), one fused pass.

    w: fp32/fp16/bf16, any shape, ≥ 2 elements; σ = its unbiased std rounded to fp32 (C++:
    double accumulation; Triton: fp32 partial moments). sparsity: in [0, 1] (1 gives inf).
    Returns a 0-d fp32 tensor on w's device. A NaN or inf weight raises FloatingPointError (on
    CUDA a host sync; ``check_nan=False``, a bool, skips it and returns NaN; skipped under
    torch.compile and on meta tensors, which give the result's shape only).
    No autograd (σ is treated as a constant). For the exact bound see
    :func:`sparsekern.magnitude_thresholds`.
    """
    check_weight(w)
    check_bool(check_nan, "check_nan")
    sparsity = check_number(sparsity, "sparsity", 0.0, 1.0)
    _check_std_size(w, "w")
    bounds, nan_index = _gaussian_bounds([w.detach()], [sparsity])
    raise_on_nan(nan_index, check_nan, lambda i: "w contains NaN or inf: its standard deviation is undefined")
    return bounds.reshape(())


def gaussian_bounds(tensors, sparsities, check_nan=True):
    """:func:`gaussian_bound` of many layers in one call: fp32 ``[len(tensors)]``.

    tensors: non-empty list of fp32/fp16/bf16 tensors (≥ 2 elements each) on one device;
    sparsities: one number for all or one per tensor, in [0, 1]. Each bound equals the single
    call's bit for bit. NaN handling as :func:`gaussian_bound`, naming ``tensors[i]``.
    """
    tensors = check_tensors(tensors)
    check_bool(check_nan, "check_nan")
    sparsities = check_per_tensor(sparsities, len(tensors), "sparsities", 0.0, 1.0)
    for i, t in enumerate(tensors):
        _check_std_size(t, f"tensors[{i}]")
    bounds, nan_index = _gaussian_bounds(tensors, sparsities)
    raise_on_nan(nan_index, check_nan, lambda i: f"tensors[{i}] contains NaN or inf: its standard deviation is undefined")
    return bounds


def asl_threshold(w, r):
    """ASL trainable bound (SPEC §4): ``ŵ = w·1[|w| > clamp(r, 0, 5)·σ + 1e-6]``, σ detached.

    w: ``[K, ...]`` fp32/fp16/bf16. r: float tensor, one value (per layer: σ over w) or one per
    output channel (``[K]`` / ``[K, 1, ..]``: σ over that channel; our extension of SPEC §4); not
    NaN; every r must cover ≥ 2 weights. Returns w's shape and dtype.
    Backward: ``∂L/∂w = g`` (dense straight-through); ``∂L/∂r = Σ g·(ŵ − w)/r`` over the
    elements sharing r (paper Eq. 18: only pruned weights contribute), 0 where ``r ≤ 0`` or
    ``r ≥ 5`` (clamp active).
    """
    check_weight(w)
    if not isinstance(r, torch.Tensor):
        raise TypeError("r must be a float tensor (one value or one per output channel), "
                        f"got {type(r).__name__}")
    k = w.shape[0] if w.dim() else 1
    if not (r.numel() == 1 or (r.dim() >= 1 and r.shape[0] == k and r.numel() == k)):
        raise ValueError(f"r has shape {tuple(r.shape)}; expected one value or one per output channel "
                         f"([{k}] or [{k}, 1, ...])")
    r_flat = as_threshold(r, w, "r", nonnegative=False)
    if w.numel() and w.numel() // r_flat.numel() < 2:
        raise ValueError(f"w has {w.numel() // r_flat.numel()} element(s) per entry of r: the unbiased "
                         "std needs at least 2")
    return _asl(w, r_flat)
