"""Exact magnitude quantiles over weights sharded across ranks (SPEC §9; docs/distributed.md), and
the FSDP2 shard helpers the Sparsifier and the mask methods use.

Each rank holds shards of the tensors; the quantile is numpy's over the union of all shards,
bit-identical to ``global_magnitude_threshold`` / ``magnitude_thresholds`` on the full tensors in
one process. Only per-digit histograms travel: |w|·c in fp32 is non-negative, so its bit pattern
as int32 orders like the value; an exact order statistic is found by radix selection, 8 bits per
pass (4 passes), each pass one ``all_reduce`` of ``[queries, 256]`` int64 counts (2 KB per query),
the bucket found on the device (no host sync in the passes). The interpolation between the two
order statistics is ``reference.numpy_lerp``, as in one process.
"""
import sys

import torch
import torch.distributed as dist

from .. import reference

_DIGIT_BITS = 8
_BUCKETS = 1 << _DIGIT_BITS
_SHRINK_ON_CPU = True  # False: the accelerator path (no host sync), for tests
_NARROW_ON_CPU = True  # False: no local-quantile bracket (_narrow), for tests


def _keys(t: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``|w|·c`` of a local shard as int32 keys ordered like the values (flattened)."""
    return reference.magnitudes([t], None if scale == 1.0 else [scale])[0].view(torch.int32)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _digits(k: torch.Tensor, shift: int, prefix, shrink: bool):
    """``(digit at shift, keys left)`` of the keys whose bits above ``shift + 8`` equal ``prefix``'s.
    ``shrink`` (CPU, ``prefix`` an int): drop the others (later passes see ~1/256 of the keys);
    else (accelerators, no host sync) keep every key and send the others to bucket 256, not counted."""
    if shift + _DIGIT_BITS >= 32:  # first pass: every key (|w| keys are non-negative int32)
        return (k >> shift) & (_BUCKETS - 1), k
    match = (k >> (shift + _DIGIT_BITS)) == (prefix >> (shift + _DIGIT_BITS))
    if shrink:
        k = k[match]
        return (k >> shift) & (_BUCKETS - 1), k
    return torch.where(match, (k >> shift) & (_BUCKETS - 1), _BUCKETS), k


def order_statistics(local_keys: list[list[torch.Tensor]], ranks: torch.Tensor, group=None) -> torch.Tensor:
    """The ``ranks[q]``-th smallest key (0-based) of query ``q``'s keys over all ranks of ``group``.

    local_keys: per query, this rank's int32 key tensors (non-negative; queries may share tensors);
    ranks: int64 ``[Q]`` on the keys' device, the same on every rank. Returns int32 ``[Q]``.
    Per pass one ``[Q, 256]`` int64 all_reduce; no host sync on accelerators.
    """
    device = ranks.device
    q = len(local_keys)
    shrink = device.type == "cpu" and _SHRINK_ON_CPU
    keys = [[k.reshape(-1) for k in query] for query in local_keys]
    prefix = torch.zeros(q, dtype=torch.int64, device=device)
    remaining = ranks.clone()
    for shift in range(32 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = torch.zeros(q, _BUCKETS + 1, dtype=torch.int64, device=device)
        done = {}  # (keys of query j, its prefix) -> j: queries sharing both share the histogram
        host = prefix.tolist() if shrink else [None] * q  # CPU: reading the prefix back is free
        for i in range(q):
            first = shift + _DIGIT_BITS >= 32
            tag = (id(local_keys[i]), None if first else host[i] if shrink else ("query", i))
            if tag in done:
                hist[i], keys[i] = hist[done[tag]], keys[done[tag]]
                continue
            done[tag] = i
            left = []
            for k in keys[i]:
                digit, k = _digits(k, shift, host[i] if shrink else prefix[i], shrink)
                hist[i] += torch.bincount(digit, minlength=_BUCKETS + 1)
                left.append(k)
            keys[i] = left
        hist = _all_reduce(hist[:, :_BUCKETS].contiguous(), group)
        cum = hist.cumsum(1)
        bucket = torch.searchsorted(cum, remaining[:, None], right=True)[:, 0]
        below = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp_min(0)[:, None])[:, 0], 0)
        remaining -= below
        prefix |= bucket << shift
    return prefix.to(torch.int32)


def _check_nan(local: list[torch.Tensor], group) -> None:
    """FloatingPointError naming the first tensor with a NaN on any rank (one small all_reduce)."""
    flags = torch.tensor([bool(torch.isnan(t).any()) for t in local] or [False], dtype=torch.int32)
    flags = _all_reduce(flags.to(local[0].device if local else "cpu"), group, dist.ReduceOp.MAX).cpu()
    bad = [i for i, f in enumerate(flags.tolist()) if f]
    if bad:
        raise FloatingPointError(f"tensors[{bad[0]}] contains NaN (|w|·c is NaN) on some rank: no threshold exists")


#: CPU: each rank's own quantiles this far below / above the wanted level bracket the candidates
_BRACKET = 1e-3
_INT32_MAX = (1 << 31) - 1
_CHUNK = 1 << 20  # CPU: keys made this many at a time (never all at once)


def _narrow(sources, sizes: list[int], plan, group):
    """CPU shortcut: per query a key interval ``[lo, hi]`` (``lo``: the smallest over ranks of each
    rank's own quantile ``_BRACKET`` below the wanted level, ``hi``: the largest ``_BRACKET`` above,
    from the single-process C++ select on its shards), verified to hold the wanted global order
    statistics by counting the keys below ``lo`` and up to ``hi`` on every rank (one all_reduce).
    Returns (the keys in ``[lo, hi]`` per query, the global count below ``lo`` per query), or None
    when an interval misses (the caller then selects over all keys). The interval only decides the
    speed: the result is exact either way. Keys are made chunk by chunk (never all at once), in one
    pass that counts and keeps the candidates."""
    from .select import global_magnitude_threshold as select
    q = len(sources)
    bounds = torch.empty(q, 2, dtype=torch.int64)  # (−lo, hi): one MAX all_reduce gives min lo, max hi
    for i, (src, n, (k0, k1, _)) in enumerate(zip(sources, sizes, plan)):
        src = [(t, c) for t, c in src if t.numel()]
        if not src:
            bounds[i, 0], bounds[i, 1] = -_INT32_MAX, -1
            continue
        ts, cs = [t.detach() for t, _ in src], [c for _, c in src]
        a = max(k0 / max(n - 1, 1) - _BRACKET, 0.0)
        b = min(k1 / max(n - 1, 1) + _BRACKET, 1.0)
        lo = select(ts, a, scales=cs, interpolation="lower", check_nan=False).view(torch.int32).item()
        hi = select(ts, b, scales=cs, interpolation="higher", check_nan=False).view(torch.int32).item()
        bounds[i, 0], bounds[i, 1] = -lo, hi
    _all_reduce(bounds, group, dist.ReduceOp.MAX)
    lo, hi = (-bounds[:, 0]).tolist(), bounds[:, 1].tolist()

    def chunks(src):
        for t, c in src:
            for part in t.detach().reshape(-1).split(_CHUNK):
                yield _keys(part, c)
    counts = torch.zeros(q, 2, dtype=torch.int64)  # keys < lo, keys <= hi
    inside = []  # the keys in [lo, hi], kept in the same pass (used only if the interval holds)
    for i, src in enumerate(sources):
        inside.append([])
        for k in chunks(src):
            below, upto = k < lo[i], k <= hi[i]  # lo <= hi: below is a subset of upto
            counts[i, 0] += int(torch.count_nonzero(below))
            counts[i, 1] += int(torch.count_nonzero(upto))
            inside[i].append(k[upto ^ below])
    _all_reduce(counts, group)
    below, upto = counts[:, 0], counts[:, 1]
    if not all(b <= k0 and k1 < u for b, u, (k0, k1, _) in zip(below.tolist(), upto.tolist(), plan)):
        return None
    return inside, below


def _quantiles(sources: list[list[tuple[torch.Tensor, float]]], sizes: list[int], qs: list[float],
               interpolation: str, group):
    """Per query: numpy's quantile ``qs[i]`` of ``|t|·c`` over the union over ranks of its
    ``sources[i]`` (this rank's ``(tensor, c)``; ``sizes[i]`` elements over all ranks)."""
    device = next((t.device for src in sources for t, _ in src), torch.device("cpu"))
    plan = [reference.quantile_ranks(n, q, interpolation) for n, q in zip(sizes, qs)]
    wanted = torch.tensor([r for k0, k1, _ in plan for r in (k0, k1)], dtype=torch.int64, device=device)
    narrowed = None
    if device.type == "cpu" and _SHRINK_ON_CPU and _NARROW_ON_CPU:
        narrowed = _narrow(sources, sizes, plan, group)
    if narrowed is not None:
        queries, below = narrowed
        wanted = wanted - below.repeat_interleave(2)
    else:
        queries = [[_keys(t, c) for t, c in src] for src in sources]
    keys = [query for query in queries for _ in range(2)]  # both order statistics share the keys
    stats = order_statistics(keys, wanted, group).view(torch.float32).view(-1, 2)
    out = []
    for (lo, hi), (_, _, gamma) in zip(stats, plan):
        out.append(reference.numpy_lerp(lo, hi, gamma) if interpolation == "linear" else lo.clone())
    return torch.stack(out)


def global_magnitude_threshold(local_tensors, global_numel: int, sparsity: float, scales=None,
                               interpolation="linear", group=None, check_nan=True) -> torch.Tensor:
    """``np.quantile(concat(|w|·c over every rank's shards), sparsity)`` as a 0-d fp32 tensor, the
    same on every rank. local_tensors: this rank's shards (possibly none of a tensor: an empty one);
    global_numel: the total element count over all ranks; scales: one ``c`` per tensor."""
    scales = [1.0] * len(local_tensors) if scales is None else list(scales)
    if check_nan:
        _check_nan([t.detach() for t in local_tensors], group)
    return _quantiles([list(zip(local_tensors, scales))], [global_numel], [sparsity], interpolation, group)[0]


def magnitude_thresholds(local_tensors, global_numels: list[int], sparsities, interpolation="linear",
                         group=None, check_nan=True) -> torch.Tensor:
    """One exact quantile of |w| per tensor over its shards on every rank: fp32 ``[len]``."""
    if isinstance(sparsities, (int, float)):
        sparsities = [sparsities] * len(local_tensors)
    if check_nan:
        _check_nan([t.detach() for t in local_tensors], group)
    return _quantiles([[(t, 1.0)] for t in local_tensors], list(global_numels), list(sparsities),
                      interpolation, group)


# --- FSDP2 shards: rows of Shard(0) DTensors ------------------------------------------------------

def fsdp_params(model) -> set[int]:
    """ids of the sharded Parameters that ``fully_shard`` (FSDP2) manages anywhere in ``model``."""
    from torch.distributed.fsdp import FSDPModule
    ids = set()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                ids.update(id(fp.sharded_param) for fp in group.fsdp_params)
    return ids


def check_sharded(name: str, param, fsdp_ids: set[int]) -> None:
    """ValueError naming ``name`` unless ``param`` is an FSDP2 shard sparsekern drives: a DTensor
    managed by ``fully_shard`` (``fsdp_ids``), ``Shard(0)`` on a 1-D mesh."""
    from torch.distributed.tensor import Shard
    if id(param) not in fsdp_ids:
        raise ValueError(f"weight {name!r} is a DTensor ({param.placements}) not managed by FSDP2's fully_shard "
                         "(tensor parallel, or distribute_tensor): sparsekern supports DDP and FSDP2 "
                         "(fully_shard) data parallelism only")
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(f"weight {name!r} is sharded as {tuple(param.placements)} on a {param.device_mesh.ndim}-D "
                         "mesh: sparsekern supports FSDP2's default Shard(0) on a 1-D mesh only (no HSDP, no "
                         "shard_placement_fn)")


def shard_rows(param) -> tuple[int, int]:
    """``(global row offset, local rows)`` of this rank's ``Shard(0)`` shard of DTensor ``param``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], shape[0]


def gather_rows(local: torch.Tensor, rows: int, group=None) -> torch.Tensor:
    """The ``rows``-row concatenation of every rank's ``local`` rows, sharded like FSDP2's
    ``Shard(0)`` (``torch.chunk``: rank r holds rows ``[r·c, min((r+1)·c, rows))``, ``c = ceil(rows/world)``)."""
    world = dist.get_world_size(group)
    chunk = -(-rows // world)
    dtype = local.dtype
    x = local.view(torch.uint8) if dtype == torch.bool else local
    padded = x.new_zeros((chunk,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    full = torch.cat(out)[:rows]
    return full.view(torch.bool) if dtype == torch.bool else full


def any_rank_each(flags: list[bool], device, group=None) -> list[bool]:
    """Per flag, whether it is True on any rank of ``group`` (one small all_reduce)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    return [bool(f) for f in _all_reduce(t, group, dist.ReduceOp.MAX).tolist()]


# --- the public functions' distributed form (ops.select dispatches here) -------------------------



def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor, without importing ``torch.distributed.tensor`` (~0.8 s) in a
    process that has none: a DTensor exists only once that module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def is_distributed_call(tensors, group) -> bool:
    """Whether ``global_magnitude_threshold``/``magnitude_thresholds`` got DTensors or a process group."""
    return group is not None or (isinstance(tensors, (list, tuple)) and any(is_dtensor(t) for t in tensors))


def _local_inputs(tensors, group):
    """``(local shards, global element counts, group)``: DTensors sharded on one 1-D mesh, or this
    rank's plain shards with ``group`` (their global counts: one small all_reduce, read back)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError("tensors must be a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"tensors[{i}] must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if any(isinstance(t, DTensor) for t in tensors):
        if not all(isinstance(t, DTensor) for t in tensors):
            raise TypeError("tensors mixes DTensors and plain tensors: pass all DTensors, or this rank's plain "
                            "shards with group=")
        mesh = tensors[0].device_mesh
        for i, t in enumerate(tensors):
            if t.device_mesh != mesh or mesh.ndim != 1 or not all(p.is_shard() for p in t.placements):
                raise ValueError(f"tensors[{i}] is {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh: the "
                                 "distributed threshold needs every DTensor sharded (Shard(d)) on one 1-D mesh "
                                 "(a replicated tensor would count its elements once per rank)")
        if group is not None and group is not mesh.get_group():
            raise ValueError("group is not the DTensors' mesh group: leave group=None with DTensors")
        return [t.to_local().detach() for t in tensors], [t.numel() for t in tensors], mesh.get_group()
    counts = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=tensors[0].device)
    return [t.detach() for t in tensors], _all_reduce(counts, group).tolist(), group


def _check_options(sparsities, interpolation, check_nan) -> None:
    import math
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0 or math.isnan(s):
            raise ValueError(f"sparsity must be a number in [0, 1], got {s!r}")
    if interpolation not in reference.INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {reference.INTERPOLATIONS}, got {interpolation!r}")
    if not isinstance(check_nan, bool):
        raise TypeError(f"check_nan must be a bool, got {check_nan!r}")


def global_threshold_call(tensors, sparsity, scales, interpolation, check_nan, group) -> torch.Tensor:
    """``ops.global_magnitude_threshold`` over DTensors / shards on every rank of the group."""
    local, numels, group = _local_inputs(tensors, group)
    _check_options([sparsity], interpolation, check_nan)
    if scales is not None:
        scales = [float(c) for c in scales]
        if len(scales) != len(local) or not all(0.0 <= c < float("inf") for c in scales):
            raise ValueError(f"scales must be one finite number >= 0 per tensor ({len(local)}), got {scales}")
    if not sum(numels):
        raise ValueError("tensors hold no elements")
    return global_magnitude_threshold(local, sum(numels), float(sparsity), scales, interpolation, group, check_nan)


def thresholds_call(tensors, sparsities, interpolation, check_nan, group) -> torch.Tensor:
    """``ops.magnitude_thresholds`` over DTensors / shards on every rank of the group."""
    local, numels, group = _local_inputs(tensors, group)
    per = [sparsities] * len(local) if isinstance(sparsities, (int, float)) else list(sparsities)
    if len(per) != len(local):
        raise ValueError(f"sparsities must be one number or one per tensor ({len(local)}), got {len(per)}")
    _check_options(per, interpolation, check_nan)
    empty = [i for i, n in enumerate(numels) if n == 0]
    if empty:
        raise ValueError(f"tensors[{empty[0]}] is empty: its quantile is undefined")
    return magnitude_thresholds(local, numels, [float(s) for s in per], interpolation, group, check_nan)
