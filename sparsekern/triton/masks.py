"""Triton kernels for the masks family (SPEC.md §5).

Four launchers with the signatures and preconditions of the C++ kernels
(``torch.ops.sparsekern_C.<name>``, contract in ``sparsekern/ops/masks.py``): contiguous
fp32/fp16/bf16 ``w``, bool masks shaped like ``w``. Order key: the bit pattern of fp32 ``|w|``
as int32 (every NaN 0x7FC00000, above +inf); larger first, equal keys lower index first.

* ``nm_mask`` and the window step of ``kernel_mask``: rank counting in registers, a
  ``[groups, m, m]`` comparison tile (m padded to a power of two; m ≤ 128, R·S ≤ 64).
* CK step: one program per group finds the ``keep``-th largest kernel score by a 31-step
  bisection on its bits (counting passes), then keeps ties in index order (running cumsum).
* ``block_mask``: block sums in a kernel (fp32, row-major in the block, as the reference), the
  global selection with ``torch.sort(stable=True)``, the row rule with scatter, expansion in a
  kernel.
"""
import torch
import triton
import triton.language as tl

from .threshold import _wrap

_BLOCK = 1024  # elements per program of the elementwise kernels
_TILE = 4096  # comparison-tile elements of the rank-counting kernels
_SELECT_BLOCK = 1024  # chunk of a CK group per counting pass
_NAN_KEY = 0x7FC00000


@triton.jit
def _key(x):
    k = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(k > 0x7F800000, 0x7FC00000, k)


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
def _nm_kernel(w_ptr, out_ptr, n_groups, inner, n, m, BLOCK_G: tl.constexpr, MP: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, MP)
    b = g // inner
    p = g % inner
    offs = (b * m * inner + p)[:, None] + (j * inner)[None, :]
    valid = (g < n_groups)[:, None] & (j < m)[None, :]
    keys = tl.where(valid, _key(tl.load(w_ptr + offs, mask=valid, other=0.0)), -1)
    keep = _rank_keep(keys, valid, n, MP)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=valid)


@triton.jit
def _window_kernel(w_ptr, out_ptr, score_ptr, nk, rs, keep,
                   BLOCK_Q: tl.constexpr, RSP: tl.constexpr, SCORE: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j = tl.arange(0, RSP)
    offs = (q * rs)[:, None] + j[None, :]
    valid = (q < nk)[:, None] & (j < rs)[None, :]
    keys = tl.where(valid, _key(tl.load(w_ptr + offs, mask=valid, other=0.0)), -1)
    kept = _rank_keep(keys, valid, keep, RSP)
    tl.store(out_ptr + offs, kept.to(tl.uint8), mask=valid)
    if SCORE:
        score = tl.max(tl.where(kept, keys, 0), axis=1)
        tl.store(score_ptr + q, score, mask=q < nk)


@triton.jit
def _ck_select_kernel(score_ptr, alive_ptr, size, keep, group_step, index_stride,
                      BLOCK: tl.constexpr):
    """Group g: scores at g*group_step + i*index_stride, i < size; alive = keep best of them."""
    base = tl.program_id(0).to(tl.int64) * group_step
    idx = tl.arange(0, BLOCK)
    t = 0
    for bit in tl.static_range(30, -1, -1):  # t = the keep-th largest key (all ones if keep = 0)
        cand = t | (1 << bit)
        cnt = 0
        for start in range(0, size, BLOCK):
            i = start + idx
            k = tl.load(score_ptr + base + i.to(tl.int64) * index_stride, mask=i < size, other=-1)
            cnt += tl.sum((k >= cand).to(tl.int32), axis=0)
        t = tl.where(cnt >= keep, cand, t)
    above = 0
    for start in range(0, size, BLOCK):
        i = start + idx
        k = tl.load(score_ptr + base + i.to(tl.int64) * index_stride, mask=i < size, other=-1)
        above += tl.sum((k > t).to(tl.int32), axis=0)
    need = keep - above  # ties at t kept in index order
    seen = 0
    for start in range(0, size, BLOCK):
        i = start + idx
        k = tl.load(score_ptr + base + i.to(tl.int64) * index_stride, mask=i < size, other=-1)
        tie = (k == t).to(tl.int32)
        before = seen + tl.cumsum(tie, axis=0) - tie
        kept = (k > t) | ((tie == 1) & (before < need))
        tl.store(alive_ptr + base + i.to(tl.int64) * index_stride, kept.to(tl.uint8), mask=i < size)
        seen += tl.sum(tie, axis=0)


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


def _rank_tile(mp):
    return max(1, _TILE // (mp * mp))


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask (SPEC §5) of w [K, C, *] along C; m ≤ 128."""
    if m > 128:
        raise NotImplementedError("sparsekern Triton nm_mask supports m <= 128")
    out, o = _bool_out(w)
    if w.numel() == 0:
        return out
    inner = w.numel() // (w.shape[0] * w.shape[1])
    groups = w.numel() // m
    mp = triton.next_power_of_2(m)
    bg = _rank_tile(mp)
    _wrap(_nm_kernel)[(triton.cdiv(groups, bg),)](w, o, groups, inner, n, m, BLOCK_G=bg, MP=mp)
    return out


def kernel_mask(w: torch.Tensor, window_keep: int, ck_keep: int, by_out: bool) -> torch.Tensor:
    """Window / CK / intra mask (SPEC §5) of w [K, C, R, S]; R·S ≤ 64."""
    k, c = w.shape[0], w.shape[1]
    rs = w.shape[2] * w.shape[3]
    if rs > 64:
        raise NotImplementedError("sparsekern Triton kernel_mask supports R*S <= 64")
    out, o = _bool_out(w)
    if w.numel() == 0:
        return out
    nk = k * c
    size = c if by_out else k
    ck = ck_keep < size
    score = torch.empty(nk if ck else 1, dtype=torch.int32, device=w.device)
    rsp = triton.next_power_of_2(rs)
    bq = _rank_tile(rsp)
    _wrap(_window_kernel)[(triton.cdiv(nk, bq),)](w, o, score, nk, rs, window_keep,
                                                  BLOCK_Q=bq, RSP=rsp, SCORE=ck)
    if ck:
        alive = torch.empty(nk, dtype=torch.uint8, device=w.device)
        groups, step, stride = (k, c, 1) if by_out else (c, 1, c)
        _wrap(_ck_select_kernel)[(groups,)](score, alive, size, ck_keep, step, stride,
                                            BLOCK=_SELECT_BLOCK)
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
