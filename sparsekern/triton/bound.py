"""Triton kernels for the bound family (SPEC §4: docs/methods.md): Gaussian bounds and the ASL bound.

Three launchers, the CUDA implementations of the bound ops through the adapters of
``sparsekern/ops/bound.py``, with the contract of the C++ kernels of ``csrc/cpu/bound.cpp``:

    gaussian_bounds(tensors, multipliers) -> (bounds fp32 [L], nan_index int64 [])
    asl_fwd(w, r) -> w·1[|w| > b]          asl_bwd(grad, w, r) -> grad_r fp32 [G]

Moments of a ``[G, C]`` view (one row per group sharing an r; one row per tensor for the
Gaussian bounds): programs own BLOCK_R rows and a split of the columns (``_common.tiling``, as
the threshold family); per tile, the row mean, then the squared deviations from it, merged over the
program's tiles with Chan's formula in fp32 into a partial ``(count, mean, M2)`` per
``(row, split)``. Consumers merge a row's partials in one fixed-order reduction, so results are
deterministic. Nothing is read back to the host. Unlike the C++ kernels (double fallback), fp32
squares limit σ to weights with |w − mean| between ~1e-17 and ~1e18.
"""
import torch
import triton
import triton.language as tl

from ._common import ROW_WARPS, finish_rows, row_tile, sum_partials, tile_rows, tiling
from ._common import wrap as _wrap


@triton.jit
def _moments_kernel(x_ptr, part_ptr, R, C, n_split, iters, row0, row_stride, plane,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[k, row0 + r, split] (k = 0, 1, 2: count, mean, M2; ``plane`` elements apart, rows
    ``row_stride`` apart) over this program's columns of row r of the [R, C] view of x."""
    rows, row_mask, split, col0 = tile_rows(R, n_split, iters, BLOCK_R, BLOCK_C)
    cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, C, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nb = tl.sum(mask.to(tl.float32), axis=1)
        mb = tl.sum(x, axis=1) / tl.maximum(nb, 1.0)
        d = tl.where(mask, x - mb[:, None], 0.0)
        total = cnt + nb
        delta = mb - mean
        frac = nb / tl.maximum(total, 1.0)
        mean = mean + delta * frac
        m2 = m2 + tl.sum(d * d, axis=1) + delta * delta * cnt * frac
        cnt = total
    dst = part_ptr + (row0 + rows) * row_stride + split
    tl.store(dst, cnt, mask=row_mask)
    tl.store(dst + plane, mean, mask=row_mask)
    tl.store(dst + 2 * plane, m2, mask=row_mask)


@triton.jit
def _row_sigma(part_ptr, rows, row_mask, n_split, row_stride, plane, SPLIT_P2: tl.constexpr):
    """Unbiased std of each row from its partial moments (Chan's formula over all splits)."""
    s = tl.arange(0, SPLIT_P2)
    m = row_mask[:, None] & (s < n_split)[None, :]
    src = part_ptr + rows[:, None] * row_stride + s[None, :]
    n_s = tl.load(src, mask=m, other=0.0)
    mean_s = tl.load(src + plane, mask=m, other=0.0)
    m2_s = tl.load(src + 2 * plane, mask=m, other=0.0)
    n = tl.sum(n_s, axis=1)
    mean = tl.sum(n_s * mean_s, axis=1) / n
    d = mean_s - mean[:, None]
    m2 = tl.sum(m2_s, axis=1) + tl.sum(tl.where(m, n_s * d * d, 0.0), axis=1)
    return tl.sqrt_rn(tl.math.div_rn(m2, n - 1.0))


@triton.jit
def _row_bound(r_ptr, part_ptr, rows, row_mask, R, n_split, SPLIT_P2: tl.constexpr):
    """clamp(r, 0, 5)·σ + 1e-6 per row, [BLOCK_R, 1] (partials laid out [3, R, n_split])."""
    sigma = _row_sigma(part_ptr, rows, row_mask, n_split, n_split, R * n_split, SPLIT_P2)
    r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)
    return (tl.minimum(tl.maximum(r, 0.0), 5.0) * sigma + 1e-6)[:, None]


@triton.jit
def _gaussian_kernel(part_ptr, c_ptr, bound_ptr, sigma_ptr, L, S, plane,
                     BLOCK_R: tl.constexpr, SPLIT_P2: tl.constexpr):
    """bound = fp32(σ·c) in fp64 (c = inf: inf, also for σ = 0) and σ, per tensor."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < L
    sigma = _row_sigma(part_ptr, rows, row_mask, S, S, plane, SPLIT_P2)
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0)
    prod = sigma.to(tl.float64) * c
    prod = tl.where(sigma == 0.0, tl.where(c > 1.7e308, c, 0.0), prod)
    tl.store(bound_ptr + rows, prod.to(tl.float32), mask=row_mask)
    tl.store(sigma_ptr + rows, sigma, mask=row_mask)


@triton.jit
def _asl_fwd_kernel(w_ptr, r_ptr, part_ptr, out_ptr, R, C, n_split, iters,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_P2: tl.constexpr):
    """out = w·1[|w| > clamp(r, 0, 5)·σ + 1e-6] over this program's tiles."""
    rows, row_mask, _, col0 = tile_rows(R, n_split, iters, BLOCK_R, BLOCK_C)
    b = _row_bound(r_ptr, part_ptr, rows, row_mask, R, n_split, SPLIT_P2)
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, C, BLOCK_C)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = w * (tl.abs(w) > b).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _asl_dot_kernel(g_ptr, w_ptr, r_ptr, part_ptr, dot_ptr, R, C, n_split, iters,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_P2: tl.constexpr):
    """dot[r, split] = Σ grad·w over the pruned (|w| <= b) elements of this program's tiles."""
    rows, row_mask, split, col0 = tile_rows(R, n_split, iters, BLOCK_R, BLOCK_C)
    b = _row_bound(r_ptr, part_ptr, rows, row_mask, R, n_split, SPLIT_P2)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, C, BLOCK_C)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(tl.abs(w) > b, 0.0, g * w)
    tl.store(dot_ptr + rows * n_split + split, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _asl_grad_r_kernel(dot_ptr, r_ptr, gr_ptr, R, n_split,
                       BLOCK_R: tl.constexpr, SPLIT_P2: tl.constexpr):
    """grad_r = -(Σ_splits dot) / r where 0 < r < 5, else 0 (paper Eq. 18)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    dot = sum_partials(dot_ptr, rows, row_mask, n_split, SPLIT_P2)
    r = tl.load(r_ptr + rows, mask=row_mask, other=1.0)
    active = (r > 0.0) & (r < 5.0)
    gr = tl.where(active, -tl.math.div_rn(dot, tl.where(active, r, 1.0)), 0.0)
    tl.store(gr_ptr + rows, gr, mask=row_mask)


# ----------------------------------------------------------------------------- launchers


def _dense(t):
    """``t`` when contiguous or channels-last (its elements fill one block of memory in some
    order, which σ does not depend on), else a contiguous copy."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    return t if dense else t.contiguous()


def gaussian_bounds(tensors, multipliers):
    """σ_i·c_i per tensor (SPEC §4, Gaussian bound) and the first tensor whose σ is NaN (or -1)."""
    dev = tensors[0].device
    L = len(tensors)
    tilings = [tiling(1, t.numel()) for t in tensors]
    S = max(tg[2] for tg in tilings)
    part = torch.zeros((3, L, S), dtype=torch.float32, device=dev)
    for i, (t, (block_r, block_c, n_split, iters, grid)) in enumerate(zip(tensors, tilings)):
        _wrap(_moments_kernel)[grid](_dense(t), part, 1, t.numel(), n_split, iters, i, S, L * S,
                                     BLOCK_R=block_r, BLOCK_C=block_c, num_warps=ROW_WARPS)
    bounds = torch.empty(L, dtype=torch.float32, device=dev)
    sigma = torch.empty(L, dtype=torch.float32, device=dev)
    c = torch.tensor(multipliers, dtype=torch.float64, device=dev)
    block_r, split_p2, grid = finish_rows(L, S)
    _wrap(_gaussian_kernel)[grid](part, c, bounds, sigma, L, S, L * S,
                                  BLOCK_R=block_r, SPLIT_P2=split_p2, num_warps=4)
    first = torch.where(sigma.isnan(), torch.arange(L, device=dev), L).min()
    return bounds, torch.where(first < L, first, -1)


def _group_moments(w, groups):
    """Partial moments of the [groups, n / groups] view of w and its tiling."""
    block_r, block_c, n_split, iters, grid = tiling(groups, w.numel() // groups)
    part = torch.empty((3, groups, n_split), dtype=torch.float32, device=w.device)
    _wrap(_moments_kernel)[grid](w, part, groups, w.numel() // groups, n_split, iters, 0, n_split,
                                 groups * n_split, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=ROW_WARPS)
    return part, (block_r, block_c, n_split, iters, grid)


def asl_fwd(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """ASL forward (SPEC §4): w·1[|w| > clamp(r, 0, 5)·σ + 1e-6], σ per group of r."""
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    groups = r.numel()
    part, (block_r, block_c, n_split, iters, grid) = _group_moments(w, groups)
    _wrap(_asl_fwd_kernel)[grid](w, r, part, out, groups, w.numel() // groups, n_split, iters,
                                 BLOCK_R=block_r, BLOCK_C=block_c,
                                 SPLIT_P2=triton.next_power_of_2(n_split), num_warps=ROW_WARPS)
    return out


def asl_bwd(grad: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """ASL ∂L/∂r (SPEC §4, paper Eq. 18): -(Σ_pruned grad·w)/r per group, 0 outside 0 < r < 5."""
    groups = r.numel()
    if w.numel() == 0:
        return torch.zeros_like(r)
    grad_r = torch.empty_like(r)
    part, (block_r, block_c, n_split, iters, grid) = _group_moments(w, groups)
    split_p2 = triton.next_power_of_2(n_split)
    dot = torch.empty((groups, n_split), dtype=torch.float32, device=w.device)
    _wrap(_asl_dot_kernel)[grid](grad, w, r, part, dot, groups, w.numel() // groups, n_split, iters,
                                 BLOCK_R=block_r, BLOCK_C=block_c, SPLIT_P2=split_p2,
                                 num_warps=ROW_WARPS)
    fin_r, split_p2, fin_grid = finish_rows(groups, n_split)
    _wrap(_asl_grad_r_kernel)[fin_grid](dot, r, grad_r, groups, n_split,
                                        BLOCK_R=fin_r, SPLIT_P2=split_p2, num_warps=4)
    return grad_r
