"""Select family (SPEC §9): exact magnitude quantiles over many tensors, without concatenating.

Raw ops (no autograd; results on the tensors' device):

    torch.ops.sparsekern.global_magnitude_threshold(tensors, sparsity, scales, interpolation)
        -> (value fp32 [], nan_index int64 [])
    torch.ops.sparsekern.magnitude_thresholds(tensors, sparsities, interpolation)
        -> (values fp32 [L], nan_index int64 [])

``nan_index`` is the first tensor whose |w|·c holds a NaN (the value is then NaN), else -1. Each
implementation turns the quantile into numpy's ranks ``(k0, k1, gamma)`` (``reference.quantile_ranks``;
C++: its twin in ``csrc/cpu/common.h``), then selects the k0-th / k1-th smallest fp32 keys
``|w|·c`` a, b: the value is ``reference.numpy_lerp(a, b, gamma)`` for ``linear``, else ``a``.
Implementations: C++ on CPU (``csrc/cpu/select.cpp``), Triton on CUDA (adapters below, onto the
launchers ``select_global`` / ``select_each`` of ``sparsekern/triton/select.py``), sort otherwise.
"""
import torch

from .. import reference
from . import distributed as _distributed
from ._common import (check_bool, check_cpp, check_number, check_per_tensor, check_tensors, define, raise_on_nan,
                      triton_module)

_FLT_MAX = 3.4028234663852886e38


def _nan_index(mags):
    """First index whose magnitudes hold a NaN, or -1 (int64 [], tensor ops only: traceable)."""
    n = len(mags)
    flags = torch.stack([torch.isnan(a).any() for a in mags])
    first = torch.where(flags, torch.arange(n, device=flags.device), n).min()
    return torch.where(first < n, first, -1)


def _global_ranks(tensors, sparsity, interpolation):
    return reference.quantile_ranks(sum(t.numel() for t in tensors), sparsity, interpolation)


def _each_ranks(tensors, sparsities, interpolation):
    k0s, k1s, gammas = zip(*(reference.quantile_ranks(t.numel(), s, interpolation)
                             for t, s in zip(tensors, sparsities)))
    return list(k0s), list(k1s), list(gammas)


def _sorted_select(tensors, scales, k0, k1, gamma, lerp):
    mags = reference.magnitudes(tensors, scales)
    x = torch.cat(mags).sort().values
    value = reference.numpy_lerp(x[k0], x[k1], gamma) if lerp else x[k0]
    nan = _nan_index(mags)
    return torch.where(nan >= 0, torch.nan, value), nan


def _ref_global(tensors, sparsity, scales, interpolation):
    return _sorted_select(tensors, scales, *_global_ranks(tensors, sparsity, interpolation),
                          interpolation == "linear")


def _ref_each(tensors, sparsities, interpolation):
    values = [_sorted_select([t], [1.0], k0, k1, g, interpolation == "linear")[0]
              for t, k0, k1, g in zip(tensors, *_each_ranks(tensors, sparsities, interpolation))]
    return torch.stack(values), _nan_index(reference.magnitudes(tensors))


def _cuda_global(tensors, sparsity, scales, interpolation):
    return triton_module("select").select_global(tensors, scales, *_global_ranks(tensors, sparsity, interpolation),
                                                 interpolation == "linear")


def _cuda_each(tensors, sparsities, interpolation):
    return triton_module("select").select_each(tensors, *_each_ranks(tensors, sparsities, interpolation),
                                               interpolation == "linear")


def _outputs(tensors, shape):
    t = tensors[0]
    return t.new_empty(shape, dtype=torch.float32), t.new_empty((), dtype=torch.int64)


_global = define(
    "global_magnitude_threshold(Tensor[] tensors, float sparsity, float[] scales, str interpolation) "
    "-> (Tensor, Tensor)", "select", cpp=True,
    fake=lambda tensors, sparsity, scales, interpolation: _outputs(tensors, ()),
    reference=_ref_global, cuda=_cuda_global)
_each = define(
    "magnitude_thresholds(Tensor[] tensors, float[] sparsities, str interpolation) -> (Tensor, Tensor)",
    "select", cpp=True, fake=lambda tensors, sparsities, interpolation: _outputs(tensors, (len(tensors),)),
    reference=_ref_each, cuda=_cuda_each)
check_cpp("select")


# --- validation ---------------------------------------------------------------------------------

def _check_interpolation(interpolation):
    if interpolation not in reference.INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {reference.INTERPOLATIONS}, got {interpolation!r}")


def _nan_message(i: int) -> str:
    return f"tensors[{i}] contains NaN (|w|·c is NaN): no threshold exists"


# --- public API ---------------------------------------------------------------------------------

def global_magnitude_threshold(tensors, sparsity, scales=None, interpolation="linear", check_nan=True, group=None):
    """Exact global magnitude threshold (SPEC §2, §3, §9), without concatenating the tensors.

    Equals ``np.quantile(np.concatenate([|w|·c for w, c in zip(tensors, scales)]), sparsity,
    method=interpolation)`` with |w|·c in fp32: ties, ±0, subnormals and ±inf as numpy does.

    tensors: non-empty list of fp32/fp16/bf16 tensors (any shapes, mixed dtypes) on one device.
    sparsity: in [0, 1]. scales: None (c = 1) or one finite c ≥ 0 per tensor (ST-3σ: c_l =
    sqrt(sum of W_l's shape)). interpolation: "linear" (numpy's default), "lower", "higher" or
    "nearest". Returns a 0-d fp32 tensor on the tensors' device.

    A NaN in any |w|·c raises FloatingPointError naming the tensor index. On CUDA the check reads
    one int64 back (a host sync); ``check_nan=False`` keeps the call asynchronous and returns NaN
    instead (``check_nan`` must be a bool). Under torch.compile the check is skipped (the value is
    NaN); meta tensors give the result's shape, dtype and device only.

    Distributed: DTensors sharded on one 1-D mesh, or this rank's plain shards with
    ``group=``: the exact quantile over every rank's shards, the same on every rank
    (``ops.distributed``; per radix pass one small all_reduce, never the weights).
    """
    if _distributed.is_distributed_call(tensors, group):
        return _distributed.global_threshold_call(tensors, sparsity, scales, interpolation, check_nan, group)
    tensors = check_tensors(tensors)
    check_bool(check_nan, "check_nan")
    sparsity = check_number(sparsity, "sparsity", 0.0, 1.0)
    if scales is None:
        scales = [1.0] * len(tensors)
    else:
        scales = check_per_tensor(scales, len(tensors), "scales", 0.0, _FLT_MAX)
    _check_interpolation(interpolation)
    if not any(t.numel() for t in tensors):
        raise ValueError("tensors hold no elements")
    value, nan_index = _global(tensors, sparsity, scales, interpolation)
    raise_on_nan(nan_index, check_nan, _nan_message)
    return value


def magnitude_thresholds(tensors, sparsities, interpolation="linear", check_nan=True, group=None):
    """One exact magnitude quantile per tensor in one call (SPEC §6 per-layer GMP, §9).

    ``out[i] = np.quantile(|tensors[i]|, sparsities[i], method=interpolation)`` in fp32.
    tensors: non-empty list of non-empty fp32/fp16/bf16 tensors on one device; sparsities: one
    number for all or one per tensor, in [0, 1]. Returns fp32 ``[len(tensors)]`` on that device.
    NaN handling and the distributed form (DTensors, or shards with ``group=``) as in
    :func:`global_magnitude_threshold`.
    """
    if _distributed.is_distributed_call(tensors, group):
        return _distributed.thresholds_call(tensors, sparsities, interpolation, check_nan, group)
    tensors = check_tensors(tensors)
    check_bool(check_nan, "check_nan")
    sparsities = check_per_tensor(sparsities, len(tensors), "sparsities", 0.0, 1.0)
    _check_interpolation(interpolation)
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            raise ValueError(f"tensors[{i}] is empty: its quantile is undefined")
    values, nan_index = _each(tensors, sparsities, interpolation)
    raise_on_nan(nan_index, check_nan, _nan_message)
    return values
