"""Triton kernels for the threshold family (SPEC §1–3, §6: docs/methods.md).

Seven launchers, the CUDA implementations of the threshold ops through the adapters of
``sparsekern/ops/threshold.py`` (``soft_fwd`` serves soft_threshold and str_threshold, ...), with
the contract of the C++ kernels of ``csrc/cpu/threshold.cpp``: ``w`` / ``grad`` contiguous fp32/fp16/bf16 of any shape,
viewed as ``[K, inner]`` (K = w.size(0), or 1 for a 0-d w); ``t`` contiguous fp32 with numel 1
(scalar), K (per output channel) or numel(w) (per element). Math runs in fp32; outputs are new
contiguous tensors shaped like ``w`` with its dtype. Kernels are launched through
``_common.wrap`` (``torch.library.wrap_triton``).

Reductions (ST-3 row means, STR's grad_t) are deterministic: a 2-D tiled kernel writes fp32 partial
sums to a ``[rows, n_split]`` buffer and a second kernel adds each row's partials in a fixed order.
"""
import torch
import triton
import triton.language as tl

from ._common import ROW_WARPS, finish_rows, row_tile, sum_partials, tile_rows, tiling
from ._common import wrap as _wrap

_BLOCK = 2048  # elements per program of the elementwise kernels
_NUM_WARPS = 8  # of the elementwise kernels
_SCALAR, _CHANNEL, _ELEMENT = 0, 1, 2  # threshold modes (T_MODE)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _flat_offsets(BLOCK: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _t_flat(t_ptr, offs, mask, inner, T_MODE: tl.constexpr):
    """Threshold of flat element ``offs``: t[0], t[offs // inner] or t[offs]."""
    if T_MODE == 0:
        t = tl.load(t_ptr)
    elif T_MODE == 1:
        t = tl.load(t_ptr + offs // inner, mask=mask, other=0.0)
    else:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    return t


@triton.jit
def _t_tile(t_ptr, rows, row_mask, offs, mask, T_MODE: tl.constexpr):
    """Threshold of the tile element (rows[:, None], flat index offs) of a [K, inner] view."""
    if T_MODE == 0:
        t = tl.load(t_ptr)
    elif T_MODE == 1:
        t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)[:, None]
    else:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    return t


@triton.jit
def _act(x, ACT: tl.constexpr):
    """g(x): identity (0), sigmoid (1) or exp (2)."""
    if ACT == 1:
        x = tl.sigmoid(x)
    elif ACT == 2:
        x = tl.exp(x)
    return x


@triton.jit
def _times_act_grad(x, t, ACT: tl.constexpr):
    """x·g'(t): x (identity), x·σ(t)(1 − σ(t)) (sigmoid) or x·e^t (exp)."""
    if ACT == 1:
        s = tl.sigmoid(t)
        x = x * (s * (1.0 - s))
    elif ACT == 2:
        x = x * tl.exp(t)
    return x


@triton.jit
def _sign(w):
    return tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))


@triton.jit
def _shrink(w, thr):
    """sign(w) * max(|w| - thr, 0); NaN propagates as in torch.clamp."""
    return _sign(w) * tl.maximum(tl.abs(w) - thr, 0.0, propagate_nan=tl.PropagateNan.ALL)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _soft_fwd_kernel(w_ptr, t_ptr, out_ptr, n, inner,
                     T_MODE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
                     INT64: tl.constexpr):
    offs = _flat_offsets(BLOCK, INT64)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    thr = _act(_t_flat(t_ptr, offs, mask, inner, T_MODE), ACT)
    tl.store(out_ptr + offs, _shrink(w, thr).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad_kernel(grad_ptr, w_ptr, t_ptr, gw_ptr, gt_ptr, n, inner, theta,
                        T_MODE: tl.constexpr, ACT: tl.constexpr, WRITE_GT: tl.constexpr,
                        BLOCK: tl.constexpr, INT64: tl.constexpr):
    """gw = grad * (1 if |w| > g(t) else theta); with WRITE_GT (numel(t) == n: one element per
    t_i) also gt = -g'(t) * grad * sign(w) * 1[|w| > g(t)]."""
    offs = _flat_offsets(BLOCK, INT64)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _t_flat(t_ptr, offs, mask, inner, T_MODE)
    keep = tl.abs(w) > _act(t, ACT)
    tl.store(gw_ptr + offs, (g * tl.where(keep, 1.0, theta)).to(gw_ptr.dtype.element_ty), mask=mask)
    if WRITE_GT:
        gt = _times_act_grad(-(g * _sign(w) * keep.to(tl.float32)), t, ACT)
        tl.store(gt_ptr + offs, gt, mask=mask)


@triton.jit
def _soft_bwd_rows_kernel(grad_ptr, w_ptr, t_ptr, gw_ptr, part_ptr, R, C, n_split, iters,
                          ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[R, C] view, row r uses t[r]: gw = grad * 1[|w| > g(t)] and
    part[r, split] = sum over this program's columns of grad * sign(w) * 1[|w| > g(t)]."""
    rows, row_mask, split, col0 = tile_rows(R, n_split, iters, BLOCK_R, BLOCK_C)
    thr = _act(tl.load(t_ptr + rows, mask=row_mask, other=0.0), ACT)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, C, BLOCK_C)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        keep = (tl.abs(w) > thr).to(tl.float32)
        tl.store(gw_ptr + offs, (g * keep).to(gw_ptr.dtype.element_ty), mask=mask)
        acc += g * _sign(w) * keep
    tl.store(part_ptr + rows * n_split + split, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _soft_t_grad_kernel(part_ptr, t_ptr, gt_ptr, R, n_split,
                        ACT: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_P2: tl.constexpr):
    """gt[r] = -g'(t[r]) * sum_s part[r, s]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    gt = -sum_partials(part_ptr, rows, row_mask, n_split, SPLIT_P2)
    t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)
    tl.store(gt_ptr + rows, _times_act_grad(gt, t, ACT), mask=row_mask)


@triton.jit
def _st3_sums_kernel(w_ptr, t_ptr, part_ptr, K, inner, n_split, iters,
                     T_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[0, r, split] = sum |w| * 1[|w| > t], part[1, r, split] = sum |w| over this program's
    columns of row r of the [K, inner] view."""
    rows, row_mask, split, col0 = tile_rows(K, n_split, iters, BLOCK_R, BLOCK_C)
    kept = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, inner, BLOCK_C)
        a = tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        t = _t_tile(t_ptr, rows, row_mask, offs, mask, T_MODE)
        kept += tl.where(a > t, a, 0.0)
        total += a
    dst = part_ptr + rows * n_split + split
    tl.store(dst, tl.sum(kept, axis=1), mask=row_mask)
    tl.store(dst + K * n_split, tl.sum(total, axis=1), mask=row_mask)


@triton.jit
def _st3_apply_kernel(w_ptr, t_ptr, part_ptr, out_ptr, K, inner, n_split, iters,
                      T_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      SPLIT_P2: tl.constexpr):
    """out = scale_r * sign(w) * max(|w| - t, 0), scale_r from row r's partial sums (SPEC §2)."""
    rows, row_mask, _, col0 = tile_rows(K, n_split, iters, BLOCK_R, BLOCK_C)
    # IEEE divisions (GPU `/` is approximate): t = 0 keeps every |w| > 0, rho is exactly 1 and
    # the layer is exactly the identity (SPEC §2).
    n_inner = tl.cast(inner, tl.float32)  # inner may arrive as constexpr 1
    sum_kept = sum_partials(part_ptr, rows, row_mask, n_split, SPLIT_P2)
    sum_all = sum_partials(part_ptr + K * n_split, rows, row_mask, n_split, SPLIT_P2)
    mean_kept = tl.math.div_rn(sum_kept, n_inner)
    mean_all = tl.math.div_rn(sum_all, n_inner)
    rho = tl.math.div_rn(mean_kept + 1e-6, mean_all + 1e-6)
    # a kept infinite weight makes both means inf: rho = 1, its limit (not inf/inf = NaN)
    rho = tl.where((mean_kept == float("inf")) & (mean_all == float("inf")), 1.0, rho)
    scale = tl.math.div_rn(1.01, rho + 0.01)[:, None]
    for it in range(iters):
        mask, offs = row_tile(rows, row_mask, col0, it, inner, BLOCK_C)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = _t_tile(t_ptr, rows, row_mask, offs, mask, T_MODE)
        tl.store(out_ptr + offs, (scale * _shrink(w, t)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log_ratio(a, t):
    """ln(t/a) for 0 <= t < a (-inf for t = 0 or a = inf), within ~2 ulp on every GPU.

    a <= 2t: 2·atanh(s) by its series, s = (t − a)/(t + a) in [−1/3, 0) (t − a exact, IEEE
    division): t/a itself would round next to 1, an absolute error of half an ulp of 1 in a
    logarithm as small as 2^-24. a > 2t: log2(t/a)·ln 2 (tl.log2 is libdevice's log2f on CUDA),
    |log2(t/a)| >= 1.
    """
    near = a <= 2.0 * t
    s = tl.math.div_rn(tl.where(near, t - a, 0.0), t + a)
    s2 = s * s
    series = 1.0 / 15.0
    series = series * s2 + 1.0 / 13.0
    series = series * s2 + 1.0 / 11.0
    series = series * s2 + 1.0 / 9.0
    series = series * s2 + 1.0 / 7.0
    series = series * s2 + 1.0 / 5.0
    series = series * s2 + 1.0 / 3.0
    y = tl.math.div_rn(t, a)
    far = tl.where(y > 0.0, tl.log2(tl.where(y > 0.0, y, 1.0)) * 0.6931471805599453, float("-inf"))
    return tl.where(near, 2.0 * s * (1.0 + s2 * series), far)


@triton.jit
def _one_minus_exp(z):
    """1 − e^z = −expm1(z) for z <= 0, a few ulp relative on every GPU: the Taylor series of
    expm1 for z > −ln 2 (1 − ex2.approx(z) would cancel), else 1 − 2^(z·log2 e) (>= 1/2)."""
    e = 1.0 / 3628800.0  # 1/10!
    e = e * z + 1.0 / 362880.0
    e = e * z + 1.0 / 40320.0
    e = e * z + 1.0 / 5040.0
    e = e * z + 1.0 / 720.0
    e = e * z + 1.0 / 120.0
    e = e * z + 1.0 / 24.0
    e = e * z + 1.0 / 6.0
    e = e * z + 0.5
    e = e * z + 1.0
    return tl.where(z > -0.6931471805599453, -(e * z), 1.0 - tl.exp2(z * 1.4426950408889634))


@triton.jit
def _power_fwd_kernel(w_ptr, t_ptr, out_ptr, n, inner, p,
                      T_MODE: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """out = sign(w)·|w|·δ^(1/p), δ = 1 − (t/|w|)^p = 1 − e^(p·ln(t/|w|)) in (0, 1], if |w| > t,
    else 0 (SPEC §3's (|w|^p − t^p)^(1/p) without a power of |w| that overflows, and δ without
    the cancellation of |w|^p − t^p just above t). δ = 1 (t = 0, |w| = inf) gives w exactly."""
    offs = _flat_offsets(BLOCK, INT64)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _t_flat(t_ptr, offs, mask, inner, T_MODE)
    a = tl.abs(w)
    keep = a > t
    delta = _one_minus_exp(p * _log_ratio(tl.where(keep, a, 1.0), tl.where(keep, t, 0.0)))
    root = tl.where(delta < 1.0, tl.exp2(tl.math.div_rn(tl.log2(delta), p)), 1.0)
    out = tl.where(keep, _sign(w) * (a * root), tl.where(w != w, w, 0.0))  # NaN weights stay NaN
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hard_fwd_kernel(w_ptr, t_ptr, out_ptr, n, inner,
                     T_MODE: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs = _flat_offsets(BLOCK, INT64)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _t_flat(t_ptr, offs, mask, inner, T_MODE)
    out = w * (tl.abs(w) > t).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host helpers


def _layout(w, t):
    """(numel, inner, T_MODE) of w viewed as [K, inner] with threshold t."""
    n = w.numel()
    k = w.shape[0] if w.dim() > 0 else 1
    inner = n // k if k else 0
    mode = _SCALAR if t.numel() == 1 else _CHANNEL if t.numel() == k else _ELEMENT
    return n, inner, mode


def _flat_meta(n):
    """Grid and launch options of an elementwise kernel over n elements."""
    meta = dict(BLOCK=_BLOCK, INT64=n + _BLOCK >= 2**31, num_warps=_NUM_WARPS)
    return (triton.cdiv(n, _BLOCK),), meta


def _elementwise(kernel, w, t, *args, **constexprs):
    """A new tensor like w from one launch of an elementwise kernel over w's elements with
    threshold t: ``kernel(w, t, out, n, inner, *args, T_MODE, **constexprs)``."""
    out = torch.empty_like(w)
    n, inner, mode = _layout(w, t)
    if n:
        grid, meta = _flat_meta(n)
        _wrap(kernel)[grid](w, t, out, n, inner, *args, T_MODE=mode, **constexprs, **meta)
    return out


# ----------------------------------------------------------------------------- launchers


def soft_fwd(w: torch.Tensor, t: torch.Tensor, act: int) -> torch.Tensor:
    """STR forward (SPEC §1): sign(w) * max(|w| - g(t), 0); act 0/1/2: g = id/sigmoid/exp."""
    return _elementwise(_soft_fwd_kernel, w, t, ACT=act)


def soft_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor, act: int, t_grad: bool):
    """STR backward (SPEC §1) -> (grad_w like w, grad_t fp32 shaped like t; empty if not t_grad).

    grad_w = grad * 1[|w| > g(t)];
    grad_t[j] = -g'(t_j) * sum of grad_i * sign(w_i) over the kept i that use t_j.
    """
    grad_w = torch.empty_like(w)
    n, inner, mode = _layout(w, t)
    if not t_grad:
        grad_t = torch.empty(0, dtype=torch.float32, device=w.device)
    else:  # an empty w contributes nothing to any t_j
        grad_t = torch.zeros_like(t) if n == 0 else torch.empty_like(t)
    if n == 0:
        return grad_w, grad_t
    if not t_grad or t.numel() == n:
        grid, meta = _flat_meta(n)
        _wrap(_masked_grad_kernel)[grid](
            grad, w, t, grad_w, grad_t, n, inner, 0.0,
            T_MODE=mode, ACT=act, WRITE_GT=t_grad, **meta)
        return grad_w, grad_t
    # t_j is shared by the j-th contiguous run of n / numel(t) elements: reduce rows of that view.
    rows = t.numel()
    block_r, block_c, n_split, iters, grid = tiling(rows, n // rows)
    part = torch.empty((rows, n_split), dtype=torch.float32, device=w.device)
    _wrap(_soft_bwd_rows_kernel)[grid](
        grad, w, t, grad_w, part, rows, n // rows, n_split, iters,
        ACT=act, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=ROW_WARPS)
    fin_r, split_p2, fin_grid = finish_rows(rows, n_split)
    _wrap(_soft_t_grad_kernel)[fin_grid](
        part, t, grad_t, rows, n_split, ACT=act, BLOCK_R=fin_r, SPLIT_P2=split_p2, num_warps=4)
    return grad_w, grad_t


def st3_fwd(w: torch.Tensor, t: torch.Tensor, rescale: bool) -> torch.Tensor:
    """ST-3 forward (SPEC §2): scale_o * sign(w) * max(|w| - t, 0) per output channel o
    (scale_o = 1.01 / (rho_o + 0.01) if rescale else 1)."""
    if not rescale:
        return soft_fwd(w, t, 0)
    out = torch.empty_like(w)
    n, inner, mode = _layout(w, t)
    if n == 0:
        return out
    k = n // inner
    block_r, block_c, n_split, iters, grid = tiling(k, inner)
    part = torch.empty((2, k, n_split), dtype=torch.float32, device=w.device)
    meta = dict(T_MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=ROW_WARPS)
    _wrap(_st3_sums_kernel)[grid](w, t, part, k, inner, n_split, iters, **meta)
    _wrap(_st3_apply_kernel)[grid](
        w, t, part, out, k, inner, n_split, iters, SPLIT_P2=triton.next_power_of_2(n_split), **meta)
    return out


def power_fwd(w: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
    """Feather forward (SPEC §3): sign(w) * (|w|^p - t^p)^(1/p) if |w| > t else 0."""
    return _elementwise(_power_fwd_kernel, w, t, float(p))


def _masked_grad(grad, w, t, theta):
    """grad * (1 if |w| > t else theta)."""
    grad_w = torch.empty_like(w)
    n, inner, mode = _layout(w, t)
    if n == 0:
        return grad_w
    grid, meta = _flat_meta(n)
    _wrap(_masked_grad_kernel)[grid](
        grad, w, t, grad_w, t, n, inner, float(theta), T_MODE=mode, ACT=0, WRITE_GT=False, **meta)
    return grad_w


def power_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor, theta: float) -> torch.Tensor:
    """Feather backward (SPEC §3): grad * (1 if |w| > t else theta)."""
    return _masked_grad(grad, w, t, theta)


def hard_fwd(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Hard threshold (SPEC §6): w * 1[|w| > t]."""
    return _elementwise(_hard_fwd_kernel, w, t)


def hard_bwd(grad: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Masked gradient of the hard threshold (SPEC §6, GMP): grad * 1[|w| > t]."""
    return _masked_grad(grad, w, t, 0.0)
