"""Triton kernels for the masks family (SPEC §5: docs/methods.md).

Four launchers, the CUDA implementations of the masks ops through the adapters of
``sparsekern/ops/masks.py`` (which turn sparsities into counts), with the contract of the C++
kernels of ``csrc/cpu/masks.cpp`` (``kernel_mask``, ``block_mask`` = ``block_select``): contiguous
fp32/fp16/bf16 ``w``, bool masks shaped like ``w``. Order key: the bit pattern of fp32 ``|w|``
as int32 (every NaN 0x7FC00000, above +inf); larger first, equal keys lower index first.

* ``nm_mask``, the window step and the CK step of ``kernel_mask`` select the best of each group
  (m weights, R·S weights, the K or C kernel scores) with one of three kernels, chosen from the
  group size alone (groups of any size, as on the CPU): up to 64 (padded to a power of two) by
  rank counting in registers (a ``[groups, m, m]`` comparison tile); up to 4096 by finding each
  group's ``keep``-th largest key with a 31-step bisection on its bits over a ``[groups, m]``
  register tile, then keeping the keys above it and the first ties in index order (cumsum);
  larger groups by one program each, a radix select of that key (three histogram passes over
  the group) and a pass keeping the keys above it and the first ties.
* ``block_mask``: block sums in a kernel (fp32, row-major in the block, as the reference), the
  global selection with ``torch.sort(stable=True)``, the row rule with scatter, expansion in a
  kernel.
"""
import torch
import triton
import triton.language as tl

from ._common import wrap as _wrap

_BLOCK = 1024  # elements per program of the elementwise kernels
_TILE = 4096  # register-tile elements of the selection kernels
_RANK_WARPS = 4  # rank-counting tiles (Triton's default)
_WARPS = 8  # bisection tiles and streamed chunks of _TILE: ≤ 128 registers a thread, no spills


@triton.jit
def _key(x):
    k = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(k > 0x7F800000, 0x7FC00000, k)


@triton.jit
def _load_keys(src_ptr, offs, valid, KEYS: tl.constexpr):
    """Order keys at offs (invalid: -1, below every key): src holds keys (KEYS) or weights."""
    if KEYS:
        k = tl.load(src_ptr + offs, mask=valid, other=-1)
    else:
        k = tl.where(valid, _key(tl.load(src_ptr + offs, mask=valid, other=0.0)), -1)
    return k


@triton.jit
def _rank_keep(keys, valid, keep, MP: tl.constexpr):
    """keys [G, MP] (invalid: -1) -> bool [G, MP]: rank (larger first, ties lower index) < keep."""
    ki = keys[:, :, None]
    kj = keys[:, None, :]
    ii = tl.arange(0, MP)[None, :, None]
    jj = tl.arange(0, MP)[None, None, :]
    better = (kj > ki) | ((kj == ki) & (jj < ii))
    rank = tl.sum(better.to(tl.int32), axis=2)
    return (rank < keep) & valid


@triton.jit
def _bisect_keep(keys, valid, keep, BLOCK_G: tl.constexpr):
    """keys [G, MP] (invalid: -1) -> bool [G, MP]: the keep largest of each row, ties lower index.

    t = each row's keep-th largest key (all ones if keep = 0) by a 31-step bisection on its bits;
    kept: keys above t, then the first keep − #above ties at t in index order."""
    t = tl.zeros([BLOCK_G], dtype=tl.int32)
    for bit in tl.static_range(30, -1, -1):
        cand = t | (1 << bit)
        cnt = tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1)
        t = tl.where(cnt >= keep, cand, t)
    above = keys > t[:, None]
    tie = (keys == t[:, None]).to(tl.int32)
    need = keep - tl.sum(above.to(tl.int32), axis=1)
    before = tl.cumsum(tie, axis=1) - tie
    return (above | ((tie == 1) & (before < need[:, None]))) & valid


@triton.jit
def _tile_select_kernel(src_ptr, out_ptr, score_ptr, n_groups, inner, size, keep,
                        BLOCK_G: tl.constexpr, MP: tl.constexpr, RANK: tl.constexpr,
                        KEYS: tl.constexpr, SCORE: tl.constexpr):
    """BLOCK_G groups per program, each one [MP] row of registers (size ≤ MP): group g holds
    src[(g // inner)·size·inner + g % inner + i·inner], i < size. out = its keep best (rank
    counting, or bisection); SCORE: score[g] = the largest kept key (0 if none)."""
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, MP)
    offs = ((g // inner) * size * inner + g % inner)[:, None] + (j.to(tl.int64) * inner)[None, :]
    valid = (g < n_groups)[:, None] & (j < size)[None, :]
    keys = _load_keys(src_ptr, offs, valid, KEYS)
    if RANK:
        kept = _rank_keep(keys, valid, keep, MP)
    else:
        kept = _bisect_keep(keys, valid, keep, BLOCK_G)
    tl.store(out_ptr + offs, kept.to(tl.uint8), mask=valid)
    if SCORE:
        tl.store(score_ptr + g, tl.max(tl.where(kept, keys, 0), axis=1), mask=g < n_groups)


@triton.jit
def _radix_digit(src_ptr, base, inner, size, prefix, need, KEYS: tl.constexpr,
                 SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One radix digit (key bits SHIFT .. SHIFT+BITS-1) of the cut of a streamed group: given the
    cut's higher bits (prefix) and how many keys with them to keep (need), the same one digit
    lower (a histogram pass over the group's keys with that prefix)."""
    NB: tl.constexpr = 1 << BITS
    hist = tl.zeros([NB], dtype=tl.int32)
    for start in range(0, size, BLOCK):
        i = start + tl.arange(0, BLOCK)
        k = _load_keys(src_ptr, base + i.to(tl.int64) * inner, i < size, KEYS)
        same = (i < size) & ((k >> (SHIFT + BITS)) == prefix)
        hist += tl.histogram((k >> SHIFT) & (NB - 1), NB, mask=same)
    ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= bin
    digit = tl.sum((ge >= need).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, NB) == digit, ge - hist, 0), axis=0)
    return (prefix << BITS) | digit, need - above


@triton.jit
def _stream_select_kernel(src_ptr, out_ptr, score_ptr, inner, size, keep,
                          BLOCK: tl.constexpr, KEYS: tl.constexpr, SCORE: tl.constexpr):
    """One group per program, addressed as in _tile_select_kernel, read in BLOCK chunks: the
    cut t (the keep-th largest key, all ones if keep = 0) by a radix select over digits of 11, 10
    and 10 bits, one histogram pass each; then a pass keeping the keys above t and the first
    ties at t in index order (running count)."""
    g = tl.program_id(0).to(tl.int64)
    base = (g // inner) * size * inner + g % inner
    t = tl.zeros([], dtype=tl.int32)
    need = keep
    t, need = _radix_digit(src_ptr, base, inner, size, t, need, KEYS, 20, 11, BLOCK)
    t, need = _radix_digit(src_ptr, base, inner, size, t, need, KEYS, 10, 10, BLOCK)
    t, need = _radix_digit(src_ptr, base, inner, size, t, need, KEYS, 0, 10, BLOCK)
    seen = 0
    best = 0
    for start in range(0, size, BLOCK):
        i = start + tl.arange(0, BLOCK)
        offs = base + i.to(tl.int64) * inner
        k = _load_keys(src_ptr, offs, i < size, KEYS)
        tie = (k == t).to(tl.int32)
        before = seen + tl.cumsum(tie, axis=0) - tie
        kept = (k > t) | ((tie == 1) & (before < need))
        tl.store(out_ptr + offs, kept.to(tl.uint8), mask=i < size)
        seen += tl.sum(tie, axis=0)
        if SCORE:
            best = tl.maximum(best, tl.max(tl.where(kept, k, 0), axis=0))
    if SCORE:
        tl.store(score_ptr + g, best)


@triton.jit
def _clear_dead_kernel(out_ptr, alive_ptr, n, rs, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    a = tl.load(alive_ptr + offs // rs, mask=valid, other=0)
    o = tl.load(out_ptr + offs, mask=valid, other=0)
    tl.store(out_ptr + offs, o & a, mask=valid)


@triton.jit
def _block_scores_kernel(w_ptr, score_ptr, rows, cols, bc, nb, B: tl.constexpr, BLOCK: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r0 = (q // bc) * B
    c0 = (q % bc) * B
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(B):
        for c in tl.static_range(B):
            ok = (q < nb) & (r0 + r < rows) & (c0 + c < cols)
            x = tl.load(w_ptr + (r0 + r) * cols + c0 + c, mask=ok, other=0.0)
            acc = acc + tl.abs(x.to(tl.float32))
    tl.store(score_ptr + q, acc, mask=q < nb)


@triton.jit
def _block_expand_kernel(kept_ptr, out_ptr, n, cols, bc, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    blk = (offs // cols // B) * bc + (offs % cols) // B
    tl.store(out_ptr + offs, tl.load(kept_ptr + blk, mask=valid, other=0), mask=valid)


@triton.jit
def _masked_kernel(w_ptr, m_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(w_ptr + offs, mask=valid, other=0.0)
    keep = tl.load(m_ptr + offs, mask=valid, other=0) != 0
    tl.store(out_ptr + offs, tl.where(keep, x, tl.zeros_like(x)), mask=valid)


# ----------------------------------------------------------------------------- launchers


def _bool_out(w):
    out = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    return out, out.view(torch.uint8)


def _select(src, out, score, groups, inner, size, keep):
    """out (uint8, src's layout) = the keep best of each of ``groups`` groups of ``size`` elements
    of src (weights, or int32 keys); group g: src[(g // inner)·size·inner + g % inner + i·inner].
    score (int32 [groups] or None): each group's largest kept key, 0 if none.

    Groups of ≤ 64 (padded) by rank counting, ≤ _TILE by bisection in registers, larger ones
    by radix select, streamed (one program each); the kernel is chosen from the sizes alone."""
    keep = min(keep, size)  # as the C++ kernels: keep ≥ size keeps the whole group
    mp = triton.next_power_of_2(size)
    args = (src, out, score if score is not None else out)
    flags = dict(KEYS=src.dtype == torch.int32, SCORE=score is not None)
    if mp > _TILE:
        _wrap(_stream_select_kernel)[(groups,)](*args, inner, size, keep, BLOCK=_TILE,
                                                num_warps=_WARPS, **flags)
        return
    rank = mp * mp <= _TILE
    bg = _TILE // (mp * mp if rank else mp)
    _wrap(_tile_select_kernel)[(triton.cdiv(groups, bg),)](
        *args, groups, inner, size, keep, BLOCK_G=bg, MP=mp, RANK=rank,
        num_warps=_RANK_WARPS if rank else _WARPS, **flags)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask (SPEC §5) of w [K, C, *] along C, any m."""
    out, o = _bool_out(w)
    if w.numel() == 0:
        return out
    _select(w, o, None, w.numel() // m, w.numel() // (w.shape[0] * w.shape[1]), m, n)
    return out


def kernel_mask(w: torch.Tensor, window_keep: int, ck_keep: int, by_out: bool) -> torch.Tensor:
    """Window / CK / intra mask (SPEC §5) of w [K, C, R, S], any R·S and group size."""
    k, c = w.shape[0], w.shape[1]
    rs = w.shape[2] * w.shape[3]
    out, o = _bool_out(w)
    if w.numel() == 0:
        return out
    nk = k * c
    size = c if by_out else k
    ck = ck_keep < size
    score = torch.empty(nk, dtype=torch.int32, device=w.device) if ck else None
    _select(w, o, score, nk, 1, rs, window_keep)
    if ck:
        alive = torch.empty(nk, dtype=torch.uint8, device=w.device)
        groups, inner = (k, 1) if by_out else (c, c)
        _select(score, alive, None, groups, inner, size, ck_keep)
        n = w.numel()
        _wrap(_clear_dead_kernel)[(triton.cdiv(n, _BLOCK),)](o, alive, n, rs, BLOCK=_BLOCK)
    return out


def block_mask(w: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """Block mask (SPEC §5) of w [O, I]: the keep best Σ|w| blocks, then the row rule."""
    out, o = _bool_out(w)
    if w.numel() == 0:
        return out
    rows, cols = w.shape
    br, bc = triton.cdiv(rows, block), triton.cdiv(cols, block)
    nb = br * bc
    score = torch.empty(nb, dtype=torch.float32, device=w.device)
    _wrap(_block_scores_kernel)[(triton.cdiv(nb, _BLOCK),)](w, score, rows, cols, bc, nb,
                                                           B=block, BLOCK=_BLOCK)
    order = score.sort(descending=True, stable=True).indices
    kept = torch.zeros(nb, dtype=torch.bool, device=w.device).scatter_(0, order[:keep], True)
    kept = kept.reshape(br, bc)
    best = score.reshape(br, bc).argmax(1, keepdim=True)
    kept = kept.scatter(1, best, kept.gather(1, best) | ~kept.any(1, keepdim=True))
    n = w.numel()
    _wrap(_block_expand_kernel)[(triton.cdiv(n, _BLOCK),)](kept.view(torch.uint8), o, n, cols, bc,
                                                           B=block, BLOCK=_BLOCK)
    return out


def masked_fwd(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w where mask else 0."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    n = w.numel()
    if n:
        _wrap(_masked_kernel)[(triton.cdiv(n, _BLOCK),)](w, mask.view(torch.uint8), out, n,
                                                         BLOCK=_BLOCK)
    return out
