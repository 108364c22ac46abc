"""Triton kernels for the select family (SPEC §9): exact radix selection, all on the device.

The CUDA implementations of the select ops through the adapters of ``sparsekern/ops/select.py``
(which compute the ranks), with the contract of the C++ kernels ``select_global`` / ``select_each``
of ``csrc/cpu/select.cpp``: tensors fp32/fp16/bf16 of any shape, read in place when
contiguous or channels-last; results are new device tensors and nothing is read back to the host.

Keys are the fp32 bit patterns of |w|·c (bit 31 cleared), whose integer order is the numeric
order with NaN above inf. Three radix passes over digits of 11, 10 and 10 bits: each pass
launches one histogram kernel per group of up to 8 tensors of one dtype (keys whose higher bits
equal the prefix found so far, ``tl.histogram`` per block, int64 atomics per program; the tensor
is ``program_id(1)``, so no pointer table and no host sync), then one single-program scan kernel
advances a device state ``[prefix, r0, r1]`` (r0/r1: ranks of k0/k1 within the prefix; r1 = -1
once k1 lies above the prefix, whose key is then the smallest key above the 21-bit prefix, taken
in the last pass). The last scan writes numpy's lerp (``reference.numpy_lerp``) with the product
in fp64 and rounded once to fp32, so it cannot be contracted into an FMA. Pass 1 also counts NaN
keys per tensor, giving ``nan_index`` with torch ops on the device.
"""
import torch
import triton
import triton.language as tl

from ._common import wrap as _wrap

_PASSES = ((20, 11), (10, 10), (0, 10))  # (shift, bits) of each digit
_HIST_OFFSETS = (0, 2048, 3072)  # where each pass's histogram starts in one int64 buffer
_BLOCK = 4096
_NUM_WARPS = 8
_MAX_PROGRAMS = 1024  # per tensor
_GROUP = 8  # tensors per histogram launch


@triton.jit
def _slot(slot, a0, a1, a2, a3, a4, a5, a6, a7):
    """a<slot> (the argument of the tensor this program works on)."""
    v = a0
    if slot == 1:
        v = a1
    elif slot == 2:
        v = a2
    elif slot == 3:
        v = a3
    elif slot == 4:
        v = a4
    elif slot == 5:
        v = a5
    elif slot == 6:
        v = a6
    elif slot == 7:
        v = a7
    return v


@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7",
                               "i0", "i1", "i2", "i3", "i4", "i5", "i6", "i7"])
def _hist_kernel(x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7,
                 c0, c1, c2, c3, c4, c5, c6, c7, i0, i1, i2, i3, i4, i5, i6, i7,
                 state_ptr, hist_ptr, minabove_ptr, nan_ptr,
                 SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                 SCALED: tl.constexpr, BF16: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram one digit of the keys of tensor x<slot> (n<slot> elements, scale c<slot>,
    index i<slot> in the list; bf16 arrives as int16 bits) into hist_ptr."""
    slot = tl.program_id(1)
    x_ptr = _slot(slot, x0, x1, x2, x3, x4, x5, x6, x7)
    n = _slot(slot, n0.to(tl.int64), n1.to(tl.int64), n2.to(tl.int64), n3.to(tl.int64),
              n4.to(tl.int64), n5.to(tl.int64), n6.to(tl.int64), n7.to(tl.int64))
    scale = _slot(slot, c0, c1, c2, c3, c4, c5, c6, c7)
    index = _slot(slot, i0, i1, i2, i3, i4, i5, i6, i7)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if INT64:
        pid = pid.to(tl.int64)
    NBINS: tl.constexpr = 1 << BITS
    if FIRST:
        hi_prefix = 0
    else:
        hi_prefix = (tl.load(state_ptr) >> (SHIFT + BITS)).to(tl.int32)
    acc = tl.zeros([NBINS], dtype=tl.int32)
    above = tl.full([BLOCK], 0x7FFFFFFF, dtype=tl.int32)
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        if BF16:  # exact fp32 from the bits (also for subnormals under TRITON_INTERPRET)
            raw = tl.load(x_ptr + offs, mask=m, other=0).to(tl.int32)
            x = ((raw & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if SCALED:
            x = x * scale
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        high = key >> (SHIFT + BITS)
        acc += tl.histogram((key >> SHIFT) & (NBINS - 1), NBINS, mask=m & (high == hi_prefix))
        if LAST:
            above = tl.minimum(above, tl.where(m & (high > hi_prefix), key, 0x7FFFFFFF))
        if FIRST:
            nans += (m & (key > 0x7F800000)).to(tl.int32)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0)
    if LAST:
        tl.atomic_min(minabove_ptr, tl.min(above, axis=0))
    if FIRST:
        tl.atomic_add(nan_ptr + index, tl.sum(nans, axis=0))


@triton.jit
def _scan_kernel(hist_ptr, state_ptr, minabove_ptr, out_ptr, k0, k1, gamma32,
                 SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                 LERP: tl.constexpr, UPPER: tl.constexpr):
    """Advance the state by one digit; the last pass writes the quantile to out_ptr.

    gamma32: numpy's t (UPPER false) or 1 − t (UPPER true), already rounded to fp32.
    """
    NBINS: tl.constexpr = 1 << BITS
    h = tl.load(hist_ptr + tl.arange(0, NBINS))
    c = tl.cumsum(h, axis=0)
    if FIRST:
        prefix = tl.zeros([], dtype=tl.int64)
        r0 = tl.zeros([], dtype=tl.int64) + k0
        r1 = tl.zeros([], dtype=tl.int64) + k1
    else:
        prefix = tl.load(state_ptr)
        r0 = tl.load(state_ptr + 1)
        r1 = tl.load(state_ptr + 2)
    d0 = tl.sum((c <= r0).to(tl.int64), axis=0)
    below = tl.sum(tl.where(c <= r0, h, 0), axis=0)
    end = tl.sum(tl.where(tl.arange(0, NBINS) == d0, c, 0), axis=0)  # keys up to the end of bin d0
    if LAST:
        d1 = tl.sum((c <= r1).to(tl.int64), axis=0)
        a_key = prefix | d0
        b_key = tl.where(r1 >= 0, prefix | d1, tl.load(minabove_ptr).to(tl.int64))
        a = a_key.to(tl.int32).to(tl.float32, bitcast=True)
        b = b_key.to(tl.int32).to(tl.float32, bitcast=True)
        if LERP:
            p = ((b - a).to(tl.float64) * gamma32).to(tl.float32)  # exact product, one rounding
            if UPPER:
                value = b - p
            else:
                value = a + p
        else:
            value = a
        tl.store(out_ptr, value)
    else:
        tl.store(state_ptr, prefix | (d0 << SHIFT))
        tl.store(state_ptr + 1, r0 - below)
        tl.store(state_ptr + 2, tl.where((r1 >= 0) & (r1 < end), r1 - below, -1))


def _dense(t):
    """``t`` itself when its elements fill one block of memory (order is irrelevant), else a
    copy; bf16 as an int16 view."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    t = t if dense else t.contiguous()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _groups(tensors, scales):
    """Launch groups: up to _GROUP non-empty tensors sharing dtype and whether they are scaled,
    as lists of (index, tensor, scale)."""
    by_kind = {}
    for i, (t, c) in enumerate(zip(tensors, scales)):
        if t.numel():
            by_kind.setdefault((t.dtype, c != 1.0), []).append((i, t, c))
    return [g[j:j + _GROUP] for g in by_kind.values() for j in range(0, len(g), _GROUP)]


def _select(tensors, scales, k0, k1, gamma, lerp, out, nan_counts):
    """Write the quantile of the keys of ``tensors`` to ``out`` (a 1-element view); NaN keys of
    tensors[i] are counted into ``nan_counts[i]``."""
    dev = tensors[0].device
    groups = _groups(tensors, scales)
    state = torch.empty(3, dtype=torch.int64, device=dev)
    hist = torch.zeros(4096, dtype=torch.int64, device=dev)
    minabove = torch.full((1,), 0x7FFFFFFF, dtype=torch.int32, device=dev)
    upper = lerp and gamma >= 0.5
    gamma32 = float(torch.tensor(1.0 - gamma if upper else gamma, dtype=torch.float32))
    for p, ((shift, bits), off) in enumerate(zip(_PASSES, _HIST_OFFSETS)):
        first, last = p == 0, p == len(_PASSES) - 1
        for g in groups:
            idx, ts, cs = map(list, zip(*g))
            ns = [t.numel() for t in ts]
            pad = _GROUP - len(g)  # unused slots: no grid column reaches them
            xs = [_dense(t) for t in ts] + [_dense(ts[0])] * pad
            grid = (min(triton.cdiv(max(ns), _BLOCK), _MAX_PROGRAMS), len(g))
            _wrap(_hist_kernel)[grid](
                *xs, *(ns + [0] * pad), *(cs + [1.0] * pad), *(idx + [0] * pad),
                state, hist[off:], minabove, nan_counts,
                SHIFT=shift, BITS=bits, FIRST=first, LAST=last, SCALED=cs[0] != 1.0,
                BF16=ts[0].dtype == torch.bfloat16,
                INT64=max(ns) + _BLOCK * _MAX_PROGRAMS >= 2 ** 31, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        # no FP fusion: the lerp's a + p / b − p would become one fma (one rounding, numpy has two)
        _wrap(_scan_kernel)[(1,)](
            hist[off:], state, minabove, out, k0, k1, gamma32,
            SHIFT=shift, BITS=bits, FIRST=first, LAST=last, LERP=lerp, UPPER=upper,
            enable_fp_fusion=False)


def _nan_index(nan_counts):
    """First tensor index with a NaN key, or -1 (int64 [], on the device)."""
    n = nan_counts.numel()
    first = torch.where(nan_counts > 0, torch.arange(n, device=nan_counts.device), n).min()
    return torch.where(first < n, first, -1)


def select_global(tensors, scales, k0, k1, gamma, lerp):
    """Quantile of all keys ``|tensors[i]|·scales[i]``: (value fp32 [], nan_index int64 [])."""
    dev = tensors[0].device
    out = torch.empty(1, dtype=torch.float32, device=dev)
    nan_counts = torch.zeros(len(tensors), dtype=torch.int32, device=dev)
    _select(tensors, scales, k0, k1, gamma, lerp, out, nan_counts)
    nan_index = _nan_index(nan_counts)
    return torch.where(nan_index >= 0, torch.nan, out.reshape(())), nan_index


def select_each(tensors, k0s, k1s, gammas, lerp):
    """One quantile per tensor (scale 1): (values fp32 [L], nan_index int64 [])."""
    dev = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float32, device=dev)
    nan_counts = torch.zeros(len(tensors), dtype=torch.int32, device=dev)
    for i, t in enumerate(tensors):
        _select([t], [1.0], k0s[i], k1s[i], gammas[i], lerp, out[i:], nan_counts[i:])
    return torch.where(nan_counts > 0, torch.nan, out), _nan_index(nan_counts)
